"""Does the Copilot make a fine-tuned model better? Two regimes, four arms, three seeds (SPEC section 7).

Regimes:
  pretrained  the paper's: a small LLaMA family pretrained offline on a broad generated corpus
              (benchmarks/model_family.py), fine-tuned on task families that are not in that corpus
  pretrained_t5  the same with a small FLAN-T5-layout family (benchmarks/t5_family.py) in PilotCopilotForSeq2SeqLM
  scratch     tiny Pilots trained from random initialisation on one task
Settings run only when --tasks names them: arithmetic_12_epochs, recommendation_9_epochs and
word_problems_worked_12_epochs, the same tasks fine-tuned for 2x, 3x and 3x the epochs, about as long as
Pilot + Copilot trains on them (the compute-matched Pilot, and the Copilot on top of a better-trained Pilot);
arithmetic_24_epochs and recommendation_18_epochs, twice that again (the Pilot matched to the latter);
recommendation_750_examples_{24,36,48,72}_epochs, a quarter of the data, on which the Pilot stops improving between
36 and 48 epochs (the regime where more Pilot training stops paying).
Arms (same Pilot initialisation, data order and steps):
  pilot               the Pilot fine-tuned alone with the stock Trainer
  pilot_copilot       Pilot + a randomly initialised Copilot, CopilotTrainer with the package defaults (the
                      reweight head on the cross-entropy; the token embedding; the memory entries RMS-normalised
                      after their projection; the Copilot-only phase: 24 epochs, at most 8 x the joint run's batches;
                      weight decay 1 on the Copilot's weights in both phases)
  pilot_copilot_linear  the ablation of CopilotConfig.error_form: pilot_copilot with the paper's linear head on
                      the squared error instead of the "reweight" head (f_C = softmax(log p + W_out h) - p) on the
                      cross-entropy of the observed token under p + f_C (the default before the latter)
  pilot_copilot_reweight  the ablation of CopilotConfig.error_loss: the reweight head on the squared error
  pilot_copilot_small_head  the ablation of CopilotConfig.initial_error_norm: pilot_copilot with its output
                      head drawn so that ||f_C|| starts at 0.1 (observed feedback only)
  pilot_copilot_small_input  the ablation of CopilotConfig.error_proj_init_std: pilot_copilot with W_in drawn
                      at initializer_range (0.02) like every other weight, the default before 1
  pilot_copilot_no_positions  the ablation of CopilotConfig.position_encoding: pilot_copilot without positions
                      in the Copilot's attention (the paper's, the default before "rope")
  pilot_copilot_final_1_epoch  the ablation of copilot_final_epochs: one Copilot-only epoch on the final Pilot,
                      the benchmarks' setting before the default phase
  pilot_copilot_final_{3,6,24}_epochs  the other side of that ablation: 3, 6 or 24 (the default) Copilot-only
                      epochs
  pilot_copilot_lr_{half,3x}  the ablation of copilot_learning_rate: pilot_copilot with the Copilot's peak
                      learning rate (joint run and Copilot-only phase) at 0.5x or 3x the Pilot's (3x: the top of
                      the paper's range)
  pilot_copilot_deep  a capacity diagnostic: pilot_copilot with twice the Copilot's layers (twice its compute)
  pilot_copilot_dropout  a regularisation diagnostic: pilot_copilot with dropout 0.1 in the Copilot's layers
                      (hidden_dropout and attention_dropout; the default is none)
  pilot_copilot_weight_decay_{0.1,0.3,1}  the other regulariser: pilot_copilot with AdamW weight decay 0.1, 0.3 or 1
                      (the default) on the Copilot's weights (copilot_weight_decay; the benchmarks' weight_decay is
                      0), the second phase at 0.1 as by default
  pilot_copilot_joint_weight_decay_0.1  pilot_copilot with weight decay 0.1 in the joint run and 1 in the
                      Copilot-only phase (copilot_final_weight_decay), the second phase at 0.1 as by default
  pilot_copilot_final_{12,24}_epochs_weight_decay_{0,0.1,0.3,1}  both levers set: that Copilot-only phase with that
                      weight decay and never a second phase with less (copilot_fallback_weight_decay=None),
                      whatever the defaults (12 epochs without weight decay: the default before 24 with 1, under
                      which the longer phase mostly memorised the training prompts; 24 with 1: the default before
                      the fallback)
  pilot_copilot_last_layer  an input diagnostic: the Copilot's memory holds the Pilot's last hidden state instead
                      of the mean over its layers (h_bar, the paper's), in training and at generation
  pilot_copilot_fresh_phase  a start diagnostic: pilot_copilot with its Copilot-only phase started from a Copilot
                      drawn afresh (as the fallback's second phase is) instead of the one the joint run left; the
                      joint run, and so the final Pilot, the data order and the phase's batches, are pilot_copilot's
  pilot_copilot_fallback_below_{0.05,0.1}  a threshold diagnostic: pilot_copilot with the second phase run where
                      the first ends below R^2 0.05 or 0.1 on its last epoch of training batches (the package's:
                      0.05, after the 0.05 arm measured better than the former 0.01)
  pilot_copilot_reserved_phase  a data diagnostic: the joint run on the first 3/4 of the training examples, the
                      Copilot-only phase on the last quarter, which the Pilot never saw, so the Copilot learns the
                      errors the final Pilot makes on unseen prompts (the default phase's number of batches)
  copilot_after_pilot  the Copilot added to a Pilot already fine-tuned alone (the pilot arm's): CopilotTrainer
                      with freeze_pilot=True for the default phase's epochs, the Pilot's cosine schedule; no
                      joint run (its time: the Pilot's and the Copilot's together)
  copilot_after_pilot_as_long  the same for as many epochs as pilot_copilot's Copilot trains (the joint run's and
                      the phase's), to tell the errors along the Pilot's fine-tuning from the amount of training
  pilot_copilot_paper the same trained for the paper's feedback mode (copilot_feedback="copilot", the
                      Copilot reads its own predictions at answer positions in training too; built for that
                      mode, it has memory_norm and the paper's linear head on the squared error by default)
  pilot_copilot_paper_reweight  pilot_copilot_paper with the reweight head on the cross-entropy, the observed
                      mode's default head
  pilot_copilot_memory_norm  pilot_copilot with the Pilot's states RMS-normalised before the Copilot's memory
                      projection (CopilotConfig.memory_norm=True; the default for the paper's feedback mode only)
  pilot_copilot_paper_no_memory_norm  pilot_copilot_paper without it (memory_norm=False), as before that default
  pilot_copilot_no_projected_memory_norm  the ablation of CopilotConfig.projected_memory_norm: pilot_copilot
                      without each memory entry RMS-normalised after the projection to the Copilot's width (its
                      keys and values then read entries of about 0.2 RMS; the default before it)
  pilot_copilot_paper_no_projected_memory_norm  pilot_copilot_paper without it
  pilot_copilot_no_token_embedding  the ablation of CopilotConfig.token_embedding: pilot_copilot without the
                      learnt embedding of the token each error is about in the Copilot's input rows (the default
                      before it)
  pilot_copilot_paper_no_token_embedding  pilot_copilot_paper without it (its generated positions then read
                      W_in f_C alone, not W_in f_C + E[x_j])
  pilot_copilot_token_gain  pilot_copilot with the cheap token term (token_embedding="gain": g * W_in[:, x_j],
                      d_C learnt gains, instead of the V x d_C table E)
  pilot_copilot_no_qk_norm  pilot_copilot whose attention does not RMS-normalise each head's queries and keys
                      (CopilotConfig.qk_norm=False, the default before results/qk_norm/, where pilot_copilot_qk_norm
                      measured today's default against it)
  pilot_copilot_paper_token_gain  pilot_copilot_paper with it
  pilot_copilot_paper_qk_norm  pilot_copilot_paper with query and key norms (qk_norm=True, off by default for
                      that mode)
  pilot_copilot_paper_final_24_epochs  pilot_copilot_paper with 24 Copilot-only epochs (the default)
  pilot_copilot_paper_final_{12,24}_epochs_weight_decay_{0,0.1,0.3,1}  pilot_copilot_paper with both levers set (12
                      epochs without weight decay: the default before 24 with 1)
  pilot_copilot_paper_fresh_phase  pilot_copilot_paper with its Copilot-only phase started from a Copilot drawn
                      afresh (pilot_copilot_fresh_phase's diagnostic in the paper's feedback mode)
  pilot_copilot_paper_fallback_below_{0.05,0.1}  pilot_copilot_paper with pilot_copilot_fallback_below_*'s thresholds
  pilot_copilot_paper_fraction_half  pilot_copilot_paper trained with half its answer positions reading the
                      observed error and half its own prediction (copilot_feedback_fraction=0.5; default 1)
  pilot_copilot_init  pilot_copilot with the Copilot initialised from the smaller family member (pretrained only)
  pilot_copilot_init_embedding_scale  the ablation of copilot_init's W_in scale: pilot_copilot_init with W_in left at
                      the embeddings' own scale (error_proj_init_std=None) instead of std 1
  pilot_copilot_init_linear  pilot_copilot_init with the paper's linear head on the squared error
  pilot_copilot_init_final_1_epoch  pilot_copilot_init with one Copilot-only epoch
  pilot_copilot_init_final_{3,6}_epochs  pilot_copilot_init with 3 or 6 Copilot-only epochs
  pilot_copilot_init_base  a capacity diagnostic: the Copilot as large as the Pilot and initialised from the Pilot's
                      own pretrained weights (the base member; the paper pairs a 1B Pilot with an equal-size
                      Copilot), about the Pilot's parameters: the bigger Pilot is not its parameter match
  pilot_matched       the next family size (pretrained) or a Pilot with as many parameters (scratch)
  transfer            pilot_copilot_init's Copilot attached to a Pilot fine-tuned independently (another data
                      order), as in the paper's Table 3 (pretrained only)
Each Copilot arm is scored in both feedback modes; lambda is chosen on validation, accuracy reported on test.

    python benchmarks/quality.py --regime pretrained --output /tmp/quality/pretrained
    python benchmarks/quality.py --regime scratch --output /tmp/quality/scratch
    python benchmarks/quality.py --from-records /tmp/quality/*/quality.json   # writes benchmarks/results/

One record per (regime, task, seed, arm, feedback) in quality.json: regime, task, seed, arm, feedback, lambda,
test_accuracy, params, plus validation accuracy, the Copilot's R^2 held out and on as many of its training
prompts (observed feedback, teacher forced; a paper-mode Copilot's held-out R^2 as generated too:
copilot_r2_as_generated), and the training time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import NamedTuple
from unittest import mock

import torch
import transformers
from common import merged_commands
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
)

from hf_copilot import (
    CopilotConfig,
    CopilotTrainer,
    CopilotTrainingArguments,
    PilotCopilotForCausalLM,
    PilotCopilotForSeq2SeqLM,
    copilot_final_phase,
    modeling_pilot_copilot,
)
from hf_copilot import trainer as trainer_module
from hf_copilot.configuration_pilot_copilot import INITIAL_ERROR_NORM, copilot_config_like
from hf_copilot.copilot_final_phase import DEFAULT_FINAL_EPOCHS, final_phase_batches, redraw
from hf_copilot.experiments.data import (
    DataCollatorForCompletion,
    tokenize_examples,
    tokenize_seq2seq_examples,
)
from hf_copilot.experiments.evaluation import DEFAULT_LAMBDAS, best_lambda, evaluate_task
from hf_copilot.experiments.recipes import PilotShape, T5Shape, matched_shape, task_tokenizer
from hf_copilot.experiments.tasks import get_task

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FEEDBACK_MODES = ("observed", "copilot")
# The Copilot-only phase's epochs and weight decay, both set whatever the defaults: `final_{epochs}_epochs_weight_decay_{decay}`.
# The second phase's thresholds in the *_fallback_below_{r2} diagnostics (the package's: NOTHING_LEARNT_R2, 0.05
# since the 0.05 diagnostic measured better than 0.01).
FALLBACK_DIAGNOSTIC_R2S = (0.05, 0.1)
PHASE_GRID = tuple((epochs, decay) for epochs in (12, 24) for decay in ("0", "0.1", "0.3", "1"))
ARMS = (
    "pilot",
    "pilot_copilot",
    "pilot_copilot_linear",
    "pilot_copilot_reweight",
    "pilot_copilot_small_head",
    "pilot_copilot_small_input",
    "pilot_copilot_no_positions",
    "pilot_copilot_final_1_epoch",
    "pilot_copilot_final_3_epochs",
    "pilot_copilot_final_6_epochs",
    "pilot_copilot_final_24_epochs",
    "pilot_copilot_lr_half",
    "pilot_copilot_lr_3x",
    "pilot_copilot_deep",
    "pilot_copilot_dropout",
    "pilot_copilot_weight_decay_0.1",
    "pilot_copilot_weight_decay_0.3",
    "pilot_copilot_weight_decay_1",
    "pilot_copilot_joint_weight_decay_0.1",
    *(f"pilot_copilot_final_{epochs}_epochs_weight_decay_{decay}" for epochs, decay in PHASE_GRID),
    "pilot_copilot_last_layer",
    "pilot_copilot_fresh_phase",
    *(f"pilot_copilot_fallback_below_{r2}" for r2 in FALLBACK_DIAGNOSTIC_R2S),
    "pilot_copilot_reserved_phase",
    "copilot_after_pilot",
    "copilot_after_pilot_as_long",
    "pilot_copilot_paper",
    "pilot_copilot_memory_norm",
    "pilot_copilot_no_projected_memory_norm",
    "pilot_copilot_no_token_embedding",
    "pilot_copilot_paper_no_memory_norm",
    "pilot_copilot_paper_no_projected_memory_norm",
    "pilot_copilot_paper_reweight",
    "pilot_copilot_paper_no_token_embedding",
    "pilot_copilot_token_gain",
    "pilot_copilot_no_qk_norm",
    "pilot_copilot_paper_token_gain",
    "pilot_copilot_paper_qk_norm",
    "pilot_copilot_paper_final_24_epochs",
    *(f"pilot_copilot_paper_final_{epochs}_epochs_weight_decay_{decay}" for epochs, decay in PHASE_GRID),
    "pilot_copilot_paper_fraction_half",
    "pilot_copilot_paper_fresh_phase",
    *(f"pilot_copilot_paper_fallback_below_{r2}" for r2 in FALLBACK_DIAGNOSTIC_R2S),
    "pilot_copilot_init",
    "pilot_copilot_init_embedding_scale",
    "pilot_copilot_init_linear",
    "pilot_copilot_init_final_1_epoch",
    "pilot_copilot_init_final_3_epochs",
    "pilot_copilot_init_final_6_epochs",
    "pilot_copilot_init_base",
    "transfer",
    "pilot_matched",
)
SCRATCH_COPILOT = CopilotConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


@dataclass
class Setting:
    """A downstream task family with an amount of fine-tuning that leaves the Pilot between 20% and 80%."""

    task: str
    options: dict = field(default_factory=dict)
    train_size: int = 2000
    epochs: float = 2.0
    learning_rate: float = 3e-3
    shape: PilotShape | T5Shape = field(default_factory=lambda: PilotShape(64, 2, 4))
    label: str = ""  # the name records and --tasks use where one task has two settings
    on_request: bool = False  # run only when --tasks names it: a comparison, not a protocol setting

    @property
    def name(self) -> str:
        return self.label or self.task


SETTINGS = {
    "pretrained": [
        Setting("arithmetic", {"digits": 2, "operations": "+-"}, 4000, 6.0, 2e-3),
        Setting("word_problems", {"max_number": 8}, 3000, 4.0, 2e-3),
        Setting("recommendation", {"num_items": 60, "num_genres": 4}, 3000, 3.0, 2e-3),
        Setting("multiple_choice", {"num_choices": 2}, 2000, 3.0, 2e-3),
        # The answer with its worked solution, as the paper's GSM8K targets: the bare answer leaves the Pilot at 9%.
        Setting(
            "word_problems",
            {"max_number": 8, "rationale": True},
            3000,
            4.0,
            2e-3,
            label="word_problems_worked",
        ),
    ],
    # The pretrained T5 family (benchmarks/t5_family.py, FLAN-T5 layout): the longest of the fine-tuning lengths
    # tried on the Pilot alone (seed 0, validation), whose Pilots still stay far below the 20-80% band.
    "pretrained_t5": [
        Setting("arithmetic", {"digits": 2, "operations": "+-"}, 4000, 12.0, 2e-3, T5Shape()),
        Setting("recommendation", {"num_items": 60, "num_genres": 4}, 3000, 6.0, 2e-3, T5Shape()),
    ],
    # Encoder-decoder Pilots (T5 layout) trained from scratch: the prompt is the source, the answer the target.
    "scratch_t5": [
        Setting("sorting", {"length": 8}, 2000, 6.0, shape=T5Shape(64, 2, 4)),
        Setting("recommendation", {"num_items": 60, "num_genres": 4}, 4000, 8.0, shape=T5Shape(64, 2, 4)),
    ],
    "scratch": [
        Setting("sorting", {"length": 8}, 2000, 2.0),
        Setting("arithmetic", {"digits": 2, "operations": "+-"}, 6000, 8.0),
        Setting("word_problems", {"max_number": 8}, 3000, 4.0),
        Setting("recommendation", {"num_items": 60, "num_genres": 4}, 4000, 8.0),
    ],
}


def trained_longer(setting: Setting, multiple: int) -> Setting:
    """`setting` fine-tuned for `multiple` x its epochs, run on request (`{task}_{epochs}_epochs`)."""
    epochs = setting.epochs * multiple
    return dataclasses.replace(
        setting, epochs=epochs, label=f"{setting.name}_{epochs:g}_epochs", on_request=True
    )


# The Pilot fine-tuned for about as long as Pilot + Copilot trains (joint run and Copilot-only phase: 2.5-2.7x,
# 3.7-4.3x and 2.7-2.9x the Pilot's time on these families): the compute-matched Pilot, and the Copilot on top of
# a Pilot that has learnt more of what its data teaches; and twice that again, the Pilot matched to the latter.
LONGER_TRAINING = (
    ("arithmetic", 2),
    ("arithmetic", 4),
    ("recommendation", 3),
    ("recommendation", 6),
    ("word_problems_worked", 3),
)


def with_less_data(setting: Setting, train_size: int, epochs: float) -> Setting:
    """`setting` on `train_size` examples for `epochs`, run on request
    (`{task}_{train_size}_examples_{epochs}_epochs`)."""
    label = f"{setting.name}_{train_size}_examples_{epochs:g}_epochs"
    return dataclasses.replace(setting, train_size=train_size, epochs=epochs, label=label, on_request=True)


# Where more epochs stop helping the Pilot: on a quarter of the recommendation data, 36 and 48 epochs score alike
# over five seeds (benchmarks/results/quarter_data/).
LESS_DATA = (
    ("recommendation", 750, 24.0),
    ("recommendation", 750, 36.0),
    ("recommendation", 750, 48.0),
    ("recommendation", 750, 72.0),
)
PROTOCOL_SETTINGS = {setting.name: setting for setting in SETTINGS["pretrained"]}
SETTINGS["pretrained"] += [
    trained_longer(PROTOCOL_SETTINGS[name], multiple) for name, multiple in LONGER_TRAINING
] + [with_less_data(PROTOCOL_SETTINGS[name], size, epochs) for name, size, epochs in LESS_DATA]


def phase_from_fresh_copilot():
    """A patch under which `CopilotTrainer.train()` starts its Copilot-only phase from a Copilot drawn afresh from
    the run's seed (`redraw`, as the fallback's second phase starts), leaving the joint run and torch's generators
    as they were."""
    phase = trainer_module.train_copilot_on_final_pilot

    def from_fresh_copilot(trainer, epochs, joint_batches=0):
        redraw(trainer.pilot_copilot().copilot, trainer.args.seed)
        phase(trainer, epochs, joint_batches)

    return mock.patch.object(trainer_module, "train_copilot_on_final_pilot", from_fresh_copilot)


def fallback_below(r2: float):
    """A patch under which the second phase runs where the first ends below `r2` (the package's threshold:
    copilot_final_phase.NOTHING_LEARNT_R2)."""
    return mock.patch.object(copilot_final_phase, "NOTHING_LEARNT_R2", r2)


# Diagnostics that change the Copilot-only phase, by the arm's suffix.
PHASE_PATCHES = {
    "_fresh_phase": phase_from_fresh_copilot,
    **{f"_fallback_below_{r2}": functools.partial(fallback_below, r2) for r2 in FALLBACK_DIAGNOSTIC_R2S},
}


def phase_patch(arm: str):
    """The patch of the arm's phase diagnostic, or none."""
    for suffix, patch in PHASE_PATCHES.items():
        if arm.endswith(suffix):
            return patch()
    return contextlib.nullcontext()


def arguments(
    setting: Setting,
    seed: int,
    output_dir: str,
    with_copilot: bool,
    data_seed: int | None = None,
    copilot_change: dict | None = None,
):
    """The optimisation every arm shares; the Copilot arms add only the package's Copilot defaults, or
    `copilot_change` to them."""
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=32,
        num_train_epochs=setting.epochs,
        learning_rate=setting.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=20,
        seed=seed,
        data_seed=seed if data_seed is None else data_seed,
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    if not with_copilot:
        return TrainingArguments(**common)
    return CopilotTrainingArguments(**common | (copilot_change or {}))


class CopilotR2(NamedTuple):
    """The trained Copilot's R^2 (teacher forced on observed errors, answer positions) on the validation prompts
    and on as many of its training prompts."""

    held_out: float
    train: float
    before_fallback: float | None = None
    """The phase's R^2 on its last epoch before it ran again with `copilot_fallback_weight_decay`; None if not."""
    as_generated: float | None = None
    """Held out, f_C as generate() forms it in the paper's feedback mode; None for an observed-feedback model."""


class Experiment:
    """One regime, task and seed: the data, the tokenizer, and how each arm's model is made."""

    def __init__(
        self,
        regime: str,
        setting: Setting,
        seed: int,
        eval_size: int,
        family=None,
        error_form: str | None = None,
    ):
        self.regime, self.setting, self.seed = regime, setting, seed
        self.error_form = error_form
        self.task = get_task(setting.task, **setting.options)
        self.family = family
        if family is not None:
            self.tokenizer = AutoTokenizer.from_pretrained(family.tokenizer_path)
        else:
            self.tokenizer = task_tokenizer(self.task)
        self.tokenizer.padding_side = "left"
        self.train = self.task.examples("train", setting.train_size, seed=seed)
        self.validation = self.task.examples("validation", eval_size, seed=seed)
        self.test = self.task.examples("test", eval_size, seed=seed)
        self.collator = DataCollatorForCompletion(self.tokenizer)
        self.seq2seq = isinstance(setting.shape, T5Shape)
        self.wrapper = PilotCopilotForSeq2SeqLM if self.seq2seq else PilotCopilotForCausalLM
        self.tokenize = tokenize_seq2seq_examples if self.seq2seq else tokenize_examples
        self.dataset = self.tokenize(self.train, self.tokenizer)
        self.scratch = tempfile.mkdtemp(prefix="quality-")
        self._fine_tuned_pilot = None

    def fine_tuned_pilot(self):
        """The Pilot fine-tuned alone and its training seconds, trained once per experiment: the pilot arm scores
        it, the added-after arms each put a Copilot on a copy of it."""
        if self._fine_tuned_pilot is None:
            self._fine_tuned_pilot = self.fine_tune(self.pilot(), with_copilot=False)[:2]
        return self._fine_tuned_pilot

    def pilot(self, member: str = "base"):
        torch.manual_seed(self.seed)
        if self.family is not None:
            auto_class = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
            return auto_class.from_pretrained(self.family.members[member])
        if member == "large":
            target = self.pilot().num_parameters() + self.copilot_parameters()
            return matched_shape(self.setting.shape, target, self.tokenizer).build(self.tokenizer, self.seed)
        return self.setting.shape.build(self.tokenizer, self.seed)

    def copilot_config(self, member: str = "small") -> CopilotConfig:
        """The Copilot's shape (a family member's, the small one by default, in the pretrained regime) with the
        chosen error form. `qk_norm` is left unset: the default for the feedback mode in a random Copilot, the
        member's own under copilot_init."""
        if self.family is None:
            config = SCRATCH_COPILOT
        else:
            config = copilot_config_like(AutoConfig.from_pretrained(self.family.members[member]))
            config.qk_norm = None
        if self.error_form is None:
            return config
        # error_loss None: the form's own loss (the cross-entropy needs the reweight form).
        return CopilotConfig.from_dict(config.to_dict() | {"error_form": self.error_form, "error_loss": None})

    def copilot_parameters(self) -> int:
        model = self.wrapper.from_pilot(self.setting.shape.build(self.tokenizer, 0), SCRATCH_COPILOT)
        return model.copilot.num_parameters()

    def fine_tune(
        self,
        model,
        with_copilot: bool,
        data_seed: int | None = None,
        copilot_change: dict | None = None,
        reserve: float = 0.0,
    ):
        """`reserve`: the fraction of the training examples (the last ones) kept from the joint run for the
        Copilot-only phase, which then trains as many batches as the default phase would on the joint run's data."""
        if reserve:
            copilot_change = {**(copilot_change or {}), "copilot_final_epochs": 0.0}
        args = arguments(self.setting, self.seed, self.scratch, with_copilot, data_seed, copilot_change)
        trainer_class = CopilotTrainer if with_copilot else Trainer
        evaluation = self.tokenize(self.validation, self.tokenizer) if with_copilot else None
        joint_size = len(self.dataset) - round(reserve * len(self.dataset))
        trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=self.dataset.select(range(joint_size)) if reserve else self.dataset,
            eval_dataset=evaluation,
            data_collator=self.collator,
        )
        started = time.time()
        trainer.train()
        if reserve:
            joint_batches = trainer.state.global_step * args.gradient_accumulation_steps
            batches = final_phase_batches(None, trainer.get_train_dataloader(), joint_batches)
            trainer.train_dataset = self.dataset.select(range(joint_size, len(self.dataset)))
            trainer.train_copilot_on_final_pilot(batches / len(trainer.get_train_dataloader()))
        seconds = time.time() - started
        r2 = None
        if with_copilot:  # held out, and on as many training prompts: how much of R^2 carries over
            train_prompts = self.tokenize(self.train[: len(self.validation)], self.tokenizer)
            fallback = [e for e in trainer.state.log_history if "copilot_final/r2_before_fallback" in e]
            held_out = trainer.evaluate()
            r2 = CopilotR2(
                held_out["eval_copilot_r2_observed"],
                trainer.evaluate(train_prompts, metric_key_prefix="train")["train_copilot_r2_observed"],
                fallback[-1]["copilot_final/r2_before_fallback"] if fallback else None,
                held_out["eval_copilot_r2"] if model.config.copilot_feedback != "observed" else None,
            )
        return model.eval(), seconds, r2

    def accuracy(self, model, examples, **generate_kwargs) -> float:
        return evaluate_task(
            model, self.tokenizer, examples, self.task, batch_size=100, progress=False, **generate_kwargs
        )["accuracy"]


def run(
    regime: str,
    setting: Setting,
    seed: int,
    eval_size: int,
    family,
    arms=ARMS,
    feedback_modes: tuple[str, ...] = FEEDBACK_MODES,
    error_form: str | None = None,
) -> list[dict]:
    """The arms of one regime, task and seed, each Copilot arm scored in `feedback_modes`; `error_form`
    replaces the package's default head (with that head's own loss) in every Copilot arm but the head ablations."""
    experiment = Experiment(regime, setting, seed, eval_size, family, error_form)
    base = {"regime": regime, "task": setting.name, "seed": seed}
    records = []

    def pilot_record(arm: str, model, seconds: float) -> None:
        accuracy = experiment.accuracy(model, experiment.test)
        records.append(
            {
                **base,
                "arm": arm,
                "feedback": None,
                "lambda": 0.0,
                "test_accuracy": accuracy,
                "params": model.num_parameters(),
                "train_seconds": round(seconds, 1),
            }
        )
        progress(records[-1])

    def copilot_records(arm: str, modes, model, seconds: float, r2: CopilotR2 | None) -> None:
        own_pilot = experiment.accuracy(model, experiment.test, copilot_lambda=0.0)
        for feedback in modes:
            sweep = {
                lam: experiment.accuracy(
                    model, experiment.validation, copilot_lambda=lam, copilot_feedback=feedback
                )
                for lam in DEFAULT_LAMBDAS
            }
            best = best_lambda(sweep)
            accuracy = experiment.accuracy(
                model, experiment.test, copilot_lambda=best, copilot_feedback=feedback
            )
            records.append(
                {
                    **base,
                    "arm": arm,
                    "feedback": feedback,
                    "lambda": best,
                    "test_accuracy": accuracy,
                    "params": model.num_parameters(),
                    "error_form": model.copilot.config.error_form,
                    "pilot_accuracy": own_pilot,
                    "validation_sweep": {str(k): v for k, v in sweep.items()},
                    "copilot_r2": None if r2 is None else r2.held_out,
                    "copilot_r2_train": None if r2 is None else r2.train,
                    **(
                        {}
                        if r2 is None or r2.before_fallback is None
                        else {"copilot_r2_before_fallback": r2.before_fallback}
                    ),
                    **(
                        {}
                        if r2 is None or r2.as_generated is None or feedback != model.config.copilot_feedback
                        else {"copilot_r2_as_generated": r2.as_generated}
                    ),
                    "train_seconds": round(seconds, 1),
                }
            )
            progress(records[-1])

    if "pilot" in arms:
        pilot_record("pilot", *experiment.fine_tuned_pilot())
    if "pilot_copilot" in arms:
        torch.manual_seed(seed + 1)
        joint = experiment.wrapper.from_pilot(experiment.pilot(), experiment.copilot_config())
        copilot_records("pilot_copilot", feedback_modes, *experiment.fine_tune(joint, with_copilot=True))

    def ablation_records(
        arm: str, change: dict, modes=feedback_modes, training: dict | None = None, reserve: float = 0.0
    ) -> None:
        """pilot_copilot with one CopilotConfig field (`change`), training argument (`training`) or the data the
        Copilot-only phase reads (`reserve`, Experiment.fine_tune) changed, from the same seeds."""
        torch.manual_seed(seed + 1)
        config = experiment.copilot_config().to_dict() | change
        joint = experiment.wrapper.from_pilot(experiment.pilot(), config)
        trained = experiment.fine_tune(joint, with_copilot=True, copilot_change=training, reserve=reserve)
        copilot_records(arm, modes, *trained)

    linear = {"error_form": "linear", "error_loss": "squared_error"}
    if "pilot_copilot_linear" in arms:
        ablation_records("pilot_copilot_linear", linear)
    if "pilot_copilot_reweight" in arms:
        ablation_records("pilot_copilot_reweight", {"error_form": "reweight", "error_loss": "squared_error"})
    if "pilot_copilot_small_head" in arms:
        ablation_records(
            "pilot_copilot_small_head", {"initial_error_norm": INITIAL_ERROR_NORM}, ("observed",)
        )
    if "pilot_copilot_small_input" in arms:
        ablation_records("pilot_copilot_small_input", {"error_proj_init_std": None})
    if "pilot_copilot_no_positions" in arms:
        ablation_records("pilot_copilot_no_positions", {"position_encoding": "none"})
    if "pilot_copilot_final_1_epoch" in arms:
        ablation_records("pilot_copilot_final_1_epoch", {}, training={"copilot_final_epochs": 1.0})
    for epochs in (3, 6, 24):
        if f"pilot_copilot_final_{epochs}_epochs" in arms:
            arm = f"pilot_copilot_final_{epochs}_epochs"
            ablation_records(arm, {}, training={"copilot_final_epochs": float(epochs)})
    for arm, multiple in (("pilot_copilot_lr_half", 0.5), ("pilot_copilot_lr_3x", 3.0)):
        if arm in arms:
            learning_rate = multiple * experiment.setting.learning_rate
            ablation_records(arm, {}, training={"copilot_learning_rate": learning_rate})
    if "pilot_copilot_deep" in arms:
        layers = 2 * experiment.copilot_config().num_hidden_layers
        ablation_records("pilot_copilot_deep", {"num_hidden_layers": layers})
    if "pilot_copilot_last_layer" in arms:
        # The Pilot's last hidden state in place of the layer mean (h_bar), in training, evaluation and
        # generation alike: the entry function is swapped where the model calls it.
        entry_from_pass = modeling_pilot_copilot.mistake_log_entry_from_pilot_pass

        def last_layer_entry(input_ids, attention_mask, labels, logits, hidden_states, probs=None):
            return entry_from_pass(
                input_ids, attention_mask, labels, logits, (hidden_states[0], hidden_states[-1]), probs
            )

        with mock.patch.object(modeling_pilot_copilot, "mistake_log_entry_from_pilot_pass", last_layer_entry):
            ablation_records("pilot_copilot_last_layer", {})
    if "pilot_copilot_dropout" in arms:
        ablation_records("pilot_copilot_dropout", {"hidden_dropout": 0.1, "attention_dropout": 0.1})
    for decay in ("0.1", "0.3", "1"):
        if f"pilot_copilot_weight_decay_{decay}" in arms:
            ablation_records(
                f"pilot_copilot_weight_decay_{decay}", {}, training={"copilot_weight_decay": float(decay)}
            )
    if "pilot_copilot_joint_weight_decay_0.1" in arms:
        training = {"copilot_weight_decay": 0.1, "copilot_final_weight_decay": 1.0}
        ablation_records("pilot_copilot_joint_weight_decay_0.1", {}, training=training)
    for epochs, decay in PHASE_GRID:
        arm = f"pilot_copilot_final_{epochs}_epochs_weight_decay_{decay}"
        if arm in arms:
            training = {
                "copilot_final_epochs": float(epochs),
                "copilot_weight_decay": float(decay),
                "copilot_fallback_weight_decay": None,
            }
            ablation_records(arm, {}, training=training)
    for arm, copilot_epochs in (
        ("copilot_after_pilot", DEFAULT_FINAL_EPOCHS),
        ("copilot_after_pilot_as_long", setting.epochs + DEFAULT_FINAL_EPOCHS),
    ):
        if arm not in arms:
            continue
        pilot, pilot_seconds = experiment.fine_tuned_pilot()
        torch.manual_seed(seed + 1)
        model = experiment.wrapper.from_pilot(copy.deepcopy(pilot), experiment.copilot_config())
        after = {"freeze_pilot": True, "num_train_epochs": copilot_epochs, "copilot_lr_scheduler_type": None}
        model, seconds, r2 = experiment.fine_tune(model, with_copilot=True, copilot_change=after)
        copilot_records(arm, feedback_modes, model, pilot_seconds + seconds, r2)
    for arm in (f"pilot_copilot{suffix}" for suffix in PHASE_PATCHES):
        if arm in arms:
            with phase_patch(arm):
                ablation_records(arm, {})
    if "pilot_copilot_reserved_phase" in arms:
        ablation_records("pilot_copilot_reserved_phase", {}, reserve=0.25)
    if "pilot_copilot_paper" in arms:
        # The paper's feedback mode, trained for it: answer positions read the Copilot's own predictions.
        torch.manual_seed(seed + 1)
        joint = experiment.wrapper.from_pilot(
            experiment.pilot(), experiment.copilot_config(), copilot_feedback="copilot"
        )
        copilot_records("pilot_copilot_paper", ("copilot",), *experiment.fine_tune(joint, with_copilot=True))
    if "pilot_copilot_memory_norm" in arms:
        ablation_records("pilot_copilot_memory_norm", {"memory_norm": True})
    if "pilot_copilot_no_projected_memory_norm" in arms:
        ablation_records("pilot_copilot_no_projected_memory_norm", {"projected_memory_norm": False})
    if "pilot_copilot_no_token_embedding" in arms:
        ablation_records("pilot_copilot_no_token_embedding", {"token_embedding": False})
    if "pilot_copilot_token_gain" in arms:
        ablation_records("pilot_copilot_token_gain", {"token_embedding": "gain"})
    if "pilot_copilot_no_qk_norm" in arms:
        ablation_records("pilot_copilot_no_qk_norm", {"qk_norm": False})
    for arm, change, training in (
        ("pilot_copilot_paper_no_memory_norm", {"memory_norm": False}, None),
        ("pilot_copilot_paper_no_projected_memory_norm", {"projected_memory_norm": False}, None),
        ("pilot_copilot_paper_reweight", {"error_form": "reweight"}, None),
        ("pilot_copilot_paper_no_token_embedding", {"token_embedding": False}, None),
        ("pilot_copilot_paper_token_gain", {"token_embedding": "gain"}, None),
        ("pilot_copilot_paper_qk_norm", {"qk_norm": True}, None),
        ("pilot_copilot_paper_final_24_epochs", {}, {"copilot_final_epochs": 24.0}),
        *(
            (
                f"pilot_copilot_paper_final_{epochs}_epochs_weight_decay_{decay}",
                {},
                {
                    "copilot_final_epochs": float(epochs),
                    "copilot_weight_decay": float(decay),
                    "copilot_fallback_weight_decay": None,
                },
            )
            for epochs, decay in PHASE_GRID
        ),
        ("pilot_copilot_paper_fraction_half", {}, {"copilot_feedback_fraction": 0.5}),
        *((f"pilot_copilot_paper{suffix}", {}, None) for suffix in PHASE_PATCHES),
    ):
        if arm in arms:
            torch.manual_seed(seed + 1)
            config = experiment.copilot_config().to_dict() | change
            joint = experiment.wrapper.from_pilot(experiment.pilot(), config, copilot_feedback="copilot")
            with phase_patch(arm):
                trained = experiment.fine_tune(joint, with_copilot=True, copilot_change=training)
            copilot_records(arm, ("copilot",), *trained)

    def initialised(change: dict | None = None, training: dict | None = None, member: str = "small"):
        """Pilot + the Copilot initialised from a family member (copilot_init; the smaller one by default), from
        the same seeds."""
        torch.manual_seed(seed + 1)
        config = experiment.copilot_config(member).to_dict() | (change or {})
        joint = experiment.wrapper.from_pilot(experiment.pilot(), config, copilot_init=family.members[member])
        return experiment.fine_tune(joint, with_copilot=True, copilot_change=training)

    if family is not None and {"pilot_copilot_init", "transfer"} & set(arms):
        joint, seconds, r2 = initialised()
        copilot_records("pilot_copilot_init", feedback_modes, joint, seconds, r2)
        if "transfer" in arms:
            # The paper's transfer: this Copilot on a Pilot fine-tuned from the same base with another data order.
            other, _, _ = experiment.fine_tune(experiment.pilot(), with_copilot=False, data_seed=seed + 1000)
            folder, pilot_folder = (os.path.join(experiment.scratch, name) for name in ("copilot", "pilot"))
            joint.pilot.save_pretrained(pilot_folder)  # the Copilot's own (fine-tuned) Pilot, as its base
            joint.save_copilot(folder, base_model_name_or_path=pilot_folder)
            moved = experiment.wrapper.from_pretrained(folder, pilot=other, allow_other_pilot=True).eval()
            copilot_records("transfer", feedback_modes, moved, 0.0, None)
    if family is not None and "pilot_copilot_init_embedding_scale" in arms:
        embedding_scale = initialised({"error_proj_init_std": None})
        copilot_records("pilot_copilot_init_embedding_scale", feedback_modes, *embedding_scale)
    if family is not None and "pilot_copilot_init_linear" in arms:
        copilot_records("pilot_copilot_init_linear", feedback_modes, *initialised(linear))
    if family is not None and "pilot_copilot_init_final_1_epoch" in arms:
        one_epoch = initialised(training={"copilot_final_epochs": 1.0})
        copilot_records("pilot_copilot_init_final_1_epoch", feedback_modes, *one_epoch)
    for epochs in (3, 6):
        if family is not None and f"pilot_copilot_init_final_{epochs}_epochs" in arms:
            longer = initialised(training={"copilot_final_epochs": float(epochs)})
            copilot_records(f"pilot_copilot_init_final_{epochs}_epochs", feedback_modes, *longer)
    if family is not None and "pilot_copilot_init_base" in arms:
        copilot_records("pilot_copilot_init_base", feedback_modes, *initialised(member="base"))
    if "pilot_matched" in arms:
        pilot_record(
            "pilot_matched", *experiment.fine_tune(experiment.pilot("large"), with_copilot=False)[:2]
        )
    return records


def progress(record: dict) -> None:
    feedback = f" {record['feedback']} lambda {record['lambda']:g}" if record["feedback"] else ""
    r2 = f" R^2 {record['copilot_r2']:.3f}" if record.get("copilot_r2") is not None else ""
    if record.get("copilot_r2_as_generated") is not None:
        r2 += f" (as generated {record['copilot_r2_as_generated']:.3f})"
    if record.get("copilot_r2_train") is not None:
        r2 += f" (training prompts {record['copilot_r2_train']:.3f})"
    print(
        f"{record['regime']} {record['task']} seed {record['seed']} {record['arm']}{feedback}: "
        f"test {record['test_accuracy']:.3f}{r2}",
        flush=True,
    )


# --------------------------------------------------------------------------------------------------
# Summary, markdown and plot


def find(records, **keys) -> list[dict]:
    return [r for r in records if all(r.get(k) == v for k, v in keys.items())]


def summarise(records: list[dict], default_feedback: str) -> list[dict]:
    """Per regime and task: mean test accuracy of each arm, paired per-seed lifts over the Pilot."""
    rows = []
    for regime, task in dict.fromkeys((r["regime"], r["task"]) for r in records):
        seeds = sorted({r["seed"] for r in find(records, regime=regime, task=task, arm="pilot")})
        if not seeds:  # a run of other arms only: summarised once merged with its Pilot records
            continue
        pilot = {
            s: find(records, regime=regime, task=task, arm="pilot", seed=s)[0]["test_accuracy"] for s in seeds
        }
        row = {
            "regime": regime,
            "task": task,
            "seeds": seeds,
            "pilot": statistics.mean(pilot.values()),
            "pilot_std": statistics.stdev(pilot.values()) if len(seeds) > 1 else 0.0,
        }
        # Arms of earlier versions of this script (records kept with the command that made them) too.
        earlier = [r["arm"] for r in records if r["arm"] not in ARMS]
        for arm in [*ARMS[1:], *dict.fromkeys(earlier)]:
            for feedback in FEEDBACK_MODES if arm != "pilot_matched" else (None,):
                chosen = find(records, regime=regime, task=task, arm=arm, feedback=feedback)
                if len(chosen) != len(seeds):
                    continue
                key = arm if feedback is None else f"{arm}/{feedback}"
                by_seed = {r["seed"]: r["test_accuracy"] for r in chosen}
                # Paired with the very Pilot it rectifies (for transfer, the other fine-tuned Pilot).
                own = {r["seed"]: r.get("pilot_accuracy", pilot[r["seed"]]) for r in chosen}
                mean, baseline = statistics.mean(by_seed.values()), statistics.mean(own.values())
                row[key] = {
                    "mean": mean,
                    "lift_per_seed": [round(by_seed[s] - own[s], 4) for s in seeds],
                    "relative_lift": (mean - baseline) / baseline if baseline else None,
                    "params": chosen[0]["params"],
                    **{
                        key: statistics.mean(r[key] for r in chosen)
                        if all(r.get(key) is not None for r in chosen)
                        else None
                        for key in ("copilot_r2", "copilot_r2_train", "copilot_r2_as_generated")
                    },
                }
        row["default_feedback"] = default_feedback
        rows.append(row)
    return rows


def markdown(rows: list[dict], commands: list[str], note: str | None = None) -> str:
    lines = [
        "# Quality: Pilot alone, Pilot + Copilot, and a bigger Pilot",
        "",
        "Committed results: " + "; ".join(f"`{line}`" for line in commands) + ".  ",
        *([note + "  "] if note else []),
        f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}. Test exact match, mean over seeds; lambda chosen on validation for "
        "each arm and feedback mode; per-seed lift: accuracy minus that of the very Pilot it rectifies "
        "(for transfer, the other fine-tuned Pilot).",
        "",
        "R^2: held out, teacher forced on observed feedback (as every earlier record); where "
        "recorded for a paper-mode Copilot, its held-out R^2 as generated (f_C formed from its own predictions, "
        "as generate() does) follows in brackets. R^2 on training prompts (where recorded): the same observed "
        "statistic on as many of the Copilot's own training prompts; far above the held-out R^2, the Copilot "
        "memorises rather than generalises.",
        "",
        "| regime | task | Pilot | arm | feedback | accuracy | relative lift | per-seed lift | R^2 | R^2 on "
        "training prompts | params |",
        "| --- | --- | ---: | --- | --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['regime']} | {row['task']} | {row['pilot']:.3f} ± {row['pilot_std']:.3f} | pilot | | | | | | | |"
        )
        for key, value in row.items():
            if not isinstance(value, dict):
                continue
            arm, _, feedback = key.partition("/")
            lift = value["relative_lift"]
            r2, r2_train = value["copilot_r2"], value.get("copilot_r2_train")
            as_generated = value.get("copilot_r2_as_generated")
            r2_cell = "-" if r2 is None else f"{r2:.3f}"
            if as_generated is not None:
                r2_cell += f" ({as_generated:.3f} as generated)"
            lines.append(
                f"| | | | {arm} | {feedback} | {value['mean']:.3f} | "
                f"{'-' if lift is None else f'{100 * lift:+.1f}%'} | "
                f"{', '.join(f'{d:+.3f}' for d in value['lift_per_seed'])} | "
                f"{r2_cell} | {'-' if r2_train is None else f'{r2_train:.3f}'} | "
                f"{value['params']:,} |"
            )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    figure, axes = plt.subplots(1, len(regimes), figsize=(10 * len(regimes), 4.5), squeeze=False)
    for ax, regime in zip(axes[0], regimes, strict=True):
        chosen = [r for r in rows if r["regime"] == regime]
        keys = ["pilot", *dict.fromkeys(k for r in chosen for k, v in r.items() if isinstance(v, dict))]
        width = 0.8 / len(keys)
        for offset, key in enumerate(keys):
            values = [r[key] if key == "pilot" else r.get(key, {}).get("mean", 0.0) for r in chosen]
            ax.bar([i + offset * width for i in range(len(chosen))], values, width, label=key)
        ax.set_xticks(
            [i + 0.4 - width / 2 for i in range(len(chosen))],
            [r["task"] for r in chosen],
            rotation=15,
            ha="right",
            rotation_mode="anchor",
        )
        ax.set_ylabel("test exact match")
        ax.set_title(f"{regime} regime (mean of seeds)")
        # Beside the axes: inside, it covered the bars of the last tasks.
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")  # the legends and long task names included
    plt.close(figure)


def write(records: list[dict], output: str, commands: list[str], note: str | None = None) -> None:
    os.makedirs(output, exist_ok=True)
    default_feedback = PilotCopilotForCausalLM.config_class().copilot_feedback
    rows = summarise(records, default_feedback)
    with open(os.path.join(output, "quality.json"), "w") as handle:
        json.dump({"commands": commands, "note": note, "summary": rows, "records": records}, handle, indent=1)
    with open(os.path.join(output, "quality.md"), "w") as handle:
        handle.write(markdown(rows, commands, note))
    if rows:
        plot(rows, os.path.join(output, "quality.png"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--regime", choices=sorted(SETTINGS), default="pretrained")
    parser.add_argument(
        "--tasks", nargs="+", help="default: every task of the regime but the on-request ones (named only)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-size", type=int, default=400)
    parser.add_argument("--output", default=RESULTS)
    parser.add_argument("--arms", nargs="+", choices=ARMS, help="default: every arm")
    parser.add_argument(
        "--feedback",
        nargs="+",
        choices=FEEDBACK_MODES,
        default=list(FEEDBACK_MODES),
        help="the feedback modes each Copilot arm is scored in",
    )
    parser.add_argument(
        "--error-form",
        choices=("linear", "reweight"),
        help="the Copilot arms' CopilotConfig.error_form, with its own error_loss (default: the package's)",
    )
    parser.add_argument("--note", help="a line for the markdown under the commands (what a reader must know)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 200 examples, half an epoch")
    parser.add_argument(
        "--from-records",
        nargs="+",
        help="merge earlier quality.json files instead of running (only their records of --arms and --tasks, "
        "after --rename)",
    )
    parser.add_argument(
        "--rename",
        nargs="+",
        default=[],
        metavar="OLD=NEW",
        help="with --from-records: report arm OLD's records as arm NEW (the name it first ran under kept as "
        "measured_as), for an arm measured under another name before it became the default",
    )
    args = parser.parse_args()
    known = {setting.name for setting in SETTINGS[args.regime]}
    if args.tasks and not args.from_records and set(args.tasks) - known:
        parser.error(
            f"unknown --tasks {sorted(set(args.tasks) - known)} for --regime {args.regime}: "
            f"choose from {sorted(known)}"
        )
    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    command = "python benchmarks/quality.py " + shlex.join(sys.argv[1:])
    if args.from_records:
        merged = [json.load(open(path)) for path in args.from_records]
        renames = dict(pair.split("=", 1) for pair in args.rename)
        renamed = (
            {**r, "arm": renames[r["arm"]], "measured_as": r.get("measured_as", r["arm"])}
            if r["arm"] in renames
            else r
            for result in merged
            for r in result["records"]
        )
        records = [
            r
            for r in renamed
            if (not args.arms or r["arm"] in args.arms) and (not args.tasks or r["task"] in args.tasks)
        ]
        write(records, args.output, merged_commands(merged, command), args.note)
        return
    family = None
    if args.regime.startswith("pretrained"):
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from model_family import load_family
        from t5_family import load_t5_family

        family = load_t5_family() if args.regime == "pretrained_t5" else load_family()
    records = []
    for setting in SETTINGS[args.regime]:
        wanted = setting.name in args.tasks if args.tasks else not setting.on_request
        if not wanted:
            continue
        if args.quick:
            setting = dataclasses.replace(setting, train_size=200, epochs=0.5)
        for seed in args.seeds:
            records.extend(
                run(
                    args.regime,
                    setting,
                    seed,
                    args.eval_size,
                    family,
                    args.arms or ARMS,
                    tuple(args.feedback),
                    args.error_form,
                )
            )
            write(records, args.output, [command], args.note)


if __name__ == "__main__":
    main()
