"""The Copilot network (SPEC sections 3 and 8): causal self-attention over the error stream and
cross-attention to the Pilot's states, predicting the Pilot's next-token error. A decoder-only Pilot's
Copilot alternates the two; an encoder-decoder Pilot's Copilot has both in every layer and cross-attends
to the encoder output as well.

Hub-facing: copied next to checkpoints for `trust_remote_code`, so it imports only its sibling files.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.activations import ACT2FN
from transformers.dynamic_module_utils import custom_object_save
from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor

from .checkpointing import (
    apply_pilot_adapters,
    atomic_save_directory,
    check_copilot_fits_pilot,
    check_loaded_tensors,
    copy_pretrained_decoder,
    is_t5_decoder,
    pilot_adapter_configs,
    pilot_fingerprint,
    same_pilot,
)
from .configuration_pilot_copilot import (
    FUSION_FIELDS,
    WRAPPER_SETTINGS,
    CopilotConfig,
    copilot_config_like,
    has_query_key_norms,
    validate_fusion_settings,
)
from .generation_pilot_copilot import (
    CACHE_KEYWORD,
    CopilotKVCache,
    CopilotLogitsProcessor,
    StaticCopilotKVCache,
)
from .mistake_log_entry import (
    PilotErrors,
    ReusableBuffer,
    as_dtype,
    error_of_fused_logits,
    floored_log,
)


def rms_normalized(hidden: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`hidden / rms(hidden)` over the last dimension and `1 / rms`, in LLaMA's operators (eps inside the root)."""
    inverse_rms = torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return hidden * inverse_rms, inverse_rms


class _RMSNormFunction(torch.autograd.Function):
    """LLaMA's RMSNorm in fp32 with its backward written out: the forward's values to the bit, and 11 operators in the
    backward where autograd's dispatches 19 for the same forward (a Copilot has four norms a layer, on small tensors
    where every operator's fixed cost counts)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        normed, inverse_rms = rms_normalized(hidden, eps)
        ctx.save_for_backward(normed, inverse_rms, weight)
        return weight * normed

    @staticmethod
    @once_differentiable  # its saved tensors carry no graph: a second derivative through it would be wrong
    def backward(ctx, grad: torch.Tensor):
        normed, inverse_rms, weight = ctx.saved_tensors
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed).flatten(0, -2).sum(0)
        if ctx.needs_input_grad[0]:
            grad_normed = grad * weight
            # d/dx of n = x r, r = (mean(x^2) + eps)^(-1/2): r (g - n mean(g n))
            projection = (grad_normed * normed).mean(-1, keepdim=True)
            grad_hidden = (grad_normed - normed * projection).mul_(inverse_rms)
        return grad_hidden, grad_weight, None


class CopilotRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and hidden.dtype == self.weight.dtype == torch.float32:
            return _RMSNormFunction.apply(hidden, self.weight, self.eps)
        return self.through_autograd(hidden)

    def through_autograd(self, hidden: torch.Tensor) -> torch.Tensor:
        """The norm in LLaMA's operators (fp32 inside, the input's dtype out), recorded by autograd where it records:
        the path without gradients (generate()) and in other dtypes, and what the written-out backward is checked
        against."""
        normed, _ = rms_normalized(as_dtype(hidden, torch.float32), self.eps)
        return self.weight * as_dtype(normed, hidden.dtype)


def residual_dropout(config: CopilotConfig) -> nn.Module:
    """The dropout on a layer's residual branches; none at probability 0 (the default), where nn.Dropout would still
    dispatch an operator per call in inference mode."""
    return nn.Dropout(config.hidden_dropout) if config.hidden_dropout > 0 else nn.Identity()


class CopilotMLP(nn.Module):
    """Gated MLP with LLaMA's parameter names, so a pretrained decoder's weights drop in."""

    def __init__(self, config: CopilotConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden)) * self.up_proj(hidden))


# cos and signed sin [L, head_dim] of the positions of L rows: sin with its first half negated, so that `rotate`
# reads the rotated-half states with one roll.
Rotation = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Positions:
    """The positions of the new stream rows and memory entries, and their rotary angles if the Copilot rotates."""

    stream: torch.Tensor
    memory: torch.Tensor
    rotations: tuple[Rotation, Rotation] | None = None  # stream's, memory's


def rotary_frequencies(
    head_dim: int, base: float, scaling: dict | None, device: torch.device
) -> torch.Tensor:
    """LLaMA's rotary frequencies [head_dim / 2], rescaled as `CopilotConfig.rotary_scaling` says."""
    half = head_dim // 2
    frequencies = base ** (-torch.arange(half, device=device, dtype=torch.float32) / half)
    if scaling is None:
        return frequencies
    if scaling["rope_type"] == "linear":
        return frequencies / scaling["factor"]
    # LLaMA 3.1's rule: wavelengths longer than the original context / low_freq_factor slowed by `factor`, those
    # shorter than it / high_freq_factor kept, a linear blend between.
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelengths = 2 * math.pi / frequencies
    kept = ((scaling["original_max_position_embeddings"] / wavelengths - low) / (high - low)).clamp(0, 1)
    return (1 - kept) * frequencies / scaling["factor"] + kept * frequencies


def rotation_at(
    positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype, scaling: dict | None = None
) -> Rotation:
    """LLaMA's rotary angles at `positions` [L] as `rotate` reads them, cos and signed sin (rotate-half layout, so a
    pretrained LLaMA decoder's query/key weights keep their meaning). Position -1 (an encoder-decoder Pilot's
    encoder output) is not rotated: every query sees it at the same angle."""
    frequencies = rotary_frequencies(head_dim, base, scaling, positions.device)
    angles = positions.clamp_min(0).float()[:, None] * frequencies[None, :]  # [L, half]
    sin = angles.sin()
    return angles.cos().repeat(1, 2).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)


def rotate(states: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """`states` [B, H, L, head_dim] rotated by the angles of their L positions: LLaMA's
    `states * cos + rotate_half(states) * sin`, to the bit, where rotate_half's slices, negation and concatenation
    are one roll against the signed sin (four operators fewer per rotation, one [B, H, L, head_dim] tensor fewer)."""
    cos, signed_sin = rotation
    return states * cos + states.roll(states.shape[-1] // 2, -1) * signed_sin


class TokenGain(nn.Module):
    """The token term as d_C learnt gains on W_in's own column for the token, g * W_in[:, x]
    (`CopilotConfig.token_embedding="gain"`): no V x d_C table of its own."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, tokens: torch.Tensor, error_proj_weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, error_proj_weight.t()) * self.weight


class CopilotAttention(nn.Module):
    """Multi-head attention, self- or cross- by its inputs; rotary positions when the config asks for them."""

    def __init__(self, config: CopilotConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        # None, not an identity module, without them: no call on every token of generate().
        self.q_norm = CopilotRMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = CopilotRMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def project_keys_values(
        self, source: torch.Tensor, rotation: Rotation | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, _ = source.shape
        keys = self.k_proj(source).view(batch, length, self.num_kv_heads, self.head_dim)
        if self.k_norm is not None:
            keys = self.k_norm(keys)
        keys = keys.transpose(1, 2)
        values = self.v_proj(source).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rotation is not None:
            keys = rotate(keys, rotation)
        return keys, values  # [B, H_kv, L, head_dim]

    def forward(
        self,
        hidden: torch.Tensor,
        rotation: Rotation | None,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """`hidden` [B, T, d] attends to `keys`/`values` (already rotated when `rotation`, the queries' angles)."""
        batch, length, _ = hidden.shape
        queries = self.q_proj(hidden).view(batch, length, self.num_heads, self.head_dim)
        if self.q_norm is not None:
            queries = self.q_norm(queries)
        queries = queries.transpose(1, 2)
        if rotation is not None:
            queries = rotate(queries, rotation)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


def attend(
    attention: CopilotAttention,
    normed: torch.Tensor,
    source: torch.Tensor,
    positions: Positions,
    masks: dict,
    kv_cache: CopilotKVCache | None,
    slot: int,
    is_cross_attention: bool,
) -> torch.Tensor:
    """One attention of a layer: keys from `source` (cached in `slot`, rotated before), the mask of its kind
    built once."""
    key_positions = positions.memory if is_cross_attention else positions.stream
    query_rotation = key_rotation = None
    if positions.rotations is not None:
        query_rotation, key_rotation = positions.rotations[0], positions.rotations[is_cross_attention]
    keys, values = attention.project_keys_values(source, key_rotation)
    if kv_cache is not None:
        keys, values, key_positions = kv_cache.update(slot, keys, values, key_positions)
    if is_cross_attention not in masks:
        masks[is_cross_attention] = masks["build"](key_positions, is_cross_attention)
    return attention(normed, query_rotation, keys, values, masks[is_cross_attention])


class CopilotLayer(nn.Module):
    """Pre-norm residual block: attention (self or cross, by layer parity) then MLP."""

    def __init__(self, config: CopilotConfig, layer_idx: int):
        super().__init__()
        # 0-based even index = the paper's odd (1st, 3rd, ...) layers: causal self-attention.
        self.layer_idx = layer_idx
        self.is_cross_attention = layer_idx % 2 == 1
        self.input_layernorm = CopilotRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = CopilotAttention(config)
        self.post_attention_layernorm = CopilotRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = CopilotMLP(config)
        self.dropout = residual_dropout(config)

    def forward(
        self,
        hidden: torch.Tensor,
        memory: torch.Tensor,
        positions: Positions,
        masks: dict[bool, torch.Tensor],
        kv_cache: CopilotKVCache | None,
    ) -> torch.Tensor:
        """`positions` holds the new stream and memory positions; `masks` is filled once per layer kind."""
        normed = self.input_layernorm(hidden)
        source = memory if self.is_cross_attention else normed
        attended = attend(
            self.self_attn,
            normed,
            source,
            positions,
            masks,
            kv_cache,
            self.layer_idx,
            self.is_cross_attention,
        )
        hidden = hidden + self.dropout(attended)
        return hidden + self.dropout(self.mlp(self.post_attention_layernorm(hidden)))


class CopilotEncoderDecoderLayer(nn.Module):
    """The paper's encoder-decoder Copilot layer: causal self-attention over the stream, cross-attention to
    [encoder output ; h_bar], then MLP, each pre-norm and residual.

    LLaMA's names for the self-attention and MLP parts, so a pretrained decoder's weights drop in there. Its
    keys/values use cache slots 2 i (self-attention) and 2 i + 1 (cross-attention).
    """

    def __init__(self, config: CopilotConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = CopilotRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = CopilotAttention(config)
        self.cross_attention_layernorm = CopilotRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.cross_attn = CopilotAttention(config)
        self.post_attention_layernorm = CopilotRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = CopilotMLP(config)
        self.dropout = residual_dropout(config)

    def forward(
        self,
        hidden: torch.Tensor,
        memory: torch.Tensor,
        positions: Positions,
        masks: dict[bool, torch.Tensor],
        kv_cache: CopilotKVCache | None,
    ) -> torch.Tensor:
        slot = 2 * self.layer_idx
        normed = self.input_layernorm(hidden)
        hidden = hidden + self.dropout(
            attend(self.self_attn, normed, normed, positions, masks, kv_cache, slot, False)
        )
        normed = self.cross_attention_layernorm(hidden)
        attended = attend(self.cross_attn, normed, memory, positions, masks, kv_cache, slot + 1, True)
        hidden = hidden + self.dropout(attended)
        return hidden + self.dropout(self.mlp(self.post_attention_layernorm(hidden)))


def build_attention_mask(
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    key_padding: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive mask [B|1, 1, Tq, Tk]: a query sees keys at positions <= its own that are not padding.

    Keys at position -1 (an encoder-decoder Pilot's encoder output) are seen by every query. Finite minimum
    instead of -inf, so a padding query that sees nothing stays finite.
    """
    allowed = key_positions[None, :] <= query_positions[:, None]  # [Tq, Tk]
    allowed = allowed[None, None]
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, None, :].bool()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def is_plain_linear(module: nn.Module) -> bool:
    """A bare nn.Linear whose weight can be read in its place: not an adapter or FSDP wrapper, no hooks (they would
    not run; DeepSpeed ZeRO-3 gathers its weight in one)."""
    return type(module) is nn.Linear and not (module._forward_hooks or module._forward_pre_hooks)


def reweighted_error(head_output: torch.Tensor, pilot_probs: torch.Tensor) -> torch.Tensor:
    """f_C = softmax(log p + W_out h) - p: the head re-weights the Pilot's distribution p.

    The paper's linear head must rebuild -p from the Pilot's hidden states through a vocabulary-sized
    projection before it can predict anything; here p is given and the head only says which of the Pilot's
    candidates to move mass to. A head output of zero is exactly "no correction", and p + 1 * f_C is a
    distribution. A compact entry's mass outside its top k is read spread over those tokens
    (`PilotErrors.probabilities_spread`); tokens where p is zero keep a negligible share.
    """
    return error_of_fused_logits(reweighted_logits(head_output, pilot_probs), pilot_probs, head_output.dtype)


def reweighted_logits(head_output: torch.Tensor, pilot_probs: torch.Tensor) -> torch.Tensor:
    """log p + W_out h, in fp32 at least: the reweight form's p + f_C is their softmax (its cross-entropy reads
    them). One new [B,T,V] tensor."""
    dtype = torch.promote_types(head_output.dtype, torch.float32)
    return floored_log(pilot_probs, dtype).add_(as_dtype(head_output, dtype))


def interleaved_memory(x_tilde: torch.Tensor, h_bar: torch.Tensor) -> torch.Tensor:
    """A decoder-only Pilot's memory entries [B, 2T, d_P], interleaved per position: [x_tilde_j, h_bar_j]."""
    batch, length, _ = x_tilde.shape
    return torch.stack([x_tilde, h_bar], dim=2).reshape(batch, 2 * length, -1)


class CopilotPreTrainedModel(PreTrainedModel):
    config_class = CopilotConfig
    base_model_prefix = "copilot"
    _no_split_modules = ["CopilotLayer", "CopilotEncoderDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if module is getattr(self, "error_head", None) and self.config.initial_error_norm is not None:
            # W_out so that ||f_C|| ~ initial_error_norm for the RMS-normed hidden states it reads.
            std = self.config.initial_error_norm / module.weight.numel() ** 0.5
        if module is getattr(self, "error_proj", None) and self.config.error_proj_init_std is not None:
            std = self.config.error_proj_init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, CopilotRMSNorm):
            nn.init.ones_(module.weight)
        elif module is getattr(self, "token_embedding", None):  # a table or gains
            nn.init.zeros_(module.weight)  # no token term until the Copilot learns one


class CopilotModel(CopilotPreTrainedModel):
    """Predicts the Pilot's error f_C [B,T,V] from the shifted error stream and the Pilot's states.

    Position j receives W_in e_{j-1}; no positional embeddings, but with `position_encoding="rope"` (the default)
    attention rotates queries and keys by their positions, memory entries of position j like stream position j
    (the paper's Copilot, "none", has no positions). Decoder-only Pilot: odd layers self-attend
    causally over the stream, even layers cross-attend to M = [x_tilde ; h_bar] restricted to positions <= j.
    Encoder-decoder Pilot (`config.encoder_decoder`): every layer does both, and its cross-attention reads the
    encoder output x_tilde (every source position that is not padding) followed by h_bar of positions <= j.
    """

    def __init__(self, config: CopilotConfig):
        config.validate_architecture()  # a config edited after construction is checked again here
        super().__init__(config)
        self.error_proj = nn.Linear(config.vocab_size, config.hidden_size, bias=False)  # W_in
        # E: the token each error is about (CopilotConfig.token_embedding)
        if config.token_embedding == "gain":
            self.token_embedding = TokenGain(config.hidden_size)
        else:
            self.token_embedding = (
                nn.Embedding(config.vocab_size, config.hidden_size) if config.token_embedding else None
            )
        self.memory_norm = (
            CopilotRMSNorm(config.pilot_hidden_size, config.rms_norm_eps)
            if config.memory_norm
            else nn.Identity()
        )
        if config.pilot_hidden_size != config.hidden_size:
            self.memory_proj = nn.Linear(config.pilot_hidden_size, config.hidden_size, bias=False)
        else:
            self.memory_proj = nn.Identity()
        self.projected_memory_norm = (
            CopilotRMSNorm(config.hidden_size, config.rms_norm_eps)
            if config.projected_memory_norm
            else nn.Identity()
        )
        layer_class = CopilotEncoderDecoderLayer if config.encoder_decoder else CopilotLayer
        self.layers = nn.ModuleList(layer_class(config, idx) for idx in range(config.num_hidden_layers))
        self.norm = CopilotRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.error_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # W_out
        self.post_init()

    @property
    def num_kv_cache_slots(self) -> int:
        """Attentions with cached keys/values: one per layer, two per encoder-decoder layer."""
        return len(self.layers) * (2 if self.config.encoder_decoder else 1)

    @torch.no_grad()
    def resize_vocabulary(self, vocab_size: int) -> None:
        """Follow the Pilot's vocabulary: kept tokens keep their weights; a new token starts with the mean
        input column and a zero output row, so the Copilot predicts no correction for it until it learns one."""
        old_in, old_out = self.error_proj.weight, self.error_head.weight
        kept = min(vocab_size, old_in.shape[1])
        self.error_proj = nn.Linear(vocab_size, self.config.hidden_size, bias=False).to(old_in)
        self.error_head = nn.Linear(self.config.hidden_size, vocab_size, bias=False).to(old_out)
        self.error_proj.weight[:, :kept] = old_in[:, :kept]
        self.error_proj.weight[:, kept:] = old_in.mean(dim=1, keepdim=True)
        self.error_head.weight[:kept] = old_out[:kept]
        self.error_head.weight[kept:] = 0
        self.error_proj.weight.requires_grad_(old_in.requires_grad)
        self.error_head.weight.requires_grad_(old_out.requires_grad)
        if isinstance(self.token_embedding, nn.Embedding):  # TokenGain follows W_in
            old_tokens = self.token_embedding.weight
            self.token_embedding = nn.Embedding(vocab_size, self.config.hidden_size).to(old_tokens)
            self.token_embedding.weight[:kept] = old_tokens[:kept]
            self.token_embedding.weight[kept:] = 0
            self.token_embedding.weight.requires_grad_(old_tokens.requires_grad)
        self.config.vocab_size = vocab_size

    @property
    def computes_loss_without_output(self) -> bool:
        """True when the training loss can read W_out's weight instead of calling the head: the linear head on
        the squared error (`PilotErrors.head_squared_distance`, no f_C formed) and the reweight head on the
        cross-entropy (`PilotErrors.head_cross_entropy`, block by block). An adapter- or
        FSDP-wrapped head, a head with hooks (they would not run; DeepSpeed ZeRO-3 gathers its weight in one)
        and the reweight head on the squared error cannot."""
        implicit_pairs = {("linear", "squared_error"), ("reweight", "cross_entropy")}
        pair = (self.config.error_form, self.config.error_loss)
        return pair in implicit_pairs and is_plain_linear(self.error_head)

    def error_and_fused_logits(
        self, head_input: torch.Tensor, pilot_errors: PilotErrors
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reweight form's f_C from what W_out reads, and the logits whose softmax is p + f_C (what its
        cross-entropy loss scores)."""
        probs = pilot_errors.probabilities_spread()[:, -head_input.shape[1] :]
        head_output = self.error_head(head_input)
        logits = reweighted_logits(head_output, probs)
        return error_of_fused_logits(logits, probs, head_output.dtype), logits

    def embed_errors(self, errors: PilotErrors, embedded_probs: torch.Tensor | None = None) -> torch.Tensor:
        """The stream rows of the observed errors, W_in e_j (+ E[y_j], `with_tokens`) [B,T,d_C], not yet shifted;
        `embedded_probs`: W_in p_j, where the caller has it already."""
        embedded = errors.embed(self.error_proj.weight, embedded_probs)
        return self.with_tokens(embedded, errors.masked_targets(), errors.mask)

    def with_tokens(
        self, rows: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Stream rows [B,n,d_C] plus E[token] for the token each row's error is about (`mask` False: no error,
        no term), or the rows themselves without `CopilotConfig.token_embedding`."""
        if self.token_embedding is None:
            return rows
        if isinstance(self.token_embedding, TokenGain):
            embedded = as_dtype(self.token_embedding(tokens, self.error_proj.weight), rows.dtype)
        else:
            embedded = as_dtype(self.token_embedding(tokens), rows.dtype)
        if mask is not None:
            embedded = embedded * mask.unsqueeze(-1).to(rows.dtype)
        return rows + embedded

    def embed_predicted_errors(self, predicted_errors: torch.Tensor) -> torch.Tensor:
        """W_in f_C for the paper's inference-time feedback of the Copilot's own output."""
        return self.error_proj(predicted_errors.to(self.error_proj.weight.dtype))

    def embed_own_predictions(
        self, head_input: torch.Tensor, pilot_errors: PilotErrors | None
    ) -> torch.Tensor:
        """W_in f_C from what W_out reads, with a gradient into W_in only: the Copilot's own prediction as training
        feeds it back (`copilot_stream`). For the plain linear head W_in (W_out h) = (W_in W_out) h, one
        [d_C, d_C] product in place of forming f_C [B,T,V] and embedding it (two vocabulary-sized products and
        a third in backward per position); other heads form f_C."""
        head_input = head_input.detach()
        if (
            self.config.error_form == "linear"
            and is_plain_linear(self.error_head)
            and is_plain_linear(self.error_proj)
        ):
            weight = self.error_proj.weight @ self.error_head.weight.detach()  # W_in W_out [d_C, d_C]
            return F.linear(head_input.to(weight.dtype), weight)
        with torch.no_grad():
            predicted = self.predicted_error(head_input, pilot_errors)
        return self.embed_predicted_errors(predicted)

    def forward(
        self,
        stream: torch.Tensor,
        x_tilde: torch.Tensor,
        h_bar: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache: CopilotKVCache | None = None,
        errors_to_keep: int = 0,
        encoder_attention_mask: torch.Tensor | None = None,
        pilot_errors: PilotErrors | None = None,
        return_head_input: bool = False,
    ) -> torch.Tensor:
        """stream: [B,T,d_C], already W_in e_{j-1}; h_bar: [B,T,d_P] for the same positions; x_tilde: [B,T,d_P]
        for them too, or for an encoder-decoder Pilot its encoder output [B,S,d_P] with `encoder_attention_mask`
        [B,S] (None: no padding), read from the cache once it holds it.

        `attention_mask` [B, past + T] covers the cached positions too. Returns f_C [B,T,V], or for the last
        `errors_to_keep` positions only (0: all): a prefill needs the vocabulary-sized head at its last one.
        `pilot_errors`: the Pilot's errors at these T positions, whose probabilities the "reweight" error form
        corrects (`config.error_form`). `return_head_input`: return what W_out reads [B,T,d_C] instead of f_C
        (for a loss that applies W_out implicitly, see `computes_loss_without_output`).
        """
        length = stream.shape[1]
        past = kv_cache.length if kv_cache is not None else 0
        query_positions = torch.arange(past, past + length, device=stream.device)
        if attention_mask is not None:
            attention_mask = attention_mask[:, -(past + length) :]
        if self.config.encoder_decoder:
            memory, memory_positions, memory_padding = self.encoder_decoder_memory(
                x_tilde, h_bar, query_positions, attention_mask, encoder_attention_mask, past
            )
        else:
            memory = interleaved_memory(x_tilde, h_bar)
            memory_positions = query_positions.repeat_interleave(2)
            memory_padding = None if attention_mask is None else attention_mask.repeat_interleave(2, dim=1)
        memory = self.project_memory(memory)

        def build(key_positions: torch.Tensor, is_cross: bool) -> torch.Tensor | None:
            padding = memory_padding if is_cross else attention_mask
            if padding is None and length == 1:
                return None  # one query at the newest position sees every key
            return build_attention_mask(query_positions, key_positions, padding, stream.dtype)

        masks: dict = {"build": build}
        # Over a static cache the table covers the whole generation from the prefill on: a compiled step never
        # grows it.
        num_positions = max(past + length, getattr(kv_cache, "max_positions", 0))
        positions = self.positions(query_positions, memory_positions, stream.dtype, num_positions)
        hidden = stream
        for layer in self.layers:
            hidden = layer(hidden, memory, positions, masks, kv_cache)
        if kv_cache is not None:
            kv_cache.length = past + length
        head_input = self.norm(hidden[:, -errors_to_keep:])
        return head_input if return_head_input else self.predicted_error(head_input, pilot_errors)

    def predicted_error(self, head_input: torch.Tensor, pilot_errors: PilotErrors | None) -> torch.Tensor:
        """f_C [B,T,V] from what W_out reads; the reweight form corrects the Pilot's probabilities at these T
        positions (the last T of `pilot_errors`)."""
        if self.config.error_form == "linear":
            return self.error_head(head_input)
        if pilot_errors is None:
            raise ValueError(
                "A Copilot with error_form='reweight' needs the Pilot's errors (`pilot_errors=`)."
            )
        probs = pilot_errors.probabilities_spread()[:, -head_input.shape[1] :]
        return self.predicted_error_from_probs(head_input, probs)

    def predicted_error_from_probs(self, head_input: torch.Tensor, pilot_probs: torch.Tensor) -> torch.Tensor:
        """`predicted_error` given the Pilot's probabilities at the same positions (unused by the linear form)."""
        head_output = self.error_head(head_input)
        if self.config.error_form == "linear":
            return head_output
        return reweighted_error(head_output, pilot_probs)

    def decoding_output(self, head_input: torch.Tensor, pilot_probs: torch.Tensor) -> torch.Tensor:
        """What a decoding step records for the processor: f_C, or for the reweight form the logits
        log p + W_out h whose softmax is p + f_C (`reweighted_logits`). Fusing at lambda 1 is then one log-softmax,
        and f_C (`predicted_error_from_decoding_output`) is formed only where something reads it."""
        if self.config.error_form == "linear":
            return self.error_head(head_input)
        return reweighted_logits(self.error_head(head_input), pilot_probs)

    def predicted_error_from_decoding_output(
        self, output: torch.Tensor, pilot_probs: torch.Tensor
    ) -> torch.Tensor:
        """f_C from `decoding_output` at the same positions."""
        if self.config.error_form == "linear":
            return output
        return error_of_fused_logits(output, pilot_probs, self.error_head.weight.dtype)

    def project_memory(self, memory: torch.Tensor) -> torch.Tensor:
        """The Pilot's states as the cross-attention reads them: RMS-normed if `memory_norm`, projected to d_C,
        RMS-normed again if `projected_memory_norm`."""
        projected = self.memory_proj(self.memory_norm(as_dtype(memory, self.error_proj.weight.dtype)))
        return self.projected_memory_norm(projected)

    def positions(
        self,
        query_positions: torch.Tensor,
        memory_positions: torch.Tensor,
        dtype: torch.dtype,
        num_positions: int,
    ) -> Positions:
        """The positions of new stream rows and memory entries, with their rotary angles under "rope";
        `num_positions`: more than the largest position (a Python number, so a compiled step needs no sync)."""
        positions = Positions(query_positions, memory_positions)
        if self.config.position_encoding == "rope":
            cos, signed_sin = self.rotary_table(num_positions, query_positions.device)

            def rows(at: torch.Tensor) -> Rotation:
                at = at.clamp_min(0)
                return as_dtype(cos[at], dtype), as_dtype(signed_sin[at], dtype)

            positions.rotations = (rows(query_positions), rows(memory_positions))
        return positions

    def rotary_table(self, num_positions: int, device: torch.device) -> Rotation:
        """`rotation_at` of positions 0..n-1 (n >= `num_positions`) in fp32, kept and grown by doubling: a decoding
        step looks its rows up instead of computing them, some twenty operators fewer per token."""
        config = self.config
        # A config edited since rebuilds it; the table keeps a copy of the scaling, so an edit in place shows.
        angles = (config.head_dim, config.rotary_base, config.rotary_scaling, device)
        built, table = getattr(self, "_rotary_table", (None, None))
        if built != angles or table[0].shape[0] < num_positions:
            at = torch.arange(max(2 * num_positions, 64), device=device)
            scaling = None if config.rotary_scaling is None else dict(config.rotary_scaling)
            table = rotation_at(at, config.head_dim, config.rotary_base, torch.float32, scaling)
            self._rotary_table = ((config.head_dim, config.rotary_base, scaling, device), table)
        return table

    def decoding_step(
        self,
        stream: torch.Tensor,
        x_tilde: torch.Tensor | None,
        h_bar: torch.Tensor,
        pilot_probs: torch.Tensor,
        kv_cache: StaticCopilotKVCache,
    ) -> torch.Tensor:
        """`decoding_output` [B,1,V] at the position `kv_cache.position` [1], over the preallocated buffers of a
        `StaticCopilotKVCache`: fixed shapes, and no Python number that changes between steps, so that a compiled
        step (`compiled_decoding_step`) compiles once per generation. The caller advances the cache. `x_tilde`:
        None for an encoder-decoder Pilot, whose encoder output the prefill cached."""
        query_positions = kv_cache.position
        if self.config.encoder_decoder:
            memory, memory_positions = self.project_memory(h_bar), query_positions
        else:
            memory = self.project_memory(interleaved_memory(x_tilde, h_bar))
            memory_positions = query_positions.repeat_interleave(2)
        positions = self.positions(query_positions, memory_positions, stream.dtype, kv_cache.max_positions)

        def build(key_positions: torch.Tensor, is_cross: bool) -> torch.Tensor:
            # Slot 1 is a cross-attention and slot 0 a self-attention in both layouts.
            key_padding = kv_cache.key_padding(int(is_cross))
            return build_attention_mask(query_positions, key_positions, key_padding, stream.dtype)

        masks: dict = {"build": build}
        writes = kv_cache.step_writes()
        hidden = stream
        for layer in self.layers:
            hidden = layer(hidden, memory, positions, masks, writes)
        return self.decoding_output(self.norm(hidden), pilot_probs)

    def compiled_decoding_step(self, compile_config) -> Callable:
        """`decoding_step` compiled with generate()'s `compile_config`, compiled again only when it changes."""
        if getattr(self, "_decoding_step_compile_config", None) != compile_config:
            self._compiled_decoding_step = torch.compile(self.decoding_step, **compile_config.to_dict())
            self._decoding_step_compile_config = compile_config
        return self._compiled_decoding_step

    @staticmethod
    def encoder_decoder_memory(
        encoder_output: torch.Tensor,
        h_bar: torch.Tensor,
        query_positions: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_attention_mask: torch.Tensor | None,
        past: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The new cross-attention entries, their positions and the padding of every cross-attention key.

        The encoder output enters once, at position -1 (every query sees it), in front of h_bar; the cache
        keeps it, so later steps add h_bar of their positions only.
        """
        source_length = encoder_output.shape[1]
        if past == 0:
            memory = torch.cat([encoder_output.to(h_bar.dtype), h_bar], dim=1)
            encoder_positions = query_positions.new_full((source_length,), -1)
            positions = torch.cat([encoder_positions, query_positions])
        else:
            memory, positions = h_bar, query_positions
        if attention_mask is None and encoder_attention_mask is None:
            return memory, positions, None
        batch = h_bar.shape[0]
        if encoder_attention_mask is None:
            encoder_attention_mask = h_bar.new_ones(batch, source_length, dtype=torch.bool)
        if attention_mask is None:
            attention_mask = h_bar.new_ones(batch, past + h_bar.shape[1], dtype=torch.bool)
        padding = torch.cat([encoder_attention_mask.bool(), attention_mask.bool()], dim=1)
        return memory, positions, padding


class PilotCopilotMixin:
    """What the Pilot + Copilot wrappers share: their embeddings are the Pilot's (resizing the vocabulary resizes
    the Copilot's W_in and W_out with it), fusion settings fall back on the config, saves are atomic, and
    Copilot-only checkpoints save and load the same way.

    Each wrapper sets `wrapper_class` (itself: what loading returns, also from its Copilot-only checkpoint
    class), `pilot_auto_class` (the Auto class of its Pilots) and `copilot_checkpoint_class` (the auto_map entry
    that loads its Copilot-only folders).
    """

    wrapper_class: type
    pilot_auto_class: type
    copilot_checkpoint_class: str
    copilot_config_defaults: dict = {}  # what a Copilot config given as a dict starts from

    @classmethod
    def attach_new_copilot(
        cls,
        pilot: PreTrainedModel,
        copilot_config: CopilotConfig | dict | None,
        copilot_init: PreTrainedModel | str | None,
        copilot_lambda: float,
        fusion: str,
        copilot_feedback: str,
    ):
        """What both wrappers' `from_pilot` do once the Pilot's kind is checked: the Copilot's config (from
        `copilot_init` when none is given), the wrapper's config around the Pilot's, and the weights copied."""
        if isinstance(copilot_init, (str, os.PathLike)):
            encoder_decoder = AutoConfig.from_pretrained(copilot_init).is_encoder_decoder
            auto_class = AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM
            copilot_init = auto_class.from_pretrained(copilot_init)
        if (
            copilot_init is not None
            and is_t5_decoder(copilot_init)
            and not cls.config_class.is_encoder_decoder
        ):
            raise ValueError(
                f"copilot_init: a T5 decoder ({type(copilot_init).__name__}) initialises the encoder-decoder Copilot "
                "of PilotCopilotForSeq2SeqLM; for PilotCopilotForCausalLM use a LLaMA, Qwen2, Qwen3 or Mistral-layout "
                "decoder."
            )
        if isinstance(copilot_config, dict):
            copilot_config = CopilotConfig(**{**cls.copilot_config_defaults, **copilot_config})
        elif copilot_config is not None:
            # The wrapper fills in this Pilot's sizes: the caller's config stays free for another Pilot.
            copilot_config = copy.deepcopy(copilot_config)
        if copilot_config is None:
            copilot_config = (
                copilot_config_like(copilot_init.config) if copilot_init is not None else CopilotConfig()
            )
        elif copilot_init is not None and copilot_config.qk_norm is None:
            # Unset, the query and key norms are the decoder's, so that its copied layers compute what they did.
            copilot_config.qk_norm = has_query_key_norms(copilot_init.config)
        config = cls.config_class(
            text_config=pilot.config,
            copilot_config=copilot_config,
            copilot_lambda=copilot_lambda,
            fusion=fusion,
            copilot_feedback=copilot_feedback,
            # The config setter would otherwise overwrite the Pilot's attention implementation.
            attn_implementation={"text_config": pilot.config._attn_implementation},
        )
        config.name_or_path = pilot.config.name_or_path
        model = cls(config, pilot=pilot)
        # What save_copilot's default base names; a jointly fine-tuned Pilot no longer matches it.
        model.attached_pilot_fingerprint = pilot_fingerprint(pilot)
        model.to(device=pilot.device, dtype=next(pilot.parameters()).dtype)
        model.generation_config = pilot.generation_config
        if copilot_init is not None:
            if copilot_init.config.get_text_config().vocab_size != model.copilot.config.vocab_size:
                raise ValueError(
                    "copilot_init must share the Pilot's vocabulary "
                    f"({copilot_init.config.get_text_config().vocab_size} != {model.copilot.config.vocab_size})."
                )
            copy_pretrained_decoder(model.copilot, copilot_init)
        return model

    @classmethod
    def from_copilot_folder(
        cls,
        path: str | os.PathLike,
        config: dict,
        allow_other_pilot: bool,
        wants_info: bool,
        hub_kwargs,
        kwargs,
    ):
        """Load a Copilot-only folder (its config.json already read as data) onto its base Pilot."""
        is_seq2seq = cls.pilot_auto_class.__name__ == "AutoModelForSeq2SeqLM"
        if bool(config.get("encoder_decoder")) != is_seq2seq:
            kind, other = (
                ("a decoder-only", "PilotCopilotForCausalLM")
                if is_seq2seq
                else (
                    "an encoder-decoder",
                    "PilotCopilotForSeq2SeqLM",
                )
            )
            raise ValueError(f"{os.fspath(path)} holds the Copilot of {kind} Pilot: load it with {other}.")
        # The Copilot's config, not the Pilot's: an Auto class passes the folder's, with the caller's fusion
        # settings written into it. Those and the caller's other wrapper settings are the model's.
        given = kwargs.pop("config", None)
        settings = {key: getattr(given, key) for key in FUSION_FIELDS if hasattr(given, key)}
        settings.update({key: kwargs.pop(key) for key in WRAPPER_SETTINGS if key in kwargs})
        # Set by an Auto class that routed here; the Pilot's Auto class sets it again (from transformers 5.25 as a
        # separate keyword, so passing it on would give it twice).
        kwargs.pop("_from_auto", None)
        pilot = kwargs.pop("pilot", None) or config.get("base_model_name_or_path")
        if pilot is None:
            raise ValueError("This Copilot checkpoint names no base Pilot: pass pilot=<model or path>.")
        info = {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
        from_folder = isinstance(pilot, (str, os.PathLike))  # else a model: a PeftModel is no PreTrainedModel
        if from_folder:  # the user's kwargs: trust_remote_code is theirs to give
            pilot, info = cls.pilot_auto_class.from_pretrained(pilot, output_loading_info=True, **kwargs)
        model = cls.wrapper_class.from_copilot_checkpoint(pilot, path, allow_other_pilot, **hub_kwargs)
        for key, value in settings.items():
            setattr(model.config, key, value)
        if from_folder:  # this folder alone rebuilds the model: what a PEFT adapter on it names as its base
            model.config.name_or_path = model.name_or_path = os.fspath(path)
        return (model, info) if wants_info else model  # the Pilot's info: the Copilot's tensors are checked

    @classmethod
    def from_copilot_checkpoint(
        cls, pilot: PreTrainedModel, copilot_path: str, allow_other_pilot: bool = False, **kwargs
    ):
        """Attach a Copilot saved with `save_copilot` to `pilot`, refusing a Pilot it was not trained with.

        `allow_other_pilot=True` attaches it to another Pilot of the same sizes on purpose (a merged LoRA
        Pilot, the paper's transfer experiment), with a warning: see `check_copilot_fits_pilot`.
        """
        copilot, info = CopilotModel.from_pretrained(copilot_path, output_loading_info=True, **kwargs)
        check_loaded_tensors(info, copilot_path)
        check_copilot_fits_pilot(copilot.config, pilot, allow_other_pilot)
        fusion = {k: getattr(copilot.config, k) for k in FUSION_FIELDS if hasattr(copilot.config, k)}
        model = cls.from_pilot(pilot, copilot_config=copilot.config, **fusion)
        model.copilot.load_state_dict(copilot.state_dict())
        return model

    def save_copilot(
        self, save_directory: str | os.PathLike, base_model_name_or_path: str | None = None, **kwargs
    ) -> None:
        """PEFT-style save: Copilot weights + a config naming the base Pilot and its fingerprint.

        The base Pilot defaults to the Pilot's `name_or_path`. Written atomically (`atomic_save_directory`).
        """
        fingerprint = pilot_fingerprint(self.pilot)
        base = base_model_name_or_path or self.pilot.config.name_or_path or None
        attached = getattr(self, "attached_pilot_fingerprint", None)
        unchanged = attached is None or same_pilot(attached, fingerprint)
        if base_model_name_or_path is None and base is not None and not unchanged:
            raise ValueError(
                f"The Pilot was fine-tuned after it was loaded from {base!r}: this Copilot belongs to the fine-tuned "
                f"Pilot and would be refused on {base!r}. Save that Pilot and name it: "
                "model.pilot.save_pretrained(pilot_dir); model.save_copilot(path, base_model_name_or_path=pilot_dir) "
                "(or save the whole model with save_pretrained)."
            )
        config = CopilotConfig(**self.copilot.config.to_dict())
        config.base_model_name_or_path, config.pilot_fingerprint = base, fingerprint
        for key in FUSION_FIELDS:
            setattr(config, key, getattr(self.config, key))
        # The Auto classes load it too, with trust_remote_code where hf_copilot is not installed.
        config.auto_map = {
            "AutoConfig": "configuration_pilot_copilot.CopilotConfig",
            self.pilot_auto_class.__name__: self.copilot_checkpoint_class,
        }
        original = self.copilot.config
        self.copilot.config = config
        try:
            with atomic_save_directory(save_directory) as staging:
                self.copilot.save_pretrained(staging, **kwargs)
                custom_object_save(self, staging)  # the Hub-facing files
        finally:
            self.copilot.config = original

    def fusion_settings(
        self, copilot_lambda: float | None, fusion: str | None, copilot_feedback: str | None
    ) -> tuple[float, str, str]:
        """Per-call overrides fall back on the config."""
        copilot_lambda = self.config.copilot_lambda if copilot_lambda is None else copilot_lambda
        fusion = fusion or self.config.fusion
        copilot_feedback = copilot_feedback or self.config.copilot_feedback
        validate_fusion_settings(copilot_lambda, fusion, copilot_feedback)
        return copilot_lambda, fusion, copilot_feedback

    def fused_as_logits(self, return_fused: bool | None, labels: torch.Tensor | None) -> bool:
        """Whether a forward returns the fused scores as its `logits`: under `config.forward_logits="fused"`, where
        the caller passed neither labels nor `return_fused`, as a tool that scores text with `model(...).logits`
        does. Training and evaluation pass labels, generate() passes `return_fused=False`: they keep the Pilot's."""
        return return_fused is None and labels is None and self.config.forward_logits == "fused"

    def pilot_probs_out(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Where a training pass on CPU writes the Pilot's probabilities: a buffer reused from pass to pass while
        nothing holds the last one (`ReusableBuffer`), since mapping a fresh [B,T,V] tensor on CPU costs more than
        the softmax. None elsewhere: GPU allocators cache their blocks, and evaluation and generation keep no
        vocabulary-sized buffer between calls."""
        buffer = self._training_buffer("_pilot_probs_buffer", logits)
        return None if buffer is None else buffer.take(logits.shape, torch.float32, logits.device)

    def pilot_gradient_buffer(self, logits: torch.Tensor) -> ReusableBuffer | None:
        """The buffer the Pilot's loss writes its gradient for `logits` into, where `pilot_probs_out` writes p into
        one: on CPU in training, for the reason given there."""
        return self._training_buffer("_pilot_gradient_buffer", logits)

    def _training_buffer(self, name: str, logits: torch.Tensor) -> ReusableBuffer | None:
        training = self.training and torch.is_grad_enabled()
        if not training or logits.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        # A plain attribute, outside nn.Module's state: never saved, never moved between devices.
        if name not in self.__dict__:
            self.__dict__[name] = ReusableBuffer()
        return self.__dict__[name]

    def train(self, mode: bool = True):
        """Leaving training mode frees the buffers that training passes write the Pilot's probabilities and their
        loss's gradient into."""
        if not mode:
            for name in ("_pilot_probs_buffer", "_pilot_gradient_buffer"):
                if name in self.__dict__:
                    self.__dict__[name].release()
        return super().train(mode)

    def prepared_pilot(self, config, pilot: nn.Module | None) -> nn.Module:
        """The Pilot to hold: the given one (initialised already), or one built from the config, wrapped in the
        PEFT adapters the config records (`pilot_peft_config`) so that a PEFT Pilot's saved tensors match."""
        if pilot is not None:
            # post_init must not re-draw modules it does not flag (a PEFT Pilot's LoRA layers are not
            # PreTrainedModel modules).
            for module in pilot.modules():
                module._is_hf_initialized = True
        else:
            pilot = self.pilot_auto_class.from_config(config.text_config)
            if config.pilot_peft_config:
                pilot = apply_pilot_adapters(pilot, config.pilot_peft_config)
                self._peft_trainable = {name for name, p in pilot.named_parameters() if p.requires_grad}
        if hasattr(pilot, "get_base_model"):
            # A PeftModel answers its base model's tied weights (post_init reads them), named as if it were that
            # model: name them where they are, under base_model.model.
            base = pilot.get_base_model()
            inner = next(name for name, module in pilot.named_modules() if module is base)
            tied = getattr(base, "all_tied_weights_keys", {}).items()
            pilot.all_tied_weights_keys = {f"{inner}.{k}": f"{inner}.{v}" for k, v in tied}
        return pilot

    def restore_peft_trainable(self) -> None:
        """Loading makes every tensor trainable: a PEFT Pilot's go back to how peft left them."""
        trainable = getattr(self, "_peft_trainable", None)
        if trainable is not None:
            for name, parameter in self.pilot.named_parameters():
                parameter.requires_grad_(name in trainable)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, written atomically (`atomic_save_directory`).

        A PEFT Pilot's tensors keep their names (`pilot.base_model.model.*`, `lora_*`), as Trainer resume
        needs; config.json records its adapters (`pilot_peft_config`), so every loader rebuilds them (with
        peft). Saves that push or run on several processes keep the stock behaviour.
        """
        self.config.pilot_peft_config = pilot_adapter_configs(self.pilot)
        if args or kwargs.get("push_to_hub") or not kwargs.get("is_main_process", True):
            return super().save_pretrained(save_directory, *args, **kwargs)
        if os.path.isfile(save_directory):
            return super().save_pretrained(save_directory, **kwargs)
        with atomic_save_directory(save_directory) as staging:
            super().save_pretrained(staging, **kwargs)

    def get_compiled_call(self, compile_config):
        """The forward generate() calls per token once the cache is static: the Pilot's forward compiled (fixed
        shapes over its static cache) and the Copilot's decoding step compiled over its preallocated buffers
        (`CopilotModel.decoding_step`). What varies per step (the cache's lengths, the Mistake Log entry, the
        feedback rows) stays eager around them."""
        return functools.partial(
            self.__call__,
            pilot_forward=self.pilot.get_compiled_call(compile_config),
            copilot_step=self.copilot.compiled_decoding_step(compile_config),
        )

    # generate() reads this method's signature to validate its model kwargs: it keeps GenerationMixin's.
    @functools.wraps(GenerationMixin.prepare_inputs_for_generation, assigned=())
    def prepare_inputs_for_generation(self, *args, **kwargs) -> dict:
        """generate()'s forward inputs, asking for no f_C and for the Pilot's logits whatever
        `config.forward_logits` says: its processor fuses them with what the Copilot's step records
        (`CopilotModel.decoding_output`), so the step forms no [B,T,V] tensor that nothing reads."""
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        inputs.setdefault("return_predicted_error", False)
        inputs.setdefault("return_fused", False)
        return inputs

    def _validate_model_kwargs(self, model_kwargs: dict) -> None:
        """generate()'s check of its keywords: what this forward does not name is the Pilot's to accept (a multimodal
        Pilot's `pixel_values` and `token_type_ids` reach it through the forward's `**kwargs`), so the Pilot's own
        check judges those; a typo is refused there as it would be by the Pilot's generate()."""
        own = inspect.signature(self.forward).parameters
        self.pilot._validate_model_kwargs({k: v for k, v in model_kwargs.items() if k not in own})

    def create_masks_for_generate(self, attention_mask: torch.Tensor | None = None, **kwargs):
        """generate() turns the padding mask into the Pilot's 4D mask up front when the cache is static; the
        Copilot and the Mistake Log entry read the 2D padding mask, so it is kept and the Pilot builds its own
        4D mask from it, as it does with a dynamic cache."""
        return attention_mask

    def _get_candidate_generator(self, *args, logits_processor=None, model_kwargs=None, **kwargs):
        # An assistant drafts from its own scores: this model's Copilot predicted_errors and fusion
        # settings belong to this model's positions, so neither is handed to the assistant's generate().
        if logits_processor is not None:
            logits_processor = type(logits_processor)(
                p for p in logits_processor if not isinstance(p, CopilotLogitsProcessor)
            )
        if model_kwargs is not None:
            model_kwargs = {k: v for k, v in model_kwargs.items() if k not in FUSION_FIELDS}
        return super()._get_candidate_generator(
            *args, logits_processor=logits_processor, model_kwargs=model_kwargs, **kwargs
        )

    def _prepare_generation_config(self, generation_config, *args, **kwargs):
        """A fusion setting (`FUSION_FIELDS`) may come in a GenerationConfig, per call or as the model's
        `generation_config`: transformers keeps it there as a custom entry, and writes a same-named keyword into that
        entry rather than the model's keywords. The entry, the keyword's value where one was given, goes to the
        forward and the processor as their keyword."""
        generation_config, model_kwargs = super()._prepare_generation_config(
            generation_config, *args, **kwargs
        )
        for key in FUSION_FIELDS:
            value = getattr(generation_config, key, None)
            if value is not None and key not in model_kwargs:
                model_kwargs[key] = value
        return generation_config, model_kwargs

    def init_continuous_batching(self, *args, **kwargs):
        """Refused with what to use instead: continuous batching (`generate_batch`, `generate(...,
        cache_implementation="paged")`) runs the model over transformers' paged cache, which has no room for the
        Copilot's decoding state, and scores without this model's processor."""
        raise NotImplementedError(
            f"{type(self).__name__} does not support continuous batching (generate_batch, "
            "cache_implementation='paged'): the Copilot keeps its decoding state in the cache that generate() "
            "builds. Use generate() on a batch padded on the left (dynamic or static cache), or "
            "model.pilot.generate_batch(...) for the Pilot alone."
        )

    def _get_logits_processor(
        self, generation_config, input_ids_seq_length=None, *args, model_kwargs=None, **kwargs
    ):
        processors = super()._get_logits_processor(
            generation_config, input_ids_seq_length, *args, model_kwargs=model_kwargs, **kwargs
        )
        model_kwargs = model_kwargs or {}
        copilot_lambda, fusion, copilot_feedback = self.fusion_settings(
            model_kwargs.get("copilot_lambda"),
            model_kwargs.get("fusion"),
            model_kwargs.get("copilot_feedback"),
        )
        cache = model_kwargs[CACHE_KEYWORD]
        # The prompt's tokens (a decoder prompt: the start token or decoder_input_ids) are known: the Copilot
        # reads their observed errors (copilot_generation_step).
        cache.prompt_length = input_ids_seq_length
        for processor in processors:
            if (
                isinstance(processor, UnbatchedClassifierFreeGuidanceLogitsProcessor)
                and processor.model is self
            ):
                # Guidance scores the unconditional prompt with this model too: fused, as the conditional scores are.
                processor.model = functools.partial(
                    self.fused_scores_pass,
                    copilot_lambda=copilot_lambda,
                    fusion=fusion,
                    copilot_feedback=copilot_feedback,
                )
        processors.insert(0, CopilotLogitsProcessor(cache, copilot_lambda, fusion))
        return processors

    def fused_scores_pass(self, *args, **kwargs):
        """A forward whose `logits` are the fused scores at every position, what greedy generate() would choose from."""
        output = self(*args, return_fused=True, **kwargs)
        output.logits = output.fused_logits
        return output

    def get_input_embeddings(self) -> nn.Module:
        return self.pilot.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.pilot.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.pilot.get_output_embeddings()

    def resize_token_embeddings(
        self,
        new_num_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        mean_resizing: bool = True,
    ) -> nn.Embedding:
        """The Pilot's `resize_token_embeddings`, then the Copilot's W_in and W_out to the same vocabulary."""
        embeddings = self.pilot.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        vocab_size = embeddings.weight.shape[0]
        self.copilot.resize_vocabulary(vocab_size)
        self.config.get_text_config().vocab_size = vocab_size
        self.config.copilot_config.vocab_size = vocab_size
        return embeddings


__all__ = ["CopilotEncoderDecoderLayer", "CopilotModel", "CopilotPreTrainedModel", "PilotCopilotMixin"]
