"""Does the Copilot make a fine-tuned model better? Three arms on offline tasks, several seeds.

Arms (same Pilot initialisation, data order and steps; SPEC section 7):
  pilot          the Pilot fine-tuned alone with the stock Trainer
  pilot_copilot  the same Pilot fine-tuned with a Copilot (CopilotTrainer); lambda chosen on validation
  pilot_matched  a Pilot with as many parameters as Pilot + Copilot, stock Trainer
Variants of the Pilot + Copilot arm (no retraining): fusion space, feedback mode, each lambda.

    python benchmarks/quality.py                 # full run, writes benchmarks/results/quality.{json,md,png}
    python benchmarks/quality.py --quick         # smoke run

Each record of quality.json: task, seed, arm, accuracy (test), plus the settings that produced it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import transformers

from hf_copilot import CopilotConfig
from hf_copilot.experiments.evaluation import DEFAULT_LAMBDAS, evaluate_task
from hf_copilot.experiments.recipes import (
    PilotShape,
    TrainingRecipe,
    evaluate_pilot_copilot,
    matched_shape,
    task_tokenizer,
    train_arm,
)
from hf_copilot.experiments.tasks import get_task

RESULTS = os.path.join(os.path.dirname(__file__), "results")
# How the committed results were produced: two task groups in parallel (one core each), the ablations,
# then a merge of the three record files.
REPRODUCE = (
    "python benchmarks/quality.py --tasks arithmetic recommendation --output /tmp/qrun/a",
    "python benchmarks/quality.py --tasks word_problems multiple_choice --output /tmp/qrun/b",
    "python benchmarks/quality.py --ablations copilot_hidden_64 copilot_4_layers replay_4 copilot_lr_2x "
    "--ablation-task arithmetic --ablation-seed 1 --output /tmp/qrun/abl",
    "python benchmarks/quality.py --from-records /tmp/qrun/a/quality.json /tmp/qrun/b/quality.json "
    "/tmp/qrun/abl/quality.json",
)


@dataclass
class TaskSetting:
    """A task family with a Pilot sized so that alone it is neither at 0% nor near 100%."""

    name: str
    options: dict = field(default_factory=dict)
    shape: PilotShape = field(default_factory=PilotShape)
    train_size: int = 4000
    epochs: float = 4.0
    eval_size: int = 300


SETTINGS = [
    TaskSetting("arithmetic", {"digits": 2, "operations": "+-"}, PilotShape(64, 2, 4), 6000, 8.0),
    TaskSetting("word_problems", {"max_number": 8}, PilotShape(64, 2, 4), 3000, 4.0),
    TaskSetting("multiple_choice", {"num_choices": 2}, PilotShape(64, 2, 4), 2000, 5.0),
    TaskSetting("recommendation", {"num_items": 60, "num_genres": 4}, PilotShape(64, 2, 4), 4000, 8.0),
]
COPILOT = CopilotConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


def run_task_seed(setting: TaskSetting, seed: int, output_dir: str, quick: bool) -> list[dict]:
    """All arms and variants of one task and seed."""
    task = get_task(setting.name, **setting.options)
    train_size = 200 if quick else setting.train_size
    eval_size = 40 if quick else setting.eval_size
    train = task.examples("train", train_size, seed=seed)
    validation = task.examples("validation", eval_size, seed=seed)
    test = task.examples("test", eval_size, seed=seed)
    tokenizer = task_tokenizer(task)
    recipe = TrainingRecipe(
        epochs=0.5 if quick else setting.epochs, batch_size=32, seed=seed, logging_steps=25
    )
    base = {"task": setting.name, "seed": seed, "task_options": setting.options, "train_examples": train_size}
    records = []

    def record(arm: str, accuracy: float, parameter_count: int, **settings) -> None:
        records.append({**base, "arm": arm, "accuracy": accuracy, "parameters": parameter_count, **settings})

    # Pilot + Copilot, then its variants.
    started = time.time()
    model, _ = train_arm(
        "pilot_copilot", setting.shape.build(tokenizer, seed), tokenizer, train, recipe, output_dir, COPILOT
    )
    seconds = time.time() - started
    total = model.num_parameters()
    for variant in evaluate_variants(model, tokenizer, task, validation, test):
        default = variant["fusion"] == "probs" and variant["copilot_feedback"] == "copilot"
        record(
            "pilot_copilot" if default else "pilot_copilot_variant",
            parameter_count=total,
            train_seconds=round(seconds, 1),
            **variant,
        )
    for lam in DEFAULT_LAMBDAS:
        accuracy = evaluate_task(
            model, tokenizer, test, task, batch_size=100, progress=False, copilot_lambda=lam
        )
        record(
            "pilot_copilot_lambda",
            accuracy=accuracy["accuracy"],
            parameter_count=total,
            copilot_lambda=lam,
            lambda_selection="fixed",
            fusion="probs",
            copilot_feedback="copilot",
        )

    # The Pilot alone, from the same initialisation and data order.
    for arm, shape in (
        ("pilot", setting.shape),
        ("pilot_matched", matched_shape(setting.shape, total, tokenizer)),
    ):
        started = time.time()
        pilot, _ = train_arm(arm, shape.build(tokenizer, seed), tokenizer, train, recipe, output_dir)
        accuracy = evaluate_task(pilot, tokenizer, test, task, batch_size=100, progress=False)["accuracy"]
        record(
            arm,
            accuracy,
            pilot.num_parameters(),
            train_seconds=round(time.time() - started, 1),
            pilot_shape=shape.__dict__,
        )
    return records


def evaluate_variants(model, tokenizer, task, validation, test) -> list[dict]:
    """Test accuracy for each fusion space x feedback mode, lambda chosen on validation for each."""
    variants = []
    for feedback in ("copilot", "observed"):
        for fusion in ("probs", "logits"):
            result = evaluate_pilot_copilot(
                model,
                tokenizer,
                task,
                validation,
                test,
                lambdas=DEFAULT_LAMBDAS,
                batch_size=100,
                progress=False,
                fusion=fusion,
                copilot_feedback=feedback,
            )
            variants.append(
                {
                    "accuracy": result.fused_accuracy,
                    "fusion": fusion,
                    "copilot_feedback": feedback,
                    "copilot_lambda": result.best_lambda,
                    "lambda_selection": "validation",
                    "validation_sweep": result.validation_sweep,
                    "pilot_accuracy_same_run": result.pilot_accuracy,
                }
            )
    return variants


ABLATIONS = {
    "copilot_hidden_64": {"copilot": {"hidden_size": 64}},
    "copilot_4_layers": {"copilot": {"num_hidden_layers": 4}},
    "replay_4": {"recipe": {"mistake_log_replay": 4}},
    "copilot_lr_2x": {"recipe": {"copilot_learning_rate": 6e-3}},
}


def run_ablations(setting: TaskSetting, seed: int, output_dir: str, names: list[str]) -> list[dict]:
    """Retrain the Pilot + Copilot arm with another Copilot size, replay or learning rate."""
    task = get_task(setting.name, **setting.options)
    train = task.examples("train", setting.train_size, seed=seed)
    validation = task.examples("validation", setting.eval_size, seed=seed)
    test = task.examples("test", setting.eval_size, seed=seed)
    tokenizer = task_tokenizer(task)
    records = []
    for name in names:
        change = ABLATIONS[name]
        copilot = CopilotConfig(**{**COPILOT.to_dict(), **change.get("copilot", {})})
        recipe = TrainingRecipe(
            epochs=setting.epochs, batch_size=32, seed=seed, logging_steps=25, **change.get("recipe", {})
        )
        model, _ = train_arm(
            "pilot_copilot",
            setting.shape.build(tokenizer, seed),
            tokenizer,
            train,
            recipe,
            output_dir,
            copilot,
        )
        for variant in evaluate_variants(model, tokenizer, task, validation, test):
            records.append(
                {
                    "task": setting.name,
                    "seed": seed,
                    "arm": "pilot_copilot_ablation",
                    "ablation": name,
                    "parameters": model.num_parameters(),
                    **variant,
                }
            )
    return records


def summarise(records: list[dict]) -> dict:
    """Mean and std over seeds per task and arm, with the lifts the issue asks for."""
    summary: dict[str, dict] = {}
    for task in dict.fromkeys(r["task"] for r in records):
        rows = [r for r in records if r["task"] == task]
        arms = {}
        for arm in ("pilot", "pilot_copilot", "pilot_matched"):
            values = [r["accuracy"] for r in rows if r["arm"] == arm]
            if values:
                arms[arm] = {
                    "mean": statistics.mean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "parameters": next(r["parameters"] for r in rows if r["arm"] == arm),
                }
        variants = {}
        for r in rows:
            if r["arm"] in ("pilot_copilot", "pilot_copilot_variant"):
                key = f"{r['fusion']}/{r['copilot_feedback']}"
                variants.setdefault(key, []).append(r["accuracy"])
        lambdas = {}
        for r in rows:
            if r["arm"] == "pilot_copilot_lambda":
                lambdas.setdefault(r["copilot_lambda"], []).append(r["accuracy"])
        pilot, fused = arms.get("pilot", {}).get("mean"), arms.get("pilot_copilot", {}).get("mean")
        matched = arms.get("pilot_matched", {}).get("mean")
        ablations: dict[str, dict] = {}
        for r in rows:
            if r["arm"] == "pilot_copilot_ablation":
                ablations.setdefault(f"{r['ablation']} (seed {r['seed']})", {})[
                    f"{r['fusion']}/{r['copilot_feedback']}"
                ] = r["accuracy"]
        for r in rows:
            if r["arm"] in ("pilot_copilot", "pilot_copilot_variant") and any(
                f"(seed {r['seed']})" in key for key in ablations
            ):
                ablations.setdefault(f"default (seed {r['seed']})", {})[
                    f"{r['fusion']}/{r['copilot_feedback']}"
                ] = r["accuracy"]
        summary[task] = {
            "ablations": ablations,
            "arms": arms,
            "relative_lift_over_pilot": (fused - pilot) / pilot if pilot else None,
            "fused_minus_matched": fused - matched if matched is not None else None,
            "variants": {k: statistics.mean(v) for k, v in variants.items()},
            "fixed_lambda": {k: statistics.mean(v) for k, v in sorted(lambdas.items())},
        }
    return summary


def per_seed_rows(records: list[dict]) -> list[str]:
    """One line per task and seed: the arms side by side, and the fused variants."""
    lines = [
        "",
        "## Per seed (test accuracy; fused columns use lambda chosen on validation)",
        "",
        "| task | seed | Pilot | fused probs/copilot | fused probs/observed | fused logits/observed | matched Pilot |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    keys = dict.fromkeys((r["task"], r["seed"]) for r in records if r["arm"] == "pilot")
    for task, seed in keys:
        rows = [r for r in records if r["task"] == task and r["seed"] == seed]

        def find(arm: str, fusion: str | None = None, feedback: str | None = None, rows: list = rows) -> str:
            for r in rows:
                if (
                    r["arm"] == arm
                    and fusion in (None, r.get("fusion"))
                    and feedback in (None, r.get("copilot_feedback"))
                ):
                    lam = f" (λ={r['copilot_lambda']:g})" if "copilot_lambda" in r else ""
                    return f"{r['accuracy']:.3f}{lam}"
            return "-"

        lines.append(
            f"| {task} | {seed} | {find('pilot')} | {find('pilot_copilot')} | "
            f"{find('pilot_copilot_variant', 'probs', 'observed')} | {find('pilot_copilot_variant', 'logits', 'observed')} | "
            f"{find('pilot_matched')} |"
        )
    return lines


def write_markdown(summary: dict, command: str, path: str, records: list[dict]) -> None:
    lines = [
        "# Quality: Pilot alone vs Pilot + Copilot vs a parameter-matched Pilot",
        "",
        f"Command: `{command}`  ",
        "Committed results: " + "; then ".join(f"`{line}`" for line in REPRODUCE) + ".  ",
        f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}.",
        "",
        "Test accuracy, mean ± std over seeds. Pilot + Copilot uses lambda chosen on validation "
        "(fusion=probs, feedback=copilot, the paper's defaults). Lift = (fused - Pilot) / Pilot.",
        "",
        "| task | Pilot | Pilot + Copilot | parameter-matched Pilot | relative lift | fused - matched |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for task, row in summary.items():
        arms = row["arms"]

        def cell(arm: str, arms: dict = arms) -> str:
            if arm not in arms:
                return "-"
            return f"{arms[arm]['mean']:.3f} ± {arms[arm]['std']:.3f} ({arms[arm]['parameters']:,} p.)"

        lift = row["relative_lift_over_pilot"]
        gap = row["fused_minus_matched"]
        lines.append(
            f"| {task} | {cell('pilot')} | {cell('pilot_copilot')} | {cell('pilot_matched')} | "
            f"{'-' if lift is None else f'{100 * lift:+.1f}%'} | {'-' if gap is None else f'{gap:+.3f}'} |"
        )
    lines += [
        "",
        "## Variants (lambda chosen on validation for each), mean test accuracy",
        "",
        "| task | " + " | ".join(next(iter(summary.values()))["variants"]) + " |",
        "| --- |" + " ---: |" * len(next(iter(summary.values()))["variants"]),
    ]
    for task, row in summary.items():
        lines.append(f"| {task} | " + " | ".join(f"{v:.3f}" for v in row["variants"].values()) + " |")
    lines += [
        "",
        "## Fixed lambda (fusion=probs, feedback=copilot), mean test accuracy",
        "",
        "| task | " + " | ".join(f"λ={lam:g}" for lam in DEFAULT_LAMBDAS) + " |",
        "| --- |" + " ---: |" * len(DEFAULT_LAMBDAS),
    ]
    for task, row in summary.items():
        lines.append(
            f"| {task} | "
            + " | ".join(f"{row['fixed_lambda'].get(lam, float('nan')):.3f}" for lam in DEFAULT_LAMBDAS)
            + " |"
        )
    lines += per_seed_rows(records)
    ablation_rows = [
        (task, name, row) for task, data in summary.items() for name, row in data["ablations"].items()
    ]
    if ablation_rows:
        variants = list(ablation_rows[0][2])
        lines += [
            "",
            "## Ablations: Copilot size, replay, Copilot learning rate (test accuracy, lambda chosen on "
            "validation)",
            "",
            "| task | run | " + " | ".join(variants) + " |",
            "| --- | --- |" + " ---: |" * len(variants),
        ]
        for task, name, row in sorted(
            ablation_rows, key=lambda r: (r[0], not r[1].startswith("default"), r[1])
        ):
            lines.append(
                f"| {task} | {name} | "
                + " | ".join(f"{row.get(v, float('nan')):.3f}" for v in variants)
                + " |"
            )
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary)
    figure, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.27
    for offset, (arm, label) in enumerate(
        (("pilot", "Pilot"), ("pilot_copilot", "Pilot + Copilot"), ("pilot_matched", "param-matched Pilot"))
    ):
        means = [summary[t]["arms"].get(arm, {}).get("mean", 0) for t in tasks]
        stds = [summary[t]["arms"].get(arm, {}).get("std", 0) for t in tasks]
        bars.bar([i + (offset - 1) * width for i in range(len(tasks))], means, width, yerr=stds, label=label)
    bars.set_xticks(range(len(tasks)), tasks, rotation=15)
    bars.set_ylabel("test accuracy")
    bars.set_title("Arms (mean ± std over seeds)")
    bars.legend()
    for task in tasks:
        fixed = summary[task]["fixed_lambda"]
        curves.plot(list(fixed), list(fixed.values()), marker="o", label=task)
    curves.set_xlabel("copilot_lambda (fusion=probs, feedback=copilot)")
    curves.set_ylabel("test accuracy")
    curves.set_title("Accuracy by lambda")
    curves.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=[s.name for s in SETTINGS])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=RESULTS)
    parser.add_argument("--ablations", nargs="+", choices=sorted(ABLATIONS), help="run only these ablations")
    parser.add_argument("--ablation-task", default="arithmetic")
    parser.add_argument("--ablation-seed", type=int, default=1)
    parser.add_argument(
        "--from-records", nargs="+", help="only summarise the records of earlier runs (quality.json files)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread each is fastest and leaves the other core free
    os.makedirs(args.output, exist_ok=True)
    scratch = os.path.join(args.output, ".runs")
    records: list[dict] = []
    if args.from_records:
        for path in args.from_records:
            with open(path) as handle:
                records.extend(json.load(handle)["records"])
    elif args.ablations:
        setting = next(s for s in SETTINGS if s.name == args.ablation_task)
        records = run_ablations(setting, args.ablation_seed, scratch, args.ablations)
    else:
        from tqdm.auto import tqdm

        jobs = [(s, seed) for s in SETTINGS if s.name in args.tasks for seed in args.seeds]
        for setting, seed in tqdm(jobs, desc="task x seed"):
            records.extend(run_task_seed(setting, seed, scratch, args.quick))
            with open(os.path.join(args.output, "quality.json"), "w") as handle:
                json.dump({"records": records, "summary": summarise(records)}, handle, indent=1, default=str)
    summary = summarise(records)
    with open(os.path.join(args.output, "quality.json"), "w") as handle:
        json.dump({"records": records, "summary": summary}, handle, indent=1, default=str)
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:])
    write_markdown(summary, command.strip(), os.path.join(args.output, "quality.md"), records)
    plot(summary, os.path.join(args.output, "quality.png"))
    print(open(os.path.join(args.output, "quality.md")).read())


if __name__ == "__main__":
    main()
