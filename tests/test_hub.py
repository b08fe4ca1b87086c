"""Hub uploads (SPEC section 6): the exact folder a push sends, its model card, and that it loads back.

The Hub is unreachable here, so the tests check the staged folder itself, and intercept only
`HfApi.create_repo` / `HfApi.upload_folder` (recording their arguments and copying the folder) to show
that the push methods upload exactly that folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import textwrap

import pytest
import torch
import transformers
import transformers.modeling_utils
from conftest import (
    CAUSAL_HUB_FILES,
    assert_card_usage_prints_the_models_generation,
    build_batch,
    build_pilot,
    build_pilot_copilot,
    char_tokenizer,
    run_without_hf_copilot,
)
from huggingface_hub import HfApi, ModelCard, RepoUrl
from transformers import AutoModelForCausalLM

from hf_copilot import CopilotTrainingArguments, PilotCopilotForCausalLM, pilot_fingerprint
from hf_copilot.hub import README_NAME, build_model_card, hub_model_id, stage_for_upload

WHOLE_MODEL_FILES = sorted(
    CAUSAL_HUB_FILES | {"README.md", "config.json", "generation_config.json", "model.safetensors"}
)
COPILOT_ONLY_FILES = sorted(set(WHOLE_MODEL_FILES) - {"generation_config.json"})
HUB_PILOT = "org/tiny-llama"
EVALUATION = {"pilot_accuracy": 0.5, "fused_accuracy": 0.625}


@pytest.fixture
def saved_pilot_model(tmp_path):
    """A Pilot+Copilot whose Pilot was loaded from a folder (the base a Copilot-only checkpoint names)."""
    pilot_dir = tmp_path / "pilot"
    build_pilot("llama").save_pretrained(pilot_dir)
    pilot = AutoModelForCausalLM.from_pretrained(pilot_dir).eval()
    return build_pilot_copilot(pilot, copilot_lambda=0.7, fusion="probs", copilot_feedback="observed")


@pytest.fixture
def hub_named_model():
    """A Pilot+Copilot whose Pilot carries a Hub model id as its name."""
    model = build_pilot_copilot("llama", copilot_lambda=0.7)
    model.pilot.config.name_or_path = HUB_PILOT
    return model


def outputs(model, batch):
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits, out.predicted_error


def files_in(folder) -> list[str]:
    return sorted(os.listdir(folder))


# ------------------------------------------------------------------------------------------------
# The staged folder and its model card


def test_whole_model_folder_holds_exactly_the_hub_files(tmp_path, hub_named_model):
    folder = tmp_path / "upload"
    assert stage_for_upload(hub_named_model, folder) == WHOLE_MODEL_FILES
    assert files_in(folder) == WHOLE_MODEL_FILES
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_pilot_copilot.PilotCopilotConfig",
        "AutoModelForCausalLM": "modeling_pilot_copilot.PilotCopilotForCausalLM",
    }
    assert config["copilot_lambda"] == 0.7


def test_whole_model_card_metadata(tmp_path, hub_named_model):
    folder = tmp_path / "upload"
    stage_for_upload(hub_named_model, folder, evaluation_results=EVALUATION, repo_id="me/pilot-copilot")
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.base_model == HUB_PILOT
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert {"hf-copilot", "transformer-copilot", "pilot-copilot", "custom_code"} <= set(data.tags)
    assert data.transformer_copilot["checkpoint"] == "pilot+copilot"
    fusion = {key: data.transformer_copilot[key] for key in ("copilot_lambda", "fusion", "copilot_feedback")}
    assert fusion == {"copilot_lambda": 0.7, "fusion": "probs", "copilot_feedback": "observed"}
    assert {result.metric_type: result.metric_value for result in data.eval_results} == EVALUATION
    assert "| fused_accuracy | 0.625 |" in card.text
    assert 'AutoModelForCausalLM.from_pretrained("me/pilot-copilot", trust_remote_code=True)' in card.text


def test_card_without_evaluation_results_has_no_model_index(hub_named_model):
    card = build_model_card(hub_named_model)
    assert card.data.eval_results is None
    assert "model-index" not in card.content
    assert "## Evaluation" not in card.text


def test_evaluation_results_must_be_finite_numbers(hub_named_model):
    for bad in ({"accuracy": "high"}, {"accuracy": float("nan")}, {"accuracy": True}):
        with pytest.raises(ValueError, match="accuracy"):
            build_model_card(hub_named_model, evaluation_results=bad)


def test_card_carries_model_tags_user_tags_and_training_details(hub_named_model):
    hub_named_model.add_model_tags(["sft"])
    card = build_model_card(hub_named_model, tags=["math"], training_details="- learning_rate: 1e-4")
    assert {"sft", "math"} <= set(card.data.tags)
    assert "## Training\n\n- learning_rate: 1e-4" in card.text


def test_a_local_pilot_path_stays_out_of_the_card_metadata(saved_pilot_model):
    assert hub_model_id(saved_pilot_model.pilot.config.name_or_path) is None
    assert hub_model_id(HUB_PILOT) == HUB_PILOT
    card = build_model_card(saved_pilot_model)
    assert card.data.base_model is None  # the Hub rejects a base_model that is not a model id
    assert saved_pilot_model.pilot.config.name_or_path in card.text


def test_copilot_only_folder_and_card(tmp_path, hub_named_model):
    folder = tmp_path / "upload"
    with pytest.warns(UserWarning, match="not a Hub model id"):
        stage_for_upload(hub_named_model, tmp_path / "local", copilot_only=True, base_model=str(tmp_path))
    assert stage_for_upload(hub_named_model, folder, copilot_only=True, evaluation_results=EVALUATION) == (
        COPILOT_ONLY_FILES
    )
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "copilot"
    assert config["base_model_name_or_path"] == HUB_PILOT
    assert config["pilot_fingerprint"] == pilot_fingerprint(hub_named_model.pilot)
    assert config["copilot_lambda"] == 0.7
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == HUB_PILOT
    assert card.data.base_model_relation == "adapter"
    assert "custom_code" not in card.data.tags and "hf-copilot" in card.data.tags
    assert card.data.transformer_copilot["checkpoint"] == "copilot-only"
    digest = hashlib.sha256(config["pilot_fingerprint"].encode()).hexdigest()[:16]
    assert card.data.transformer_copilot["pilot_fingerprint_sha256"] == digest  # short: no base64 in YAML
    assert len(card.data.eval_results) == len(EVALUATION)
    assert 'AutoModelForCausalLM.from_pretrained("<repo_id>", trust_remote_code=True)' in card.text


def test_staging_refuses_a_folder_that_already_holds_files(tmp_path, hub_named_model):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        stage_for_upload(hub_named_model, tmp_path)


# ------------------------------------------------------------------------------------------------
# The staged folder loads back


def test_whole_model_folder_loads_back_with_identical_outputs(tmp_path, saved_pilot_model):
    stage_for_upload(saved_pilot_model, tmp_path / "upload")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "upload").eval()
    assert isinstance(loaded, PilotCopilotForCausalLM)
    batch = build_batch()
    for expected, actual in zip(outputs(saved_pilot_model, batch), outputs(loaded, batch), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert loaded.config.copilot_feedback == "observed"


def test_whole_model_folder_loads_with_trust_remote_code_without_hf_copilot(tmp_path, saved_pilot_model):
    folder = tmp_path / "upload"
    stage_for_upload(saved_pilot_model, folder)
    batch = build_batch()
    logits, predicted_error = outputs(saved_pilot_model, batch)
    torch.save(
        {"batch": batch, "logits": logits, "predicted_error": predicted_error}, tmp_path / "expected.pt"
    )
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_copilot"] = None  # the package is not installed on the loading side
        import torch
        from transformers import AutoModelForCausalLM

        expected = torch.load({str(tmp_path / "expected.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        batch = expected["batch"]
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        torch.testing.assert_close(out.logits, expected["logits"], rtol=0, atol=0)
        torch.testing.assert_close(out.predicted_error, expected["predicted_error"], rtol=0, atol=0)
        print("loaded without hf_copilot")
        """
    )
    result = run_without_hf_copilot(script, tmp_path)
    assert "loaded without hf_copilot" in result.stdout


def test_copilot_only_folder_loads_onto_the_saved_base_pilot(tmp_path, saved_pilot_model):
    with pytest.warns(UserWarning, match="not a Hub model id"):  # the base is a local folder
        stage_for_upload(saved_pilot_model, tmp_path / "upload", copilot_only=True)
    loaded = PilotCopilotForCausalLM.from_pretrained(tmp_path / "upload").eval()
    batch = build_batch()
    for expected, actual in zip(outputs(saved_pilot_model, batch), outputs(loaded, batch), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert (loaded.config.copilot_lambda, loaded.config.copilot_feedback) == (0.7, "observed")


# ------------------------------------------------------------------------------------------------
# The push methods upload that folder


@pytest.fixture
def recorded_uploads(tmp_path, monkeypatch):
    """Replace the two network calls by recorders; each upload's folder is copied before it is deleted."""
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        copy = tmp_path / f"uploaded-{len(uploads)}"
        shutil.copytree(folder_path, copy)
        uploads.append({"repo_id": repo_id, "folder": copy, **kwargs})
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return uploads


def test_push_to_hub_uploads_the_whole_model_folder(recorded_uploads, saved_pilot_model):
    result = saved_pilot_model.push_to_hub(
        "me/pilot-copilot", evaluation_results=EVALUATION, commit_message="first", private=True
    )
    assert result == "commit-info"
    (upload,) = recorded_uploads
    assert upload["repo_id"] == "me/pilot-copilot"
    assert upload["commit_message"] == "first"
    assert files_in(upload["folder"]) == WHOLE_MODEL_FILES
    card = ModelCard.load(upload["folder"] / "README.md")
    assert "custom_code" in card.data.tags and card.data.eval_results
    assert 'from_pretrained("me/pilot-copilot", trust_remote_code=True)' in card.text
    loaded = AutoModelForCausalLM.from_pretrained(upload["folder"]).eval()
    batch = build_batch()
    torch.testing.assert_close(
        outputs(loaded, batch)[1], outputs(saved_pilot_model, batch)[1], rtol=0, atol=0
    )


def test_push_copilot_to_hub_uploads_the_copilot_only_folder(recorded_uploads, saved_pilot_model):
    saved_pilot_model.push_copilot_to_hub("me/copilot", base_model=HUB_PILOT)
    (upload,) = recorded_uploads
    assert upload["repo_id"] == "me/copilot"
    assert upload["commit_message"] == "Upload Copilot"
    assert files_in(upload["folder"]) == COPILOT_ONLY_FILES
    assert ModelCard.load(upload["folder"] / "README.md").data.base_model == HUB_PILOT
    assert json.loads((upload["folder"] / "config.json").read_text())["base_model_name_or_path"] == HUB_PILOT
    # The named base is on the Hub; offline, the same Pilot is passed in.
    loaded = PilotCopilotForCausalLM.from_pretrained(upload["folder"], pilot=saved_pilot_model.pilot).eval()
    batch = build_batch()
    torch.testing.assert_close(
        outputs(loaded, batch)[1], outputs(saved_pilot_model, batch)[1], rtol=0, atol=0
    )


# ------------------------------------------------------------------------------------------------
# Saves are atomic


def fail_weight_writes(monkeypatch) -> None:
    """The safetensors writer writes part of the file, then fails (a full disk, a killed process)."""

    def write_half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x00" * 16)
        raise OSError("No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", write_half_then_fail)


@pytest.fixture
def failing_weights_writer(monkeypatch):
    fail_weight_writes(monkeypatch)


def snapshot(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in files_in(folder)}


def test_a_failed_save_copilot_leaves_no_partial_checkpoint(tmp_path, hub_named_model, monkeypatch):
    target = tmp_path / "copilot"
    hub_named_model.save_copilot(target)
    before = snapshot(target)
    with torch.no_grad():
        hub_named_model.copilot.error_head.weight.add_(1.0)
    fail_weight_writes(monkeypatch)
    with pytest.raises(OSError, match="No space"):
        hub_named_model.save_copilot(target)
    with pytest.raises(OSError, match="No space"):
        hub_named_model.save_copilot(tmp_path / "new")
    assert snapshot(target) == before  # the previous checkpoint, untouched
    assert not (tmp_path / "new").exists()
    assert files_in(tmp_path) == ["copilot"]  # no staging folder left behind


def test_a_failed_save_pretrained_leaves_the_previous_checkpoint(
    tmp_path, hub_named_model, failing_weights_writer
):
    target = tmp_path / "model"
    target.mkdir()
    (target / "trainer_state.json").write_text("{}")
    with pytest.raises(OSError, match="No space"):
        hub_named_model.save_pretrained(target)
    assert files_in(target) == ["trainer_state.json"]
    assert files_in(tmp_path) == ["model"]


def test_a_failed_staging_leaves_no_folder(tmp_path, hub_named_model, failing_weights_writer):
    for copilot_only in (False, True):
        with pytest.raises(OSError, match="No space"):
            stage_for_upload(hub_named_model, tmp_path / "upload", copilot_only=copilot_only)
        assert files_in(tmp_path) == []


def test_saving_into_a_folder_keeps_its_other_files_and_drops_stale_shards(tmp_path, hub_named_model):
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "optimizer.pt").write_bytes(b"state")
    (target / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    hub_named_model.save_copilot(target)
    assert files_in(target) == sorted(set(COPILOT_ONLY_FILES) - {"README.md"} | {"optimizer.pt"})
    loaded = PilotCopilotForCausalLM.from_pretrained(target, pilot=hub_named_model.pilot)
    torch.testing.assert_close(loaded.copilot.error_head.weight, hub_named_model.copilot.error_head.weight)


# ------------------------------------------------------------------------------------------------
# The card's usage code runs as written


def card_code(folder) -> str:
    text = (folder / README_NAME).read_text()
    return text.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("copilot_only", [False, True])
def test_the_card_usage_runs_as_written_without_hf_copilot(tmp_path, copilot_only):
    """Offline, a folder named like the repository id stands in for the Hub repository (and the base Pilot's)."""
    tokenizer = char_tokenizer()
    pilot = build_pilot("llama")
    pilot.generation_config.eos_token_id = None  # every prompt generates its 32 tokens
    pilot.save_pretrained(tmp_path / HUB_PILOT)
    pilot = AutoModelForCausalLM.from_pretrained(tmp_path / HUB_PILOT).eval()
    model = build_pilot_copilot(pilot, copilot_lambda=0.7)
    repo = "me/copilot" if copilot_only else "me/pilot-copilot"
    stage_for_upload(
        model, tmp_path / repo, copilot_only, base_model=HUB_PILOT, repo_id=repo, tokenizer=tokenizer
    )
    code = card_code(tmp_path / repo)
    assert (
        f'AutoTokenizer.from_pretrained("{repo}", trust_remote_code=True)' in code
        and str(tmp_path) not in code
    )
    scoring = f"`--model_args pretrained={repo},trust_remote_code=True,forward_logits=fused`"
    assert scoring in (tmp_path / repo / README_NAME).read_text()
    assert_card_usage_prints_the_models_generation(tmp_path / repo, model, tokenizer, tmp_path)


def test_the_card_lists_hyperparameters_and_framework_versions(hub_named_model, tmp_path):
    args = CopilotTrainingArguments(
        output_dir=str(tmp_path), learning_rate=3e-4, copilot_final_epochs=1.0, copilot_final_weight_decay=0.5
    )
    card = build_model_card(hub_named_model, training_args=args, training_details="Data: arithmetic.")
    assert "| `learning_rate` | `0.0003` |" in card.text
    assert "| `copilot_final_epochs` | `1.0` |" in card.text
    assert (
        "| `copilot_final_weight_decay` | `0.5` |\n| `copilot_fallback_weight_decay` | `0.1` |" in card.text
    )
    assert "| `mistake_log_topk` | `64` |" in card.text
    assert "Data: arithmetic." in card.text
    assert f"- transformers {transformers.__version__}\n- torch {torch.__version__}" in card.text
    assert (
        "pip install transformers torch safetensors" in card.text
        and "pip install hf-copilot" not in card.text
    )


def test_staging_without_a_known_tokenizer_warns(tmp_path, saved_pilot_model):
    with pytest.warns(UserWarning, match="No tokenizer is known for this upload: pass tokenizer="):
        stage_for_upload(saved_pilot_model, tmp_path / "upload")
    assert 'AutoTokenizer.from_pretrained("<the Pilot\'s tokenizer>")' in card_code(tmp_path / "upload")
