"""Pieces the benchmarks share: analytic parameter counts, the machine description, the commands of merged results."""

from __future__ import annotations

import os
import platform

import torch

from hf_copilot import CopilotConfig


def layer_matmul_params(d: int, heads: int, kv_heads: int, ff: int) -> tuple[int, int, int]:
    """(q + o, k + v, MLP) weight counts of one decoder layer."""
    head_dim = d // heads
    return 2 * d * heads * head_dim, 2 * d * kv_heads * head_dim, 3 * d * ff


def copilot_param_count(copilot: CopilotConfig, pilot_hidden: int, vocab: int) -> int:
    d = copilot.hidden_size
    qo, kv, mlp = layer_matmul_params(
        d, copilot.num_attention_heads, copilot.num_key_value_heads, copilot.intermediate_size
    )
    memory_proj = pilot_hidden * d if pilot_hidden != d else 0
    memory_norm = pilot_hidden if copilot.memory_norm else 0
    projected_memory_norm = d if copilot.projected_memory_norm else 0
    vocabulary_tables = (3 if copilot.token_embedding is True else 2) * vocab * d  # W_in, W_out (and E)
    token_gain = d if copilot.token_embedding == "gain" else 0
    layers = copilot.num_hidden_layers * (qo + kv + mlp + 2 * d)
    return vocabulary_tables + token_gain + memory_proj + memory_norm + projected_memory_norm + layers + d


def merged_commands(results: list[dict], command: str) -> list[str]:
    """What reproduces records merged from `results` (loaded result files): each run's command once, earlier merges
    left out, then this merge's `command`."""
    earlier = [c for result in results for c in result["commands"] if "--from-records" not in c]
    return [*dict.fromkeys(earlier), command]


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import transformers

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }
