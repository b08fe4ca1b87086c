"""Fused generation: the Copilot rectifies the Pilot inside the standard generate() (SPEC section 5).

Every fused test first checks that the Copilot changes the output, so that an equality with a
reference cannot hold by accident. The references recompute both models over the whole sequence at
every step, without any cache.

Comparisons with a reference run in float64. In "copilot" feedback mode the Copilot reads its own
previous output, and a random Copilot amplifies float32 rounding (incremental and full attention
round differently, ~1e-7) by a few times per step until a token flips after ~10 steps; in float64
the incremental path and the reference agree exactly.
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from conftest import (
    FIRST_REGULAR_TOKEN,
    IMAGE_BEGIN_ID,
    IMAGE_END_ID,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    VOCAB_SIZE,
    build_batch,
    build_multimodal_pilot,
    build_pilot,
    build_pilot_copilot,
    char_tokenizer,
    graph_recorder,
    multimodal_example,
    tiny_copilot_config,
    token_term,
)
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from transformers import (
    AutoModelForCausalLM,
    CompileConfig,
    DynamicCache,
    GenerationConfig,
    PreTrainedModel,
    pipeline,
)
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from transformers.generation.streamers import BaseStreamer

from hf_copilot import PilotCopilotCache, PilotCopilotForCausalLM, fuse_scores
from hf_copilot.generation_pilot_copilot import (
    CACHE_KEYWORD,
    PilotCopilotStaticCache,
    StaticCopilotKVCache,
    copilot_stream,
    fuse_reweighted_logits,
    predicted_errors_as_generated,
)
from hf_copilot.mistake_log_entry import shift_right

FUSION_SPACES = ("probs", "logits")
FEEDBACK_MODES = ("copilot", "observed")
ERROR_FORMS = ("linear", "reweight")
NEW_TOKENS = 12


def prompt(length: int = 6, batch_size: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_REGULAR_TOKEN, VOCAB_SIZE, (batch_size, length), generator=generator)


@torch.no_grad()
def fused_model(
    arch: str | PreTrainedModel = "llama",
    error_form: str = "linear",
    position_encoding: str = "none",
    token_embedding: bool | str = False,
    **fusion,
) -> PilotCopilotForCausalLM:
    """A float64 Pilot+Copilot without EOS (every sequence runs to max_new_tokens, as the references
    assume). The large-std linear Copilot's W_out is shrunk so that f_C is on the scale of the Pilot's
    probabilities: both then matter, and lambda and the fusion space change decisions (a "reweight"
    Copilot's f_C is on that scale by construction)."""
    copilot_config = tiny_copilot_config(
        error_form=error_form, position_encoding=position_encoding, token_embedding=token_embedding
    )
    model = build_pilot_copilot(arch, copilot_config, **fusion).double()
    if error_form == "linear":
        model.copilot.error_head.weight.mul_(0.01)
    model.generation_config.eos_token_id = None
    return model


def generate(model, input_ids, seed: int | None = None, **kwargs) -> torch.Tensor:
    if seed is not None:
        torch.manual_seed(seed)
    kwargs.setdefault("max_new_tokens", NEW_TOKENS)
    return model.generate(input_ids, **kwargs)


def greedy(model, input_ids, **kwargs) -> torch.Tensor:
    return generate(model, input_ids, do_sample=False, **kwargs)


# ------------------------------------------------------------------------------------------------
# The slow reference: both models over the full sequence, no cache


@torch.no_grad()
def reference_step(model: PilotCopilotForCausalLM, sequence: torch.Tensor, prompt_length: int, feedback: str):
    """The Pilot's logits and the Copilot's f_C at the last position of `sequence`, from scratch.

    Prompt positions receive the observed errors of the Mistake Log entry. In "copilot" mode a
    generated position j receives W_in f_C_{j-1}; f_C_{j-1} depends on the positions before it, so
    the Copilot re-runs over the whole stream once per generated position, each pass fixing one more.
    """
    out = model(sequence, return_mistake_log=True)
    entry = out.mistake_log_entry
    copilot = model.copilot
    observed = entry.errors.embed(copilot.error_proj.weight)  # W_in e_j
    stream = torch.cat([torch.zeros_like(observed[:, :1]), observed[:, :-1]], dim=1)
    # With a token term every position j > 0 (no padding here) also reads E[x_j], in either mode.
    tokens = token_term(copilot, sequence[:, 1:])
    stream[:, 1:] += tokens
    copilot_errors = copilot(stream, entry.x_tilde, entry.h_bar, pilot_errors=entry.errors)
    if feedback == "copilot":
        for _ in range(sequence.shape[1] - prompt_length):
            own = copilot.embed_predicted_errors(copilot_errors[:, prompt_length - 1 : -1])
            own += tokens[:, prompt_length - 1 :]
            stream = torch.cat([stream[:, :prompt_length], own], dim=1)
            copilot_errors = copilot(stream, entry.x_tilde, entry.h_bar, pilot_errors=entry.errors)
    return out.logits[:, -1].float(), copilot_errors[:, -1]


def reference_greedy(model, input_ids, new_tokens=NEW_TOKENS) -> torch.Tensor:
    config, sequence = model.config, input_ids
    for _ in range(new_tokens):
        logits, copilot_errors = reference_step(model, sequence, input_ids.shape[1], config.copilot_feedback)
        scores = fuse_scores(logits, copilot_errors, config.copilot_lambda, config.fusion)
        sequence = torch.cat([sequence, scores.argmax(-1, keepdim=True)], dim=1)
    return sequence


def reference_beam_search(model, input_ids, num_beams: int, new_tokens=NEW_TOKENS) -> torch.Tensor:
    """HF beam search without EOS: all hypotheses have the same length, so the length penalty and
    early stopping cannot reorder them. As in generate(), the processors see log-probabilities."""
    config = model.config
    sequences = input_ids.repeat(num_beams, 1)
    scores = torch.full((num_beams,), -1e9)
    scores[0] = 0.0  # only the first beam starts, so that the beams do not all pick the same tokens
    for _ in range(new_tokens):
        logits, copilot_errors = reference_step(model, sequences, input_ids.shape[1], config.copilot_feedback)
        log_probs = fuse_scores(logits.log_softmax(-1), copilot_errors, config.copilot_lambda, config.fusion)
        scores, flat = (scores[:, None] + log_probs).flatten().topk(num_beams)
        beams, tokens = flat // log_probs.shape[-1], flat % log_probs.shape[-1]
        sequences = torch.cat([sequences[beams], tokens[:, None]], dim=1)
    return sequences  # best first


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), PAD_TOKEN_ID)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, tokens in enumerate(prompts):
        input_ids[row, width - len(tokens) :] = tokens
        attention_mask[row, width - len(tokens) :] = 1
    return input_ids, attention_mask


# ------------------------------------------------------------------------------------------------
# lambda = 0 is the Pilot

DECODING = {
    "greedy": dict(do_sample=False),
    "beam": dict(num_beams=4, do_sample=False),
    "sampling": dict(do_sample=True, top_k=0),
}


@pytest.mark.parametrize("decoding", list(DECODING))
def test_lambda_zero_is_the_pilots_own_generate(arch, decoding):
    model = build_pilot_copilot(arch)  # float32, with the Pilot's EOS
    input_ids, kwargs = prompt(batch_size=2), DECODING[decoding]
    pilot = generate(model.pilot, input_ids, seed=0, **kwargs)
    assert not torch.equal(generate(model, input_ids, seed=0, **kwargs), pilot), "the Copilot must act"

    assert torch.equal(generate(model, input_ids, seed=0, copilot_lambda=0.0, **kwargs), pilot)


# ------------------------------------------------------------------------------------------------
# Fused decoding equals the slow reference


@pytest.mark.parametrize("error_form", ERROR_FORMS)
@pytest.mark.parametrize("feedback", FEEDBACK_MODES)
@pytest.mark.parametrize("fusion", FUSION_SPACES)
def test_fused_greedy_equals_full_recomputation(fusion, feedback, error_form):
    model = fused_model(error_form=error_form, fusion=fusion, copilot_feedback=feedback)
    input_ids = prompt()
    fused = greedy(model, input_ids)
    assert not torch.equal(fused, greedy(model, input_ids, copilot_lambda=0.0))

    assert torch.equal(fused, reference_greedy(model, input_ids))


@pytest.mark.parametrize("copilot_lambda", [1.0, 0.5])
@pytest.mark.parametrize("fusion", FUSION_SPACES)
def test_reweight_scores_are_eq_8_of_the_predicted_error(fusion, copilot_lambda):
    """generate() fuses the reweight form's log p + W_out h without forming f_C (at lambda 1 under probs fusion
    one log-softmax): the scores each step hands the later processors are Eq. 8 (or z + lambda f_C) of the f_C a
    full forward returns."""
    model = fused_model(
        error_form="reweight", fusion=fusion, copilot_feedback="observed", copilot_lambda=copilot_lambda
    )
    input_ids = prompt()
    out = greedy(model, input_ids, output_scores=True, return_dict_in_generate=True)
    assert len(out.scores) == NEW_TOKENS
    for step, scores in enumerate(out.scores):
        full = model(out.sequences[:, : input_ids.shape[1] + step])
        logits, predicted_error = full.logits[:, -1], full.predicted_error[:, -1]
        if fusion == "logits":
            expected = logits + copilot_lambda * predicted_error
        else:  # in float64, from the Pilot's probabilities as the Mistake Log entry holds them
            probs = logits.float().softmax(-1).double() + copilot_lambda * predicted_error
            probs = probs.clamp_min(1e-10)
            expected = (probs / probs.sum(-1, keepdim=True)).log()
        torch.testing.assert_close(scores, expected.to(scores.dtype))


def test_generate_validates_its_kwargs_against_generation_mixins_signature():
    """The wrappers' prepare_inputs_for_generation (which asks the forward for no f_C) shows GenerationMixin's
    signature, which generate() reads to validate its kwargs; a misspelt argument is still refused."""
    model = fused_model()
    expected = inspect.signature(model.pilot.prepare_inputs_for_generation)
    assert inspect.signature(model.prepare_inputs_for_generation) == expected
    with pytest.raises(ValueError, match="not_an_argument"):
        generate(model, prompt(), max_new_tokens=2, not_an_argument=1)


def test_reweighted_fusion_floors_as_fuse_scores():
    """A token the fused distribution gives less than the floor reads log(1e-10), as under `fuse_scores`."""
    pilot_logits = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    probs = pilot_logits.softmax(-1)
    reweighted_logits = probs.log() + torch.tensor([[0.0, 2.0, -40.0]], dtype=torch.float64)
    predicted_error = reweighted_logits.softmax(-1) - probs
    fused = fuse_reweighted_logits(pilot_logits, reweighted_logits, probs, 1.0, "probs")
    torch.testing.assert_close(fused, fuse_scores(pilot_logits, predicted_error, 1.0, "probs", probs))
    assert fused[0, 2] == math.log(1e-10)


def test_observed_feedback_picks_the_argmax_of_fused_logits():
    """SPEC section 6: greedy picks the argmax of `fused_logits[:, -1]` of a full forward."""
    model = fused_model("qwen2", copilot_feedback="observed")
    input_ids = prompt()
    sequence = greedy(model, input_ids)
    assert not torch.equal(sequence, greedy(model, input_ids, copilot_lambda=0.0))
    for length in range(input_ids.shape[1], sequence.shape[1]):
        fused_logits = model(sequence[:, :length], return_fused=True).fused_logits
        assert fused_logits[0, -1].argmax() == sequence[0, length]


@pytest.mark.parametrize("feedback", FEEDBACK_MODES)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # rotary and absolute positions
def test_left_padded_batch_equals_one_prompt_at_a_time(arch, feedback):
    model = fused_model(arch, copilot_feedback=feedback)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    prompts = [prompt(length, seed=length)[0] for length in (7, 4, 2)]
    input_ids, attention_mask = left_padded(prompts)

    batched = greedy(model, input_ids, attention_mask=attention_mask)[:, input_ids.shape[1] :]
    for row, tokens in enumerate(prompts):
        alone = greedy(model, tokens[None])[:, len(tokens) :]
        assert not torch.equal(alone, greedy(model, tokens[None], copilot_lambda=0.0)[:, len(tokens) :])
        assert torch.equal(batched[row : row + 1], alone), f"prompt {row}"


@pytest.mark.parametrize("error_form", ERROR_FORMS)
@pytest.mark.parametrize("feedback", FEEDBACK_MODES)
@pytest.mark.parametrize("fusion", FUSION_SPACES)
def test_beam_search_equals_reference_beam_search(fusion, feedback, error_form):
    model = fused_model(error_form=error_form, fusion=fusion, copilot_feedback=feedback)
    input_ids, num_beams = prompt(), 4
    beams = dict(num_beams=num_beams, num_return_sequences=num_beams, do_sample=False)
    out = generate(model, input_ids, return_dict_in_generate=True, **beams)
    assert not torch.equal(out.sequences, generate(model, input_ids, copilot_lambda=0.0, **beams))
    # Beams reordered: a final hypothesis whose ancestors sat in different beam slots over time
    # (step 0 is excluded: every hypothesis starts from beam 0).
    ancestors = out.beam_indices[:, 1:]
    assert (ancestors != ancestors[:, :1]).any()

    assert torch.equal(out.sequences, reference_beam_search(model, input_ids, num_beams))


def assert_decodes_as_the_references(model, input_ids: torch.Tensor, fused: torch.Tensor) -> None:
    """Greedy and beam search give the full recomputation's tokens; a left-padded batch gives each prompt's own,
    with the static cache as with the dynamic one."""
    assert torch.equal(fused, reference_greedy(model, input_ids))
    beams = dict(num_beams=4, num_return_sequences=4, do_sample=False)
    assert torch.equal(generate(model, input_ids, **beams), reference_beam_search(model, input_ids, 4))

    model.generation_config.pad_token_id = PAD_TOKEN_ID
    prompts = [prompt(length, seed=length)[0] for length in (7, 4, 2)]
    padded, attention_mask = left_padded(prompts)
    batched = greedy(model, padded, attention_mask=attention_mask)[:, padded.shape[1] :]
    static = greedy(model, padded, attention_mask=attention_mask, cache_implementation="static")
    assert torch.equal(static[:, padded.shape[1] :], batched)
    for row, tokens in enumerate(prompts):
        assert torch.equal(batched[row : row + 1], greedy(model, tokens[None])[:, len(tokens) :]), (
            f"prompt {row}"
        )


@pytest.mark.parametrize("feedback", FEEDBACK_MODES)
def test_rotary_copilot_decodes_as_the_full_recomputation(feedback):
    """position_encoding="rope": cached keys keep the rotation of their own positions, so greedy, beam search
    and a left-padded batch (positions shifted by the padding) give the references' tokens."""
    model = fused_model(position_encoding="rope", copilot_feedback=feedback)
    input_ids = prompt()
    fused = greedy(model, input_ids)
    assert not torch.equal(fused, greedy(model, input_ids, copilot_lambda=0.0))
    assert not torch.equal(fused, greedy(fused_model(copilot_feedback=feedback), input_ids))
    assert_decodes_as_the_references(model, input_ids, fused)


@pytest.mark.parametrize("token_embedding", [True, "gain"])
@pytest.mark.parametrize("feedback", FEEDBACK_MODES)
def test_a_copilot_with_a_token_embedding_decodes_as_the_full_recomputation(feedback, token_embedding):
    """token_embedding: position j reads E[x_j] (the table's row, or the gains on W_in's column) beside its error
    row, in either feedback mode. Greedy, beam search, a left-padded batch (no term after padding) and the static
    cache give the references' tokens."""
    model = fused_model(token_embedding=token_embedding, copilot_feedback=feedback)
    input_ids = prompt()
    fused = greedy(model, input_ids)
    assert not torch.equal(fused, greedy(model, input_ids, copilot_lambda=0.0))
    with torch.no_grad():
        without_tokens = copy.deepcopy(model)
        without_tokens.copilot.token_embedding.weight.zero_()
    assert not torch.equal(fused, greedy(without_tokens, input_ids))
    assert_decodes_as_the_references(model, input_ids, fused)


@pytest.mark.parametrize("feedback", FEEDBACK_MODES)
def test_chunked_prefill_reads_the_whole_prompt_as_observed(feedback):
    model = fused_model(copilot_feedback=feedback)
    input_ids = prompt(length=9)
    expected = greedy(model, input_ids)
    assert not torch.equal(expected, greedy(model, input_ids, copilot_lambda=0.0))
    assert torch.equal(greedy(model, input_ids, prefill_chunk_size=4), expected)


# ------------------------------------------------------------------------------------------------
# generate() features: sampling, streamers, pipelines, processors after fusion


def test_num_return_sequences_with_sampling():
    model = fused_model()
    input_ids, samples = prompt(batch_size=2), dict(do_sample=True, num_return_sequences=3)
    out = generate(model, input_ids, seed=3, **samples)
    assert out.shape == (6, input_ids.shape[1] + NEW_TOKENS)
    assert not torch.equal(out, generate(model, input_ids, seed=3, copilot_lambda=0.0, **samples))
    assert not torch.equal(out[0], out[1])
    # With top_k=1 every sample collapses onto fused greedy, which needs each expanded row to carry
    # the Copilot state of its own prompt.
    top1 = generate(model, input_ids, seed=3, top_k=1, **samples)
    assert torch.equal(top1, greedy(model, input_ids).repeat_interleave(3, dim=0))


def test_sampling_processors_apply_after_fusion():
    model = fused_model()
    input_ids = prompt()
    expected = greedy(model, input_ids)
    assert torch.equal(generate(model, input_ids, seed=0, do_sample=True, top_k=1), expected)
    assert torch.equal(generate(model, input_ids, seed=0, do_sample=True, top_p=1e-6), expected)

    # Temperature divides the fused scores, not the Pilot's.
    out = generate(
        model,
        input_ids,
        max_new_tokens=1,
        do_sample=True,
        temperature=0.5,
        top_k=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    logits, copilot_errors = reference_step(model, input_ids, input_ids.shape[1], "copilot")
    expected_scores = fuse_scores(logits, copilot_errors, 1.0, "probs") / 0.5
    torch.testing.assert_close(out.scores[0], expected_scores)


class CollectingStreamer(BaseStreamer):
    """Receives what TextStreamer/TextIteratorStreamer receive: the prompt, then the new tokens."""

    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.ended = True


def test_streamer_receives_the_fused_tokens():
    model, streamer = fused_model(), CollectingStreamer()
    input_ids = prompt()
    out = greedy(model, input_ids, streamer=streamer)
    assert streamer.ended
    assert streamer.chunks[0] == input_ids[0].tolist()
    assert sum(streamer.chunks[1:], []) == out[0, input_ids.shape[1] :].tolist()


def test_text_generation_pipeline_matches_generate():
    model, tokenizer = fused_model(), char_tokenizer()
    text = "Copilot 42"
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    assert tokenizer.decode(input_ids[0]) == text
    expected = tokenizer.decode(greedy(model, input_ids)[0], skip_special_tokens=True)
    pilot_text = tokenizer.decode(greedy(model, input_ids, copilot_lambda=0.0)[0], skip_special_tokens=True)
    assert expected != pilot_text

    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    assert generator(text, **settings)[0]["generated_text"] == expected
    assert generator(text, copilot_lambda=0.0, **settings)[0]["generated_text"] == pilot_text


# ------------------------------------------------------------------------------------------------
# Per-call control and loading


@pytest.mark.parametrize(
    "override", [dict(copilot_lambda=0.0), dict(fusion="logits"), dict(copilot_feedback="copilot")]
)
def test_per_call_overrides_equal_config_defaults(override):
    model = fused_model()
    configured = copy.deepcopy(model)  # the same Copilot (one built for copilot feedback has a memory norm)
    for name, value in override.items():
        setattr(configured.config, name, value)
    input_ids = prompt(seed=5)
    default = greedy(model, input_ids)
    overridden = greedy(model, input_ids, **override)
    assert not torch.equal(overridden, default)
    assert torch.equal(overridden, greedy(configured, input_ids))
    assert torch.equal(greedy(model, input_ids), default)  # the override lasts one call


@pytest.mark.parametrize(
    "override", [dict(copilot_lambda=0.0), dict(fusion="logits"), dict(copilot_feedback="copilot")]
)
def test_fusion_settings_in_a_generation_config_act_as_the_keywords(override):
    """transformers keeps a GenerationConfig's unknown fields as custom entries: in the per-call config or the
    model's `generation_config` a fusion setting acts as the keyword would, and a keyword still wins over it
    (transformers writes a keyword into a field the config already has, out of the model's keywords)."""
    model = fused_model()
    input_ids = prompt(seed=5)
    default, overridden = greedy(model, input_ids), greedy(model, input_ids, **override)
    assert not torch.equal(overridden, default)
    per_call = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, **override)
    assert torch.equal(model.generate(input_ids, generation_config=per_call), overridden)
    [name] = override
    model.generation_config.update(allow_custom_entries=True, **override)
    assert torch.equal(greedy(model, input_ids), overridden)
    assert torch.equal(greedy(model, input_ids, **{name: getattr(model.config, name)}), default)


def test_a_fusion_setting_in_a_generation_config_is_validated():
    model = fused_model()
    config = GenerationConfig(max_new_tokens=2, copilot_lambda=float("inf"))
    with pytest.raises(ValueError, match="copilot_lambda must be a finite number >= 0, got inf"):
        model.generate(prompt(), generation_config=config)


@pytest.mark.parametrize("fusion", FUSION_SPACES)
def test_forward_logits_fused_are_the_scores_generate_picks_from(fusion):
    """`forward_logits="fused"`: `model(sequence).logits`, what scoring tools read, are at every generated position
    the scores greedy generate() chose from; generate() itself, and a forward with labels, keep the Pilot's."""
    model = fused_model(fusion=fusion)
    input_ids = prompt(seed=5, batch_size=2)
    expected = greedy(model, input_ids)
    model.config.forward_logits = "fused"
    out = greedy(model, input_ids, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    scored = model(out.sequences[:, :-1]).logits[:, input_ids.shape[1] - 1 :]
    torch.testing.assert_close(scored.float(), torch.stack(out.scores, dim=1))  # generate() scores in float32
    pilot_logits = model.pilot(out.sequences).logits
    assert not torch.allclose(scored, pilot_logits[:, input_ids.shape[1] - 1 : -1])
    assert torch.equal(model(out.sequences, labels=out.sequences).logits, pilot_logits)
    assert torch.equal(model(out.sequences, return_fused=False).logits, pilot_logits)


def test_forward_logits_is_saved_and_set_at_loading(tmp_path):
    model = build_pilot_copilot("llama")
    model.save_pretrained(tmp_path)
    loaded = PilotCopilotForCausalLM.from_pretrained(tmp_path, forward_logits="fused")
    assert loaded.config.forward_logits == "fused"
    loaded.save_pretrained(tmp_path / "fused")
    assert PilotCopilotForCausalLM.from_pretrained(tmp_path / "fused").config.forward_logits == "fused"


def test_generate_returns_the_pilots_attentions_when_asked():
    """`output_attentions=True` (an eager-attention Pilot): generate() collects the Pilot's attention weights from
    each forward, as it does from the Pilot alone (before: AttributeError, the output had no `attentions`)."""
    pilot = build_pilot("llama")
    pilot.set_attn_implementation("eager")
    model = build_pilot_copilot(pilot)
    kwargs = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_attentions=True)
    fused = model.generate(prompt(batch_size=2), copilot_lambda=0.0, **kwargs)
    alone = model.pilot.generate(prompt(batch_size=2), **kwargs)
    assert torch.equal(fused.sequences, alone.sequences)
    assert len(fused.attentions) == 4
    for step, expected in zip(fused.attentions, alone.attentions, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(step, expected, strict=True))
    assert model(prompt()).attentions is None  # not asked: none kept


def test_generation_is_unchanged_after_loading_with_trust_remote_code(tmp_path):
    model = build_pilot_copilot("llama", copilot_lambda=0.8, copilot_feedback="observed")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    # With hf_copilot imported the Auto class resolves to the package's own class; the copied
    # modeling file is what a user without hf_copilot runs, so generate through it as well.
    remote_class = get_class_from_dynamic_module(loaded.config.auto_map["AutoModelForCausalLM"], tmp_path)
    assert remote_class is not PilotCopilotForCausalLM
    remote = remote_class.from_pretrained(tmp_path).eval()
    input_ids = prompt(batch_size=2)
    for kwargs in (dict(do_sample=False), dict(num_beams=3), dict(do_sample=True)):
        expected = generate(model, input_ids, seed=0, **kwargs)
        assert not torch.equal(expected, generate(model, input_ids, seed=0, copilot_lambda=0.0, **kwargs))
        assert torch.equal(generate(loaded, input_ids, seed=0, **kwargs), expected)
        assert torch.equal(generate(remote, input_ids, seed=0, **kwargs), expected)


# ------------------------------------------------------------------------------------------------
# The Copilot's incremental state


def test_the_copilot_runs_once_over_the_prompt_then_one_position_per_step():
    model = fused_model()
    lengths = []
    model.copilot.register_forward_hook(lambda module, args, output: lengths.append(args[0].shape[1]))
    greedy(model, prompt(length=6))
    # The last generated token is never fed back: NEW_TOKENS forwards in all.
    assert lengths == [6] + [1] * (NEW_TOKENS - 1)


def test_the_pilot_gets_no_mask_without_padding_as_in_its_own_generate():
    """No padding: the Pilot's masking builds no mask and reads none back to the host, in every step."""
    model = fused_model()
    masks = []
    model.pilot.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True
    )
    greedy(model, prompt(length=6))
    assert masks == [None] * NEW_TOKENS
    masks.clear()
    batch = build_batch()
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert len(masks) == 3
    assert [mask.shape[1] for mask in masks] == [batch["input_ids"].shape[1] + step for step in range(3)]
    assert all(torch.equal(mask[:, : batch["input_ids"].shape[1]], batch["attention_mask"]) for mask in masks)


def prefilled(feedback: str = "copilot", batch_size: int = 2):
    """A model and a cache that has seen a 5-token prompt and then 3 generated tokens in one call."""
    model = fused_model(copilot_feedback=feedback)
    tokens = prompt(length=8, batch_size=batch_size)
    cache = PilotCopilotCache(config=model.config.get_text_config(decoder=True))
    with torch.no_grad():
        model(tokens[:, :5], cache=cache, use_cache=True)
        out = model(tokens[:, 5:], cache=cache, use_cache=True)
    return model, tokens, cache, out.predicted_error


def copilot_tensors(cache: PilotCopilotCache) -> list[torch.Tensor]:
    state = cache.copilot
    # The written rows only: a buffer's tail past them is uninitialised memory (it may hold NaN, never equal).
    feedback = [
        rows.buffer[:, : rows.end - rows.start]
        for rows in (state.embedded_probs, state.embedded_predicted_errors)
    ]
    return [*state.kv_cache.keys, *state.kv_cache.values, state.decoding_outputs, state.probs, *feedback]


@pytest.mark.parametrize(
    "operation, rows",
    [
        (lambda cache: cache.reorder_cache(torch.tensor([1, 1])), [1, 1]),
        (lambda cache: cache.batch_repeat_interleave(2), [0, 0, 1, 1]),
        (lambda cache: cache.batch_select_indices(torch.tensor([1])), [1]),
    ],
    ids=["reorder_cache", "batch_repeat_interleave", "batch_select_indices"],
)
def test_batch_operations_move_the_copilot_state(operation, rows):
    _, _, cache, _ = prefilled()
    before, pilot_keys = copilot_tensors(cache), cache.layers[0].keys.clone()
    operation(cache)
    assert torch.equal(cache.layers[0].keys, pilot_keys[rows])
    for old, new in zip(before, copilot_tensors(cache), strict=True):
        assert torch.equal(new, old[rows])


@pytest.mark.parametrize("feedback", FEEDBACK_MODES)
def test_crop_rolls_the_copilot_back_and_resumes_from_there(feedback):
    model, tokens, cache, predictions = prefilled(feedback)
    cache.crop(-2)
    kv_cache = cache.copilot.kv_cache
    assert cache.get_seq_length() == kv_cache.length == 6
    # Self-attention layers hold one key per position, cross-attention layers two (x_tilde, h_bar).
    assert [keys.shape[2] for keys in kv_cache.keys] == [6, 12]
    with torch.no_grad():
        resumed = model(tokens[:, 6:], cache=cache, use_cache=True).predicted_error
    torch.testing.assert_close(resumed, predictions[:, 1:])


@pytest.mark.parametrize("feedback", FEEDBACK_MODES)
def test_crop_after_one_token_steps_resumes_from_an_earlier_step(feedback):
    """An assistant drafts one token per forward and is then rolled back several tokens: the feedback of the
    position it returns to comes from an earlier call than the last."""
    model = fused_model(copilot_feedback=feedback)
    tokens = prompt(length=9, batch_size=2)
    cache = PilotCopilotCache(config=model.config.get_text_config(decoder=True))
    with torch.no_grad():
        model(tokens[:, :5], cache=cache, use_cache=True)
        steps = [
            model(tokens[:, j : j + 1], cache=cache, use_cache=True).predicted_error for j in range(5, 9)
        ]
        cache.crop(-3)
        assert cache.get_seq_length() == cache.copilot.kv_cache.length == 6
        resumed = model(tokens[:, 6:], cache=cache, use_cache=True).predicted_error
    assert not torch.allclose(steps[1], steps[2])
    torch.testing.assert_close(resumed, torch.cat(steps[1:], dim=1))
    with pytest.raises(ValueError, match="only positions from"):
        cache.crop(-9)  # back past the first recorded position


def spy(method, calls: list):
    def wrapper(self, *args):
        calls.append(args)
        return method(self, *args)

    return wrapper


@pytest.mark.parametrize("feedback", FEEDBACK_MODES)
def test_assisted_decoding_matches_fused_greedy(feedback, monkeypatch):
    model = fused_model(copilot_feedback=feedback, copilot_lambda=0.05)
    input_ids = prompt(length=4, seed=4)
    expected = greedy(model, input_ids, max_new_tokens=16)
    assert not torch.equal(expected, greedy(model, input_ids, max_new_tokens=16, copilot_lambda=0.0))
    other_pilot = build_pilot("llama", seed=1).double()
    assert torch.equal(greedy(model, input_ids, max_new_tokens=16, assistant_model=other_pilot), expected)

    # With its own Pilot as assistant the fused model accepts some drafts, the first already in the
    # forward that also reads the prompt, and rejects others: the Copilot's state is cropped back.
    crops = []
    monkeypatch.setattr(PilotCopilotCache, "crop", spy(PilotCopilotCache.crop, crops))
    assert torch.equal(greedy(model, input_ids, max_new_tokens=16, assistant_model=model.pilot), expected)
    assert crops[0] == (0,)
    assert any(tokens_to_remove < 0 for (tokens_to_remove,) in crops)


def test_fused_model_as_the_assistant_of_a_sliding_window_model():
    """An assistant's cache is rolled back after each draft; past a sliding window that needs the
    past recording generate() switches on for assistants."""
    main = build_pilot("mistral", seed=3, sliding_window=4).double()
    main.generation_config.eos_token_id = None
    assistant = build_pilot_copilot(build_pilot("mistral", sliding_window=4)).double()
    input_ids = prompt(length=6, seed=1)
    expected = greedy(main, input_ids, max_new_tokens=16)
    assert torch.equal(greedy(main, input_ids, max_new_tokens=16, assistant_model=assistant), expected)


@pytest.mark.parametrize("where", ["pilot config", "generate call"])
def test_fused_generation_uses_a_cache_whatever_use_cache_says(where):
    """Trainer saves Pilots with use_cache=False; the Copilot's state needs the cache, the tokens do not."""
    model = fused_model("llama")
    expected = greedy(model, prompt(batch_size=2))
    if where == "pilot config":
        pilot = copy.deepcopy(model.pilot)
        pilot.config.use_cache = pilot.generation_config.use_cache = False  # as after a stock Trainer run
        rebuilt = PilotCopilotForCausalLM.from_pilot(pilot, copilot_config=model.config.copilot_config)
        rebuilt.copilot.load_state_dict(model.copilot.state_dict())
        assert torch.equal(greedy(rebuilt, prompt(batch_size=2)), expected)
    else:
        assert torch.equal(greedy(model, prompt(batch_size=2), use_cache=False), expected)


def test_a_cache_that_cannot_carry_the_copilot_is_refused():
    model = build_pilot_copilot("llama")
    user_cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    with pytest.raises(ValueError, match="PilotCopilotCache"):
        greedy(model, prompt(), **{CACHE_KEYWORD: user_cache})


def multimodal_batch(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`conftest.multimodal_example`s padded on the left, as generate() takes them."""
    input_ids, attention_mask = left_padded([example["input_ids"] for example in examples])
    token_type_ids = torch.zeros_like(input_ids)
    for row, example in enumerate(examples):
        token_type_ids[row, input_ids.shape[1] - len(example["input_ids"]) :] = example["token_type_ids"]
    pixel_values = torch.stack([example["pixel_values"] for example in examples]).double()
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
        pixel_values=pixel_values,
    )


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_a_multimodal_pilot_generates_from_its_images(cache_implementation):
    """AutoModelForCausalLM loads Gemma 3 checkpoints as Gemma3ForConditionalGeneration, whose generate() takes
    images: `pixel_values` and `token_type_ids` reach the Pilot through the forward's `**kwargs`. At lambda 0 the
    tokens are the Pilot's own; fused, each is the argmax of a full recomputation that sees the same images (no
    image token is generated: each image's tokens match its features)."""
    model = build_pilot_copilot(build_multimodal_pilot(), tiny_copilot_config()).double()
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    batch = multimodal_batch([multimodal_example(2, 3, seed=0), multimodal_example(1, 1, seed=1)])
    image_tokens = [IMAGE_BEGIN_ID, IMAGE_END_ID, IMAGE_TOKEN_ID]
    kwargs = dict(
        max_new_tokens=6,
        do_sample=False,
        suppress_tokens=image_tokens,
        cache_implementation=cache_implementation,
    )
    with torch.no_grad():
        pilot_tokens = model.pilot.generate(**batch, **kwargs)
        assert torch.equal(model.generate(**batch, copilot_lambda=0.0, **kwargs), pilot_tokens)
        fused = model.generate(**batch, **kwargs)
        assert not torch.equal(fused, pilot_tokens)
        sequence, attention_mask, token_type_ids = (
            batch["input_ids"],
            batch["attention_mask"],
            batch["token_type_ids"],
        )
        for _ in range(6):
            scores = model(
                input_ids=sequence,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                pixel_values=batch["pixel_values"],
                return_fused=True,
            ).fused_logits[:, -1]
            scores[:, image_tokens] = -math.inf
            sequence = torch.cat([sequence, scores.argmax(-1, keepdim=True)], dim=1)
            attention_mask = F.pad(attention_mask, (0, 1), value=1)
            token_type_ids = F.pad(token_type_ids, (0, 1))
    assert torch.equal(fused, sequence)


def test_a_keyword_neither_model_takes_is_refused():
    """generate() refuses a keyword that neither the wrapper's forward nor the Pilot's takes, as the Pilot's own
    generate() would (a typo is not passed on in silence)."""
    with pytest.raises(ValueError, match=r"not used by the model: \['pixel_value'\]"):
        greedy(build_pilot_copilot("llama"), prompt(), pixel_value=torch.zeros(1, 3, 8, 8))


def test_continuous_batching_is_refused_with_what_to_use_instead():
    """transformers' paged cache has no room for the Copilot's state: both ways into continuous batching stop
    before any forward, naming generate() and the Pilot's own generate_batch."""
    model = build_pilot_copilot("llama")
    config = GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=None)
    with pytest.raises(
        NotImplementedError, match=r"continuous batching.*generate\(\).*pilot\.generate_batch"
    ):
        model.generate_batch(inputs=[[5, 6, 7]], generation_config=config)
    with pytest.raises(NotImplementedError, match="continuous batching"):
        greedy(model, prompt(), cache_implementation="paged")


# ------------------------------------------------------------------------------------------------
# Static cache and compiled decoding

STATIC_DECODING = {
    "greedy": dict(do_sample=False),
    "beam": dict(num_beams=4, num_return_sequences=4, do_sample=False),
    "sampling": dict(do_sample=True, num_return_sequences=2),
}


# The paper's Copilot (linear head, no positions) and the package's default (reweight head, rotary positions).
COPILOT_KINDS = {"paper": dict(), "default": dict(error_form="reweight", position_encoding="rope")}


@pytest.mark.parametrize("kind", list(COPILOT_KINDS))
@pytest.mark.parametrize("decoding", list(STATIC_DECODING))
@pytest.mark.parametrize("feedback", FEEDBACK_MODES)
def test_static_cache_gives_the_dynamic_caches_tokens(feedback, decoding, kind):
    """Over a static cache each decoding step runs the Copilot's fixed-shape step over its preallocated buffers
    (padding, beam reordering and sampling included)."""
    model = fused_model(copilot_feedback=feedback, **COPILOT_KINDS[kind])
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    input_ids, attention_mask = left_padded([prompt(length, seed=length)[0] for length in (7, 4)])
    kwargs = dict(attention_mask=attention_mask, **STATIC_DECODING[decoding])
    dynamic = generate(model, input_ids, seed=0, **kwargs)
    assert not torch.equal(dynamic, generate(model, input_ids, seed=0, copilot_lambda=0.0, **kwargs))

    out = generate(
        model, input_ids, seed=0, cache_implementation="static", return_dict_in_generate=True, **kwargs
    )
    cache = out[CACHE_KEYWORD]
    assert isinstance(cache, PilotCopilotStaticCache)
    assert isinstance(cache.copilot.kv_cache, StaticCopilotKVCache)
    assert torch.equal(out.sequences, dynamic)


@pytest.mark.parametrize("kind", list(COPILOT_KINDS))
def test_classifier_free_guidance_guides_the_fused_model_by_its_own_unconditional_scores(kind):
    """generate(guidance_scale=g, negative_prompt_ids=...) scores the negative prompt with the model it guides: the
    fused model, as for the prompt itself. Each token is the argmax of g (c - u) + u over full recomputations, c
    and u the log-softmax of the fused scores after the prompt and after the negative prompt, each followed by the
    tokens generated so far. At lambda 0 that is the Pilot's own guided generate()."""
    model = fused_model(**COPILOT_KINDS[kind])
    input_ids, negative = prompt(6), prompt(4, seed=9)
    guidance = dict(guidance_scale=2.0, negative_prompt_ids=negative, max_new_tokens=8)
    out = greedy(model, input_ids, **guidance)
    assert not torch.equal(out, greedy(model, input_ids, max_new_tokens=8))
    assert torch.equal(
        greedy(model, input_ids, copilot_lambda=0.0, **guidance), greedy(model.pilot, input_ids, **guidance)
    )

    sequence = input_ids
    with torch.no_grad():
        for _ in range(8):
            generated = sequence[:, input_ids.shape[1] :]
            scores = [
                model(torch.cat([start, generated], dim=1), return_fused=True)
                .fused_logits[:, -1]
                .log_softmax(-1)
                for start in (input_ids, negative)
            ]
            guided = 2.0 * (scores[0] - scores[1]) + scores[1]
            sequence = torch.cat([sequence, guided.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, sequence)


@pytest.mark.parametrize("kind", list(COPILOT_KINDS))
@pytest.mark.parametrize("feedback", FEEDBACK_MODES)
def test_a_conversations_next_turn_continues_from_the_cache_of_the_last(feedback, kind):
    """The next turn passes the whole conversation with the cache of the generate() call before it. Each token of
    both answers is the argmax of the fused scores of one teacher-forced pass over the conversation, where every
    position reads as generate() read it (`predicted_errors_as_generated`). In the paper's mode the positions the
    first call fed keep the Copilot's own predictions, and the first answer's last token, which that call never
    fed, is the next call's input and reads its observed error, as the new prompt does. In observed mode that is a
    fresh generate() over the conversation."""
    model = fused_model(copilot_feedback=feedback, **COPILOT_KINDS[kind])
    with torch.no_grad():
        first = model.generate(prompt(6), max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    # The first call's 11 tokens, then the new prompt's 3.
    conversation = torch.cat([first.sequences, prompt(3, seed=5)], dim=1)
    out = greedy(model, conversation, max_new_tokens=5, **{CACHE_KEYWORD: first.past_key_values})

    answers = torch.zeros_like(out, dtype=torch.bool)
    answers[:, 6:11] = answers[:, 14:] = True
    fed_back = answers.clone()  # the positions that read the Copilot's own prediction in the paper's mode
    fed_back[:, 10] = False
    with torch.no_grad():
        teacher_forced = model(out, labels=torch.where(fed_back, out, -100), return_mistake_log=True)
        predicted = predicted_errors_as_generated(model.copilot, teacher_forced.mistake_log_entry, feedback)
    config = model.config
    scores = fuse_scores(teacher_forced.logits, predicted, config.copilot_lambda, config.fusion)
    # Position j's token is chosen from position j - 1's scores.
    chosen = torch.cat([out[:, :1], scores[:, :-1].argmax(-1)], dim=1)
    assert torch.equal(chosen[answers], out[answers])
    assert not torch.equal(out, greedy(model, conversation, max_new_tokens=5, copilot_lambda=0.0))
    if feedback == "observed":
        assert torch.equal(out, greedy(model, conversation, max_new_tokens=5))


@pytest.mark.parametrize("feedback", FEEDBACK_MODES)
def test_static_cache_over_a_pilot_whose_every_layer_slides_gives_the_dynamic_caches_tokens(feedback):
    """A Pilot whose every layer attends over a window (Mistral's `sliding_window`) keeps only that window in its
    static cache, whose `get_max_length()` is then the window. The Copilot attends over the whole generation: its
    buffers, and the Pilot's attention mask, take the generation's length."""
    window = 3
    pilot = build_pilot("mistral", sliding_window=window)
    model = fused_model(pilot, copilot_feedback=feedback, **COPILOT_KINDS["default"])
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    input_ids, attention_mask = left_padded([prompt(length, seed=length)[0] for length in (7, 4)])
    dynamic = greedy(model, input_ids, attention_mask=attention_mask)
    assert not torch.equal(
        dynamic, greedy(model, input_ids, attention_mask=attention_mask, copilot_lambda=0.0)
    )

    out = greedy(
        model,
        input_ids,
        attention_mask=attention_mask,
        cache_implementation="static",
        return_dict_in_generate=True,
    )
    cache = out[CACHE_KEYWORD]
    assert cache.get_max_length() == window
    assert cache.max_positions == input_ids.shape[1] + NEW_TOKENS - 1
    assert torch.equal(out.sequences, dynamic)


def test_a_forward_past_the_static_caches_length_is_refused():
    """Even where every layer of the Pilot slides (its own cache would take the position), the Copilot's buffers
    and the Pilot's padded mask hold `max_positions`."""
    model = build_pilot_copilot(build_pilot("mistral", sliding_window=3))
    cache = PilotCopilotStaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=5)
    model(prompt(length=4), **{CACHE_KEYWORD: cache})
    with pytest.raises(ValueError, match="past the 5 positions the PilotCopilotStaticCache was built for"):
        model(prompt(length=2), **{CACHE_KEYWORD: cache})


@pytest.mark.parametrize("kind", list(COPILOT_KINDS))
@pytest.mark.parametrize("feedback", FEEDBACK_MODES)
def test_compiled_decoding_compiles_the_copilot_step_once_and_gives_the_same_tokens(feedback, kind):
    """generate() compiles the per-token forward with a static cache (on CPU only when asked): the Pilot's call
    and the Copilot's decoding step, each as one graph (fullgraph) that every later step of a padded batch reuses;
    the tokens are those of eager decoding with the dynamic cache."""
    model = fused_model(copilot_feedback=feedback, **COPILOT_KINDS[kind])
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    input_ids, attention_mask = left_padded([prompt(length, seed=length)[0] for length in (7, 4)])
    expected = greedy(model, input_ids, attention_mask=attention_mask)
    backend, graphs = graph_recorder()
    compile_config = CompileConfig(backend=backend, mode=None, fullgraph=True)
    compile_config._compile_all_devices = True  # generate() compiles on accelerators only, unless told

    torch._dynamo.reset()
    compiled = greedy(
        model,
        input_ids,
        attention_mask=attention_mask,
        cache_implementation="static",
        compile_config=compile_config,
    )
    assert hasattr(model.pilot, "_compiled_call") and not hasattr(model, "_compiled_call")
    # One graph each for the NEW_TOKENS - 1 decoding steps: no recompilation as the sequences grow.
    copilot_graphs = [graph for graph in graphs if "error_head" in str(graph.graph)]
    assert len(copilot_graphs) == 1 and len(graphs) == 2
    assert torch.equal(compiled, expected)


# --------------------------------------------------------------------------------------------------
# The paper's feedback in training (exposure) and in teacher-forced evaluation


@pytest.mark.parametrize("token_embedding", [False, True, "gain"])
def test_copilot_stream_feeds_answer_positions_the_copilots_own_first_pass_prediction(token_embedding):
    config = tiny_copilot_config(token_embedding=token_embedding)
    model = build_pilot_copilot("llama", config, copilot_std=0.5)
    batch = build_batch(batch_size=2, seq_len=8, left_padding=(0, 0), prompt_len=3)
    entry = model(**batch, return_mistake_log=True).mistake_log_entry
    copilot = model.copilot
    # Hand-built: position j reads W_in e_{j-1}; if token j is an answer token (labels[j] != -100), it
    # reads W_in f_{j-1} from a pass over the observed stream instead. With a token embedding both also
    # read E[x_j].
    tokens = torch.zeros(2, 8, copilot.config.hidden_size)
    tokens[:, 1:] = token_term(copilot, batch["input_ids"][:, 1:])
    observed = torch.zeros(2, 8, copilot.config.hidden_size)
    observed[:, 1:] = entry.errors.dense()[:, :-1] @ copilot.error_proj.weight.t()
    observed += tokens
    first = copilot(observed, entry.x_tilde, entry.h_bar, entry.attention_mask, pilot_errors=entry.errors)
    expected = observed.clone()
    for row in range(2):
        for j in range(1, 8):
            if batch["labels"][row, j] != -100:
                expected[row, j] = copilot.error_proj(first[row, j - 1]) + tokens[row, j]
    torch.testing.assert_close(copilot_stream(copilot, entry, 0.0), observed, rtol=1e-4, atol=1e-4)
    full = copilot_stream(copilot, entry, 1.0)
    torch.testing.assert_close(full, expected, rtol=1e-4, atol=1e-4)
    # A fraction replaces a random subset of those positions and nothing else.
    torch.manual_seed(0)
    half = copilot_stream(copilot, entry, 0.5)
    replaced = (half != copilot_stream(copilot, entry, 0.0)).any(-1)
    answer = batch["labels"] != -100
    assert (replaced <= answer).all() and 0 < replaced.sum() < answer.sum()
    assert torch.equal(half[replaced], full[replaced])


def test_the_linear_heads_own_predictions_reach_the_stream_without_forming_them(monkeypatch):
    """The paper's head: W_in (W_out h) is fed as (W_in W_out) h, no [B,T,V] f_C formed; the stream and W_in's
    gradient are those of the hand-built reference (f_C formed, detached, embedded), and W_out gets none."""
    model = build_pilot_copilot("llama", tiny_copilot_config(error_form="linear"), copilot_std=0.5)
    batch = build_batch(batch_size=2, seq_len=8, left_padding=(0, 0), prompt_len=3)
    entry = model(**batch, return_mistake_log=True).mistake_log_entry
    copilot = model.copilot
    observed = shift_right(copilot.embed_errors(entry.errors))
    with torch.no_grad():
        first = copilot(observed, entry.x_tilde, entry.h_bar, entry.attention_mask, pilot_errors=entry.errors)
    answer = (batch["labels"] != -100).unsqueeze(-1)
    fed = copilot.with_tokens(copilot.error_proj(first), entry.errors.masked_targets(), entry.errors.mask)
    expected = torch.where(answer, shift_right(fed), observed)
    expected.square().sum().backward()
    expected_grad = copilot.error_proj.weight.grad.clone()
    copilot.zero_grad()

    def formed(*args, **kwargs):
        raise AssertionError("the linear head formed f_C for the stream")

    monkeypatch.setattr(copilot, "predicted_error", formed)
    monkeypatch.setattr(copilot, "embed_predicted_errors", formed)
    stream = copilot_stream(copilot, entry, 1.0)
    # float32: (W_in W_out) h and W_in (W_out h) round differently, relative to the stream's largest entry
    torch.testing.assert_close(stream, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    stream.square().sum().backward()
    scale = expected_grad.abs().max().item()  # float32 rounding of sums in another order, relative to it
    torch.testing.assert_close(copilot.error_proj.weight.grad, expected_grad, rtol=1e-5, atol=1e-6 * scale)
    assert copilot.error_head.weight.grad is None


@pytest.mark.parametrize("copilot_feedback", ["observed", "copilot"])
def test_the_vocabulary_head_runs_only_where_generate_reads_it(copilot_feedback):
    """A prefill applies W_out at its last two positions (the scored one and the one assisted decoding may
    crop back to), each decoding step at its one; the tokens are those of the full recomputation."""
    model = fused_model(copilot_feedback=copilot_feedback)
    rows = []
    hook = model.copilot.error_head.register_forward_hook(
        lambda module, args, out: rows.append(args[0].shape[1])
    )
    input_ids = prompt(length=9, batch_size=2)
    tokens = greedy(model, input_ids, max_new_tokens=4)
    hook.remove()
    assert rows == [2, 1, 1, 1]
    assert torch.equal(tokens, reference_greedy(model, input_ids, new_tokens=4))


class ErrorEmbeddingRows(TorchFunctionMode):
    """Counts the rows each forward of `model` embeds through the Copilot's W_in (a [rows, V] x [V, d] product)."""

    def __init__(self, model):
        super().__init__()
        self.weight = model.copilot.error_proj.weight
        self.rows: list[int] = []
        self.hook = model.register_forward_pre_hook(lambda module, args: self.rows.append(0))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear and args[1] is self.weight:
            self.rows[-1] += args[0].shape[:-1].numel() // args[0].shape[0]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("copilot_feedback", "prefill_rows"), [("observed", 9), ("copilot", 9 + 2)])
def test_a_decoding_step_embeds_one_row_through_w_in(copilot_feedback, prefill_rows):
    """A prefill of n tokens embeds the Pilot's probabilities of its n positions once: the errors of its first
    n - 1 positions (the last one's is completed by the next token) and the two rows it keeps both read them (the
    paper's mode embeds those rows' f_C too, which a rollback to them reads); a decoding step embeds one row:
    W_in p observed, W_in f_C in the paper's mode. The tokens are those of the full recomputation."""
    model = fused_model(copilot_feedback=copilot_feedback)
    input_ids = prompt(length=9, batch_size=2)
    with ErrorEmbeddingRows(model) as embedded:
        tokens = greedy(model, input_ids, max_new_tokens=4)
    embedded.hook.remove()
    assert embedded.rows == [prefill_rows, 1, 1, 1]
    assert torch.equal(tokens, reference_greedy(model, input_ids, new_tokens=4))


class SoftmaxCounter(TorchFunctionMode):
    """Counts the softmax calls torch sees, whoever makes them."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def softmax_calls(model, input_ids, **kwargs) -> int:
    with SoftmaxCounter() as counter:
        greedy(model, input_ids, max_new_tokens=5, **kwargs)
    return counter.calls


@pytest.mark.parametrize(
    ("copilot_feedback", "error_form", "softmax_per_forward"),
    [
        ("observed", "linear", 1),
        ("copilot", "linear", 1),
        ("observed", "reweight", 1),
        ("copilot", "reweight", 2),
    ],
)
def test_fused_decoding_adds_one_softmax_per_step(copilot_feedback, error_form, softmax_per_forward):
    """The Mistake Log entry's probabilities serve the fusion too: no second softmax over the vocabulary. The
    reweight form's f_C (a softmax less p) is formed only where the paper's feedback embeds it; generate() fuses
    its logits with one log-softmax."""
    model = fused_model(copilot_feedback=copilot_feedback, error_form=error_form)
    input_ids = prompt(length=6, batch_size=2)
    pilot_only = softmax_calls(model.pilot, input_ids)
    # Five forwards: the prefill and 4 steps.
    assert softmax_calls(model, input_ids) - pilot_only == 5 * softmax_per_forward
