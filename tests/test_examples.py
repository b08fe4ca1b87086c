"""examples/: the stock fine-tuning script and its Copilot version, which differ only where the Copilot enters."""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
from pathlib import Path

import pytest

from hf_copilot import PilotCopilotForCausalLM

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def code_lines(name: str) -> list[str]:
    """The script without its module docstring."""
    text = (EXAMPLES / f"{name}.py").read_text()
    return text[text.index('"""', 3) + 3 :].splitlines()


def test_the_copilot_script_differs_from_the_stock_one_only_where_the_copilot_enters():
    diff = difflib.unified_diff(
        code_lines("stock_finetune"), code_lines("finetune_with_copilot"), lineterm="", n=0
    )
    changed = [line[1:] for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert changed, "the scripts are identical"
    for line in changed:
        # Model construction, class names, and the report of the Copilot's loss; brackets aside.
        assert re.fullmatch(r"[\s(),]*", line) or re.search(
            r"[Cc]opilot|pilot|Trainer|TrainingArguments", line
        ), line


def test_finetune_with_copilot_trains_on_local_data_and_the_copilot_loss_falls(tmp_path, capsys):
    pytest.importorskip("datasets")
    pilot = load_example("make_tiny_pilot").make_tiny_pilot(str(tmp_path / "pilot"))
    trainer = load_example("finetune_with_copilot").main(
        [
            "--pilot", pilot,
            "--output_dir", str(tmp_path / "run"),
            "--max_steps", "8",
            "--logging_steps", "2",
            "--per_device_train_batch_size", "8",
            "--learning_rate", "3e-3",
            "--save_strategy", "no",
            "--report_to", "none",
            "--disable_tqdm", "true",
            "--dataloader_pin_memory", "false",
        ]
    )  # fmt: skip
    copilot_loss = [entry["copilot_loss"] for entry in trainer.state.log_history if "copilot_loss" in entry]
    assert len(copilot_loss) == 4 and copilot_loss[-1] < copilot_loss[0]
    assert (
        f"copilot_loss: {copilot_loss[0]:.4f} (first logging step) -> {copilot_loss[-1]:.4f}"
        in capsys.readouterr().out
    )
    saved = PilotCopilotForCausalLM.from_pretrained(str(tmp_path / "run"))
    assert sum(p.numel() for p in saved.copilot.parameters()) == sum(
        p.numel() for p in trainer.model.copilot.parameters()
    )
