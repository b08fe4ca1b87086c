"""A CopilotTrainer script for tests/test_distributed.py: `torchrun --nproc_per_node 2 ddp_train.py OUT`.

Trains twice, without and with Mistake Log replay, into `OUT/replay{R}`. Each process writes
`rank{N}.json` there (digests of its Pilot and Copilot parameters, its logged losses, the size of its
Mistake Log) and `state_dict_rank{N}.pt`. The last step writes a checkpoint (one Mistake Log file per
process).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_trainer import collate, counting_rows, logged, make_model  # noqa: E402

from hf_copilot import CopilotTrainer, CopilotTrainingArguments, copilot_final_phase  # noqa: E402


def digest(module: torch.nn.Module) -> str:
    sha = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def copilot_arguments(output_dir: str, replay: int, **overrides) -> CopilotTrainingArguments:
    settings = dict(
        output_dir=output_dir,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=4,
        optim="sgd",
        learning_rate=0.1,
        copilot_learning_rate=0.3,
        mistake_log_size=4,
        mistake_log_replay=replay,
        logging_steps=1,
        save_strategy="steps",
        save_steps=4,
        report_to=[],
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
        use_cpu=True,  # on CPU, accelerate sets up DDP (gloo) only when asked to use the CPU
        copilot_final_epochs=0.0,  # the joint run alone; train() asks for the phase where it tests it
    )
    return CopilotTrainingArguments(**{**settings, **overrides})


def train(output_dir: str, replay: int) -> None:
    # With replay the Copilot also runs outside DDP's forward; find_unused_parameters=False then checks
    # that every parameter still receives exactly one gradient per step.
    # The replay run also ends with a Copilot-only epoch: each rank trains on its own shard, so the ranks
    # stay identical only if that phase averages the Copilot's gradients across them. Every phase counts as
    # having learnt nothing there, so the phase runs again: only if the ranks judge the R^2 of all their
    # batches together do they all run it.
    if replay:
        copilot_final_phase.NOTHING_LEARNT_R2 = float("inf")
    args = copilot_arguments(
        output_dir,
        replay,
        ddp_find_unused_parameters=False if replay else None,
        copilot_final_epochs=1.0 if replay else 0.0,
    )
    trainer = CopilotTrainer(
        model=make_model(), args=args, train_dataset=counting_rows(), data_collator=collate
    )
    trainer.train()
    model = trainer.model
    report = {
        "world_size": args.world_size,
        "parallel_mode": str(args.parallel_mode),
        "ddp": type(trainer.model_wrapped).__name__,
        "pilot": digest(model.pilot),
        "copilot": digest(model.copilot),
        "pilot_loss": logged(trainer, "pilot_loss"),
        "copilot_loss": logged(trainer, "copilot_loss"),
        "mistake_log_entries": len(trainer.mistake_log_callback.mistake_log),
        "r2_before_fallback": logged(trainer, "copilot_final/r2_before_fallback"),
    }
    torch.save(model.state_dict(), os.path.join(output_dir, f"state_dict_rank{args.process_index}.pt"))
    with open(os.path.join(output_dir, f"rank{args.process_index}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    for replay in (0, 1):
        train(os.path.join(sys.argv[1], f"replay{replay}"), replay)
    # Left to interpreter exit, the process group's threads can abort a rank ("terminate called without an
    # active exception", seen once in ci-local on the floor transformers after both runs had finished).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
