"""DDP: the same CopilotTrainer script under `torchrun --nproc_per_node 2` (gloo on CPU), see ddp_train.py.

2 processes x batch 2 x accumulation 2 make the same optimizer batches as 1 process x batch 2 x
accumulation 4, with different label counts on the two ranks, so the losses' global normalisation shows.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from ddp_train import copilot_arguments
from test_trainer import collate, counting_rows, make_model

from hf_copilot import CopilotTrainer
from hf_copilot.complete_checkpoints import COMPLETION_MARKER

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_train.py")


def find_torchrun() -> str | None:
    beside_python = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return beside_python if os.path.exists(beside_python) else shutil.which("torchrun")


@pytest.fixture(scope="module")
def ddp_output(tmp_path_factory):
    torchrun = find_torchrun()
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    output = tmp_path_factory.mktemp("ddp")
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", SCRIPT, str(output)],
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return output


def rank_reports(output, replay: int) -> list[dict]:
    return [json.loads((output / f"replay{replay}" / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("replay", [0, 1])
def test_both_ranks_end_with_identical_pilot_and_copilot(ddp_output, replay):
    first, second = rank_reports(ddp_output, replay)
    assert first["world_size"] == second["world_size"] == 2
    assert first["ddp"] == "DistributedDataParallel"
    assert first["pilot"] == second["pilot"]
    assert first["copilot"] == second["copilot"]
    for report in (first, second):
        assert len(report["pilot_loss"]) == len(report["copilot_loss"]) == 4
        assert all(math.isfinite(value) for value in report["pilot_loss"] + report["copilot_loss"])
        assert report["mistake_log_entries"] == 4  # 8 forward passes per rank, ring buffer of 4
    assert first["copilot_loss"][-1] < first["copilot_loss"][0]
    # The replay run's Copilot-only phase ran twice on both ranks, on one decision from both shards' sums.
    assert len(first["r2_before_fallback"]) == replay
    assert first["r2_before_fallback"] == second["r2_before_fallback"]


def test_ddp_trains_exactly_as_one_process_with_the_same_optimizer_batches(ddp_output, tmp_path):
    args = copilot_arguments(str(tmp_path), replay=0, gradient_accumulation_steps=4)
    single = CopilotTrainer(
        model=make_model(), args=args, train_dataset=counting_rows(), data_collator=collate
    )
    single.train()
    # The ranks' halves of the first optimizer batch (micro-batches 0, 2 and 1, 3) hold different label counts.
    batches = list(single.get_train_dataloader())[:4]
    counts = [int((batch["labels"][:, 1:] != -100).sum()) for batch in batches]
    assert counts[0] + counts[2] != counts[1] + counts[3]

    expected = single.model.state_dict()
    for replay in (0, 1):
        ddp_state = torch.load(ddp_output / f"replay{replay}" / "state_dict_rank0.pt", weights_only=True)
        for name, value in expected.items():
            # With replay, each rank replays its own log: the Copilot differs, the Pilot never depends on it.
            if replay == 0 or name.startswith("pilot."):
                assert (ddp_state[name] - value).abs().max() < 1e-6, (replay, name)


def test_each_rank_checkpoints_its_own_mistake_log(ddp_output):
    checkpoint = ddp_output / "replay1" / "checkpoint-4"
    assert not (checkpoint / "mistake_log.pt").exists()
    logs = [torch.load(checkpoint / f"mistake_log_{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert [len(log["mistake_log"]["entries"]) for log in logs] == [4, 4]
    newest = [
        log["mistake_log"]["entries"][log["mistake_log"]["next"] - 1]["tensors"]["x_tilde"] for log in logs
    ]
    assert newest[0].shape != newest[1].shape or not torch.equal(*newest)  # each rank logged its own data
    # The marker is written once both ranks have saved: it lists both logs.
    marker = json.loads((checkpoint / COMPLETION_MARKER).read_text())
    assert {"mistake_log_0.pt", "mistake_log_1.pt"} <= set(marker["files"])
