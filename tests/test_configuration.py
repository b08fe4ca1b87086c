"""CopilotConfig and PilotCopilotConfig: validation, filling in from the Pilot, round trips."""

from __future__ import annotations

import pytest
import torch
from conftest import HIDDEN_SIZE, VOCAB_SIZE, build_pilot, tiny_copilot_config
from transformers import AutoConfig

from hf_copilot import CopilotConfig, PilotCopilotConfig, PilotCopilotForCausalLM


@pytest.mark.parametrize("layers", [0, 1, 3, 5])
def test_copilot_layers_must_be_even_and_at_least_two(layers):
    with pytest.raises(ValueError, match="even and >= 2"):
        CopilotConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4)


def test_copilot_hidden_size_must_split_into_heads():
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        CopilotConfig(hidden_size=30, num_hidden_layers=2, num_attention_heads=4)


def test_copilot_query_heads_must_be_a_multiple_of_key_value_heads():
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        CopilotConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=3)


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
]


@pytest.mark.parametrize(("setting", "match"), BAD_SETTINGS)
def test_unknown_fusion_settings_raise_in_from_pilot(setting, match):
    with pytest.raises(ValueError, match=match):
        PilotCopilotForCausalLM.from_pilot(build_pilot("llama"), tiny_copilot_config(), **setting)


@pytest.mark.parametrize(("setting", "match"), BAD_SETTINGS)
def test_unknown_fusion_settings_raise_in_the_config(setting, match):
    with pytest.raises(ValueError, match=match):
        PilotCopilotConfig(
            text_config=build_pilot("llama").config, copilot_config=tiny_copilot_config(), **setting
        )


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
        vocab_size=64, pilot_hidden_size=24, num_key_value_heads=2, rms_norm_eps=1e-5
    )
    config.save_pretrained(tmp_path)
    loaded = CopilotConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CopilotConfig)
