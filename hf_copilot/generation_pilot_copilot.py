"""The Copilot's input stream and fused decoding: feedback, per-generation state, the logits processor (SPEC 5).

Hub-facing: copied next to checkpoints for `trust_remote_code`, so it imports nothing from hf_copilot.
The Copilot's state lives on the generation's cache object, so that two generate() calls never see
each other's state and every cache operation of generate() (beam reordering, batch expansion,
cropping) moves the Copilot's state together with the Pilot's keys and values.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache, EncoderDecoderCache, LogitsProcessor, StaticCache
from transformers.generation.utils import ALL_CACHE_NAMES

from .mistake_log_entry import (
    CopilotLossTerms,
    MistakeLogEntry,
    answer_token_positions,
    as_dtype,
    copilot_cross_entropy,
    copilot_head_cross_entropy,
    copilot_head_squared_error,
    copilot_squared_error,
    error_of_fused_logits,
    shift_right,
)

PROBABILITY_FLOOR = 1e-10
LOG_PROBABILITY_FLOOR = math.log(PROBABILITY_FLOOR)
# What forward() calls its cache argument and generate() its model_kwargs key: `cache` from transformers 5.24,
# `past_key_values` before. The wrappers accept both and hand the Pilot the one it knows.
CACHE_KEYWORD = ALL_CACHE_NAMES[0]


def fuse_scores(
    pilot_logits: torch.Tensor,
    predicted_error: torch.Tensor,
    copilot_lambda: float,
    fusion: str,
    pilot_probs: torch.Tensor | None = None,
):
    """Rectify the Pilot's next-token scores with the Copilot's predicted error.

    probs (paper Eq. 8): p~ = softmax(z) + lambda * f_C, clamped and renormalised, returned as
    log-probabilities so greedy, sampling and beam search all work on it. logits: z + lambda * f_C.
    `pilot_probs`: softmax(z) already computed (the Mistake Log entry's), so decoding does one per step.
    """
    if copilot_lambda == 0:
        return pilot_logits
    predicted_error = predicted_error.to(pilot_logits.dtype)
    if fusion == "logits":
        return pilot_logits + copilot_lambda * predicted_error
    if pilot_probs is None:
        pilot_probs = torch.softmax(pilot_logits.float(), dim=-1)
    # One new [B,V] tensor, the rest in place: at batch 8 and V = 32k each fresh one cost more than its arithmetic.
    probs = predicted_error.float() * copilot_lambda
    probs.add_(pilot_probs.float()).clamp_min_(PROBABILITY_FLOOR)
    probs.div_(probs.sum(-1, keepdim=True))
    return probs.log_().to(pilot_logits.dtype)


def fuse_reweighted_logits(
    pilot_logits: torch.Tensor,
    reweighted_logits: torch.Tensor,
    pilot_probs: torch.Tensor,
    copilot_lambda: float,
    fusion: str,
):
    """`fuse_scores` for the reweight form given log p + W_out h (`CopilotModel.decoding_output`), whose softmax
    is p + f_C: at lambda 1 under probs fusion its log-softmax, floored as `fuse_scores` floors, one pass over the
    vocabulary where forming f_C and fusing it take eight."""
    if copilot_lambda == 1 and fusion == "probs":
        fused = reweighted_logits.log_softmax(-1).clamp_min_(LOG_PROBABILITY_FLOOR)  # fp32 or wider
        return as_dtype(fused, pilot_logits.dtype)
    predicted_error = error_of_fused_logits(reweighted_logits, pilot_probs, reweighted_logits.dtype)
    return fuse_scores(pilot_logits, predicted_error, copilot_lambda, fusion, pilot_probs)


class CopilotKVCache:
    """Keys/values of the Copilot's past positions: stream keys for self-attention layers, memory
    keys (two entries per position: x_tilde_j and h_bar_j) for cross-attention layers.

    Each layer's rows live in buffers that grow by doubling: a decoding step writes its new rows in
    place, where concatenating would copy the whole cache at every step and make the per-token cost
    grow with the sequence. For inference: the in-place writes do not carry gradients across calls.
    """

    def __init__(self, num_layers: int):
        # Per layer: keys [B, H, capacity, head_dim], values (same), key positions [capacity].
        self.buffers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.rows = [0] * num_layers
        self.length = 0

    @property
    def keys(self) -> list[torch.Tensor | None]:
        return [None if b is None else b[0][:, :, :n] for b, n in zip(self.buffers, self.rows, strict=True)]

    @property
    def values(self) -> list[torch.Tensor | None]:
        return [None if b is None else b[1][:, :, :n] for b, n in zip(self.buffers, self.rows, strict=True)]

    @property
    def key_positions(self) -> list[torch.Tensor | None]:
        return [None if b is None else b[2][:n] for b, n in zip(self.buffers, self.rows, strict=True)]

    def update(self, idx: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
        rows, end = self.rows[idx], self.rows[idx] + keys.shape[2]
        buffer = self.buffers[idx]
        if buffer is None or end > buffer[2].shape[0]:
            capacity = 2 * end
            grown = (
                keys.new_empty(*keys.shape[:2], capacity, keys.shape[3]),
                values.new_empty(*values.shape[:2], capacity, values.shape[3]),
                positions.new_empty(capacity),
            )
            if buffer is not None:
                grown[0][:, :, :rows] = buffer[0][:, :, :rows]
                grown[1][:, :, :rows] = buffer[1][:, :, :rows]
                grown[2][:rows] = buffer[2][:rows]
            self.buffers[idx] = buffer = grown
        buffer[0][:, :, rows:end] = keys
        buffer[1][:, :, rows:end] = values
        buffer[2][rows:end] = positions
        self.rows[idx] = end
        return buffer[0][:, :, :end], buffer[1][:, :, :end], buffer[2][:end]

    def map_batch(self, fn) -> None:
        """Apply a batch-dimension operation (beam reorder, expansion, selection) to every tensor."""
        self.buffers = [None if b is None else (fn(b[0]), fn(b[1]), b[2]) for b in self.buffers]

    def crop(self, length: int) -> None:
        """Keep the first `length` positions (for assisted decoding's rollback)."""
        for idx, positions in enumerate(self.key_positions):
            if positions is not None:
                self.rows[idx] = int((positions < length).sum())  # positions only grow along a layer
        self.length = min(self.length, length)


class StaticCopilotKVCache(CopilotKVCache):
    """The Copilot's keys/values in buffers allocated once for the whole generation, what a compiled decoding step
    needs (`generate(cache_implementation="static")`, `CopilotModel.decoding_step`).

    A slot's first `leading_rows` rows hold an encoder-decoder Pilot's encoder output (position -1, written by the
    prefill); after them, row r holds position r // k (k = 1 for a self-attention and an encoder-decoder
    cross-attention, 2 for a decoder-only cross-attention: x_tilde_j and h_bar_j). A row not yet written sits at a
    position no query reaches, so a step attends over the whole buffer with the causal mask and the shapes never
    change. Multi-position forwards (the prefill, drafted tokens) write in order and read the written rows, as
    with `CopilotKVCache`.
    """

    UNWRITTEN = torch.iinfo(torch.long).max

    def __init__(
        self,
        rows_per_position: list[int],
        max_positions: int,
        leading_rows: list[int] | None = None,
        leading_padding: torch.Tensor | None = None,
    ):
        """`max_positions`: the generation's length (`PilotCopilotStaticCache.max_positions`; for an
        encoder-decoder Pilot, its decoder's static cache length); `leading_padding` [B, leading rows]: False under
        the encoder's padding (None: no padding)."""
        super().__init__(len(rows_per_position))
        self.rows_per_position = rows_per_position
        self.max_positions = max_positions
        self.leading_rows = leading_rows or [0] * len(rows_per_position)
        self.leading_padding = None if leading_padding is None else leading_padding.bool()
        self.position: torch.Tensor | None = None  # [1]: the position the next decoding step writes
        self.padding: torch.Tensor | None = None  # [B, max_positions]: False at padding; None: no padding

    def update(self, idx: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
        if self.buffers[idx] is None:
            capacity = self.leading_rows[idx] + self.max_positions * self.rows_per_position[idx]
            # Zeros: a masked row gets weight 0, and 0 x NaN from uninitialised memory would still be NaN.
            self.buffers[idx] = (
                keys.new_zeros(*keys.shape[:2], capacity, keys.shape[3]),
                values.new_zeros(*values.shape[:2], capacity, values.shape[3]),
                positions.new_full((capacity,), self.UNWRITTEN),
            )
            fixed_addresses(*self.buffers[idx])
        return super().update(idx, keys, values, positions)

    def map_batch(self, fn) -> None:
        """In place where the batch keeps its size (beam reordering): the buffers keep their addresses, which a
        compiled step captured in CUDA graphs reads."""
        if self.leading_padding is not None:
            self.leading_padding = fn(self.leading_padding)
        for idx, buffer in enumerate(self.buffers):
            if buffer is None:
                continue
            keys, values = fn(buffer[0]), fn(buffer[1])
            if keys.shape == buffer[0].shape:
                buffer[0].copy_(keys)
                buffer[1].copy_(values)
            else:
                self.buffers[idx] = (keys, values, buffer[2])
                fixed_addresses(keys, values)

    def step_writes(self) -> StaticStepWrites:
        """The cache a decoding step's attentions write to and read from."""
        return StaticStepWrites(self)

    def prepare_step(self, attention_mask: torch.Tensor | None, device: torch.device) -> None:
        """Before a decoding step: its position as a tensor and the padding of every position so far, written
        into buffers of fixed shape."""
        past = self.length
        if self.position is None:
            self.position = torch.zeros(1, dtype=torch.long, device=device)
            fixed_addresses(self.position)
        self.position.fill_(past)
        if attention_mask is None:
            self.padding = None
            return
        batch = attention_mask.shape[0]
        if self.padding is None or self.padding.shape[0] != batch:
            self.padding = torch.zeros(batch, self.max_positions, dtype=torch.bool, device=device)
            fixed_addresses(self.padding)
        self.padding[:, : past + 1] = attention_mask[:, : past + 1].bool()

    def finish_step(self) -> None:
        """After a decoding step: account for the rows it wrote."""
        self.rows = [rows + k for rows, k in zip(self.rows, self.rows_per_position, strict=True)]
        self.length += 1

    def key_padding(self, idx: int) -> torch.Tensor | None:
        """[B, rows of slot `idx`]: False at the rows of padding (the encoder's, then each position's once per
        row); None where nothing is padding."""
        leading = self.leading_padding if self.leading_rows[idx] else None
        if self.padding is None and leading is None:
            return None
        padding = self.padding
        if padding is None:
            padding = leading.new_ones(leading.shape[0], self.max_positions)
        if self.rows_per_position[idx] > 1:
            padding = padding.repeat_interleave(self.rows_per_position[idx], dim=1)
        if self.leading_rows[idx] == 0:
            return padding
        if leading is None:
            leading = padding.new_ones(padding.shape[0], self.leading_rows[idx])
        return torch.cat([leading, padding], dim=1)


def fixed_addresses(*tensors: torch.Tensor) -> None:
    """Tell torch.compile that these tensors keep their storage for the generation (as transformers' StaticCache
    does), so that a step that writes them in place can run as CUDA graphs."""
    for tensor in tensors:
        torch._dynamo.mark_static_address(tensor)


class StaticStepWrites:
    """What a decoding step's attentions see as their cache: writes at the rows of `cache.position`, reads of
    the whole buffers (`StaticCopilotKVCache`)."""

    def __init__(self, cache: StaticCopilotKVCache):
        self.cache = cache

    def update(self, idx: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
        per_position = self.cache.rows_per_position[idx]
        offsets = torch.arange(keys.shape[2], device=positions.device) % per_position
        rows = self.cache.leading_rows[idx] + positions * per_position + offsets
        key_buffer, value_buffer, position_buffer = self.cache.buffers[idx]
        key_buffer.index_copy_(2, rows, keys)
        value_buffer.index_copy_(2, rows, values)
        position_buffer.index_copy_(0, rows, positions)
        return key_buffer, value_buffer, position_buffer


class PositionRows:
    """Rows [B, d] indexed by absolute position, in a buffer that grows by doubling (in-place writes)."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None  # [B, capacity, d]
        self.start = self.end = 0

    def write(self, start: int, rows: torch.Tensor) -> None:
        """Rows [B, n, d] for positions start..start+n-1; positions from `start` on are replaced."""
        if rows.shape[1] == 0:
            return
        if self.buffer is None or not self.start <= start <= self.end:
            self.buffer, self.start = None, start
        offset, end = start - self.start, start + rows.shape[1]
        if self.buffer is None or end - self.start > self.buffer.shape[1]:
            grown = rows.new_empty(rows.shape[0], 2 * (end - self.start), rows.shape[2])
            if self.buffer is not None:
                grown[:, :offset] = self.buffer[:, :offset]
            self.buffer = grown
        self.buffer[:, offset : end - self.start] = rows
        self.end = end

    def at(self, position: int) -> torch.Tensor:
        if not self.start <= position < self.end:
            raise RuntimeError(
                f"The Copilot holds no feedback for position {position} (it holds {self.start}..{self.end - 1}); "
                "was the cache reused across generate() calls?"
            )
        return self.buffer[:, position - self.start]

    def crop(self, length: int) -> None:
        self.end = min(self.end, length)

    def map_batch(self, fn) -> None:
        if self.buffer is not None:
            self.buffer = fn(self.buffer)


class CopilotDecodingState:
    """The Copilot's keys/values and the feedback its next step needs.

    `decoding_outputs`/`probs` hold the Copilot's `CopilotModel.decoding_output` (f_C, or for the reweight form
    the logits whose softmax is p + f_C: `reweighted`) and the Pilot's p_hat for the positions of the last forward
    call that generate() scores, starting at absolute position `start`: the processor reads the row of the
    position it scores. The feedback a next step reads is kept for every decoded position (d_C per row, not
    V): W_in p_j where the next position reads observed errors, W_in f_C_j in the paper's mode. A rollback of
    several tokens (assisted decoding) then resumes exactly.
    """

    def __init__(self, kv_cache, reweighted: bool):
        self.kv_cache = kv_cache
        self.reweighted = reweighted
        self.decoding_outputs: torch.Tensor | None = None  # [B, n, V]
        self.probs: torch.Tensor | None = None  # [B, n, V]
        self.start = 0
        self.embedded_probs = PositionRows()  # W_in p_j: the observed error of j once token j+1 is known
        self.embedded_predicted_errors = PositionRows()  # W_in f_C_j: the paper's feedback

    def record(
        self,
        decoding_outputs: torch.Tensor,
        probs: torch.Tensor,
        start: int,
        embedded_probs: torch.Tensor,
        embedded_predicted_errors: torch.Tensor | None,
    ) -> None:
        self.decoding_outputs, self.probs, self.start = decoding_outputs.detach(), probs.detach(), start
        self.embedded_probs.write(start, embedded_probs.detach())
        if embedded_predicted_errors is not None:
            self.embedded_predicted_errors.write(start, embedded_predicted_errors.detach())

    def at(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoding output and the Pilot's probabilities at `position`."""
        offset = position - self.start
        if not 0 <= offset < self.decoding_outputs.shape[1]:
            raise RuntimeError(
                f"The Copilot has no predicted_error for position {position} (it holds {self.start}.."
                f"{self.start + self.decoding_outputs.shape[1] - 1}); was the cache reused across generate() calls?"
            )
        return self.decoding_outputs[:, offset], self.probs[:, offset]

    def embedded_probs_at(self, position: int, weight: torch.Tensor) -> torch.Tensor:
        """W_in p at `position` [B, d_C]: recorded where a next position reads the observed error, else formed from
        the last forward's probabilities. The paper's mode records it at prompt positions only; a later generate()
        call that reuses the cache (a conversation's next turn) reads the observed error of the last token the
        earlier call generated."""
        offset = position - self.start
        recorded = self.embedded_probs.start <= position < self.embedded_probs.end
        if not recorded and self.probs is not None and 0 <= offset < self.probs.shape[1]:
            return F.linear(self.probs[:, offset].to(weight.dtype), weight)
        return self.embedded_probs.at(position)

    def map_batch(self, fn) -> None:
        self.kv_cache.map_batch(fn)
        self.embedded_probs.map_batch(fn)
        self.embedded_predicted_errors.map_batch(fn)
        if self.decoding_outputs is not None:
            self.decoding_outputs, self.probs = fn(self.decoding_outputs), fn(self.probs)

    def crop(self, length: int) -> None:
        if self.decoding_outputs is not None and length <= self.embedded_probs.start:
            raise ValueError(
                f"Cannot crop the Copilot's state to {length} positions: only positions from "
                f"{self.embedded_probs.start + 1} on can be returned to."
            )
        self.kv_cache.crop(length)
        self.embedded_probs.crop(length)
        self.embedded_predicted_errors.crop(length)
        if self.decoding_outputs is not None:
            keep = max(length - self.start, 0)
            self.decoding_outputs, self.probs = self.decoding_outputs[:, :keep], self.probs[:, :keep]


class CopilotStateCache:
    """Mixin for a Pilot cache class: the Copilot's decoding state rides on it, and every batch operation of
    generate() (beam reordering, expansion, selection, cropping) moves it with the Pilot's keys and values."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.copilot: CopilotDecodingState | None = None
        # Set by generate(): positions before it are the prompt, whose tokens are known.
        self.prompt_length: int | None = None

    def copilot_state(self, copilot, entry: MistakeLogEntry) -> CopilotDecodingState:
        """The state of this generation (`entry`: the first forward's, whose encoder output an encoder-decoder
        Copilot's cross-attention caches): over a static Pilot cache the Copilot keeps its keys/values in buffers
        as long as the Pilot's (`StaticCopilotKVCache`)."""
        if self.copilot is None:
            pilot_cache = self.self_attention_cache if isinstance(self, EncoderDecoderCache) else self
            if not isinstance(pilot_cache, StaticCache):
                kv_cache = CopilotKVCache(copilot.num_kv_cache_slots)
            elif copilot.config.encoder_decoder:  # slots 2i: self-attention; 2i + 1: [encoder output; h_bar]
                slots = range(copilot.num_kv_cache_slots)
                leading = [entry.x_tilde.shape[1] * (slot % 2) for slot in slots]
                kv_cache = StaticCopilotKVCache(
                    [1] * len(slots), pilot_cache.get_max_length(), leading, entry.encoder_attention_mask
                )
            else:
                per_position = [2 if layer.is_cross_attention else 1 for layer in copilot.layers]
                kv_cache = StaticCopilotKVCache(per_position, pilot_cache.max_positions)
            self.copilot = CopilotDecodingState(kv_cache, copilot.config.error_form == "reweight")
        return self.copilot

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.copilot is not None:
            self.copilot.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.copilot is not None:
            self.copilot.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.copilot is not None:
            self.copilot.map_batch(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        length = (self.copilot.kv_cache.length if self.copilot is not None else 0) - abs(tokens_to_remove)
        super().crop(tokens_to_remove)
        if self.copilot is not None and tokens_to_remove:
            self.copilot.crop(length)

    def reset(self) -> None:
        super().reset()
        self.copilot = None
        self.prompt_length = None


class PilotCopilotCache(CopilotStateCache, DynamicCache):
    """The Pilot's dynamic cache plus the Copilot's decoding state for one generation."""


class PilotCopilotStaticCache(CopilotStateCache, StaticCache):
    """The Pilot's static cache (preallocated keys/values, what compiled decoding needs) plus the Copilot's
    decoding state for one generation."""

    def __init__(self, config, max_cache_len: int, *args, **kwargs):
        super().__init__(config, max_cache_len, *args, **kwargs)
        # The generation's length. A sliding-window layer keeps only its window, so where every layer of the Pilot
        # does (Mistral's sliding_window), `get_max_length()` is the window; the Copilot attends over every position.
        self.max_positions = max_cache_len


class PilotCopilotEncoderDecoderCache(CopilotStateCache, EncoderDecoderCache):
    """An encoder-decoder Pilot's cache (decoder self-attention, cross-attention) plus the Copilot's decoding
    state, whose cross-attention keys include the projected encoder output, computed once per generation."""


class CopilotLogitsProcessor(LogitsProcessor):
    """First in generate()'s processor list: fuses the Copilot's predicted_error into the Pilot's scores.

    Temperature, top-k, top-p and the rest run after it, on the fused distribution.
    """

    def __init__(self, cache: PilotCopilotCache, copilot_lambda: float, fusion: str):
        self.cache = cache
        self.copilot_lambda = copilot_lambda
        self.fusion = fusion

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.copilot_lambda == 0:
            return scores
        state = self.cache.copilot
        output, probs = state.at(input_ids.shape[1] - 1)
        if state.reweighted:
            return fuse_reweighted_logits(scores, output, probs, self.copilot_lambda, self.fusion)
        return fuse_scores(scores, output, self.copilot_lambda, self.fusion, probs)


def copilot_stream(copilot, entry: MistakeLogEntry, copilot_feedback_fraction: float = 0.0) -> torch.Tensor:
    """The Copilot's teacher-forced input W_in e_{j-1}, or at generated positions its own prediction.

    Generated positions are those whose token is an answer token (`loss_mask[j-1]`): there the
    paper's feedback mode reads W_in f_C_{j-1}, not the observed error. With a fraction q > 0,
    each such position reads its own (detached) prediction of a first, observed pass with
    probability q, so that training sees the stream generation will feed (exposure bias).
    """
    stream = shift_right(copilot.embed_errors(entry.errors))
    if copilot_feedback_fraction <= 0:
        return stream
    generated = answer_token_positions(entry.loss_mask)
    if copilot_feedback_fraction < 1:
        draw = torch.rand(generated.shape, device=generated.device)
        generated = generated & (draw < copilot_feedback_fraction)
    with torch.no_grad():
        first = copilot_on_entry(copilot, stream, entry, return_head_input=True)
    errors = entry.errors
    fed = copilot.with_tokens(
        copilot.embed_own_predictions(first, errors), errors.masked_targets(), errors.mask
    )
    return torch.where(generated.unsqueeze(-1), shift_right(fed), stream)


@torch.no_grad()
def predicted_errors_as_generated(copilot, entry: MistakeLogEntry, copilot_feedback: str) -> torch.Tensor:
    """f_C at every position of a teacher-forced entry exactly as incremental decoding computes it.

    "observed": one pass. "copilot": answer positions read the Copilot's own previous prediction,
    which depends on theirs: iterating the stream to its fixed point takes one pass per answer token.
    """
    stream = shift_right(copilot.embed_errors(entry.errors))
    predicted = copilot_on_entry(copilot, stream, entry)
    if copilot_feedback == "observed":
        return predicted
    generated = answer_token_positions(entry.loss_mask).unsqueeze(-1)
    tokens, mask = entry.errors.masked_targets(), entry.errors.mask
    for _ in range(int(entry.loss_mask.sum(1).max())):
        fed = copilot.with_tokens(copilot.embed_predicted_errors(predicted), tokens, mask)
        predicted = copilot_on_entry(copilot, torch.where(generated, shift_right(fed), stream), entry)
    return predicted


def copilot_on_entry(copilot, stream: torch.Tensor, entry: MistakeLogEntry, **kwargs) -> torch.Tensor:
    """The Copilot over `stream` with the memory and masks of a teacher-forced entry (any Pilot kind)."""
    return copilot(
        stream,
        entry.x_tilde,
        entry.h_bar,
        entry.attention_mask,
        encoder_attention_mask=entry.encoder_attention_mask,
        pilot_errors=entry.errors,
        **kwargs,
    )


def copilot_loss_terms_on_entry(
    copilot, stream: torch.Tensor, entry: MistakeLogEntry, return_predicted_error: bool = False
) -> tuple[torch.Tensor | None, CopilotLossTerms]:
    """The Copilot's training loss on a teacher-forced entry (`CopilotConfig.error_loss`), and f_C where it is
    formed anyway or asked for (`copilot_head_loss_terms`)."""
    head_input = copilot_on_entry(copilot, stream, entry, return_head_input=True)
    return copilot_head_loss_terms(copilot, head_input, entry, return_predicted_error)


def copilot_head_loss_terms(
    copilot, head_input: torch.Tensor, entry: MistakeLogEntry, return_predicted_error: bool = False
) -> tuple[torch.Tensor | None, CopilotLossTerms]:
    """`copilot_loss_terms_on_entry` from what W_out reads [B,T,d_C]. Unless f_C is asked for, a plain head's
    loss reads W_out's weight (`computes_loss_without_output`): the linear head's squared error forms no f_C
    (`PilotErrors.head_squared_distance`), the reweight head's cross-entropy no [B,T,V] tensor
    beyond a block of rows (`PilotErrors.head_cross_entropy`)."""
    cross_entropy = copilot.config.error_loss == "cross_entropy"
    if not return_predicted_error and copilot.computes_loss_without_output:
        weight = copilot.error_head.weight
        if cross_entropy:
            return None, copilot_head_cross_entropy(head_input, weight, entry)
        squared_error, num_tokens = copilot_head_squared_error(head_input, weight, entry)
        return None, CopilotLossTerms(squared_error, squared_error, num_tokens)
    if cross_entropy:
        predicted_errors, fused_logits = copilot.error_and_fused_logits(head_input, entry.errors)
        squared_error, num_tokens = copilot_squared_error(predicted_errors.detach(), entry)
        objective = copilot_cross_entropy(fused_logits, entry)
        return predicted_errors, CopilotLossTerms(objective, squared_error, num_tokens)
    predicted_errors = copilot.predicted_error(head_input, entry.errors)
    squared_error, num_tokens = copilot_squared_error(predicted_errors, entry)
    return predicted_errors, CopilotLossTerms(squared_error, squared_error, num_tokens)


def copilot_teacher_forced_pass(
    copilot,
    entry: MistakeLogEntry,
    copilot_feedback_fraction: float,
    has_labels: bool,
    return_predicted_error: bool | None,
) -> tuple[torch.Tensor | None, CopilotLossTerms | None]:
    """The wrappers' Copilot pass on a teacher-forced entry: f_C, and with labels the loss terms
    (`copilot_loss_terms_on_entry`). `return_predicted_error` None: no f_C from a training pass (labels, the
    Copilot in train mode, gradients on), whose loss then need not form it; f_C otherwise."""
    stream = copilot_stream(copilot, entry, copilot_feedback_fraction)
    if return_predicted_error is None:
        return_predicted_error = not (has_labels and copilot.training and torch.is_grad_enabled())
    if not has_labels:
        return copilot_on_entry(copilot, stream, entry), None
    predicted_errors, terms = copilot_loss_terms_on_entry(copilot, stream, entry, return_predicted_error)
    return (predicted_errors if return_predicted_error else None), terms


def copilot_generation_step(
    copilot,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    entry: MistakeLogEntry,
    cache: PilotCopilotCache,
    copilot_feedback: str,
    decoding_step: Callable | None = None,
    return_predicted_error: bool = True,
) -> torch.Tensor | None:
    """Advance the Copilot over the new positions only, reading and updating its state in `cache`; f_C of the
    rows it records, or None where `return_predicted_error` is False (generate(), whose processor fuses the
    recorded `CopilotModel.decoding_output`).

    `attention_mask` [B, past + new] is None when there is no padding: a decoding step then builds
    no attention mask at all. Over a static cache a one-position step runs `decoding_step` (generate()'s
    compiled `CopilotModel.decoding_step`; None: the eager one) on the preallocated buffers.

    Prompt positions (every position in "observed" mode) read the observed errors; in "copilot"
    mode a generated position reads the Copilot's own previous predicted_error (the paper). generate()
    records the prompt length on the cache, because the prompt may arrive in several forwards
    (chunked prefill) or together with drafted tokens (assisted decoding); without it the first
    forward is the prompt.
    """
    state = cache.copilot_state(copilot, entry)
    new, past = input_ids.shape[1], state.kv_cache.length
    if copilot_feedback == "observed":
        known = new
    else:
        prompt_length = cache.prompt_length
        if prompt_length is None:
            prompt_length = past + new if past == 0 else past
        known = min(max(prompt_length - past, 0), new)
    # generate() scores positions from prompt_length - 1 on and may crop back to there (assisted decoding),
    # which needs the row before; earlier rows only feed the Copilot's caches.
    skip = 0 if cache.prompt_length is None else max(cache.prompt_length - 2 - past, 0)
    probs = entry.errors.probs  # [B, new, V]

    def predicted_errors(outputs: torch.Tensor, end: int) -> torch.Tensor:
        """f_C of decoding outputs whose last row is new position `end` - 1."""
        return copilot.predicted_error_from_decoding_output(outputs, probs[:, end - outputs.shape[1] : end])

    outputs = []  # CopilotModel.decoding_output of the recorded rows
    weight, embedded_probs = copilot.error_proj.weight, None
    if known > 0:
        head = entry if known == new else entry.map_positions(lambda t: t[:, :known])
        head_mask = None if attention_mask is None else attention_mask[:, : past + known]
        if (
            known > 1
        ):  # W_in p of these positions, once: their errors and the rows recorded below both read it
            embedded_probs = F.linear(head.errors.probs.to(weight.dtype), weight)
        observed = observed_feedback(copilot, input_ids[:, :known], head_mask, head, state, embedded_probs)
        keep = known - min(skip, known - 1)  # the last known row feeds the next step
        if is_static_step(state, known):
            outputs.append(static_step(copilot, observed, head, head_mask, state, decoding_step))
        else:
            head_input = copilot(
                observed,
                head.x_tilde,
                head.h_bar,
                head_mask,
                state.kv_cache,
                keep,
                encoder_attention_mask=entry.encoder_attention_mask,
                return_head_input=True,
            )
            outputs.append(copilot.decoding_output(head_input, probs[:, known - keep : known]))
    fed = []  # W_in f_C of every recorded row, the paper's feedback
    if copilot_feedback == "copilot":
        if outputs:
            fed.append(copilot.embed_predicted_errors(predicted_errors(outputs[0], known)))
        feedback = fed[0] if outputs else state.embedded_predicted_errors.at(past - 1).unsqueeze(1)
    for position in range(known, new):
        stream = copilot.with_tokens(feedback[:, -1:], input_ids[:, position : position + 1])
        length = state.kv_cache.length + 1
        step_mask = None if attention_mask is None else attention_mask[:, :length]
        step = entry.map_positions(lambda t, position=position: t[:, position : position + 1])
        if is_static_step(state, 1):
            output = static_step(copilot, stream, step, step_mask, state, decoding_step)
        else:
            head_input = copilot(
                stream,
                step.x_tilde,
                step.h_bar,
                step_mask,
                state.kv_cache,
                encoder_attention_mask=entry.encoder_attention_mask,
                return_head_input=True,
            )
            output = copilot.decoding_output(head_input, step.errors.probs)
        outputs.append(output)
        feedback = copilot.embed_predicted_errors(predicted_errors(output, position + 1))
        fed.append(feedback)
    decoding_outputs = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    rows = decoding_outputs.shape[1]
    embedded_predicted_errors = (fed[0] if len(fed) == 1 else torch.cat(fed, dim=1)) if fed else None
    # The paper's mode reads W_in p only at prompt positions (observed errors): generated rows skip it.
    observed_rows = rows if copilot_feedback == "observed" else rows - (new - known)
    if embedded_probs is None:
        recorded_probs = F.linear(
            as_dtype(probs[:, new - rows : new - rows + observed_rows], weight.dtype), weight
        )
    else:  # these rows lie within the known positions
        recorded_probs = embedded_probs[:, new - rows : new - rows + observed_rows]
    state.record(
        decoding_outputs,
        probs[:, new - rows :],
        past + new - rows,
        recorded_probs,
        embedded_predicted_errors,
    )
    return predicted_errors(decoding_outputs, new) if return_predicted_error else None


def is_static_step(state: CopilotDecodingState, new: int) -> bool:
    """One position after the prefill over preallocated buffers: what `CopilotModel.decoding_step` computes."""
    return new == 1 and isinstance(state.kv_cache, StaticCopilotKVCache) and state.kv_cache.length > 0


def static_step(
    copilot,
    stream: torch.Tensor,
    step: MistakeLogEntry,
    attention_mask: torch.Tensor | None,
    state: CopilotDecodingState,
    decoding_step: Callable | None,
) -> torch.Tensor:
    """`CopilotModel.decoding_output` [B,1,V] of one position over a `StaticCopilotKVCache`: its bookkeeping here,
    the network in `decoding_step` (compiled or `copilot.decoding_step`)."""
    kv_cache = state.kv_cache
    kv_cache.prepare_step(attention_mask, stream.device)
    # Contiguous: a compiled step is specialised to its inputs' strides (a row sliced from the prefill's differs).
    # An encoder output is in the cache since the prefill: the step does not read it.
    x_tilde = None if step.is_encoder_decoder else step.x_tilde.contiguous()
    stream, h_bar, probs = (t.contiguous() for t in (stream, step.h_bar, step.errors.probs))
    output = (decoding_step or copilot.decoding_step)(stream, x_tilde, h_bar, probs, kv_cache)
    kv_cache.finish_step()
    return output


def observed_feedback(
    copilot,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    entry: MistakeLogEntry,
    state,
    embedded_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """W_in e_{j-1} for each new position j, with e_{j-1} = onehot(x_j) - p_{j-1} (zero at padding);
    `embedded_probs`: W_in p_j of the new positions, where the caller has it already."""
    new = input_ids.shape[1]
    past = state.kv_cache.length
    errors = entry.errors
    if past > 0:
        # The error of the last cached position is completed by the first new token.
        if attention_mask is None:
            has_next = torch.ones_like(input_ids[:, :1], dtype=torch.bool)
        else:
            has_next = attention_mask[:, past - 1 : past + 1].bool().all(dim=1, keepdim=True)
        gold = F.embedding(input_ids[:, :1], copilot.error_proj.weight.t())
        first = gold - state.embedded_probs_at(past - 1, copilot.error_proj.weight).unsqueeze(1)
        first = copilot.with_tokens(first, input_ids[:, :1]) * has_next.unsqueeze(-1)
    else:
        weight = copilot.error_proj.weight
        first = weight.new_zeros(input_ids.shape[0], 1, weight.shape[0])
    if new == 1:  # a decoding step: its own error is completed by the next token
        return first
    completed = errors.map_tensors(lambda t: t[:, : new - 1])  # the errors the new tokens complete
    within = copilot.embed_errors(completed, None if embedded_probs is None else embedded_probs[:, : new - 1])
    return torch.cat([first, within], dim=1)


# ----------------------------------------------------------------------------------------------


__all__ = [
    "CACHE_KEYWORD",
    "CopilotLogitsProcessor",
    "CopilotStateCache",
    "PilotCopilotCache",
    "PilotCopilotEncoderDecoderCache",
    "StaticCopilotKVCache",
    "copilot_on_entry",
    "copilot_generation_step",
    "copilot_loss_terms_on_entry",
    "copilot_stream",
    "copilot_teacher_forced_pass",
    "fuse_reweighted_logits",
    "fuse_scores",
    "predicted_errors_as_generated",
]
