"""Which Copilot training makes the Copilot learn? One change at a time against the same seeds.

Every variant fine-tunes the same Pilot (same init, data order and steps: the Pilot's update does not
depend on the Copilot) with a Copilot trained one way, then measures on held-out validation prompts:
- `r2`: 1 - sum||f_C - e||^2 / sum||e||^2 at answer positions, teacher forced (SPEC section 7);
- `pilot_token_accuracy`, `fused_token_accuracy`: what greedy generate() picks at each answer position
  given the gold prefix, Pilot alone and fused in the configured feedback mode (lambda 1);
- `pilot_exact`, `fused_exact`: exact match of generate() on the validation prompts (fused: best lambda
  of the sweep, reported with it).

    python benchmarks/copilot_training.py --output benchmarks/results   # writes copilot_training.{json,md,png}

Progress goes to stdout, one line per finished run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

import torch

from hf_copilot import CopilotConfig, CopilotTrainer, PilotCopilotForCausalLM
from hf_copilot.experiments.data import DataCollatorForCompletion, tokenize_examples
from hf_copilot.experiments.evaluation import best_lambda, evaluate_task
from hf_copilot.experiments.recipes import PilotShape, TrainingRecipe, task_tokenizer
from hf_copilot.experiments.tasks import get_task

COPILOT_SHAPE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
SWEEP = (0.0, 0.5, 1.0, 2.0)
# One change at a time from the previous defaults (fresh entry, Pilot's lr, paper's feedback untrained).
BASELINE = {
    "mistake_log_window": 0,
    "copilot_learning_rate_multiple": 1.0,
    "copilot_feedback_fraction": 0.0,
    "copilot_final_epochs": 0.0,
    "copilot_lr_scheduler_type": None,
    "copilot_feedback": "copilot",
    "error_form": "linear",
    "error_proj_init_std": None,
    "position_encoding": "none",
}
OBSERVED = {"copilot_feedback": "observed"}
# Round 1, the feedback mode; round 2, each training option on top of round 1's winner (observed).
VARIANTS = {
    "baseline": {},
    "exposure": {"copilot_feedback_fraction": 1.0},
    "observed": OBSERVED,
    "observed+window_16": {**OBSERVED, "mistake_log_window": 16},
    "observed+window_64": {**OBSERVED, "mistake_log_window": 64},
    "observed+lr_2x": {**OBSERVED, "copilot_learning_rate_multiple": 2.0},
    "observed+constant_schedule": {**OBSERVED, "copilot_lr_scheduler_type": "constant_with_warmup"},
    "observed+final_epoch": {**OBSERVED, "copilot_final_epochs": 1.0},
    "observed+final_3_epochs": {**OBSERVED, "copilot_final_epochs": 3.0},
    # Round 3: the options that helped, together.
    "observed+window_16+constant": {
        **OBSERVED,
        "mistake_log_window": 16,
        "copilot_lr_scheduler_type": "constant_with_warmup",
    },
    "observed+window_16+constant+lr_2x": {
        **OBSERVED,
        "mistake_log_window": 16,
        "copilot_lr_scheduler_type": "constant_with_warmup",
        "copilot_learning_rate_multiple": 2.0,
    },
    # Round 4: the error form, on the defaults that round 2 chose (observed, constant schedule).
    "observed+constant+reweight": {
        **OBSERVED,
        "copilot_lr_scheduler_type": "constant_with_warmup",
        "error_form": "reweight",
    },
    "observed+constant+final_epoch": {
        **OBSERVED,
        "copilot_lr_scheduler_type": "constant_with_warmup",
        "copilot_final_epochs": 1.0,
    },
    "observed+constant+final_epoch+reweight": {
        **OBSERVED,
        "copilot_lr_scheduler_type": "constant_with_warmup",
        "copilot_final_epochs": 1.0,
        "error_form": "reweight",
    },
    # Round 6: W_in drawn at std 1, so that the error stream enters the Copilot at unit scale.
    "observed+constant+final_epoch+unit_input": {
        **OBSERVED,
        "copilot_lr_scheduler_type": "constant_with_warmup",
        "copilot_final_epochs": 1.0,
        "error_proj_init_std": 1.0,
    },
    # Round 7: rotary positions in the Copilot's attention, so it can find the Pilot's state at its own position.
    "observed+constant+final_epoch+unit_input+rope": {
        **OBSERVED,
        "copilot_lr_scheduler_type": "constant_with_warmup",
        "copilot_final_epochs": 1.0,
        "error_proj_init_std": 1.0,
        "position_encoding": "rope",
    },
    # Round 8: the paper's feedback (trained on its own predictions at answer positions) with and without
    # positions: a rotary Copilot can find x_tilde_j, the token just emitted, at distance 0 in its memory.
    "paper+constant+final_epoch+unit_input": {
        "copilot_feedback_fraction": 1.0,
        "copilot_lr_scheduler_type": "constant_with_warmup",
        "copilot_final_epochs": 1.0,
        "error_proj_init_std": 1.0,
    },
    "paper+constant+final_epoch+unit_input+rope": {
        "copilot_feedback_fraction": 1.0,
        "copilot_lr_scheduler_type": "constant_with_warmup",
        "copilot_final_epochs": 1.0,
        "error_proj_init_std": 1.0,
        "position_encoding": "rope",
    },
}
# (task options, training examples, epochs): Pilots that stay between 20% and 80% exact match.
SETTINGS = {
    "sorting": ({"length": 8}, 2000, 2.0),
    "arithmetic": ({"digits": 2, "operations": "+-"}, 3000, 4.0),
    "recommendation": ({"num_items": 60, "num_genres": 4}, 3000, 4.0),
}


def run(task_name: str, seed: int, variant: str, eval_size: int) -> dict:
    options, train_size, epochs = SETTINGS[task_name]
    settings = {**BASELINE, **VARIANTS[variant]}
    task = get_task(task_name, **options)
    tokenizer = task_tokenizer(task)
    train = task.examples("train", train_size, seed=seed)
    validation = task.examples("validation", eval_size, seed=seed)
    recipe = TrainingRecipe(epochs=epochs, batch_size=32, seed=seed, logging_steps=50)
    recipe.copilot_learning_rate = settings["copilot_learning_rate_multiple"] * recipe.learning_rate
    recipe.extra = {
        "copilot_feedback_fraction": settings["copilot_feedback_fraction"],
        "copilot_final_epochs": settings["copilot_final_epochs"],
        "mistake_log_window": settings["mistake_log_window"],
        "copilot_lr_scheduler_type": settings["copilot_lr_scheduler_type"],
        "disable_tqdm": True,
    }
    pilot = PilotShape(64, 2, 4).build(tokenizer, seed)
    copilot = CopilotConfig(
        **COPILOT_SHAPE,
        error_form=settings["error_form"],
        error_proj_init_std=settings["error_proj_init_std"],
        position_encoding=settings["position_encoding"],
    )
    model = PilotCopilotForCausalLM.from_pilot(pilot, copilot, copilot_feedback=settings["copilot_feedback"])
    args = recipe.arguments(f"/tmp/copilot_training/{task_name}-{seed}-{variant}", with_copilot=True)
    collator = DataCollatorForCompletion(tokenizer)
    trainer = CopilotTrainer(
        model=model,
        args=args,
        train_dataset=tokenize_examples(train, tokenizer),
        eval_dataset=tokenize_examples(validation, tokenizer),
        data_collator=collator,
    )
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    model.eval()
    metrics = trainer.evaluate()
    sweep = {
        lam: evaluate_task(
            model, tokenizer, validation, task, batch_size=100, progress=False, copilot_lambda=lam
        )["accuracy"]
        for lam in SWEEP
    }
    best = best_lambda({lam: sweep[lam] for lam in SWEEP[1:]})  # the best Copilot setting, lambda 0 left out
    train_r2 = [e["copilot_r2"] for e in trainer.state.log_history if "copilot_r2" in e]
    return {
        "task": task_name,
        "seed": seed,
        "variant": variant,
        **settings,
        "r2": metrics[
            "eval_copilot_r2_observed"
        ],  # observed feedback in every variant, as its committed results
        "train_r2_curve": train_r2,
        "pilot_token_accuracy": metrics["eval_pilot_token_accuracy"],
        "fused_token_accuracy": metrics["eval_fused_token_accuracy"],
        "fused_token_accuracy_observed": metrics["eval_fused_token_accuracy_observed"],
        "pilot_exact": sweep[0.0],
        "fused_exact": sweep[best],
        "best_lambda": best,
        "sweep": {str(k): v for k, v in sweep.items()},
        "train_seconds": round(seconds, 1),
    }


def summarise(records: list[dict]) -> list[dict]:
    rows = []
    for task in dict.fromkeys(r["task"] for r in records):
        for variant in VARIANTS:
            chosen = [r for r in records if r["task"] == task and r["variant"] == variant]
            if not chosen:
                continue

            def mean(key: str, chosen: list[dict] = chosen) -> float:
                return statistics.mean(r[key] for r in chosen)

            rows.append(
                {
                    "task": task,
                    "variant": variant,
                    "seeds": len(chosen),
                    "r2": mean("r2"),
                    "pilot_exact": mean("pilot_exact"),
                    "fused_exact": mean("fused_exact"),
                    "lift_per_seed": [round(r["fused_exact"] - r["pilot_exact"], 3) for r in chosen],
                    "pilot_token_accuracy": mean("pilot_token_accuracy"),
                    "fused_token_accuracy": mean("fused_token_accuracy"),
                }
            )
    return rows


def write(records: list[dict], output: str, commands: list[str]) -> None:
    os.makedirs(output, exist_ok=True)
    rows = summarise(records)
    with open(os.path.join(output, "copilot_training.json"), "w") as f:
        json.dump({"commands": commands, "summary": rows, "records": records}, f, indent=1)
    tasks = "; ".join(
        f"{task} {SETTINGS[task][0]} on {SETTINGS[task][1]:,} examples for {SETTINGS[task][2]:g} epochs"
        for task in dict.fromkeys(r["task"] for r in records)
    )
    lines = [
        "# Copilot training: one change at a time (validation, scratch regime)",
        "",
        "Committed results: " + "; then ".join(f"`{line}`" for line in commands) + ".",
        "",
        f"Pilot LLaMA 64 x 2 layers trained from scratch ({tasks}), Copilot 32 x 2 layers; 400 validation "
        "prompts. R^2 and token accuracies teacher forced; exact match through generate() with lambda the best "
        "of {0.5, 1, 2} (the Pilot at lambda 0).",
        "",
        "| task | variant | seeds | R^2 | Pilot exact | fused exact | lift per seed | Pilot token acc | fused token acc |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['variant']} | {r['seeds']} | {r['r2']:.3f} | {r['pilot_exact']:.3f} | "
            f"{r['fused_exact']:.3f} | {', '.join(f'{d:+.3f}' for d in r['lift_per_seed'])} | "
            f"{r['pilot_token_accuracy']:.3f} | {r['fused_token_accuracy']:.3f} |"
        )
    with open(os.path.join(output, "copilot_training.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(records, os.path.join(output, "copilot_training.png"))


def plot(records: list[dict], path: str) -> None:
    """Held-out R^2 and exact match per variant, one row per task: bars are means, dots the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in records))
    figure, axes = plt.subplots(len(tasks), 2, figsize=(13, 4.5 * len(tasks)), squeeze=False)
    for (r2_axis, exact_axis), task in zip(axes, tasks, strict=True):
        chosen_task = [r for r in records if r["task"] == task]
        variants = [v for v in VARIANTS if any(r["variant"] == v for r in chosen_task)]
        for index, variant in enumerate(variants):
            chosen = [r for r in chosen_task if r["variant"] == variant]
            r2 = [r["r2"] for r in chosen]
            fused = [r["fused_exact"] for r in chosen]
            r2_axis.barh(index, statistics.mean(r2), color="tab:blue")
            r2_axis.plot(r2, [index] * len(r2), "k.")
            exact_axis.barh(index, statistics.mean(fused), color="tab:green")
            exact_axis.plot(fused, [index] * len(fused), "k.")
        pilot = statistics.mean(r["pilot_exact"] for r in chosen_task)
        exact_axis.axvline(pilot, color="tab:red", label=f"Pilot alone ({pilot:.3f})")
        for axis in (r2_axis, exact_axis):
            axis.set_yticks(range(len(variants)), variants if axis is r2_axis else [""] * len(variants))
            axis.invert_yaxis()
        r2_axis.set_xlabel(f"{task}: held-out R^2 of the Copilot")
        exact_axis.set_xlabel(f"{task}: fused exact match (validation)")
        exact_axis.legend(loc="lower right")
    figure.suptitle("Copilot training, one change at a time (scratch regime, mean of seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--eval-size", type=int, default=400)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--from-records", nargs="+", help="merge record files instead of running")
    args = parser.parse_args()
    torch.set_num_threads(1)
    command = "python benchmarks/copilot_training.py " + shlex.join(sys.argv[1:])
    if args.from_records:
        merged = [json.load(open(path)) for path in args.from_records]
        records = [r for result in merged for r in result["records"]]
        earlier = [c for result in merged for c in result["commands"] if "--from-records" not in c]
        write(records, args.output, [*dict.fromkeys(earlier), command])
        return
    records = []
    for task in args.tasks:
        for seed in args.seeds:
            for variant in args.variants:
                record = run(task, seed, variant, args.eval_size)
                records.append(record)
                print(
                    f"{task} seed {seed} {variant}: r2 {record['r2']:.3f} pilot {record['pilot_exact']:.3f} "
                    f"fused {record['fused_exact']:.3f} (lambda {record['best_lambda']}) "
                    f"token {record['pilot_token_accuracy']:.3f}->{record['fused_token_accuracy']:.3f} "
                    f"{record['train_seconds']} s",
                    flush=True,
                )
                write(records, args.output, [command])


if __name__ == "__main__":
    main()
