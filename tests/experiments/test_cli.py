"""The `hf-copilot` command: train saves a loadable model, a results file and a plot; evaluate reads it back."""

import json
import random
import shutil

import pytest
from conftest import build_pilot, char_tokenizer
from transformers import AutoModelForCausalLM

from hf_copilot import PilotCopilotForCausalLM
from hf_copilot.experiments.cli import build_parser, build_task, evaluate_command, main, train_command
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
    # No validation gain reaches 2: every mode keeps the Pilot alone.
    cautious = evaluate_command(build_parser().parse_args([*argv, "--min-gain", "2"]))
    for fused in cautious["fused"].values():
        assert fused["best_lambda"] == 0.0
        assert fused["test_accuracy"] == results["pilot_test_accuracy"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--min-gain", "-0.1"], "must be >= 0"),
        (["--min-gain", "nan"], "must be >= 0 and finite"),
        (["--lambdas", "1", "2"], "include 0"),
    ],
)
def test_a_margin_that_cannot_apply_is_refused_before_training(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--output-dir", str(tmp_path / "run"), "--min-gain", "0.03", *options])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_benchmark_task_reads_a_folder_of_split_files(tmp_path):
    shutil.copy(f"{FIXTURES}/gsm8k_train.jsonl", tmp_path / "train.jsonl")
    shutil.copy(f"{FIXTURES}/gsm8k_test.jsonl", tmp_path / "test.jsonl")
    task = build_task("gsm8k", str(tmp_path))
    assert isinstance(task, BenchmarkTask)
    assert set(task.data_files) == {"train", "test"}
    assert task.examples("test")


def write_gsm8k_folder(folder, sizes=(("train", 24), ("test", 6))):
    """GSM8K's own layout (openai/gsm8k, grade-school-math): train.jsonl and test.jsonl, no validation."""
    folder.mkdir()
    rng = random.Random(0)
    for split, size in sizes:
        with open(folder / f"{split}.jsonl", "w") as handle:
            for _ in range(size):
                a, b = rng.randint(10, 99), rng.randint(10, 99)
                question = f"Ann has {a} pens and gets {b} more How many"  # within 64 positions
                answer = f"She has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} pens\n#### {a + b}"
                handle.write(json.dumps({"question": question, "answer": answer}) + "\n")
    return folder


def test_gsm8k_trains_and_evaluates_from_its_own_train_and_test_files(tmp_path, capsys):
    """Without a validation file, --eval-size training examples are held out to choose lambda on."""
    data = write_gsm8k_folder(tmp_path / "gsm8k")
    pilot = tmp_path / "pilot"
    build_pilot("llama").save_pretrained(pilot)
    char_tokenizer().save_pretrained(pilot)
    common = ["--task", "gsm8k", "--dataset", str(data), "--eval-size", "4", "--batch-size", "8"]
    common += ["--lambdas", "0", "1"]
    train = ["train", "--pilot", str(pilot), "--epochs", "1", "--output-dir", str(tmp_path / "run")]
    summary = train_command(build_parser().parse_args([*train, *common]))
    assert (
        f"{data} has no validation split: 4 training examples are held out as one." in capsys.readouterr().out
    )
    for fused in summary["fused"].values():
        assert set(fused["validation_sweep"]) == {0.0, 1.0}
    evaluated = evaluate_command(
        build_parser().parse_args(["evaluate", "--model", summary["model_dir"], *common])
    )
    assert evaluated["pilot_test_accuracy"] == summary["pilot_test_accuracy"]
    assert evaluated["fused"] == summary["fused"]  # the same validation examples in both commands


def test_train_starts_the_copilot_from_a_pretrained_decoder(tmp_path):
    """--copilot-init: the Copilot takes the decoder's shape and rotary base (copilot_init copies its weights, tested
    in test_modeling), and the model trains and saves as any other."""
    data = write_gsm8k_folder(tmp_path / "gsm8k")
    pilot, decoder = tmp_path / "pilot", tmp_path / "decoder"
    build_pilot("llama").save_pretrained(pilot)
    char_tokenizer().save_pretrained(pilot)
    build_pilot("llama", seed=1, hidden_size=48, rope_theta=123456.0).save_pretrained(decoder)
    argv = ["train", "--pilot", str(pilot), "--copilot-init", str(decoder), "--epochs", "0.5"]
    argv += ["--task", "gsm8k", "--dataset", str(data), "--eval-size", "4", "--batch-size", "8"]
    summary = train_command(build_parser().parse_args([*argv, "--output-dir", str(tmp_path / "run")]))
    copilot = AutoModelForCausalLM.from_pretrained(summary["model_dir"]).copilot.config
    assert (copilot.hidden_size, copilot.rotary_base) == (48, 123456.0)


@pytest.mark.parametrize("option", ["--copilot-hidden-size", "--copilot-layers", "--copilot-heads"])
def test_a_copilot_shape_with_copilot_init_is_refused_before_training(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--output-dir", str(tmp_path / "run"), "--copilot-init", "some/decoder", option, "64"])
    assert exit_info.value.code == 2
    assert (
        "--copilot-init shapes the Copilot like the decoder it copies: leave out" in capsys.readouterr().err
    )
    assert not (tmp_path / "run").exists()


def test_bad_task_and_dataset_combinations_say_what_to_pass(tmp_path):
    with pytest.raises(SystemExit, match="needs --dataset"):
        build_task("gsm8k", None)
    with pytest.raises(SystemExit, match="applies to the benchmarks"):
        build_task("arithmetic", str(tmp_path))
    with pytest.raises(SystemExit, match="no train/validation/test"):
        build_task("gsm8k", str(tmp_path))
    with pytest.raises(SystemExit, match="--dataset-config applies to Hub datasets"):
        build_task("gsm8k", str(tmp_path), dataset_config="main")
