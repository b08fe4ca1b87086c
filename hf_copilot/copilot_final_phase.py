"""The Copilot-only phase at the end of a joint run (`copilot_final_epochs`, on by default) and its length.

During joint training the Copilot learnt the errors of Pilots that kept changing; generation pairs it with the
last one. This phase trains the Copilot alone on the errors of that final, frozen Pilot.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, get_scheduler
from transformers.trainer_utils import has_length
from transformers.utils import logging

from .mistake_log_entry import copilot_loss_from_sums, copilot_r2_from_sums, copilot_target_norm
from .training_errors import NonFiniteTrainingError

logger = logging.get_logger(__name__)

DEFAULT_FINAL_EPOCHS = 24.0
MAX_DEFAULT_JOINT_MULTIPLE = 8
"""Measured: each longer phase (1, 3, 6, 12 epochs) lifted the fused model further (benchmarks/results/final_epochs/);
24 epochs with the default weight decay (`copilot_weight_decay=1`) lifted it again where 24 epochs alone mostly
memorised the training prompts (benchmarks/results/final_phase_weight_decay/). A phase batch runs the Pilot forward
only, about half a joint step, so the cap of 8 joint runs' batches keeps `train()` within about five times the joint
run."""
NOTHING_LEARNT_R2 = 0.05
"""Below it the phase's Copilot has learnt next to nothing. Measured against the former 0.01: the second phase ran in
10 more runs and lifted 8 (scratch arithmetic in the paper's mode 0.265 -> 0.7175 from a phase at R^2 0.0499, T5
recommendation 0.1325 -> 0.245 from 0.019); the other 2 lost 3 test prompts of 400 each
(benchmarks/results/fallback_threshold/). On a second CPU it moved 2 more runs, both up, and 0.1 lowered the 2 runs
it reached (benchmarks/results/fallback_threshold_other_cpu/)."""


def weight_decay_groups(named_parameters, decay_names: set[str], weight_decay: float) -> list[dict]:
    """AdamW groups as Trainer makes them: `weight_decay` for the parameters named in `decay_names`
    (`Trainer.get_decay_parameter_names`), none for the rest (norms, biases); empty groups left out. Shared by
    the joint optimizer's Pilot and Copilot groups and the Copilot-only phase."""
    named_parameters = list(named_parameters)
    groups = [
        {"params": [p for n, p in named_parameters if (n in decay_names) == decays], "weight_decay": decay}
        for decays, decay in ((True, weight_decay), (False, 0.0))
    ]
    return [group for group in groups if group["params"]]


def final_phase_batches(epochs: float | None, dataloader, joint_batches: int) -> int:
    """How many batches the phase trains: `epochs` of the data when given; by default DEFAULT_FINAL_EPOCHS,
    capped at MAX_DEFAULT_JOINT_MULTIPLE times the joint run's own batches, and on a stream (no length) that
    many batches."""
    if epochs is not None:
        return max(1, math.ceil(epochs * len(dataloader)))
    cap = MAX_DEFAULT_JOINT_MULTIPLE * joint_batches
    if not has_length(dataloader):
        return cap
    return min(math.ceil(DEFAULT_FINAL_EPOCHS * len(dataloader)), cap)


def check_sized_train_dataset(dataset) -> None:
    """The phase counts epochs of the training data: refuse a stream up front, before a joint run is spent."""
    if dataset is not None and not has_length(dataset):
        raise ValueError(
            f"copilot_final_epochs counts epochs of train_dataset, but it has no length "
            f"({type(dataset).__name__}, e.g. a streaming dataset). Train with copilot_final_epochs=0, then set "
            "trainer.train_dataset to a sized dataset (e.g. datasets.Dataset.from_list(list(stream.take(n)))) "
            "and call trainer.train_copilot_on_final_pilot(epochs)."
        )


def micro_batches(dataloader, total: int):
    """`total` batches of `dataloader`, read again from its start as often as needed; a pass that yields nothing
    ends it (a stream that cannot be read twice)."""
    produced = 0
    while produced < total:
        before = produced
        for inputs in dataloader:
            if produced == total:
                return
            yield inputs
            produced += 1
        if produced == before:
            return


def phase_optimizer(trainer: Trainer, copilot: nn.Module, groups: list[dict]) -> torch.optim.Optimizer:
    """The joint run's optimizer (`optim` with its betas, epsilon, fused kernel...) on the phase's groups, at the
    Copilot's peak learning rate; AdamW with the run's betas and epsilon where `optim` builds its own groups."""
    args = trainer.args
    optimizer_choice = trainer.grouped_optimizer_cls_and_kwargs(copilot)
    if optimizer_choice is None:
        optimizer_cls = torch.optim.AdamW
        optimizer_kwargs = {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    else:
        optimizer_cls, optimizer_kwargs = optimizer_choice
    return optimizer_cls(groups, **{**optimizer_kwargs, "lr": args.copilot_peak_learning_rate})


def train_copilot_on_final_pilot(trainer: Trainer, epochs: float | None, joint_batches: int = 0) -> None:
    """For a CopilotTrainer: the run's optimizer (`phase_optimizer`) at the Copilot's peak learning rate and
    the phase's weight decay (`copilot_final_weight_decay`; not of norms or biases, as in joint training) with a
    cosine decay over the phase, one step per `gradient_accumulation_steps` batches on the Copilot's mean loss
    (`CopilotConfig.error_loss`) over all of their positions (and all processes'), gradients clipped to
    `max_grad_norm`; logged as `copilot_final/*`. Its length in batches: `final_phase_batches`.

    A phase that ends with the Copilot predicting next to nothing (`learnt_nothing`) runs again on the same batches
    in the same order, with `copilot_fallback_weight_decay` where that is lower, from a Copilot drawn afresh
    (`redraw`): a Copilot that fits not even its training batches is held near zero by its weight decay, not kept
    from overfitting by it. Started from the Copilot the joint run left, the lower decay did not get multiple choice
    learning; from a fresh one it did (benchmarks/results/fallback_fresh_copilot/)."""
    if epochs is not None:
        check_sized_train_dataset(trainer.train_dataset)
    pilot_copilot = trainer.pilot_copilot()
    pilot, copilot = pilot_copilot.pilot, pilot_copilot.copilot
    args = trainer.args
    decay, fallback = args.effective_copilot_final_weight_decay, args.copilot_fallback_weight_decay
    start = PhaseStart() if fallback is not None and fallback < decay else None
    trainable = [p.requires_grad for p in pilot.parameters()]
    pilot.requires_grad_(False)
    pilot.eval()
    copilot.train()
    try:
        r2 = run_phase(trainer, epochs, joint_batches, decay)
        if start is not None and learnt_nothing(r2):
            logger.warning(
                f"The Copilot-only phase ended with R^2 {r2:.4f} on its last epoch of training batches: with "
                f"weight decay {decay} the Copilot learnt next to nothing (below {NOTHING_LEARNT_R2}). Running the "
                f"phase again with a Copilot drawn afresh and copilot_fallback_weight_decay={fallback}."
            )
            trainer.log(
                {"copilot_final/fallback_weight_decay": fallback, "copilot_final/r2_before_fallback": r2}
            )
            start.restore()
            redraw(copilot, args.seed)
            run_phase(trainer, epochs, joint_batches, fallback)
    finally:
        for parameter, flag in zip(pilot.parameters(), trainable, strict=True):
            parameter.requires_grad_(flag)
        pilot_copilot.eval()


def learnt_nothing(r2: float | None) -> bool:
    """The phase's Copilot explains less than 5% of its training batches' error (NOTHING_LEARNT_R2). None: nothing
    to judge."""
    return r2 is not None and r2 < NOTHING_LEARNT_R2


class PhaseStart:
    """The random number generators' states where the phase starts, so that a second phase sees what the first
    saw: the same data order (the sampler draws its seed from torch's generator) and the same dropout."""

    def __init__(self) -> None:
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def redraw(copilot: nn.Module, seed: int) -> None:
    """The Copilot's weights replaced by those its class draws from `seed` on the CPU (the same on every device
    and process), leaving torch's generators as they were. Under peft's `modules_to_save` wrapper the copy that
    trains is redrawn; the frozen original stays as it was."""
    trained = [
        module
        for module in copilot.modules()
        if isinstance(module, PreTrainedModel) and any(p.requires_grad for p in module.parameters())
    ]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(trained[0])(trained[0].config).state_dict()
    for module in trained:
        module.load_state_dict(fresh)


def run_phase(
    trainer: Trainer, epochs: float | None, joint_batches: int, weight_decay: float
) -> float | None:
    """One Copilot-only phase with `weight_decay` (the Pilot already frozen); returns the Copilot's R^2 on the
    phase's last epoch of batches (all processes'; a stream: the whole phase), None when they held no position or
    no error to learn."""
    pilot_copilot = trainer.pilot_copilot()
    copilot = pilot_copilot.copilot
    dataloader = trainer.get_train_dataloader()
    total = final_phase_batches(epochs, dataloader, joint_batches)
    if total == 0:
        return None
    last_epoch_from = total - min(total, len(dataloader) if has_length(dataloader) else total)
    accumulation = trainer.args.gradient_accumulation_steps
    groups = weight_decay_groups(
        copilot.named_parameters(), set(trainer.get_decay_parameter_names(copilot)), weight_decay
    )
    optimizer = phase_optimizer(trainer, copilot, groups)
    schedule = get_scheduler(
        "cosine", optimizer=optimizer, num_warmup_steps=0, num_training_steps=math.ceil(total / accumulation)
    )
    fraction = trainer._copilot_feedback_fraction()
    # The logging window's sums, the last epoch's and the group's losses stay on the device; one read-back per
    # optimizer step.
    sums = torch.zeros(4, dtype=torch.float64, device=trainer.args.device)
    last_epoch = torch.zeros(3, dtype=torch.float64, device=trainer.args.device)
    step, pending, group_tokens, group_losses = 0, 0, 0, []

    def optimizer_step() -> None:
        """The accumulated gradients of summed losses, divided by the group's positions: the exact mean."""
        nonlocal step, pending, group_tokens, group_losses
        tokens = torch.as_tensor(group_tokens, device=trainer.args.device)
        if trainer.args.world_size > 1:  # each rank saw its shard: sum as one batch would
            torch.distributed.all_reduce(tokens)
            for parameter in copilot.parameters():
                if parameter.grad is not None:
                    torch.distributed.all_reduce(parameter.grad)
        for parameter in copilot.parameters():
            if parameter.grad is not None:
                parameter.grad /= tokens.clamp_min(1)
        grad_norm = nn.utils.clip_grad_norm_(copilot.parameters(), trainer.args.max_grad_norm)
        *losses, norm = torch.stack([*group_losses, grad_norm.to(group_losses[0])]).tolist()
        for loss in losses:
            if not math.isfinite(loss):
                raise NonFiniteTrainingError(
                    f"copilot_loss is {loss} at step {step + 1} of the Copilot-only phase; the "
                    "Copilot was not updated. Lower copilot_learning_rate and keep max_grad_norm on."
                )
        if not math.isfinite(norm):
            raise NonFiniteTrainingError(
                f"The Copilot's gradient norm is {norm} at step {step + 1} of the "
                "Copilot-only phase; the Copilot was not updated. Lower copilot_learning_rate."
            )
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step, pending, group_tokens, group_losses = step + 1, 0, 0, []

    def log() -> None:
        squared_error, num_tokens, target_norm, objective = sums.tolist()
        error_loss = copilot.config.error_loss
        trainer.log(
            {
                "copilot_final/copilot_loss": copilot_loss_from_sums(
                    objective, max(num_tokens, 1), error_loss
                ),
                "copilot_final/copilot_r2": copilot_r2_from_sums(squared_error, target_norm),
                "copilot_final/step": step,
            }
        )
        sums.zero_()

    for index, inputs in enumerate(micro_batches(dataloader, total)):
        inputs = trainer._prepare_inputs(inputs)
        out = pilot_copilot(**inputs, return_mistake_log=True, copilot_feedback_fraction=fraction)
        objective = out.copilot_loss_sum
        group_losses.append(objective.detach().float() / out.copilot_num_tokens.clamp_min(1))
        objective.backward()
        pending, group_tokens = pending + 1, group_tokens + out.copilot_num_tokens.detach()
        target = copilot_target_norm(out.mistake_log_entry)
        terms = torch.stack(
            [out.copilot_squared_error.detach(), out.copilot_num_tokens, target, objective.detach()]
        ).to(sums)
        sums += terms
        if index >= last_epoch_from:
            last_epoch += terms[:3]
        if pending == accumulation:
            optimizer_step()
            if step % trainer.args.logging_steps == 0:
                log()
    if pending:  # the last, shorter group
        optimizer_step()
    if sums[1] > 0:
        log()
    if trainer.args.world_size > 1:
        torch.distributed.all_reduce(last_epoch)
    squared_error, num_tokens, target_norm = last_epoch.tolist()
    if num_tokens == 0 or target_norm == 0:
        return None
    return copilot_r2_from_sums(squared_error, target_norm)
