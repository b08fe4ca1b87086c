"""The Pilot + Copilot forward pass: Mistake Log entry, losses, causality, and an untouched Pilot.

Most tests run once per Pilot architecture (the `arch` fixture of conftest.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    FIRST_REGULAR_TOKEN,
    VOCAB_SIZE,
    build_batch,
    build_pilot,
    build_pilot_copilot,
    padded_position_ids,
    tiny_copilot_config,
    tiny_pilot_config,
    token_term,
)
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from hf_copilot import PilotCopilotConfig, PilotCopilotForCausalLM, PilotErrors, fuse_scores
from hf_copilot.checkpointing import INITIAL_ERROR_NORM
from hf_copilot.configuration_pilot_copilot import copilot_config_like
from hf_copilot.mistake_log_entry import shift_right
from hf_copilot.modeling_copilot import (
    CopilotRMSNorm,
    _RMSNormFunction,
    build_attention_mask,
    rotate,
    rotation_at,
)


def pilot_inputs(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def direct_errors(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """onehot(token_{j+1}) - softmax(z_j) where j and j+1 are real tokens, 0 elsewhere."""
    error = torch.zeros(logits.shape)
    error[:, :-1] = F.one_hot(input_ids[:, 1:], logits.shape[-1]).float() - logits[:, :-1].float().softmax(-1)
    has_next = torch.zeros(input_ids.shape, dtype=torch.bool)
    has_next[:, :-1] = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
    return error * has_next.unsqueeze(-1)


# --------------------------------------------------------------------------------------------------
# Losses


@torch.no_grad()
def test_pilot_loss_is_exactly_the_pilots_own_loss(arch):
    model = build_pilot_copilot(arch)
    batch = build_batch()
    expected = model.pilot(**batch).loss
    out = model(**batch)
    assert torch.equal(out.pilot_loss, expected)
    assert torch.equal(out.loss, out.pilot_loss + out.copilot_loss)


@torch.no_grad()
def test_pilot_loss_is_exactly_the_pilots_own_loss_under_gradient_accumulation(arch):
    model = build_pilot_copilot(arch)
    batch = build_batch()
    num_items = torch.tensor(17)  # the token count of the whole optimizer batch, not this micro-batch
    expected = model.pilot(**batch, num_items_in_batch=num_items).loss
    assert not torch.equal(expected, model.pilot(**batch).loss)
    assert torch.equal(model(**batch, num_items_in_batch=num_items).pilot_loss, expected)


@pytest.mark.parametrize("hidden_dropout", [0.0, 0.5])
@torch.no_grad()
def test_the_residual_dropout_acts_in_training_only_and_only_when_set(hidden_dropout):
    """hidden_dropout > 0 drops on a training pass (two passes differ), never in eval; at 0 training is
    deterministic."""
    model = build_pilot_copilot("llama", tiny_copilot_config(hidden_dropout=hidden_dropout)).train()
    batch = build_batch()
    first, second = (model(**batch).copilot_loss for _ in range(2))
    assert torch.equal(first, second) is (hidden_dropout == 0)
    model.eval()
    assert torch.equal(model(**batch).copilot_loss, model(**batch).copilot_loss)


def test_copilot_loss_backpropagates_into_no_pilot_parameter(arch):
    model = build_pilot_copilot(arch)
    model(**build_batch()).copilot_loss.backward()
    assert all(p.grad is None for p in model.pilot.parameters())
    copilot_grads = [p.grad for p in model.copilot.parameters()]
    assert all(g is not None for g in copilot_grads)
    assert any(g.abs().sum() > 0 for g in copilot_grads)


@pytest.mark.parametrize(
    ("error_form", "error_loss", "reads_the_weight"),
    [("linear", None, True), ("reweight", None, True), ("reweight", "squared_error", False)],
)
def test_a_training_pass_gives_the_same_copilot_loss_and_gradients_without_forming_f_c(
    error_form, error_loss, reads_the_weight
):
    """The linear head's squared error and the reweight head's cross-entropy read W_out's weight in a training
    pass; the reweight head on the squared error forms f_C. All match the explicit path a pass asking for f_C
    takes."""
    config = tiny_copilot_config(error_form=error_form, error_loss=error_loss)
    model = build_pilot_copilot("llama", copilot_config=config)
    model.double().train()
    batch = build_batch()

    def loss_and_gradients(**kwargs):
        model.zero_grad(set_to_none=True)
        out = model(**batch, **kwargs)
        out.loss.backward()
        return out, [p.grad.clone() for p in model.copilot.parameters()]

    training, gradients = loss_and_gradients()
    explicit, expected_gradients = loss_and_gradients(return_predicted_error=True)
    assert training.predicted_error is None
    assert explicit.predicted_error is not None
    assert model.copilot.computes_loss_without_output == reads_the_weight
    torch.testing.assert_close(training.copilot_loss, explicit.copilot_loss)
    torch.testing.assert_close(training.copilot_squared_error, explicit.copilot_squared_error)
    assert torch.equal(training.pilot_loss, explicit.pilot_loss)
    assert torch.equal(training.copilot_num_tokens, explicit.copilot_num_tokens)
    for got, expected in zip(gradients, expected_gradients, strict=True):
        torch.testing.assert_close(got, expected)
    with torch.no_grad():  # evaluation, and training-mode passes without gradients, still return f_C
        assert model(**batch).predicted_error is not None
    assert model.eval()(**batch).predicted_error is not None
    calls = []
    model.copilot.error_head.register_forward_hook(lambda *args: calls.append(1))
    assert not model.copilot.computes_loss_without_output  # a hooked head runs its forward
    model.train()(**batch).loss.backward()
    assert calls == [1]


@torch.no_grad()
def test_copilot_loss_is_the_rmse_over_loss_mask_positions(arch):
    model = build_pilot_copilot(arch, tiny_copilot_config(error_form="linear"))  # the paper's head and loss
    batch = build_batch()
    out = model(**batch, return_mistake_log=True)
    error = direct_errors(out.logits, batch["input_ids"], batch["attention_mask"])
    loss_mask = torch.zeros(batch["labels"].shape, dtype=torch.bool)
    loss_mask[:, :-1] = batch["labels"][:, 1:] != -100
    assert torch.equal(out.mistake_log_entry.loss_mask, loss_mask)
    squared = (out.predicted_error.float() - error).square().sum(-1)
    expected = squared[loss_mask].mean().sqrt()
    torch.testing.assert_close(out.copilot_loss, expected, rtol=1e-5, atol=1e-6)
    assert int(out.copilot_num_tokens) == int(loss_mask.sum())


def test_a_cross_entropy_copilot_loss_is_the_log_loss_of_the_observed_token_under_p_plus_f_c():
    """error_loss="cross_entropy" (the reweight form's default): copilot_loss is the mean over loss-mask positions
    of -log softmax(log p + W_out h)[y], with its gradients; the squared error is still reported for R^2."""
    model = build_pilot_copilot("llama", tiny_copilot_config(error_form="reweight"), copilot_std=0.1)
    model.double().train()
    batch = build_batch()
    out = model(**batch, return_mistake_log=True)
    out.copilot_loss.backward()
    gradients = [p.grad.clone() for p in model.copilot.parameters()]
    model.zero_grad(set_to_none=True)

    entry = out.mistake_log_entry
    stream = shift_right(model.copilot.embed_errors(entry.errors))
    head_input = model.copilot(
        stream, entry.x_tilde, entry.h_bar, entry.attention_mask, return_head_input=True
    )
    probs = out.logits.softmax(-1)
    log_fused = (probs.log() + model.copilot.error_head(head_input)).log_softmax(-1)
    loss_mask = entry.loss_mask
    targets = batch["input_ids"].roll(-1, dims=1)
    expected = -log_fused.gather(-1, targets.unsqueeze(-1)).squeeze(-1)[loss_mask].mean()
    expected.backward()
    torch.testing.assert_close(out.copilot_loss, expected.detach())
    torch.testing.assert_close(out.copilot_loss_sum, expected.detach() * loss_mask.sum())
    for got, want in zip(gradients, [p.grad for p in model.copilot.parameters()], strict=True):
        torch.testing.assert_close(got, want)

    error = direct_errors(out.logits, batch["input_ids"], batch["attention_mask"]).double()
    squared = (log_fused.exp() - probs - error).square().sum(-1)[loss_mask].sum()
    torch.testing.assert_close(out.copilot_squared_error, squared.detach())
    assert not out.copilot_squared_error.requires_grad  # a report, not what training minimises


def test_all_labels_masked_gives_a_zero_loss_and_a_warning(arch):
    model = build_pilot_copilot(arch)
    batch = build_batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    with pytest.warns(UserWarning, match="-100"):
        out = model(**batch)
    for loss in (out.loss, out.pilot_loss, out.copilot_loss):
        assert torch.isfinite(loss) and loss.item() == 0.0
    out.loss.backward()  # defined, and no NaN reaches the parameters
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --------------------------------------------------------------------------------------------------
# The Mistake Log entry (SPEC section 2)


@torch.no_grad()
def test_error_tensor_is_onehot_next_token_minus_pilot_probabilities(arch):
    model = build_pilot_copilot(arch)
    batch = build_batch()
    logits = model.pilot(**pilot_inputs(batch)).logits
    entry = model(**batch, return_mistake_log=True).mistake_log_entry
    error = entry.errors.dense()
    assert error.shape == (*batch["input_ids"].shape, VOCAB_SIZE)
    torch.testing.assert_close(error, direct_errors(logits, batch["input_ids"], batch["attention_mask"]))
    assert not error[:, -1].any()  # the last position has no next token
    assert not error[1, :3].any()  # row 1 has 3 pad tokens: positions 0..2 have no real next token
    assert error[1, 3].any() and error[0, 0].any()
    assert not entry.x_tilde.requires_grad and not entry.h_bar.requires_grad


@torch.no_grad()
def test_error_tensor_is_zero_at_right_padding(arch):
    model = build_pilot_copilot(arch)
    batch = build_batch(left_padding=())
    batch["attention_mask"][1, -3:] = 0
    batch["labels"][1, -3:] = -100
    logits = model.pilot(**pilot_inputs(batch)).logits
    error = model(**batch, return_mistake_log=True).mistake_log_entry.errors.dense()
    torch.testing.assert_close(error, direct_errors(logits, batch["input_ids"], batch["attention_mask"]))
    assert not error[1, -4:].any() and error[1, -5].any()


@torch.no_grad()
def test_memory_is_the_embedding_output_and_the_layer_mean(arch):
    model = build_pilot_copilot(arch)
    batch = build_batch()
    hidden_states = model.pilot(**pilot_inputs(batch), output_hidden_states=True).hidden_states
    entry = model(**batch, return_mistake_log=True).mistake_log_entry
    assert torch.equal(entry.x_tilde, hidden_states[0])
    torch.testing.assert_close(entry.h_bar, torch.stack(hidden_states[1:]).mean(0))


# --------------------------------------------------------------------------------------------------
# Causality of the Copilot (SPEC section 3)


def random_copilot_inputs(model, batch_size=2, seq_len=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pilot_hidden = model.copilot.config.pilot_hidden_size
    x_tilde = torch.randn(batch_size, seq_len, pilot_hidden, generator=generator)
    h_bar = torch.randn(batch_size, seq_len, pilot_hidden, generator=generator)
    probs = torch.randn(batch_size, seq_len, VOCAB_SIZE, generator=generator).mul(3).softmax(-1)
    targets = torch.randint(0, VOCAB_SIZE, (batch_size, seq_len), generator=generator)
    mask = torch.ones(batch_size, seq_len, dtype=torch.bool)
    mask[:, -1] = False
    return x_tilde, h_bar, PilotErrors(targets, mask, VOCAB_SIZE, probs=probs)


def copilot_output(model, x_tilde, h_bar, errors):
    stream = shift_right(model.copilot.embed_errors(errors))
    mask = torch.ones(x_tilde.shape[:2], dtype=torch.long)
    return model.copilot(stream, x_tilde, h_bar, mask, pilot_errors=errors)


def perturbed_from(tensor: torch.Tensor, start: int) -> torch.Tensor:
    changed = tensor.clone()
    changed[:, start:] += torch.randn(changed[:, start:].shape, generator=torch.Generator().manual_seed(1))
    return changed


@pytest.mark.parametrize("position_encoding", ["none", "rope"])
@pytest.mark.parametrize("error_form", ["linear", "reweight"])
@pytest.mark.parametrize("copilot_hidden", [32, 16])  # 16: the memory is projected d_P -> d_C
@pytest.mark.parametrize("j", [0, 3, 5])
@torch.no_grad()
def test_copilot_output_at_j_ignores_everything_after_j(j, copilot_hidden, error_form, position_encoding):
    copilot_config = tiny_copilot_config(
        hidden_size=copilot_hidden, error_form=error_form, position_encoding=position_encoding
    )
    model = build_pilot_copilot("llama", copilot_config=copilot_config)
    x_tilde, h_bar, errors = random_copilot_inputs(model)
    reference = copilot_output(model, x_tilde, h_bar, errors)
    later_targets, later_probs = (errors.map_tensors(lambda t: t.clone()) for _ in range(2))
    later_targets.targets[:, j:] = (errors.targets[:, j:] + 1) % VOCAB_SIZE
    later_probs.probs[:, j + 1 :] = torch.randn(later_probs.probs[:, j + 1 :].shape).softmax(-1)
    changes = {
        "x_tilde": (perturbed_from(x_tilde, j + 1), h_bar, errors),
        "h_bar": (x_tilde, perturbed_from(h_bar, j + 1), errors),
        # e_j contains token j+1: position j must not see it (its stream holds e_{j-1}). The Pilot's own
        # p_j is known at position j (the reweight head corrects it), p_{j+1} is not.
        "targets": (x_tilde, h_bar, later_targets),
        "probs": (x_tilde, h_bar, later_probs),
    }
    for name, inputs in changes.items():
        changed = copilot_output(model, *inputs)
        assert torch.equal(changed[:, : j + 1], reference[:, : j + 1]), name
        if name == "probs" and error_form == "linear" and j + 2 == x_tilde.shape[1]:
            continue  # the last position has no error, so the linear head never reads its p
        assert not torch.allclose(changed[:, j + 1 :], reference[:, j + 1 :]), f"{name} changes nothing later"


def swap_first_two_positions(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[:, [1, 0, *range(2, tensor.shape[1])]]


@pytest.mark.parametrize("position_encoding", ["none", "rope"])
@torch.no_grad()
def test_only_a_rotary_copilot_knows_the_order_of_earlier_positions(position_encoding):
    """Without positions, attention sees a set: swapping positions 0 and 1 of every input (stream and memory)
    leaves f_C at the later positions as it was (two layers: only the first reads the stream's earlier
    positions, and it reads them as keys). Rotary positions make the order visible."""
    model = build_pilot_copilot("llama", tiny_copilot_config(position_encoding=position_encoding)).double()
    x_tilde, h_bar, errors = random_copilot_inputs(model)
    x_tilde, h_bar, errors = x_tilde.double(), h_bar.double(), errors.map_tensors(lambda t: t.clone())
    errors.probs = errors.probs.double()
    errors.mask[:, :2] = True
    reference = copilot_output(model, x_tilde, h_bar, errors)
    # The stream at j holds e_{j-1}: swapping the stream's positions 0 and 1 swaps e_{-1} (zero) and e_0.
    stream = swap_first_two_positions(shift_right(model.copilot.embed_errors(errors)))
    mask = torch.ones(x_tilde.shape[:2], dtype=torch.long)
    swapped = model.copilot(
        stream, swap_first_two_positions(x_tilde), swap_first_two_positions(h_bar), mask, pilot_errors=errors
    )
    same_later = torch.allclose(swapped[:, 2:], reference[:, 2:], atol=1e-12, rtol=0)
    assert same_later == (position_encoding == "none")


# LLaMA 3.1's rope scaling over a context of 64: with head_dim 8 at base 10000 the wavelengths are 6.3 (kept),
# 63 (blended), 628 and 6283 (slowed eightfold), so every branch of the rule is read.
LLAMA3_ROTARY_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize(
    "scaling",
    [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3_ROTARY_SCALING],
    ids=["none", "linear", "llama3"],
)
@torch.no_grad()
def test_rotary_positions_are_llamas(scaling):
    """The Copilot rotates queries and keys as LLaMA does, with LLaMA's rope scalings, so a LLaMA decoder's
    attention weights keep their meaning under copilot_init; position -1 (an encoder output) is not rotated."""
    head_dim, positions = 8, torch.tensor([-1, 0, 3, 4, 9, 40, 200])
    states = torch.randn(2, 3, len(positions), head_dim, generator=torch.Generator().manual_seed(0))
    for base in (10000.0, 500000.0):
        rope_parameters = {"rope_type": "default"} if scaling is None else dict(scaling)
        llama = LlamaConfig(
            hidden_size=3 * head_dim,
            num_attention_heads=3,
            rope_parameters=rope_parameters | {"rope_theta": base},
        )
        cos, sin = LlamaRotaryEmbedding(llama)(states, positions.clamp_min(0)[None])
        expected, _ = apply_rotary_pos_emb(states, states, cos, sin)
        cos, signed_sin = rotation_at(positions, head_dim, base, states.dtype, scaling)
        rotated = rotate(states, (cos, signed_sin))
        assert torch.allclose(rotated, expected, atol=1e-5, rtol=0), base
        # At the same angles, the roll against the signed sin is LLaMA's rotate-half formula to the bit.
        sin = torch.cat([-signed_sin[:, : head_dim // 2], signed_sin[:, head_dim // 2 :]], dim=-1)
        assert torch.equal(rotated, apply_rotary_pos_emb(states, states, cos[None], sin[None])[0])
        assert torch.equal(rotated[:, :, 0], states[:, :, 0])
        if scaling is not None:  # the scaling is read: unscaled angles differ
            unscaled = rotate(states, rotation_at(positions, head_dim, base, states.dtype))
            assert not torch.allclose(unscaled, expected, atol=1e-3, rtol=0), base


@torch.no_grad()
def test_rotary_rows_are_looked_up_in_a_table_of_rotation_at():
    """The Copilot looks its rotary angles up in a table grown by doubling: the rows are `rotation_at`'s, past the
    table's first capacity too, position -1 reads position 0's (no rotation), and an edited base rebuilds it."""
    copilot = build_pilot_copilot("llama", tiny_copilot_config(position_encoding="rope")).copilot
    head_dim, base = copilot.config.head_dim, copilot.config.rotary_base
    for positions in (torch.tensor([-1, 0, 5]), torch.arange(150), torch.tensor([3, 400])):
        rotations = copilot.positions(positions, positions, torch.float64, int(positions.max()) + 1).rotations
        expected = rotation_at(positions, head_dim, base, torch.float64)
        for got in rotations:
            for table_rows, computed in zip(got, expected, strict=True):
                assert table_rows.dtype == torch.float64
                torch.testing.assert_close(table_rows, computed, rtol=0, atol=1e-6)
    # A rotary base edited after a forward (as copilot_init sets it) is read, not the table built before.
    copilot.config.rotary_base = 500000.0
    positions = torch.tensor([3, 7])
    cos, sin = copilot.positions(positions, positions, torch.float32, 8).rotations[0]
    expected_cos, expected_sin = rotation_at(positions, head_dim, 500000.0, torch.float32)
    torch.testing.assert_close(cos, expected_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, expected_sin, rtol=0, atol=1e-6)
    # So is a rope scaling set after it, and one edited in place.
    copilot.config.rotary_scaling = {"rope_type": "linear", "factor": 2.0}
    for factor in (2.0, 8.0):
        copilot.config.rotary_scaling["factor"] = factor
        cos, sin = copilot.positions(positions, positions, torch.float32, 8).rotations[0]
        expected = rotation_at(positions, head_dim, 500000.0, torch.float32, copilot.config.rotary_scaling)
        torch.testing.assert_close((cos, sin), expected, rtol=0, atol=1e-6)


@torch.no_grad()
def test_copilot_output_at_j_sees_position_j_of_the_memory_and_the_previous_error():
    """The counterpart of the causality test: the mask is not so strict that it hides the present."""
    model = build_pilot_copilot("llama")
    x_tilde, h_bar, errors = random_copilot_inputs(model)
    reference = copilot_output(model, x_tilde, h_bar, errors)
    j = 3
    earlier_errors = errors.map_tensors(lambda t: t.clone())
    earlier_errors.targets[:, j - 1] = (errors.targets[:, j - 1] + 1) % VOCAB_SIZE
    for inputs in (
        (perturbed_from(x_tilde, j), h_bar, errors),
        (x_tilde, perturbed_from(h_bar, j), errors),
        (x_tilde, h_bar, earlier_errors),
    ):
        changed = copilot_output(model, *inputs)
        assert torch.equal(changed[:, :j], reference[:, :j])
        assert not torch.allclose(changed[:, j], reference[:, j])


@torch.no_grad()
def test_changing_token_k_changes_no_copilot_output_before_k(arch):
    model = build_pilot_copilot(arch)
    input_ids = build_batch(left_padding=())["input_ids"]
    k = 5
    changed_ids = input_ids.clone()
    changed_ids[:, k] = FIRST_REGULAR_TOKEN + (input_ids[:, k] - FIRST_REGULAR_TOKEN + 1) % (
        VOCAB_SIZE - FIRST_REGULAR_TOKEN
    )
    reference, changed = model(input_ids).predicted_error, model(changed_ids).predicted_error
    torch.testing.assert_close(changed[:, :k], reference[:, :k], rtol=0, atol=1e-6)
    assert not torch.allclose(changed[:, k], reference[:, k])


# --------------------------------------------------------------------------------------------------
# Wrapping leaves the Pilot as it was (SPEC section 6)


@torch.no_grad()
def test_wrapping_does_not_change_the_pilot(arch):
    pilot = build_pilot(arch)
    batch = build_batch()
    before = pilot(**pilot_inputs(batch)).logits
    attn_before = pilot.config._attn_implementation
    model = build_pilot_copilot(pilot)
    assert model.pilot is pilot
    assert pilot.config._attn_implementation == attn_before
    assert torch.equal(pilot(**pilot_inputs(batch)).logits, before)
    assert torch.equal(model(**pilot_inputs(batch)).logits, before)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@torch.no_grad()
def test_wrapping_keeps_the_pilots_attention_implementation(attn_implementation):
    pilot = LlamaForCausalLM._from_config(tiny_pilot_config("llama"), attn_implementation=attn_implementation)
    model = build_pilot_copilot(pilot)
    assert model.pilot.config._attn_implementation == attn_implementation
    assert model.config.text_config._attn_implementation == attn_implementation


def assert_pilot_is_causal(model, input_ids):
    k = 4
    changed_ids = input_ids.clone()
    changed_ids[:, k] = (input_ids[:, k] + 1) % VOCAB_SIZE
    reference, changed = model(input_ids).logits, model(changed_ids).logits
    torch.testing.assert_close(changed[:, :k], reference[:, :k], rtol=0, atol=1e-6)
    assert not torch.allclose(changed[:, k], reference[:, k])


@torch.no_grad()
def test_wrapped_pilot_is_still_causal(arch):
    input_ids = build_batch(left_padding=())["input_ids"]
    model = build_pilot_copilot(arch)
    assert_pilot_is_causal(model, input_ids)
    assert_pilot_is_causal(model.pilot, input_ids)


@torch.no_grad()
def test_a_pilot_built_from_the_wrappers_config_is_causal():
    """The 5.24 trap: a nested config whose attention implementation is None loses the causal mask."""
    pilot_config = LlamaConfig(**tiny_pilot_config("llama").to_dict())
    config = PilotCopilotConfig(text_config=pilot_config, copilot_config=tiny_copilot_config())
    model = PilotCopilotForCausalLM(config).eval()
    assert model.pilot.config._attn_implementation is not None
    assert_pilot_is_causal(model, build_batch(left_padding=())["input_ids"])


# --------------------------------------------------------------------------------------------------
# Padding


@torch.no_grad()
def test_left_padding_gives_the_unpadded_copilot_outputs_on_real_positions(arch):
    model = build_pilot_copilot(arch)
    batch = build_batch(batch_size=2, left_padding=(0, 3))
    out = model(**pilot_inputs(batch), position_ids=padded_position_ids(batch["attention_mask"]))
    for row, pad in ((0, 0), (1, 3)):
        alone = model(batch["input_ids"][row : row + 1, pad:])
        torch.testing.assert_close(out.logits[row, pad:], alone.logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            out.predicted_error[row, pad:], alone.predicted_error[0], rtol=1e-5, atol=1e-5
        )
        assert torch.isfinite(out.predicted_error[row]).all()


# --------------------------------------------------------------------------------------------------
# copilot_init: a Copilot built from a pretrained decoder (SPEC section 3)

DECODERS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


ROTARY_BASE = {"llama": 10000.0, "qwen2": 1000000.0, "mistral": 500000.0, "qwen3": 1000000.0}
# Qwen3's heads are wider than hidden_size / num_attention_heads, as in Qwen3-0.6B (16 x 128 over 1024).
HEAD_DIM = {"qwen3": 16}
DECODER_SHAPE = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48
)


def build_decoder(
    family: str,
    vocab_size: int = VOCAB_SIZE,
    tie_word_embeddings: bool = False,
    rotary_scaling: dict | None = None,
):
    config_class, model_class = DECODERS[family]
    torch.manual_seed(7)
    config = config_class(
        rope_parameters={"rope_type": "default", **(rotary_scaling or {}), "rope_theta": ROTARY_BASE[family]},
        vocab_size=vocab_size,
        rms_norm_eps=1e-5,
        hidden_act="gelu",
        tie_word_embeddings=tie_word_embeddings,
        **DECODER_SHAPE,
        **({"head_dim": HEAD_DIM[family]} if family in HEAD_DIM else {}),
    )
    return model_class(config).eval()


def assert_copilot_copies_decoder(model, decoder):
    copilot, source = model.copilot, decoder.model
    # The token embeddings' directions at the std of a random W_in (error_proj_init_std).
    embedding, error_proj = source.embed_tokens.weight.t(), copilot.error_proj.weight
    torch.testing.assert_close(error_proj, embedding * (error_proj.norm() / embedding.norm()))
    assert error_proj.std() == pytest.approx(copilot.config.error_proj_init_std, rel=1e-5)
    # The LM head's directions, rescaled from logit scale to an initial ||f_C|| of about 0.1.
    head, lm_head = copilot.error_head.weight, decoder.lm_head.weight
    torch.testing.assert_close(head, lm_head * (head.norm() / lm_head.norm()))
    assert head.std() * head.numel() ** 0.5 == pytest.approx(INITIAL_ERROR_NORM, rel=1e-4)
    assert torch.equal(copilot.norm.weight, source.norm.weight)
    source_layers = dict(source.layers.named_parameters())
    copilot_layers = dict(copilot.layers.named_parameters())
    assert copilot_layers.keys() == source_layers.keys()
    for name, value in source_layers.items():
        assert torch.equal(copilot_layers[name], value), name


@pytest.mark.parametrize("tie_word_embeddings", [False, True])
@pytest.mark.parametrize("family", list(DECODERS))
@torch.no_grad()
def test_copilot_init_copies_a_pretrained_decoder(family, tie_word_embeddings):
    decoder = build_decoder(family, tie_word_embeddings=tie_word_embeddings)
    model = PilotCopilotForCausalLM.from_pilot(build_pilot("gpt2"), copilot_init=decoder)
    config = model.copilot.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 4)
    assert (config.num_key_value_heads, config.intermediate_size) == (2, 48)
    assert (config.hidden_act, config.rms_norm_eps) == ("gelu", 1e-5)
    assert config.rotary_base == ROTARY_BASE[family]
    assert (config.head_dim, config.qk_norm) == (HEAD_DIM.get(family, 8), family == "qwen3")
    assert config.rotary_scaling is None
    assert_copilot_copies_decoder(model, decoder)


@torch.no_grad()
def test_copilot_init_warns_of_a_rope_scaling_it_cannot_rotate_with():
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    decoder = build_decoder("qwen2", rotary_scaling=yarn)
    with pytest.warns(
        UserWarning, match=r"rope_type 'yarn' is not copied .* rotates at the plain rope_theta"
    ):
        model = PilotCopilotForCausalLM.from_pilot(build_pilot("llama"), copilot_init=decoder)
    assert model.copilot.config.rotary_scaling is None
    assert_copilot_copies_decoder(model, decoder)


@pytest.mark.parametrize(
    "family, rotary_scaling", [("qwen3", None), ("llama", LLAMA3_ROTARY_SCALING)], ids=["qwen3", "llama3"]
)
@torch.no_grad()
def test_a_copilot_initialised_from_a_decoder_computes_its_first_layer(family, rotary_scaling):
    """The Copilot's first layer (causal self-attention, MLP, their norms) computes what the decoder's first layer
    computes, at positions past where LLaMA 3's rope scaling slows the long wavelengths, and for Qwen3, which
    normalises each head's queries and keys and whose heads are wider than hidden_size / num_attention_heads."""
    decoder = build_decoder(family, rotary_scaling=rotary_scaling)
    copilot = PilotCopilotForCausalLM.from_pilot(build_pilot("llama"), copilot_init=decoder).copilot
    assert copilot.config.rotary_scaling == rotary_scaling
    hidden = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    at = torch.tensor([0, 1, 30, 60, 90])
    positions = copilot.positions(at, at.repeat_interleave(2), hidden.dtype, 91)
    masks = {"build": lambda keys_at, is_cross: build_attention_mask(at, keys_at, None, hidden.dtype)}
    ours = copilot.layers[0](hidden, None, positions, masks, None)
    rotation = decoder.model.rotary_emb(hidden, at.expand(2, -1))
    theirs = decoder.model.layers[0](hidden, position_embeddings=rotation)
    torch.testing.assert_close(ours, theirs)


@torch.no_grad()
def test_copilot_init_from_a_saved_decoder_path(tmp_path):
    decoder = build_decoder("qwen2")
    decoder.save_pretrained(tmp_path)
    model = PilotCopilotForCausalLM.from_pilot(build_pilot("llama"), copilot_init=str(tmp_path))
    assert_copilot_copies_decoder(model, decoder)


@torch.no_grad()
def test_copilot_init_keeps_the_embeddings_scale_when_error_proj_init_std_is_none():
    decoder = build_decoder("llama")
    copilot_config = copilot_config_like(decoder.config)
    copilot_config.error_proj_init_std = None
    model = PilotCopilotForCausalLM.from_pilot(build_pilot("llama"), copilot_config, copilot_init=decoder)
    assert torch.equal(model.copilot.error_proj.weight, decoder.model.embed_tokens.weight.t())


@pytest.mark.parametrize(
    "config_class, model_class, holds",
    [
        (
            Gemma3TextConfig,
            Gemma3ForCausalLM,
            ", whose layers also hold post_feedforward_layernorm.weight, pre_feedforward_layernorm.weight, "
            "self_attn.k_norm.weight, self_attn.q_norm.weight",
        ),
        (GemmaConfig, GemmaForCausalLM, ""),  # LLaMA's names, but its norms scale by 1 + their weight
    ],
)
def test_copilot_init_refuses_a_decoder_whose_layers_compute_otherwise(config_class, model_class, holds):
    """Copying by name would put Gemma's weights in layers that compute something else."""
    config = config_class(vocab_size=VOCAB_SIZE, head_dim=8, **DECODER_SHAPE)
    model_type = config.model_type
    with pytest.raises(
        ValueError, match=rf"\(model type '{model_type}'{holds}\) is not one.*leave copilot_init out"
    ):
        PilotCopilotForCausalLM.from_pilot(build_pilot("llama"), copilot_init=model_class(config))


@torch.no_grad()
def test_copilot_init_names_the_weights_it_cannot_copy():
    """A Copilot config whose heads are wider than the decoder's has attention projections of another shape: they
    keep the Copilot's random initialisation, and the warning says so."""
    decoder = build_decoder("llama")
    copilot_config = copilot_config_like(decoder.config)
    copilot_config.attention_head_dim = 16
    with pytest.warns(UserWarning, match=r"copied 13 of .* 8 keep their random initialisation.*q_proj"):
        model = PilotCopilotForCausalLM.from_pilot(build_pilot("llama"), copilot_config, copilot_init=decoder)
    layer, source = model.copilot.layers[1], decoder.model.layers[1]
    assert torch.equal(layer.mlp.down_proj.weight, source.mlp.down_proj.weight)
    assert layer.self_attn.q_proj.weight.shape != source.self_attn.q_proj.weight.shape


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@torch.no_grad()
def test_copilot_init_with_a_copilot_config_takes_the_decoders_query_and_key_norms_unless_set(family):
    """Left unset in a config given with copilot_init, `qk_norm` is the decoder's (not observed feedback's default),
    so every layer weight is copied; set, it is kept, and the weights the decoder lacks are named."""
    decoder = build_decoder(family)
    copilot_config = copilot_config_like(decoder.config)
    copilot_config.qk_norm = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = PilotCopilotForCausalLM.from_pilot(build_pilot("llama"), copilot_config, copilot_init=decoder)
    assert model.copilot.config.qk_norm is (family == "qwen3")
    assert_copilot_copies_decoder(model, decoder)
    if family == "llama":
        copilot_config.qk_norm = True
        with pytest.warns(UserWarning, match=r"4 keep their random initialisation.*q_norm"):
            model = PilotCopilotForCausalLM.from_pilot(
                build_pilot("llama"), copilot_config, copilot_init=decoder
            )
        assert model.copilot.config.qk_norm is True


def test_copilot_init_with_another_vocabulary_raises():
    with pytest.raises(ValueError, match="vocabulary"):
        PilotCopilotForCausalLM.from_pilot(
            build_pilot("llama"), copilot_init=build_decoder("llama", vocab_size=80)
        )


# --------------------------------------------------------------------------------------------------
# Fused scores under teacher forcing (SPEC section 6)


@pytest.mark.parametrize("fusion", ["probs", "logits"])
@pytest.mark.parametrize("copilot_lambda", [0.3, 3.0])
@torch.no_grad()
def test_fused_logits_are_fuse_scores_of_the_two_models(arch, fusion, copilot_lambda):
    model = build_pilot_copilot(arch)
    batch = build_batch()
    out = model(**pilot_inputs(batch), return_fused=True, copilot_lambda=copilot_lambda, fusion=fusion)
    expected = fuse_scores(out.logits, out.predicted_error, copilot_lambda, fusion)
    assert torch.equal(out.fused_logits, expected)
    assert not torch.allclose(
        out.fused_logits, out.logits.log_softmax(-1) if fusion == "probs" else out.logits
    )


@torch.no_grad()
def test_fused_logits_follow_the_config_without_overrides():
    model = build_pilot_copilot("llama", copilot_lambda=0.5, fusion="logits")
    out = model(**pilot_inputs(build_batch()), return_fused=True)
    assert torch.equal(out.fused_logits, out.logits + 0.5 * out.predicted_error)


@pytest.mark.parametrize("fusion", ["probs", "logits"])
@torch.no_grad()
def test_fused_logits_with_lambda_zero_are_the_pilot_logits(arch, fusion):
    model = build_pilot_copilot(arch)
    out = model(**pilot_inputs(build_batch()), return_fused=True, copilot_lambda=0.0, fusion=fusion)
    assert torch.equal(out.fused_logits, model.pilot(**pilot_inputs(build_batch())).logits)


@pytest.mark.parametrize(
    ("tied", "token_embedding"), [(False, False), (True, False), (False, True), (False, "gain")]
)
def test_resize_token_embeddings_resizes_the_pilot_and_the_copilot_together(tmp_path, tied, token_embedding):
    pilot = build_pilot("llama", tie_word_embeddings=tied)
    model = build_pilot_copilot(pilot, tiny_copilot_config(token_embedding=token_embedding))
    vocab = model.config.text_config.vocab_size
    old_in, old_out = model.copilot.error_proj.weight.clone(), model.copilot.error_head.weight.clone()
    old_tokens = model.copilot.token_embedding.weight.clone() if token_embedding else None
    gains = model.copilot.token_embedding if token_embedding == "gain" else None
    embeddings = model.resize_token_embeddings(vocab + 5)
    if gains is not None:  # the gains read W_in's columns, which follow the vocabulary themselves
        assert model.copilot.token_embedding is gains and torch.equal(gains.weight, old_tokens)
    elif token_embedding:  # kept tokens keep their rows; a new token starts with no term
        assert model.copilot.token_embedding.weight.shape == (vocab + 5, old_tokens.shape[1])
        assert torch.equal(model.copilot.token_embedding.weight[:vocab], old_tokens)
        assert not model.copilot.token_embedding.weight[vocab:].any()
    assert embeddings.weight.shape[0] == vocab + 5
    assert model.pilot.get_output_embeddings().weight.shape[0] == vocab + 5
    assert model.copilot.error_proj.weight.shape == (old_in.shape[0], vocab + 5)
    assert model.copilot.error_head.weight.shape == (vocab + 5, old_out.shape[1])
    assert torch.equal(model.copilot.error_proj.weight[:, :vocab], old_in)
    assert torch.equal(model.copilot.error_proj.weight[:, vocab:], old_in.mean(1, keepdim=True).expand(-1, 5))
    assert torch.equal(model.copilot.error_head.weight[:vocab], old_out)
    assert not model.copilot.error_head.weight[vocab:].any()  # no correction for a new token yet
    assert model.config.text_config.vocab_size == model.config.copilot_config.vocab_size == vocab + 5
    batch = build_batch(seed=3)
    batch["input_ids"][0, -1] = vocab + 4  # a new token
    out = model(**batch, return_fused=True)
    assert out.predicted_error.shape[-1] == out.fused_logits.shape[-1] == vocab + 5
    out.loss.backward()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    again = reloaded(**inputs, return_fused=True)
    assert torch.allclose(again.fused_logits, model.eval()(**inputs, return_fused=True).fused_logits)
    model.resize_token_embeddings(vocab - 2)  # shrinking keeps the first tokens' weights
    assert torch.equal(model.copilot.error_head.weight, old_out[: vocab - 2])


@pytest.mark.parametrize("token_embedding", [True, "gain"])
def test_a_token_embedding_starts_at_zero_and_adds_each_errors_token_to_its_row(token_embedding):
    """`token_embedding`: the row of error e_j is W_in e_j + E[x_{j+1}] (zero where position j has no real next
    token), E[x] a learnt table's row or learnt gains on W_in's column, g * W_in[:, x]. E starts at zero, so a new
    Copilot computes what the same Copilot without it computes, and it learns."""
    batch = build_batch()  # row 1 left-padded
    torch.manual_seed(0)
    model = PilotCopilotForCausalLM.from_pilot(
        build_pilot("llama"), tiny_copilot_config(token_embedding=token_embedding)
    )
    plain = PilotCopilotForCausalLM.from_pilot(
        build_pilot("llama"), tiny_copilot_config(token_embedding=False)
    )
    assert not model.copilot.token_embedding.weight.any()
    missing = plain.load_state_dict(model.state_dict(), strict=False)
    assert missing.unexpected_keys == ["copilot.token_embedding.weight"] and not missing.missing_keys
    out, plain_out = (m(**batch, return_predicted_error=True) for m in (model, plain))
    assert torch.equal(out.loss, plain_out.loss)
    assert torch.equal(out.predicted_error, plain_out.predicted_error)
    out.loss.backward()
    if token_embedding == "gain":
        assert model.copilot.token_embedding.weight.grad.abs().min() > 0
    else:
        learnt = model.copilot.token_embedding.weight.grad.abs().sum(-1) > 0
        # Every token read before the last position (whose output has no loss) gets a gradient.
        assert learnt[batch["input_ids"][:, 1:-1][batch["attention_mask"][:, :-2].bool()]].all()

    with torch.no_grad():
        model.copilot.token_embedding.weight.normal_(generator=torch.Generator().manual_seed(1))
        assert model.copilot.token_embedding.weight.any()
        entry = model(**batch, return_mistake_log=True).mistake_log_entry
        rows = model.copilot.embed_errors(entry.errors)
    copilot, real = model.copilot, batch["attention_mask"].bool()
    for row in range(2):
        for j in range(batch["input_ids"].shape[1]):
            if j + 1 < real.shape[1] and real[row, j] and real[row, j + 1]:
                token = batch["input_ids"][row, j + 1]
                error = F.one_hot(token, VOCAB_SIZE).float() - entry.errors.probs[row, j]
                expected = copilot.error_proj(error) + token_term(copilot, token)
            else:
                expected = torch.zeros(copilot.config.hidden_size)
            torch.testing.assert_close(rows[row, j], expected, rtol=1e-5, atol=1e-5)


def test_initial_error_norm_starts_the_copilot_near_no_correction():
    batch = build_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    real = batch["attention_mask"].bool()
    for norm in (0.1, 0.01):
        torch.manual_seed(0)
        model = PilotCopilotForCausalLM.from_pilot(
            build_pilot("llama"), tiny_copilot_config(initial_error_norm=norm, error_form="linear")
        )
        with torch.no_grad():
            predicted = model(**inputs).predicted_error.norm(dim=-1)[real]
        assert predicted.mean().item() == pytest.approx(norm, rel=0.15)
    torch.manual_seed(0)  # the default: W_out at initializer_range like every other weight
    model = PilotCopilotForCausalLM.from_pilot(build_pilot("llama"), tiny_copilot_config())
    assert model.copilot.error_head.weight.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize(
    ("setting", "std"),
    [({}, 1.0), ({"error_proj_init_std": 0.3}, 0.3), ({"error_proj_init_std": None}, 0.02)],
)
def test_error_proj_init_std_sets_the_scale_of_the_error_stream_only(setting, std):
    """Default 1: the error stream enters at unit scale; None: W_in at initializer_range like the rest."""
    torch.manual_seed(0)
    model = PilotCopilotForCausalLM.from_pilot(build_pilot("llama"), tiny_copilot_config(**setting))
    copilot = model.copilot
    assert copilot.error_proj.weight.std().item() == pytest.approx(std, rel=0.05)
    assert copilot.error_head.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert copilot.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    # The stream a position reads is W_in e_{j-1}: its per-coordinate scale is std * ||e||.
    entry = model(**build_batch(), return_mistake_log=True).mistake_log_entry
    error_norm = entry.errors.dense().norm(dim=-1)
    has_error = error_norm > 0  # not padding, not the last position
    stream_norm = copilot.embed_errors(entry.errors).norm(dim=-1)
    ratio = stream_norm[has_error] / (error_norm[has_error] * copilot.config.hidden_size**0.5)
    assert ratio.mean().item() == pytest.approx(std, rel=0.15)


@torch.no_grad()
def test_reweight_error_form_moves_the_pilots_own_probability_mass():
    """error_form="reweight": f_C = softmax(log p + W_out h) - p, so p + f_C is a distribution, and a zero head
    predicts no correction."""
    batch = build_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model = build_pilot_copilot("llama", tiny_copilot_config(error_form="reweight"), copilot_std=0.1)
    out = model(**inputs, return_mistake_log=True)
    probs = out.mistake_log_entry.errors.probs.double()
    model.copilot.config.error_form = "linear"  # the same network's raw head output, W_out h
    head_output = model(**inputs).predicted_error.double()
    reweighted = probs * head_output.exp()
    expected = reweighted / reweighted.sum(-1, keepdim=True) - probs
    torch.testing.assert_close(out.predicted_error.double(), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(out.predicted_error, torch.zeros_like(out.predicted_error), atol=1e-3)
    torch.testing.assert_close((probs + out.predicted_error).sum(-1), torch.ones_like(probs[..., 0]))

    model.copilot.config.error_form = "reweight"
    model.copilot.error_head.weight.zero_()
    torch.testing.assert_close(model(**inputs).predicted_error, torch.zeros_like(out.predicted_error))
    copilot_inputs = random_copilot_inputs(model)
    with pytest.raises(ValueError, match="error_form='reweight' needs the Pilot's errors"):
        model.copilot(model.copilot.embed_errors(copilot_inputs[2]), *copilot_inputs[:2])


@torch.no_grad()
def test_a_reweight_head_reads_a_compact_entry_with_its_remaining_mass_spread():
    """Log rows keep the Pilot's top k: the reweight head reads the rest of the mass spread over the other
    tokens, exactly as from a dense entry holding that spread distribution (same stream, same memory)."""
    model = build_pilot_copilot("llama", tiny_copilot_config(error_form="reweight"), copilot_std=0.1)
    x_tilde, h_bar, errors = random_copilot_inputs(model)
    compact = errors.compact(8)
    spread = PilotErrors(errors.targets, errors.mask, VOCAB_SIZE, probs=compact.probabilities_spread())
    stream = shift_right(model.copilot.embed_errors(compact))
    mask = torch.ones(x_tilde.shape[:2], dtype=torch.long)
    got = model.copilot(stream, x_tilde, h_bar, mask, pilot_errors=compact)
    torch.testing.assert_close(got, model.copilot(stream, x_tilde, h_bar, mask, pilot_errors=spread))
    assert (compact.probabilities() == 0).any() and (compact.probabilities_spread() > 0).all()


@pytest.mark.parametrize("norm", [None, "memory_norm", "projected_memory_norm"])
@torch.no_grad()
def test_a_memory_norm_reads_every_pilot_state_at_the_same_scale(norm):
    """With `memory_norm` each of the Pilot's states enters the Copilot's memory RMS-normalised, with
    `projected_memory_norm` each projected entry: either way scaling the input embeddings (often far smaller than
    the layer-mean states) leaves f_C as it was."""
    norms = {"memory_norm": norm == "memory_norm", "projected_memory_norm": norm == "projected_memory_norm"}
    config = tiny_copilot_config(**norms, rms_norm_eps=1e-12)  # so the scale is all that differs
    model = build_pilot_copilot("llama", config).double()
    x_tilde, h_bar, errors = random_copilot_inputs(model)
    x_tilde, h_bar, errors = x_tilde.double(), h_bar.double(), errors.map_tensors(lambda t: t.clone())
    errors.probs = errors.probs.double()
    reference = copilot_output(model, x_tilde, h_bar, errors)
    scaled = copilot_output(model, 0.05 * x_tilde, h_bar, errors)
    assert torch.allclose(scaled, reference, atol=1e-5, rtol=0) == (norm is not None)  # norms run in float32


# --------------------------------------------------------------------------------------------------
# The RMSNorm's written-out backward


class DispatchedOperators(TorchDispatchMode):
    """The names of the aten operators dispatched inside it, in order."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# a layer's stream; queries per head. The memory norm's input, the Pilot's states, needs no gradient.
@pytest.mark.parametrize("shape", [(3, 5, 16), (3, 2, 5, 8)])
@pytest.mark.parametrize("input_needs_grad", [True, False])
def test_the_rms_norm_gives_autograds_values_and_gradients(shape, input_needs_grad):
    torch.manual_seed(0)
    norm = CopilotRMSNorm(shape[-1], 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1]))
    hidden = torch.randn(shape, requires_grad=input_needs_grad)
    upstream = torch.randn(shape)
    written_out = norm(hidden)
    assert type(written_out.grad_fn).__name__ == "_RMSNormFunctionBackward"
    recorded = norm.through_autograd(hidden)
    assert torch.equal(written_out, recorded)
    inputs = (hidden, norm.weight) if input_needs_grad else (norm.weight,)
    for ours, autograds in zip(
        torch.autograd.grad(written_out, inputs, upstream),
        torch.autograd.grad(recorded, inputs, upstream),
        strict=True,
    ):
        torch.testing.assert_close(ours, autograds, rtol=1e-5, atol=1e-6)
    if not input_needs_grad:  # nothing computed for an input that asks for none
        assert written_out.grad_fn.needs_input_grad[0] is False


def test_the_rms_norms_backward_dispatches_11_operators_where_autograds_dispatches_19():
    norm = CopilotRMSNorm(16, 1e-6)
    hidden = torch.randn(4, 5, 16, requires_grad=True)
    upstream = torch.randn(4, 5, 16)
    counts = {}
    for name, output in (
        ("written out", norm(hidden)),
        ("autograd", norm.through_autograd(hidden)),
    ):
        with DispatchedOperators() as dispatched:
            output.backward(upstream)
        counts[name] = dispatched.names
    # the weight's gradient, the input's, and the two accumulations into .grad
    assert counts["written out"] == [
        "mul",
        "view",
        "sum",
        "mul",
        "mul",
        "mean",
        "mul",
        "sub",
        "mul_",
        "detach",
        "detach",
    ]
    assert len(counts["autograd"]) == 19


def test_the_rms_norms_backward_passes_gradcheck_and_refuses_a_second_derivative():
    torch.manual_seed(0)
    hidden = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, w: _RMSNormFunction.apply(h, w, 1e-6), (hidden, weight))
    output = _RMSNormFunction.apply(hidden, weight, 1e-6)
    # a gradient with a graph of its own, as in a gradient penalty
    upstream = torch.ones_like(output, requires_grad=True)
    (gradient,) = torch.autograd.grad(output, hidden, upstream, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gradient.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rms_norm_without_gradients_or_in_low_precision_runs_llamas_operators(dtype, monkeypatch):
    """generate() runs without gradients, and bf16 goes through LLaMA's casts to fp32 and back: neither takes the
    written-out function."""
    applied = []
    apply = _RMSNormFunction.apply
    monkeypatch.setattr(_RMSNormFunction, "apply", lambda *args: applied.append(args) or apply(*args))
    norm = CopilotRMSNorm(16, 1e-6).to(dtype)
    hidden = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    cast = [] if dtype == torch.float32 else ["_to_copy"]
    with torch.no_grad(), DispatchedOperators() as dispatched:
        norm(hidden)
    assert dispatched.names == [*cast, "pow", "mean", "add", "rsqrt", "mul", *cast, "mul"]
    recorded = norm(hidden)
    assert len(applied) == (dtype == torch.float32)  # with gradients, fp32 alone takes it
    if dtype != torch.float32:
        assert type(recorded.grad_fn).__name__ == "MulBackward0"


# --------------------------------------------------------------------------------------------------
# Training passes on CPU write the Pilot's probabilities into a reused buffer


def training_gradients(model, batch, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model(**batch).loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return gradients


def kept_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """p as the Pilot's loss keeps it: the exponential of its log-softmax."""
    return torch.log_softmax(logits.detach().float(), dim=-1).exp()


def test_a_training_pass_reuses_the_probability_buffer_once_nothing_holds_the_last_one():
    model = build_pilot_copilot().train()
    batch = build_batch()
    first = model(**batch, return_mistake_log=True)
    probs = first.mistake_log_entry.errors.probs
    assert torch.equal(probs, kept_probabilities(first.logits))
    buffer = model._pilot_probs_buffer._buffer
    assert probs.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    del first, probs
    second = model(**build_batch(seed=1), return_mistake_log=True)
    assert model._pilot_probs_buffer._buffer is buffer
    assert torch.equal(second.mistake_log_entry.errors.probs, kept_probabilities(second.logits))
    without_labels = model(**pilot_inputs(build_batch(seed=2)), return_mistake_log=True)
    assert torch.equal(
        without_labels.mistake_log_entry.errors.probs, torch.softmax(without_labels.logits.detach(), dim=-1)
    )


def test_an_entry_that_is_kept_is_never_overwritten_by_the_next_training_pass():
    model = build_pilot_copilot().train()
    kept = model(**build_batch(), return_mistake_log=True).mistake_log_entry
    expected = kept.errors.probs.clone()
    model(**build_batch(seed=1))
    assert torch.equal(kept.errors.probs, expected)


def test_a_graph_that_saved_the_probabilities_differentiates_the_same_after_the_next_training_pass():
    model = build_pilot_copilot().train()
    first_batch, second_batch = build_batch(), build_batch(seed=1)
    expected = training_gradients(model, first_batch, seed=0)
    torch.manual_seed(0)
    first = model(**first_batch)
    torch.manual_seed(1)
    model(**second_batch)  # before the first pass's backward, which reads the probabilities it saved
    first.loss.backward()
    for name, parameter in model.named_parameters():
        if name in expected:
            assert torch.equal(parameter.grad, expected[name]), name


def test_a_training_pass_writes_the_pilot_losss_gradient_into_a_reused_buffer_with_the_same_gradients():
    model = build_pilot_copilot().train()
    batch = build_batch()
    expected = training_gradients(model, batch, seed=0)
    buffer = model._pilot_gradient_buffer._buffer
    assert buffer is not None and buffer.numel() == batch["input_ids"].numel() * VOCAB_SIZE
    again = training_gradients(model, batch, seed=0)
    assert model._pilot_gradient_buffer._buffer is buffer
    model.pilot_gradient_buffer = lambda logits: None  # each gradient a new tensor
    new_tensors = training_gradients(model, batch, seed=0)
    for name, gradient in expected.items():
        assert torch.equal(again[name], gradient) and torch.equal(new_tensors[name], gradient), name


def test_a_logits_gradient_that_is_kept_is_never_overwritten_by_the_next_backward():
    model = build_pilot_copilot().train()
    first = model(**build_batch())
    kept = []
    first.logits.register_hook(kept.append)  # the very tensor the loss's backward returned
    first.loss.backward()
    expected = kept[0].clone()
    model(**build_batch(seed=1)).loss.backward()
    assert torch.equal(kept[0], expected)


def test_evaluation_passes_write_no_buffer_and_leaving_training_mode_frees_it():
    model = build_pilot_copilot().train()
    model(**build_batch()).loss.backward()
    buffers = (model._pilot_probs_buffer, model._pilot_gradient_buffer)
    assert all(buffer._buffer is not None for buffer in buffers)
    model.eval()
    assert all(buffer._buffer is None for buffer in buffers)
    model(**build_batch()).loss.backward()
    assert all(buffer._buffer is None for buffer in buffers)


# --------------------------------------------------------------------------------------------------
# A pass with labels takes the entry's probabilities from the Pilot's own loss


def test_a_pass_with_labels_takes_the_entrys_probabilities_from_the_pilots_loss(arch):
    """The Pilot's ForCausalLMLoss is stood in for during the pass (`CausalLMLossKeepingProbabilities`) and
    restored after it; the loss is the Pilot's own (test_pilot_loss_is_exactly_the_pilots_own_loss) and its
    gradient the same to rounding."""
    model = build_pilot_copilot(arch).eval()
    batch = build_batch()
    out = model(**batch, return_mistake_log=True)
    assert "_loss_function" not in vars(model.pilot)
    assert torch.equal(out.mistake_log_entry.errors.probs, kept_probabilities(out.logits))
    torch.testing.assert_close(
        out.mistake_log_entry.errors.probs, torch.softmax(out.logits.float(), dim=-1), rtol=1e-5, atol=1e-7
    )
    model.zero_grad()
    model(**batch).pilot_loss.backward()
    gradients = [p.grad.clone() for p in model.pilot.parameters()]
    model.zero_grad()
    model.pilot(**batch).loss.backward()
    for ours, stock in zip(gradients, (p.grad for p in model.pilot.parameters()), strict=True):
        torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-7)


def test_a_pilot_with_a_loss_function_of_its_own_keeps_it():
    model = build_pilot_copilot()
    batch = build_batch()

    def doubled_loss(logits, labels, vocab_size, **kwargs):
        return 2 * ForCausalLMLoss(logits, labels, vocab_size, **kwargs)

    model.pilot.loss_function = doubled_loss
    out = model(**batch, return_mistake_log=True)
    assert model.pilot.loss_function is doubled_loss
    assert torch.equal(out.pilot_loss, model.pilot(**batch).loss)
    assert torch.equal(out.pilot_loss, 2 * ForCausalLMLoss(out.logits, batch["labels"], VOCAB_SIZE))
    assert torch.equal(out.mistake_log_entry.errors.probs, torch.softmax(out.logits.detach(), dim=-1))


def test_the_pilots_loss_function_is_restored_when_its_pass_fails():
    model = build_pilot_copilot()
    batch = build_batch()
    batch["labels"] = batch["labels"].masked_fill(
        batch["labels"] != -100, VOCAB_SIZE + 5
    )  # outside the vocabulary
    with pytest.raises(IndexError):
        model(**batch)
    assert "_loss_function" not in vars(model.pilot)
