"""Fused decoding: the Copilot's per-generation state and the logits processor (SPEC section 5).

Hub-facing: copied next to checkpoints for `trust_remote_code`, so it imports nothing from hf_copilot.
The Copilot's state lives on the generation's cache object, so that two generate() calls never see
each other's state and every cache operation of generate() (beam reordering, batch expansion,
cropping) moves the Copilot's state together with the Pilot's keys and values.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, LogitsProcessor

PROBABILITY_FLOOR = 1e-10


def fuse_scores(pilot_logits: torch.Tensor, copilot_error: torch.Tensor, copilot_lambda: float, fusion: str):
    """Rectify the Pilot's next-token scores with the Copilot's predicted error.

    probs (paper Eq. 8): p~ = softmax(z) + lambda * f_C, clamped and renormalised, returned as
    log-probabilities so greedy, sampling and beam search all work on it. logits: z + lambda * f_C.
    """
    if copilot_lambda == 0:
        return pilot_logits
    copilot_error = copilot_error.to(pilot_logits.dtype)
    if fusion == "logits":
        return pilot_logits + copilot_lambda * copilot_error
    probs = torch.softmax(pilot_logits.float(), dim=-1) + copilot_lambda * copilot_error.float()
    probs = probs.clamp_min(PROBABILITY_FLOOR)
    probs = probs / probs.sum(-1, keepdim=True)
    return probs.log().to(pilot_logits.dtype)


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


class CopilotDecodingState:
    """The Copilot's keys/values and the feedback its next step needs.

    `predictions`/`probs` hold f_C and the Pilot's p_hat for the positions of the last forward call,
    starting at absolute position `start`: the processor reads the row of the position it scores,
    and cropping back into that call (assisted decoding) knows the feedback to resume from.
    """

    def __init__(self, kv_cache):
        self.kv_cache = kv_cache
        self.predictions: torch.Tensor | None = None  # [B, n, V]
        self.probs: torch.Tensor | None = None  # [B, n, V]
        self.start = 0

    def record(self, predictions: torch.Tensor, probs: torch.Tensor, start: int) -> None:
        self.predictions, self.probs, self.start = predictions.detach(), probs.detach(), start

    @property
    def last_prediction(self) -> torch.Tensor:
        return self.predictions[:, -1]

    @property
    def last_probs(self) -> torch.Tensor:
        return self.probs[:, -1]

    def prediction_at(self, position: int) -> torch.Tensor:
        offset = position - self.start
        if not 0 <= offset < self.predictions.shape[1]:
            raise RuntimeError(
                f"The Copilot has no prediction for position {position} (it holds {self.start}.."
                f"{self.start + self.predictions.shape[1] - 1}); was the cache reused across generate() calls?"
            )
        return self.predictions[:, offset]

    def map_batch(self, fn) -> None:
        self.kv_cache.map_batch(fn)
        if self.predictions is not None:
            self.predictions, self.probs = fn(self.predictions), fn(self.probs)

    def crop(self, length: int) -> None:
        keep = length - self.start
        if self.predictions is not None and not 1 <= keep <= self.predictions.shape[1]:
            raise ValueError(
                f"Cannot crop the Copilot's state to {length} positions: only positions from {self.start} on "
                "can be returned to."
            )
        self.kv_cache.crop(length)
        if self.predictions is not None:
            self.predictions, self.probs = self.predictions[:, :keep], self.probs[:, :keep]


class PilotCopilotCache(DynamicCache):
    """The Pilot's dynamic cache plus the Copilot's decoding state for one generation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.copilot: CopilotDecodingState | None = None
        # Set by generate(): positions before it are the prompt, whose tokens are known.
        self.prompt_length: int | None = None

    def copilot_state(self, num_layers: int) -> CopilotDecodingState:
        if self.copilot is None:
            self.copilot = CopilotDecodingState(CopilotKVCache(num_layers))
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


class CopilotLogitsProcessor(LogitsProcessor):
    """First in generate()'s processor list: fuses the Copilot's prediction into the Pilot's scores.

    Temperature, top-k, top-p and the rest run after it, on the fused distribution.
    """

    def __init__(self, cache: PilotCopilotCache, copilot_lambda: float, fusion: str):
        self.cache = cache
        self.copilot_lambda = copilot_lambda
        self.fusion = fusion

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.copilot_lambda == 0:
            return scores
        prediction = self.cache.copilot.prediction_at(input_ids.shape[1] - 1)
        return fuse_scores(scores, prediction, self.copilot_lambda, self.fusion)


__all__ = ["CopilotLogitsProcessor", "PilotCopilotCache", "fuse_scores"]
