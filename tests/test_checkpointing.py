"""Atomic saves (`atomic_save_directory`): a folder saved over is entirely old or entirely new, whatever happens."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import CAUSAL_HUB_FILES, build_pilot_copilot

from hf_copilot import PilotCopilotForCausalLM, checkpointing
from hf_copilot.checkpointing import atomic_save_directory

WHOLE_MODEL_FILES = CAUSAL_HUB_FILES | {"config.json", "generation_config.json", "model.safetensors"}
EXTRAS = {"optimizer.pt": b"optimizer state", "README.md": b"# card", "logs/events.txt": b"step 1"}
STAGING = re.compile(r"\.model\.[0-9a-f]{8}\.tmp")  # what a killed save leaves beside the folder


def old_model():
    return build_pilot_copilot("llama", seed=0, copilot_lambda=0.7)


def new_model():
    return build_pilot_copilot("llama", seed=1, copilot_lambda=0.3)


def old_folder(target: Path, max_shard_size="50GB") -> None:
    """A saved model plus files a Trainer or a user put next to it."""
    old_model().save_pretrained(target, max_shard_size=max_shard_size)
    for name, content in EXTRAS.items():
        (target / name).parent.mkdir(exist_ok=True)
        (target / name).write_bytes(content)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def assert_holds(folder: Path, model) -> None:
    """The folder loads as `model`: its config and its weights come from the same save."""
    loaded = PilotCopilotForCausalLM.from_pretrained(folder)
    assert loaded.config.copilot_lambda == model.config.copilot_lambda
    expected = model.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in loaded.state_dict().items())


def no_exchange(a, b) -> bool:
    return False  # a platform without renameat2(RENAME_EXCHANGE)


def no_hard_links(src, dst, **kwargs):
    raise PermissionError(1, "Operation not permitted")  # a filesystem without hard links


@pytest.mark.parametrize("platform", ["exchange", "two-renames", "no-hard-links"])
def test_saving_over_a_folder_leaves_exactly_the_new_files_and_the_others_carried_over(
    platform, tmp_path, monkeypatch
):
    target = tmp_path / "model"
    old_folder(target, max_shard_size=50_000)  # sharded: stale shards that the new save does not write
    shards = [name for name in os.listdir(target) if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name)]
    assert len(shards) > 1 and (target / "model.safetensors.index.json").exists()
    target.chmod(0o750)
    inodes = {name: (target / name).stat().st_ino for name in EXTRAS}
    if platform == "two-renames":
        monkeypatch.setattr(checkpointing, "exchange_directories", no_exchange)
    if platform == "no-hard-links":
        monkeypatch.setattr(os, "link", no_hard_links)
    new_model().save_pretrained(target)
    assert set(os.listdir(target)) == WHOLE_MODEL_FILES | {"optimizer.pt", "README.md", "logs"}
    assert {name: (target / name).read_bytes() for name in EXTRAS} == EXTRAS
    linked = {name: (target / name).stat().st_ino == inodes[name] for name in EXTRAS}
    assert linked == {name: platform != "no-hard-links" for name in EXTRAS}  # carried over by hard link
    assert (target.stat().st_mode & 0o777) == 0o750
    assert os.listdir(tmp_path) == ["model"]  # no staging folder or old copy left
    assert_holds(target, new_model())


def test_a_failure_while_saving_leaves_the_old_folder_byte_identical(tmp_path):
    target = tmp_path / "model"
    old_folder(target)
    before, inode = snapshot(target), target.stat().st_ino
    with pytest.raises(RuntimeError, match="^killed while writing$"):
        with atomic_save_directory(target) as staging:
            new_model().save_pretrained(staging)
            raise RuntimeError("killed while writing")
    assert snapshot(target) == before
    assert target.stat().st_ino == inode
    assert os.listdir(tmp_path) == ["model"]
    assert_holds(target, old_model())


def test_a_new_or_empty_folder_is_created_in_one_rename(tmp_path):
    (tmp_path / "empty").mkdir()
    for name in ("empty", "new"):
        new_model().save_pretrained(tmp_path / name)
        assert set(os.listdir(tmp_path / name)) == WHOLE_MODEL_FILES
    assert sorted(os.listdir(tmp_path)) == ["empty", "new"]


CRASH_SCRIPT = textwrap.dedent(
    """
    import os
    import signal
    import sys

    from conftest import build_pilot_copilot
    from hf_copilot import checkpointing

    target, moment = sys.argv[1:]
    moves = []


    def dying(move):
        # `move`, counting the moves into or out of the target, and SIGKILL at `moment`.
        def wrapper(*args, **kwargs):
            paths = [os.fspath(arg) for arg in args[:2]]
            counted = any(path == target or path.startswith(target + os.sep) for path in paths)
            moves.extend([paths] if counted else [])
            if counted and moment == f"before-move-{len(moves)}":
                os.kill(os.getpid(), signal.SIGKILL)
            result = move(*args, **kwargs)
            if counted and moment == f"after-move-{len(moves)}":
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return wrapper


    os.replace, os.rename = dying(os.replace), dying(os.rename)
    if hasattr(checkpointing, "exchange_directories"):
        checkpointing.exchange_directories = dying(checkpointing.exchange_directories)
    build_pilot_copilot("llama", seed=1, copilot_lambda=0.3).save_pretrained(target)  # new_model()
    """
)


@pytest.mark.parametrize(
    "moment, survivor",
    [("before-move-1", old_model), ("after-move-1", new_model), ("before-move-2", new_model)],
)
def test_a_process_killed_while_saving_over_a_folder_leaves_the_whole_old_or_the_whole_new_one(
    moment, survivor, tmp_path
):
    """The swap is one move: killed before it the folder is old, after it new; there is no second move."""
    target = tmp_path / "model"
    old_folder(target)
    # The child imports conftest and this very hf_copilot.
    paths = [str(Path(__file__).parent), str(Path(checkpointing.__file__).parents[1])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(target), moment],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    killed = moment != "before-move-2"
    assert result.returncode == (-signal.SIGKILL if killed else 0), result.stderr[-4000:]
    assert set(os.listdir(target)) == WHOLE_MODEL_FILES | {"optimizer.pt", "README.md", "logs"}
    assert {name: (target / name).read_bytes() for name in EXTRAS} == EXTRAS
    assert_holds(target, survivor())
    # A killed save's other half (new files before the swap, old ones after) stays in its staging folder.
    leftovers = [name for name in os.listdir(tmp_path) if name != "model"]
    assert len(leftovers) == killed and all(STAGING.fullmatch(name) for name in leftovers), leftovers
