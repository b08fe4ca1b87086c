"""`MistakeLogCallback`: the Mistake Log inside a Trainer run, saved with every checkpoint.

The trainer hands the callback each forward pass's fresh entry and draws replay batches from it, and has it
write the log and the replay sampler's RNG state into `checkpoint-N/mistake_log.pt` (one file per process
under DDP: every rank keeps the log of its own data) before the checkpoint's completion marker; resume
restores both, so a resumed run replays exactly the entries an uninterrupted run would have.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from transformers import TrainerCallback

from .checkpointing import atomic_torch_save
from .mistake_log import MistakeLog, collate_entries
from .mistake_log_entry import MistakeLogEntry

MISTAKE_LOG_NAME = "mistake_log.pt"
_FORMAT_VERSION = 2


def mistake_log_file(checkpoint_dir: str | os.PathLike, process_index: int = 0, world_size: int = 1) -> str:
    """`mistake_log.pt`, or `mistake_log_{rank}.pt` when several processes train (like `rng_state_{rank}.pth`)."""
    name = MISTAKE_LOG_NAME if world_size <= 1 else f"mistake_log_{process_index}.pt"
    return os.path.join(checkpoint_dir, name)


class MistakeLogCallback(TrainerCallback):
    """Holds the run's `MistakeLog` and the replay sampler; checkpoints both.

    `window` > 0: each micro-batch's Copilot batch is `(1 + replay) x` its rows, drawn from the entries
    of the last `window` rounds (the paper's log sampling). `window` = 0: the Copilot trains on the fresh
    entry plus `replay` whole entries drawn from the log.
    `seed`: seeds the sampler's own CPU generator, so sampling never disturbs the global RNG.
    """

    def __init__(
        self, mistake_log: MistakeLog | None = None, replay: int = 0, seed: int = 0, window: int = 0
    ):
        self.mistake_log = mistake_log if mistake_log is not None else MistakeLog()
        if replay < 0 or window < 0:
            raise ValueError(f"replay and window must be >= 0, got {replay} and {window}.")
        self.replay = replay
        self.window = window
        self.generator = torch.Generator().manual_seed(seed)

    # ---- the log ----------------------------------------------------------------------------------
    def add(self, entry: MistakeLogEntry, defer_checks: bool = False) -> None:
        self.mistake_log.add(entry, defer_checks=defer_checks)

    def sample_replay(self) -> MistakeLogEntry | None:
        """Without a window: `replay` entries of the log collated into one batch, or None."""
        if self.window or self.replay == 0 or len(self.mistake_log) == 0:
            return None
        return collate_entries(self.mistake_log.sample(self.replay, self.generator))

    def sample_copilot_batch(self, rows: int) -> MistakeLogEntry | None:
        """With a window: `(1 + replay) * rows` rows of the last `window` entries, or None (empty log)."""
        if self.window == 0:
            return None
        return self.mistake_log.sample_rows((1 + self.replay) * rows, self.window, self.generator)

    def stats(self) -> dict[str, float]:
        return self.mistake_log.stats()

    # ---- checkpoints ------------------------------------------------------------------------------
    def entries_needed_to_resume(self) -> int | None:
        """The newest entries a resumed run reads: the window's, all of them for replay, none otherwise."""
        if self.window:
            return self.window
        return None if self.replay else 0

    def state_dict(self, global_step: int, max_bytes: int | None = None) -> dict[str, Any]:
        """What resume needs (`entries_needed_to_resume`), within `max_bytes` if given."""
        needed = self.entries_needed_to_resume()
        log_state = self.mistake_log.state_dict(newest=needed, max_bytes=max_bytes)
        wanted = len(self.mistake_log) if needed is None else min(needed, len(self.mistake_log))
        if len(log_state["entries"]) < wanted:
            warnings.warn(
                f"The Mistake Log checkpoint budget ({max_bytes / 2**20:.3g} MiB) holds {len(log_state['entries'])} "
                f"of the {wanted} entries a resumed run would read: a run resumed from step {global_step} will "
                "train the Copilot on fewer logged rounds than an uninterrupted one. Raise "
                "mistake_log_checkpoint_mb (or None) for exact resume.",
                stacklevel=2,
            )
        return {
            "format_version": _FORMAT_VERSION,
            "global_step": global_step,
            "mistake_log": log_state,
            "replay_generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format_version") != _FORMAT_VERSION:
            raise ValueError(
                f"unknown format_version {state.get('format_version')!r} (expected {_FORMAT_VERSION})"
            )
        self.mistake_log.load_state_dict(state["mistake_log"])
        self.generator.set_state(state["replay_generator"])

    def save_to_checkpoint(
        self,
        checkpoint_dir: str | os.PathLike,
        global_step: int,
        process_index: int = 0,
        world_size: int = 1,
        max_bytes: int | None = None,
    ) -> None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        path = mistake_log_file(checkpoint_dir, process_index, world_size)
        atomic_torch_save(self.state_dict(global_step, max_bytes), path)

    def load_from_checkpoint(
        self,
        checkpoint_dir: str | os.PathLike,
        global_step: int,
        pilot_hidden_size: int,
        vocab_size: int,
        process_index: int = 0,
        world_size: int = 1,
    ) -> None:
        """Restore the log and the replay RNG, refusing a file from another step, Pilot or damaged on disk.

        Every failure is a ValueError naming the file and the field, so a bad checkpoint never resumes with a
        log that silently differs from the one the interrupted run had.
        """
        path = mistake_log_file(checkpoint_dir, process_index, world_size)
        if not os.path.isfile(path):
            raise ValueError(
                f"{path} not found: this checkpoint cannot resume the Copilot's training exactly (was it written "
                "by CopilotTrainer, with the same number of processes?)."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("global_step") != global_step:
                raise ValueError(
                    f"global_step is {state.get('global_step')!r} but the checkpoint is of step {global_step}"
                )
            self.load_state_dict(state)
            self.mistake_log.check_serves(pilot_hidden_size, vocab_size)
        except Exception as error:
            raise ValueError(
                f"Mistake Log file {path} cannot be resumed: {error}. Resume from another checkpoint."
            ) from error


__all__ = ["MISTAKE_LOG_NAME", "MistakeLogCallback", "mistake_log_file"]
