"""Saving and loading: whole checkpoints (in process and as remote code) and Copilot-only ones."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import (
    CAUSAL_HUB_FILES,
    build_batch,
    build_pilot,
    build_pilot_copilot,
    run_without_hf_copilot,
    tiny_copilot_config,
)
from huggingface_hub.errors import StrictDataclassFieldValidationError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_copilot
from hf_copilot import CopilotConfig, PilotCopilotForCausalLM, pilot_fingerprint

HUB_FILES = CAUSAL_HUB_FILES
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


def exactly(text: str) -> str:
    """A `match=` pattern that accepts this message and no other."""
    return f"^{re.escape(text)}$"


def rewrite_weights(folder, drop=(), add=None) -> None:
    """Edit a saved model.safetensors: drop tensors by name and add others, as a damaged checkpoint would be."""
    path = folder / "model.safetensors"
    weights = {name: tensor for name, tensor in load_file(path).items() if name not in drop}
    save_file({**weights, **(add or {})}, path, metadata={"format": "pt"})


def edit_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


NO_LOADING_PROBLEMS = {
    "missing_keys": set(),
    "unexpected_keys": set(),
    "mismatched_keys": set(),
    "error_msgs": [],
}
RESAVE = (
    "a missing tensor would be left randomly initialised. Save the checkpoint again from the trained model "
    "(save_pretrained for the whole model, save_copilot for a Copilot)."
)


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


@pytest.mark.parametrize("loader", [AutoModelForCausalLM, PilotCopilotForCausalLM])
def test_output_loading_info_still_returns_the_tuple_and_tied_weights_are_not_missing(loader, tmp_path):
    model = build_pilot_copilot("gpt2")
    model.save_pretrained(tmp_path)
    loaded, info = loader.from_pretrained(tmp_path, output_loading_info=True)
    assert info == NO_LOADING_PROBLEMS
    assert_tied(loaded.pilot)
    assert_same_outputs(model, loaded.eval())


@pytest.mark.parametrize(
    "arch, drop, add, also_missing",
    [
        ("llama", "copilot.", {}, []),  # a checkpoint of the Pilot alone under the wrapper's config
        ("llama", "pilot.model.layers.1.mlp.down_proj.weight", {}, []),
        # The source of the tied LM head: the head has nothing to be tied to, so it is missing too.
        ("gpt2", "pilot.transformer.wte.weight", {}, ["pilot.lm_head.weight"]),
        (
            "llama",
            None,
            {"copilot.extra_head.weight": torch.zeros(2, 2), "pilot.lm_head.bias": torch.zeros(64)},
            [],
        ),
    ],
    ids=["copilot", "pilot", "tied-embeddings", "extra"],
)
def test_a_whole_checkpoint_with_missing_or_extra_tensors_is_refused_naming_them(
    arch, drop, add, also_missing, tmp_path
):
    build_pilot_copilot(arch).save_pretrained(tmp_path)
    dropped = [name for name in load_file(tmp_path / "model.safetensors") if drop and name.startswith(drop)]
    rewrite_weights(tmp_path, drop=dropped, add=add)
    missing, problems = sorted(dropped + also_missing), []
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        problems.append(f"missing tensors: {len(missing)} ({shown})")
    if add:
        problems.append(f"unexpected tensors: {len(add)} ({', '.join(sorted(add))})")
    message = (
        f"The weights in {tmp_path} are not those of the model its config.json describes "
        f"({'; '.join(problems)}): {RESAVE}"
    )
    for loader in (AutoModelForCausalLM, PilotCopilotForCausalLM):
        with pytest.raises(ValueError, match=exactly(message)):
            loader.from_pretrained(tmp_path)
    if drop == "copilot.":
        assert problems == [
            "missing tensors: 27 (copilot.error_head.weight, copilot.error_proj.weight, "
            "copilot.layers.0.input_layernorm.weight, ...)"
        ]


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


@pytest.mark.parametrize("kind", ["whole", "copilot-only"])
def test_remote_code_loads_without_hf_copilot_and_gives_identical_outputs(kind, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    if kind == "whole":  # with a rope scaling, which the remote code must read from the file too
        model = build_pilot_copilot(
            "llama", tiny_copilot_config(rotary_scaling={"rope_type": "linear", "factor": 4.0})
        )
        model.save_pretrained(checkpoint)
    else:  # loads its base Pilot (a local folder here) and attaches the Copilot
        model = build_pilot_copilot(saved_pilot("llama", tmp_path / "pilot"))
        model.save_copilot(checkpoint)
    prompt = {"input_ids": torch.tensor([[5, 9, 13, 17]])}
    torch.save(
        {"forward": inputs(), "generate": prompt, "generate_kwargs": GENERATE},
        tmp_path / "inputs.pt",
    )
    run_without_hf_copilot(
        REMOTE_CODE_SCRIPT, tmp_path, checkpoint, tmp_path / "inputs.pt", tmp_path / "out.pt"
    )
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
# Loading runs no code from the folder

LOAD_SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    from hf_copilot import PilotCopilotForCausalLM

    outcomes = {}
    for folder in sys.argv[1:]:
        try:
            PilotCopilotForCausalLM.from_pretrained(folder)
            outcomes[folder] = "loaded"
        except Exception as error:
            outcomes[folder] = f"{type(error).__name__}: {error}"
    print(json.dumps(outcomes))
    """
)


def plant_payload(folder, marker) -> None:
    """A module that records being imported, named by the folder's auto_map and by its modeling files."""
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    (folder / "payload.py").write_text(payload)
    for name in ("configuration_pilot_copilot.py", "modeling_pilot_copilot.py"):
        if (folder / name).exists():
            (folder / name).write_text(payload + (folder / name).read_text())
    edit_config(folder, auto_map={"AutoConfig": "payload.Config", "AutoModelForCausalLM": "payload.Model"})


def test_loading_a_folder_never_runs_its_code(tmp_path):
    folders = {"built_in": tmp_path / "llama", "unknown": tmp_path / "unknown", "whole": tmp_path / "whole"}
    build_pilot("llama").save_pretrained(folders["built_in"])
    folders["unknown"].mkdir()
    (folders["unknown"] / "config.json").write_text(json.dumps({"model_type": "payload_model"}))
    build_pilot_copilot("llama").save_pretrained(folders["whole"])  # its modeling files get the payload too
    for kind, folder in folders.items():
        plant_payload(folder, tmp_path / f"ran_{kind}")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(hf_copilot.__file__).parents[1]),  # this very hf_copilot
    }
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, *map(str, folders.values())],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(path.name for path in tmp_path.glob("ran_*")) == []  # no payload ran
    copied_to_run = [path.name for path in (tmp_path / "modules").rglob("*.py") if path.name != "__init__.py"]
    assert copied_to_run == []

    def plain(kind: str, model_type: str) -> str:
        return (
            f"ValueError: {folders[kind]} is a plain model folder (model_type {model_type!r}), not a "
            "Pilot+Copilot or Copilot checkpoint. Attach a Copilot to that model with "
            "PilotCopilotForCausalLM.from_pilot(AutoModelForCausalLM.from_pretrained(path))."
        )

    assert json.loads(result.stdout) == {
        str(folders["built_in"]): plain("built_in", "llama"),
        str(folders["unknown"]): plain("unknown", "payload_model"),
        str(folders["whole"]): "loaded",  # with hf_copilot's own classes
    }


def test_a_plain_pilot_folder_is_refused_with_how_to_attach_a_copilot(tmp_path):
    build_pilot("gpt2").save_pretrained(tmp_path)  # before: a default 7B LLaMA was built for it
    with pytest.raises(ValueError) as error:
        PilotCopilotForCausalLM.from_pretrained(tmp_path)
    assert str(error.value) == (
        f"{tmp_path} is a plain model folder (model_type 'gpt2'), not a Pilot+Copilot or Copilot checkpoint. "
        "Attach a Copilot to that model with "
        "PilotCopilotForCausalLM.from_pilot(AutoModelForCausalLM.from_pretrained(path))."
    )


# --------------------------------------------------------------------------------------------------
# Copilot-only checkpoints (PEFT-style)


def test_save_copilot_writes_only_the_copilot_with_its_base_and_fingerprint(tmp_path):
    pilot = saved_pilot("llama", tmp_path / "pilot")
    model = build_pilot_copilot(pilot, copilot_lambda=0.4, copilot_feedback="observed")
    model.save_copilot(tmp_path / "copilot")
    assert set(os.listdir(tmp_path / "copilot")) == {"config.json", "model.safetensors"} | HUB_FILES
    config = json.loads((tmp_path / "copilot" / "config.json").read_text())
    assert config["model_type"] == CopilotConfig.model_type
    assert config["auto_map"] == {
        "AutoConfig": "configuration_pilot_copilot.CopilotConfig",
        "AutoModelForCausalLM": "modeling_pilot_copilot.CopilotCheckpointForCausalLM",
    }
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
    _, info = PilotCopilotForCausalLM.from_pretrained(tmp_path / "copilot", output_loading_info=True)
    assert info == NO_LOADING_PROBLEMS  # the Pilot's loading info: the Copilot's tensors are checked


@pytest.mark.parametrize("copilot_only", [False, True])
def test_a_checkpoint_saved_before_position_encoding_existed_loads_without_positions(copilot_only, tmp_path):
    """Such files have no `position_encoding`: they load as the Copilot they were saved with ("none"), not with
    today's default, and give the same outputs."""
    pilot = saved_pilot("llama", tmp_path / "pilot")
    model = build_pilot_copilot(pilot, tiny_copilot_config(position_encoding="none"))
    folder = tmp_path / "model"
    model.save_copilot(folder) if copilot_only else model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    if copilot_only:
        del config["position_encoding"]
    else:
        del config["copilot_config"]["position_encoding"]
    (folder / "config.json").write_text(json.dumps(config))
    assert CopilotConfig().position_encoding == "rope"

    loaded = PilotCopilotForCausalLM.from_pretrained(folder).eval()
    assert loaded.copilot.config.position_encoding == "none"
    assert_same_outputs(model, loaded)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory_norm", True),
        ("projected_memory_norm", True),
        ("token_embedding", True),
        ("token_embedding", "gain"),
    ],
)
def test_a_copilots_optional_weight_is_saved_and_loads_as_saved(field, value, tmp_path):
    """The memory norms' scales and the token term (table or gains): in the file, and loaded into a Copilot that
    has them."""
    model = build_pilot_copilot("llama", tiny_copilot_config(**{field: value}))  # the token term is re-drawn
    weight = getattr(model.copilot, field).weight
    if field.endswith("memory_norm"):  # ones at initialisation, what a missing tensor would get too
        with torch.no_grad():
            weight.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path)
    assert torch.equal(load_file(tmp_path / "model.safetensors")[f"copilot.{field}.weight"], weight)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert getattr(loaded.copilot.config, field) == value
    assert_same_outputs(model.eval(), loaded)


def saved_as_an_earlier_version(model, folder, copilot_only: bool, field: str):
    """`model` saved (whole, or its Copilot only) as a version before the Copilot config's `field` existed."""
    model.save_copilot(folder) if copilot_only else model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    del (config if copilot_only else config["copilot_config"])[field]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("copilot_only", [False, True])
def test_a_paper_mode_checkpoint_saved_before_memory_norm_existed_loads_without_it(copilot_only, tmp_path):
    """Such files have no `memory_norm`: a Copilot built for the paper's feedback mode would get one today; it
    loads as it was trained, without, and gives the same outputs."""
    pilot = saved_pilot("llama", tmp_path / "pilot")
    model = build_pilot_copilot(pilot, tiny_copilot_config(memory_norm=False), copilot_feedback="copilot")
    folder = saved_as_an_earlier_version(model, tmp_path / "model", copilot_only, "memory_norm")

    loaded = PilotCopilotForCausalLM.from_pretrained(folder).eval()
    assert loaded.config.copilot_feedback == "copilot"
    assert loaded.copilot.config.memory_norm is False
    assert_same_outputs(model.eval(), loaded)


@pytest.mark.parametrize("copilot_only", [False, True])
def test_a_checkpoint_saved_before_token_embedding_existed_loads_without_it(copilot_only, tmp_path):
    """Such files have no `token_embedding`: a Copilot gets one today; it loads as it was trained, without (no
    missing weight initialised), and gives the same outputs."""
    pilot = saved_pilot("llama", tmp_path / "pilot")
    model = build_pilot_copilot(pilot, tiny_copilot_config(token_embedding=False))
    folder = saved_as_an_earlier_version(model, tmp_path / "model", copilot_only, "token_embedding")

    loaded = PilotCopilotForCausalLM.from_pretrained(folder).eval()
    assert loaded.copilot.config.token_embedding is False and loaded.copilot.token_embedding is None
    assert_same_outputs(model.eval(), loaded)


@pytest.mark.parametrize("copilot_only", [False, True])
def test_a_checkpoint_saved_before_projected_memory_norm_existed_loads_without_it(copilot_only, tmp_path):
    """Such files have no `projected_memory_norm`: a Copilot gets one today; it loads as it was trained, without
    (no missing weight initialised), and gives the same outputs."""
    pilot = saved_pilot("llama", tmp_path / "pilot")
    model = build_pilot_copilot(pilot, tiny_copilot_config(projected_memory_norm=False))
    folder = saved_as_an_earlier_version(model, tmp_path / "model", copilot_only, "projected_memory_norm")

    loaded = PilotCopilotForCausalLM.from_pretrained(folder).eval()
    assert loaded.copilot.config.projected_memory_norm is False
    assert isinstance(loaded.copilot.projected_memory_norm, torch.nn.Identity)
    assert_same_outputs(model.eval(), loaded)


@pytest.mark.parametrize("copilot_only", [False, True])
def test_a_checkpoint_saved_before_qk_norm_was_the_default_loads_without_it(copilot_only, tmp_path):
    """Such files have no `qk_norm`: a Copilot built for observed feedback gets the norms today; it loads as it was
    trained, without (no missing weight initialised), and gives the same outputs."""
    pilot = saved_pilot("llama", tmp_path / "pilot")
    model = build_pilot_copilot(pilot, tiny_copilot_config(qk_norm=False))
    folder = saved_as_an_earlier_version(model, tmp_path / "model", copilot_only, "qk_norm")

    loaded = PilotCopilotForCausalLM.from_pretrained(folder).eval()
    assert loaded.copilot.config.qk_norm is False
    assert all(layer.self_attn.q_norm is None for layer in loaded.copilot.layers)
    assert_same_outputs(model.eval(), loaded)


@pytest.mark.parametrize("copilot_only", [False, True])
def test_a_reweight_checkpoint_saved_before_error_loss_existed_trains_on_as_it_was_trained(
    copilot_only, tmp_path
):
    """Such files have no `error_loss`: a reweight Copilot would get the cross-entropy today; it keeps the squared
    error it was trained with (what resumed training or more epochs on it minimise)."""
    pilot = saved_pilot("llama", tmp_path / "pilot")
    model = build_pilot_copilot(pilot, tiny_copilot_config(error_form="reweight"))
    assert model.copilot.config.error_loss == "cross_entropy"
    folder = saved_as_an_earlier_version(model, tmp_path / "model", copilot_only, "error_loss")

    loaded = PilotCopilotForCausalLM.from_pretrained(folder).eval()
    assert loaded.copilot.config.error_loss == "squared_error"
    assert_same_outputs(model.eval(), loaded)


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


OTHER_PILOT_FIX = (
    "A Copilot trained jointly belongs to the fine-tuned Pilot: save that Pilot (pilot.save_pretrained) and "
    "load the Copilot onto it, or pass allow_other_pilot=True to attach it to this one on purpose."
)
OTHER_WEIGHTS = "same architecture, but its weights differ: a fine-tuned Pilot or another checkpoint"


def refusal(difference: str) -> str:
    return exactly(f"This Copilot was trained with a different Pilot ({difference}). {OTHER_PILOT_FIX}")


def warning(difference: str) -> str:
    return exactly(f"Attaching a Copilot trained with another Pilot: {difference}.")


def size(pilot) -> tuple[int, int]:
    """(tensors, parameters) of a Pilot, as its fingerprint counts them."""
    state = pilot.state_dict()
    return len(state), sum(tensor.numel() for tensor in state.values())


def test_copilot_checkpoint_refuses_a_pilot_with_other_weights(tmp_path):
    pilot = saved_pilot("llama", tmp_path / "pilot")
    build_pilot_copilot(pilot).save_copilot(tmp_path / "copilot")
    build_pilot("llama", seed=1).save_pretrained(tmp_path / "pilot")  # another Pilot now at the base path
    with pytest.raises(ValueError, match=refusal(OTHER_WEIGHTS)):
        PilotCopilotForCausalLM.from_pretrained(tmp_path / "copilot")
    other = build_pilot("llama", seed=2)
    with pytest.raises(ValueError, match=refusal(OTHER_WEIGHTS)):
        PilotCopilotForCausalLM.from_pretrained(tmp_path / "copilot", pilot=other)
    # On purpose (a merged LoRA Pilot, the transfer experiment): attached with a warning naming the difference.
    with pytest.warns(UserWarning, match=warning(OTHER_WEIGHTS)):
        moved = PilotCopilotForCausalLM.from_pretrained(
            tmp_path / "copilot", pilot=other, allow_other_pilot=True
        )
    assert moved.pilot is other


@pytest.mark.parametrize(
    "other, difference",
    [
        (
            lambda: build_pilot("llama", num_hidden_layers=4),
            lambda pilot: "number of layers 4 here, 2 in the Copilot's Pilot",
        ),
        (
            lambda: build_pilot("mistral"),
            lambda pilot: "model type mistral here, llama in the Copilot's Pilot",
        ),
        (
            lambda: build_pilot("llama", intermediate_size=48),
            lambda pilot: (
                f"tensor shapes differ ({size(pilot)[1]} parameters here, {size(build_pilot('llama'))[1]} "
                "in the Copilot's Pilot)"
            ),
        ),
        (
            lambda: build_pilot("llama", attention_bias=True),
            lambda pilot: (
                f"tensor names differ ({size(pilot)[0]} tensors here, {size(build_pilot('llama'))[0]} "
                "in the Copilot's Pilot)"
            ),
        ),
    ],
    ids=["layers", "model-type", "shapes", "names"],
)
def test_copilot_checkpoint_on_another_architecture_says_what_differs(other, difference, tmp_path):
    build_pilot_copilot("llama").save_copilot(tmp_path)
    other = other()
    expected = f"its architecture differs: {difference(other)}"
    with pytest.raises(ValueError, match=refusal(expected)):
        PilotCopilotForCausalLM.from_pretrained(tmp_path, pilot=other)
    # The same sizes: the Copilot can read this Pilot, so on purpose it is attached, with the warning.
    with pytest.warns(UserWarning, match=warning(expected)):
        moved = PilotCopilotForCausalLM.from_pretrained(tmp_path, pilot=other, allow_other_pilot=True)
    assert moved.pilot is other


@pytest.mark.parametrize(
    "overrides, difference",
    [
        (dict(vocab_size=80), "vocabulary size 80 here, 64 in the Copilot's Pilot"),
        (dict(hidden_size=64, intermediate_size=64), "hidden size 64 here, 32 in the Copilot's Pilot"),
        (
            dict(vocab_size=80, hidden_size=64),
            "vocabulary size 80 here, 64 in the Copilot's Pilot; hidden size 64 here, 32 in the Copilot's Pilot",
        ),
    ],
    ids=["vocabulary", "hidden", "both"],
)
def test_copilot_checkpoint_refuses_a_pilot_of_other_sizes_even_when_allowed(overrides, difference, tmp_path):
    pilot = saved_pilot("llama", tmp_path / "pilot")
    build_pilot_copilot(pilot).save_copilot(tmp_path / "copilot")
    other = build_pilot("llama", **overrides)
    message = exactly(
        f"This Copilot does not fit this Pilot ({difference}): a Copilot reads its Pilot's hidden states and "
        "predicts over its vocabulary, so not even allow_other_pilot=True attaches it. Load it onto the Pilot "
        f"it was trained with ({tmp_path / 'pilot'})."
    )
    for allow in (False, True):
        with pytest.raises(ValueError, match=message):
            PilotCopilotForCausalLM.from_pretrained(
                tmp_path / "copilot", pilot=other, allow_other_pilot=allow
            )


def test_copilot_checkpoint_without_a_fingerprint_is_refused_unless_allowed(tmp_path):
    pilot = saved_pilot("llama", tmp_path / "pilot")
    model = build_pilot_copilot(pilot)
    model.save_copilot(tmp_path / "copilot")
    edit_config(tmp_path / "copilot", pilot_fingerprint=None)  # saved by hand, or edited
    with pytest.raises(ValueError) as error:
        PilotCopilotForCausalLM.from_pretrained(tmp_path / "copilot")
    assert str(error.value) == (
        "This Copilot checkpoint records no pilot_fingerprint, so nothing shows that this is the Pilot it was "
        "trained with. Save it again with save_copilot (which records the fingerprint), or pass "
        "allow_other_pilot=True to attach it without the check."
    )
    with pytest.warns(
        UserWarning,
        match=exactly(
            "Attaching a Copilot without checking its Pilot: the checkpoint records no pilot_fingerprint."
        ),
    ):
        loaded = PilotCopilotForCausalLM.from_pretrained(tmp_path / "copilot", allow_other_pilot=True)
    assert_same_outputs(model, loaded.eval())


def test_a_fingerprint_from_before_its_summary_still_identifies_the_pilot(tmp_path):
    pilot = saved_pilot("llama", tmp_path / "pilot")
    model = build_pilot_copilot(pilot)
    model.save_copilot(tmp_path / "copilot")
    fingerprint = pilot_fingerprint(pilot)
    assert fingerprint.split(":")[2] == (
        f"model_type=llama,num_hidden_layers=2,num_tensors={size(pilot)[0]},num_parameters={size(pilot)[1]}"
    )
    edit_config(
        tmp_path / "copilot", pilot_fingerprint=":".join(fingerprint.split(":")[:2])
    )  # the old format
    assert_same_outputs(model, PilotCopilotForCausalLM.from_pretrained(tmp_path / "copilot").eval())
    with pytest.raises(ValueError, match=refusal(OTHER_WEIGHTS)):
        PilotCopilotForCausalLM.from_pretrained(tmp_path / "copilot", pilot=build_pilot("llama", seed=1))
    deeper = build_pilot("llama", num_hidden_layers=4)
    with pytest.raises(ValueError, match=refusal("its architecture differs: tensor names or shapes differ")):
        PilotCopilotForCausalLM.from_pretrained(tmp_path / "copilot", pilot=deeper)


def test_a_copilot_checkpoint_with_missing_or_extra_tensors_is_refused_naming_them(tmp_path):
    model = build_pilot_copilot("llama")
    model.save_copilot(tmp_path)
    rewrite_weights(tmp_path, drop={"error_head.weight"}, add={"extra.weight": torch.zeros(2)})
    message = (
        f"The weights in {tmp_path} are not those of the model its config.json describes (missing tensors: 1 "
        f"(error_head.weight); unexpected tensors: 1 (extra.weight)): {RESAVE}"
    )
    for load in (
        lambda: PilotCopilotForCausalLM.from_pretrained(tmp_path, pilot=model.pilot),
        lambda: PilotCopilotForCausalLM.from_copilot_checkpoint(model.pilot, tmp_path),
    ):
        with pytest.raises(ValueError, match=exactly(message)):
            load()


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


def test_auto_model_loads_a_copilot_only_folder_onto_its_base_pilot(tmp_path):
    model = build_pilot_copilot(saved_pilot("llama", tmp_path / "pilot"), copilot_lambda=0.4)
    model.save_copilot(tmp_path / "copilot")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "copilot").eval()
    assert type(loaded) is PilotCopilotForCausalLM
    assert loaded.config.copilot_lambda == 0.4
    assert_same_outputs(model, loaded)


@pytest.mark.parametrize("loader", [PilotCopilotForCausalLM, AutoModelForCausalLM])
def test_settings_given_at_loading_a_copilot_only_folder_are_the_models_not_its_pilots(loader, tmp_path):
    """As with a whole checkpoint, `from_pretrained(folder, copilot_lambda=..., forward_logits=...)` sets the
    model's settings; before, the Pilot's loader got them (a TypeError) or they were dropped."""
    build_pilot_copilot(saved_pilot("llama", tmp_path / "pilot"), copilot_lambda=0.4).save_copilot(
        tmp_path / "copilot"
    )
    loaded = loader.from_pretrained(
        tmp_path / "copilot", copilot_lambda=0.7, fusion="logits", forward_logits="fused"
    )
    assert (loaded.config.copilot_lambda, loaded.config.fusion, loaded.config.forward_logits) == (
        0.7,
        "logits",
        "fused",
    )
    assert loader.from_pretrained(tmp_path / "copilot").config.copilot_lambda == 0.4
    with pytest.raises(StrictDataclassFieldValidationError, match="Unknown forward_logits='probs'"):
        loader.from_pretrained(tmp_path / "copilot", forward_logits="probs")


def test_save_copilot_refuses_to_name_a_base_the_pilot_has_left(tmp_path):
    model = build_pilot_copilot(saved_pilot("llama", tmp_path / "pilot"))
    with torch.no_grad():
        model.pilot.lm_head.weight.add_(0.1)  # as joint fine-tuning does
    with pytest.raises(
        ValueError,
        match=exactly(
            f"The Pilot was fine-tuned after it was loaded from {str(tmp_path / 'pilot')!r}: this Copilot belongs to "
            f"the fine-tuned Pilot and would be refused on {str(tmp_path / 'pilot')!r}. Save that Pilot and name it: "
            "model.pilot.save_pretrained(pilot_dir); model.save_copilot(path, base_model_name_or_path=pilot_dir) "
            "(or save the whole model with save_pretrained)."
        ),
    ):
        model.save_copilot(tmp_path / "copilot")
    assert not (tmp_path / "copilot").exists()
    model.pilot.save_pretrained(tmp_path / "tuned")
    model.save_copilot(tmp_path / "copilot", base_model_name_or_path=str(tmp_path / "tuned"))
    assert_same_outputs(model, PilotCopilotForCausalLM.from_pretrained(tmp_path / "copilot").eval())
