"""Generation overhead of the Copilot: Pilot-only generate() vs fused generate() (SPEC section 5).

For Copilot/Pilot parameter ratios near 0.1, 0.25 and 1 this measures, at batch 1 and 8 with 128 new
tokens (min_new_tokens = max_new_tokens, so EOS never stops a run early):
- throughput of generate() (new tokens per second, prefill included), fused / Pilot-only;
- the time per new token (decode steps only) with a prompt of 64 and of 512 tokens: with both KV caches
  the Copilot adds a fixed cost per token, it does not re-run over the sequence;
- the analytic matmul FLOPs per new token of both models (the Copilot's V-sized W_in and W_out included).

Targets (issue 3): fused throughput >= 0.85 x Pilot-only at ratio 0.1, and the extra time per token
within 1.2 x the Copilot/Pilot FLOP ratio.

The arms run in interleaved rounds (Pilot, then each Copilot; the order alternates between rounds), so
load from other processes on a shared machine falls on all of them; process CPU time is recorded next
to wall time. Greedy decoding, the package's fusion defaults (recorded in the result), torch.inference_mode,
one warm-up generate() per arm and shape.

    python benchmarks/generation_overhead.py            # full run (~10-15 min on 2 CPU cores)
    python benchmarks/generation_overhead.py --quick    # a small Pilot, one round: a smoke test
    python benchmarks/generation_overhead.py --cache-implementation static --compile   # compiled decoding
    python benchmarks/generation_overhead.py --shape 1b --device cuda --dtype bfloat16 --cache-implementation static --compile

Both arms decode the same way: with `--compile` generate() compiles the Pilot's per-token forward (for the
fused model, its Pilot's call and the Copilot's decoding step). Writes
benchmarks/results/generation_overhead{_1b}{_static,_compiled}{_bf16}{_<device>}{_quick}.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
from common import copilot_param_count, layer_matmul_params, machine_info
from tqdm.auto import tqdm
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

from hf_copilot import CopilotConfig, PilotCopilotForCausalLM, generation_pilot_copilot

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TARGET_RATIOS = (0.1, 0.25, 1.0)
THROUGHPUT_TARGET = 0.85  # fused / Pilot-only throughput at ratio 0.1
FLOP_FACTOR = 1.2  # extra time per token <= FLOP_FACTOR x FLOP ratio


@dataclass
class Setup:
    """The Pilot (a small LLaMA-like LM with random weights) and the generation shapes."""

    vocab_size: int = 32000
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    intermediate_size: int = 1376
    batch_sizes: tuple[int, ...] = (1, 8)
    contexts: tuple[int, ...] = (64, 512)  # prompt lengths
    new_tokens: int = 128
    rounds: int = 3


# A TinyLlama-shaped Pilot (1.26B parameters with untied 32k embeddings) for a GPU.
ONE_B = Setup(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, intermediate_size=5632)

QUICK = Setup(
    vocab_size=8000,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=344,
    batch_sizes=(1, 4),
    contexts=(16, 64),
    new_tokens=16,
    rounds=1,
)


# ------------------------------------------------------------------------------------------------
# Analytic sizes and FLOPs (2 FLOPs per multiply-add; O(V) elementwise work such as softmax and the
# fusion itself is not counted)


def pilot_config(setup: Setup) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=setup.vocab_size,
        hidden_size=setup.hidden_size,
        num_hidden_layers=setup.num_hidden_layers,
        num_attention_heads=setup.num_attention_heads,
        num_key_value_heads=setup.num_attention_heads,
        intermediate_size=setup.intermediate_size,
        max_position_embeddings=max(setup.contexts) + setup.new_tokens,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def pilot_flops_per_token(config: LlamaConfig, context: int) -> float:
    """One decode step at `context` cached positions: weights (lm_head included) + attention 4 n d."""
    d = config.hidden_size
    qo, kv, mlp = layer_matmul_params(
        d, config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    )
    weights = config.num_hidden_layers * (qo + kv + mlp) + d * config.vocab_size
    return 2 * weights + config.num_hidden_layers * 4 * context * d


def copilot_flops_per_token(copilot: CopilotConfig, pilot_hidden: int, vocab: int, context: int) -> float:
    """One Copilot step: W_in (its own dense f_C fed back), W_out, the memory projection of the 2 new
    memory rows [x_tilde; h_bar], self-attention layers over n stream keys, cross-attention layers that
    project keys/values for the 2 new memory rows and attend over 2n memory keys."""
    d = copilot.hidden_size
    qo, kv, mlp = layer_matmul_params(
        d, copilot.num_attention_heads, copilot.num_key_value_heads, copilot.intermediate_size
    )
    flops = 2 * (2 * vocab * d)  # W_in, W_out
    if pilot_hidden != d:
        flops += 2 * 2 * pilot_hidden * d
    for layer in range(copilot.num_hidden_layers):
        if layer % 2 == 0:  # causal self-attention
            flops += 2 * (qo + kv + mlp) + 4 * context * d
        else:  # cross-attention to the Pilot's memory
            flops += 2 * (qo + mlp) + 2 * 2 * kv + 4 * (2 * context) * d
    return flops


def copilot_for_ratio(
    target: float, setup: Setup, pilot_params: int, layers_options: tuple[int, ...] = (2, 4, 6, 8, 10, 12)
) -> CopilotConfig:
    """The Copilot shape (LLaMA-like proportions) whose parameter count is nearest `target` x the Pilot's
    (the same search as benchmarks/training_overhead.py, so both benchmarks use the same Copilots)."""
    ff_ratio = setup.intermediate_size / setup.hidden_size
    best = None
    for hidden in range(32, 4 * setup.hidden_size + 1, 16):
        head_dim = 64 if hidden % 64 == 0 and hidden >= 128 else 16
        if hidden % head_dim:
            continue
        for layers in layers_options:
            config = CopilotConfig(
                hidden_size=hidden,
                num_hidden_layers=layers,
                num_attention_heads=hidden // head_dim,
                intermediate_size=int(round(ff_ratio * hidden / 8)) * 8,
            )
            ratio = copilot_param_count(config, setup.hidden_size, setup.vocab_size) / pilot_params
            score = abs(math.log(ratio / target))
            if best is None or score < best[0]:
                best = (score, config)
    return best[1]


# ------------------------------------------------------------------------------------------------
# Timed generation


class StepClock(BaseStreamer):
    """generate() streams the prompt once, then the new tokens once per decoding step: the gaps between
    calls are the step times (the first gap includes the prefill)."""

    def __init__(self, device: torch.device):
        self.marks: list[tuple[float, float]] = []
        self.device = device

    def put(self, value):
        synchronize(self.device)
        self.marks.append((time.perf_counter(), time.process_time()))

    def end(self):
        pass

    def decode_steps(self) -> tuple[list[float], list[float]]:
        pairs = list(zip(self.marks[1:], self.marks[2:], strict=False))
        return [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs]


class CopilotClock:
    """Process CPU time spent in the Copilot network (its forward, its W_out and the W_in of its fed-back output),
    through forward hooks, and over a static cache in its decoding steps (`static_step`, compiled or not); the
    first Copilot forward of a generate() call reads the prompt. A call inside a timed one (W_out in a static
    step) counts once, in the outer one."""

    def __init__(self, model: PilotCopilotForCausalLM):
        self.calls: list[tuple[str, float]] = []
        self.handles = []
        self.depth = 0
        copilot = model.copilot
        for name, module in (
            ("copilot", copilot),
            ("W_out", copilot.error_head),
            ("W_in", copilot.error_proj),
        ):
            self.handles.append(module.register_forward_pre_hook(self._start))
            self.handles.append(module.register_forward_hook(lambda *_, name=name: self._stop(name)))
        self.static_step = generation_pilot_copilot.static_step

        def timed_static_step(*args, **kwargs):
            self._start()
            output = self.static_step(*args, **kwargs)
            self._stop("copilot")
            return output

        generation_pilot_copilot.static_step = timed_static_step

    def _start(self, *_):
        if self.depth == 0:
            self.started = time.process_time()
        self.depth += 1

    def _stop(self, name: str):
        self.depth -= 1
        if self.depth == 0:
            self.calls.append((name, time.process_time() - self.started))

    def decode_ms_per_token(self, new_tokens: int) -> float:
        # Each forward's calls start with the Copilot's: the first forward's (W_out, W_in after it) read the prompt.
        first_step = [i for i, (name, _) in enumerate(self.calls) if name == "copilot"][1]
        decode = sum(seconds for _, seconds in self.calls[first_step:])
        return 1e3 * decode / (new_tokens - 1)  # the last new token is never fed back

    def remove(self):
        for handle in self.handles:
            handle.remove()
        generation_pilot_copilot.static_step = self.static_step


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(model, input_ids: torch.Tensor, new_tokens: int, **generate_kwargs) -> dict[str, float]:
    clock = StepClock(input_ids.device)
    copilot_clock = CopilotClock(model) if isinstance(model, PilotCopilotForCausalLM) else None
    synchronize(input_ids.device)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        with torch.inference_mode():
            out = model.generate(
                input_ids,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                streamer=clock,
                **generate_kwargs,
            )
        synchronize(input_ids.device)
    finally:
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if copilot_clock is not None:
            copilot_clock.remove()
    assert out.shape[1] == input_ids.shape[1] + new_tokens
    step_wall, step_cpu = clock.decode_steps()
    timing = {
        "total_s": wall,
        "total_cpu_s": cpu,
        "tokens_per_s": input_ids.shape[0] * new_tokens / wall,
        "decode_ms_per_token": 1e3 * statistics.median(step_wall),
        "decode_cpu_ms_per_token": 1e3 * statistics.median(step_cpu),
    }
    if copilot_clock is not None:
        timing["copilot_cpu_ms_per_token"] = copilot_clock.decode_ms_per_token(new_tokens)
    return timing


# ------------------------------------------------------------------------------------------------
# Reporting


def generation_summary(generation: dict | None) -> str:
    """How both arms decoded (results written before these options existed: CPU, float32, dynamic cache)."""
    generation = generation or {"device": "cpu", "dtype": "float32", "cache_implementation": "dynamic"}
    text = f"{generation['device']}, {generation['dtype']}, {generation['cache_implementation']} KV cache"
    if generation.get("compile"):
        text += "; generate() compiles the Pilot's per-token forward (the fused model's: the Pilot's call and the Copilot's decoding step)"
    return text


def fusion_defaults(config) -> str:
    return f"{config.fusion} fusion, {config.copilot_feedback} feedback, lambda {config.copilot_lambda:g}"


def write_markdown(path: str, result: dict) -> None:
    setup, rows = result["setup"], result["rows"]
    lines = [
        "# Generation overhead of the Copilot",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Pilot: LLaMA-like, hidden {setup['hidden_size']}, {setup['num_hidden_layers']} layers, vocabulary "
        f"{setup['vocab_size']}, random weights, {result['pilot_params'] / 1e6:.1f}M parameters. Greedy "
        f"generate(), {setup['new_tokens']} new tokens (min_new_tokens = max_new_tokens), the package's fusion "
        f"defaults ({result.get('fusion', 'probs fusion, copilot feedback, lambda 1')}). {setup['rounds']} "
        "interleaved rounds; medians.",
        "",
        f"Decoding: {generation_summary(result.get('generation'))}.",
        "",
        "- throughput: batch x new tokens / generate() wall time (prefill included), prompt of "
        f"{setup['contexts'][0]} tokens; ratio = fused / Pilot-only (per round, then the median).",
        "- ms/token: median time of one decoding step (prefill excluded) for a prompt of the given length "
        f"(the context then grows by {setup['new_tokens']}); overhead = fused / Pilot-only - 1.",
        "- FLOP ratio: analytic matmul FLOPs per new token, Copilot / Pilot, at the prompt length "
        "(W_in and W_out included).",
        f"- targets: throughput ratio >= {THROUGHPUT_TARGET} at parameter ratio ~0.1; overhead <= "
        f"{FLOP_FACTOR} x FLOP ratio (at both prompt lengths).",
        "- Copilots: the shapes of benchmarks/training_overhead.py (nearest parameter ratio, LLaMA-like "
        "proportions), plus the 2-layer Copilot nearest ratio 0.1. With a 32k vocabulary W_in and W_out hold "
        "most of a small Copilot's parameters, and on CPU every layer adds a fixed operator-dispatch cost "
        "per token whatever its width, so the depth matters as much as the parameter count.",
        "",
    ]
    first, last = setup["contexts"][0], setup["contexts"][-1]
    header = (
        f"| batch | Copilot (layers x hidden) | param ratio | tokens/s Pilot | tokens/s fused | throughput ratio | "
        f"ms/token Pilot @{first} | fused @{first} | overhead @{first} | FLOP ratio @{first} | "
        f"ms/token Pilot @{last} | fused @{last} | overhead @{last} | FLOP ratio @{last} | "
        "overhead / FLOP ratio | targets met |"
    )
    lines += [header, "|" + " --- |" * (header.count("|") - 1)]
    for row in rows:
        a, b = row["contexts"][str(first)], row["contexts"][str(last)]
        lines.append(
            f"| {row['batch_size']} | {row['copilot_layers']} x {row['copilot_hidden']} | {row['param_ratio']:.3f} | "
            f"{row['pilot_tokens_per_s']:.1f} | {row['fused_tokens_per_s']:.1f} | {row['throughput_ratio']:.3f} | "
            f"{a['pilot_ms']:.1f} | {a['fused_ms']:.1f} | {a['overhead']:+.1%} | {a['flop_ratio']:.3f} | "
            f"{b['pilot_ms']:.1f} | {b['fused_ms']:.1f} | {b['overhead']:+.1%} | {b['flop_ratio']:.3f} | "
            f"{row['overhead_over_flop_ratio']:.2f} | {row['targets']} |"
        )
    lines += [
        "",
        "Process CPU time per decoding step gives the same comparison without the wall-clock noise of a "
        "shared machine:",
        "",
        f"| batch | Copilot | CPU ms/token Pilot @{first} | fused @{first} | overhead @{first} | "
        f"in the Copilot network @{first} | CPU ms/token Pilot @{last} | fused @{last} | overhead @{last} | "
        f"in the Copilot network @{last} |",
        "|" + " --- |" * 10,
    ]
    for row in rows:
        a, b = row["contexts"][str(first)], row["contexts"][str(last)]
        lines.append(
            f"| {row['batch_size']} | {row['copilot_layers']} x {row['copilot_hidden']} | {a['pilot_cpu_ms']:.1f} | "
            f"{a['fused_cpu_ms']:.1f} | {a['overhead_cpu']:+.1%} | {a['copilot_cpu_ms']:.1f} | {b['pilot_cpu_ms']:.1f} | "
            f"{b['fused_cpu_ms']:.1f} | {b['overhead_cpu']:+.1%} | {b['copilot_cpu_ms']:.1f} |"
        )
    lines += [
        "",
        '"In the Copilot network": CPU time inside the Copilot\'s forward, its W_out and its W_in, per decoding '
        "step (forward hooks; over a static cache, its decoding step; the Mistake Log entry, the reweight head's "
        "passes over the vocabulary (inside the static decoding step), the fusion processor and generate()'s "
        "own work are outside it). It grows with the context only through the Copilot's attention "
        "over its cached keys (a step writes its new keys in place: with the dynamic cache into buffers that grow "
        "by doubling, with a static one into buffers as long as the Pilot's); it never re-runs over the sequence.",
    ]
    lines += [
        "",
        "## Machine",
        "",
        *(f"- {key}: {value}" for key, value in result["machine"].items()),
        f"- load average at start / end: {result['load_average_start']} / {result['load_average_end']}",
        "",
    ]
    if result.get("notes"):
        lines += ["## Notes", "", *result["notes"], ""]
    with open(path, "w") as handle:
        handle.write("\n".join(lines))


def write_plot(path: str, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup, rows = result["setup"], result["rows"]
    first, last = (str(c) for c in (setup["contexts"][0], setup["contexts"][-1]))
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    markers = dict(zip(setup["batch_sizes"], "os^", strict=False))
    for row in rows:
        label = f"{row['copilot_layers']}x{row['copilot_hidden']}"
        marker = markers[row["batch_size"]]
        left.scatter(row["param_ratio"], row["throughput_ratio"], marker=marker, color="tab:blue")
        left.annotate(
            label,
            (row["param_ratio"], row["throughput_ratio"]),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
        for context, color in ((first, "tab:green"), (last, "tab:orange")):
            numbers = row["contexts"][context]
            middle.scatter(numbers["flop_ratio"], numbers["overhead"], marker=marker, color=color)
    limit = max(row["contexts"][c]["flop_ratio"] for row in rows for c in (first, last)) * 1.3
    middle.plot([0, limit], [0, limit], "k--", label="overhead = FLOP ratio")
    middle.plot([0, limit], [0, FLOP_FACTOR * limit], "r:", label=f"target ({FLOP_FACTOR} x FLOP ratio)")
    for context, color in ((first, "tab:green"), (last, "tab:orange")):
        middle.scatter([], [], color=color, label=f"prompt {context}")
    for batch, marker in markers.items():
        left.scatter([], [], marker=marker, color="gray", label=f"batch {batch}")
    left.axhline(
        THROUGHPUT_TARGET, color="red", linestyle=":", label=f"target {THROUGHPUT_TARGET} (ratio 0.1)"
    )
    left.set_xscale("log")
    left.set_xlabel("Copilot / Pilot parameters")
    left.set_ylabel("fused / Pilot-only tokens per second")
    left.set_title(f"generate() throughput (prompt {first})")
    left.legend(fontsize=8)
    middle.set_xlabel("Copilot / Pilot FLOPs per token")
    middle.set_ylabel("extra time per new token (fraction)")
    middle.set_title("Decoding step: overhead vs FLOPs")
    middle.legend(fontsize=8)

    labels, width = [], 0.2
    for index, row in enumerate(rows):
        labels.append(f"{row['copilot_layers']}x{row['copilot_hidden']}\nbatch {row['batch_size']}")
        for offset, context, color in ((-width / 2, first, "tab:green"), (width / 2, last, "tab:orange")):
            numbers = row["contexts"][context]
            right.bar(index + offset, numbers["copilot_cpu_ms"], width, color=color)
    for context, color in ((first, "tab:green"), (last, "tab:orange")):
        right.bar([0], [0], 0, color=color, label=f"prompt {context}")
    right.set_xticks(range(len(rows)), labels, fontsize=7)
    right.set_ylabel("CPU ms per new token in the Copilot network")
    right.set_title("The Copilot's step at short and long context")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small Pilot, short runs, one round")
    parser.add_argument(
        "--shape", choices=("default", "1b"), default="default", help="1b: a 1.26B Pilot, for a GPU"
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: 3, quick: 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared machine a descheduled OpenMP worker stalls "
        "every operator, which penalises small-operator code such as a decoding step many times over)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--cache-implementation",
        choices=("dynamic", "static"),
        default="dynamic",
        help="the KV cache of both arms",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the per-token forward (needs --cache-implementation static)",
    )
    parser.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        choices=TARGET_RATIOS,
        help="Copilot parameter ratios (default: all; 0.1 includes the 2-layer Copilot)",
    )
    parser.add_argument("--output-dir", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.compile and args.cache_implementation != "static":
        parser.error(
            "--compile needs --cache-implementation static: generate() compiles only over a static cache"
        )
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    generate_kwargs = {}
    if args.cache_implementation == "static":
        generate_kwargs["cache_implementation"] = "static"
        # generate() compiles whenever the cache is static on an accelerator; on CPU only when told to.
        compile_config = CompileConfig() if args.compile else None
        if compile_config is not None and device.type == "cpu":
            compile_config = CompileConfig(mode="default")  # CUDA graphs ("reduce-overhead") need a GPU
            compile_config._compile_all_devices = True
        generate_kwargs["disable_compile"] = not args.compile
        if compile_config is not None:
            generate_kwargs["compile_config"] = compile_config
            # One graph per arm and prompt shape (each shape has its own static cache length): dynamo's
            # default limit of 8 per function would send the later arms back to eager decoding.
            torch._dynamo.config.recompile_limit = 64

    setup = QUICK if args.quick else (ONE_B if args.shape == "1b" else Setup())
    if args.rounds:
        setup.rounds = args.rounds
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())

    torch.manual_seed(0)
    pilot = LlamaForCausalLM(pilot_config(setup)).to(device, dtype).eval()
    pilot_params = sum(p.numel() for p in pilot.parameters())
    # The shapes of benchmarks/training_overhead.py, plus the 2-layer Copilot nearest ratio 0.1: at a
    # 32k vocabulary W_in and W_out hold most of a small Copilot's parameters, and on CPU each extra
    # layer costs a fixed ~0.1 ms of operator dispatch per token whatever its width.
    # A 1B Pilot on a GPU: the ratios of the GPU target (ratio 1 would double a long run).
    ratios = args.ratios or (TARGET_RATIOS[:2] if args.shape == "1b" else TARGET_RATIOS)
    shapes = [(target, copilot_for_ratio(target, setup, pilot_params)) for target in ratios]
    if TARGET_RATIOS[0] in ratios:
        shapes.insert(0, (TARGET_RATIOS[0], copilot_for_ratio(TARGET_RATIOS[0], setup, pilot_params, (2,))))
    arms = []
    for target, config in shapes:
        model = PilotCopilotForCausalLM.from_pilot(pilot, config).to(device, dtype).eval()
        params = sum(p.numel() for p in model.copilot.parameters())
        assert params == copilot_param_count(config, setup.hidden_size, setup.vocab_size), "parameter formula"
        arms.append({"target": target, "config": model.copilot.config, "model": model, "params": params})

    generator = torch.Generator().manual_seed(0)
    prompts = {
        (batch, context): torch.randint(3, setup.vocab_size, (batch, context), generator=generator).to(device)
        for batch in setup.batch_sizes
        for context in setup.contexts
    }
    shapes = list(prompts)
    # timings[arm][(batch, context)] = one measurement per round; arm None is the Pilot alone.
    timings: dict = {None: {shape: [] for shape in shapes}}
    timings |= {index: {shape: [] for shape in shapes} for index in range(len(arms))}
    order = [None, *range(len(arms))]
    # Warm-up: the allocator and kernels; compiled, every shape (each static cache length compiles its graphs).
    warm_up = shapes if args.compile else [(batch, setup.contexts[0]) for batch in setup.batch_sizes]
    total = len(order) * (len(warm_up) + len(shapes) * setup.rounds)
    with tqdm(total=total, desc="generate() calls", unit="call") as progress:
        for shape in warm_up:
            for which in order:
                model = pilot if which is None else arms[which]["model"]
                new_tokens = setup.new_tokens if args.compile else min(8, setup.new_tokens)
                timed_generate(model, prompts[shape], new_tokens, **generate_kwargs)
                progress.update(1)
        for shape in shapes:
            for round_index in range(setup.rounds):
                for which in order if round_index % 2 == 0 else order[::-1]:
                    model = pilot if which is None else arms[which]["model"]
                    timings[which][shape].append(
                        timed_generate(model, prompts[shape], setup.new_tokens, **generate_kwargs)
                    )
                    progress.update(1)

    def median_of(runs: list[dict], key: str) -> float:
        return statistics.median(run[key] for run in runs)

    def median_ratio(fused: list[dict], alone: list[dict], key: str) -> float:
        return statistics.median(f[key] / p[key] for f, p in zip(fused, alone, strict=True))

    rows = []
    for index, arm in enumerate(arms):
        for batch in setup.batch_sizes:
            throughput_shape = (batch, setup.contexts[0])
            contexts = {}
            for context in setup.contexts:
                fused, alone = timings[index][(batch, context)], timings[None][(batch, context)]
                flop_ratio = copilot_flops_per_token(
                    arm["config"], setup.hidden_size, setup.vocab_size, context
                ) / pilot_flops_per_token(pilot.config, context)
                contexts[str(context)] = {
                    "pilot_ms": median_of(alone, "decode_ms_per_token"),
                    "fused_ms": median_of(fused, "decode_ms_per_token"),
                    "overhead": median_ratio(fused, alone, "decode_ms_per_token") - 1,
                    "pilot_cpu_ms": median_of(alone, "decode_cpu_ms_per_token"),
                    "fused_cpu_ms": median_of(fused, "decode_cpu_ms_per_token"),
                    "overhead_cpu": median_ratio(fused, alone, "decode_cpu_ms_per_token") - 1,
                    "copilot_cpu_ms": median_of(fused, "copilot_cpu_ms_per_token"),
                    "flop_ratio": flop_ratio,
                    "pilot_runs": alone,
                    "fused_runs": fused,
                }
            throughput_ratio = median_ratio(
                timings[index][throughput_shape], timings[None][throughput_shape], "tokens_per_s"
            )
            worst = max(c["overhead"] / c["flop_ratio"] for c in contexts.values())
            met = [worst <= FLOP_FACTOR]
            if arm["target"] == TARGET_RATIOS[0]:
                met.append(throughput_ratio >= THROUGHPUT_TARGET)
            rows.append(
                {
                    "target_ratio": arm["target"],
                    "batch_size": batch,
                    "copilot_layers": arm["config"].num_hidden_layers,
                    "copilot_hidden": arm["config"].hidden_size,
                    "copilot_heads": arm["config"].num_attention_heads,
                    "copilot_intermediate": arm["config"].intermediate_size,
                    "copilot_params": arm["params"],
                    "param_ratio": arm["params"] / pilot_params,
                    "pilot_tokens_per_s": median_of(timings[None][throughput_shape], "tokens_per_s"),
                    "fused_tokens_per_s": median_of(timings[index][throughput_shape], "tokens_per_s"),
                    "throughput_ratio": throughput_ratio,
                    "overhead_over_flop_ratio": worst,
                    "targets": "yes" if all(met) else "no",
                    "contexts": contexts,
                }
            )

    command = "python benchmarks/generation_overhead.py" + (
        " " + " ".join(sys.argv[1:]) if argv is None else ""
    )
    result = {
        "command": command.strip(),
        "setup": asdict(setup),
        "fusion": fusion_defaults(arms[0]["model"].config),
        "generation": {
            "device": str(device),
            "dtype": args.dtype,
            "cache_implementation": args.cache_implementation,
            "compile": args.compile,
        },
        "pilot_params": pilot_params,
        "pilot_flops_per_token": {str(c): pilot_flops_per_token(pilot.config, c) for c in setup.contexts},
        "rows": rows,
        "machine": machine_info(),
        "load_average_start": load_start,
        "load_average_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "notes": [
            f"- {args.threads} torch thread(s) on {os.cpu_count()} cores; load average "
            f"{load_start} at the start: other processes shared the machine, which the interleaved rounds "
            "and the CPU-time columns are there to absorb.",
            "- Throughput includes the prefill, where the fused model computes the Pilot's full-vocabulary "
            "distribution at every prompt position (the Copilot reads the prompt's observed errors), while "
            "Pilot-only generate() computes the logits of the last position only.",
        ],
    }
    os.makedirs(args.output_dir, exist_ok=True)
    variant = "_1b" if args.shape == "1b" else ""
    variant += "_compiled" if args.compile else ("_static" if args.cache_implementation == "static" else "")
    variant += "_bf16" if args.dtype == "bfloat16" else ""
    variant += "" if device.type == "cpu" else f"_{device.type}"
    stem = os.path.join(args.output_dir, "generation_overhead" + variant + ("_quick" if args.quick else ""))
    with open(stem + ".json", "w") as handle:
        json.dump(result, handle, indent=2)
    write_markdown(stem + ".md", result)
    write_plot(stem + ".png", result)
    for row in rows:
        overheads = ", ".join(
            f"@{c} {v['overhead']:+.1%} (FLOPs {v['flop_ratio']:.3f})" for c, v in row["contexts"].items()
        )
        print(
            f"batch {row['batch_size']}, param ratio {row['param_ratio']:.3f}: throughput x{row['throughput_ratio']:.3f}, "
            f"per-token overhead {overheads}, targets {row['targets']}"
        )
    print(f"wrote {stem}.json/.md/.png")
    return result


if __name__ == "__main__":
    main()
