"""Encoder-decoder Pilots (SPEC section 8): `PilotCopilotForSeq2SeqLM` around T5 and BART.

The Pilots are tiny random T5 / BART models built from configs. Their weights are re-drawn with a larger std:
at the default init a random T5 repeats its decoder start token and a random BART stops at once, so no test
could tell the Copilot's effect from the Pilot's. As in test_generation.py, every fused test first checks that
the Copilot changes the output, and references recompute both models over the whole sequence at every step,
without any cache, in float64.
"""

from __future__ import annotations

import copy
import json
import math
import os
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    FIRST_REGULAR_TOKEN,
    PAD_TOKEN_ID,
    SEQ2SEQ_HUB_FILES,
    VOCAB_SIZE,
    assert_card_usage_prints_the_models_generation,
    build_pilot,
    build_pilot_copilot,
    char_tokenizer,
    graph_recorder,
    randomize_copilot,
    run_without_hf_copilot,
    tiny_copilot_config,
    token_term,
)
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors.torch import load_file
from transformers import (
    AutoModelForSeq2SeqLM,
    BartConfig,
    BartForConditionalGeneration,
    CompileConfig,
    PreTrainedModel,
    StaticCache,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_copilot import (
    CopilotConfig,
    MistakeLog,
    PilotCopilotForCausalLM,
    PilotCopilotForSeq2SeqLM,
    PilotCopilotSeq2SeqConfig,
    fuse_scores,
)
from hf_copilot.generation_pilot_copilot import (
    CACHE_KEYWORD,
    PilotCopilotEncoderDecoderCache,
    StaticCopilotKVCache,
)
from hf_copilot.mistake_log_entry import PilotErrors, shift_right

ARCHITECTURES = ("t5", "bart")
FUSION_SPACES = ("probs", "logits")
FEEDBACK_MODES = ("copilot", "observed")
NEW_TOKENS = 10
SPECIAL_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_PILOTS = {
    # T5 starts decoding from the pad token, BART from EOS; both as their released checkpoints do.
    "t5": (
        T5Config,
        T5ForConditionalGeneration,
        dict(
            d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0, decoder_start_token_id=0
        ),
    ),
    "bart": (
        BartConfig,
        BartForConditionalGeneration,
        dict(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
            dropout=0.0,
            decoder_start_token_id=2,
            forced_eos_token_id=None,
        ),
    ),
}


@torch.no_grad()
def build_seq2seq_pilot(arch: str, seed: int = 0) -> PreTrainedModel:
    config_class, model_class, kwargs = _PILOTS[arch]
    torch.manual_seed(seed)
    pilot = model_class(config_class(vocab_size=VOCAB_SIZE, **SPECIAL_TOKENS, **kwargs))
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in pilot.named_parameters():
        if (
            parameter.ndim == 2
        ):  # embeddings smaller, so the tied LM head does not just repeat the input token
            std = 0.2 if "shared" in name or "embed" in name else 0.5
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return pilot.eval()


@torch.no_grad()
def build_model(
    arch: str = "t5",
    copilot_std: float | None = 0.5,
    seed: int = 0,
    pilot=None,
    position_encoding: str = "none",
    error_form: str = "linear",
    token_embedding: bool | str = False,
    **fusion,
) -> PilotCopilotForSeq2SeqLM:
    """A tiny Pilot with a tiny encoder-decoder Copilot (2 layers, hidden 32), its Linear weights re-drawn with
    `copilot_std` so that it acts (as conftest's build_pilot_copilot does). The paper's linear head, as in
    test_generation.py: a reweight head re-drawn at std 0.5 reads log p, which entries keep in fp32, and in the
    paper's feedback mode feeds its output back, so fp32 rounding (1e-7) grows step over step (to 0.15 in ten
    steps of beam search against the float64 reference): a test of that chaos, not of the Copilot."""
    pilot = pilot if pilot is not None else build_seq2seq_pilot(arch, seed)
    copilot_config = tiny_copilot_config(
        position_encoding=position_encoding, error_form=error_form, token_embedding=token_embedding
    )
    model = PilotCopilotForSeq2SeqLM.from_pilot(pilot, copilot_config, **fusion)
    if copilot_std is not None:
        randomize_copilot(model, copilot_std, seed=seed + 1)
    return model.eval()


# W_out shrunk so that f_C is on the scale of the Pilot's probabilities: the random BART Pilot is the surer.
ERROR_HEAD_SCALE = {"t5": 0.01, "bart": 0.03}
# Logit-space fusion adds probability-scale errors to logits: it takes a larger lambda to change decisions.
LOGITS_LAMBDA = 30.0


@torch.no_grad()
def fused_model(arch: str = "t5", **fusion) -> PilotCopilotForSeq2SeqLM:
    """float64, no EOS (every sequence runs to max_new_tokens, as the references assume), f_C on the scale of
    the Pilot's probabilities so that both models matter and lambda and the fusion space change decisions."""
    model = build_model(arch, **fusion).double()
    if model.copilot.config.error_form == "linear":  # a reweight head's f_C is on that scale by construction
        model.copilot.error_head.weight.mul_(ERROR_HEAD_SCALE[arch])
    model.generation_config.eos_token_id = None
    return model


def source(batch_size: int = 1, length: int = 6, seed: int = 0, right_padding: tuple[int, ...] = ()):
    """Source tokens and mask, right-padded (`right_padding[i]` pads in row i) as T5/BART tokenizers pad."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(FIRST_REGULAR_TOKEN, VOCAB_SIZE, (batch_size, length), generator=generator)
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    for row, pad in enumerate(right_padding):
        if pad:
            input_ids[row, -pad:] = PAD_TOKEN_ID
            attention_mask[row, -pad:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def target_labels(batch_size: int = 2, length: int = 5, right_padding=(0, 2), seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(FIRST_REGULAR_TOKEN, VOCAB_SIZE, (batch_size, length), generator=generator)
    for row, pad in enumerate(right_padding):
        if pad:
            labels[row, -pad:] = -100
    return labels


def training_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    return {**source(2, 6, seed, right_padding=(0, 2)), "labels": target_labels(seed=seed + 1)}


def generate(model, inputs, seed: int | None = None, **kwargs) -> torch.Tensor:
    if seed is not None:
        torch.manual_seed(seed)
    kwargs.setdefault("max_new_tokens", NEW_TOKENS)
    return model.generate(**inputs, **kwargs)


def greedy(model, inputs, **kwargs) -> torch.Tensor:
    return generate(model, inputs, do_sample=False, **kwargs)


# --------------------------------------------------------------------------------------------------
# The slow reference: both models over the whole decoder sequence, no cache


@torch.no_grad()
def reference_step(model, inputs, sequence: torch.Tensor, feedback: str, prompt_length: int = 1):
    """The Pilot's logits and f_C at the last decoder position of `sequence`, from scratch.

    The Copilot's input at position j is W_in e_{j-1}, e_{j-1} = onehot(sequence[j]) - softmax(z_{j-1}), with
    e_{-1} = 0; in "copilot" mode a generated position j reads W_in f_C_{j-1} instead, fixed one position per pass.
    """
    out = model(**inputs, decoder_input_ids=sequence)
    probs = out.logits.double().softmax(-1)
    errors = torch.zeros_like(probs)
    errors[:, :-1] = F.one_hot(sequence[:, 1:], VOCAB_SIZE).double() - probs[:, :-1]
    stream = shift_right(
        errors.to(model.copilot.error_proj.weight.dtype) @ model.copilot.error_proj.weight.t()
    )
    # With a token term every position j > 0 also reads E[sequence[j]], in either mode.
    tokens = token_term(model.copilot, sequence[:, 1:])
    stream[:, 1:] += tokens
    hidden = model.pilot(**inputs, decoder_input_ids=sequence, output_hidden_states=True)
    x_tilde, h_bar = hidden.encoder_last_hidden_state, torch.stack(hidden.decoder_hidden_states[1:]).mean(0)
    mask = inputs["attention_mask"].bool()
    # The reweight head reads the Pilot's probabilities at every position (targets and mask play no part).
    unused = torch.zeros_like(sequence)
    pilot = PilotErrors(
        unused, unused.bool(), VOCAB_SIZE, probs=probs.to(model.copilot.error_proj.weight.dtype)
    )
    copilot_errors = model.copilot(stream, x_tilde, h_bar, encoder_attention_mask=mask, pilot_errors=pilot)
    if feedback == "copilot":
        for _ in range(sequence.shape[1] - prompt_length):
            own = model.copilot.embed_predicted_errors(copilot_errors[:, prompt_length - 1 : -1])
            own += tokens[:, prompt_length - 1 :]
            stream = torch.cat([stream[:, :prompt_length], own], dim=1)
            copilot_errors = model.copilot(
                stream, x_tilde, h_bar, encoder_attention_mask=mask, pilot_errors=pilot
            )
    return out.logits[:, -1], copilot_errors[:, -1]


def start_tokens(model, batch_size: int) -> torch.Tensor:
    return torch.full((batch_size, 1), model.generation_config.decoder_start_token_id)


def reference_greedy(model, inputs, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    config = model.config
    sequence = start_tokens(model, inputs["input_ids"].shape[0])
    for _ in range(new_tokens):
        logits, copilot_errors = reference_step(model, inputs, sequence, config.copilot_feedback)
        scores = fuse_scores(logits, copilot_errors, config.copilot_lambda, config.fusion)
        sequence = torch.cat([sequence, scores.argmax(-1, keepdim=True)], dim=1)
    return sequence


def reference_beam_search(model, inputs, num_beams: int, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    """HF beam search without EOS (see test_generation.py): the processors see log-probabilities."""
    config = model.config
    beams_inputs = {name: tensor.repeat(num_beams, 1) for name, tensor in inputs.items()}
    sequences = start_tokens(model, num_beams)
    scores = torch.full((num_beams,), -1e9, dtype=torch.float64)
    scores[0] = 0.0
    for _ in range(new_tokens):
        logits, copilot_errors = reference_step(model, beams_inputs, sequences, config.copilot_feedback)
        log_probs = fuse_scores(logits.log_softmax(-1), copilot_errors, config.copilot_lambda, config.fusion)
        scores, flat = (scores[:, None] + log_probs).flatten().topk(num_beams)
        beams, tokens = flat // log_probs.shape[-1], flat % log_probs.shape[-1]
        sequences = torch.cat([sequences[beams], tokens[:, None]], dim=1)
    return sequences


# --------------------------------------------------------------------------------------------------
# Losses and the Mistake Log entry


@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.no_grad()
def test_pilot_loss_is_exactly_the_pilots_own_loss(arch):
    model, batch = build_model(arch), training_batch()
    expected = model.pilot(**batch).loss
    out = model(**batch)
    assert torch.equal(out.pilot_loss, expected)
    assert torch.equal(out.loss, out.pilot_loss + out.copilot_loss)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.no_grad()
def test_pilot_loss_under_gradient_accumulation_is_normalised_by_the_whole_optimizer_batch(arch):
    """T5/BART average over their own micro-batch; with num_items_in_batch the micro-batches' losses add up to
    the Pilot's own loss over the whole batch, as Trainer's accumulation needs."""
    model = build_model(arch)
    first, second = training_batch(seed=0), training_batch(seed=5)
    num_items = (first["labels"] != -100).sum() + (second["labels"] != -100).sum()
    whole = {name: torch.cat([first[name], second[name]]) for name in first}
    accumulated = sum(model(**batch, num_items_in_batch=num_items).pilot_loss for batch in (first, second))
    torch.testing.assert_close(accumulated, model.pilot(**whole).loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_copilot_loss_backpropagates_into_no_pilot_parameter(arch):
    model = build_model(arch)
    model(**training_batch()).copilot_loss.backward()
    assert all(p.grad is None for p in model.pilot.parameters())
    assert all(p.grad is not None for p in model.copilot.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.copilot.parameters())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_training_pass_gives_the_same_copilot_loss_and_gradients_without_forming_f_c(arch):
    model, batch = build_model(arch).double().train(), training_batch()
    model.pilot.eval()  # no dropout: both passes see the same Pilot

    def loss_and_gradients(**kwargs):
        model.zero_grad(set_to_none=True)
        out = model(**batch, **kwargs)
        out.copilot_loss.backward()
        return out, [p.grad.clone() for p in model.copilot.parameters()]

    training, gradients = loss_and_gradients()
    explicit, expected_gradients = loss_and_gradients(return_predicted_error=True)
    assert training.predicted_error is None and explicit.predicted_error is not None
    torch.testing.assert_close(training.copilot_loss, explicit.copilot_loss)
    for got, expected in zip(gradients, expected_gradients, strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.no_grad()
def test_entry_is_the_encoder_output_the_decoder_layer_mean_and_the_error_against_the_labels(arch):
    model, batch = build_model(arch), training_batch()
    pilot = model.pilot(**batch, output_hidden_states=True)
    out = model(**batch, return_mistake_log=True)
    entry = out.mistake_log_entry
    assert torch.equal(entry.x_tilde, pilot.encoder_last_hidden_state)
    torch.testing.assert_close(entry.h_bar, torch.stack(pilot.decoder_hidden_states[1:]).mean(0))
    assert torch.equal(entry.encoder_attention_mask, batch["attention_mask"].bool())
    # Decoder position j predicts labels[j] (its input is labels[j-1]): error and loss where labels[j] != -100.
    labels = batch["labels"]
    known = labels != -100
    expected = F.one_hot(labels.clamp_min(0), VOCAB_SIZE).float() - pilot.logits.softmax(-1)
    torch.testing.assert_close(entry.errors.dense(), expected * known.unsqueeze(-1))
    assert torch.equal(entry.loss_mask, known) and not known.all()
    squared = (out.predicted_error - expected).square().sum(-1)
    torch.testing.assert_close(out.copilot_loss, squared[known].mean().sqrt())


# --------------------------------------------------------------------------------------------------
# The encoder-decoder Copilot: causal over decoder positions, every real source position visible


@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.no_grad()
def test_changing_decoder_position_k_changes_no_copilot_output_before_it(arch):
    """labels[k] is the target of position k and the input of position k+1: outputs up to k stay unchanged."""
    model, batch = build_model(arch), training_batch()
    reference = model(**batch).predicted_error
    for k in (1, 3):
        changed = {**batch, "labels": batch["labels"].clone()}
        changed["labels"][:, k:] = FIRST_REGULAR_TOKEN + (batch["labels"][:, k:].clamp_min(0) + 7) % 50
        out = model(**changed).predicted_error
        assert torch.equal(out[:, : k + 1], reference[:, : k + 1]), k
        assert not torch.allclose(out[:, k + 1], reference[:, k + 1]), k


@torch.no_grad()
def test_every_real_source_position_is_visible_to_every_decoder_position():
    model = build_model("t5")
    model.copilot.config.error_form = "linear"  # what attention sees, read straight off the head
    generator = torch.Generator().manual_seed(0)
    stream = torch.randn(2, 5, 32, generator=generator)
    x_tilde, h_bar = torch.randn(2, 7, 32, generator=generator), torch.randn(2, 5, 32, generator=generator)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, -3:] = False  # row 1: 3 source pads
    reference = model.copilot(stream, x_tilde, h_bar, encoder_attention_mask=mask)
    last_real = x_tilde.clone()
    last_real[:, 3] += 1.0  # the last source token of row 1 and a middle one of row 0
    changed = model.copilot(stream, last_real, h_bar, encoder_attention_mask=mask)
    assert not torch.isclose(changed, reference).all(-1).any()  # every position of both rows moved
    padded = x_tilde.clone()
    padded[1, -3:] += 100.0
    assert torch.equal(model.copilot(stream, padded, h_bar, encoder_attention_mask=mask)[1], reference[1])


def test_every_copilot_layer_self_attends_and_cross_attends():
    copilot = build_model("bart", copilot_std=None).copilot
    assert copilot.config.encoder_decoder and len(copilot.layers) == 2
    for layer in copilot.layers:
        assert {"self_attn", "cross_attn", "mlp"} <= dict(layer.named_children()).keys()
    with pytest.raises(StrictDataclassClassValidationError, match="even and >= 2"):
        CopilotConfig(num_hidden_layers=3)  # a decoder-only Pilot's Copilot alternates
    odd = CopilotConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, encoder_decoder=True)
    assert len(PilotCopilotForSeq2SeqLM.from_pilot(build_seq2seq_pilot("t5"), odd).copilot.layers) == 3


@torch.no_grad()
def test_copilot_init_copies_a_pretrained_decoder_into_all_but_the_cross_attention():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    decoder = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
        )
    )
    copilot = PilotCopilotForSeq2SeqLM.from_pilot(build_seq2seq_pilot("bart"), copilot_init=decoder).copilot
    assert copilot.config.encoder_decoder and copilot.config.intermediate_size == 48
    embedding = decoder.model.embed_tokens.weight.t()  # its directions, at a random W_in's std
    torch.testing.assert_close(
        copilot.error_proj.weight, embedding * (copilot.error_proj.weight.norm() / embedding.norm())
    )
    source_layers = dict(decoder.model.layers.named_parameters())
    for name, value in copilot.layers.named_parameters():
        if "cross_att" in name:  # the decoder has none: it keeps its own initialisation
            twin = source_layers.get(name.replace("cross_attn", "self_attn"))
            assert twin is None or not torch.equal(value, twin), name
        else:
            assert torch.equal(value, source_layers[name]), name


def build_t5_decoder(feed_forward_proj: str = "gated-gelu") -> T5ForConditionalGeneration:
    """A pretrained-family stand-in: T5 v1.1 / FLAN-T5 layout (gated-gelu, untied head), 2 decoder blocks."""
    torch.manual_seed(11)
    config = T5Config(
        vocab_size=VOCAB_SIZE,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=3,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj=feed_forward_proj,
        tie_word_embeddings=False,
        dropout_rate=0.0,
        **SPECIAL_TOKENS,
    )
    return T5ForConditionalGeneration(config).eval()


@torch.no_grad()
def test_copilot_init_from_a_t5_decoder_computes_its_attention_mlp_and_norms():
    """Every block of a T5 decoder lands in the Copilot layer of the same index and computes what it computed
    in T5: its (unscaled) attention weights, gated MLP and RMS norms, on the same inputs."""
    decoder = build_t5_decoder()
    copilot = PilotCopilotForSeq2SeqLM.from_pilot(build_seq2seq_pilot("t5"), copilot_init=decoder).copilot
    config = copilot.config
    assert config.encoder_decoder and (config.hidden_size, config.num_hidden_layers) == (32, 2)
    assert (config.num_attention_heads, config.intermediate_size, config.hidden_act) == (4, 48, "gelu_new")
    assert config.rms_norm_eps == decoder.config.layer_norm_epsilon
    generator = torch.Generator().manual_seed(3)
    x, source = torch.randn(2, 5, 32, generator=generator), torch.randn(2, 7, 32, generator=generator)
    no_mask = torch.zeros(1, 1, 5, 7)
    for layer, block in zip(copilot.layers, decoder.decoder.block, strict=True):
        keys, values = layer.cross_attn.project_keys_values(source, None)
        torch.testing.assert_close(
            layer.cross_attn(x, None, keys, values, no_mask),
            block.layer[1].EncDecAttention(x, key_value_states=source)[0],
        )
        torch.testing.assert_close(layer.mlp(x), block.layer[2].DenseReluDense(x))
        norms = (layer.input_layernorm, layer.cross_attention_layernorm, layer.post_attention_layernorm)
        for norm, t5_layer in zip(norms, block.layer, strict=True):
            torch.testing.assert_close(norm(x), t5_layer.layer_norm(x))
        t5_self = block.layer[0].SelfAttention
        for name in "kvo":
            assert torch.equal(getattr(layer.self_attn, f"{name}_proj").weight, getattr(t5_self, name).weight)
        torch.testing.assert_close(layer.self_attn.q_proj.weight, t5_self.q.weight * 8**0.5)
    assert torch.equal(copilot.norm.weight, decoder.decoder.final_layer_norm.weight)
    embedding = decoder.decoder.embed_tokens.weight.t()  # its directions, at a random W_in's std
    torch.testing.assert_close(
        copilot.error_proj.weight, embedding * (copilot.error_proj.weight.norm() / embedding.norm())
    )
    head = copilot.error_head.weight
    torch.testing.assert_close(head, decoder.lm_head.weight * (head.norm() / decoder.lm_head.weight.norm()))


@torch.no_grad()
def test_copilot_init_from_a_saved_t5_folder_and_a_relu_t5_keeps_the_copilots_own_mlp(tmp_path):
    decoder = build_t5_decoder("relu")
    decoder.save_pretrained(tmp_path)
    copilot = PilotCopilotForSeq2SeqLM.from_pilot(
        build_seq2seq_pilot("t5"), copilot_init=str(tmp_path)
    ).copilot
    block = decoder.decoder.block[1]
    assert torch.equal(copilot.layers[1].cross_attn.v_proj.weight, block.layer[1].EncDecAttention.v.weight)
    # T5 v1.0's MLP is relu(wi x), which the gated MLP cannot compute: none of it is copied.
    assert not torch.equal(copilot.layers[1].mlp.down_proj.weight, block.layer[2].DenseReluDense.wo.weight)


def test_the_causal_wrapper_refuses_a_t5_copilot_init():
    with pytest.raises(
        ValueError, match="T5 decoder .*PilotCopilotForSeq2SeqLM.*LLaMA, Qwen2, Qwen3 or Mistral"
    ):
        PilotCopilotForCausalLM.from_pilot(build_pilot("llama"), copilot_init=build_t5_decoder())


# --------------------------------------------------------------------------------------------------
# Wrapping, and the causal wrapper's refusal


@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.no_grad()
def test_wrapping_does_not_change_the_pilot(arch):
    pilot, batch = build_seq2seq_pilot(arch), training_batch()
    before = pilot(**batch).logits
    model = build_model(arch, pilot=pilot)
    assert model.pilot is pilot
    assert torch.equal(pilot(**batch).logits, before)
    assert torch.equal(model(**batch).logits, before)


def test_the_causal_wrapper_refuses_an_encoder_decoder_pilot():
    with pytest.raises(ValueError, match="PilotCopilotForSeq2SeqLM"):
        PilotCopilotForCausalLM.from_pilot(build_seq2seq_pilot("t5"), tiny_copilot_config())
    with pytest.raises(ValueError, match="PilotCopilotForCausalLM"):
        PilotCopilotForSeq2SeqLM.from_pilot(build_pilot("llama"), tiny_copilot_config())


# --------------------------------------------------------------------------------------------------
# Generation

DECODING = {
    "greedy": dict(do_sample=False),
    "beam": dict(num_beams=4, do_sample=False),
    "sampling": dict(do_sample=True, top_k=0),
}


@pytest.mark.parametrize("decoding", list(DECODING))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lambda_zero_is_the_pilots_own_generate(arch, decoding):
    model = build_model(arch)  # float32, with the Pilot's EOS
    inputs, kwargs = source(batch_size=2), DECODING[decoding]
    pilot = generate(model.pilot, inputs, seed=0, **kwargs)
    assert not torch.equal(generate(model, inputs, seed=0, **kwargs), pilot), "the Copilot must act"

    assert torch.equal(generate(model, inputs, seed=0, copilot_lambda=0.0, **kwargs), pilot)


@pytest.mark.parametrize("feedback", FEEDBACK_MODES)
@pytest.mark.parametrize("fusion", FUSION_SPACES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fused_greedy_equals_full_recomputation(arch, fusion, feedback):
    copilot_lambda = LOGITS_LAMBDA if fusion == "logits" else 1.0
    model = fused_model(arch, fusion=fusion, copilot_feedback=feedback, copilot_lambda=copilot_lambda)
    inputs = source(batch_size=2, right_padding=(0, 2))
    fused = greedy(model, inputs)
    assert not torch.equal(fused, greedy(model, inputs, copilot_lambda=0.0))

    assert torch.equal(fused, reference_greedy(model, inputs))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_logits_fused_are_the_scores_generate_picks_from(arch):
    """As for a causal Pilot: under `forward_logits="fused"` the decoder's `logits` over the generated sequence are
    the scores greedy generate() chose from; generate() and a forward with labels keep the Pilot's."""
    model = fused_model(arch)
    inputs = source(batch_size=2, right_padding=(0, 2))
    expected = greedy(model, inputs)
    model.config.forward_logits = "fused"
    out = greedy(model, inputs, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    scored = model(**inputs, decoder_input_ids=out.sequences[:, :-1]).logits
    torch.testing.assert_close(scored.float(), torch.stack(out.scores, dim=1))  # generate() scores in float32
    pilot_logits = model.pilot(**inputs, decoder_input_ids=out.sequences[:, :-1]).logits
    assert not torch.allclose(scored, pilot_logits)
    labels = out.sequences[:, 1:].contiguous()
    assert torch.equal(model(**inputs, labels=labels).logits, model.pilot(**inputs, labels=labels).logits)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generate_returns_the_pilots_attentions_when_asked(arch):
    """`output_attentions=True`: the encoder's, and per step the decoder's and the cross-attention's weights, those
    of the Pilot alone (before: AttributeError)."""
    model = build_model(arch)
    model.pilot.set_attn_implementation("eager")
    kwargs = dict(do_sample=False, return_dict_in_generate=True, output_attentions=True, max_new_tokens=4)
    inputs = source(batch_size=2, right_padding=(0, 2))
    fused = model.generate(**inputs, copilot_lambda=0.0, **kwargs)
    alone = model.pilot.generate(**inputs, **kwargs)
    assert torch.equal(fused.sequences, alone.sequences)
    for name in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
        got, expected = getattr(fused, name), getattr(alone, name)
        assert got is not None and len(got) == len(expected)
        flat = [t for item in got for t in (item if isinstance(item, tuple) else (item,))]
        flat_expected = [t for item in expected for t in (item if isinstance(item, tuple) else (item,))]
        assert all(torch.equal(a, b) for a, b in zip(flat, flat_expected, strict=True))


@pytest.mark.parametrize("token_embedding", [True, "gain"])
@pytest.mark.parametrize("feedback", FEEDBACK_MODES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_copilot_with_a_token_embedding_decodes_as_the_full_recomputation(arch, feedback, token_embedding):
    """token_embedding: decoder position j reads E[y_j] (a table's row or gains on W_in's column) beside its error
    row, in either feedback mode."""
    with torch.no_grad():
        model = build_model(arch, copilot_feedback=feedback, token_embedding=token_embedding).double()
        model.copilot.error_head.weight.mul_(ERROR_HEAD_SCALE[arch])
    model.generation_config.eos_token_id = None
    inputs = source(batch_size=2, right_padding=(0, 2))
    fused = greedy(model, inputs)
    with torch.no_grad():
        without_tokens = copy.deepcopy(model)
        without_tokens.copilot.token_embedding.weight.zero_()
    assert not torch.equal(fused, greedy(without_tokens, inputs))
    assert torch.equal(fused, reference_greedy(model, inputs))


@pytest.mark.parametrize("feedback", FEEDBACK_MODES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_assisted_decoding_matches_fused_greedy(arch, feedback, monkeypatch):
    """Drafts from the fused model's own Pilot are accepted or rejected by the fused scores, so the tokens are
    fused greedy's; rejected drafts roll the Copilot's state back several positions."""
    model = fused_model(arch, copilot_feedback=feedback, copilot_lambda=0.3)
    inputs = source(seed=1)
    expected = greedy(model, inputs)
    assert not torch.equal(expected, greedy(model, inputs, copilot_lambda=0.0))
    crops = []
    original_crop = PilotCopilotEncoderDecoderCache.crop

    def recorded_crop(cache, tokens_to_remove):
        crops.append(tokens_to_remove)
        return original_crop(cache, tokens_to_remove)

    monkeypatch.setattr(PilotCopilotEncoderDecoderCache, "crop", recorded_crop)
    assert torch.equal(greedy(model, inputs, assistant_model=model.pilot), expected)
    assert any(tokens_to_remove < 0 for tokens_to_remove in crops)
    other_pilot = build_seq2seq_pilot(arch, seed=1).double()
    assert torch.equal(greedy(model, inputs, assistant_model=other_pilot), expected)


@pytest.mark.parametrize("feedback", FEEDBACK_MODES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_beam_search_equals_reference_beam_search(arch, feedback):
    model = fused_model(arch, copilot_feedback=feedback)
    inputs, num_beams = source(seed=2), 4
    beams = dict(num_beams=num_beams, num_return_sequences=num_beams, do_sample=False)
    out = generate(model, inputs, return_dict_in_generate=True, **beams)
    assert not torch.equal(out.sequences, generate(model, inputs, copilot_lambda=0.0, **beams))
    ancestors = out.beam_indices[:, 1:]  # beams were reordered (step 0: every hypothesis starts from beam 0)
    assert (ancestors != ancestors[:, :1]).any()

    assert torch.equal(out.sequences, reference_beam_search(model, inputs, num_beams))


@pytest.mark.parametrize("decoding", ["greedy", "beam"])
@pytest.mark.parametrize("feedback", FEEDBACK_MODES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_static_cache_gives_the_dynamic_caches_tokens(arch, feedback, decoding):
    model = fused_model(arch, copilot_feedback=feedback)
    inputs = source(batch_size=2, right_padding=(0, 2))
    kwargs = dict(do_sample=False, num_beams=4 if decoding == "beam" else 1)
    dynamic = generate(model, inputs, **kwargs)
    assert not torch.equal(dynamic, generate(model, inputs, copilot_lambda=0.0, **kwargs))

    out = generate(model, inputs, cache_implementation="static", return_dict_in_generate=True, **kwargs)
    cache = out[CACHE_KEYWORD]
    assert isinstance(cache.self_attention_cache, StaticCache)
    # The Copilot's steps ran over its preallocated buffers, the encoder output in front of every position.
    kv_cache = cache.copilot.kv_cache
    assert isinstance(kv_cache, StaticCopilotKVCache)
    assert kv_cache.leading_rows == [0, inputs["input_ids"].shape[1]] * model.copilot.config.num_hidden_layers
    assert torch.equal(out.sequences, dynamic)


@pytest.mark.parametrize("feedback", FEEDBACK_MODES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_compiled_decoding_compiles_the_copilot_step_once_and_gives_the_same_tokens(arch, feedback):
    """With a static cache generate() compiles the per-token forward (on CPU only when asked): the Copilot's
    decoding step is one graph (fullgraph) over its buffers, the encoder output cached in front, that every later
    step of a padded batch reuses; the tokens are those of eager decoding with the dynamic cache."""
    model = fused_model(arch, copilot_feedback=feedback, position_encoding="rope")
    inputs = source(batch_size=2, right_padding=(0, 2))
    expected = greedy(model, inputs)
    backend, graphs = graph_recorder()
    compile_config = CompileConfig(backend=backend, mode=None, fullgraph=True)
    compile_config._compile_all_devices = True  # generate() compiles on accelerators only, unless told

    torch._dynamo.reset()
    compiled = greedy(model, inputs, cache_implementation="static", compile_config=compile_config)
    copilot_graphs = [graph for graph in graphs if "error_head" in str(graph.graph)]
    assert len(copilot_graphs) == 1
    assert torch.equal(compiled, expected)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rotary_copilot_is_causal_and_decodes_as_the_full_recomputation(arch):
    """position_encoding="rope" with an encoder-decoder Pilot: decoder positions are rotated, the encoder output
    (position -1) is not; later labels change nothing earlier, and greedy and beam search give the references'
    tokens."""
    model, batch = build_model(arch, position_encoding="rope"), training_batch()
    reference = model(**batch).predicted_error
    changed = {**batch, "labels": batch["labels"].clone()}
    changed["labels"][:, 3:] = FIRST_REGULAR_TOKEN + (batch["labels"][:, 3:].clamp_min(0) + 7) % 50
    assert torch.equal(model(**changed).predicted_error[:, :4], reference[:, :4])

    model = fused_model(arch, position_encoding="rope")
    inputs = source(batch_size=2, right_padding=(0, 2))
    fused = greedy(model, inputs)
    assert not torch.equal(fused, greedy(model, inputs, copilot_lambda=0.0))
    assert not torch.equal(fused, greedy(fused_model(arch), inputs))
    assert torch.equal(fused, reference_greedy(model, inputs))
    one = source(seed=2)
    beams = greedy(model, one, num_beams=4, num_return_sequences=4)
    assert torch.equal(beams, reference_beam_search(model, one, num_beams=4))


@pytest.mark.parametrize("feedback", FEEDBACK_MODES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_padded_batch_equals_one_source_at_a_time(arch, feedback):
    model = fused_model(arch, copilot_feedback=feedback)
    lengths = (7, 4, 2)
    sources = [source(length=length, seed=length)["input_ids"][0] for length in lengths]
    input_ids = torch.full((len(sources), max(lengths)), PAD_TOKEN_ID)
    attention_mask = torch.zeros_like(input_ids)
    for row, tokens in enumerate(sources):
        input_ids[row, : len(tokens)], attention_mask[row, : len(tokens)] = tokens, 1

    batched = greedy(model, {"input_ids": input_ids, "attention_mask": attention_mask})
    for row, tokens in enumerate(sources):
        alone = {"input_ids": tokens[None], "attention_mask": torch.ones(1, len(tokens), dtype=torch.long)}
        expected = greedy(model, alone)
        assert not torch.equal(expected, greedy(model, alone, copilot_lambda=0.0)), row
        assert torch.equal(batched[row : row + 1], expected), f"source {row}"


def test_num_return_sequences_with_sampling():
    model = fused_model("bart")
    inputs, samples = source(batch_size=2, right_padding=(0, 1)), dict(do_sample=True, num_return_sequences=3)
    out = generate(model, inputs, seed=3, **samples)
    assert out.shape == (6, 1 + NEW_TOKENS)
    assert not torch.equal(out, generate(model, inputs, seed=3, copilot_lambda=0.0, **samples))
    assert not torch.equal(out[0], out[1])
    # With top_k=1 every sample is fused greedy: each expanded row carries the Copilot state of its own source.
    top1 = generate(model, inputs, seed=3, top_k=1, **samples)
    assert torch.equal(top1, greedy(model, inputs).repeat_interleave(3, dim=0))


@pytest.mark.parametrize(
    "override", [dict(copilot_lambda=0.0), dict(fusion="logits"), dict(copilot_feedback="copilot")]
)
def test_per_call_overrides_equal_config_defaults(override):
    model = fused_model()
    configured = copy.deepcopy(model)  # the same Copilot (one built for copilot feedback has a memory norm)
    for name, value in override.items():
        setattr(configured.config, name, value)
    inputs = source(seed=5)
    default = greedy(model, inputs)
    overridden = greedy(model, inputs, **override)
    assert not torch.equal(overridden, default)
    assert torch.equal(overridden, greedy(configured, inputs))
    assert torch.equal(greedy(model, inputs), default)  # the override lasts one call


def test_one_copilot_step_per_token_and_the_encoder_output_projected_once():
    model = fused_model()
    steps, memories = [], []
    model.copilot.register_forward_hook(lambda module, args, output: steps.append(args[0].shape[1]))
    model.copilot.memory_proj.register_forward_hook(
        lambda module, args, output: memories.append(args[0].shape[1])
    )
    greedy(model, source(length=6))
    # The last generated token is never fed back: NEW_TOKENS forwards in all, one decoder position each.
    assert steps == [1] * NEW_TOKENS
    # The first step projects the 6 source positions and its own h_bar; later steps their h_bar only.
    assert memories == [7] + [1] * (NEW_TOKENS - 1)


def test_generation_uses_the_encoder_decoder_cache_carrying_the_copilot_state():
    model = fused_model()
    caches = []
    model.register_forward_hook(lambda module, args, output: caches.append(getattr(output, CACHE_KEYWORD)))
    greedy(model, source(), max_new_tokens=3)
    assert len({id(cache) for cache in caches}) == 1
    cache = caches[0]
    assert isinstance(cache, PilotCopilotEncoderDecoderCache) and cache.copilot is not None
    assert cache.get_seq_length() == cache.copilot.kv_cache.length == 3
    # Self-attention slots hold one key per decoder position; cross-attention slots the 6 source positions too.
    assert [keys.shape[2] for keys in cache.copilot.kv_cache.keys] == [3, 9, 3, 9]


# --------------------------------------------------------------------------------------------------
# Checkpoints

HUB_FILES = SEQ2SEQ_HUB_FILES


def assert_same_outputs(model, loaded):
    batch = training_batch()
    with torch.no_grad():
        expected, actual = model(**batch), loaded(**batch)
    assert torch.equal(actual.logits, expected.logits)
    assert torch.equal(actual.predicted_error, expected.predicted_error)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_pretrained_loads_back_through_auto_model_for_seq2seq_lm(arch, tmp_path):
    model = build_model(arch, copilot_lambda=0.7, fusion="logits", copilot_feedback="copilot")
    model.save_pretrained(tmp_path)
    assert set(os.listdir(tmp_path)) == HUB_FILES | {
        "config.json",
        "generation_config.json",
        "model.safetensors",
    }
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "pilot_copilot_seq2seq" and config["is_encoder_decoder"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_pilot_copilot.PilotCopilotSeq2SeqConfig",
        "AutoModelForSeq2SeqLM": "modeling_pilot_copilot_seq2seq.PilotCopilotForSeq2SeqLM",
    }
    weights = load_file(tmp_path / "model.safetensors")
    assert {name.split(".")[0] for name in weights} == {"pilot", "copilot"}
    for loader in (AutoModelForSeq2SeqLM, PilotCopilotForSeq2SeqLM):
        loaded, info = loader.from_pretrained(tmp_path, output_loading_info=True)
        loaded.eval()
        assert type(loaded) is PilotCopilotForSeq2SeqLM
        assert (
            isinstance(loaded.config, PilotCopilotSeq2SeqConfig)
            and loaded.config.copilot_config.encoder_decoder
        )
        assert (loaded.config.copilot_lambda, loaded.config.fusion, loaded.config.copilot_feedback) == (
            0.7,
            "logits",
            "copilot",
        )
        assert not info["missing_keys"] and not info["unexpected_keys"]
        # The Pilot's embeddings stay tied (T5: encoder, decoder and LM head; BART: encoder and decoder).
        assert loaded.pilot.get_encoder().embed_tokens.weight is loaded.pilot.get_input_embeddings().weight
        assert_same_outputs(model, loaded)
        inputs = source(batch_size=2, right_padding=(0, 2))
        assert torch.equal(greedy(loaded, inputs), greedy(model, inputs))


def test_a_plain_seq2seq_folder_is_refused_with_how_to_attach_a_copilot(tmp_path):
    build_seq2seq_pilot("t5").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"PilotCopilotForSeq2SeqLM\.from_pilot\(AutoModelForSeq2SeqLM"):
        PilotCopilotForSeq2SeqLM.from_pretrained(tmp_path)


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys

    sys.modules["hf_copilot"] = None  # `import hf_copilot` now raises ImportError
    import torch
    from transformers import AutoModelForSeq2SeqLM

    checkpoint, inputs_path, output_path = sys.argv[1:]
    model = AutoModelForSeq2SeqLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    inputs = torch.load(inputs_path)
    with torch.no_grad():
        out = model(**inputs["forward"])
        tokens = {name: model.generate(**inputs["source"], **kwargs) for name, kwargs in inputs["generate"].items()}
    torch.save(
        {
            "module": type(model).__module__,
            "logits": out.logits,
            "predicted_error": out.predicted_error,
            "tokens": tokens,
        },
        output_path,
    )
    """
)


def test_remote_code_loads_without_hf_copilot_and_gives_identical_outputs(tmp_path):
    model = build_model("t5", copilot_lambda=0.8)
    model.save_pretrained(tmp_path / "checkpoint")
    decoding = {
        "greedy": dict(max_new_tokens=6, do_sample=False),
        "beam": dict(max_new_tokens=6, num_beams=3),
        "copilot_feedback": dict(max_new_tokens=6, do_sample=False, copilot_feedback="copilot"),
    }
    inputs = source(batch_size=2, right_padding=(0, 2))
    torch.save({"forward": training_batch(), "source": inputs, "generate": decoding}, tmp_path / "inputs.pt")
    run_without_hf_copilot(
        REMOTE_CODE_SCRIPT, tmp_path, tmp_path / "checkpoint", tmp_path / "inputs.pt", tmp_path / "out.pt"
    )
    remote = torch.load(tmp_path / "out.pt")
    assert remote["module"].startswith("transformers_modules")
    with torch.no_grad():
        local = model(**training_batch())
    assert torch.equal(remote["logits"], local.logits)
    assert torch.equal(remote["predicted_error"], local.predicted_error)
    for name, kwargs in decoding.items():
        expected = generate(model, inputs, **kwargs)
        assert torch.equal(remote["tokens"][name], expected), name
    assert not torch.equal(expected, generate(model, inputs, **{**kwargs, "copilot_lambda": 0.0}))


# --------------------------------------------------------------------------------------------------
# Training with CopilotTrainer


def reversal_rows(n: int = 16, seed: int = 0) -> list[dict[str, list[int]]]:
    """Sources of 3-8 tokens; the target is the source reversed, then EOS."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 3 + (i * 5) % 6
        ids = torch.randint(FIRST_REGULAR_TOKEN, VOCAB_SIZE, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": ids[::-1] + [SPECIAL_TOKENS["eos_token_id"]]})
    return rows


def collate_seq2seq(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right-pads sources with PAD (attention 0) and labels with -100, as DataCollatorForSeq2Seq does."""
    width, label_width = max(len(r["input_ids"]) for r in rows), max(len(r["labels"]) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full((len(rows), label_width), -100)
    for i, row in enumerate(rows):
        input_ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        attention_mask[i, : len(row["input_ids"])] = 1
        labels[i, : len(row["labels"])] = torch.tensor(row["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def training_settings(tmp_path, **overrides) -> dict:
    return {
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 4,
        "max_steps": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_pin_memory": False,
        **overrides,
    }


def copilot_trainer(tmp_path, arch: str = "t5", model=None, rows=None, trainer_class=None, **overrides):
    from hf_copilot import CopilotTrainer, CopilotTrainingArguments

    return (trainer_class or CopilotTrainer)(
        model=build_model(arch, copilot_std=None) if model is None else model,
        args=CopilotTrainingArguments(
            **training_settings(
                tmp_path, **{"copilot_learning_rate": 3e-2, "copilot_final_epochs": 0.0, **overrides}
            )
        ),
        train_dataset=reversal_rows() if rows is None else rows,
        data_collator=collate_seq2seq,
    )


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_copilot_trainer_fine_tunes_the_pilot_exactly_as_the_stock_trainer(arch, tmp_path):
    from transformers import Trainer, TrainingArguments

    stock_pilot = build_seq2seq_pilot(arch)
    stock = Trainer(
        model=stock_pilot,
        args=TrainingArguments(**training_settings(tmp_path)),
        train_dataset=reversal_rows(),
        data_collator=collate_seq2seq,
    )
    stock.train()
    trainer = copilot_trainer(tmp_path, arch)
    copilot_before = {name: p.detach().clone() for name, p in trainer.model.copilot.named_parameters()}
    trainer.train()

    assert logged(trainer, "pilot_loss") == pytest.approx(logged(stock, "loss"), rel=1e-5)
    assert max_difference(trainer.model.pilot, stock_pilot) < 1e-6
    assert all(not torch.equal(p, copilot_before[n]) for n, p in trainer.model.copilot.named_parameters())
    assert all(math.isfinite(value) for value in logged(trainer, "copilot_loss"))


def test_copilot_trainer_gradient_accumulation_4x2_updates_both_models_exactly_as_batch_8(tmp_path):
    """In float64: the micro-batches pad to other lengths than the whole batch, and float32 rounding of a few
    1e-6, amplified over the steps, would hide the comparison with per-micro-batch normalisation."""
    from hf_copilot import CopilotTrainer

    class PerMicroBatchTrainer(CopilotTrainer):
        """The naive alternative: each micro-batch normalised by its own token count, then divided by 4."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = False  # Trainer then counts no num_items_in_batch

    def run(batch_size, accumulation, trainer_class=CopilotTrainer):
        model = build_model("t5", copilot_std=None).double()
        trainer = copilot_trainer(
            tmp_path,
            model=model,
            trainer_class=trainer_class,
            optim="sgd",
            learning_rate=0.1,
            copilot_learning_rate=0.3,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
        )
        trainer.train()
        return trainer

    big, accumulated, naive = run(8, 1), run(2, 4), run(2, 4, PerMicroBatchTrainer)

    # The micro-batches carry different numbers of labels, so per-micro-batch means weigh tokens unequally.
    batches = list(accumulated.get_train_dataloader())
    assert len({int((batch["labels"] != -100).sum()) for batch in batches}) > 2
    assert (
        max_difference(big.model, build_model("t5", copilot_std=None).double()) > 1e-3
    )  # the parameters moved
    for part in ("pilot", "copilot"):
        assert max_difference(getattr(big.model, part), getattr(accumulated.model, part)) < 1e-10, part
        assert max_difference(getattr(big.model, part), getattr(naive.model, part)) > 1e-5, part
    # The logs pass through float32.
    assert logged(accumulated, "pilot_loss") == pytest.approx(logged(big, "pilot_loss"), rel=1e-6)
    assert logged(accumulated, "copilot_loss") == pytest.approx(logged(big, "copilot_loss"), rel=1e-6)


def test_copilot_trainer_with_a_window_replays_encoder_decoder_entries(tmp_path):
    """Log rows of different source and target lengths are collated into the Copilot's batch."""
    trainer = copilot_trainer(tmp_path, mistake_log_window=4, mistake_log_replay=1, max_steps=6)
    trainer.train()
    log = trainer.mistake_log_callback.mistake_log
    assert len(log) == 4 and all(entry.is_encoder_decoder for entry in log)  # the window's entries
    rows = log.sample_rows(8, 4)
    assert rows.x_tilde.shape[1] == rows.encoder_attention_mask.shape[1] > 0
    assert rows.h_bar.shape[1] == rows.loss_mask.shape[1]
    # The log's checkpoint format carries the source padding too.
    restored = MistakeLog(size=log.size, topk=log.topk)
    restored.load_state_dict(log.state_dict())
    for ours, theirs in zip(restored, log, strict=True):
        assert torch.equal(ours.encoder_attention_mask, theirs.encoder_attention_mask)
        assert torch.equal(ours.x_tilde, theirs.x_tilde)
    assert all(math.isfinite(value) for value in logged(trainer, "copilot_loss"))


def test_evaluation_reports_pilot_and_fused_token_accuracy_on_unshifted_labels(tmp_path):
    model = build_model("t5", seed=2)  # a seed whose Pilot and fused choices score differently
    trainer = copilot_trainer(tmp_path, model=model, per_device_eval_batch_size=3)
    rows = reversal_rows(7, seed=1)
    metrics = trainer.evaluate(eval_dataset=rows)

    model.eval()
    labels = pilot_correct = fused_correct = 0
    for start in range(0, len(rows), 3):
        batch = collate_seq2seq(rows[start : start + 3])
        with torch.no_grad():
            out = model(**batch, return_fused=True)
        mask = batch["labels"] != -100  # decoder position j predicts labels[j]
        labels += int(mask.sum())
        pilot_correct += int(((out.logits.argmax(-1) == batch["labels"]) & mask).sum())
        fused_correct += int(((out.fused_logits.argmax(-1) == batch["labels"]) & mask).sum())
    assert metrics["eval_pilot_token_accuracy"] == pytest.approx(pilot_correct / labels)
    assert metrics["eval_fused_token_accuracy"] == pytest.approx(fused_correct / labels)
    assert metrics["eval_pilot_token_accuracy"] != metrics["eval_fused_token_accuracy"]


def test_copilot_seq2seq_trainer_predicts_with_the_fused_generate(tmp_path):
    """Seq2SeqTrainer's predict_with_generate: the predictions are the Pilot + Copilot's; eval_loss the Pilot's."""
    from hf_copilot import CopilotSeq2SeqTrainer, CopilotSeq2SeqTrainingArguments

    model = build_model("t5")
    model.generation_config.eos_token_id = None  # every prediction runs to generation_max_length
    args = CopilotSeq2SeqTrainingArguments(
        **training_settings(tmp_path, max_steps=2, per_device_eval_batch_size=3),
        predict_with_generate=True,
        generation_max_length=6,
    )
    rows = reversal_rows(7, seed=1)
    trainer = CopilotSeq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=reversal_rows(),
        eval_dataset=rows,
        data_collator=collate_seq2seq,
    )
    trainer.train()
    output = trainer.predict(rows)

    model.eval()
    expected, pilot_losses, pilot_tokens = [], 0.0, 0
    for start in range(0, len(rows), 3):
        batch = collate_seq2seq(rows[start : start + 3])
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        expected.append(model.generate(**inputs, max_length=6, do_sample=False))
        with torch.no_grad():
            count = int((batch["labels"] != -100).sum())
            pilot_losses += float(model.pilot(**batch).loss) * count
            pilot_tokens += count
    expected = torch.cat(expected)
    predictions = torch.as_tensor(output.predictions)  # padded to generation_config.max_length
    assert torch.equal(predictions[:, :6], expected) and not predictions[:, 6:].any()
    pilot_only = torch.cat(
        [
            model.generate(
                **source_of(rows[start : start + 3]), max_length=6, do_sample=False, copilot_lambda=0.0
            )
            for start in range(0, len(rows), 3)
        ]
    )
    assert not torch.equal(expected, pilot_only)  # the Copilot steers the predictions
    assert "test_fused_token_accuracy" in output.metrics  # CopilotTrainer's evaluation sums were kept
    assert output.metrics["test_pilot_loss"] == pytest.approx(pilot_losses / pilot_tokens, rel=1e-5)


def source_of(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    batch = collate_seq2seq(rows)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@pytest.mark.parametrize(("arch", "target_modules"), [("t5", ["q", "v"]), ("bart", ["q_proj", "v_proj"])])
def test_a_lora_pilot_checkpoint_rebuilds_its_adapter_through_both_loaders(arch, target_modules, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, task_type="SEQ_2_SEQ_LM")
    pilot = peft.get_peft_model(build_seq2seq_pilot(arch), config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero: drawn so that the adapter changes the Pilot
        for name, parameter in pilot.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model = build_model(arch, pilot=pilot)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["pilot_peft_config"]
    assert saved["default"]["peft_type"] == "LORA" and saved["default"]["target_modules"] == sorted(
        target_modules
    )
    batch, inputs = training_batch(), source(batch_size=2, right_padding=(0, 2))
    with torch.no_grad():
        expected = model(**batch)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in name for name in trainable) and not any("base_layer" in name for name in trainable)
    for loader in (PilotCopilotForSeq2SeqLM, AutoModelForSeq2SeqLM):
        loaded = loader.from_pretrained(tmp_path / "saved").eval()
        assert isinstance(loaded.pilot, peft.PeftModel)
        with torch.no_grad():
            out = loaded(**batch)
        assert torch.equal(out.logits, expected.logits)
        assert torch.equal(out.predicted_error, expected.predicted_error)
        assert {name for name, p in loaded.named_parameters() if p.requires_grad} == trainable
        assert torch.equal(greedy(loaded, inputs), greedy(model, inputs))


def test_copilot_trainer_trains_a_lora_pilots_adapter_and_the_copilot_only(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
    model = build_model("t5", copilot_std=None, pilot=peft.get_peft_model(build_seq2seq_pilot("t5"), config))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    copilot_trainer(tmp_path, model=model).train()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any("lora_B" in name for name in changed) and any(name.startswith("copilot.") for name in changed)
    assert not any(name.startswith("pilot.") and "lora_" not in name for name in changed)


def saved_pilot(arch: str, folder) -> PreTrainedModel:
    """A Pilot saved to `folder` and loaded back from it, so that its name_or_path names the folder."""
    build_seq2seq_pilot(arch).save_pretrained(folder)
    return AutoModelForSeq2SeqLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_copilot_only_checkpoint_reloads_onto_its_base_pilot(arch, tmp_path):
    model = build_model(arch, pilot=saved_pilot(arch, tmp_path / "pilot"), copilot_lambda=0.7)
    model.save_copilot(tmp_path / "copilot")
    assert not any(name.startswith("pilot") for name in load_file(tmp_path / "copilot" / "model.safetensors"))
    inputs = source(batch_size=2, right_padding=(0, 2))
    expected = greedy(model, inputs)
    assert not torch.equal(expected, greedy(model, inputs, copilot_lambda=0.0))
    for loader in (PilotCopilotForSeq2SeqLM, AutoModelForSeq2SeqLM):
        loaded = loader.from_pretrained(tmp_path / "copilot").eval()
        assert type(loaded) is PilotCopilotForSeq2SeqLM and loaded.config.copilot_lambda == 0.7
        assert torch.equal(greedy(loaded, inputs), expected)
    with pytest.raises(
        ValueError, match="holds the Copilot of an encoder-decoder Pilot: load it with PilotCopilotFor"
    ):
        PilotCopilotForCausalLM.from_pretrained(tmp_path / "copilot")
    with pytest.raises(ValueError, match="This Copilot was trained with a different Pilot"):
        PilotCopilotForSeq2SeqLM.from_pretrained(
            tmp_path / "copilot", pilot=build_seq2seq_pilot(arch, seed=5)
        )


def test_a_decoder_only_copilot_folder_is_refused_by_the_seq2seq_wrapper(tmp_path):
    build_pilot_copilot("llama").save_copilot(tmp_path / "copilot", base_model_name_or_path="org/tiny-llama")
    with pytest.raises(
        ValueError, match="holds the Copilot of a decoder-only Pilot: load it with PilotCopilotForCausalLM"
    ):
        PilotCopilotForSeq2SeqLM.from_pretrained(tmp_path / "copilot")


@pytest.mark.parametrize("copilot_only", [False, True])
def test_the_upload_card_usage_runs_without_hf_copilot(tmp_path, copilot_only):
    """Offline, folders named like the repository ids stand in for the Hub repositories (the base Pilot's too)."""
    from hf_copilot.hub import README_NAME, stage_for_upload

    tokenizer, base, repo = char_tokenizer(), "org/tiny-t5", "me/t5-copilot"
    model = build_model("t5", pilot=saved_pilot("t5", tmp_path / base))
    stage_for_upload(model, tmp_path / repo, copilot_only, base_model=base, repo_id=repo, tokenizer=tokenizer)
    text = (tmp_path / repo / README_NAME).read_text()
    assert "pipeline_tag: text2text-generation" in text
    assert f'AutoModelForSeq2SeqLM.from_pretrained("{repo}", trust_remote_code=True)' in text
    if copilot_only:
        config = json.loads((tmp_path / repo / "config.json").read_text())
        assert config["auto_map"]["AutoModelForSeq2SeqLM"] == (
            "modeling_pilot_copilot_seq2seq.CopilotCheckpointForSeq2SeqLM"
        )
        assert config["base_model_name_or_path"] == base
    assert_card_usage_prints_the_models_generation(tmp_path / repo, model, tokenizer, tmp_path)
