"""Training arguments of `CopilotTrainer`: the stock `TrainingArguments` plus the Copilot's settings.

A drop-in for `TrainingArguments` (SPEC section 6): every stock field keeps its meaning and default, so an
existing script only changes the class name. The defaults give the paper's method (SPEC section 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.trainer_utils import SchedulerType

# The Copilot's defaults were chosen on benchmarks/results/copilot_training.md (docs/results.md quotes it).

PAPER_MISTAKE_LOG_SIZE = 128


@dataclass
class CopilotTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the Copilot's learning rate and loss weight and the Mistake Log's settings.

    `learning_rate`, the scheduler, warmup, weight decay and clipping apply to the Pilot and the Copilot
    alike; only the Copilot's peak learning rate can differ (paper: 1.5-3x the Pilot's).
    """

    copilot_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak learning rate of the Copilot's parameter groups; None uses `learning_rate` (the paper "
            "suggests 1.5-3x; measured, 2x and 3x were no better, and with the twelve-epoch Copilot-only phase "
            "3x halved the lift on arithmetic while 0.5x was level)."
        },
    )
    copilot_weight_decay: float | None = field(
        default=1.0,
        metadata={
            "help": "AdamW weight decay of the Copilot's weights (its norms and biases never decay), in joint "
            "training and, unless copilot_final_weight_decay is set, in the Copilot-only phase; None uses "
            "`weight_decay`. The default, 1, with the 24-epoch phase, took held-out R^2 on arithmetic from 0.20 to "
            "0.45 (benchmarks/results/final_phase_weight_decay/)."
        },
    )
    copilot_final_weight_decay: float | None = field(
        default=None,
        metadata={
            "help": "AdamW weight decay of the Copilot's weights in the Copilot-only phase only; None: "
            "copilot_weight_decay's. Measured: copilot_weight_decay=0.1 with 1 here lowered arithmetic in every "
            "seed of six against 1 in both (0.613 against 0.662; benchmarks/results/joint_weight_decay/)."
        },
    )
    copilot_fallback_weight_decay: float | None = field(
        default=0.1,
        metadata={
            "help": "When the Copilot-only phase ends with the Copilot predicting next to nothing (R^2 below 0.05 on "
            "its last epoch of training batches), run the phase again on the same batches, from a Copilot drawn "
            "afresh, with this weight decay, if it is lower than the phase's. Measured: it took multiple choice "
            "from R^2 0 to 0.33 held out and from 0.514 to 0.693 exact match, every seed up, and the paper's "
            "feedback mode on three arithmetic runs from 0.136 to 0.452 (benchmarks/results/fallback_fresh_copilot/); "
            "run below 0.05 rather than 0.01, it lifted 8 of the 10 runs it then reached "
            "(benchmarks/results/fallback_threshold/). "
            "None: never."
        },
    )
    copilot_lr_scheduler_type: str | None = field(
        default="constant_with_warmup",
        metadata={
            "help": "The Copilot's own learning-rate schedule (any `lr_scheduler_type` that is a LambdaLR). The "
            "default keeps it learning while the Pilot's rate decays: the final Pilot's errors are the ones "
            "generation sees. None follows the Pilot's `lr_scheduler_type`."
        },
    )
    copilot_feedback_fraction: float = field(
        default=1.0,
        metadata={
            "help": "For a model with copilot_feedback='copilot': the fraction of answer positions whose Copilot "
            "input during training is the Copilot's own previous prediction, as at generation (0: always the "
            "observed error)."
        },
    )
    copilot_final_epochs: float | None = field(
        default=None,
        metadata={
            "help": "After joint training, train the Copilot alone for this many epochs on the final, frozen "
            "Pilot (its errors are the ones generation will see; 0: no such phase). None: 24 epochs, but never "
            "more than 8 x the batches the joint run trained (a stream: that many), and none with freeze_pilot."
        },
    )
    copilot_loss_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the Copilot's loss in the joint objective `L_P + weight * L_C`."},
    )
    freeze_pilot: bool = field(
        default=False,
        metadata={
            "help": "Train only the Copilot for an already fine-tuned Pilot: the Pilot's parameters are frozen "
            "(no gradients, no optimizer state) and the Pilot runs in eval mode, as it will at inference."
        },
    )
    mistake_log_size: int | None = field(
        default=None,
        metadata={
            "help": "Ring-buffer length of the Mistake Log, in entries (one per forward pass; paper: 128). None: "
            "as many as the Copilot reads: the window's with mistake_log_window, 128 with replay, none "
            "otherwise (the fresh entry goes straight to the Copilot, and the log keeps its statistics only)."
        },
    )
    mistake_log_window: int = field(
        default=0,
        metadata={
            "help": "The Copilot's batch at each micro-batch is as many rows as the micro-batch, drawn from the "
            "Mistake Log entries of the last this-many rounds (the paper's log sampling); 0 trains it on the "
            "fresh entry only, which measured better: older entries hold the errors of older Pilots."
        },
    )
    mistake_log_replay: int = field(
        default=0,
        metadata={
            "help": "Extra Copilot compute: with a window, the Copilot's batch is (1 + replay) x the micro-batch's "
            "rows; without one, this many whole entries are drawn from the log on top of the fresh entry."
        },
    )
    mistake_log_checkpoint_mb: float | None = field(
        default=None,
        metadata={
            "help": "Upper bound on each checkpoint's Mistake Log file, in MiB. Checkpoints hold only the entries "
            "a resumed run reads (the window's, the whole log with replay, none by default); past the budget the "
            "oldest are dropped with a warning, and resume is then no longer exact. None: no bound."
        },
    )
    mistake_log_topk: int = field(
        default=64,
        metadata={
            "help": "Compact storage: keep the Pilot's top-k probabilities per position in the Mistake Log "
            "(0: store the exact full-vocabulary errors)."
        },
    )
    mistake_log_on_device: bool = field(
        default=False,
        metadata={
            "help": "Keep the Mistake Log's entries on the training device (an on-device ring buffer): no host "
            "copy of each entry and no transfer back of the rows the Copilot reads, for device memory (the log's "
            "size x a compact entry). False: CPU memory. Only a log that stores entries (a window or replay) "
            "holds any."
        },
    )

    @property
    def mistake_log_entries(self) -> int:
        """The log's length: `mistake_log_size`, or by default as many entries as the Copilot reads."""
        if self.mistake_log_size is not None:
            return self.mistake_log_size
        if self.mistake_log_window:
            return self.mistake_log_window
        return PAPER_MISTAKE_LOG_SIZE if self.mistake_log_replay else 0

    @property
    def copilot_peak_learning_rate(self) -> float:
        """`copilot_learning_rate`, or the Pilot's `learning_rate`."""
        return self.learning_rate if self.copilot_learning_rate is None else self.copilot_learning_rate

    @property
    def effective_copilot_weight_decay(self) -> float:
        """`copilot_weight_decay`, or the Pilot's `weight_decay`."""
        return self.weight_decay if self.copilot_weight_decay is None else self.copilot_weight_decay

    @property
    def effective_copilot_final_weight_decay(self) -> float:
        """`copilot_final_weight_decay`, or the Copilot's weight decay in joint training."""
        if self.copilot_final_weight_decay is None:
            return self.effective_copilot_weight_decay
        return self.copilot_final_weight_decay

    def __post_init__(self):
        super().__post_init__()
        for name, none_means in (
            ("copilot_weight_decay", "to use weight_decay"),
            ("copilot_final_weight_decay", "to use copilot_weight_decay"),
            ("copilot_fallback_weight_decay", "for no second phase"),
        ):
            decay = getattr(self, name)
            if decay is not None and not (
                isinstance(decay, (int, float))
                and not isinstance(decay, bool)
                and math.isfinite(decay)
                and decay >= 0
            ):
                raise ValueError(f"{name} must be a finite number >= 0, or None {none_means}, got {decay!r}.")
        lr = self.copilot_learning_rate
        if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(
                f"copilot_learning_rate must be a positive number, or None to use learning_rate, got {lr!r}."
            )
        weight = self.copilot_loss_weight
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"copilot_loss_weight must be a finite number >= 0, got {weight!r}.")
        if self.mistake_log_size is not None and (
            isinstance(self.mistake_log_size, bool)
            or not isinstance(self.mistake_log_size, int)
            or self.mistake_log_size < 0
        ):
            raise ValueError(
                f"mistake_log_size must be an integer >= 0, or None for what the Copilot reads, got "
                f"{self.mistake_log_size!r}."
            )
        for name, minimum in (
            ("mistake_log_window", 0),
            ("mistake_log_replay", 0),
            ("mistake_log_topk", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
        if self.mistake_log_replay > self.mistake_log_entries:
            raise ValueError(
                f"mistake_log_replay ({self.mistake_log_replay}) cannot exceed mistake_log_size "
                f"({self.mistake_log_entries}): the log never holds more entries than its size. Raise "
                "mistake_log_size or lower mistake_log_replay."
            )
        if self.mistake_log_window > self.mistake_log_entries:
            raise ValueError(
                f"mistake_log_window ({self.mistake_log_window}) cannot exceed mistake_log_size "
                f"({self.mistake_log_entries}): the log keeps only that many rounds. Raise mistake_log_size."
            )
        if not isinstance(self.mistake_log_on_device, bool):
            raise ValueError(
                f"mistake_log_on_device must be True or False, got {self.mistake_log_on_device!r}."
            )
        budget = self.mistake_log_checkpoint_mb
        if budget is not None and not (
            isinstance(budget, (int, float)) and math.isfinite(budget) and budget >= 0
        ):
            raise ValueError(
                f"mistake_log_checkpoint_mb must be a finite number >= 0 or None, got {budget!r}."
            )
        fraction = self.copilot_feedback_fraction
        if not (isinstance(fraction, (int, float)) and 0 <= fraction <= 1):
            raise ValueError(f"copilot_feedback_fraction must be a number in [0, 1], got {fraction!r}.")
        epochs = self.copilot_final_epochs
        if epochs is not None and not (
            isinstance(epochs, (int, float)) and math.isfinite(epochs) and epochs >= 0
        ):
            raise ValueError(
                f"copilot_final_epochs must be a finite number >= 0, or None for the default, got {epochs!r}."
            )
        if self.copilot_lr_scheduler_type is not None:
            self.copilot_lr_scheduler_type = SchedulerType(self.copilot_lr_scheduler_type).value
        if self.freeze_pilot and weight == 0:
            raise ValueError(
                "freeze_pilot=True with copilot_loss_weight=0 trains nothing: set copilot_loss_weight > 0."
            )
        if self.label_smoothing_factor != 0:
            raise ValueError(
                f"label_smoothing_factor={self.label_smoothing_factor} is not supported by CopilotTrainer: the "
                "Pilot's loss is its own cross-entropy and the Mistake Log measures errors against the hard "
                "labels. Set label_smoothing_factor=0."
            )


__all__ = ["CopilotTrainingArguments"]
