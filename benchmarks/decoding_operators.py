"""Operators a decoding step dispatches: Pilot-only generate() vs fused generate(), per new token, at batch 1.

On a CPU at batch 1 the Copilot's decoding step is bound by eager dispatch, not by its FLOPs (see
docs/results.md, "Overheads"): this counts what it dispatches, deterministically, where timing one run cannot
resolve a few operators. The generation benchmark's Pilot and its 2-layer Copilot nearest a parameter ratio of
0.1; greedy, the package's fusion defaults; under generate()'s own no_grad and under torch.inference_mode (as
generation_overhead.py times it), where composite operators (casts, dropout, linear) dispatch undecomposed. Every
aten operator is counted with a TorchDispatchMode, by name and by the line of hf_copilot (or of transformers'
generation code) that called it; per token = (count over 24 new tokens - count over 8) / 16, so the prefill
cancels.

    python benchmarks/decoding_operators.py     # ~1 minute; writes benchmarks/results/decoding_operators/
"""

from __future__ import annotations

import argparse
import collections
import os
import traceback

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import machine_info, single_thread_run, write_json_and_markdown  # noqa: E402
from generation_overhead import TARGET_RATIOS, Setup, copilot_for_ratio, pilot_config  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from hf_copilot import PilotCopilotForCausalLM  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "decoding_operators")
SHORT, LONG = 8, 24  # new tokens of the two runs whose difference is counted
SHOWN = 25  # rows of the markdown tables
PILOT_FORWARD = "the Pilot's forward (its modeling code)"
# generate()'s own grad mode, and the one benchmarks/generation_overhead.py times under
MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


class OperatorCount(TorchDispatchMode):
    """Counts every aten operator by name and by the innermost hf_copilot or transformers-generation line
    that called it (`caller_line`)."""

    def __init__(self):
        super().__init__()
        self.by_name: collections.Counter = collections.Counter()
        self.by_line: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_name[str(func.overloadpacket)] += 1
        self.by_line[caller_line()] += 1
        return func(*args, **(kwargs or {}))


def caller_line() -> str:
    """The innermost frame of the Pilot's modeling code (then `PILOT_FORWARD`), of hf_copilot or of transformers'
    generation code on the stack."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "transformers/models/" in frame.filename:
            return PILOT_FORWARD
        for package in ("hf_copilot/", "transformers/generation/"):
            if package in frame.filename:
                return f"{package}{frame.filename.split(package)[-1]}:{frame.lineno} `{frame.line}`"
    return "elsewhere"


def counts_per_token(model, prompt: torch.Tensor) -> tuple[dict, dict]:
    """Operators per new token (by name, by line): the difference of a long and a short greedy generation."""
    runs = []
    for new_tokens in (SHORT, LONG):
        with OperatorCount() as count:
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        runs.append(count)
    short, long = runs
    per_token = LONG - SHORT

    def difference(a: collections.Counter, b: collections.Counter) -> dict:
        return {key: (b[key] - a[key]) / per_token for key in b if b[key] != a[key]}

    return difference(short.by_name, long.by_name), difference(short.by_line, long.by_line)


def by_count(counts: dict) -> list[tuple[str, float]]:
    return sorted(((key, round(value, 2)) for key, value in counts.items() if value), key=lambda kv: -kv[1])


def markdown(payload: dict) -> str:
    modes = payload["modes"]
    header = "| " + " | ".join(modes) + " |"
    right = " ---: |" * len(modes)

    def table(first: str, key: str) -> list[str]:
        rows = dict.fromkeys(name for mode in modes.values() for name, _ in mode[key])
        values = [{name: count for name, count in mode[key]} for mode in modes.values()]
        shown = sorted(rows, key=lambda name: -max(v.get(name, 0) for v in values))[:SHOWN]
        return [
            f"| {first} {header}",
            "| --- |" + right,
            *(f"| {name} | " + " | ".join(f"{v.get(name, 0):g}" for v in values) + " |" for name in shown),
        ]

    lines = [
        "# Operators per decoding token: Pilot alone vs Pilot + Copilot",
        "",
        f"Command: `{payload['command']}`  ",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in payload["machine"].items()) + ".",
        "",
        f"Pilot: {payload['pilot']}. Copilot: {payload['copilot']}. Batch 1, greedy, prompt of "
        f"{payload['prompt_length']} tokens, the package's fusion defaults. aten operators dispatched per new token "
        f"(the count over {LONG} new tokens less the count over {SHORT}, over {LONG - SHORT}), counted with a "
        "TorchDispatchMode: deterministic, unlike a timing. Under generate()'s own no_grad, and under "
        "torch.inference_mode as benchmarks/generation_overhead.py times it, where composite operators (casts, "
        "dropout, linear) dispatch undecomposed.",
        "",
        "| " + header,
        "| --- |" + right,
        "| Pilot alone | " + " | ".join(f"{m['pilot']:g}" for m in modes.values()) + " |",
        "| Pilot + Copilot | " + " | ".join(f"{m['fused']:g}" for m in modes.values()) + " |",
        "| **the Copilot's share** | "
        + " | ".join(f"**{m['fused'] - m['pilot']:g}**" for m in modes.values())
        + " |",
        "",
        "## Extra operators by name (fused minus Pilot alone)",
        "",
        *table("operator", "extra_by_name"),
        "",
        "## Fused generation's operators by the line that called them",
        "",
        "The innermost line of the Pilot's modeling code (one row for all of it), of hf_copilot or of "
        "transformers' generation code on the stack.",
        "",
        *table("line", "fused_by_line"),
        "",
    ]
    return "\n".join(lines)


def write_plot(path: str, payload: dict) -> None:
    figure, axes = plt.subplots(1, len(payload["modes"]), figsize=(13, 6), sharex=True)
    for axis, (mode, counts) in zip(axes, payload["modes"].items(), strict=True):
        rows = [row for row in counts["fused_by_line"] if row[0] != PILOT_FORWARD][:15]
        labels = [line.split(" `")[0].split("/")[-1] for line, _ in rows][::-1]
        axis.barh(labels, [count for _, count in rows][::-1], color="tab:orange")
        axis.set_xlabel("aten operators per new token")
        axis.set_title(
            f"{mode}: {counts['fused'] - counts['pilot']:g} a token beyond the Pilot's {counts['pilot']:g}",
            fontsize=10,
        )
    figure.suptitle(
        "Fused decoding at batch 1: operators a token by calling line, the Pilot's forward left out",
        fontsize=11,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=RESULTS_DIR)
    args = parser.parse_args()
    command = single_thread_run("decoding_operators.py")
    setup = Setup()
    torch.manual_seed(0)
    pilot = LlamaForCausalLM(pilot_config(setup)).eval()
    pilot_params = sum(p.numel() for p in pilot.parameters())
    copilot_config = copilot_for_ratio(TARGET_RATIOS[0], setup, pilot_params, (2,))
    model = PilotCopilotForCausalLM.from_pilot(pilot, copilot_config).eval()
    prompt = torch.randint(3, setup.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    modes = {}
    for mode, context in MODES.items():
        with context():
            pilot_by_name, _ = counts_per_token(pilot, prompt)
            fused_by_name, fused_by_line = counts_per_token(model, prompt)
        extra = {name: fused_by_name.get(name, 0) - pilot_by_name.get(name, 0) for name in fused_by_name}
        modes[mode] = {
            "pilot": round(sum(pilot_by_name.values()), 2),
            "fused": round(sum(fused_by_name.values()), 2),
            "extra_by_name": by_count(extra),
            "fused_by_line": by_count(fused_by_line),
        }
    config = model.copilot.config
    payload = {
        "command": command,
        "machine": machine_info(),
        "pilot": f"LLaMA-like, hidden {setup.hidden_size}, {setup.num_hidden_layers} layers, vocabulary "
        f"{setup.vocab_size}",
        "copilot": f"{config.num_hidden_layers} x {config.hidden_size}, {config.num_attention_heads} heads, "
        f"qk_norm={config.qk_norm}, position_encoding={config.position_encoding!r}",
        "prompt_length": prompt.shape[1],
        "modes": modes,
    }
    write_json_and_markdown(args.output_dir, "decoding_operators", payload, markdown(payload))
    write_plot(os.path.join(args.output_dir, "decoding_operators.png"), payload)
    summary = "; ".join(f"{mode} {m['pilot']:g} -> {m['fused']:g}" for mode, m in modes.items())
    print(
        f"operators a token, Pilot -> fused: {summary}; wrote {args.output_dir}/decoding_operators.json/.md/.png"
    )


if __name__ == "__main__":
    main()
