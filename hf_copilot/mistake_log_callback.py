"""`MistakeLogCallback`: the Mistake Log inside a Trainer run, saved with every checkpoint.

The trainer hands the callback each forward pass's fresh entry and draws replay batches from it; the
callback writes the log and the replay sampler's RNG state into `checkpoint-N/mistake_log.pt` (one file per
process under DDP: every rank keeps the log of its own data) and restores both on resume, so a resumed run
replays exactly the entries an uninterrupted run would have.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .checkpointing import atomic_torch_save
from .mistake_log import MistakeLog, collate_entries
from .mistake_log_entry import MistakeLogEntry

logger = logging.get_logger(__name__)

MISTAKE_LOG_NAME = "mistake_log.pt"
_FORMAT_VERSION = 1


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
    def add(self, entry: MistakeLogEntry) -> None:
        self.mistake_log.add(entry)

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
    def state_dict(self) -> dict[str, Any]:
        return {
            "format_version": _FORMAT_VERSION,
            "mistake_log": self.mistake_log.state_dict(),
            "replay_generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"Unknown Mistake Log checkpoint format {state.get('format_version')!r}.")
        self.mistake_log.load_state_dict(state["mistake_log"])
        self.generator.set_state(state["replay_generator"])

    def save_to_checkpoint(
        self, checkpoint_dir: str | os.PathLike, process_index: int = 0, world_size: int = 1
    ):
        os.makedirs(checkpoint_dir, exist_ok=True)
        atomic_torch_save(self.state_dict(), mistake_log_file(checkpoint_dir, process_index, world_size))

    def load_from_checkpoint(
        self, checkpoint_dir: str | os.PathLike, process_index: int = 0, world_size: int = 1
    ) -> bool:
        """Restore the log and the replay RNG; False (with a warning) when the checkpoint has no log."""
        path = mistake_log_file(checkpoint_dir, process_index, world_size)
        if not os.path.isfile(path):
            logger.warning(
                f"{path} not found: resuming with an empty Mistake Log, so replay will not continue exactly "
                "as the interrupted run would have (was the checkpoint written by CopilotTrainer, with the "
                "same number of processes?)."
            )
            return False
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return True

    def on_save(self, args, state, control, **kwargs):
        if args.save_only_model:
            return  # like the optimizer state: a model-only checkpoint cannot be resumed anyway
        checkpoint_dir = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(checkpoint_dir):
            logger.warning(f"Checkpoint folder {checkpoint_dir} not found: the Mistake Log was not saved.")
            return
        self.save_to_checkpoint(checkpoint_dir, args.process_index, args.world_size)


__all__ = ["MISTAKE_LOG_NAME", "MistakeLogCallback", "mistake_log_file"]
