"""One Mistake Log entry: what the Pilot saw, how it reasoned, and how wrong it was (SPEC section 2).

Hub-facing: copied next to checkpoints for `trust_remote_code`, so it imports nothing from hf_copilot.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

# The reweight head floors p here, so that a token the Pilot's softmax underflowed to zero stays reachable.
REWEIGHT_PROBABILITY_FLOOR = 1e-30
# Rows x vocabulary of the reweight head's training buffer (16 MB in fp32): small enough to be reused from the
# allocator's free lists rather than mapped afresh each step.
HEAD_BLOCK_ELEMENTS = 1 << 22
# The label of a position without a target, as transformers' losses read it.
IGNORE_INDEX = -100


def as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`: itself when it already is, without the cast to its own dtype that inference mode still
    dispatches as an operator (a decoding step's tensors mostly are in the dtype asked for)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


# How many references a tensor's storage has (private to torch, hence looked up; without it nothing is reused).
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


class ReusableBuffer:
    """A flat buffer handed out again once nothing else refers to it, for the Pilot's probabilities in training and
    its loss's gradient for the logits.

    On CPU the allocator maps every vocabulary-sized tensor afresh and unmaps it when freed, so a new [B,T,V]
    tensor costs more in page faults than the softmax that writes it. The buffer is reused only while its storage
    has no other user: no entry the Mistake Log or a caller kept, no autograd graph that saved it. Otherwise `take`
    maps a new one and keeps that.
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._own_references = 0  # the storage's use count with this object's reference alone

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor of `shape` whose storage no other tensor shares."""
        numel = math.prod(shape)
        if _storage_use_count is None:
            return torch.empty(shape, dtype=dtype, device=device)
        buffer = self._buffer
        if (
            buffer is None
            or buffer.dtype != dtype
            or buffer.device != device
            or buffer.numel() < numel
            or _storage_use_count(buffer.untyped_storage()._cdata) != self._own_references
        ):
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffer = buffer
            self._own_references = _storage_use_count(buffer.untyped_storage()._cdata)
        return buffer[:numel].view(shape)

    def release(self) -> None:
        self._buffer = None


def pilot_probabilities(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Pilot's next-token distribution p [.., V] in float32 (detached), written into `out` where given."""
    return torch.softmax(as_dtype(logits.detach(), torch.float32), dim=-1, out=out)


class _CrossEntropyKeepingProbabilities(torch.autograd.Function):
    """`F.cross_entropy` of [N, V] float logits against targets (ignore index -100), bit for bit, and p =
    softmax(logits) (no gradient): the exponential of the log-softmax it takes anyway, written over it in place.
    `buffers` = (where p goes, a `ReusableBuffer` its gradient goes into), each None for a new tensor; in a tuple,
    so that autograd takes no buffer for an input.

    Backward is one pass over p, the gradient `s (p - onehot)` per counted row (s = the incoming gradient, over the
    counted rows under the mean). Autograd through the log-softmax and the NLL loss would fill a [N, V] tensor
    with zeros, scatter into it and make a second pass reading both. No zero gradient is made up for p either.
    """

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, logits, targets, reduction, buffers):
        probs_out, gradient_buffer = buffers
        log_probs = torch.log_softmax(logits, dim=-1, out=probs_out)
        loss = F.nll_loss(log_probs, targets, ignore_index=IGNORE_INDEX, reduction=reduction)
        probs = log_probs.exp_()
        ctx.save_for_backward(probs, targets)
        ctx.mark_non_differentiable(probs)
        # p takes no gradient: autograd would otherwise fill a [N, V] tensor of zeros for it.
        ctx.set_materialize_grads(False)
        ctx.reduction, ctx.gradient_buffer = reduction, gradient_buffer
        return loss, probs

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_loss, _grad_probs):
        if grad_loss is None:  # autograd may call with no gradient for any output (gradcheck checks it does)
            return None, None, None, None
        probs, targets = ctx.saved_tensors
        counted = targets != IGNORE_INDEX
        scale = grad_loss.to(probs.dtype)
        if ctx.reduction == "mean":
            scale = scale / counted.sum().to(probs.dtype)
        # where, not a product: an all-ignored batch's mean scale is NaN, and its gradient is 0, as autograd's.
        row_scale = torch.where(counted, scale, 0.0).unsqueeze(-1)
        out = (
            None
            if ctx.gradient_buffer is None
            else ctx.gradient_buffer.take(probs.shape, probs.dtype, probs.device)
        )
        grad = torch.mul(probs, row_scale, out=out)
        grad.scatter_add_(-1, targets.clamp_min(0).unsqueeze(-1), -row_scale)
        return grad, None, None, None


class CausalLMLossKeepingProbabilities:
    """Stands in for transformers' `ForCausalLMLoss` during one Pilot pass: the same loss, bit for bit, and the
    Pilot's p kept for the Mistake Log entry (`_CrossEntropyKeepingProbabilities`), so that a pass with labels
    makes one pass over the vocabulary for both and its loss's gradient one more.

    `probs_out(logits)`: where to write the log-softmax and then p (a `ReusableBuffer`'s tensor; None: a new
    tensor). `gradient_buffer(logits)`: the `ReusableBuffer` the loss's gradient for these logits goes into, taken
    only when the backward runs, so that a graph never backpropagated holds none of it (None: a new tensor). A
    call with other arguments than a plain causal-LM loss (its own shifted labels, another ignore index) is
    `ForCausalLMLoss`'s own and keeps nothing.
    """

    def __init__(
        self,
        probs_out: Callable[[torch.Tensor], torch.Tensor | None],
        gradient_buffer: Callable[[torch.Tensor], ReusableBuffer | None] = lambda logits: None,
    ):
        self.probs_out, self.gradient_buffer = probs_out, gradient_buffer
        self.logits: torch.Tensor | None = None  # the logits `probs` is the softmax of
        self.probs: torch.Tensor | None = None

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        vocab_size: int,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = IGNORE_INDEX,
        shift_labels: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        # Other keyword arguments (the model's own, passed along) ForCausalLMLoss ignores as well.
        if shift_labels is not None or ignore_index != IGNORE_INDEX or logits.shape[-1] != vocab_size:
            return ForCausalLMLoss(
                logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels, **kwargs
            )
        # As ForCausalLMLoss: labels shifted left, the last position ignored; float logits.
        targets = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1).to(logits.device)
        reduction = "sum" if num_items_in_batch is not None else "mean"
        out = self.probs_out(logits)
        loss, probs = _CrossEntropyKeepingProbabilities.apply(
            logits.float().view(-1, vocab_size),
            targets,
            reduction,
            (None if out is None else out.view(-1, vocab_size), self.gradient_buffer(logits)),
        )
        self.logits, self.probs = logits, probs.view(logits.shape)
        if reduction == "sum":
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss

    def probs_of(self, logits: torch.Tensor) -> torch.Tensor | None:
        """p where this stand-in computed it for exactly these logits, else None."""
        return self.probs if self.logits is logits else None


@contextmanager
def pilot_loss_keeping_probabilities(
    pilot: nn.Module,
    probs_out: Callable[[torch.Tensor], torch.Tensor | None],
    gradient_buffer: Callable[[torch.Tensor], ReusableBuffer | None] = lambda logits: None,
) -> Iterator[CausalLMLossKeepingProbabilities | None]:
    """For the Pilot's passes inside: its loss function replaced by a `CausalLMLossKeepingProbabilities`, where it
    is transformers' `ForCausalLMLoss` (a PEFT Pilot's base model's); otherwise unchanged, yielding None."""
    model = pilot.get_base_model() if hasattr(pilot, "get_base_model") else pilot
    if getattr(type(model), "loss_function", None) is None or model.loss_function is not ForCausalLMLoss:
        yield None
        return
    set_on_the_model = "_loss_function" in vars(model)  # then to ForCausalLMLoss itself
    stand_in = CausalLMLossKeepingProbabilities(probs_out, gradient_buffer)
    model.loss_function = stand_in
    try:
        yield stand_in
    finally:
        if set_on_the_model:
            model.loss_function = ForCausalLMLoss
        else:
            del model._loss_function


def floored_log(probs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """log p in `dtype` (a new tensor), p floored at `REWEIGHT_PROBABILITY_FLOOR`: what the reweight head adds
    its output to."""
    return as_dtype(probs, dtype).clamp_min(REWEIGHT_PROBABILITY_FLOOR).log_()


def error_of_fused_logits(
    logits: torch.Tensor, pilot_probs: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The reweight form's f_C = softmax(logits) - p in `dtype`, for logits = log p + W_out h; in place of the
    softmax unless autograd needs it."""
    fused = torch.softmax(logits, dim=-1)
    probs = pilot_probs.to(logits.dtype)
    predicted = fused - probs if fused.requires_grad else fused.sub_(probs)
    return predicted.to(dtype)


class _SquaredDistance(torch.autograd.Function):
    """`||f - e||^2` per position, e = mask * (onehot(target) - p) with p dense or top-k.

    Expanded as `||f||^2 - 2 (f_gold - p.f) + ||e||^2`: two row reductions forward and a single [B,T,V]
    tensor, the gradient `2 (f - e)`, backward. Autograd through the same formula keeps several [B,T,V]
    temporaries and was the most expensive part of the Copilot's training step on CPU.
    """

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, predicted_error, targets, mask, probs, topk_indices, topk_values):
        dtype = torch.promote_types(predicted_error.dtype, torch.float32)
        f = predicted_error.to(dtype)
        targets = targets.unsqueeze(-1)
        f_gold = f.gather(-1, targets).squeeze(-1)
        if probs is not None:
            p = probs.to(dtype)
            p_dot_f = torch.einsum("...v,...v->...", p, f)
            p_norm = torch.linalg.vector_norm(p, dim=-1).square()
            p_gold = p.gather(-1, targets).squeeze(-1)
        else:
            values = topk_values.to(dtype)
            p_dot_f = (values * f.gather(-1, topk_indices)).sum(-1)
            p_norm = values.square().sum(-1)
            p_gold = (values * (topk_indices == targets)).sum(-1)
        error_norm = 1.0 - 2.0 * p_gold + p_norm
        mask = mask.to(dtype)
        # Where there is no error (mask 0) the distance is just ||f||^2.
        distance = torch.linalg.vector_norm(f, dim=-1).square() + mask * (
            error_norm - 2.0 * (f_gold - p_dot_f)
        )
        ctx.save_for_backward(predicted_error, targets, mask, distance >= 0, probs, topk_indices, topk_values)
        return distance.clamp_min(0.0)

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_distance):
        predicted_error, targets, mask, positive, probs, topk_indices, topk_values = ctx.saved_tensors
        scale = (2.0 * grad_distance.to(mask.dtype) * positive).unsqueeze(-1)  # [B,T,1]
        error_scale = scale * mask.unsqueeze(-1)
        # 2 g (f - e): 2 g f, then + 2 g p and - 2 g onehot where there is an error.
        grad = predicted_error.to(mask.dtype) * scale
        if probs is not None:
            grad.addcmul_(probs.to(grad.dtype), error_scale)
        else:
            grad.scatter_add_(-1, topk_indices, topk_values.to(grad.dtype) * error_scale)
        grad.scatter_add_(-1, targets, -error_scale)
        return grad.to(predicted_error.dtype), None, None, None, None, None


class _HeadSquaredDistance(torch.autograd.Function):
    """`||W h_j - e_j||^2` per position for the Copilot's linear head W [V,d] without forming f = W h [B,T,V].

    `||W h||^2 = h.(W^T W) h` and `(W h).e = h.(W^T e)`, where `W^T e` is the error embedded through W (one
    [B,T,V] x [V,d] product, the cost of f itself). Backward: `2 g (W^T W h - W^T e)` for h and
    `W (sum g h h^T) - sum g e h^T` (x2) for W, so a training step keeps no vocabulary-sized tensor of its own
    and runs one vocabulary-sized product each way instead of one forward and two backward.
    """

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, head_input, weight, targets, mask, probs, topk_indices, topk_values):
        # Autocast off: the distance is a difference of larger terms, which bf16 products would swamp.
        dtype = torch.promote_types(head_input.dtype, torch.float32)
        h, w = head_input.to(dtype), weight.to(dtype)
        errors = PilotErrors(targets, mask, w.shape[0], probs, topk_indices, topk_values)
        gram_h = h @ (w.t() @ w)  # W^T W h [B,T,d]
        embedded = errors.embed(w.t())  # W^T e [B,T,d], zero where there is no error
        error_norm, _ = error_norm_and_gold_prob(errors, dtype)
        distance = (h * gram_h).sum(-1) - 2.0 * (h * embedded).sum(-1) + error_norm
        ctx.save_for_backward(
            head_input,
            weight,
            targets,
            mask,
            distance >= 0,
            probs,
            topk_indices,
            topk_values,
            gram_h,
            embedded,
        )
        return distance.clamp_min(0.0)

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_distance):
        head_input, weight, targets, mask, positive, probs, topk_indices, topk_values, gram_h, embedded = (
            ctx.saved_tensors
        )
        dtype = gram_h.dtype
        scale = (2.0 * grad_distance.to(dtype) * positive).unsqueeze(-1)  # [B,T,1]
        grad_input = (scale * (gram_h - embedded)).to(head_input.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            width = head_input.shape[-1]
            h = head_input.to(dtype).reshape(-1, width)
            scaled = scale.reshape(-1, 1) * h  # g h [N,d]
            grad = weight.to(dtype) @ (h.t() @ scaled)  # W sum g h h^T
            error_scaled = scaled * mask.reshape(-1, 1).to(dtype)  # g h where there is an error
            grad.index_add_(0, targets.reshape(-1), -error_scaled)  # - sum g onehot h^T
            if probs is not None:  # + sum g p h^T, as P^T (g h): on CPU faster than (h^T g P)^T
                grad.addmm_(probs.reshape(-1, probs.shape[-1]).to(dtype).t(), error_scaled)
            else:
                k = topk_indices.shape[-1]
                values = topk_values.reshape(-1, k, 1).to(dtype)
                grad.index_add_(
                    0, topk_indices.reshape(-1), (values * error_scaled.unsqueeze(1)).reshape(-1, width)
                )
            grad_weight = grad.to(weight.dtype)
        return grad_input, grad_weight, None, None, None, None, None


class _HeadCrossEntropy(torch.autograd.Function):
    """The reweight head's loss summed over positions with `weights`: `sum_j w_j (-log q_j[y_j])` with
    `q_j = softmax(log p_j + W h_j)` = p + f_C, and (no gradient) `sum_j w_j ||f_C - e||^2 = ||q_j - onehot(y_j)||^2`
    for R^2, 0 off `mask` (such positions carry no target).

    A block of rows at a time in one reused [rows, V] buffer, with the gradients in the same pass: the loss is a
    weighted sum, so backward only scales them, and no vocabulary-sized tensor outlives its block (on CPU each
    fresh [B,T,V] tensor costs as much in page faults as the passes over it). q is never normalised: the buffer
    holds `p exp(s - max s)` (s = W h), one exponential per element and no logarithm, and its normaliser z scales
    the [rows, d] products instead. The scores are taken in base 2 (W applied to h log2(e)): on CPU PyTorch's
    `exp2` is the cheaper kernel. Rows of weight 0 (a prompt's positions, padding) add nothing to the loss or its
    gradients, so they are skipped: supervised fine-tuning on prompt-completion pairs runs the head's
    vocabulary-sized work on the completions only (finding them costs a host sync on a GPU).
    """

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, head_input, weight, errors, weights, compute_gradients):
        dtype = torch.promote_types(head_input.dtype, torch.float32)
        width, vocab = head_input.shape[-1], weight.shape[0]
        h, w = head_input.reshape(-1, width).to(dtype), weight.to(dtype)
        num_rows = h.shape[0]
        gold = errors.masked_targets().reshape(-1)
        weights = weights.reshape(-1).to(dtype)
        counted = weights.nonzero().squeeze(-1)
        every_row = counted.numel() == num_rows  # then blocks are slices: no gathers
        if not every_row:
            weights = weights[counted]
        needs_input, needs_weight = (compute_gradients and needed for needed in ctx.needs_input_grad[:2])
        grad_input = None
        if needs_input:
            grad_input = torch.empty_like(h) if every_row else torch.zeros_like(h)
        # In W's own layout: the products accumulate faster as [V, rows] x [rows, d] than as its transpose.
        grad_weight = torch.zeros(vocab, width, dtype=dtype, device=h.device) if needs_weight else None
        spread = errors.spread_mass().reshape(-1).to(dtype) if errors.is_compact else None
        rows = min(max(1, HEAD_BLOCK_ELEMENTS // vocab), max(counted.numel(), 1))
        unnormalised = torch.empty(rows, vocab, dtype=dtype, device=h.device)
        floored = torch.empty_like(unnormalised)
        cross_entropy = torch.empty(counted.numel(), dtype=dtype, device=h.device)
        squared_error = torch.empty_like(cross_entropy)
        for start in range(0, counted.numel(), rows):
            position = slice(start, min(start + rows, counted.numel()))  # into the counted rows
            block = position if every_row else counted[position]  # into all rows
            size = position.stop - start
            # Gathered once per block where rows are indices (each index read copies).
            block_input, block_gold = h[block], gold[block]
            # In base 2, s log2(e) = W (h log2(e)): exp2 is the cheaper kernel on CPU, and the scaling is [rows, d].
            scores = torch.mm(block_input * math.log2(math.e), w.t(), out=unnormalised[:size])
            probs = _floored_probabilities(errors, block, floored[:size])
            gold_index = block_gold.unsqueeze(-1)
            top = scores.amax(-1, keepdim=True)
            gold_score = scores.gather(-1, gold_index)
            u = scores.sub_(top).exp2_().mul_(probs)  # p exp(s - max s) = z q
            z = u.sum(-1, keepdim=True)
            log_gold_prob = probs.gather(-1, gold_index).log()
            log_gold_ratio = (top - gold_score) * math.log(2.0)  # back to natural log
            cross_entropy[position] = (log_gold_ratio + z.log() - log_gold_prob).squeeze(-1)
            q_norm = torch.linalg.vector_norm(u, dim=-1, keepdim=True) / z
            squared = q_norm.square() - 2.0 * u.gather(-1, gold_index) / z + 1.0
            if errors.is_compact:
                squared += _spread_correction(
                    u, z, gold_index, errors.topk_indices.reshape(num_rows, -1)[block], spread[block]
                )
            squared_error[position] = squared.squeeze(-1)
            # gradient of the logits w (q - onehot): (q - onehot) W and h^T (q - onehot), q = u / z
            row_weight = weights[position].unsqueeze(-1)
            if needs_input:
                out = grad_input[block] if every_row else None
                grad = torch.mm(u, w, out=out).mul_(row_weight / z).sub_(w[block_gold] * row_weight)
                if not every_row:
                    grad_input.index_copy_(0, block, grad)
            if needs_weight:
                weighted_input = block_input * row_weight
                grad_weight.addmm_(u.t(), weighted_input / z).index_add_(0, block_gold, -weighted_input)
        ctx.save_for_backward(grad_input, grad_weight)
        ctx.input_shape, ctx.input_dtype, ctx.weight_dtype = head_input.shape, head_input.dtype, weight.dtype
        mask = errors.mask.reshape(-1) if every_row else errors.mask.reshape(-1)[counted]
        squared_error = (squared_error.clamp_min_(0.0) * mask * weights).sum()
        ctx.mark_non_differentiable(squared_error)
        return (cross_entropy * weights).sum(), squared_error

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_cross_entropy, _grad_squared_error):
        grad_input, grad_weight = ctx.saved_tensors
        if grad_input is not None:
            grad_input = (grad_input * grad_cross_entropy).reshape(ctx.input_shape).to(ctx.input_dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_cross_entropy).to(ctx.weight_dtype)
        return grad_input, grad_weight, None, None, None


def _floored_probabilities(
    errors: PilotErrors, rows: slice | torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Rows `rows` (a slice or indices) of p as the reweight head reads it (`PilotErrors.spread_rows`), floored
    at `REWEIGHT_PROBABILITY_FLOOR` (as `floored_log`), written into `out` [rows, V]; exact probabilities of the
    buffer's dtype in one pass over a slice."""
    if not errors.is_compact and errors.probs.dtype == out.dtype:
        probs = errors.probs.reshape(-1, errors.vocab_size)
        if isinstance(rows, slice):
            return torch.clamp_min(probs[rows], REWEIGHT_PROBABILITY_FLOOR, out=out)
        return torch.index_select(probs, 0, rows, out=out).clamp_min_(REWEIGHT_PROBABILITY_FLOOR)
    return errors.spread_rows(rows, out).clamp_min_(REWEIGHT_PROBABILITY_FLOOR)


def _spread_correction(u, z, gold_index, topk_indices, spread_mass) -> torch.Tensor:
    """`||f_C - e||^2 - ||q - onehot||^2` [rows, 1] for rows of a compact entry, q = u / z: f_C = q - p_spread
    and e = onehot - p_topk differ from q - onehot by r = p_spread - p_topk (c = `spread_mass` on each token
    outside the top k), so the squared error gains `-2 (q - onehot).r + ||r||^2`."""
    others = u.shape[-1] - topk_indices.shape[-1]
    c = spread_mass.unsqueeze(-1)
    q_outside = 1.0 - u.gather(-1, topk_indices).sum(-1, keepdim=True) / z
    gold_outside = (topk_indices != gold_index).all(-1, keepdim=True).to(u.dtype)
    return -2.0 * c * (q_outside - gold_outside) + c.square() * others


@dataclass
class PilotErrors:
    """The Pilot's error `e_j = onehot(targets_j) - p_j` without materialising one-hot tensors.

    Stored densely (`probs` [B,T,V]) or compactly as the Pilot's top-k probabilities
    (`topk_indices`/`topk_values` [B,T,k]); in compact form the probability mass outside the top k
    is treated as zero. `mask` [B,T] is False where position j has no real next token (padding, the
    last position): the error there is zero.
    """

    targets: torch.Tensor
    mask: torch.Tensor
    vocab_size: int
    probs: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None
    topk_values: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.probs is None) == (self.topk_indices is None):
            raise ValueError("PilotErrors needs exactly one of `probs` (exact) or `topk_indices` (compact).")

    @property
    def is_compact(self) -> bool:
        return self.probs is None

    def masked_targets(self) -> torch.Tensor:
        """The targets with 0 where there is no error (padding ids may lie outside the vocabulary)."""
        return torch.where(self.mask, self.targets, torch.zeros_like(self.targets))

    def embed(self, weight: torch.Tensor, embedded_probs: torch.Tensor | None = None) -> torch.Tensor:
        """`W e_j` for a Linear(V -> d) weight [d, V], in O(B*T*(k+d)) for compact errors. `embedded_probs`: `W p_j`
        [B,T,d] of exact errors, where the caller has it already."""
        mask = self.mask.unsqueeze(-1).to(weight.dtype)
        gold = F.embedding(self.masked_targets(), weight.t())  # [B,T,d]
        if self.is_compact:
            columns = F.embedding(self.topk_indices, weight.t())  # [B,T,k,d]
            predicted = (self.topk_values.to(weight.dtype).unsqueeze(-1) * columns).sum(-2)
        elif embedded_probs is not None:
            predicted = embedded_probs
        else:
            predicted = F.linear(self.probs.to(weight.dtype), weight)
        return (gold - predicted) * mask

    def squared_distance(self, predicted_error: torch.Tensor) -> torch.Tensor:
        """`||f_j - e_j||^2` [B,T] for a predicted_error f [B,T,V], expanded so no one-hot is built."""
        return _SquaredDistance.apply(
            predicted_error, self.masked_targets(), self.mask, self.probs, self.topk_indices, self.topk_values
        )

    def head_squared_distance(self, head_input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`||W h_j - e_j||^2` [B,T] for a linear head W [V,d] and its input h [B,T,d], without f = W h."""
        return _HeadSquaredDistance.apply(
            head_input,
            weight,
            self.masked_targets(),
            self.mask,
            self.probs,
            self.topk_indices,
            self.topk_values,
        )

    def head_cross_entropy(
        self, head_input: torch.Tensor, weight: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reweight head's cross-entropy `-log softmax(log p_j + W h_j)[y_j]` for W [V,d] and its input
        h [B,T,d], and its squared error `||f_C - e||^2` (detached, 0 off the mask), summed over positions with
        `weights` [B,T] (the loss mask): p as `probabilities_spread` reads it, e as `dense`. No vocabulary-sized
        tensor outlives a block of rows; the gradients are computed with the loss where autograd will ask."""
        compute_gradients = torch.is_grad_enabled() and (head_input.requires_grad or weight.requires_grad)
        return _HeadCrossEntropy.apply(head_input, weight, self, weights, compute_gradients)

    def probabilities(self) -> torch.Tensor:
        """The Pilot's p_j [B,T,V]; compact errors give their top-k, zero elsewhere."""
        if not self.is_compact:
            return self.probs
        shape = (*self.targets.shape, self.vocab_size)
        probs = torch.zeros(shape, dtype=self.topk_values.dtype, device=self.topk_values.device)
        return probs.scatter_(-1, self.topk_indices, self.topk_values)

    def probabilities_spread(self) -> torch.Tensor:
        """p_j [B,T,V] with the mass outside a compact entry's top k spread evenly over the other tokens.

        What the reweight head reads (log p): a zero there would make a token the Pilot ranked below its top k
        unreachable and, under the cross-entropy, cost ~69 nats wherever it is the observed one.
        """
        if not self.is_compact:
            return self.probs
        spread = self.topk_values.new_empty(self.targets.numel(), self.vocab_size)
        return self.spread_rows(slice(None), spread).reshape(*self.targets.shape, self.vocab_size)

    def spread_rows(self, rows: slice | torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Rows `rows` (a slice or indices) of `probabilities_spread` flattened to [B*T, V], written into `out`
        [rows, V]."""
        if not self.is_compact:
            return out.copy_(self.probs.reshape(-1, self.vocab_size)[rows])
        k = self.topk_indices.shape[-1]
        out.copy_(self.spread_mass().reshape(-1, 1)[rows].expand_as(out))
        indices, values = self.topk_indices.reshape(-1, k)[rows], self.topk_values.reshape(-1, k)[rows]
        return out.scatter_(-1, indices, values.to(out.dtype))

    def spread_mass(self) -> torch.Tensor:
        """[B,T] of a compact entry: the probability `probabilities_spread` gives each token outside the top k."""
        others = self.vocab_size - self.topk_indices.shape[-1]
        return (1.0 - self.topk_values.sum(-1)).clamp_min(0.0) / max(others, 1)

    def dense(self) -> torch.Tensor:
        """The error tensor [B,T,V] (for tests, research and small vocabularies)."""
        probs = self.probabilities()
        onehot = F.one_hot(self.masked_targets(), self.vocab_size).to(probs.dtype)
        return (onehot - probs) * self.mask.unsqueeze(-1).to(probs.dtype)

    def compact(self, k: int) -> PilotErrors:
        """Keep the top-k probabilities per position (the SPEC's compact storage)."""
        if self.is_compact:
            raise ValueError("These errors are already compact.")
        values, indices = self.probs.topk(min(k, self.vocab_size), dim=-1)
        return PilotErrors(self.targets, self.mask, self.vocab_size, topk_indices=indices, topk_values=values)

    def map_tensors(self, fn) -> PilotErrors:
        """Apply `fn` to every tensor field (device moves, batch slicing, concatenation helpers)."""
        changes = {
            f.name: fn(getattr(self, f.name))
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **changes)


def error_norm_and_gold_prob(
    errors: PilotErrors, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """`||e_j||^2 = 1 - 2 p_gold + sum p^2` and `p_gold` [B,T] without a dense error; 0 off the mask."""
    targets = torch.where(errors.mask, errors.targets, 0).unsqueeze(-1)
    if errors.is_compact:
        values = errors.topk_values.to(dtype)
        p_gold = (values * (errors.topk_indices == targets)).sum(-1)
    else:
        values = errors.probs.to(dtype)
        p_gold = values.gather(-1, targets).squeeze(-1)
    norm = 1.0 - 2.0 * p_gold + torch.linalg.vector_norm(values, dim=-1).square()  # no [B,T,V] temporary
    return norm * errors.mask, p_gold * errors.mask


@dataclass
class MistakeLogEntry:
    """One training step's record: inputs to the Copilot and the error it learns to predict.

    Every tensor is detached: nothing flows from the Copilot back into the Pilot.
    `x_tilde`, `h_bar`: [B,T,d_P]; `attention_mask`, `loss_mask`: [B,T] (bool). `loss_mask[j]` is
    True where the target of position j (`labels[j+1]`; an encoder-decoder Pilot's `labels[j]`) is not
    -100, i.e. where the Copilot is trained. An encoder-decoder Pilot's entry has its encoder output as
    `x_tilde` [B,S,d_P] and the source padding as `encoder_attention_mask` [B,S] (bool); a decoder-only
    Pilot's has None there.
    """

    x_tilde: torch.Tensor
    h_bar: torch.Tensor
    errors: PilotErrors
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    encoder_attention_mask: torch.Tensor | None = None

    @property
    def is_encoder_decoder(self) -> bool:
        return self.encoder_attention_mask is not None

    def map_tensors(self, fn) -> MistakeLogEntry:
        return MistakeLogEntry(
            x_tilde=fn(self.x_tilde),
            h_bar=fn(self.h_bar),
            errors=self.errors.map_tensors(fn),
            attention_mask=fn(self.attention_mask),
            loss_mask=fn(self.loss_mask),
            encoder_attention_mask=None
            if self.encoder_attention_mask is None
            else fn(self.encoder_attention_mask),
        )

    def map_positions(self, fn) -> MistakeLogEntry:
        """Apply `fn` to the tensors indexed by (decoder) position; an encoder output keeps all of its positions."""
        if not self.is_encoder_decoder:
            return self.map_tensors(fn)
        return MistakeLogEntry(
            x_tilde=self.x_tilde,
            h_bar=fn(self.h_bar),
            errors=self.errors.map_tensors(fn),
            attention_mask=fn(self.attention_mask),
            loss_mask=fn(self.loss_mask),
            encoder_attention_mask=self.encoder_attention_mask,
        )

    def to(self, device: torch.device | str) -> MistakeLogEntry:
        return self.map_tensors(lambda t: t.to(device))

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def mistake_log_entry_from_pilot_pass(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    logits: torch.Tensor,
    hidden_states: tuple[torch.Tensor, ...],
    probs: torch.Tensor | None = None,
) -> MistakeLogEntry:
    """SPEC section 2: x_tilde, layer-mean h_bar and the per-token error of one Pilot pass (detached).

    `attention_mask` may cover cached positions before `input_ids` (its last columns are theirs); None: no padding,
    as generate() passes it. `probs`: p of these logits where the caller has it (`pilot_probabilities`, or the
    Pilot's loss kept it); None: computed here."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        attention_mask = attention_mask[:, -input_ids.shape[1] :].bool()
    targets = torch.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]
    has_next = torch.zeros_like(attention_mask)
    has_next[:, :-1] = attention_mask[:, :-1] & attention_mask[:, 1:]
    loss_mask = torch.zeros_like(attention_mask)
    if labels is not None:
        loss_mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        loss_mask &= has_next
    probs = pilot_probabilities(logits) if probs is None else probs
    errors = PilotErrors(targets=targets, mask=has_next, vocab_size=logits.shape[-1], probs=probs)
    return MistakeLogEntry(
        x_tilde=hidden_states[0].detach(),
        h_bar=torch.stack(hidden_states[1:]).mean(0).detach(),
        errors=errors,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
    )


def mistake_log_entry_from_seq2seq_pass(
    decoder_input_ids: torch.Tensor,
    decoder_attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    logits: torch.Tensor,
    encoder_output: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None,
    decoder_hidden_states: tuple[torch.Tensor, ...],
    probs: torch.Tensor | None = None,
) -> MistakeLogEntry:
    """SPEC section 8: an encoder-decoder Pilot's entry per decoder position (detached); `probs` as
    `mistake_log_entry_from_pilot_pass` reads it.

    `x_tilde` is the encoder output, `h_bar` the mean of the decoder layers' outputs. Decoder position j
    predicts `labels[j]` (its input is `labels[j-1]`, T5 and BART shift the labels right): with labels, the
    error and the loss mask are where `labels[j] != -100`; without them, where `decoder_input_ids[j+1]` is a
    real token.
    """
    batch, length = decoder_input_ids.shape
    if decoder_attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.bool, device=decoder_input_ids.device)
    else:
        attention_mask = decoder_attention_mask[:, -length:].bool()
    if labels is not None:
        known = labels != IGNORE_INDEX
        targets = torch.where(known, labels, torch.zeros_like(labels))
        has_next = known & attention_mask
        loss_mask = has_next
    else:
        targets = torch.zeros_like(decoder_input_ids)
        targets[:, :-1] = decoder_input_ids[:, 1:]
        has_next = torch.zeros_like(attention_mask)
        has_next[:, :-1] = attention_mask[:, :-1] & attention_mask[:, 1:]
        loss_mask = torch.zeros_like(attention_mask)
    if encoder_attention_mask is None:
        encoder_attention_mask = torch.ones(
            encoder_output.shape[:2], dtype=torch.bool, device=encoder_output.device
        )
    probs = pilot_probabilities(logits) if probs is None else probs
    errors = PilotErrors(targets=targets, mask=has_next, vocab_size=logits.shape[-1], probs=probs)
    return MistakeLogEntry(
        x_tilde=encoder_output.detach(),
        h_bar=torch.stack(decoder_hidden_states[1:]).mean(0).detach(),
        errors=errors,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        encoder_attention_mask=encoder_attention_mask.bool(),
    )


def copilot_target_norm(entry: MistakeLogEntry) -> torch.Tensor:
    """Sum over loss-mask positions of ||e_j||^2: R^2 = 1 - copilot_squared_error / this."""
    norm, _ = error_norm_and_gold_prob(entry.errors)
    return (norm * entry.loss_mask).sum()


class CopilotLossTerms(NamedTuple):
    """The Copilot's loss on some positions, as sums, so that micro-batches and processes add up exactly.

    `objective`: what its training minimises, summed over the loss-mask positions (`CopilotConfig.error_loss`: the
    squared error, or the cross-entropy of the observed token under p + f_C); `squared_error`: sum of
    ||f_C - e||^2 (the same tensor under the squared error; detached otherwise), from which R^2 is computed;
    `num_tokens`: the positions counted.
    """

    objective: torch.Tensor
    squared_error: torch.Tensor
    num_tokens: torch.Tensor


def copilot_loss_from_sums(objective, num_tokens, error_loss: str):
    """`copilot_loss` (returned and logged) from summed terms, tensors or floats, `num_tokens` > 0: the paper's
    RMSE for the squared error, the mean per position for the cross-entropy."""
    mean = objective / num_tokens
    return mean**0.5 if error_loss == "squared_error" else mean


def copilot_r2_from_sums(squared_error: float, target_norm: float) -> float:
    """`copilot_r2` from summed terms: 1 - sum ||f_C - e||^2 / sum ||e||^2; 0 where there was no error to learn."""
    return 1.0 - squared_error / target_norm if target_norm else 0.0


def joint_losses(
    pilot_loss: torch.Tensor, objective: torch.Tensor, num_tokens: torch.Tensor, error_loss: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Pilot's and the Copilot's losses (`copilot_loss_from_sums`), both 0 with zero gradients where no
    position has a label: chosen on the device, so a training step waits for no count to be read back."""
    has_tokens = num_tokens > 0
    # Where unused, the loss of an objective of 1: the RMSE's square root at 0 would have an infinite gradient.
    used = torch.where(has_tokens, objective, torch.ones_like(objective))
    copilot_loss = copilot_loss_from_sums(used, num_tokens.clamp_min(1), error_loss)
    zero = objective * 0.0
    return torch.where(has_tokens, pilot_loss, zero), torch.where(has_tokens, copilot_loss, zero)


NO_LABELS_WARNING = (
    "Every label in this batch is -100: there is nothing to learn from, so the losses are 0. Check that your "
    "collator does not mask the answers."
)


def copilot_cross_entropy(fused_logits: torch.Tensor, entry: MistakeLogEntry) -> torch.Tensor:
    """Sum over loss-mask positions of -log softmax(fused_logits)[y_j], the observed next token y_j (fused_logits
    in fp32 or wider)."""
    gold = fused_logits.gather(-1, entry.errors.masked_targets().unsqueeze(-1)).squeeze(-1)
    return ((torch.logsumexp(fused_logits, dim=-1) - gold) * entry.loss_mask).sum()


def copilot_squared_error(
    predicted_errors: torch.Tensor, entry: MistakeLogEntry
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over loss-mask positions of ||f_C_j - e_j||^2, and the number of those positions."""
    distances = entry.errors.squared_distance(predicted_errors)
    mask = entry.loss_mask
    return (distances * mask).sum(), mask.sum()


def copilot_head_squared_error(
    head_input: torch.Tensor, weight: torch.Tensor, entry: MistakeLogEntry
) -> tuple[torch.Tensor, torch.Tensor]:
    """`copilot_squared_error` of the linear head W [V,d] on its input h [B,T,d], without forming f_C = W h."""
    distances = entry.errors.head_squared_distance(head_input, weight)
    mask = entry.loss_mask
    return (distances * mask).sum(), mask.sum()


def copilot_head_cross_entropy(
    head_input: torch.Tensor, weight: torch.Tensor, entry: MistakeLogEntry
) -> CopilotLossTerms:
    """The reweight head's loss terms on its input h [B,T,d] and weight W [V,d]
    (`PilotErrors.head_cross_entropy`): the cross-entropy and the detached squared error, summed over the loss
    mask."""
    cross_entropy, squared_error = entry.errors.head_cross_entropy(head_input, weight, entry.loss_mask)
    return CopilotLossTerms(cross_entropy, squared_error, entry.loss_mask.sum())


def shift_right(stream: torch.Tensor) -> torch.Tensor:
    """Position j receives the value of position j-1; position 0 receives zeros."""
    return F.pad(stream[:, :-1], (0, 0, 1, 0))


def answer_token_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """[B,T] bool: position j holds an answer token (`loss_mask[j-1]`), i.e. one that generate() writes."""
    positions = torch.zeros_like(loss_mask)
    positions[:, 1:] = loss_mask[:, :-1]
    return positions
