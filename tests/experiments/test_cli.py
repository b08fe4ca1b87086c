"""The `hf-copilot` command: train saves a loadable model, a results file and a plot; evaluate reads it back."""

import json
import shutil

import pytest
from transformers import AutoModelForCausalLM

from hf_copilot import PilotCopilotForCausalLM
from hf_copilot.experiments.cli import build_parser, build_task, evaluate_command, main
from hf_copilot.experiments.tasks import BenchmarkTask

FIXTURES = "tests/experiments/fixtures/benchmarks"
TINY_RUN = [
    "--train-size",
    "64",
    "--eval-size",
    "12",
    "--epochs",
    "0.5",
    "--batch-size",
    "16",
    "--lambdas",
    "0",
    "1",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output = tmp_path_factory.mktemp("cli") / "run"
    main(["train", "--output-dir", str(output), *TINY_RUN])
    return output


def test_train_writes_results_plot_and_a_loadable_model(trained):
    results = json.loads((trained / "results.json").read_text())
    assert set(results["fused"]) == {"copilot", "observed"}
    for fused in results["fused"].values():
        assert set(fused["validation_sweep"]) == {"0.0", "1.0"}
        assert fused["best_lambda"] in (0.0, 1.0)
        assert fused["validation_accuracy"] == fused["validation_sweep"][str(fused["best_lambda"])]
    assert 0.0 <= results["pilot_test_accuracy"] <= 1.0
    assert (trained / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = AutoModelForCausalLM.from_pretrained(results["model_dir"])
    assert isinstance(model, PilotCopilotForCausalLM)
    chosen = results["fused"][model.config.copilot_feedback]
    assert model.config.copilot_lambda == chosen["best_lambda"]
    assert chosen["validation_accuracy"] == max(f["validation_accuracy"] for f in results["fused"].values())


def test_evaluate_reproduces_the_training_run_accuracies(trained, capsys):
    results = json.loads((trained / "results.json").read_text())
    capsys.readouterr()
    argv = ["evaluate", "--model", results["model_dir"], *TINY_RUN[2:4], "--lambdas", "0", "1"]
    summary = evaluate_command(build_parser().parse_args(argv))
    assert summary["pilot_test_accuracy"] == results["pilot_test_accuracy"]
    assert json.loads(json.dumps(summary["fused"])) == results["fused"]
    out = capsys.readouterr().out
    assert "| Pilot alone (lambda = 0) |" in out
    assert "feedback=observed" in out


def test_benchmark_task_reads_a_folder_of_split_files(tmp_path):
    shutil.copy(f"{FIXTURES}/gsm8k_train.jsonl", tmp_path / "train.jsonl")
    shutil.copy(f"{FIXTURES}/gsm8k_test.jsonl", tmp_path / "test.jsonl")
    task = build_task("gsm8k", str(tmp_path))
    assert isinstance(task, BenchmarkTask)
    assert set(task.data_files) == {"train", "test"}
    assert task.examples("test")


def test_bad_task_and_dataset_combinations_say_what_to_pass(tmp_path):
    with pytest.raises(SystemExit, match="needs --dataset"):
        build_task("gsm8k", None)
    with pytest.raises(SystemExit, match="applies to the benchmarks"):
        build_task("arithmetic", str(tmp_path))
    with pytest.raises(SystemExit, match="no train/validation/test"):
        build_task("gsm8k", str(tmp_path))
