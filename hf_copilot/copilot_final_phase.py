"""The optional Copilot-only phase at the end of a joint run (`copilot_final_epochs`).

During joint training the Copilot learnt the errors of Pilots that kept changing; generation pairs it with the
last one. This phase trains the Copilot alone on the errors of that final, frozen Pilot.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import Trainer, get_scheduler
from transformers.trainer_utils import has_length

from .mistake_log_entry import copilot_target_norm
from .training_errors import NonFiniteTrainingError


def check_sized_train_dataset(dataset) -> None:
    """The phase counts epochs of the training data: refuse a stream up front, before a joint run is spent."""
    if dataset is not None and not has_length(dataset):
        raise ValueError(
            f"copilot_final_epochs counts epochs of train_dataset, but it has no length "
            f"({type(dataset).__name__}, e.g. a streaming dataset). Train with copilot_final_epochs=0, then set "
            "trainer.train_dataset to a sized dataset (e.g. datasets.Dataset.from_list(list(stream.take(n)))) "
            "and call trainer.train_copilot_on_final_pilot(epochs)."
        )


def train_copilot_on_final_pilot(trainer: Trainer, epochs: float) -> None:
    """For a CopilotTrainer: AdamW at the Copilot's peak learning rate with a cosine decay over the phase, the
    Copilot's MSE per batch, gradients clipped to `max_grad_norm` (averaged across processes); logged as
    `copilot_final/*`."""
    check_sized_train_dataset(trainer.train_dataset)
    pilot_copilot = trainer.pilot_copilot()
    pilot, copilot = pilot_copilot.pilot, pilot_copilot.copilot
    dataloader = trainer.get_train_dataloader()
    total = max(1, math.ceil(epochs * len(dataloader)))
    optimizer = torch.optim.AdamW(
        copilot.parameters(),
        lr=trainer.args.copilot_peak_learning_rate,
        weight_decay=trainer.args.weight_decay,
    )
    schedule = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=0, num_training_steps=total)
    fraction = trainer._copilot_feedback_fraction()
    trainable = [p.requires_grad for p in pilot.parameters()]
    pilot.requires_grad_(False)
    pilot.eval()
    copilot.train()
    sums, step = torch.zeros(3, dtype=torch.float64), 0
    try:
        while step < total:
            for inputs in dataloader:
                if step == total:
                    break
                inputs = trainer._prepare_inputs(inputs)
                out = pilot_copilot(**inputs, return_mistake_log=True, copilot_feedback_fraction=fraction)
                loss = out.copilot_squared_error / out.copilot_num_tokens.clamp_min(1)
                if not torch.isfinite(loss.detach()):
                    raise NonFiniteTrainingError(
                        f"copilot_loss is {loss.item()} at step {step + 1} of the Copilot-only phase; the "
                        "Copilot was not updated. Lower copilot_learning_rate and keep max_grad_norm on."
                    )
                loss.backward()
                if trainer.args.world_size > 1:  # each rank sees its shard: average like DDP would
                    for parameter in copilot.parameters():
                        if parameter.grad is not None:
                            torch.distributed.all_reduce(parameter.grad)
                            parameter.grad /= trainer.args.world_size
                grad_norm = nn.utils.clip_grad_norm_(copilot.parameters(), trainer.args.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    raise NonFiniteTrainingError(
                        f"The Copilot's gradient norm is {grad_norm.item()} at step {step + 1} of the "
                        "Copilot-only phase; the Copilot was not updated. Lower copilot_learning_rate."
                    )
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                target = copilot_target_norm(out.mistake_log_entry)
                sums += torch.stack(
                    [out.copilot_squared_error.detach(), out.copilot_num_tokens, target]
                ).cpu()
                if step % trainer.args.logging_steps == 0 or step == total:
                    squared_error, num_tokens, target_norm = sums.tolist()
                    trainer.log(
                        {
                            "copilot_final/copilot_loss": math.sqrt(squared_error / max(num_tokens, 1)),
                            "copilot_final/copilot_r2": 1.0 - squared_error / target_norm
                            if target_norm
                            else 0.0,
                            "copilot_final/step": step,
                        }
                    )
                    sums.zero_()
    finally:
        for parameter, flag in zip(pilot.parameters(), trainable, strict=True):
            parameter.requires_grad_(flag)
        pilot_copilot.eval()
