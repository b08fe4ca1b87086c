"""How large are the Pilot's states that the Copilot's memory reads? (the reason for CopilotConfig.memory_norm)

The Copilot cross-attends to x_tilde (the Pilot's input embeddings, which say which token was just emitted) and
h_bar (the mean of its layer outputs), both through one projection. This measures their RMS, exactly as a Mistake
Log entry builds them, for the base member of the benchmarks' model family on the training prompts and answers of
each pretrained downstream setting of benchmarks/quality.py (non-padding positions).

    python benchmarks/pilot_state_scales.py   # writes benchmarks/results/pilot_state_scales.{json,md}

Needs the model family of benchmarks/model_family.py (cached; built on first use). Under a minute on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_copilot.experiments.data import DataCollatorForCompletion, tokenize_examples
from hf_copilot.experiments.tasks import get_task
from hf_copilot.mistake_log_entry import mistake_log_entry_from_pilot_pass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_family import load_family  # noqa: E402
from quality import SETTINGS  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@torch.no_grad()
def state_scales(pilot, tokenizer, examples, batch_size: int = 50) -> dict[str, float]:
    """RMS of x_tilde and h_bar over the non-padding positions of `examples`, as the Mistake Log records them."""
    collator = DataCollatorForCompletion(tokenizer)
    rows = tokenize_examples(examples, tokenizer)
    sums = {"x_tilde": 0.0, "h_bar": 0.0}
    count = 0
    for start in range(0, len(rows), batch_size):
        batch = collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        out = pilot(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
        entry = mistake_log_entry_from_pilot_pass(
            batch["input_ids"], batch["attention_mask"], batch["labels"], out.logits, out.hidden_states
        )
        real = entry.attention_mask.bool()
        for name in sums:
            sums[name] += getattr(entry, name)[real].pow(2).mean(-1).sum().item()
        count += int(real.sum())
    return {name: (total / count) ** 0.5 for name, total in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=500, help="training examples per setting")
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    family = load_family()
    tokenizer = AutoTokenizer.from_pretrained(family.tokenizer_path)
    tokenizer.padding_side = "left"
    pilot = AutoModelForCausalLM.from_pretrained(family.members["base"]).eval()
    rows = []
    for setting in SETTINGS["pretrained"]:
        task = get_task(setting.task, **setting.options)
        scales = state_scales(pilot, tokenizer, task.examples("train", args.examples, seed=0))
        rows.append({"setting": setting.name, **scales, "ratio": scales["h_bar"] / scales["x_tilde"]})
        print(rows[-1], flush=True)
    result = {
        "command": "python benchmarks/pilot_state_scales.py " + " ".join(sys.argv[1:]),
        "family": os.path.basename(family.path),
        "pilot": "base",
        "examples_per_setting": args.examples,
        "rows": rows,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "pilot_state_scales.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    lines = [
        "# The Pilot's states in the Copilot's memory: their scales",
        "",
        f"Command: `{result['command'].strip()}`",
        "",
        f"The base member of the model family ({os.path.basename(family.path)}), before fine-tuning, on {args.examples} "
        "training examples (prompt and answer) of each pretrained setting of benchmarks/quality.py; RMS over "
        "non-padding positions of x_tilde (input embeddings) and h_bar (mean of the layer outputs), as a Mistake "
        "Log entry holds them. Without `memory_norm` both enter the Copilot's memory through one projection.",
        "",
        "| setting | RMS x_tilde | RMS h_bar | h_bar / x_tilde |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {r['setting']} | {r['x_tilde']:.3f} | {r['h_bar']:.3f} | {r['ratio']:.1f} |" for r in rows),
        "",
    ]
    with open(os.path.join(args.output, "pilot_state_scales.md"), "w") as handle:
        handle.write("\n".join(lines))


if __name__ == "__main__":
    main()
