"""Fault suite: training processes SIGKILLed at seeded points of their checkpoint saves, then resumed.

Every resume must continue from the newest complete checkpoint to the same weights as an uninterrupted run,
and leave no staging or incomplete folders behind (tests/fault_train.py runs the processes).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_copilot.complete_checkpoints import COMPLETION_MARKER

SCRIPT = Path(__file__).with_name("fault_train.py")
TRIALS = 10


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(root), "0", str(TRIALS)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return root, json.loads(done.stdout.strip().splitlines()[-1])


def checkpoint_steps(names: list[str]) -> list[int]:
    return sorted(int(m.group(1)) for name in names if (m := re.fullmatch(r"checkpoint-(\d+)", name)))


def test_every_trial_was_killed_during_a_save(faults):
    _, summary = faults
    assert summary["operations"] > 6 * 10  # six saves, each many file-system operations
    assert [trial["signal"] for trial in summary["trials"]] == [signal.SIGKILL] * TRIALS


def test_every_resume_continues_from_the_newest_complete_checkpoint_to_the_same_weights(faults):
    root, summary = faults
    reference = load_file(root / "reference" / "final.safetensors")
    skipped_incomplete = 0
    for trial in summary["trials"]:
        folder = root / trial["name"]
        assert trial["resume_exit_code"] == 0, trial
        progress = folder / "progress.txt"
        saved = [int(line) for line in progress.read_text().split()] if progress.exists() else []
        result = json.loads((folder / "result.json").read_text())
        if "error" in result:
            # Killed during the first save: there is nothing complete to resume.
            assert saved == [] and result["error"].startswith(f"No complete checkpoint in {folder}"), trial
            continue
        # Not older than the last save that returned; newer only if the kill came after its marker.
        assert result["resumed_from"] >= (saved[-1] if saved else 1), (trial, saved, result)
        skipped_incomplete += any(step > result["resumed_from"] for step in checkpoint_steps(trial["left"]))
        final = load_file(folder / "final.safetensors")
        assert final.keys() == reference.keys()
        assert all(torch.equal(final[name], reference[name]) for name in reference), trial
    assert skipped_incomplete >= 1  # the suite did meet incomplete newest checkpoints


def test_resumed_runs_leave_only_complete_checkpoints_and_no_staging_folders(faults):
    root, summary = faults
    for trial in summary["trials"]:
        folder = root / trial["name"]
        if json.loads((folder / "result.json").read_text()).get("resumed_from") is None:
            # Nothing was resumed: only the staging folders beside the checkpoints were cleaned.
            assert [path for path in folder.iterdir() if path.name.endswith(".tmp")] == [], trial
            continue
        assert [path for path in folder.rglob("*") if path.name.endswith(".tmp")] == [], trial
        checkpoints = [path for path in folder.iterdir() if path.name.startswith("checkpoint-")]
        assert checkpoint_steps([path.name for path in checkpoints]) == [5, 6], trial  # save_total_limit=2
        assert all((path / COMPLETION_MARKER).is_file() for path in checkpoints), trial
