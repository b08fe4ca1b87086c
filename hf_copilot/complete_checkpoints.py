"""Trainer checkpoints that are complete or ignored.

Trainer writes `checkpoint-N/` file by file; a process killed in the middle leaves a folder that looks like a
checkpoint and is not (weights without optimizer state, no Mistake Log, an empty folder). `CopilotTrainer`
writes `checkpoint_complete.json` last, listing every file of the checkpoint with its size, and only such
checkpoints are resumed or counted by `save_total_limit`: rotation runs after the marker, so the previous
complete checkpoint is never deleted before the new one is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

logger = logging.get_logger(__name__)

COMPLETION_MARKER = "checkpoint_complete.json"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# Staging folders of atomic saves (`atomic_save_directory`, `atomic_torch_save`) left by a killed process.
_STAGING = re.compile(r"^\..+\.tmp$")


def _files_with_sizes(folder: str) -> dict[str, int]:
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, folder)] = os.path.getsize(path)
    return files


def _write_json_atomically(data: dict, path: str) -> None:
    fd, staging = tempfile.mkstemp(
        dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.unlink(staging)
        raise


def mark_checkpoint_complete(checkpoint_dir: str | os.PathLike, global_step: int) -> dict[str, int]:
    """Write the marker last: the step and every file of the checkpoint with its size (returned)."""
    files = _files_with_sizes(os.fspath(checkpoint_dir))
    files.pop(COMPLETION_MARKER, None)
    marker = {"global_step": global_step, "files": dict(sorted(files.items()))}
    _write_json_atomically(marker, os.path.join(checkpoint_dir, COMPLETION_MARKER))
    return marker["files"]


def checkpoint_problem(checkpoint_dir: str | os.PathLike) -> str | None:
    """Why `checkpoint_dir` is not a complete checkpoint, or None when it is."""
    marker_path = os.path.join(checkpoint_dir, COMPLETION_MARKER)
    if not os.path.isfile(marker_path):
        return f"no {COMPLETION_MARKER} (its save did not finish)"
    try:
        with open(marker_path) as handle:
            listed = json.load(handle)["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable {COMPLETION_MARKER} ({error})"
    present = _files_with_sizes(os.fspath(checkpoint_dir))
    for name, size in listed.items():
        if name not in present:
            return f"{name} is missing"
        if present[name] != size:
            return f"{name} has {present[name]} bytes, {size} when the checkpoint was written"
    return None


def checkpoint_step(path: str | os.PathLike) -> int | None:
    match = _CHECKPOINT.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def checkpoints_by_step(output_dir: str | os.PathLike) -> list[str]:
    """`checkpoint-N` folders of `output_dir`, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    folders = [
        os.path.join(output_dir, name)
        for name in os.listdir(output_dir)
        if _CHECKPOINT.match(name) and os.path.isdir(os.path.join(output_dir, name))
    ]
    return sorted(folders, key=checkpoint_step)


def remove_staging_folders(output_dir: str | os.PathLike) -> None:
    """Delete what killed saves left behind: staging folders/files beside the checkpoints."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if _STAGING.match(name):
            path = os.path.join(output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def newest_complete_checkpoint(output_dir: str | os.PathLike) -> str:
    """The checkpoint to resume from; newer incomplete ones are reported and deleted.

    An incomplete checkpoint can never be resumed, and leaving it would let the resumed run write its save of
    the same step over stale files. Raises ValueError when no complete checkpoint exists.
    """
    remove_staging_folders(output_dir)
    skipped = []
    for checkpoint in reversed(checkpoints_by_step(output_dir)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            for incomplete, reason in skipped:
                logger.warning(f"Skipping incomplete checkpoint {incomplete} ({reason}); deleting it.")
                shutil.rmtree(incomplete)
            return checkpoint
        skipped.append((checkpoint, problem))
    details = "; ".join(f"{os.path.basename(c)}: {reason}" for c, reason in skipped)
    raise ValueError(
        f"No complete checkpoint in {output_dir}"
        + (f" (incomplete: {details})" if skipped else "")
        + ". Start training without resume_from_checkpoint."
    )


def check_checkpoint_complete(checkpoint_dir: str | os.PathLike) -> None:
    """Refuse to resume from an explicitly named checkpoint that is not complete, naming a good one."""
    problem = checkpoint_problem(checkpoint_dir)
    if problem is None:
        return
    parent = os.path.dirname(os.path.normpath(checkpoint_dir))
    complete = [c for c in checkpoints_by_step(parent) if checkpoint_problem(c) is None]
    hint = (
        f"the newest complete checkpoint there is {complete[-1]}"
        if complete
        else "there is no complete checkpoint beside it"
    )
    raise ValueError(
        f"Cannot resume from {checkpoint_dir}: it is not a complete CopilotTrainer checkpoint ({problem}); "
        f"{hint}. resume_from_checkpoint=True picks the newest complete one."
    )


def rotate_complete_checkpoints(
    output_dir: str | os.PathLike, save_total_limit: int | None, keep: str | None = None
) -> None:
    """`save_total_limit` over complete checkpoints only: the newest one and `keep` (the best) survive."""
    if not save_total_limit or save_total_limit <= 0:
        return
    complete = [c for c in checkpoints_by_step(output_dir) if checkpoint_problem(c) is None]
    protected = {os.path.realpath(complete[-1])} if complete else set()
    if keep is not None:
        protected.add(os.path.realpath(keep))
    excess = len(complete) - max(save_total_limit, len(protected))
    for checkpoint in complete:
        if excess <= 0:
            break
        if os.path.realpath(checkpoint) not in protected:
            logger.info(f"Deleting older checkpoint [{checkpoint}] due to args.save_total_limit")
            # Renamed first: a process killed during the deletion leaves a staging folder, not a checkpoint
            # with some files missing.
            parent, name = os.path.split(checkpoint)
            doomed = os.path.join(parent, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
            os.replace(checkpoint, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            excess -= 1


__all__ = [
    "COMPLETION_MARKER",
    "check_checkpoint_complete",
    "checkpoint_problem",
    "mark_checkpoint_complete",
    "newest_complete_checkpoint",
    "remove_staging_folders",
    "rotate_complete_checkpoints",
]
