"""What a Pilot's data still teaches it, against the default Copilot's held-out R^2.

The Copilot's R^2 on a Pilot is bounded by how much better a distribution it can compute: for f = q - p,
R^2 = 1 - Brier(q) / Brier(p) exactly (benchmarks/copilot_headroom.py). The same Pilot fine-tuned three times as
long is one such q, what more of the same training would teach; its R^2, the "headroom", says whether a Copilot's
low R^2 is the Copilot's miss or the data's. copilot_headroom.py measures it for the pretrained LLaMA family; this
is the same headroom for the regimes of quality.py it does not cover: the encoder-decoder Pilots of `pretrained_t5`
and `scratch_t5`, and the LLaMA Pilots trained from scratch (`scratch`), teacher forced at the answer positions of
the validation prompts.

    python benchmarks/longer_pilot_headroom.py --tasks recommendation arithmetic --seed 0 --output /tmp/lph/all
    python benchmarks/longer_pilot_headroom.py --regime scratch_t5 --tasks recommendation --output /tmp/lph/t5
    python benchmarks/longer_pilot_headroom.py --regime scratch --tasks word_problems --output /tmp/lph/scratch
    python benchmarks/longer_pilot_headroom.py --quick --tasks recommendation --output /tmp/lph/quick  # smoke, ~1 min
    python benchmarks/longer_pilot_headroom.py --from-records /tmp/lph/*/longer_pilot_headroom.json  # merge

`pretrained_t5` needs the T5 family of benchmarks/t5_family.py (cached; built on first use).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch
from common import machine_info, merged_commands, single_thread_run, write_json_and_markdown
from copilot_headroom import distribution_stats, errors_of, r2, scaled_r2
from quality import SETTINGS, Experiment, trained_longer

RESULTS = os.path.join(os.path.dirname(__file__), "results", "longer_pilot_headroom")
# Where each regime's default Copilot records are: the pretrained T5 table, and the canonical one from scratch.
QUALITY_RECORDS = {
    "pretrained_t5": os.path.join(os.path.dirname(__file__), "results", "pretrained_t5", "quality.json"),
    "scratch_t5": os.path.join(os.path.dirname(__file__), "results", "quality.json"),
    "scratch": os.path.join(os.path.dirname(__file__), "results", "quality.json"),
}


@torch.no_grad()
def answer_distributions(experiment: Experiment, model) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's next-token distributions [positions, V] at the target positions of the validation prompts
    (labels not -100), and the targets [positions]. An encoder-decoder's logits align with its labels; a causal
    LM's logits at j predict the label at j + 1, the positions of `eval_copilot_r2`."""
    model.eval()
    dataset = experiment.tokenize(experiment.validation, experiment.tokenizer)
    probs, targets = [], []
    for start in range(0, len(dataset), 50):
        batch = experiment.collator([dataset[i] for i in range(start, min(start + 50, len(dataset)))])
        logits, labels = model(**batch).logits.float(), batch["labels"]
        if not model.config.is_encoder_decoder:
            logits, labels = logits[:, :-1], labels[:, 1:]
        mask = labels != -100
        probs.append(torch.softmax(logits, -1)[mask])
        targets.append(labels[mask])
    return torch.cat(probs), torch.cat(targets)


def measure(regime: str, setting, seed: int, eval_size: int, multiple: int, family) -> dict:
    """The Pilot and the Pilot fine-tuned `multiple` times as long (same data and seed): test exact match,
    statistics at the answer positions, and the R^2 of f = q_longer - p against the Pilot's error."""
    runs = {}
    for name, run_setting in (("pilot", setting), ("longer", trained_longer(setting, multiple))):
        experiment = Experiment(regime, run_setting, seed, eval_size, family)
        model, seconds, _ = experiment.fine_tune(experiment.pilot(), with_copilot=False)
        probs, targets = answer_distributions(experiment, model)
        runs[name] = {
            "epochs": run_setting.epochs,
            "train_seconds": round(seconds, 1),
            "test_accuracy": experiment.accuracy(model, experiment.test),
            "probs": probs,
            "targets": targets,
        }
        print(f"{setting.name} {name}: test exact match {runs[name]['test_accuracy']:.4f}", flush=True)
    if not torch.equal(runs["pilot"]["targets"], runs["longer"]["targets"]):
        raise RuntimeError("the two Pilots were scored on different answer positions")
    targets, pilot = runs["pilot"]["targets"], runs["pilot"]["probs"]
    error, direction = errors_of(pilot, targets), runs["longer"]["probs"] - pilot
    return {
        "regime": regime,
        "task": setting.name,
        "seed": seed,
        "multiple": multiple,
        "models": {
            name: {
                **{key: run[key] for key in ("epochs", "train_seconds", "test_accuracy")},
                **distribution_stats(run["probs"], run["targets"]),
            }
            for name, run in runs.items()
        },
        "headroom_r2": r2(direction, error),
        "headroom_r2_best_scale": scaled_r2(direction, error),
    }


def default_copilot_r2(regime: str, task: str, seed: int) -> dict | None:
    """The default Copilot's record on the same regime, task and seed (`QUALITY_RECORDS`), with its Pilot's test
    exact match: equal to this run's Pilot where the family build and the machine round alike."""
    records = json.load(open(QUALITY_RECORDS[regime]))["records"]
    by_arm = {
        r["arm"]: r
        for r in records
        if (r["regime"], r["task"], r["seed"]) == (regime, task, seed) and r.get("feedback") != "copilot"
    }
    if "pilot_copilot" not in by_arm:
        return None
    copilot = by_arm["pilot_copilot"]
    return {
        "copilot_r2": copilot["copilot_r2"],
        "copilot_r2_train": copilot.get("copilot_r2_train"),
        "test_accuracy": copilot["test_accuracy"],
        "pilot_accuracy": copilot["pilot_accuracy"],
    }


def markdown(payload: dict) -> str:
    lines = [
        "# Headroom of the T5 Pilots and the LLaMA Pilots trained from scratch",
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in payload["commands"]) + ".  ",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in payload["machine"].items()) + ".",
        "",
        "Teacher forced at the answer positions of the validation prompts. Headroom R^2 = 1 - Brier(longer) / "
        "Brier(Pilot): the held-out R^2 of a Copilot that turned the Pilot into the Pilot fine-tuned longer. The "
        "default Copilot's held-out R^2 and exact match are its record in "
        "[pretrained_t5/quality.json](../pretrained_t5/quality.json) or, from scratch, "
        "[quality.json](../quality.json) (same regime, task and seed; its Pilot's exact match in brackets: where it "
        "equals this run's Pilot, the Pilots are the same).",
        "",
        "| regime | task | seed | Pilot: epochs, test exact match, Brier | fine-tuned longer: epochs, test exact match, "
        "Brier | headroom R^2 (best scale) | default Copilot: held-out R^2, test exact match (its Pilot) |",
        "| --- | --- | ---: | --- | --- | ---: | --- |",
    ]
    for task in payload["tasks"]:
        pilot, longer, copilot = (
            task["models"]["pilot"],
            task["models"]["longer"],
            task.get("default_copilot"),
        )
        copilot_cell = (
            f"{copilot['copilot_r2']:.3f}, {copilot['test_accuracy']:.4f} ({copilot['pilot_accuracy']:.4f})"
            if copilot
            else "-"
        )
        lines.append(
            f"| {task.get('regime', 'pretrained_t5')} | {task['task']} | {task['seed']} | {pilot['epochs']:g}, {pilot['test_accuracy']:.4f}, "
            f"{pilot['brier']:.4f} | {longer['epochs']:g}, {longer['test_accuracy']:.4f}, {longer['brier']:.4f} | "
            f"{task['headroom_r2']:.3f} ({task['headroom_r2_best_scale']:.3f}) | {copilot_cell} |"
        )
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = payload["tasks"]
    labels = [f"{t.get('regime', 'pretrained_t5')}\n{t['task']} (seed {t['seed']})" for t in tasks]
    positions = range(len(tasks))
    fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(tasks), 3.6))
    ax.bar([p - 0.2 for p in positions], [t["headroom_r2"] for t in tasks], 0.4, label="headroom R^2")
    copilot = [t["default_copilot"]["copilot_r2"] if t.get("default_copilot") else 0.0 for t in tasks]
    ax.bar([p + 0.2 for p in positions], copilot, 0.4, label="default Copilot, held-out R^2")
    ax.axhline(0.3, color="grey", linestyle=":", label="issue target 0.3")
    ax.set_xticks(list(positions), labels)
    ax.set_ylabel("R^2 at answer positions")
    ax.set_title("The headroom of 3x fine-tuning vs the Copilot", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(payload: dict, output: str) -> None:
    write_json_and_markdown(output, "longer_pilot_headroom", payload, markdown(payload))
    plot(payload, os.path.join(output, "longer_pilot_headroom.png"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--regime", choices=list(QUALITY_RECORDS), default="pretrained_t5")
    parser.add_argument("--tasks", nargs="+", help="default: every setting of the regime")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-size", type=int, default=400)
    parser.add_argument("--multiple", type=int, default=3, help="the longer Pilot's epochs, x the setting's")
    parser.add_argument("--output", default=RESULTS)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 200 examples, 0.5 epochs, 40 prompts"
    )
    parser.add_argument("--from-records", nargs="+", help="merge earlier longer_pilot_headroom.json files")
    args = parser.parse_args()
    command = single_thread_run("longer_pilot_headroom.py")
    if args.from_records:
        merged = [json.load(open(path)) for path in args.from_records]
        payload = {
            "commands": merged_commands(merged, command),
            "machine": merged[0]["machine"],
            "tasks": [t for m in merged for t in m["tasks"]],
        }
        write(payload, args.output)
        return
    known = {setting.name for setting in SETTINGS[args.regime]}
    args.tasks = args.tasks or sorted(known)
    if set(args.tasks) - known:
        parser.error(f"unknown --tasks {sorted(set(args.tasks) - known)}: choose from {sorted(known)}")
    family = None
    if args.regime == "pretrained_t5":
        from t5_family import load_t5_family

        family = load_t5_family()
    payload = {"commands": [command], "machine": machine_info(), "tasks": []}
    for setting in SETTINGS[args.regime]:
        if setting.name not in args.tasks:
            continue
        eval_size = args.eval_size
        if args.quick:
            setting, eval_size = dataclasses.replace(setting, train_size=200, epochs=0.5), 40
        task = measure(args.regime, setting, args.seed, eval_size, args.multiple, family)
        task["default_copilot"] = (
            None if args.quick else default_copilot_r2(args.regime, setting.name, args.seed)
        )
        payload["tasks"].append(task)
        write(payload, args.output)


if __name__ == "__main__":
    main()
