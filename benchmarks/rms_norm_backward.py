"""The Copilot's RMS norms with their backward written out, against LLaMA's operators through autograd: paired.

`CopilotRMSNorm` trains in fp32 through `_RMSNormFunction`: the forward's operators unchanged, a backward of 11
operators where autograd's dispatches 19. A Copilot has up to four norms a layer (the default query and key norms
among them), one on the memory and a final one, on small tensors where each operator's fixed cost counts. This
times the Copilot's part of a training pass (its stream from the entry, its forward, the default head's loss, the
backward: what `CopilotTrainer` adds to the Pilot's pass at model level) with the package's norm and with the same
forward recorded by autograd, the arms alternating in every round, in one process; and counts the operators each
arm's backward dispatches. Shapes: the training table's tiny Pilot (hidden 64, vocabulary 48, batch 64 x 40) and
its benchmark Pilot (58M, vocabulary 32k, batch 4 x 256), the Copilots of `training_overhead.py` at each ratio.

    python benchmarks/rms_norm_backward.py   # ~2 minutes; writes benchmarks/results/rms_norm_backward/
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import machine_info, single_thread_run, write_json_and_markdown  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from training_overhead import TINY, Setup, copilot_for_ratio, pilot_config, synthetic_dataset  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from hf_copilot import PilotCopilotForCausalLM  # noqa: E402
from hf_copilot.generation_pilot_copilot import copilot_loss_terms_on_entry  # noqa: E402
from hf_copilot.mistake_log_entry import mistake_log_entry_from_pilot_pass, shift_right  # noqa: E402
from hf_copilot.modeling_copilot import CopilotRMSNorm  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results", "rms_norm_backward")
ARMS = ("autograd", "written out")
# (shape, Copilot parameter ratio, rounds): one pass at the tiny shape takes ~15 ms, at the benchmark shape 0.4-3 s
CASES = (("tiny", 0.1, 300), ("tiny", 0.25, 200), ("benchmark", 0.1, 30), ("benchmark", 1.0, 8))
QUICK_CASES = (("tiny", 0.1, 20),)


class OperatorCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def copilot_pass(copilot, entry, count_backward: bool = False) -> tuple[float, int | None]:
    """(CPU s, operators in the backward if counted) of the Copilot's part of a training pass."""
    start = time.process_time()
    stream = shift_right(copilot.embed_errors(entry.errors))
    _, terms = copilot_loss_terms_on_entry(copilot, stream, entry)
    loss = terms.objective / terms.num_tokens
    operators = None
    if count_backward:
        with OperatorCount() as counted:
            loss.backward()
        operators = counted.count
    else:
        loss.backward()
    seconds = time.process_time() - start
    copilot.zero_grad(set_to_none=True)
    return seconds, operators


def measure(shape: str, ratio: float, rounds: int) -> dict:
    setup = TINY if shape == "tiny" else Setup()
    torch.manual_seed(0)
    pilot = LlamaForCausalLM(pilot_config(setup))
    config = copilot_for_ratio(ratio, setup, sum(p.numel() for p in pilot.parameters()))
    model = PilotCopilotForCausalLM.from_pilot(pilot, config).train()
    rows = synthetic_dataset(setup, 1, seed=321)
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    with torch.no_grad():
        out = pilot(**batch, output_hidden_states=True)
        entry = mistake_log_entry_from_pilot_pass(
            batch["input_ids"], batch["attention_mask"], batch["labels"], out.logits, out.hidden_states
        )
    del out
    written_out = CopilotRMSNorm.forward
    implementations = {"autograd": CopilotRMSNorm.through_autograd, "written out": written_out}
    seconds = {arm: [] for arm in ARMS}
    operators = {}
    try:
        for arm in ARMS:
            CopilotRMSNorm.forward = implementations[arm]
            operators[arm] = copilot_pass(model.copilot, entry, count_backward=True)[1]
        for round_index in range(rounds):
            for arm in ARMS if round_index % 2 == 0 else ARMS[::-1]:
                CopilotRMSNorm.forward = implementations[arm]
                seconds[arm].append(copilot_pass(model.copilot, entry)[0])
    finally:
        CopilotRMSNorm.forward = written_out
    differences = [a - b for a, b in zip(seconds["autograd"], seconds["written out"], strict=True)]
    norms = sum(isinstance(module, CopilotRMSNorm) for module in model.copilot.modules())
    return {
        "shape": shape,
        "pilot": f"hidden {setup.hidden_size}, {setup.num_hidden_layers} layers, vocabulary {setup.vocab_size}, "
        f"batch {setup.batch_size} x {setup.seq_len}",
        "ratio": ratio,
        "copilot": f"{config.num_hidden_layers} x {config.hidden_size}",
        "norms": norms,
        "rounds": rounds,
        "seconds": seconds,
        "median": {arm: statistics.median(seconds[arm]) for arm in ARMS},
        "saved_median": statistics.median(differences),
        "lower_in": sum(d > 0 for d in differences),
        "backward_operators": operators,
    }


def markdown(payload: dict) -> str:
    lines = [
        "# The Copilot's RMS norms: written-out backward against autograd's",
        "",
        f"Command: `{payload['command']}`",
        "",
        "The Copilot's part of a training pass (stream from the Mistake Log entry, forward, the default head's "
        "cross-entropy, backward), CPU time per pass, the two norms alternating (their order reversed every "
        "round) in one process after one pass each; medians, and the median of the per-round differences. "
        "Operators: what the pass's backward dispatches (a TorchDispatchMode count).",
        "",
        "| Pilot | Copilot (ratio) | norms | rounds | autograd, ms | written out, ms | saved, ms (paired) | lower in | "
        "backward operators, autograd -> written out |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case in payload["cases"]:
        median, ops = case["median"], case["backward_operators"]
        lines.append(
            f"| {case['pilot']} | {case['copilot']} ({case['ratio']}) | {case['norms']} | {case['rounds']} | "
            f"{1e3 * median['autograd']:.2f} | {1e3 * median['written out']:.2f} | "
            f"{1e3 * case['saved_median']:.2f} | {case['lower_in']} of {case['rounds']} | "
            f"{ops['autograd']} -> {ops['written out']} |"
        )
    lines += ["", "## Machine", "", *(f"- {key}: {value}" for key, value in payload["machine"].items()), ""]
    return "\n".join(lines)


def write_plot(path: str, payload: dict) -> None:
    cases = payload["cases"]
    figure, axes = plt.subplots(1, len(cases), figsize=(3.6 * len(cases), 3.6), squeeze=False)
    for axis, case in zip(axes[0], cases, strict=True):
        axis.boxplot([[1e3 * s for s in case["seconds"][arm]] for arm in ARMS], showfliers=False)
        axis.set_xticks([1, 2], ARMS)
        axis.set_title(f"{case['shape']} Pilot, Copilot {case['copilot']}", fontsize=9)
        axis.set_ylabel("CPU ms per Copilot pass")
    figure.suptitle("The Copilot's training pass: RMS norms through autograd vs written out", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny shape only, a few rounds")
    parser.add_argument("--output-dir", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    command = single_thread_run("rms_norm_backward.py")
    cases = []
    for shape, ratio, rounds in QUICK_CASES if args.quick else CASES:
        case = measure(shape, ratio, rounds)
        cases.append(case)
        print(
            f"{shape} Pilot, Copilot {case['copilot']}: autograd {1e3 * case['median']['autograd']:.2f} ms, "
            f"written out {1e3 * case['median']['written out']:.2f} ms, saved {1e3 * case['saved_median']:.2f} ms "
            f"(lower in {case['lower_in']} of {rounds}); backward operators {case['backward_operators']}"
        )
    payload = {"command": command, "cases": cases, "machine": machine_info()}
    write_json_and_markdown(args.output_dir, "rms_norm_backward", payload, markdown(payload))
    write_plot(os.path.join(args.output_dir, "rms_norm_backward.png"), payload)
    print(f"wrote {args.output_dir}/rms_norm_backward.json/.md/.png")
    return payload


if __name__ == "__main__":
    main()
