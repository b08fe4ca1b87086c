"""`PilotErrors.squared_distance`, `head_squared_distance` and `head_cross_entropy`: the Copilot's loss terms and
their hand-written gradients (SPEC section 4); the Pilot's loss that keeps its probabilities for the entry."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.loss.loss_utils import ForCausalLMLoss

from hf_copilot import mistake_log_entry
from hf_copilot.mistake_log_entry import (
    CausalLMLossKeepingProbabilities,
    PilotErrors,
    ReusableBuffer,
    joint_losses,
)

B, T, V = 3, 5, 11


def errors(compact_k: int | None = None, dtype=torch.float64) -> PilotErrors:
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(B, T, V, generator=generator, dtype=dtype) * 2, dim=-1)
    targets = torch.randint(0, V, (B, T), generator=generator)
    mask = torch.rand(B, T, generator=generator) > 0.3  # some positions carry no error
    result = PilotErrors(targets=targets, mask=mask, vocab_size=V, probs=probs)
    return result.compact(compact_k) if compact_k else result


def head_input_and_weight() -> tuple[torch.Tensor, torch.Tensor]:
    """A linear head's input h [B,T,6] and weight W [V,6], float64, both requiring gradients."""
    return (
        torch.randn(B, T, 6, dtype=torch.float64, requires_grad=True),
        torch.randn(V, 6, dtype=torch.float64, requires_grad=True),
    )


@pytest.mark.parametrize("compact_k", [None, 4])
def test_squared_distance_and_its_gradient_match_the_dense_formula(compact_k):
    e = errors(compact_k)
    prediction = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(B, T, dtype=torch.float64)
    (e.squared_distance(prediction) * weights).sum().backward()
    expected = prediction.detach().clone().requires_grad_()
    reference = (expected - e.dense().to(torch.float64)).square().sum(-1)
    (reference * weights).sum().backward()
    torch.testing.assert_close(e.squared_distance(prediction.detach()), reference.detach())
    torch.testing.assert_close(prediction.grad, expected.grad)


@pytest.mark.parametrize("compact_k", [None, 4])
def test_squared_distance_passes_gradcheck(compact_k):
    e = errors(compact_k)
    prediction = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(e.squared_distance, (prediction,))


def test_squared_distance_of_a_low_precision_prediction_is_computed_in_float32():
    e = errors(dtype=torch.float32)
    prediction = torch.randn(B, T, V).to(torch.bfloat16).requires_grad_()
    distance = e.squared_distance(prediction)
    assert distance.dtype == torch.float32
    distance.sum().backward()
    assert prediction.grad.dtype == torch.bfloat16
    reference = (prediction.detach().float() - e.dense()).square().sum(-1)
    torch.testing.assert_close(distance.detach(), reference)


@pytest.mark.parametrize("compact_k", [None, 4])
def test_head_squared_distance_and_its_gradients_match_the_head_applied_explicitly(compact_k):
    e = errors(compact_k)
    head_input, weight = head_input_and_weight()
    weights = torch.rand(B, T, dtype=torch.float64)
    distance = e.head_squared_distance(head_input, weight)
    (distance * weights).sum().backward()
    expected_input = head_input.detach().clone().requires_grad_()
    expected_weight = weight.detach().clone().requires_grad_()
    reference = (expected_input @ expected_weight.t() - e.dense().to(torch.float64)).square().sum(-1)
    (reference * weights).sum().backward()
    torch.testing.assert_close(distance.detach(), reference.detach())
    torch.testing.assert_close(head_input.grad, expected_input.grad)
    torch.testing.assert_close(weight.grad, expected_weight.grad)


@pytest.mark.parametrize("compact_k", [None, 4])
def test_head_squared_distance_passes_gradcheck(compact_k):
    e = errors(compact_k)
    head_input, weight = head_input_and_weight()
    assert torch.autograd.gradcheck(e.head_squared_distance, (head_input, weight))


def test_head_squared_distance_of_low_precision_inputs_is_computed_in_float32():
    e = errors(dtype=torch.float32)
    head_input = torch.randn(B, T, 6).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(V, 6).to(torch.bfloat16).requires_grad_()
    distance = e.head_squared_distance(head_input, weight)
    assert distance.dtype == torch.float32
    distance.sum().backward()
    assert head_input.grad.dtype == weight.grad.dtype == torch.bfloat16
    reference = (head_input.detach().float() @ weight.detach().float().t() - e.dense()).square().sum(-1)
    torch.testing.assert_close(distance.detach(), reference)


def test_squared_distance_under_autocast_keeps_float32_products():
    e = errors(dtype=torch.float32)
    prediction = torch.randn(B, T, V)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distance = e.squared_distance(prediction)
    torch.testing.assert_close(distance, e.squared_distance(prediction))


def test_head_squared_distance_under_autocast_keeps_float32_products():
    """The distance is a difference of larger terms: bf16 products inside it would swamp it."""
    e = errors(dtype=torch.float32)
    head_input = torch.randn(B, T, 6, requires_grad=True)
    weight = torch.randn(V, 6, requires_grad=True)
    expected = e.head_squared_distance(head_input, weight)
    expected.sum().backward()
    expected_grads = head_input.grad.clone(), weight.grad.clone()
    head_input.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distance = e.head_squared_distance(head_input, weight)
        distance.sum().backward()
    torch.testing.assert_close(distance, expected)
    torch.testing.assert_close((head_input.grad, weight.grad), expected_grads)


def test_a_compact_entry_spreads_the_mass_outside_its_top_k_evenly_for_the_reweight_head():
    """Where the Pilot's distribution is uniform outside its top k, the spread compact entry is the dense one, so a
    reweight head reads the same log p from both; a dense entry is returned as it is."""
    generator = torch.Generator().manual_seed(0)
    top = torch.rand(B, T, 4, generator=generator, dtype=torch.float64) + 1.0
    rest = torch.rand(B, T, 1, generator=generator, dtype=torch.float64)
    probs = torch.cat([top, rest.expand(B, T, V - 4)], dim=-1)
    probs = probs / probs.sum(-1, keepdim=True)
    probs = probs[..., torch.randperm(V, generator=generator)]
    targets = torch.randint(0, V, (B, T), generator=generator)
    dense = PilotErrors(targets=targets, mask=torch.ones(B, T, dtype=torch.bool), vocab_size=V, probs=probs)
    assert dense.probabilities_spread() is probs
    compact = dense.compact(4)
    assert (compact.probabilities() == 0).sum() == B * T * (V - 4)  # what the squared error reads
    torch.testing.assert_close(compact.probabilities_spread(), probs)


def explicit_head_cross_entropy(e: PilotErrors, head_input, weight, weights):
    """The reweight head's cross-entropy and squared error through autograd, as its explicit path computes them,
    summed with `weights`."""
    logits = e.probabilities_spread().clamp_min(1e-30).log() + head_input @ weight.t()
    gold = logits.gather(-1, e.masked_targets().unsqueeze(-1)).squeeze(-1)
    predicted_error = torch.softmax(logits, dim=-1) - e.probabilities_spread()
    cross_entropy = torch.logsumexp(logits, dim=-1) - gold
    squared_error = e.squared_distance(predicted_error.detach()) * e.mask
    return (cross_entropy * weights).sum(), (squared_error * weights).sum()


@pytest.mark.parametrize("block_rows", [None, 4])
@pytest.mark.parametrize("compact_k", [None, 4])
def test_head_cross_entropy_and_its_gradients_match_the_head_applied_explicitly(
    compact_k, block_rows, monkeypatch
):
    """In one block of rows and in blocks of 4 (the last one shorter), with a scaled loss, and with a token the
    Pilot's softmax put at exactly zero as the observed one (the floor keeps it reachable)."""
    if block_rows:
        monkeypatch.setattr(mistake_log_entry, "HEAD_BLOCK_ELEMENTS", block_rows * V)
    e = errors(compact_k)
    if e.probs is not None:
        e.probs[0, 0, e.targets[0, 0]] = 0.0
    head_input, weight = head_input_and_weight()
    weights = torch.rand(B, T, dtype=torch.float64)
    cross_entropy, squared_error = e.head_cross_entropy(head_input, weight, weights)
    assert not squared_error.requires_grad
    (0.7 * cross_entropy).backward()
    expected_input = head_input.detach().clone().requires_grad_()
    expected_weight = weight.detach().clone().requires_grad_()
    expected_cross_entropy, expected_squared_error = explicit_head_cross_entropy(
        e, expected_input, expected_weight, weights
    )
    (0.7 * expected_cross_entropy).backward()
    assert torch.isfinite(expected_cross_entropy)
    torch.testing.assert_close(cross_entropy.detach(), expected_cross_entropy.detach())
    torch.testing.assert_close(squared_error, expected_squared_error)
    torch.testing.assert_close(head_input.grad, expected_input.grad)
    torch.testing.assert_close(weight.grad, expected_weight.grad)


@pytest.mark.parametrize("block_rows", [None, 4])
@pytest.mark.parametrize("compact_k", [None, 4])
def test_head_cross_entropy_never_computes_the_rows_of_weight_zero(compact_k, block_rows, monkeypatch):
    """A prompt's positions (weight 0) are skipped, not computed and zeroed: with an infinite head input there,
    which would make their scores NaN, the loss, the squared error and the gradients are those of the head
    applied explicitly to a finite input, and the skipped rows' input gradient is exactly 0."""
    if block_rows:
        monkeypatch.setattr(mistake_log_entry, "HEAD_BLOCK_ELEMENTS", block_rows * V)
    e = errors(compact_k)
    head_input, weight = head_input_and_weight()
    weights = torch.rand(B, T, dtype=torch.float64)
    weights[0, :3] = 0.0
    weights[2, 1] = 0.0
    poisoned = head_input.detach().clone()
    poisoned[weights == 0] = float("inf")
    poisoned.requires_grad_()
    cross_entropy, squared_error = e.head_cross_entropy(poisoned, weight, weights)
    (0.7 * cross_entropy).backward()
    expected_weight = weight.detach().clone().requires_grad_()
    expected_cross_entropy, expected_squared_error = explicit_head_cross_entropy(
        e, head_input, expected_weight, weights
    )
    (0.7 * expected_cross_entropy).backward()
    torch.testing.assert_close(cross_entropy.detach(), expected_cross_entropy.detach())
    torch.testing.assert_close(squared_error, expected_squared_error)
    torch.testing.assert_close(poisoned.grad, head_input.grad)
    torch.testing.assert_close(weight.grad, expected_weight.grad)
    assert torch.equal(poisoned.grad[weights == 0], torch.zeros(4, 6, dtype=torch.float64))


def test_head_cross_entropy_leaves_the_entry_untouched_and_differentiates_a_retained_graph_twice():
    e = errors()
    probs = e.probs.clone()
    head_input, weight = head_input_and_weight()
    cross_entropy, _ = e.head_cross_entropy(head_input, weight, e.mask)
    cross_entropy.backward(retain_graph=True)
    once = weight.grad.clone()
    cross_entropy.backward()
    assert torch.equal(e.probs, probs)
    torch.testing.assert_close(weight.grad, 2 * once)


def test_head_cross_entropy_without_gradients_gives_the_same_values():
    e = errors()
    head_input, weight = head_input_and_weight()
    with_gradients = e.head_cross_entropy(head_input, weight, e.mask)
    with torch.no_grad():
        without = e.head_cross_entropy(head_input, weight, e.mask)
    assert not without[0].requires_grad
    torch.testing.assert_close(without, tuple(value.detach() for value in with_gradients), rtol=0, atol=0)


def test_head_cross_entropy_of_low_precision_inputs_under_autocast_is_computed_in_float32():
    e = errors(dtype=torch.float32)
    head_input = torch.randn(B, T, 6).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(V, 6).to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cross_entropy, squared_error = e.head_cross_entropy(head_input, weight, e.mask)
    assert cross_entropy.dtype == squared_error.dtype == torch.float32
    cross_entropy.backward()
    assert head_input.grad.dtype == weight.grad.dtype == torch.bfloat16
    expected = explicit_head_cross_entropy(e, head_input.detach().float(), weight.detach().float(), e.mask)
    torch.testing.assert_close((cross_entropy.detach(), squared_error), expected)


def test_head_cross_entropy_reads_low_precision_probabilities_in_float32():
    """An entry whose probabilities are stored in bf16 gives what their float32 values give (the floor and the
    exponentials run in float32, not in the entry's precision)."""
    e = errors(dtype=torch.float32)
    low = replace(e, probs=e.probs.to(torch.bfloat16))
    upcast = replace(e, probs=low.probs.float())
    head_input = torch.randn(B, T, 6)
    weight = torch.randn(V, 6)
    torch.testing.assert_close(
        low.head_cross_entropy(head_input, weight, e.mask),
        upcast.head_cross_entropy(head_input, weight, e.mask),
    )


@pytest.mark.parametrize("error_loss", ["squared_error", "cross_entropy"])
def test_joint_losses_are_the_means_with_labels_and_zero_with_zero_gradients_without(error_loss):
    pilot_loss = torch.tensor(2.5, requires_grad=True)
    objective = torch.tensor(9.0, requires_grad=True)
    pilot, copilot = joint_losses(pilot_loss, objective, torch.tensor(4), error_loss)
    assert pilot.item() == 2.5 and copilot.item() == (1.5 if error_loss == "squared_error" else 2.25)
    # No labelled position: the Pilot's mean is NaN (0 / 0) and the Copilot's sum 0, whose RMSE has an infinite
    # gradient; both losses are 0 and nothing reaches either input.
    pilot_loss = torch.tensor(float("nan"), requires_grad=True)
    objective = torch.tensor(0.0, requires_grad=True)
    pilot, copilot = joint_losses(pilot_loss, objective, torch.tensor(0), error_loss)
    (pilot + copilot).backward()
    assert pilot.item() == 0.0 and copilot.item() == 0.0
    assert pilot_loss.grad.item() == 0.0 and objective.grad.item() == 0.0


def test_an_entry_without_a_mask_is_the_entry_of_an_all_ones_mask_and_a_mask_with_cached_columns_is_cut():
    """None means no padding (generate() drops an all-ones mask); a mask that also covers cached positions gives
    the entry of its last T columns."""
    torch.manual_seed(0)
    input_ids = torch.randint(0, 11, (2, 5))
    labels = input_ids.clone()
    labels[0, :2] = -100
    logits = torch.randn(2, 5, 11)
    hidden_states = (torch.randn(2, 5, 4), torch.randn(2, 5, 4))
    build = mistake_log_entry.mistake_log_entry_from_pilot_pass
    ones = build(input_ids, torch.ones(2, 5, dtype=torch.long), labels, logits, hidden_states)
    padded = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0]])
    for entry in (
        build(input_ids, None, labels, logits, hidden_states),
        build(
            input_ids,
            torch.cat([padded[:, :3], torch.ones(2, 5, dtype=torch.long)], 1),
            labels,
            logits,
            hidden_states,
        ),
    ):
        assert torch.equal(entry.attention_mask, ones.attention_mask)
        assert torch.equal(entry.loss_mask, ones.loss_mask)
        assert torch.equal(entry.errors.mask, ones.errors.mask)
    cut = build(input_ids, padded, labels, logits, hidden_states)
    assert torch.equal(cut.attention_mask, padded[:, -5:].bool())
    assert cut.loss_mask.tolist() == [[False, True, True, True, False], [True, True, True, False, False]]


# --------------------------------------------------------------------------------------------------
# The Pilot's causal-LM loss, keeping the probabilities the entry reads


def pilot_logits_and_labels(dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B,T,V] that require gradients and labels with a prompt (-100) in the first row."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, T, V, generator=generator) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=generator)
    labels[0, :3] = -100
    return logits, labels


def stock_loss_and_gradient(logits, labels, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    loss = ForCausalLMLoss(logits, labels, V, **kwargs)
    (gradient,) = torch.autograd.grad(loss, logits)
    return loss, gradient


@pytest.mark.parametrize("num_items_in_batch", [None, torch.tensor(9)])
def test_the_kept_loss_is_causal_lm_loss_bit_for_bit_and_its_gradient_to_rounding(num_items_in_batch):
    """`num_items_in_batch` None: the mean over labelled positions; given: their sum over it (gradient
    accumulation). The gradient reads p from an exponential of its own, which rounds differently in the last bit."""
    logits, labels = pilot_logits_and_labels()
    expected, expected_gradient = stock_loss_and_gradient(
        logits, labels, num_items_in_batch=num_items_in_batch
    )
    loss_function = CausalLMLossKeepingProbabilities(lambda logits: None)
    loss = loss_function(
        logits=logits,
        labels=labels,
        vocab_size=V,
        num_items_in_batch=num_items_in_batch,
        output_hidden_states=True,  # a model's own keyword arguments pass through, as ForCausalLMLoss lets them
    )
    assert torch.equal(loss, expected)
    (gradient,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-5, atol=1e-8)
    probs = loss_function.probs_of(logits)
    assert not probs.requires_grad
    assert torch.equal(probs, torch.log_softmax(logits.detach(), dim=-1).exp())
    torch.testing.assert_close(probs, torch.softmax(logits.detach(), dim=-1), rtol=1e-6, atol=1e-8)
    assert loss_function.probs_of(logits.detach()) is None  # only for the very logits it saw


def test_the_kept_loss_backward_is_the_cross_entropy_gradient_in_float64():
    """gradcheck against finite differences: the gradient s (p - onehot) per counted row, 0 elsewhere."""
    logits, labels = pilot_logits_and_labels(torch.float64)
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    for reduction in ("mean", "sum"):
        assert torch.autograd.gradcheck(
            lambda z, reduction=reduction: mistake_log_entry._CrossEntropyKeepingProbabilities.apply(
                z, targets, reduction, (None, None)
            )[0],
            (logits.detach().reshape(-1, V).requires_grad_(),),
        )


def test_the_kept_loss_writes_the_probabilities_into_the_buffer_it_is_given():
    logits, labels = pilot_logits_and_labels()
    buffer = torch.full((B, T, V), float("nan"))
    loss_function = CausalLMLossKeepingProbabilities(lambda logits: buffer)
    loss_function(logits=logits, labels=labels, vocab_size=V)
    probs = loss_function.probs_of(logits)
    assert probs.data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer, torch.log_softmax(logits.detach(), dim=-1).exp())


def test_the_kept_loss_writes_its_gradient_into_the_buffer_it_is_given_once_nothing_holds_the_last_one():
    logits, labels = pilot_logits_and_labels()
    expected = torch.autograd.grad(
        CausalLMLossKeepingProbabilities(lambda logits: None)(logits=logits, labels=labels, vocab_size=V),
        logits,
    )[0]
    buffer = ReusableBuffer()
    loss_function = CausalLMLossKeepingProbabilities(lambda logits: None, lambda logits: buffer)
    (first,) = torch.autograd.grad(loss_function(logits=logits, labels=labels, vocab_size=V), logits)
    assert torch.equal(first, expected)
    storage = buffer._buffer.untyped_storage().data_ptr()
    assert first.untyped_storage().data_ptr() == storage
    (held,) = torch.autograd.grad(loss_function(logits=logits, labels=labels, vocab_size=V), logits)
    assert held.untyped_storage().data_ptr() != storage  # the first gradient still holds the buffer
    assert torch.equal(first, expected) and torch.equal(held, expected)
    del first, held
    (third,) = torch.autograd.grad(loss_function(logits=logits, labels=labels, vocab_size=V), logits)
    assert torch.equal(third, expected)
    assert third.untyped_storage().data_ptr() == buffer._buffer.untyped_storage().data_ptr()


class _VocabularySizedOutputs(TorchDispatchMode):
    """The operators that return a new tensor of `numel` elements (not a view), in order."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.names = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.numel() == self.numel and not func.is_view:
            self.names.append(func.overloadpacket.__name__)
        return out


def test_the_kept_loss_backward_makes_one_vocabulary_sized_tensor_and_none_for_the_probabilities():
    """Autograd would fill a zero gradient for p, an output no loss reads, unless told not to."""
    logits, labels = pilot_logits_and_labels()
    loss = CausalLMLossKeepingProbabilities(lambda logits: None)(logits=logits, labels=labels, vocab_size=V)
    with _VocabularySizedOutputs(B * T * V) as recorded:
        torch.autograd.grad(loss, logits)
    assert recorded.names == ["mul", "scatter_add_"]


def test_the_kept_loss_of_a_batch_without_labels_is_nan_with_a_zero_gradient_as_causal_lm_losss():
    logits, labels = pilot_logits_and_labels()
    labels = torch.full_like(labels, -100)
    expected, expected_gradient = stock_loss_and_gradient(logits, labels)
    loss = CausalLMLossKeepingProbabilities(lambda logits: None)(logits=logits, labels=labels, vocab_size=V)
    assert expected.isnan() and loss.isnan()
    (gradient,) = torch.autograd.grad(loss, logits)
    assert torch.equal(gradient, expected_gradient) and not gradient.any()


def test_the_kept_loss_of_low_precision_logits_is_causal_lm_loss_bit_for_bit():
    logits, labels = pilot_logits_and_labels(torch.bfloat16)
    expected, expected_gradient = stock_loss_and_gradient(logits, labels)
    loss_function = CausalLMLossKeepingProbabilities(lambda logits: None)
    loss = loss_function(logits=logits, labels=labels, vocab_size=V)
    assert torch.equal(loss, expected)
    (gradient,) = torch.autograd.grad(loss, logits)
    assert gradient.dtype == torch.bfloat16
    torch.testing.assert_close(gradient, expected_gradient)
    assert loss_function.probs_of(logits).dtype == torch.float32


@pytest.mark.parametrize(
    "arguments", [{"shift_labels": "shifted"}, {"ignore_index": 0}], ids=["shift_labels", "ignore_index"]
)
def test_other_loss_arguments_get_causal_lm_losss_own_loss_and_keep_nothing(arguments):
    logits, labels = pilot_logits_and_labels()
    if "shift_labels" in arguments:
        arguments = {"shift_labels": torch.roll(labels, 1, dims=1)}
    else:
        labels = labels.clamp_min(0)  # -100 is a class under another ignore index
    expected = ForCausalLMLoss(logits, labels, V, **arguments)
    loss_function = CausalLMLossKeepingProbabilities(lambda logits: pytest.fail("no buffer is taken"))
    assert torch.equal(loss_function(logits=logits, labels=labels, vocab_size=V, **arguments), expected)
    assert loss_function.probs_of(logits) is None
