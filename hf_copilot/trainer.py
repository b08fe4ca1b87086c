"""`CopilotTrainer`: a drop-in `Trainer` that fine-tunes the Pilot and trains the Copilot in one loop.

SPEC sections 4 and 6. An existing Trainer script changes only the model
(`PilotCopilotForCausalLM.from_pilot(...)`) and the class names (`CopilotTrainer`,
`CopilotTrainingArguments`). One micro-batch: Pilot forward -> Mistake Log entry -> Copilot forward on the
fresh entry (+ replayed entries) -> `L_P + copilot_loss_weight * L_C` -> one backward.

**Decision (Copilot objective).** Under gradient accumulation and DDP the trainer optimises the Copilot's
squared error normalised by the global token count,

    L_C = sum_{micro-batches, ranks} sum_{j in loss mask} ||f_C_j - e_j||^2  /  N_C,

where N_C counts the loss-mask positions (j with labels[j+1] != -100 and a real next token) of every
micro-batch of the optimizer step on every rank, replayed entries included. N_C is counted from the batches
before the first forward (as Trainer counts `num_items_in_batch` for the Pilot) and summed across processes
when `average_tokens_across_devices=True`; the returned loss is then multiplied by the number of processes,
exactly like Trainer's own loss, because DDP averages gradients. The Pilot's loss uses `num_items_in_batch`
the same way, so accumulation 4 x batch 2 updates both models exactly as batch 8 does. The logged
`copilot_loss` is the paper's RMSE, `sqrt(sum ||f_C - e||^2 / count)` over the fresh entries of the logging
window (all ranks). The MSE objective and the paper's RMSE differ only by the gradient scale
`1 / (2 * RMSE)`, which varies slowly and which Adam normalises away (SPEC section 4). With
`CopilotConfig.error_loss="cross_entropy"` the per-position term is -log (p + f_C)[y_j] instead, normalised the
same way, and the logged `copilot_loss` is its mean; `copilot_r2` always comes from the squared error.

Replay (`mistake_log_replay = R > 0`): at the start of each optimizer step, every micro-batch draws R
entries from the log as it stood after the previous step; their positions join the Copilot's batch and N_C,
so each replayed position weighs exactly as much as a fresh one. The log holds one entry per forward pass
(micro-batch). Under DDP every process keeps and replays the log of its own data, and checkpoints it as
`mistake_log_{rank}.pt`.

**Decision (clipping).** The Pilot's and the Copilot's gradients are clipped separately, each to
`max_grad_norm`: with one global norm the Copilot's gradients would shrink the Pilot's steps. With the
detached Mistake Log this makes one backward of `L_P + w * L_C` exactly two separate updates: the Pilot is
fine-tuned as the stock Trainer would fine-tune it alone. The logged `grad_norm` is the norm of both.

`freeze_pilot=True` freezes the Pilot's parameters and runs it in eval mode (no dropout), as at inference,
so the Copilot learns the errors it will have to correct.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, get_scheduler
from transformers.trainer_optimizer import is_optimizer_factory
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, has_length, unwrap_peft_model
from transformers.training_args import ParallelMode
from transformers.utils import is_sagemaker_mp_enabled, logging

from .complete_checkpoints import (
    COMPLETION_MARKER,
    check_checkpoint_complete,
    checkpoint_step,
    mark_checkpoint_complete,
    newest_complete_checkpoint,
    rotate_complete_checkpoints,
)
from .copilot_final_phase import check_sized_train_dataset, train_copilot_on_final_pilot, weight_decay_groups
from .generation_pilot_copilot import (
    copilot_loss_terms_on_entry,
    copilot_stream,
    fuse_scores,
    predicted_errors_as_generated,
)
from .mistake_log import MistakeLog, refuse_if_not_finite
from .mistake_log_callback import MistakeLogCallback
from .mistake_log_entry import (
    NO_LABELS_WARNING,
    CopilotLossTerms,
    MistakeLogEntry,
    copilot_loss_from_sums,
    copilot_r2_from_sums,
    copilot_target_norm,
)
from .modeling_pilot_copilot import PilotCopilotForCausalLM
from .modeling_pilot_copilot_seq2seq import PilotCopilotForSeq2SeqLM
from .padding_free import unpack_padding_free
from .peft_checks import check_copilot_trains, warn_if_adapter_base_is_the_pilot
from .training_args import CopilotTrainingArguments
from .training_errors import NonFiniteTrainingError

logger = logging.get_logger(__name__)


def copilot_token_count(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Positions the Copilot is trained on: labels[j+1] != -100 and both j and j+1 are real tokens.

    The same rule as the Mistake Log entry's `loss_mask` (SPEC section 2).
    """
    targets = labels[:, 1:] != -100
    if attention_mask is not None:
        attention_mask = attention_mask.bool()
        targets = targets & attention_mask[:, :-1] & attention_mask[:, 1:]
    return targets.sum()


@dataclass
class _CopilotStep:
    """What an optimizer step's micro-batches share: their replay batches and the global Copilot count."""

    copilot_batches: deque = field(default_factory=deque)
    replays: deque = field(default_factory=deque)
    num_tokens: torch.Tensor | None = None


def seq2seq_copilot_token_count(
    labels: torch.Tensor, decoder_attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """An encoder-decoder Pilot's Copilot positions: decoder position j predicts labels[j] (no shift)."""
    targets = labels != -100
    if decoder_attention_mask is not None:
        targets = targets & decoder_attention_mask.bool()
    return targets.sum()


def _is_pilot_copilot(model: nn.Module) -> bool:
    # A checkpoint loaded with trust_remote_code has its own copy of the class.
    classes = (PilotCopilotForCausalLM, PilotCopilotForSeq2SeqLM)
    return isinstance(model, classes) or type(model).__name__ in {cls.__name__ for cls in classes}


class CopilotTrainer(Trainer):
    """`Trainer` for a `PilotCopilotForCausalLM`: takes the same arguments as `Trainer`.

    `loss`, `train_loss` and `eval_loss` are the Pilot's, exactly as the stock Trainer reports them for the
    Pilot alone (perplexity and `load_best_model_at_end` keep their meaning); the objective `L_P + weight * L_C`
    is logged as `joint_loss` / `eval_joint_loss`. Also logged: `pilot_loss` (the same per step),
    `copilot_loss` (mean cross-entropy or RMSE: `copilot_loss_from_sums`), `copilot_r2` and `mistake_log/*`;
    evaluation adds `eval_pilot_loss` (per token), `eval_copilot_loss`, `eval_pilot_token_accuracy`, and
    `eval_fused_token_accuracy` and `eval_copilot_r2` in the configured feedback mode (what generate() does), with
    their observed-feedback figures as `*_observed`. Prediction outputs are the Pilot's logits, as with the stock
    Trainer.
    """

    def __init__(
        self, model: nn.Module | None = None, args: CopilotTrainingArguments | None = None, *a, **kw
    ):
        if args is None:
            args = CopilotTrainingArguments(output_dir="tmp_trainer")
        if not isinstance(args, CopilotTrainingArguments):
            raise TypeError(
                f"CopilotTrainer needs CopilotTrainingArguments, got {type(args).__name__}: replace "
                "TrainingArguments(...) with CopilotTrainingArguments(...) (same fields, plus the Copilot's)."
            )
        super().__init__(model, args, *a, **kw)
        if self.args.parallel_mode == ParallelMode.NOT_DISTRIBUTED:
            raise ValueError(
                "CopilotTrainer does not support torch.nn.DataParallel (several GPUs in one process): launch "
                "with `torchrun --nproc_per_node <gpus> your_script.py` to train with DDP."
            )
        if self.compute_loss_func is not None:
            raise ValueError(
                "CopilotTrainer computes its own loss (the Pilot's loss plus the Copilot's): compute_loss_func "
                "is not supported. Use the stock Trainer for a custom Pilot loss."
            )
        self._prepare_pilot_copilot(self.model)
        # The loss is always normalised by the whole optimizer batch (see the module docstring).
        self.model_accepts_loss_kwargs = True
        self.mistake_log_callback = next(
            (cb for cb in self.callback_handler.callbacks if isinstance(cb, MistakeLogCallback)), None
        )
        if self.mistake_log_callback is None:
            self.mistake_log_callback = MistakeLogCallback(
                MistakeLog(
                    size=self.args.mistake_log_entries,
                    topk=self.args.mistake_log_topk,
                    store_device=self.args.device if self.args.mistake_log_on_device else "cpu",
                ),
                replay=self.args.mistake_log_replay,
                seed=self.args.seed,
                window=self.args.mistake_log_window,
            )
            self.add_callback(self.mistake_log_callback)
        self._copilot_step: _CopilotStep | None = None
        # [pilot loss, Copilot loss, Copilot positions] of the optimizer step's micro-batches, checked with its
        # gradient norm (`_raise_if_not_finite`).
        self._step_losses: list[torch.Tensor] = []
        self._reset_train_metrics()
        self._eval_sums: torch.Tensor | None = None

    # ---- model ------------------------------------------------------------------------------------
    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        self._prepare_pilot_copilot(model)
        return model

    def _prepare_pilot_copilot(self, model: nn.Module) -> None:
        pilot_copilot = unwrap_peft_model(model)
        if not _is_pilot_copilot(pilot_copilot):
            raise TypeError(
                f"CopilotTrainer trains a PilotCopilotForCausalLM, got {type(pilot_copilot).__name__}: wrap your "
                "model with PilotCopilotForCausalLM.from_pilot(model)."
            )
        if self.args.freeze_pilot:
            pilot_copilot.pilot.requires_grad_(False)
        check_copilot_trains(pilot_copilot.copilot)  # e.g. not frozen by PEFT on the whole wrapper
        warn_if_adapter_base_is_the_pilot(model, pilot_copilot)

    def pilot_copilot(self) -> PilotCopilotForCausalLM:
        """The `PilotCopilotForCausalLM` under any DDP/PEFT wrappers, unwrapped once per `self.model`: unwrapping
        walks every module, a fixed cost that every training step would otherwise pay several times."""
        if getattr(self, "_unwrapped_from", None) is not self.model:
            self._unwrapped = unwrap_peft_model(self.accelerator.unwrap_model(self.model))
            self._unwrapped_from = self.model
        return self._unwrapped

    def _set_signature_columns_if_needed(self) -> None:
        """The dataset columns kept: the wrapper's forward hands what it does not name to the Pilot, so a column the
        Pilot's forward takes (a multimodal Pilot's `pixel_values`, GPT-2's `token_type_ids`) stays, as the stock
        Trainer keeps it for the Pilot alone."""
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            pilot = unwrap_peft_model(self.pilot_copilot().pilot)
            pilot_inputs = inspect.signature(pilot.forward).parameters
            self._signature_columns += [name for name in pilot_inputs if name not in self._signature_columns]

    # ---- optimizer --------------------------------------------------------------------------------
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """Stock parameter groups (weight decay, no decay), split into Pilot and Copilot groups.

        The Copilot's groups carry `lr=copilot_learning_rate` and `copilot_weight_decay`; the scheduler scales
        every group's initial learning rate by the same factor. Frozen parameters get no group and no state.
        """
        opt_model = self.model if model is None else model
        if self.optimizer is not None:
            return super().create_optimizer(model)
        optimizer_choice = self.grouped_optimizer_cls_and_kwargs(opt_model)
        if optimizer_choice is None:
            warnings.warn(
                f"optim={self.args.optim} builds its own parameter groups: the Copilot trains at the Pilot's "
                "learning rate (copilot_learning_rate is ignored).",
                stacklevel=2,
            )
            return super().create_optimizer(model)
        optimizer_cls, optimizer_kwargs = optimizer_choice

        decay = set(self.get_decay_parameter_names(opt_model))
        copilot_ids = {id(p) for p in self.pilot_copilot().copilot.parameters()}
        groups = []
        for is_copilot in (False, True):
            trainable = [
                (n, p)
                for n, p in opt_model.named_parameters()
                if p.requires_grad and (id(p) in copilot_ids) == is_copilot
            ]
            weight_decay = self.args.effective_copilot_weight_decay if is_copilot else self.args.weight_decay
            for group in weight_decay_groups(trainable, decay, weight_decay):
                if is_copilot:
                    group["lr"] = self.args.copilot_peak_learning_rate
                groups.append(group)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def grouped_optimizer_cls_and_kwargs(self, model) -> tuple[type, dict] | None:
        """The optimizer class and settings of `optim` (or `optimizer_cls_and_kwargs`) for parameter groups this
        trainer builds: the joint run's and the Copilot-only phase's. None where `optim` builds its own groups."""
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        if (
            is_optimizer_factory(optimizer_cls)
            or {"params", "model", "optimizer_dict"} & optimizer_kwargs.keys()
        ):
            return None
        return optimizer_cls, dict(optimizer_kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """The Pilot's schedule for its groups; `copilot_lr_scheduler_type`, if set, for the Copilot's."""
        schedule = self.args.copilot_lr_scheduler_type
        if self.lr_scheduler is not None or schedule in (None, self.args.lr_scheduler_type):
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = self.optimizer if optimizer is None else optimizer
        pilot_lambda, copilot_lambda = (
            self._schedule_multiplier(name, num_training_steps)
            for name in (self.args.lr_scheduler_type, schedule)
        )
        copilot_ids = {id(p) for p in self.pilot_copilot().copilot.parameters()}
        self.lr_scheduler = LambdaLR(
            optimizer,
            [
                copilot_lambda if any(id(p) in copilot_ids for p in group["params"]) else pilot_lambda
                for group in optimizer.param_groups
            ],
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def _schedule_multiplier(self, name: str, num_training_steps: int):
        """The step -> multiplier function of a transformers schedule (built on a throwaway optimizer)."""
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        schedule = get_scheduler(
            name,
            optimizer=probe,
            num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
            num_training_steps=num_training_steps,
            scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
        )
        if not isinstance(schedule, LambdaLR):
            raise ValueError(
                f"lr_scheduler_type={name!r} is not a per-step schedule (LambdaLR), so the Pilot and the Copilot "
                "cannot follow different ones: leave copilot_lr_scheduler_type=None to share it."
            )
        return schedule.lr_lambdas[0]

    def _clip_grad_norm(self, model):
        """Clip the Pilot's and the Copilot's gradients separately, each to `max_grad_norm`.

        One backward of `L_P + w * L_C` equals two separate updates only if clipping does not couple them:
        with one global norm, the Copilot's gradients would shrink the Pilot's step. Returns the norm of
        both together, as Trainer logs it. FSDP, DeepSpeed and XLA clip inside their engines: joint there.
        """
        separate = self.accelerator.distributed_type not in (
            DistributedType.FSDP,
            DistributedType.DEEPSPEED,
            DistributedType.XLA,
        )
        if (
            not separate
            or self._has_mixed_mesh_grads(model)
            or (is_sagemaker_mp_enabled() and self.args.fp16)
        ):
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()
        norms = [
            nn.utils.clip_grad_norm_([p for p in group if p.grad is not None], self.args.max_grad_norm)
            for group in self._pilot_and_copilot_parameters(model)
        ]
        return torch.linalg.vector_norm(torch.stack(norms))

    def _pilot_and_copilot_parameters(self, model) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """`model`'s parameters split into the Pilot's and the Copilot's, once per model: walking every module
        at every step was a fixed cost of the training step."""
        if getattr(self, "_parameter_split_of", None) is not model:
            copilot_ids = {id(p) for p in self.pilot_copilot().copilot.parameters()}
            parameters = list(model.parameters())
            self._parameter_split = tuple(
                [p for p in parameters if (id(p) in copilot_ids) == is_copilot]
                for is_copilot in (False, True)
            )
            self._parameter_split_of = model
        return self._parameter_split

    def _get_grad_norm(self, model, grad_norm=None):
        """Trainer's gradient norm, refused when not finite with the step's other checks (`_raise_if_not_finite`),
        before the optimizer applies it."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        self._raise_if_not_finite(grad_norm)
        return grad_norm

    # ---- checkpoints --------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, plus the Mistake Log, then the completion marker, then rotation.

        Rotation waits for the marker so that `save_total_limit` never deletes the last complete checkpoint
        before the new one is complete; weights that are not finite are never written.
        """
        parameters = list(self.pilot_copilot().parameters())
        if not bool(torch.stack([p.detach().isfinite().all() for p in parameters]).all()):
            raise NonFiniteTrainingError(
                f"The weights are not finite at step {self.state.global_step}: checkpoint not written."
            )
        run_dir = self._get_output_dir(trial=trial)
        checkpoint_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        # A folder of this step from another run (resumed from an earlier checkpoint) is overwritten file by
        # file: it must not look complete until the new marker is written.
        stale_marker = os.path.join(checkpoint_dir, COMPLETION_MARKER)
        if self.args.should_save and os.path.exists(stale_marker):
            os.remove(stale_marker)
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if not self.args.save_only_model:
            budget = self.args.mistake_log_checkpoint_mb
            self.mistake_log_callback.save_to_checkpoint(
                checkpoint_dir,
                self.state.global_step,
                self.args.process_index,
                self.args.world_size,
                max_bytes=None if budget is None else int(budget * 2**20),
            )
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            files = mark_checkpoint_complete(checkpoint_dir, self.state.global_step)
            logs = sum(size for name, size in files.items() if name.startswith("mistake_log"))
            logger.info(
                f"Saved {checkpoint_dir}: {sum(files.values()) / 2**20:.2f} MiB, of which the Mistake Log "
                f"{logs / 2**20:.2f} MiB."
            )
            rotate_complete_checkpoints(run_dir, limit, keep=self.state.best_model_checkpoint)

    # ---- training ---------------------------------------------------------------------------------
    def _run_epoch(self, *args, **kwargs):
        # Trainer checks max_steps only after a step, so resuming from the final checkpoint of a max_steps run
        # would train one step more than the run it resumes.
        if 0 < self.args.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        dataset = self.train_dataset
        if dataset is not None and has_length(dataset) and len(dataset) == 0:
            raise ValueError(
                "train_dataset is empty (0 examples): there is nothing to train on. Check the data files and "
                "the preprocessing (filters, or grouping texts into blocks longer than the whole corpus)."
            )
        if self.args.copilot_final_epochs:
            check_sized_train_dataset(dataset)
        if resume_from_checkpoint is True:
            resume_from_checkpoint = newest_complete_checkpoint(self.args.output_dir)
        elif resume_from_checkpoint:
            check_checkpoint_complete(resume_from_checkpoint)
        if resume_from_checkpoint:
            text_config = self.pilot_copilot().config.get_text_config()
            self.mistake_log_callback.load_from_checkpoint(
                resume_from_checkpoint,
                checkpoint_step(resume_from_checkpoint),
                text_config.hidden_size,
                text_config.vocab_size,
                self.args.process_index,
                self.args.world_size,
            )
        self._reset_train_metrics()
        self._step_losses = []
        self.mistake_log_callback.mistake_log.discard_unverified()  # what a refused step left
        output = super().train(resume_from_checkpoint or None, trial, ignore_keys_for_eval)
        epochs = self.args.copilot_final_epochs
        if epochs or (epochs is None and not self.args.freeze_pilot):  # freeze_pilot: the run was the phase
            joint_batches = self.state.global_step * self.args.gradient_accumulation_steps
            train_copilot_on_final_pilot(self, epochs, joint_batches)
        return output

    def train_copilot_on_final_pilot(self, epochs: float) -> None:
        """Train the Copilot alone for `epochs` on the errors of the final, frozen Pilot (what `train()` does
        after the joint run, `copilot_final_epochs`).

        The run's optimizer (`phase_optimizer`) at the Copilot's peak learning rate with a cosine decay, one step
        per `gradient_accumulation_steps` batches on the Copilot's mean loss over them, its gradients clipped to
        `max_grad_norm`; logged as `copilot_final/*` (`copilot_final_phase.py`).
        """
        train_copilot_on_final_pilot(self, epochs)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Also draw each micro-batch's Copilot batch from the log and count the step's Copilot positions (N_C).

        Drawn from the log as it stood after the previous optimizer step, so accumulation and resume see
        exactly the same rows.
        """
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        # Padding-free batches as a row per sequence here already: the Copilot batches drawn below count rows.
        batch_samples = [unpack_padding_free(batch) for batch in batch_samples]
        for batch in batch_samples:
            self._check_batch(batch)
        callback = self.mistake_log_callback
        copilot_batches = [callback.sample_copilot_batch(b["input_ids"].shape[0]) for b in batch_samples]
        replays = [callback.sample_replay() for _ in batch_samples]
        num_tokens = None
        if num_items_in_batch is not None and batch_samples:
            num_tokens = sum(
                (self._copilot_token_count(b) if rows is None else rows.loss_mask.sum()).to(device)
                for b, rows in zip(batch_samples, copilot_batches, strict=True)
            )
            num_tokens = num_tokens + sum(r.loss_mask.sum().to(device) for r in replays if r is not None)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                num_tokens = self.accelerator.gather(num_tokens).sum()
        self._copilot_step = _CopilotStep(deque(copilot_batches), deque(replays), num_tokens)
        return batch_samples, num_items_in_batch

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Padding-free batches (`DataCollatorWithFlattening`) as one right-padded row per sequence, in evaluation as
        in training (`padding_free.py`): the Copilot's attention cannot keep side-by-side sequences apart."""
        return unpack_padding_free(super()._prepare_inputs(inputs))

    def _copilot_token_count(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.pilot_copilot().config.is_encoder_decoder:
            return seq2seq_copilot_token_count(batch["labels"], batch.get("decoder_attention_mask"))
        return copilot_token_count(batch["labels"], batch.get("attention_mask"))

    def _check_batch(self, inputs: dict[str, Any]) -> None:
        if inputs.get("labels") is None:
            raise ValueError(
                f"The batch has no `labels` (keys: {', '.join(inputs)}). CopilotTrainer needs them: the Mistake "
                "Log measures the Pilot's error against the labels. Add a `labels` column (for causal LM "
                "fine-tuning a copy of input_ids, with -100 where nothing is to be learnt, e.g. padding or "
                "prompts), or use DataCollatorForLanguageModeling(tokenizer, mlm=False), which creates them."
            )
        text_config = self.pilot_copilot().config.get_text_config()
        for name in ("max_position_embeddings", "n_positions"):
            limit = getattr(text_config, name, None)
            if limit is not None:
                break
        length = inputs["input_ids"].shape[-1] if inputs.get("input_ids") is not None else 0
        if limit is not None and length > limit:
            raise ValueError(
                f"A batch has sequences of {length} tokens but the Pilot takes at most {limit} positions "
                f"(config.{name}). Truncate when tokenizing (tokenizer(..., truncation=True, max_length={limit})) "
                f"or group texts into blocks of at most {limit} tokens."
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._check_batch(inputs)
        if not model.training:
            return self._evaluation_loss(model, inputs, return_outputs)
        pilot_copilot = self.pilot_copilot()
        if self.args.freeze_pilot:
            pilot_copilot.pilot.eval()  # a frozen Pilot behaves as at inference (no dropout)
        loss_kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        step = self._copilot_step
        copilot_batch = step.copilot_batches.popleft() if step is not None and step.copilot_batches else None
        fraction = self._copilot_feedback_fraction()
        outputs = model(
            **inputs,
            return_mistake_log=True,
            copilot_batch=copilot_batch,
            copilot_feedback_fraction=fraction,
            **loss_kwargs,
        )

        replay = step.replays.popleft() if step is not None and step.replays else None
        objective = outputs.copilot_loss_sum
        num_tokens = outputs.copilot_num_tokens
        if replay is not None:
            replay_terms = self._replay_loss_terms(pilot_copilot, replay, fraction)
            objective, num_tokens = objective + replay_terms.objective, num_tokens + replay_terms.num_tokens

        if num_items_in_batch is not None:
            # Normalised by the whole optimizer batch (all micro-batches, all ranks): see the module docstring.
            global_tokens = (
                step.num_tokens if step is not None and step.num_tokens is not None else num_tokens
            )
            copilot_loss = objective / global_tokens.clamp_min(1)
            loss_scale = 1.0
            if self.args.average_tokens_across_devices:
                # DDP averages gradients; Trainer scales its own loss the same way.
                loss_scale = self.accelerator.num_processes // self.get_tp_size()
            log_scale = loss_scale
        else:  # per-micro-batch mean; Trainer divides the loss by the accumulation steps
            copilot_loss = objective / num_tokens.clamp_min(1)
            loss_scale, log_scale = 1.0, 1.0 / self.current_gradient_accumulation_steps

        pilot_loss = outputs.pilot_loss
        # Checked with the gradient norm before the optimizer step (`_raise_if_not_finite`): no read-back here.
        losses = [
            pilot_loss.detach().float(),
            copilot_loss.detach().float(),
            outputs.copilot_num_tokens.float(),
        ]
        self._step_losses.append(torch.stack(losses))
        loss = (pilot_loss + self.args.copilot_loss_weight * copilot_loss) * loss_scale
        self._reported_loss = pilot_loss.detach() * loss_scale
        self.mistake_log_callback.add(outputs.mistake_log_entry, defer_checks=True)
        if copilot_batch is None:
            target_norm = self.mistake_log_callback.mistake_log.latest_error_norm_sum
        else:  # log rows: compact top-k on the log's device, a cheap reduction
            target_norm = copilot_target_norm(copilot_batch)
        self._record_train_metrics(pilot_loss.detach() * log_scale, outputs, target_norm)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Backpropagates the joint objective; returns the Pilot's part, which Trainer reports as `loss`.

        So `loss` and `train_loss` read as they would for the Pilot fine-tuned alone (a drop-in script's
        perplexity stays the Pilot's); the objective is logged as `joint_loss`.
        """
        super().training_step(model, inputs, num_items_in_batch)
        reported = self._reported_loss
        scaled_for_accumulation = (
            self.loss_is_scaled_for_ga
            if self.loss_is_scaled_for_ga is not None
            else num_items_in_batch is not None
        )
        if not scaled_for_accumulation:  # as Trainer scales the loss it reports
            reported = reported / self.current_gradient_accumulation_steps
        return reported

    def _copilot_feedback_fraction(self) -> float:
        """The exposure option applies where generation feeds the Copilot its own predictions."""
        if self.pilot_copilot().config.copilot_feedback != "copilot":
            return 0.0
        return self.args.copilot_feedback_fraction

    def _replay_loss_terms(
        self, pilot_copilot: PilotCopilotForCausalLM, replay: MistakeLogEntry, fraction: float
    ) -> CopilotLossTerms:
        """The Copilot on replayed entries (read from the log, so no Pilot pass): its loss terms."""
        entry = replay.to(self.args.device)
        copilot = pilot_copilot.copilot
        with self.accelerator.autocast():
            stream = copilot_stream(copilot, entry, fraction)
            return copilot_loss_terms_on_entry(copilot, stream, entry)[1]

    def _read_back_step(
        self, grad_norm: torch.Tensor | float | None
    ) -> tuple[list[list[float]], list[list[bool]], float]:
        """The optimizer step's one read-back: per micro-batch [pilot loss, Copilot loss, Copilot positions], the
        Mistake Log's unchecked entries' finite flags, and the gradient norm."""
        losses, self._step_losses = self._step_losses, []
        entry_flags = self.mistake_log_callback.mistake_log.unverified_flags()
        norm = torch.as_tensor(0.0 if grad_norm is None else grad_norm, dtype=torch.float32)
        parts = [torch.stack(losses).flatten()] if losses else []
        parts += [] if entry_flags is None else [entry_flags.flatten()]
        values = torch.cat([part.to(norm) for part in parts] + [norm.reshape(1)]).tolist()
        rows = [values[i : i + 3] for i in range(0, len(values) - 1, 3)]
        return rows[: len(losses)], [[bool(flag) for flag in row] for row in rows[len(losses) :]], values[-1]

    def _raise_if_not_finite(self, grad_norm: torch.Tensor | float | None) -> None:
        """Refuse (NonFiniteTrainingError) a step whose loss, Mistake Log entry or gradient norm is not finite,
        before the optimizer applies it, undoing its log writes; warn for micro-batches without labels.

        Under fp16 loss scaling an infinite gradient norm is expected now and then and the scaler skips that
        step, so only the losses and entries are checked there.
        """
        micro_batches, entries, norm = self._read_back_step(grad_norm)
        mistake_log = self.mistake_log_callback.mistake_log
        step = f"training step {self.state.global_step + 1}"
        if any(positions == 0 for _, _, positions in micro_batches):
            warnings.warn(NO_LABELS_WARNING, stacklevel=2)
        for pilot_loss, copilot_loss, _ in micro_batches:
            for name, value in (("pilot_loss", pilot_loss), ("copilot_loss", copilot_loss)):
                if not math.isfinite(value):
                    mistake_log.discard_unverified()
                    raise NonFiniteTrainingError(
                        f"{name} is {value} at {step} (epoch {self.state.epoch or 0:.2f}); training stopped before "
                        "this step's update. Lower learning_rate / copilot_learning_rate, keep gradient clipping "
                        "on (max_grad_norm), prefer bf16 to fp16, and check the data of this step."
                    )
        for finite in entries:
            if not all(finite):
                mistake_log.discard_unverified()
                refuse_if_not_finite(finite)
        if self.accelerator.scaler is None and not math.isfinite(norm):
            mistake_log.discard_unverified()
            raise NonFiniteTrainingError(
                f"The gradient norm is {norm} at {step}; training stopped before this step's update, and no "
                "checkpoint holds it. Lower learning_rate / copilot_learning_rate, keep gradient clipping on "
                "(max_grad_norm), and check the data of this step."
            )
        mistake_log.verify(entries)

    # ---- logging ----------------------------------------------------------------------------------
    def _reset_train_metrics(self) -> None:
        """The logging window's sums, kept on the training device: the step reads nothing back for them."""
        self._train_sums = torch.zeros(5, dtype=torch.float64, device=self.args.device)
        # The Mistake Log's entry statistics: [micro-batches with loss positions, *sums of their means].
        self._entry_stat_names: tuple[str, ...] = ()
        self._entry_stat_sums = torch.zeros(1, dtype=torch.float64, device=self.args.device)
        self._log_size_sums = [0.0, 0.0, 0]  # entries, memory_mb, micro-batches: known on the host
        self._window_start_step: int | None = None

    def _record_train_metrics(self, pilot_loss: torch.Tensor, outputs, target_norm: torch.Tensor) -> None:
        if self._window_start_step is None:
            self._window_start_step = self.state.global_step
        values = torch.stack(
            [
                pilot_loss,
                outputs.copilot_squared_error.detach(),
                outputs.copilot_num_tokens,
                target_norm.to(pilot_loss),
                outputs.copilot_loss_sum.detach(),
            ]
        )
        self._train_sums += values.to(self._train_sums)
        mistake_log = self.mistake_log_callback.mistake_log
        names, entry_stats = mistake_log.latest_entry_stat_values()
        if names != self._entry_stat_names:  # the first micro-batch of the window
            self._entry_stat_names, self._entry_stat_sums = (
                names,
                self._entry_stat_sums.new_zeros(len(names) + 1),
            )
        self._entry_stat_sums += entry_stats.to(self._entry_stat_sums)
        entries, memory_mb, micro_batches = self._log_size_sums
        self._log_size_sums = [
            entries + len(mistake_log),
            memory_mb + mistake_log.memory_bytes() / 2**20,
            micro_batches + 1,
        ]

    def _pop_train_metrics(self) -> dict[str, float]:
        """pilot_loss: mean per-step Pilot loss; copilot_loss (`copilot_loss_from_sums`); copilot_r2; mistake_log/*:
        means over the window's micro-batches (all ranks), the entry statistics over those with loss positions.

        copilot_r2 = 1 - sum ||f_C - e||^2 / sum ||e||^2 over the Copilot's batches: 0 is a Copilot that
        predicts nothing, 1 one that predicts the Pilot's error exactly.
        """
        start = self.state.global_step if self._window_start_step is None else self._window_start_step
        steps = self.state.global_step - start
        sizes = torch.tensor(self._log_size_sums, dtype=torch.float64)
        values = torch.cat([self._train_sums, self._entry_stat_sums, sizes.to(self._train_sums.device)])
        world = self.args.world_size
        if world > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        values = values.tolist()  # the window's one read-back
        pilot_sum, squared_error, num_tokens, target_norm, objective = values[:5]
        pilot_loss = pilot_sum / world / max(steps, 1)
        error_loss = self.pilot_copilot().copilot.config.error_loss
        metrics = {
            "pilot_loss": pilot_loss,
            "copilot_loss": copilot_loss_from_sums(objective, max(num_tokens, 1), error_loss),
            "copilot_r2": copilot_r2_from_sums(squared_error, target_norm),
            "joint_loss": pilot_loss + self.args.copilot_loss_weight * objective / max(num_tokens, 1),
        }
        with_positions, *entry_sums = values[5 : 6 + len(self._entry_stat_names)]
        entries, memory_mb, micro_batches = values[-3:]
        metrics["mistake_log/entries"] = entries / max(micro_batches, 1)
        metrics["mistake_log/memory_mb"] = memory_mb / max(micro_batches, 1)
        if with_positions:
            metrics.update(
                {
                    name: total / with_positions
                    for name, total in zip(self._entry_stat_names, entry_sums, strict=True)
                }
            )
        self._reset_train_metrics()
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._window_start_step is not None:
            logs = {**logs, **self._pop_train_metrics()}
        super().log(logs, start_time)

    # ---- evaluation -------------------------------------------------------------------------------
    def _evaluation_loss(self, model, inputs, return_outputs):
        """Per-batch objective; accumulates token accuracies (Pilot alone, fused), loss sums and R^2's sums.

        The fused accuracy and R^2 are the configured feedback mode's: f_C exactly as greedy generate() forms it
        at each answer position given the gold prefix. `*_observed` are observed feedback everywhere.
        """
        outputs = model(**inputs, return_fused=True, return_mistake_log=True)
        pilot_copilot = self.pilot_copilot()
        copilot_lambda, fusion, feedback = pilot_copilot.fusion_settings(None, None, None)
        fused_observed = outputs.fused_logits
        squared_error_as_generated = outputs.copilot_squared_error
        if feedback != "observed":
            entry = outputs.mistake_log_entry
            predicted = predicted_errors_as_generated(pilot_copilot.copilot, entry, feedback)
            outputs.fused_logits = fuse_scores(outputs.logits, predicted, copilot_lambda, fusion)
            squared_error_as_generated = (entry.errors.squared_distance(predicted) * entry.loss_mask).sum()
        # A causal Pilot's position j predicts labels[j+1]; an encoder-decoder Pilot's, labels[j].
        shift, end = (0, None) if pilot_copilot.config.is_encoder_decoder else (1, -1)
        labels = inputs["labels"][:, shift:]
        label_mask = labels != -100
        pilot_logits, fused_logits = outputs.logits[:, :end], outputs.fused_logits[:, :end]
        pilot_nll = F.cross_entropy(
            pilot_logits.float().reshape(-1, pilot_logits.shape[-1]), labels.reshape(-1), reduction="sum"
        )
        sums = torch.stack(
            [
                pilot_nll,
                label_mask.sum(),
                ((pilot_logits.argmax(-1) == labels) & label_mask).sum(),
                ((fused_logits.argmax(-1) == labels) & label_mask).sum(),
                outputs.copilot_squared_error,
                outputs.copilot_num_tokens,
                ((fused_observed[:, :end].argmax(-1) == labels) & label_mask).sum(),
                copilot_target_norm(outputs.mistake_log_entry),
                outputs.copilot_loss_sum,
                squared_error_as_generated,
            ]
        ).to(torch.float64)
        self._eval_sums = sums if self._eval_sums is None else self._eval_sums + sums
        # eval_loss is the Pilot's, as the stock Trainer reports it (eval_joint_loss is the objective);
        # predictions are the Pilot's logits.
        loss = outputs.pilot_loss
        return (loss, type(outputs)(logits=outputs.logits)) if return_outputs else loss

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        dataset = getattr(dataloader, "dataset", None)
        if dataset is not None and has_length(dataset) and len(dataset) == 0:
            raise ValueError(
                f"The {metric_key_prefix} dataset is empty (0 examples): there is nothing to evaluate."
            )
        self._eval_sums = None
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        sums = self._eval_sums
        self._eval_sums = None
        if sums is None:  # no labelled batch on this process (every rank still joins the reduction)
            sums = torch.zeros(10, dtype=torch.float64)
        sums = sums.to(self.args.device)
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        (
            nll,
            labels,
            pilot_correct,
            fused_correct,
            squared_error,
            num_tokens,
            observed_correct,
            target_norm,
            objective,
            squared_error_as_generated,
        ) = sums.tolist()
        if labels:
            error_loss = self.pilot_copilot().copilot.config.error_loss
            copilot_objective = objective / max(num_tokens, 1)
            output.metrics.update(
                {
                    f"{metric_key_prefix}_joint_loss": nll / labels
                    + self.args.copilot_loss_weight * copilot_objective,
                    f"{metric_key_prefix}_pilot_loss": nll / labels,
                    f"{metric_key_prefix}_copilot_loss": copilot_loss_from_sums(
                        objective, max(num_tokens, 1), error_loss
                    ),
                    f"{metric_key_prefix}_pilot_token_accuracy": pilot_correct / labels,
                    f"{metric_key_prefix}_fused_token_accuracy": fused_correct / labels,
                    f"{metric_key_prefix}_fused_token_accuracy_observed": observed_correct / labels,
                    f"{metric_key_prefix}_copilot_r2": copilot_r2_from_sums(
                        squared_error_as_generated, target_norm
                    ),
                    f"{metric_key_prefix}_copilot_r2_observed": copilot_r2_from_sums(
                        squared_error, target_norm
                    ),
                }
            )
        return output


__all__ = ["CopilotTrainer", "NonFiniteTrainingError", "copilot_token_count"]
