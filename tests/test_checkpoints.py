"""CopilotTrainer checkpoints are complete or ignored; nothing non-finite is ever applied or saved.

Real Trainer runs on disk. The fault suite with process kills is tests/test_faults.py.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import (
    StopAtStep,
    collate,
    counting_rows,
    make_model,
    make_trainer,
    resume_settings,
)
from transformers import TrainerCallback

from hf_copilot.complete_checkpoints import COMPLETION_MARKER, mark_checkpoint_complete
from hf_copilot.mistake_log import MistakeLog
from hf_copilot.mistake_log_callback import MistakeLogCallback
from hf_copilot.trainer import NonFiniteTrainingError


def run_settings(tmp_path, name: str, **overrides) -> dict:
    return {**resume_settings(tmp_path, name), "save_steps": 2, **overrides}


def interrupted_run(tmp_path, stop_at: int = 4, **overrides):
    trainer = make_trainer(tmp_path, **run_settings(tmp_path, "run", **overrides))
    trainer.add_callback(StopAtStep(stop_at))
    trainer.train()
    return tmp_path / "run"


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def resume(tmp_path, checkpoint=True):
    trainer = make_trainer(tmp_path, model=make_model(seed=7), **run_settings(tmp_path, "run"))
    trainer.train(resume_from_checkpoint=checkpoint)
    return trainer


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    trainer = make_trainer(tmp_path, **run_settings(tmp_path, "run"))
    trainer.train()
    return trainer.model


# --------------------------------------------------------------------------------------------------
# The completion marker


def test_the_marker_is_written_last_and_lists_every_file_with_its_size(tmp_path):
    checkpoint = interrupted_run(tmp_path, stop_at=2) / "checkpoint-2"
    marker = json.loads((checkpoint / COMPLETION_MARKER).read_text())
    on_disk = {
        str(path.relative_to(checkpoint)): path.stat().st_size
        for path in checkpoint.rglob("*")
        if path.is_file() and path.name != COMPLETION_MARKER
    }
    assert marker == {"global_step": 2, "files": on_disk}
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json", "mistake_log.pt"} <= set(on_disk)
    # Written last: nothing in the folder is newer than the marker.
    newest = max(path.stat().st_mtime_ns for path in checkpoint.iterdir())
    assert (checkpoint / COMPLETION_MARKER).stat().st_mtime_ns == newest


def test_resume_skips_the_newest_incomplete_checkpoint_and_continues_exactly(tmp_path, uninterrupted, caplog):
    run = interrupted_run(tmp_path)
    os.remove(run / "checkpoint-4" / COMPLETION_MARKER)  # a save killed before its marker
    (run / ".checkpoint-6.0badc0de.tmp").mkdir()  # a staging folder of a killed save
    with caplog.at_level("WARNING"):
        resumed = resume(tmp_path)
    assert f"Skipping incomplete checkpoint {run / 'checkpoint-4'} (no {COMPLETION_MARKER}" in caplog.text
    assert same_weights(resumed.model, uninterrupted)
    assert sorted(os.listdir(run)) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert all((run / name / COMPLETION_MARKER).is_file() for name in os.listdir(run))


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda c: os.remove(c / "mistake_log.pt"), "mistake_log.pt is missing"),
        (lambda c: os.truncate(c / "optimizer.pt", 100), "optimizer.pt has 100 bytes, "),
        (lambda c: (c / COMPLETION_MARKER).write_text("{"), f"unreadable {COMPLETION_MARKER}"),
    ],
)
def test_no_complete_checkpoint_is_an_error_naming_each_problem(tmp_path, damage, problem):
    run = interrupted_run(tmp_path, stop_at=2)
    damage(run / "checkpoint-2")
    with pytest.raises(
        ValueError, match=rf"No complete checkpoint in {run} \(incomplete: checkpoint-2: {problem}"
    ):
        resume(tmp_path)


def test_an_explicit_incomplete_checkpoint_is_refused_naming_the_newest_complete_one(tmp_path):
    run = interrupted_run(tmp_path)
    os.remove(run / "checkpoint-4" / "trainer_state.json")
    with pytest.raises(
        ValueError,
        match=rf"Cannot resume from {run / 'checkpoint-4'}: it is not a complete CopilotTrainer checkpoint "
        rf"\(trainer_state.json is missing\); the newest complete checkpoint there is {run / 'checkpoint-2'}\.",
    ):
        resume(tmp_path, str(run / "checkpoint-4"))


def test_save_total_limit_keeps_the_newest_complete_checkpoints(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-100").mkdir(parents=True)  # incomplete, from an earlier crash: never counted
    make_trainer(tmp_path, **run_settings(tmp_path, "run", save_steps=1, save_total_limit=2)).train()
    assert sorted(os.listdir(run)) == ["checkpoint-100", "checkpoint-5", "checkpoint-6"]


# --------------------------------------------------------------------------------------------------
# The Mistake Log file of a checkpoint is validated


def rewrite_mistake_log(checkpoint, edit) -> None:
    path = checkpoint / "mistake_log.pt"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    mark_checkpoint_complete(checkpoint, 4)


def first_entry(state) -> dict[str, torch.Tensor]:
    return state["mistake_log"]["entries"][0]["tensors"]


def wider(state) -> None:
    for item in state["mistake_log"]["entries"]:
        for name in ("x_tilde", "h_bar"):
            tensor = item["tensors"][name]
            item["tensors"][name] = torch.cat([tensor, tensor[..., :1]], dim=-1)


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda s: s.update(global_step=2), "global_step is 2 but the checkpoint is of step 4"),
        (
            lambda s: first_entry(s)["x_tilde"].fill_(float("nan")),
            "entry 0: MistakeLogEntry x_tilde contains NaN",
        ),
        (wider, r"x_tilde has hidden size 33 but the Pilot's is 32"),
        (
            lambda s: first_entry(s).update(h_bar=first_entry(s)["h_bar"][:1]),
            r"entry 0: MistakeLogEntry.h_bar has shape",
        ),
        (lambda s: s.update(format_version=1), "unknown format_version 1"),
    ],
)
def test_a_mistake_log_file_that_does_not_fit_is_refused_naming_the_file_and_field(tmp_path, edit, field):
    checkpoint = interrupted_run(tmp_path) / "checkpoint-4"
    rewrite_mistake_log(checkpoint, edit)
    with pytest.raises(
        ValueError, match=rf"Mistake Log file {checkpoint / 'mistake_log.pt'} cannot be resumed: {field}"
    ):
        resume(tmp_path, str(checkpoint))


def test_a_corrupt_mistake_log_file_is_refused_naming_it(tmp_path):
    checkpoint = interrupted_run(tmp_path) / "checkpoint-4"
    (checkpoint / "mistake_log.pt").write_bytes(b"not a torch file")
    mark_checkpoint_complete(checkpoint, 4)
    with pytest.raises(
        ValueError, match=rf"Mistake Log file {checkpoint / 'mistake_log.pt'} cannot be resumed: "
    ):
        resume(tmp_path, str(checkpoint))


def test_mistake_log_callback_checkpoint_round_trip(tmp_path):
    model = make_model()
    callback = MistakeLogCallback(MistakeLog(size=3, topk=8), replay=2, seed=1)
    with torch.no_grad():
        for start in range(0, 10, 2):
            rows = collate(counting_rows(10)[start : start + 2])
            callback.add(model(**rows, return_mistake_log=True).mistake_log_entry)
    callback.save_to_checkpoint(tmp_path, global_step=5)
    assert sorted(os.listdir(tmp_path)) == ["mistake_log.pt"]  # written atomically: no temporary left
    restored = MistakeLogCallback(MistakeLog(size=3, topk=8), replay=2, seed=99)
    hidden, vocab = model.config.text_config.hidden_size, model.config.text_config.vocab_size
    restored.load_from_checkpoint(tmp_path, 5, hidden, vocab)
    assert len(restored.mistake_log) == 3
    first, second = callback.sample_replay(), restored.sample_replay()  # same entries, same RNG draw
    assert torch.equal(first.x_tilde, second.x_tilde) and torch.equal(first.loss_mask, second.loss_mask)
    with pytest.raises(ValueError, match="size=3, topk=8"):
        MistakeLogCallback(MistakeLog(size=5, topk=8)).load_from_checkpoint(tmp_path, 5, hidden, vocab)
    with pytest.raises(ValueError, match=f"vocab_size is {vocab} but the Pilot's is {vocab + 1}"):
        MistakeLogCallback(MistakeLog(size=3, topk=8)).load_from_checkpoint(tmp_path, 5, hidden, vocab + 1)


# --------------------------------------------------------------------------------------------------
# Nothing non-finite is applied or checkpointed


def test_a_non_finite_gradient_stops_training_before_the_update(tmp_path):
    model = make_model()
    calls = []

    def poison(grad):
        calls.append(1)
        return grad * float("nan") if len(calls) == 3 else grad

    model.copilot.error_head.weight.register_hook(poison)  # the loss stays finite
    trainer = make_trainer(
        tmp_path, model=model, **run_settings(tmp_path, "run", save_steps=1, save_total_limit=1)
    )
    with pytest.raises(
        NonFiniteTrainingError, match="The gradient norm is nan at training step 3; training stopped"
    ):
        trainer.train()
    assert trainer.state.global_step == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    run = tmp_path / "run"
    assert sorted(os.listdir(run)) == ["checkpoint-2"]
    assert (run / "checkpoint-2" / COMPLETION_MARKER).is_file()


def test_a_diverging_run_leaves_only_finite_complete_checkpoints(tmp_path):
    trainer = make_trainer(
        tmp_path,
        **run_settings(tmp_path, "run", save_steps=1, save_total_limit=1, max_steps=30, learning_rate=1e6),
    )
    with pytest.raises(NonFiniteTrainingError, match=r"(loss|gradient norm) is (nan|inf)"):
        trainer.train()
    run = tmp_path / "run"
    checkpoints = os.listdir(run)
    assert checkpoints == [f"checkpoint-{trainer.state.global_step}"]
    weights = load_file(run / checkpoints[0] / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert (run / checkpoints[0] / COMPLETION_MARKER).is_file()


def test_resuming_the_final_checkpoint_trains_no_further_step(tmp_path, uninterrupted):
    # The stock Trainer trains one step past max_steps here (max_steps is checked only after a step).
    make_trainer(tmp_path, **run_settings(tmp_path, "run")).train()
    resumed = resume(tmp_path, str(tmp_path / "run" / "checkpoint-6"))
    assert resumed.state.global_step == 6
    assert same_weights(resumed.model, uninterrupted)
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_a_non_finite_gradient_in_the_copilot_only_phase_stops_it_before_the_update(tmp_path):
    model = make_model()
    calls = []

    def poison(grad):
        calls.append(1)
        return grad * float("nan") if len(calls) == 3 else grad  # two joint steps, then the phase

    model.copilot.error_head.weight.register_hook(poison)
    trainer = make_trainer(tmp_path, model=model, max_steps=2, copilot_final_epochs=1.0)
    with pytest.raises(
        NonFiniteTrainingError,
        match=r"The Copilot's gradient norm is nan at step 1 of the Copilot-only phase",
    ):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())


class CorruptWeightsAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.copilot.norm.weight[0] = float("inf")


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    trainer = make_trainer(tmp_path, **run_settings(tmp_path, "run", save_steps=1))
    trainer.add_callback(CorruptWeightsAt(2))
    with pytest.raises(
        NonFiniteTrainingError, match="The weights are not finite at step 2: checkpoint not written"
    ):
        trainer.train()
    assert os.listdir(tmp_path / "run") == ["checkpoint-1"]


# --------------------------------------------------------------------------------------------------
# Checkpoints hold only what resume needs


def saved_entries(checkpoint) -> int:
    return len(torch.load(checkpoint / "mistake_log.pt", weights_only=True)["mistake_log"]["entries"])


@pytest.mark.parametrize(
    "sampling, entries",
    [
        ({"mistake_log_replay": 0}, 0),  # the default: the Copilot reads only the fresh entry
        ({"mistake_log_replay": 0, "mistake_log_window": 2}, 2),  # the window's entries
        ({"mistake_log_replay": 2}, 4),  # replay draws from the whole log
    ],
)
def test_a_checkpoint_holds_the_entries_a_resumed_run_reads_and_resumes_exactly(tmp_path, sampling, entries):
    uninterrupted = make_trainer(tmp_path, **run_settings(tmp_path, "uninterrupted", **sampling))
    uninterrupted.train()
    interrupted = make_trainer(tmp_path, **run_settings(tmp_path, "run", **sampling))
    interrupted.add_callback(StopAtStep(4))
    interrupted.train()
    assert len(interrupted.mistake_log_callback.mistake_log) == 4
    assert saved_entries(tmp_path / "run" / "checkpoint-4") == entries
    resumed = make_trainer(tmp_path, model=make_model(seed=7), **run_settings(tmp_path, "run", **sampling))
    resumed.train(resume_from_checkpoint=True)
    assert same_weights(resumed.model, uninterrupted.model)


def test_a_mistake_log_budget_keeps_the_newest_entries_that_fit_and_warns(tmp_path):
    settings = run_settings(tmp_path, "run", mistake_log_checkpoint_mb=0.05)
    trainer = make_trainer(tmp_path, **settings)
    trainer.add_callback(StopAtStep(4))
    with pytest.warns(UserWarning, match=r"budget \(0\.05 MiB\) holds 1 of the 4 entries .* from step 4 "):
        trainer.train()
    assert saved_entries(tmp_path / "run" / "checkpoint-4") == 1
    newest = trainer.mistake_log_callback.mistake_log.latest()
    saved = torch.load(tmp_path / "run" / "checkpoint-4" / "mistake_log.pt", weights_only=True)["mistake_log"]
    assert torch.equal(saved["entries"][0]["tensors"]["x_tilde"], newest.x_tilde)


def test_resaving_a_step_over_an_old_checkpoint_never_looks_complete_halfway(tmp_path):
    run = interrupted_run(tmp_path)  # complete checkpoint-2 and checkpoint-4
    old_state = run / "checkpoint-4" / "trainer_state.json"
    old_state.unlink()
    old_state.mkdir()  # the re-save of step 4 fails after its weights and optimizer state
    mark_checkpoint_complete(run / "checkpoint-4", 4)
    trainer = make_trainer(tmp_path, model=make_model(seed=7), **run_settings(tmp_path, "run"))
    with pytest.raises(IsADirectoryError):
        trainer.train(resume_from_checkpoint=str(run / "checkpoint-2"))
    assert not (run / "checkpoint-4" / COMPLETION_MARKER).exists()
    with pytest.raises(
        ValueError, match=rf"Cannot resume from {run / 'checkpoint-4'}: .*no {COMPLETION_MARKER}"
    ):
        resume(tmp_path, str(run / "checkpoint-4"))
