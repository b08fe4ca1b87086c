"""Training overhead of the Copilot: wall time per optimizer step, stock Trainer on the Pilot vs CopilotTrainer.

For Copilot/Pilot parameter ratios near 0.1, 0.25 and 1 this measures the median wall time per optimizer
step and compares the overhead with the analytic ratio of training FLOPs per token (the Copilot's V-sized
W_in and W_out included). Target: overhead <= 1.2 x the FLOP ratio (the paper reports +2% to +6.5% training
time with a 1B Copilot on 1B-8B Pilots); at the tiny shape, where every step's fixed costs weigh most,
overhead <= 1.3 x the FLOP ratio. It also measures the Mistake Log's memory per entry, exact vs
compact top-k.

The arms run in interleaved rounds (Pilot, then each Copilot, in alternating order), so load from other
processes on a shared machine falls on all of them; each run discards its first step (optimizer state,
allocator warm-up). Process CPU time per step is recorded next to wall time.

    python benchmarks/training_overhead.py            # full run (~10-15 min on 2 CPU cores)
    python benchmarks/training_overhead.py --quick    # a small Pilot, one round: a smoke test
    python benchmarks/training_overhead.py --shape tiny --threads 1   # a 2-layer 64-wide Pilot, 100-step runs
    python benchmarks/training_overhead.py --shape 1b --bf16   # on a GPU: a 1.26B Pilot, bf16 mixed precision
    python benchmarks/training_overhead.py --heads default linear formed   # the Copilot's heads side by side
    python benchmarks/training_overhead.py --shape tiny --optim adamw_torch_fused   # Trainer's default optimizer
    python benchmarks/training_overhead.py --shape tiny --torch-compile   # both arms compiled (inductor)
    python benchmarks/training_overhead.py --answer-fraction 0.5   # the first half of each sequence a prompt

Trainer runs on the GPU when one is visible. Writes benchmarks/results/training_overhead{_1b|_tiny}{_bf16}{_cuda}
{_<optim>}{_compiled}{_answers<percent>}{_quick}.* (no suffix for adamw_torch)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
from common import copilot_param_count, layer_matmul_params, machine_info
from tqdm.auto import tqdm
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as hf_logging

from hf_copilot import CopilotConfig, PilotCopilotForCausalLM
from hf_copilot.generation_pilot_copilot import copilot_head_loss_terms, copilot_loss_terms_on_entry
from hf_copilot.mistake_log import MistakeLog
from hf_copilot.mistake_log_entry import mistake_log_entry_from_pilot_pass, shift_right

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TARGET_RATIOS = (0.1, 0.25, 1.0)
TARGET_FACTOR = {"default": 1.2, "1b": 1.2, "tiny": 1.3}
HEAD_LABELS = {
    "default": "reweight, cross-entropy",
    "linear": "linear, squared error",
    "formed": "reweight, f_C formed",
    "linear_formed": "linear, f_C formed",
    "paper": "linear, the paper's feedback",
    "token_gain": "reweight, cross-entropy, token gains",
    "no_token_embedding": "reweight, cross-entropy, no token term",
    "no_qk_norm": "reweight, cross-entropy, no query and key norms",
}
# The heads that change the default Copilot's token term (CopilotConfig.token_embedding), at the same shape.
TOKEN_TERMS = {"token_gain": "gain", "no_token_embedding": False}
NOTES = [
    "- The FLOP ratio counts matmuls and attention only. The Copilot also makes memory-bound passes over "
    "[B,T,V] tensors that cost no matmul FLOPs: the softmax of the Mistake Log entry, and with a log that "
    "stores entries the top-k compaction. On this VM each fresh [B,T,V] float32 buffer (131 MB at the full "
    "setup) also costs ~70-100 ms of page faults: a training pass on CPU writes the entry's softmax into a buffer "
    "it reuses once nothing holds the last one (`ReusableBuffer`). This weighs most at the smallest ratio, where "
    "the Copilot's matmuls are cheap.",
    "- Heads: `default` is what CopilotConfig() trains for the default observed feedback, the reweight head on "
    "the cross-entropy, whose training pass reads W_out's weight (`PilotErrors.head_cross_entropy`: blocks "
    "of rows in one reused 16 MB buffer, the gradients computed with the loss, three vocabulary-sized "
    "products); `linear` is the paper's head on the squared error with W_out applied implicitly "
    "(`PilotErrors.head_squared_distance`: no [B,T,V] f_C, two vocabulary-sized products); `formed` is the default head through autograd with f_C "
    "formed (a hooked head takes that path), as training ran it before the fused loss; `linear_formed` the "
    "linear head with f_C formed, as training ran it before W_out was applied implicitly; `paper` the paper's "
    "feedback mode with its defaults (the linear head, memory_norm), trained with its own first-pass predictions "
    "fed back at answer positions (`copilot_stream`, W_in W_out applied to the first pass's head input); "
    "`token_gain` and `no_token_embedding` the default head at the same shape with the token term as d_C gains "
    "on W_in's columns (`token_embedding='gain'`) or without one, instead of the [V, d_C] table; `no_qk_norm` "
    "the default head at the same shape without the query and key norms (`qk_norm=False`). All heads of a "
    "ratio run in the same interleaved rounds.",
    "- Optimised after profiling (same results, tested): `PilotErrors.squared_distance` has a hand-written "
    "backward, and `MistakeLog.add` builds no [B,T,V] temporaries for its statistics.",
    "- The machine is shared with other processes (see the load average): two OpenMP threads stall when one "
    "is descheduled, so the committed run uses one thread (`--threads 1`); CPU time per step is reported next "
    "to wall time as the less contention-sensitive measure.",
]


@dataclass
class Setup:
    """The Pilot (a small LLaMA-like LM with random weights) and the synthetic batches."""

    vocab_size: int = 32000
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    intermediate_size: int = 1376
    seq_len: int = 256
    batch_size: int = 4
    rounds: int = 5
    warmup_steps: int = 1
    measured_steps: int = 2
    # The labelled share of each sequence, at its end; the positions before it are a prompt (labels -100), as in
    # supervised fine-tuning on prompt-completion pairs.
    answer_fraction: float = 1.0

    @property
    def prompt_length(self) -> int:
        return round((1.0 - self.answer_fraction) * self.seq_len)


# A TinyLlama-shaped Pilot (1.26B parameters with untied 32k embeddings) for a GPU.
ONE_B = Setup(
    hidden_size=2048,
    num_hidden_layers=22,
    num_attention_heads=32,
    intermediate_size=5632,
    seq_len=1024,
    batch_size=4,
    rounds=3,
    warmup_steps=2,
    measured_steps=5,
)

# The smallest shape: a step's fixed costs (entry, log, statistics, Python) against very little compute.
TINY = Setup(
    vocab_size=48,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=172,
    seq_len=40,
    batch_size=64,
    rounds=2,
    warmup_steps=5,
    measured_steps=100,
)

QUICK = Setup(
    vocab_size=8000,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=688,
    seq_len=128,
    batch_size=2,
    rounds=1,
    warmup_steps=1,
    measured_steps=2,
)


# ------------------------------------------------------------------------------------------------
# Analytic sizes and FLOPs


def pilot_config(setup: Setup) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=setup.vocab_size,
        hidden_size=setup.hidden_size,
        num_hidden_layers=setup.num_hidden_layers,
        num_attention_heads=setup.num_attention_heads,
        num_key_value_heads=setup.num_attention_heads,
        intermediate_size=setup.intermediate_size,
        max_position_embeddings=max(512, setup.seq_len),
        tie_word_embeddings=False,
    )


def pilot_train_flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """6 x matmul weights (forward + both backward matmuls) + attention (3 x forward's 4 T d), lm_head included."""
    d, vocab = config.hidden_size, config.vocab_size
    qo, kv, mlp = layer_matmul_params(
        d, config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    )
    weights = config.num_hidden_layers * (qo + kv + mlp) + d * vocab
    attention = config.num_hidden_layers * 3 * 4 * seq_len * d
    return 6 * weights + attention


def copilot_train_flops_per_token(
    copilot: CopilotConfig, pilot_hidden: int, vocab: int, seq_len: int, answer_fraction: float = 1.0
) -> float:
    """Per Pilot token. W_in reads the detached error, so it costs forward + weight gradient (4 V d_C);
    W_out costs the usual 6 V d_C where the Copilot is trained (`answer_fraction` of the positions: its loss
    needs the head nowhere else). Cross-attention layers project keys/values from a memory of 2 rows per
    position ([x_tilde; h_bar]) and attend over 2T keys."""
    d, vocab_weights = copilot.hidden_size, vocab * copilot.hidden_size
    qo, kv, mlp = layer_matmul_params(
        d, copilot.num_attention_heads, copilot.num_key_value_heads, copilot.intermediate_size
    )
    has_memory_proj = pilot_hidden != d
    flops = 4 * vocab_weights + 6 * vocab_weights * answer_fraction  # W_in, W_out
    if has_memory_proj:
        flops += 2 * 4 * pilot_hidden * d  # 2 memory rows, forward + weight gradient (the memory is detached)
    memory_kv_factor = 6 if has_memory_proj else 4  # no input gradient into a detached memory
    for layer in range(copilot.num_hidden_layers):
        if layer % 2 == 0:  # causal self-attention
            flops += 6 * (qo + kv + mlp) + 3 * 4 * seq_len * d
        else:  # cross-attention to the Pilot's memory
            flops += 6 * (qo + mlp) + memory_kv_factor * 2 * kv + 3 * 4 * (2 * seq_len) * d
    return flops


def copilot_for_ratio(target: float, setup: Setup, pilot_params: int) -> CopilotConfig:
    """The Copilot shape nearest `target` x the Pilot's parameters: LLaMA-like proportions, hidden a multiple
    of half the Pilot's head size, heads of the Pilot's size or half of it, at most as many layers as the
    Pilot; fewer layers on a tie."""
    ff_ratio = setup.intermediate_size / setup.hidden_size
    pilot_head = setup.hidden_size // setup.num_attention_heads
    best = None
    for hidden in range(pilot_head, 4 * setup.hidden_size + 1, pilot_head // 2):
        head_dim = pilot_head if hidden % pilot_head == 0 else pilot_head // 2
        for layers in range(2, setup.num_hidden_layers + 1, 2):
            config = CopilotConfig(
                hidden_size=hidden,
                num_hidden_layers=layers,
                num_attention_heads=hidden // head_dim,
                intermediate_size=int(round(ff_ratio * hidden / 8)) * 8,
            )
            ratio = copilot_param_count(config, setup.hidden_size, setup.vocab_size) / pilot_params
            score = (round(abs(math.log(ratio / target)), 3), layers)
            if best is None or score < best[0]:
                best = (score, config)
    return best[1]


# ------------------------------------------------------------------------------------------------
# Timed training runs


class StepTimer(TrainerCallback):
    """Wall and process CPU time at the end of every optimizer step (the interval includes data loading)."""

    def __init__(self, progress: tqdm):
        self.progress = progress
        self.marks: list[tuple[float, float]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.marks = [(time.perf_counter(), time.process_time())]

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's queued GPU work belongs to this step
        self.marks.append((time.perf_counter(), time.process_time()))
        self.progress.update(1)

    def intervals(self, skip: int) -> tuple[list[float], list[float]]:
        pairs = list(zip(self.marks, self.marks[1:], strict=False))[skip:]
        return [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs]


def synthetic_dataset(setup: Setup, num_batches: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_batches * setup.batch_size):
        ids = torch.randint(0, setup.vocab_size, (setup.seq_len,), generator=generator)
        labels = ids.clone()
        labels[: setup.prompt_length] = -100
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return rows


def _arguments(
    args_class, setup: Setup, output_dir: str, bf16: bool = False, optim: str = "adamw_torch", **extra
):
    return args_class(
        output_dir=output_dir,
        per_device_train_batch_size=setup.batch_size,
        max_steps=setup.warmup_steps + setup.measured_steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        optim=optim,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        bf16=bf16,
        seed=0,
        **extra,
    )


def copilot_trainer_classes():
    """(CopilotTrainer, CopilotTrainingArguments) if hf_copilot.trainer imports, else None."""
    try:
        from hf_copilot.trainer import CopilotTrainer
        from hf_copilot.training_args import CopilotTrainingArguments
    except ImportError:
        return None
    return CopilotTrainer, CopilotTrainingArguments


def run_trainer(
    model,
    setup: Setup,
    progress: tqdm,
    copilot: bool,
    seed: int,
    bf16: bool = False,
    optim: str = "adamw_torch",
    torch_compile: bool = False,
) -> tuple[list[float], list[float]]:
    """One short training run; returns the per-step (wall, CPU) seconds after the warm-up steps."""
    data = synthetic_dataset(setup, setup.warmup_steps + setup.measured_steps, seed)
    timer = StepTimer(progress)
    with tempfile.TemporaryDirectory() as output_dir:
        if copilot:
            trainer_class, args_class = copilot_trainer_classes()
        else:
            trainer_class, args_class = Trainer, TrainingArguments
        trainer = trainer_class(
            model=model,
            # Joint steps only: the Copilot-only phase after them is not a step of the run being compared.
            args=_arguments(
                args_class,
                setup,
                output_dir,
                bf16=bf16,
                optim=optim,
                torch_compile=torch_compile,
                **({"copilot_final_epochs": 0.0} if copilot else {}),
            ),
            train_dataset=data,
            callbacks=[timer],
        )
        trainer.remove_callback(PrinterCallback)  # no end-of-run metrics dict under the progress bar
        trainer.train()
    return timer.intervals(setup.warmup_steps)


def run_model_steps(
    model, setup: Setup, progress: tqdm, copilot: bool, seed: int
) -> tuple[list[float], list[float]]:
    """Fallback without CopilotTrainer: forward with labels + backward + AdamW step, for either model."""
    data = synthetic_dataset(setup, setup.warmup_steps + setup.measured_steps, seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    marks = [(time.perf_counter(), time.process_time())]
    for step in range(setup.warmup_steps + setup.measured_steps):
        rows = data[step * setup.batch_size : (step + 1) * setup.batch_size]
        batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append((time.perf_counter(), time.process_time()))
        progress.update(1)
    pairs = list(zip(marks, marks[1:], strict=False))[setup.warmup_steps :]
    return [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs]


# ------------------------------------------------------------------------------------------------
# Mistake Log memory


# ------------------------------------------------------------------------------------------------
# Where the Copilot's time goes (model level, process CPU time)


def _cpu_seconds(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def component_breakdown(model: PilotCopilotForCausalLM, setup: Setup) -> dict[str, float]:
    """CPU seconds of one forward + backward: the Pilot, Pilot + Copilot, and the Copilot's parts."""
    batch = synthetic_dataset(setup, 1, seed=321)
    inputs = {key: torch.stack([row[key] for row in batch]) for key in batch[0]}
    pilot, copilot = model.pilot, model.copilot
    with torch.no_grad():
        out = pilot(**inputs, output_hidden_states=True)
        entry = mistake_log_entry_from_pilot_pass(
            inputs["input_ids"], inputs["attention_mask"], inputs["labels"], out.logits, out.hidden_states
        )
    del out

    def backward(module, loss):
        loss.backward()
        module.zero_grad(set_to_none=True)

    def copilot_step():  # what a training step runs (its loss reads W_out's weight)
        stream = shift_right(copilot.embed_errors(entry.errors))
        _, terms = copilot_loss_terms_on_entry(copilot, stream, entry)
        backward(copilot, terms.objective / terms.num_tokens)

    head = copilot.error_head
    head_input = torch.randn(*entry.errors.targets.shape, head.in_features, requires_grad=True)

    def head_and_loss_step(formed: bool):  # formed: f_C through autograd, as a pass asking for it computes
        _, terms = copilot_head_loss_terms(copilot, head_input, entry, return_predicted_error=formed)
        backward(head, terms.objective)
        head_input.grad = None

    # What the Copilot's layers cost as transformers' own LLaMA layers of that shape, on its [B,T,d_C] stream and
    # without anything the Copilot adds (memory keys, W_in, W_out, the loss): the reference its share is held to.
    config = copilot.config
    stock_layers = LlamaModel(
        LlamaConfig(
            vocab_size=1,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            attn_implementation="sdpa",
        )
    )
    stream = torch.randn(*entry.errors.targets.shape, config.hidden_size, requires_grad=True)

    def stock_layers_step():
        backward(stock_layers, stock_layers(inputs_embeds=stream).last_hidden_state.square().mean())
        stream.grad = None

    log = MistakeLog(size=4, topk=64)
    return {
        "pilot_fwd_bwd": _cpu_seconds(lambda: backward(pilot, pilot(**inputs).loss)),
        "pilot_copilot_fwd_bwd": _cpu_seconds(lambda: backward(model, model(**inputs).loss)),
        "copilot_fwd_bwd": _cpu_seconds(copilot_step),
        "stock_layers_fwd_bwd": _cpu_seconds(stock_layers_step),
        "head_and_loss_fwd_bwd": _cpu_seconds(lambda: head_and_loss_step(formed=False)),
        "head_and_loss_formed_fwd_bwd": _cpu_seconds(lambda: head_and_loss_step(formed=True)),
        "mistake_log_entry": _cpu_seconds(
            lambda: mistake_log_entry_from_pilot_pass(
                inputs["input_ids"],
                inputs["attention_mask"],
                inputs["labels"],
                entry.errors.probs,
                (entry.x_tilde,) * 2,
            )
        ),
        "mistake_log_add_top64": _cpu_seconds(lambda: log.add(entry)),
    }


@torch.no_grad()
def mistake_log_memory(model: PilotCopilotForCausalLM, setup: Setup, topk: int = 64) -> dict[str, float]:
    batch = synthetic_dataset(setup, 1, seed=123)
    inputs = {key: torch.stack([row[key] for row in batch]) for key in batch[0]}
    model.eval()
    entry = model(**inputs, return_mistake_log=True).mistake_log_entry
    model.train()
    memory = {}
    for name, k in (("exact", 0), (f"compact_top{topk}", topk)):
        log = MistakeLog(size=2, topk=k)
        log.add(entry)
        memory[name] = log.bytes_per_entry
    tokens = setup.batch_size * setup.seq_len
    return {
        "entry_shape": f"B={setup.batch_size}, T={setup.seq_len}, V={setup.vocab_size}, d_P={setup.hidden_size}",
        "exact_bytes_per_entry": memory["exact"],
        f"compact_top{topk}_bytes_per_entry": memory[f"compact_top{topk}"],
        "exact_bytes_per_token": memory["exact"] / tokens,
        f"compact_top{topk}_bytes_per_token": memory[f"compact_top{topk}"] / tokens,
        "compression": memory["exact"] / memory[f"compact_top{topk}"],
        "log_of_128_entries_exact_mb": 128 * memory["exact"] / 2**20,
        f"log_of_128_entries_compact_top{topk}_mb": 128 * memory[f"compact_top{topk}"] / 2**20,
    }


# ------------------------------------------------------------------------------------------------
# Reporting


def labelled_share(setup: dict) -> str:
    """How much of each sequence carries labels, for the table's header ("" when all of it does)."""
    share = setup.get("answer_fraction", 1.0)
    if share == 1.0:
        return ""
    return f", labels on the last {share:.0%} of each (the rest a prompt, -100)"


def write_markdown(path: str, result: dict) -> None:
    setup, rows, memory = result["setup"], result["rows"], result["mistake_log_memory"]
    lines = [
        "# Training overhead of the Copilot",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Runner: {result['runner_description']}. Pilot: LLaMA-like, hidden {setup['hidden_size']}, "
        f"{setup['num_hidden_layers']} layers, vocabulary {setup['vocab_size']}, random weights, "
        f"{result['pilot_params'] / 1e6:.1f}M parameters; batch {setup['batch_size']} x {setup['seq_len']} "
        f"synthetic tokens{labelled_share(setup)}; {result.get('optim', 'adamw_torch')}; "
        f"{'compiled (Trainer torch_compile, inductor); ' if result.get('torch_compile') else ''}"
        f"{result.get('device', 'cpu')}, "
        f"{result.get('precision', 'float32')}. "
        f"{setup['rounds']} interleaved rounds x {setup['measured_steps']} measured "
        f"steps per arm (after {setup['warmup_steps']} warm-up step per run); the Pilot's median step: "
        f"{result['pilot_step_s']:.3f} s wall, {result['pilot_step_cpu_s']:.3f} s CPU.",
        "",
        "Overhead = median step time with the Copilot / median Pilot step time - 1 (per round, then the "
        "median over rounds). FLOP ratio = analytic training FLOPs per token, Copilot / Pilot (W_in, W_out "
        "included; W_out at the labelled positions only, where the Copilot's loss needs it). "
        f"Target: overhead <= {rows[0]['target_factor']} x FLOP ratio.",
        "",
        "| target ratio | Copilot (layers x hidden) | head | Copilot params | param ratio | FLOP ratio | "
        "step (s) | overhead (wall) | per-round range | overhead (CPU time) | overhead / FLOP ratio | target met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['target_ratio']} | {row['copilot_layers']} x {row['copilot_hidden']} | "
            f"{HEAD_LABELS[row['head']]} | "
            f"{row['copilot_params'] / 1e6:.2f}M | {row['param_ratio']:.3f} | {row['flop_ratio']:.3f} | "
            f"{row['step_s']:.3f} | {row['overhead']:+.1%} | "
            f"{min(row['overhead_per_round']):+.0%} .. {max(row['overhead_per_round']):+.0%} | "
            f"{row['overhead_cpu']:+.1%} | "
            f"{row['overhead_over_flop_ratio']:.2f} | {'yes' if row['target_met'] else 'no'} |"
        )
    lines += [
        "",
        "## Where the Copilot's time goes (model level: one forward + backward, CPU seconds, median of 3)",
        "",
        "Expected = FLOP ratio x the Pilot's forward + backward. Stock layers: transformers' own `LlamaModel` "
        "layers of the Copilot's shape (layers, width, heads, MLP) on a [B,T,d_C] input, without the memory "
        "keys, W_in, W_out and the loss: what layers of this shape cost in eager PyTorch before anything the "
        "Copilot adds to them. "
        "Head + loss: W_out and the Copilot's loss "
        "alone (part of the Copilot column), as a training pass computes them (reading W_out's weight) and with "
        "f_C formed through autograd, side by side; the Mistake Log columns are not in the model's step but in "
        "CopilotTrainer's.",
        "",
        "| Copilot | Pilot | Pilot + Copilot | Copilot | expected from FLOPs | stock layers of its shape | "
        "head + loss | head + loss, f_C formed | log entry | log add (top-64) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        b = row["cpu_breakdown_s"]
        if b is None:  # a GPU run: no CPU-time breakdown
            lines.append(f"| {row['copilot_layers']} x {row['copilot_hidden']} | not measured on a GPU run |")
            continue
        # Runs before the floor was measured have no stock-layers column.
        stock_layers = f"{b['stock_layers_fwd_bwd']:.3f}" if "stock_layers_fwd_bwd" in b else "-"
        lines.append(
            f"| {row['copilot_layers']} x {row['copilot_hidden']}, {HEAD_LABELS[row['head']]} | "
            f"{b['pilot_fwd_bwd']:.3f} | "
            f"{b['pilot_copilot_fwd_bwd']:.3f} | {b['copilot_fwd_bwd']:.3f} | "
            f"{row['flop_ratio'] * b['pilot_fwd_bwd']:.3f} | {stock_layers} | {b['head_and_loss_fwd_bwd']:.3f} | "
            f"{b['head_and_loss_formed_fwd_bwd']:.3f} | "
            f"{b['mistake_log_entry']:.3f} | {b['mistake_log_add_top64']:.3f} |"
        )
    compact_key = next(k for k in memory if k.startswith("compact_top") and k.endswith("_bytes_per_entry"))
    k = compact_key.removeprefix("compact_top").removesuffix("_bytes_per_entry")
    lines += [
        "",
        f"## Mistake Log memory per entry ({memory['entry_shape']})",
        "",
        "| storage | bytes per entry | bytes per token | 128-entry log |",
        "| --- | --- | --- | --- |",
        f"| exact | {memory['exact_bytes_per_entry'] / 2**20:.1f} MiB | {memory['exact_bytes_per_token']:.0f} | "
        f"{memory['log_of_128_entries_exact_mb'] / 1024:.2f} GiB |",
        f"| compact top-{k} | {memory[compact_key] / 2**20:.2f} MiB | "
        f"{memory[f'compact_top{k}_bytes_per_token']:.0f} | "
        f"{memory[f'log_of_128_entries_compact_top{k}_mb']:.0f} MiB |",
        "",
        f"Compact storage is {memory['compression']:.0f}x smaller; what remains is mostly the Pilot states "
        "(x_tilde and h_bar, 2 x d_P floats per token).",
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

    rows = result["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    positions = range(len(rows))
    labels = [f"{row['param_ratio']:.2f}\n{row['head']}" for row in rows]
    width = 0.27
    left.bar([p - width for p in positions], [row["flop_ratio"] for row in rows], width, label="FLOP ratio")
    left.bar(positions, [row["overhead"] for row in rows], width, label="overhead (wall)")
    left.bar(
        [p + width for p in positions],
        [row["overhead_cpu"] for row in rows],
        width,
        label="overhead (CPU time)",
    )
    left.scatter(
        list(positions),
        [row["target_factor"] * row["flop_ratio"] for row in rows],
        marker="_",
        s=600,
        color="black",
        label=f"target ({rows[0]['target_factor']} x FLOP ratio)",
    )
    left.set_xticks(list(positions), labels)
    left.set_xlabel("Copilot / Pilot parameters")
    left.set_ylabel("extra time per optimizer step (fraction)")
    left.set_title("Copilot training overhead")
    left.legend(fontsize=8)
    memory = result["mistake_log_memory"]
    compact_key = next(k for k in memory if k.startswith("compact_top") and k.endswith("_bytes_per_entry"))
    right.bar(
        ["exact", compact_key.removesuffix("_bytes_per_entry").replace("_", " ")],
        [memory["exact_bytes_per_entry"] / 2**20, memory[compact_key] / 2**20],
        color=["tab:red", "tab:green"],
    )
    right.set_yscale("log")
    right.set_ylabel("MiB per entry")
    right.set_title(f"Mistake Log entry ({memory['entry_shape']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small Pilot and one round (smoke test)")
    parser.add_argument(
        "--runner",
        choices=("auto", "trainer", "model"),
        default="auto",
        help="auto: "
        "CopilotTrainer vs the stock Trainer when hf_copilot.trainer imports, else model-level steps",
    )
    parser.add_argument(
        "--shape",
        choices=("default", "1b", "tiny"),
        default="default",
        help="1b: a 1.26B Pilot, for a GPU; tiny: a 2 x 64 Pilot, vocabulary 48, where fixed costs dominate",
    )
    parser.add_argument(
        "--bf16", action="store_true", help="bf16 mixed precision for both arms (Trainer's bf16)"
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: 5, quick: 1)")
    parser.add_argument("--steps", type=int, help="measured steps per run (default: 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--ratios", type=float, nargs="+", choices=TARGET_RATIOS, help="Copilot ratios (default: all)"
    )
    parser.add_argument(
        "--heads",
        nargs="+",
        choices=tuple(HEAD_LABELS),
        default=["default"],
        help="Copilot heads per ratio, in the same interleaved rounds: default (the reweight head on the "
        "cross-entropy), linear (the paper's head on the squared error), formed / linear_formed (that head with "
        "f_C formed, as a hooked head trains), paper (the paper's feedback mode: its own predictions fed back), "
        "token_gain / no_token_embedding (the default at the same shape with token_embedding='gain' / False), "
        "no_qk_norm (the default at the same shape with qk_norm=False)",
    )
    parser.add_argument(
        "--optim",
        choices=("adamw_torch", "adamw_torch_fused"),
        default="adamw_torch",
        help="both arms' optimizer (Trainer's `optim`): adamw_torch steps tensor by tensor on CPU, as the "
        "committed tables did; adamw_torch_fused, Trainer's default, in one kernel per parameter group",
    )
    parser.add_argument(
        "--torch-compile",
        action="store_true",
        help="both arms with Trainer's torch_compile (inductor); each run compiles during its warm-up steps",
    )
    parser.add_argument(
        "--answer-fraction",
        type=float,
        default=1.0,
        help="the labelled share at the end of each sequence, the rest a prompt with labels -100 (default 1: "
        "every position labelled); both arms train on the same batches",
    )
    parser.add_argument("--output-dir", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if not 0.0 < args.answer_fraction <= 1.0:
        parser.error("--answer-fraction must be in (0, 1]")
    if (args.optim != "adamw_torch" or args.torch_compile) and args.runner == "model":
        parser.error("--optim and --torch-compile need the trainer runner")
    if args.torch_compile:
        # Every run compiles anew (a new Trainer); dynamo's default limit of 8 per function would send later
        # runs back to eager.
        torch._dynamo.config.recompile_limit = 64

    setup = QUICK if args.quick else {"1b": ONE_B, "tiny": TINY}.get(args.shape, Setup())
    if args.bf16 and args.runner == "model":
        parser.error("--bf16 needs the trainer runner")
    if args.rounds:
        setup.rounds = args.rounds
    if args.steps:
        setup.measured_steps = args.steps
    setup.answer_fraction = args.answer_fraction
    if args.threads:
        torch.set_num_threads(args.threads)
    runner = args.runner
    if runner == "auto":
        runner = "trainer" if copilot_trainer_classes() is not None else "model"
    if runner == "trainer" and copilot_trainer_classes() is None:
        parser.error("--runner trainer needs hf_copilot.trainer (CopilotTrainer)")
    run = run_trainer if runner == "trainer" else run_model_steps
    hf_logging.set_verbosity_error()
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())

    torch.manual_seed(0)
    pilot = LlamaForCausalLM(pilot_config(setup))
    pilot_params = sum(p.numel() for p in pilot.parameters())
    pilot_flops = pilot_train_flops_per_token(pilot.config, setup.seq_len)
    arms = []
    # A 1B Pilot on a GPU: the ratios of the GPU target (ratio 1 would double a long run).
    ratios = args.ratios or (TARGET_RATIOS[:2] if args.shape == "1b" else TARGET_RATIOS)
    for target, head in itertools.product(ratios, args.heads):
        config = copilot_for_ratio(target, setup, pilot_params)
        if head.startswith("linear"):
            config.error_form = "linear"
        if head in TOKEN_TERMS:  # the same shape, another token term: what the default's table costs
            config.token_embedding = TOKEN_TERMS[head]
        if head == "no_qk_norm":  # the same shape without what the default's query and key norms cost
            config.qk_norm = False
        # paper: the paper's feedback mode with its defaults (the linear head, memory_norm); CopilotTrainer then
        # feeds the Copilot its own first-pass predictions at answer positions (copilot_feedback_fraction=1).
        feedback = "copilot" if head == "paper" else "observed"
        model = PilotCopilotForCausalLM.from_pilot(pilot, config, copilot_feedback=feedback)
        if head.endswith("formed"):  # a hooked head runs its forward: training then forms f_C
            model.copilot.error_head.register_forward_hook(lambda module, inputs, output: None)
        params = sum(p.numel() for p in model.copilot.parameters())
        assert params == copilot_param_count(model.copilot.config, setup.hidden_size, setup.vocab_size), (
            "parameter formula"
        )
        flops = copilot_train_flops_per_token(
            model.copilot.config, setup.hidden_size, setup.vocab_size, setup.seq_len, setup.answer_fraction
        )
        arms.append(
            {
                "target": target,
                "head": head,
                "config": config,
                "model": model,
                "params": params,
                "flops": flops,
            }
        )
    memory = mistake_log_memory(arms[0]["model"], setup)
    on_gpu = torch.cuda.is_available()
    for arm in tqdm(arms, desc="CPU-time breakdown", unit="arm", disable=on_gpu):
        # Process CPU time says nothing about GPU kernels; the breakdown is a CPU measurement.
        arm["breakdown"] = None if on_gpu else component_breakdown(arm["model"], setup)

    steps_per_run = setup.warmup_steps + setup.measured_steps
    total = setup.rounds * (1 + len(arms)) * steps_per_run
    pilot_times: list[list[tuple[float, float]]] = []
    arm_times: list[list[list[tuple[float, float]]]] = [[] for _ in arms]
    with tqdm(total=total, desc="optimizer steps", unit="step") as progress:
        for round_index in range(setup.rounds):
            order = [None, *range(len(arms))]
            if round_index % 2:
                order.reverse()
            for which in order:
                model = pilot if which is None else arms[which]["model"]
                extra = ({"bf16": True} if args.bf16 else {}) | (
                    {"optim": args.optim, "torch_compile": args.torch_compile} if run is run_trainer else {}
                )
                wall, cpu = run(model, setup, progress, which is not None, seed=round_index, **extra)
                (pilot_times if which is None else arm_times[which]).append(list(zip(wall, cpu, strict=True)))

    def median(runs, index):
        return statistics.median(t[index] for run_ in runs for t in run_)

    rows = []
    for arm, times in zip(arms, arm_times, strict=True):
        per_round = [
            statistics.median(t[0] for t in c) / statistics.median(t[0] for t in p) - 1
            for c, p in zip(times, pilot_times, strict=True)
        ]
        per_round_cpu = [
            statistics.median(t[1] for t in c) / statistics.median(t[1] for t in p) - 1
            for c, p in zip(times, pilot_times, strict=True)
        ]
        flop_ratio = arm["flops"] / pilot_flops
        overhead = statistics.median(per_round)
        rows.append(
            {
                "target_ratio": arm["target"],
                "head": arm["head"],
                "copilot_layers": arm["config"].num_hidden_layers,
                "copilot_hidden": arm["config"].hidden_size,
                "copilot_heads": arm["config"].num_attention_heads,
                "copilot_intermediate": arm["config"].intermediate_size,
                "copilot_params": arm["params"],
                "param_ratio": arm["params"] / pilot_params,
                "copilot_flops_per_token": arm["flops"],
                "flop_ratio": flop_ratio,
                "step_s": median(times, 0),
                "step_cpu_s": median(times, 1),
                "overhead": overhead,
                "overhead_per_round": per_round,
                "overhead_cpu": statistics.median(per_round_cpu),
                "overhead_over_flop_ratio": overhead / flop_ratio,
                "target_factor": TARGET_FACTOR[args.shape],
                "target_met": overhead <= TARGET_FACTOR[args.shape] * flop_ratio,
                "step_times_s": times,
                "cpu_breakdown_s": arm["breakdown"],
            }
        )
    command = "python benchmarks/training_overhead.py" + (
        " " + " ".join(sys.argv[1:]) if argv is None else ""
    )
    result = {
        "command": command.strip(),
        "runner": runner,
        "runner_description": (
            "stock `Trainer` on the Pilot vs `CopilotTrainer` (CopilotTrainingArguments defaults: the Copilot "
            "trains on the fresh entry and the Mistake Log keeps no entries; the Copilot-only phase after the "
            "joint steps is off, copilot_final_epochs=0) on Pilot + Copilot"
            if runner == "trainer"
            else "model-level step (forward with labels + backward + AdamW), Pilot alone vs Pilot + Copilot"
        ),
        "setup": asdict(setup),
        "precision": "bf16 mixed" if args.bf16 else "float32",
        "optim": args.optim,
        "torch_compile": args.torch_compile,
        "device": "cuda" if on_gpu else "cpu",
        "pilot_params": pilot_params,
        "pilot_flops_per_token": pilot_flops,
        "pilot_step_s": median(pilot_times, 0),
        "pilot_step_cpu_s": median(pilot_times, 1),
        "pilot_step_times_s": pilot_times,
        "rows": rows,
        "mistake_log_memory": memory,
        "machine": machine_info(),
        "load_average_start": load_start,
        "load_average_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "notes": NOTES,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    variant = (
        ("" if args.shape == "default" else f"_{args.shape}")
        + ("_bf16" if args.bf16 else "")
        + ("_cuda" if on_gpu else "")
        + ("" if args.optim == "adamw_torch" else f"_{args.optim}")
        + ("_compiled" if args.torch_compile else "")
        + ("" if args.answer_fraction == 1.0 else f"_answers{round(100 * args.answer_fraction)}")
    )
    stem = os.path.join(args.output_dir, "training_overhead" + variant + ("_quick" if args.quick else ""))
    with open(stem + ".json", "w") as handle:
        json.dump(result, handle, indent=2)
    write_markdown(stem + ".md", result)
    write_plot(stem + ".png", result)
    for row in rows:
        print(
            f"ratio {row['param_ratio']:.3f}: FLOP ratio {row['flop_ratio']:.3f}, overhead {row['overhead']:+.1%} "
            f"(CPU {row['overhead_cpu']:+.1%}), target {'met' if row['target_met'] else 'missed'}"
        )
    print(f"wrote {stem}.json/.md/.png")
    return result


if __name__ == "__main__":
    main()
