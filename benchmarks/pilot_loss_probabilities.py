"""The Pilot's loss keeping the entry's probabilities, against the stock loss and a separate softmax: paired, per pass.

A training pass with labels needs the Pilot's cross-entropy (transformers' `ForCausalLMLoss`: a log-softmax, the NLL
loss, and in backward a zero-filled [B,T,V] gradient, a scatter and the log-softmax's backward) and the Mistake Log
entry's p = softmax of the same logits. `CausalLMLossKeepingProbabilities` computes the loss bit for bit and keeps p
as the exponential of its log-softmax, in place; its backward is one pass over p. This times one forward + backward
of Pilot + Copilot both ways on the training benchmark's Pilot (58M, V = 32k, batch 4 x 256, the 2 x 64 Copilot,
CPU training mode, so p lands in the reused buffer), alternating the arms in every round, and checks on the way that
the loss is the same and the Pilot's gradients the same to rounding. A third arm keeps p but writes the loss's
gradient into a new [B,T,V] tensor instead of the model's reused buffer (`pilot_gradient_buffer`), as every
stock backward does: the difference to the kept arm is what that buffer saves.

    python benchmarks/pilot_loss_probabilities.py   # ~8 minutes; writes benchmarks/results/pilot_loss_probabilities/
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import machine_info, single_thread_run, write_json_and_markdown  # noqa: E402
from training_overhead import QUICK, Setup, copilot_for_ratio, pilot_config, synthetic_dataset  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from hf_copilot import PilotCopilotForCausalLM  # noqa: E402
from hf_copilot import modeling_pilot_copilot as wrapper_module  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results", "pilot_loss_probabilities")
ARMS = ("stock loss + softmax", "loss keeping p, new gradient tensor", "loss keeping p")


@contextlib.contextmanager
def stock_loss(*_):
    """In place of `pilot_loss_keeping_probabilities`: the Pilot's own loss, the entry's softmax separately."""
    yield None


def timed_pass(model, batch: dict, arm: str) -> tuple[float, float, torch.Tensor, list[torch.Tensor]]:
    """(wall s, CPU s, the Pilot's loss, the Pilot's gradients) of one forward + backward in `arm`."""
    keeping = wrapper_module.pilot_loss_keeping_probabilities
    if arm == ARMS[0]:
        wrapper_module.pilot_loss_keeping_probabilities = stock_loss
    if arm == ARMS[1]:
        model.pilot_gradient_buffer = lambda logits: None  # shadows the method for this pass
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        out = model(**batch)
        out.loss.backward()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        wrapper_module.pilot_loss_keeping_probabilities = keeping
        model.__dict__.pop("pilot_gradient_buffer", None)
    gradients = [p.grad.detach().clone() for p in model.pilot.parameters()]
    model.zero_grad(set_to_none=True)
    return wall, cpu, out.pilot_loss.detach(), gradients


def markdown(payload: dict) -> str:
    rows = payload["arms"]
    lines = [
        "# The Pilot's loss keeping the entry's probabilities",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"{payload['setup']}. One forward + backward of Pilot + Copilot per measurement, the arms alternating "
        f"(their order reversed every round), {payload['rounds']} rounds after one warm-up pass each; medians.",
        "",
        "| arm | CPU s per pass | wall s per pass |",
        "| --- | --- | --- |",
        *(f"| {arm} | {rows[arm]['cpu_median']:.3f} | {rows[arm]['wall_median']:.3f} |" for arm in ARMS),
        "",
        "Saved per pass (paired, CPU time, medians of the per-round differences):",
        "",
        *(
            f"- {saving['arm']} against {saving['against']}: {saving['cpu_median']:.3f} s, lower in "
            f"{saving['lower_in']} of {payload['rounds']} rounds."
            for saving in payload["saved"]
        ),
        "",
        f"Checks: the Pilot's loss the same bit for bit in every pass: {payload['loss_bit_for_bit']}; the largest "
        f"difference of a Pilot gradient element: {payload['largest_gradient_difference']:.2e} (largest element "
        f"{payload['largest_gradient']:.2e}).",
        "",
        "## Machine",
        "",
        *(f"- {key}: {value}" for key, value in payload["machine"].items()),
        "",
    ]
    return "\n".join(lines)


def write_plot(path: str, payload: dict) -> None:
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for arm, marker in zip(ARMS, ("o", "^", "s"), strict=True):
        seconds = payload["arms"][arm]["cpu"]
        axis.plot(range(1, len(seconds) + 1), seconds, marker=marker, label=arm)
    axis.set_xlabel("round")
    axis.set_ylabel("CPU s per forward + backward")
    axis.set_title("Pilot + Copilot training pass, paired rounds")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small Pilot, a few rounds")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--output-dir", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    command = single_thread_run("pilot_loss_probabilities.py")
    setup = QUICK if args.quick else Setup()
    rounds = 2 if args.quick else args.rounds
    torch.manual_seed(0)
    pilot = LlamaForCausalLM(pilot_config(setup))
    copilot_config = copilot_for_ratio(0.1, setup, sum(p.numel() for p in pilot.parameters()))
    model = PilotCopilotForCausalLM.from_pilot(pilot, copilot_config).train()
    rows = synthetic_dataset(setup, 1, seed=0)
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    batch["num_items_in_batch"] = (batch["labels"][:, 1:] != -100).sum()  # as Trainer passes it
    for arm in ARMS:
        timed_pass(model, batch, arm)
    measured = {arm: {"wall": [], "cpu": []} for arm in ARMS}
    same_loss, largest_difference, largest = True, 0.0, 0.0
    for round_index in range(rounds):
        passes = {}
        for arm in ARMS if round_index % 2 == 0 else ARMS[::-1]:
            wall, cpu, loss, gradients = timed_pass(model, batch, arm)
            measured[arm]["wall"].append(wall)
            measured[arm]["cpu"].append(cpu)
            passes[arm] = (loss, gradients)
        stock_loss_value, stock_gradients = passes[ARMS[0]]
        for kept_loss_value, kept_gradients in (passes[arm] for arm in ARMS[1:]):
            same_loss &= torch.equal(stock_loss_value, kept_loss_value)
            for stock_gradient, kept_gradient in zip(stock_gradients, kept_gradients, strict=True):
                largest_difference = max(
                    largest_difference, (stock_gradient - kept_gradient).abs().max().item()
                )
                largest = max(largest, stock_gradient.abs().max().item())
        print(
            f"round {round_index + 1}/{rounds}: "
            + ", ".join(f"{a} {measured[a]['cpu'][-1]:.3f} s" for a in ARMS)
        )
    saved = []
    for arm, against in ((ARMS[2], ARMS[0]), (ARMS[1], ARMS[0]), (ARMS[2], ARMS[1])):
        differences = [a - b for a, b in zip(measured[against]["cpu"], measured[arm]["cpu"], strict=True)]
        saved.append(
            {
                "arm": arm,
                "against": against,
                "cpu_median": statistics.median(differences),
                "lower_in": sum(d > 0 for d in differences),
            }
        )
    payload = {
        "command": command,
        "setup": f"Pilot: LLaMA-like, hidden {setup.hidden_size}, {setup.num_hidden_layers} layers, vocabulary "
        f"{setup.vocab_size}, random weights; Copilot {copilot_config.num_hidden_layers} x "
        f"{copilot_config.hidden_size} (default head); batch {setup.batch_size} x {setup.seq_len} synthetic "
        "tokens, every position labelled; CPU, float32, training mode",
        "rounds": rounds,
        "arms": {
            arm: {
                **measured[arm],
                "cpu_median": statistics.median(measured[arm]["cpu"]),
                "wall_median": statistics.median(measured[arm]["wall"]),
            }
            for arm in ARMS
        },
        "saved": saved,
        "loss_bit_for_bit": same_loss,
        "largest_gradient_difference": largest_difference,
        "largest_gradient": largest,
        "machine": machine_info(),
    }
    write_json_and_markdown(args.output_dir, "pilot_loss_probabilities", payload, markdown(payload))
    write_plot(os.path.join(args.output_dir, "pilot_loss_probabilities.png"), payload)
    for saving in saved:
        print(
            f"{saving['arm']} against {saving['against']}: {saving['cpu_median']:.3f} s of CPU saved per pass"
        )
    print(f"wrote {args.output_dir}/pilot_loss_probabilities.json/.md/.png")
    return payload


if __name__ == "__main__":
    main()
