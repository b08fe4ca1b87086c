"""CopilotConfig and PilotCopilotConfig: validation, filling in from the Pilot, round trips."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import HIDDEN_SIZE, VOCAB_SIZE, build_pilot, build_pilot_copilot, tiny_copilot_config
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers import AutoConfig

from hf_copilot import CopilotConfig, PilotCopilotConfig, PilotCopilotForCausalLM
from hf_copilot.configuration_pilot_copilot import validate_fusion_settings

# A field of the wrong type or out of its range is refused as it is set, like LlamaConfig's fields.
BAD_FIELDS = [
    ({"hidden_dropout": -3.0}, "hidden_dropout", "probability between 0.0 and 1.0, got -3.0"),
    ({"attention_dropout": 1.5}, "attention_dropout", "probability between 0.0 and 1.0, got 1.5"),
    ({"num_attention_heads": 0}, "num_attention_heads", "positive integer, got 0"),
    ({"hidden_size": "32"}, "hidden_size", "expected int, got str"),
    ({"hidden_size": -32}, "hidden_size", "positive integer, got -32"),
    ({"intermediate_size": -1}, "intermediate_size", "positive integer, got -1"),
    ({"num_key_value_heads": -2}, "num_key_value_heads", "positive integer, got -2"),
    ({"vocab_size": 0}, "vocab_size", "positive integer, got 0"),
    ({"pilot_hidden_size": -8}, "pilot_hidden_size", "positive integer, got -8"),
    ({"num_hidden_layers": 2.0}, "num_hidden_layers", "expected int, got float"),
    ({"hidden_act": "bogus"}, "hidden_act", "got bogus"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps", "greater than 0.0, got 0.0"),
    ({"initializer_range": -0.02}, "initializer_range", "greater or equal to 0.0 .*got -0.02"),
    ({"attention_bias": 1}, "attention_bias", "expected bool, got int"),
    ({"initial_error_norm": 0.0}, "initial_error_norm", "finite number > 0, or None, got 0.0"),
    ({"initial_error_norm": float("inf")}, "initial_error_norm", "finite number > 0, or None, got inf"),
    ({"error_form": "logits"}, "error_form", "Unknown error_form='logits': use one of"),
    ({"position_encoding": "alibi"}, "position_encoding", "Unknown position_encoding='alibi': use one of"),
    ({"token_embedding": "table"}, "token_embedding", "Unknown token_embedding='table': use one of"),
    ({"token_embedding": 1}, "token_embedding", "value 1 doesn't match any type"),
    ({"error_loss": "huber"}, "error_loss", "Unknown error_loss='huber': use one of"),
    ({"error_proj_init_std": -1.0}, "error_proj_init_std", "finite number > 0, or None, got -1.0"),
    ({"error_proj_init_std": float("nan")}, "error_proj_init_std", "finite number > 0, or None, got nan"),
    (
        {"rotary_scaling": {"rope_type": "yarn", "factor": 4.0}},
        "rotary_scaling",
        "rope_type of \\('linear', 'llama3'\\)",
    ),
    (
        {"rotary_scaling": {"rope_type": "linear"}},
        "rotary_scaling",
        "that type's keys .*got \\{'rope_type': 'linear'\\}",
    ),
    (
        {"rotary_scaling": {"rope_type": "linear", "factor": 0}},
        "rotary_scaling",
        "\\['factor'\\] must be a finite number > 0",
    ),
    (
        {
            "rotary_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 4.0,
                "high_freq_factor": 1.0,
                "original_max_position_embeddings": 64,
            }
        },
        "rotary_scaling",
        "high_freq_factor \\(1.0\\) must exceed its low_freq_factor \\(4.0\\)",
    ),
]


@pytest.mark.parametrize(("setting", "field", "match"), BAD_FIELDS)
def test_copilot_field_out_of_range_raises_naming_the_field(setting, field, match):
    with pytest.raises(StrictDataclassFieldValidationError, match=f"field '{field}':\n.*{match}"):
        tiny_copilot_config(**setting)


@pytest.mark.parametrize(("setting", "field", "match"), BAD_FIELDS)
def test_copilot_field_out_of_range_raises_when_assigned(setting, field, match):
    config = tiny_copilot_config()
    ((name, value),) = setting.items()
    with pytest.raises(StrictDataclassFieldValidationError, match=f"field '{field}':\n.*{match}"):
        setattr(config, name, value)


@pytest.mark.parametrize("layers", [0, 1, 3, 5, -2])
def test_copilot_layers_must_be_even_and_at_least_two(layers):
    with pytest.raises(StrictDataclassClassValidationError, match="num_hidden_layers must be even and >= 2"):
        CopilotConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4)


def test_copilot_hidden_size_must_split_into_heads():
    with pytest.raises(StrictDataclassClassValidationError, match=r"hidden_size \(30\) must be divisible by"):
        CopilotConfig(hidden_size=30, num_hidden_layers=2, num_attention_heads=4)


def test_rotary_copilot_needs_an_even_head_dim():
    CopilotConfig(hidden_size=36, num_hidden_layers=2, num_attention_heads=4, position_encoding="none")
    with pytest.raises(StrictDataclassClassValidationError, match=r"head_dim .* = 9\) must be even"):
        CopilotConfig(hidden_size=36, num_hidden_layers=2, num_attention_heads=4, position_encoding="rope")


def test_copilot_query_heads_must_be_a_multiple_of_key_value_heads():
    with pytest.raises(StrictDataclassClassValidationError, match="multiple of num_key_value_heads"):
        CopilotConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=3)


@pytest.mark.parametrize(
    ("setting", "match"),
    [
        ({"num_hidden_layers": 3}, "num_hidden_layers must be even and >= 2"),
        ({"hidden_size": 30}, "divisible by num_attention_heads"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ],
)
def test_copilot_mutated_after_construction_is_refused_by_validate_architecture(setting, match, tmp_path):
    config = tiny_copilot_config()
    for name, value in setting.items():
        setattr(config, name, value)  # of the right type: accepted until the rules between fields run
    with pytest.raises(ValueError, match=match):
        config.validate_architecture()
    with pytest.raises(StrictDataclassClassValidationError, match=match):
        config.save_pretrained(tmp_path)


def test_pilot_copilot_validate_architecture_checks_the_nested_copilot():
    config = PilotCopilotConfig(text_config=build_pilot("llama").config, copilot_config=tiny_copilot_config())
    config.validate_architecture()
    config.copilot_config.num_hidden_layers = 3
    with pytest.raises(ValueError, match="num_hidden_layers must be even and >= 2"):
        config.validate_architecture()
    config.copilot_config.num_hidden_layers = 2
    config.copilot_config.vocab_size = 100
    with pytest.raises(ValueError, match=r"Copilot's vocabulary \(100\) differs"):
        config.validate_architecture()


def test_copilot_defaults_follow_the_shape():
    config = CopilotConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    assert config.num_key_value_heads == 4
    assert config.intermediate_size == 128
    assert config.head_dim == 8
    assert config.vocab_size is None and config.pilot_hidden_size is None


@pytest.mark.parametrize("copilot_hidden", [32, 16])
def test_vocab_and_pilot_hidden_size_are_filled_in_on_attach(copilot_hidden):
    model = PilotCopilotForCausalLM.from_pilot(
        build_pilot("llama"), tiny_copilot_config(hidden_size=copilot_hidden)
    )
    assert model.copilot.config.vocab_size == VOCAB_SIZE
    assert model.copilot.config.pilot_hidden_size == HIDDEN_SIZE
    assert model.copilot.error_proj.weight.shape == (copilot_hidden, VOCAB_SIZE)
    assert model.copilot.error_head.weight.shape == (VOCAB_SIZE, copilot_hidden)
    if copilot_hidden != HIDDEN_SIZE:
        assert model.copilot.memory_proj.weight.shape == (copilot_hidden, HIDDEN_SIZE)


def test_one_copilot_config_serves_pilots_of_different_vocabularies():
    """Filling in the sizes for one Pilot must not pin them for the next one."""
    copilot_config = tiny_copilot_config()
    PilotCopilotForCausalLM.from_pilot(build_pilot("llama"), copilot_config)
    other = PilotCopilotForCausalLM.from_pilot(build_pilot("llama", vocab_size=80), copilot_config)
    assert other.copilot.config.vocab_size == 80


def test_copilot_vocabulary_different_from_the_pilots_raises():
    with pytest.raises(ValueError, match=r"Copilot's vocabulary \(100\) differs from the Pilot's \(64\)"):
        PilotCopilotForCausalLM.from_pilot(build_pilot("llama"), tiny_copilot_config(vocab_size=100))


def test_pilot_hidden_size_different_from_the_pilots_raises():
    with pytest.raises(ValueError, match="Pilot's hidden size is 32"):
        PilotCopilotForCausalLM.from_pilot(build_pilot("llama"), tiny_copilot_config(pilot_hidden_size=48))


BAD_SETTINGS = [
    ({"fusion": "bogus"}, "Unknown fusion='bogus'"),
    ({"copilot_feedback": "bogus"}, "Unknown copilot_feedback='bogus'"),
    ({"copilot_lambda": -1.0}, "copilot_lambda must be a finite number >= 0"),
    ({"copilot_lambda": float("nan")}, "copilot_lambda must be a finite number >= 0"),
    ({"copilot_lambda": float("inf")}, "copilot_lambda must be a finite number >= 0"),
]


@pytest.mark.parametrize(("setting", "match"), BAD_SETTINGS)
def test_unknown_fusion_settings_raise_in_from_pilot(setting, match):
    with pytest.raises(ValueError, match=match):
        PilotCopilotForCausalLM.from_pilot(build_pilot("llama"), tiny_copilot_config(), **setting)


@pytest.mark.parametrize(("setting", "match"), BAD_SETTINGS)
def test_unknown_fusion_settings_raise_in_the_config(setting, match):
    ((field, _),) = setting.items()
    with pytest.raises(StrictDataclassFieldValidationError, match=f"field '{field}':\n.*{match}"):
        PilotCopilotConfig(
            text_config=build_pilot("llama").config, copilot_config=tiny_copilot_config(), **setting
        )


@pytest.mark.parametrize(("setting", "match"), BAD_SETTINGS)
def test_unknown_fusion_settings_raise_when_assigned_to_the_config(setting, match):
    config = PilotCopilotConfig(text_config=build_pilot("llama").config, copilot_config=tiny_copilot_config())
    ((field, value),) = setting.items()
    with pytest.raises(StrictDataclassFieldValidationError, match=f"field '{field}':\n.*{match}"):
        setattr(config, field, value)


def test_an_unknown_forward_logits_is_refused():
    match = r"field 'forward_logits':\n.*Unknown forward_logits='probs': use one of \('pilot', 'fused'\)"
    with pytest.raises(StrictDataclassFieldValidationError, match=match):
        PilotCopilotConfig(
            text_config=build_pilot("llama").config,
            copilot_config=tiny_copilot_config(),
            forward_logits="probs",
        )
    config = PilotCopilotConfig(text_config=build_pilot("llama").config, copilot_config=tiny_copilot_config())
    with pytest.raises(StrictDataclassFieldValidationError, match=match):
        config.forward_logits = "probs"


@pytest.mark.parametrize("copilot_lambda", [True, False])
def test_boolean_copilot_lambda_is_refused(copilot_lambda):
    with pytest.raises(ValueError, match="copilot_lambda must be a finite number >= 0"):
        validate_fusion_settings(copilot_lambda, "probs", "copilot")
    with pytest.raises(StrictDataclassFieldValidationError, match="field 'copilot_lambda'"):
        PilotCopilotConfig(
            text_config=build_pilot("llama").config,
            copilot_config=tiny_copilot_config(),
            copilot_lambda=copilot_lambda,
        )


def test_integer_copilot_lambda_is_accepted():
    config = PilotCopilotConfig(
        text_config=build_pilot("llama").config, copilot_config=tiny_copilot_config(), copilot_lambda=0
    )
    config.copilot_lambda = 2
    assert config.copilot_lambda == 2


@pytest.mark.parametrize(("setting", "match"), BAD_SETTINGS)
def test_unknown_fusion_settings_raise_per_call_in_forward(setting, match):
    model = PilotCopilotForCausalLM.from_pilot(build_pilot("llama"), tiny_copilot_config())
    with pytest.raises(ValueError, match=match):
        model(torch.tensor([[3, 4, 5]]), **setting)


@pytest.mark.parametrize(("setting", "match"), BAD_SETTINGS)
def test_unknown_fusion_settings_raise_per_call_in_generate(setting, match):
    model = PilotCopilotForCausalLM.from_pilot(build_pilot("llama"), tiny_copilot_config())
    with pytest.raises(ValueError, match=match):
        model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=2, do_sample=False, **setting)


def test_pilot_copilot_config_round_trips_through_save_pretrained(tmp_path):
    model = PilotCopilotForCausalLM.from_pilot(
        build_pilot("qwen2"),
        tiny_copilot_config(hidden_size=16),
        copilot_lambda=0.3,
        fusion="logits",
        copilot_feedback="observed",
    )
    model.config.save_pretrained(tmp_path)
    for loader in (PilotCopilotConfig, AutoConfig):
        loaded = loader.from_pretrained(tmp_path)
        assert isinstance(loaded, PilotCopilotConfig)
        assert (loaded.copilot_lambda, loaded.fusion, loaded.copilot_feedback) == (0.3, "logits", "observed")
        assert loaded.text_config.to_dict() == model.config.text_config.to_dict()
        assert loaded.copilot_config.to_dict() == model.config.copilot_config.to_dict()
        saved = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
        assert {k: v for k, v in loaded.to_dict().items() if k != "_name_or_path"} == saved


def test_copilot_config_round_trips_through_save_pretrained(tmp_path):
    config = tiny_copilot_config(
        vocab_size=64,
        pilot_hidden_size=24,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rotary_scaling={"rope_type": "linear", "factor": 2.0},
    )
    config.save_pretrained(tmp_path)
    loaded = CopilotConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CopilotConfig)


def test_copilot_only_checkpoint_config_keeps_its_extra_attributes(tmp_path):
    """save_copilot sets the fusion settings on a CopilotConfig; they must survive a round trip."""
    config = tiny_copilot_config(vocab_size=64, pilot_hidden_size=32)
    config.base_model_name_or_path = "some/pilot"
    config.pilot_fingerprint = "ab" * 32
    config.copilot_lambda, config.fusion, config.copilot_feedback = 0.3, "logits", "observed"
    assert CopilotConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    assert CopilotConfig(**config.to_dict()).to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    loaded = CopilotConfig.from_pretrained(tmp_path)
    assert (loaded.copilot_lambda, loaded.fusion, loaded.copilot_feedback) == (0.3, "logits", "observed")
    assert (loaded.base_model_name_or_path, loaded.pilot_fingerprint) == ("some/pilot", "ab" * 32)
    assert loaded.to_dict() == config.to_dict()


def test_a_config_edited_after_construction_is_refused_when_a_model_is_built_or_saved(tmp_path):
    from hf_copilot import CopilotModel

    config = CopilotConfig(hidden_size=16, num_attention_heads=2, vocab_size=8, pilot_hidden_size=16)
    config.num_hidden_layers = 3
    with pytest.raises(ValueError, match="num_hidden_layers must be even and >= 2"):
        CopilotModel(config)
    model = build_pilot_copilot("llama")
    model.config.copilot_config.num_hidden_layers = 3
    with pytest.raises(Exception, match="num_hidden_layers must be even and >= 2"):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


@pytest.mark.parametrize(
    ("feedback", "memory_norm", "expected"),
    [("observed", None, False), ("copilot", None, True), ("copilot", False, False), ("observed", True, True)],
)
def test_the_memory_norm_follows_the_feedback_the_copilot_is_built_for(feedback, memory_norm, expected):
    """Unset, the Copilot RMS-normalises the Pilot's states exactly when it is built for the paper's feedback
    mode; set, it is what the user asked for. The caller's config is left unset."""
    config = tiny_copilot_config(memory_norm=memory_norm)
    model = PilotCopilotForCausalLM.from_pilot(build_pilot("llama"), config, copilot_feedback=feedback)
    assert model.copilot.config.memory_norm is expected
    assert isinstance(model.copilot.memory_norm, torch.nn.Identity) is not expected
    assert config.memory_norm is memory_norm


@pytest.mark.parametrize(
    ("feedback", "qk_norm", "expected"),
    [("observed", None, True), ("copilot", None, False), ("observed", False, False), ("copilot", True, True)],
)
def test_the_query_and_key_norms_follow_the_feedback_the_copilot_is_built_for(feedback, qk_norm, expected):
    """Unset, a Copilot built for observed feedback RMS-normalises each head's queries and keys and one built for the
    paper's mode does not; set, it is what the user asked for. The caller's config is left unset."""
    config = tiny_copilot_config(qk_norm=qk_norm)
    model = PilotCopilotForCausalLM.from_pilot(build_pilot("llama"), config, copilot_feedback=feedback)
    assert model.copilot.config.qk_norm is expected
    attentions = [layer.self_attn for layer in model.copilot.layers]
    assert {(a.q_norm is not None, a.k_norm is not None) for a in attentions} == {(expected, expected)}
    assert config.qk_norm is qk_norm


@pytest.mark.parametrize(
    ("feedback", "error_form", "error_loss", "expected"),
    [
        ("observed", None, None, ("reweight", "cross_entropy")),
        ("copilot", None, None, ("linear", "squared_error")),
        ("copilot", None, "cross_entropy", ("reweight", "cross_entropy")),
        ("observed", "linear", None, ("linear", "squared_error")),
        ("copilot", "reweight", None, ("reweight", "cross_entropy")),
    ],
)
def test_the_head_follows_the_feedback_the_copilot_is_built_for(feedback, error_form, error_loss, expected):
    """Unset, the Copilot gets the reweight head on the cross-entropy for observed feedback and the paper's
    linear head on the squared error for the paper's mode; a field set is kept. The caller's config is left
    unset, and the Copilot computes what its config says."""
    config = tiny_copilot_config(error_form=error_form, error_loss=error_loss)
    model = PilotCopilotForCausalLM.from_pilot(build_pilot("llama"), config, copilot_feedback=feedback)
    assert (model.copilot.config.error_form, model.copilot.config.error_loss) == expected
    assert config.error_form == error_form
    if error_form is None:  # a form set resolves its own loss at once; without one it waits for the feedback
        assert config.error_loss == error_loss
    assert model.copilot.computes_loss_without_output  # each pair's training loss reads W_out's weight


@pytest.mark.parametrize(
    ("error_form", "error_loss", "expected"),
    [
        ("linear", None, "squared_error"),
        ("reweight", None, "cross_entropy"),
        ("reweight", "squared_error", "squared_error"),
        ("reweight", "cross_entropy", "cross_entropy"),
    ],
)
def test_the_error_loss_defaults_to_the_error_forms_own(error_form, error_loss, expected, tmp_path):
    config = tiny_copilot_config(error_form=error_form, error_loss=error_loss)
    assert config.error_loss == expected
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["error_loss"] == expected


def test_a_cross_entropy_loss_needs_the_reweight_form():
    """A linear head's p + f_C is not a distribution: there is no log-loss to take."""
    with pytest.raises(StrictDataclassClassValidationError, match="only error_form='reweight' guarantees"):
        tiny_copilot_config(error_form="linear", error_loss="cross_entropy")
    config = tiny_copilot_config(error_form="reweight")
    config.error_form = "linear"  # the resolved cross-entropy stays: refused by the rules between fields
    with pytest.raises(ValueError, match="Set error_form='reweight', or error_loss='squared_error'"):
        config.validate_architecture()
