"""Saving and loading: whole checkpoints (in process and as remote code) and Copilot-only ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import build_batch, build_pilot, build_pilot_copilot
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_copilot import CopilotConfig, PilotCopilotForCausalLM, pilot_fingerprint

HUB_FILES = {
    "checkpointing.py",
    "configuration_pilot_copilot.py",
    "generation_pilot_copilot.py",
    "mistake_log_entry.py",
    "modeling_pilot_copilot.py",
}
GENERATE = dict(max_new_tokens=5, do_sample=False, copilot_lambda=1.0)


def inputs():
    batch = build_batch(left_padding=(0, 2))
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def assert_same_outputs(model, loaded):
    with torch.no_grad():
        expected, actual = model(**inputs()), loaded(**inputs())
    assert torch.equal(actual.logits, expected.logits)
    assert torch.equal(actual.predicted_error, expected.predicted_error)


def saved_pilot(arch: str, directory) -> torch.nn.Module:
    """A Pilot that knows where it lives (`name_or_path`), as after fine-tuning and saving it."""
    build_pilot(arch).save_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory).eval()


def assert_tied(pilot):
    assert pilot.get_output_embeddings().weight is pilot.get_input_embeddings().weight


# --------------------------------------------------------------------------------------------------
# Whole checkpoints


def test_save_pretrained_writes_config_with_auto_map_modeling_files_and_safetensors(tmp_path):
    model = build_pilot_copilot("llama")
    model.save_pretrained(tmp_path)
    assert set(os.listdir(tmp_path)) == HUB_FILES | {
        "config.json",
        "generation_config.json",
        "model.safetensors",
    }
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_pilot_copilot.PilotCopilotConfig",
        "AutoModelForCausalLM": "modeling_pilot_copilot.PilotCopilotForCausalLM",
    }
    assert config["model_type"] == "pilot_copilot"
    weights = load_file(tmp_path / "model.safetensors")
    assert any(name.startswith("pilot.") for name in weights)
    assert any(name.startswith("copilot.") for name in weights)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_auto_model_loads_the_checkpoint_with_identical_outputs(arch, tmp_path):
    model = build_pilot_copilot(arch, copilot_lambda=0.7, fusion="logits", copilot_feedback="observed")
    model.save_pretrained(tmp_path)
    for loader in (AutoModelForCausalLM, PilotCopilotForCausalLM):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert type(loaded) is PilotCopilotForCausalLM
        assert (loaded.config.copilot_lambda, loaded.config.fusion, loaded.config.copilot_feedback) == (
            0.7,
            "logits",
            "observed",
        )
        assert loaded.pilot.config._attn_implementation == model.pilot.config._attn_implementation
        assert_same_outputs(model, loaded)


@pytest.mark.parametrize("arch", ["gpt2", "gemma"])
def test_tied_pilot_embeddings_stay_tied_after_loading(arch, tmp_path):
    model = build_pilot_copilot(arch)
    assert_tied(model.pilot)
    model.save_pretrained(tmp_path)
    assert_tied(AutoModelForCausalLM.from_pretrained(tmp_path).pilot)


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys

    sys.modules["hf_copilot"] = None  # `import hf_copilot` now raises ImportError
    import torch
    from transformers import AutoModelForCausalLM

    checkpoint, inputs_path, output_path = sys.argv[1:]
    try:
        import hf_copilot  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("hf_copilot should not be importable here")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    inputs = torch.load(inputs_path)
    with torch.no_grad():
        out = model(**inputs["forward"])
        tokens = model.generate(**inputs["generate"], **inputs["generate_kwargs"])
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
    model = build_pilot_copilot("llama")
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    prompt = {"input_ids": torch.tensor([[5, 9, 13, 17]])}
    torch.save(
        {"forward": inputs(), "generate": prompt, "generate_kwargs": GENERATE},
        tmp_path / "inputs.pt",
    )
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_CODE_SCRIPT)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),  # where transformers copies the remote code
        "PYTHONPATH": "",
        "OMP_NUM_THREADS": "1",  # as in this process (conftest.py), so the arithmetic is the same
    }
    result = subprocess.run(
        [sys.executable, str(script), str(checkpoint), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    remote = torch.load(tmp_path / "out.pt")
    assert remote["module"].startswith("transformers_modules")
    with torch.no_grad():
        local = model(**inputs())
        local_tokens = model.generate(**prompt, **GENERATE)
    assert torch.equal(remote["logits"], local.logits)
    assert torch.equal(remote["predicted_error"], local.predicted_error)
    assert torch.equal(remote["tokens"], local_tokens)
    # The Copilot steers this generation: the comparison is not just the Pilot's own tokens.
    with torch.no_grad():
        assert not torch.equal(local_tokens, model.generate(**prompt, **{**GENERATE, "copilot_lambda": 0.0}))


# --------------------------------------------------------------------------------------------------
# Copilot-only checkpoints (PEFT-style)


def test_save_copilot_writes_only_the_copilot_with_its_base_and_fingerprint(tmp_path):
    pilot = saved_pilot("llama", tmp_path / "pilot")
    model = build_pilot_copilot(pilot, copilot_lambda=0.4, copilot_feedback="observed")
    model.save_copilot(tmp_path / "copilot")
    assert set(os.listdir(tmp_path / "copilot")) == {"config.json", "model.safetensors"}
    config = json.loads((tmp_path / "copilot" / "config.json").read_text())
    assert config["model_type"] == CopilotConfig.model_type
    assert config["base_model_name_or_path"] == str(tmp_path / "pilot")
    assert config["pilot_fingerprint"] == pilot_fingerprint(pilot)
    weights = load_file(tmp_path / "copilot" / "model.safetensors")
    assert weights.keys() == model.copilot.state_dict().keys()
    # Saving the Copilot leaves the live model's config as it was.
    assert model.copilot.config.pilot_fingerprint is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_copilot_checkpoint_loads_onto_its_base_pilot_in_one_call(arch, tmp_path):
    pilot = saved_pilot(arch, tmp_path / "pilot")
    model = build_pilot_copilot(pilot, copilot_lambda=0.4, fusion="logits", copilot_feedback="observed")
    model.save_copilot(tmp_path / "copilot")
    loaded = PilotCopilotForCausalLM.from_pretrained(tmp_path / "copilot").eval()
    assert type(loaded) is PilotCopilotForCausalLM
    assert (loaded.config.copilot_lambda, loaded.config.fusion, loaded.config.copilot_feedback) == (
        0.4,
        "logits",
        "observed",
    )
    assert_same_outputs(model, loaded)
    if arch == "gpt2":
        assert_tied(loaded.pilot)


def test_copilot_checkpoint_without_a_named_base_needs_the_pilot(tmp_path):
    model = build_pilot_copilot("llama")  # built in memory: its Pilot has no name_or_path
    model.save_copilot(tmp_path)
    with pytest.raises(ValueError, match="names no base Pilot: pass pilot="):
        PilotCopilotForCausalLM.from_pretrained(tmp_path)
    assert_same_outputs(model, PilotCopilotForCausalLM.from_pretrained(tmp_path, pilot=model.pilot).eval())


def fine_tuned(pilot, lr: float = 1e-5):
    """The same Pilot after one small sign-SGD step: a different Pilot for the Copilot."""
    batch = build_batch()
    pilot.train()
    pilot(**batch).loss.backward()
    with torch.no_grad():
        for parameter in pilot.parameters():
            parameter -= lr * parameter.grad.sign()
    return pilot.eval()


def test_copilot_checkpoint_refuses_a_pilot_with_other_weights(tmp_path):
    pilot = saved_pilot("llama", tmp_path / "pilot")
    build_pilot_copilot(pilot).save_copilot(tmp_path / "copilot")
    build_pilot("llama", seed=1).save_pretrained(tmp_path / "pilot")  # another Pilot now at the base path
    with pytest.raises(ValueError, match=r"different Pilot \(its weights differ\).*allow_other_pilot=True"):
        PilotCopilotForCausalLM.from_pretrained(tmp_path / "copilot")
    other = build_pilot("llama", seed=2)
    with pytest.raises(ValueError, match="its weights differ"):
        PilotCopilotForCausalLM.from_pretrained(tmp_path / "copilot", pilot=other)
    # On purpose (a merged LoRA Pilot, the transfer experiment): attached with a warning naming the difference.
    with pytest.warns(UserWarning, match="trained with another Pilot: its weights differ"):
        moved = PilotCopilotForCausalLM.from_pretrained(
            tmp_path / "copilot", pilot=other, allow_other_pilot=True
        )
    assert moved.pilot is other
    wider = build_pilot("llama", seed=2, hidden_size=64, intermediate_size=64)
    with pytest.raises(ValueError, match="hidden"):
        PilotCopilotForCausalLM.from_pretrained(tmp_path / "copilot", pilot=wider, allow_other_pilot=True)


def test_copilot_checkpoint_refuses_the_base_when_it_was_trained_with_the_fine_tuned_pilot(tmp_path):
    base = saved_pilot("llama", tmp_path / "base")
    model = build_pilot_copilot(fine_tuned(base))  # joint training changed the Pilot
    model.save_copilot(tmp_path / "copilot")
    assert json.loads((tmp_path / "copilot" / "config.json").read_text())["base_model_name_or_path"] == str(
        tmp_path / "base"
    )
    with pytest.raises(ValueError, match="different Pilot"):
        PilotCopilotForCausalLM.from_pretrained(tmp_path / "copilot")
    # Saving the fine-tuned Pilot and naming it is the documented way out.
    model.pilot.save_pretrained(tmp_path / "fine_tuned")
    loaded = PilotCopilotForCausalLM.from_pretrained(tmp_path / "copilot", pilot=str(tmp_path / "fine_tuned"))
    assert_same_outputs(model, loaded.eval())


def test_copilot_checkpoint_loads_onto_its_base_pilot_in_bfloat16(tmp_path):
    pilot = saved_pilot("llama", tmp_path / "pilot")
    build_pilot_copilot(pilot).save_copilot(tmp_path / "copilot")
    loaded = PilotCopilotForCausalLM.from_pretrained(tmp_path / "copilot", dtype=torch.bfloat16)
    assert loaded.pilot.dtype == loaded.copilot.dtype == torch.bfloat16
