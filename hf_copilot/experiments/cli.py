"""`hf-copilot`: the demo (the README's main job), training and evaluation from the command line.

Every command takes `--pilot <path or Hub id>` (default: a small LLaMA built from a config) and
`--task <name>` with `--dataset <folder or Hub id>` for the paper's benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence

import torch

from ..configuration_pilot_copilot import COPILOT_FEEDBACK_MODES, CopilotConfig
from ..modeling_pilot_copilot import PilotCopilotForCausalLM
from .evaluation import DEFAULT_LAMBDAS, check_min_gain
from .plots import plot_training_and_sweep
from .recipes import (
    PilotShape,
    TrainingRecipe,
    evaluate_pilot_copilot,
    load_pilot,
    task_tokenizer,
    train_arm,
)
from .tasks import BENCHMARKS, TASKS, BenchmarkTask, Task, get_task

DEMO_TASK = {"name": "sorting", "length": 8}
# The sorting setting of benchmarks/quality.py (scratch regime): alone, this Pilot sorts about half the
# test prompts right.
DEMO_PILOT = PilotShape(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)


def build_task(
    name: str, dataset: str | None, dataset_config: str | None = None, validation_size: int = 0
) -> Task:
    """An offline task, or one of the paper's benchmarks read from a folder of split files or the Hub.

    A benchmark without a validation split (GSM8K has train and test) gets one of `validation_size`
    training examples, the same ones in every command, and trains without them.
    """
    if name in BENCHMARKS:
        if dataset is None:
            raise SystemExit(
                f"--task {name} needs --dataset: a folder with train/validation/test files or a Hub id."
            )
        if os.path.isdir(dataset):
            if dataset_config is not None:
                raise SystemExit("--dataset-config applies to Hub datasets, not to a local folder.")
            files = {
                split: os.path.join(dataset, file)
                for file in sorted(os.listdir(dataset))
                for split in ("train", "validation", "test")
                if file.split(".")[0] == split
            }
            if not files:
                raise SystemExit(f"{dataset} holds no train/validation/test .json/.jsonl files.")
            task = BenchmarkTask(name, data_files=files, validation_from_train=validation_size)
        else:
            task = BenchmarkTask(
                name, hub_id=dataset, hub_config=dataset_config, validation_from_train=validation_size
            )
        if task.validation_is_held_out():
            print(
                f"{dataset} has no validation split: {validation_size} training examples are held out as one."
            )
        return task
    if dataset is not None:
        raise SystemExit(
            f"--dataset applies to the benchmarks ({', '.join(sorted(BENCHMARKS))}), not to {name}."
        )
    options = {k: v for k, v in DEMO_TASK.items() if k != "name"} if name == DEMO_TASK["name"] else {}
    return get_task(name, **options)


# The Copilot of `hf-copilot train` and `demo` unless the command line says otherwise: small enough for a CPU.
COPILOT_SHAPE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
# The command line's shape options and the CopilotConfig fields they set.
SHAPE_OPTIONS = {
    "copilot_hidden_size": "hidden_size",
    "copilot_layers": "num_hidden_layers",
    "copilot_heads": "num_attention_heads",
}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task", default=DEMO_TASK["name"], choices=sorted(TASKS), help="task to train/evaluate on"
    )
    parser.add_argument("--dataset", help="for benchmark tasks: a folder of split files, or a Hub dataset id")
    parser.add_argument("--dataset-config", help="the Hub dataset's config name (e.g. main for openai/gsm8k)")
    parser.add_argument("--pilot", help="Pilot path or Hub id (default: a small LLaMA built from a config)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument(
        "--eval-size",
        type=int,
        default=400,
        help="validation and test examples; a benchmark without a validation split holds out this many "
        "training examples (use the same value for train and evaluate)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(DEFAULT_LAMBDAS))
    parser.add_argument(
        "--min-gain",
        type=float,
        default=0.0,
        help="choose a lambda other than 0 only where its validation accuracy beats the Pilot's by at least this "
        "much (e.g. 0.03); 0 takes the best however small its margin",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-copilot", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("demo", "train a small Pilot + Copilot on sorting 8 digits and print Pilot vs fused accuracy"),
        ("train", "fine-tune a Pilot with a Copilot (CopilotTrainer) and save the model"),
    ):
        command = commands.add_parser(name, help=help_text)
        add_common_arguments(command)
        command.add_argument("--output-dir", default=os.path.join("outputs", name))
        command.add_argument("--epochs", type=float, default=2.0)
        command.add_argument("--learning-rate", type=float, default=3e-3)
        command.add_argument("--copilot-learning-rate", type=float)
        command.add_argument(
            "--copilot-hidden-size", type=int, help=f"default {COPILOT_SHAPE['hidden_size']}"
        )
        command.add_argument(
            "--copilot-layers", type=int, help=f"default {COPILOT_SHAPE['num_hidden_layers']}"
        )
        command.add_argument(
            "--copilot-heads", type=int, help=f"default {COPILOT_SHAPE['num_attention_heads']}"
        )
        command.add_argument(
            "--copilot-init",
            help="path or Hub id of a pretrained LLaMA/Qwen2/Qwen3/Mistral decoder with the Pilot's vocabulary: the "
            "Copilot takes its shape and starts from its weights (copilot_init), as the paper's T-Copilot-1B starts "
            "from LLaMA-3.2-1B",
        )
        command.add_argument("--freeze-pilot", action="store_true", help="train only the Copilot")
        command.add_argument(
            "--copilot-final-epochs",
            type=float,
            help="then train the Copilot alone on the final Pilot for this many epochs (0: not at all; default: "
            "CopilotTrainingArguments' own)",
        )
    evaluate = commands.add_parser("evaluate", help="evaluate a saved Pilot + Copilot: Pilot alone vs fused")
    add_common_arguments(evaluate)
    evaluate.add_argument("--model", required=True, help="a saved PilotCopilotForCausalLM (folder or Hub id)")
    return parser


def examples_for(task: Task, args: argparse.Namespace, split: str, n: int):
    if isinstance(task, BenchmarkTask):
        examples = task.examples(split)
        return examples[:n] if split != "train" else examples
    return task.examples(split, n, seed=args.seed)


def train_command(args: argparse.Namespace) -> dict:
    """Fine-tune Pilot + Copilot, pick lambda on validation, report test accuracy, save everything."""
    torch.manual_seed(args.seed)
    task = build_task(args.task, args.dataset, args.dataset_config, args.eval_size)
    train = examples_for(task, args, "train", args.train_size)
    if args.pilot:
        pilot, tokenizer = load_pilot(args.pilot)
    else:
        tokenizer = task_tokenizer(task, seed=args.seed)
        pilot = DEMO_PILOT.build(tokenizer, args.seed)
        torch.set_num_threads(1)  # a model this small runs fastest on one thread
    copilot_config = None if args.copilot_init else CopilotConfig(**(COPILOT_SHAPE | shape_given(args)))
    recipe = TrainingRecipe(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        copilot_learning_rate=args.copilot_learning_rate,
        seed=args.seed,
        logging_steps=10,
        freeze_pilot=args.freeze_pilot,
        extra={}
        if args.copilot_final_epochs is None
        else {"copilot_final_epochs": args.copilot_final_epochs},
    )
    started = time.time()
    model, history = train_arm(
        "pilot_copilot",
        pilot,
        tokenizer,
        train,
        recipe,
        args.output_dir,
        copilot_config,
        copilot_init=args.copilot_init,
    )
    summary = evaluate_both_feedback_modes(model, tokenizer, task, args)
    summary["train_seconds"] = round(time.time() - started, 1)
    best = max(summary["fused"], key=lambda mode: summary["fused"][mode]["validation_accuracy"])
    model.config.copilot_feedback = best
    model.config.copilot_lambda = summary["fused"][best]["best_lambda"]
    summary["model_dir"] = os.path.join(args.output_dir, "model")
    model.save_pretrained(summary["model_dir"])
    tokenizer.save_pretrained(summary["model_dir"])
    with open(os.path.join(args.output_dir, "results.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    sweeps = {mode: result["validation_sweep"] for mode, result in summary["fused"].items()}
    plot_training_and_sweep(history, sweeps, os.path.join(args.output_dir, "training.png"))
    print_table(summary)
    return summary


def evaluate_command(args: argparse.Namespace) -> dict:
    task = build_task(args.task, args.dataset, args.dataset_config, args.eval_size)
    model, tokenizer = load_pilot(args.model)
    if not isinstance(model, PilotCopilotForCausalLM):
        raise SystemExit(f"{args.model} is not a Pilot + Copilot model ({type(model).__name__}).")
    summary = evaluate_both_feedback_modes(model, tokenizer, task, args)
    print_table(summary)
    return summary


def evaluate_both_feedback_modes(model, tokenizer, task: Task, args: argparse.Namespace) -> dict:
    """Pilot alone vs fused, lambda chosen on validation, for the paper's and the observed feedback."""
    validation = examples_for(task, args, "validation", args.eval_size)
    test = examples_for(task, args, "test", args.eval_size)
    summary = {
        "task": args.task,
        "pilot_parameters": model.pilot.num_parameters(),
        "copilot_parameters": model.copilot.num_parameters(),
        "fused": {},
    }
    for mode in COPILOT_FEEDBACK_MODES:
        result = evaluate_pilot_copilot(
            model,
            tokenizer,
            task,
            validation,
            test,
            args.lambdas,
            args.batch_size,
            min_gain=args.min_gain,
            copilot_feedback=mode,
        )
        summary["pilot_test_accuracy"] = result.pilot_accuracy
        summary["fused"][mode] = {
            "best_lambda": result.best_lambda,
            "validation_accuracy": result.validation_sweep[result.best_lambda],
            "validation_sweep": result.validation_sweep,
            "test_accuracy": result.fused_accuracy,
        }
    return summary


def print_table(summary: dict) -> None:
    pilot = summary["pilot_test_accuracy"]
    total = summary["pilot_parameters"] + summary["copilot_parameters"]
    print(f"\nTask: {summary['task']} (test accuracy; lambda chosen on validation)")
    print("| model | parameters | test accuracy | relative lift |\n| --- | ---: | ---: | ---: |")
    print(f"| Pilot alone (lambda = 0) | {summary['pilot_parameters']:,} | {pilot:.3f} | |")
    for mode, result in summary["fused"].items():
        lift = f"{100 * (result['test_accuracy'] - pilot) / pilot:+.1f}%" if pilot else "n/a"
        label = f"Pilot + Copilot, feedback={mode}, lambda={result['best_lambda']:g}"
        print(f"| {label} | {total:,} | {result['test_accuracy']:.3f} | {lift} |")


def shape_given(args: argparse.Namespace) -> dict:
    """The Copilot shape the command line set, as CopilotConfig fields (argparse leaves the options not given None)."""
    return {
        field: getattr(args, option)
        for option, field in SHAPE_OPTIONS.items()
        if getattr(args, option) is not None
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # before any training: a run must not end on an argument it could have refused up front
        check_min_gain(args.lambdas, args.min_gain)
    except ValueError as error:
        parser.error(f"--min-gain: {error}")
    if getattr(args, "copilot_init", None) and shape_given(args):
        parser.error(
            "--copilot-init shapes the Copilot like the decoder it copies: leave out --copilot-hidden-size, "
            "--copilot-layers and --copilot-heads, or leave out --copilot-init for a Copilot of that shape."
        )
    if args.command == "evaluate":
        evaluate_command(args)
    else:
        train_command(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
