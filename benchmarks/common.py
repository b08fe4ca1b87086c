"""Pieces the benchmarks share: analytic parameter counts, the machine description, a run's set-up and command, the
commands of merged results, the JSON and markdown a result folder holds."""

from __future__ import annotations

import copy
import json
import os
import platform
import sys

import torch
import transformers

from hf_copilot import CopilotConfig


def layer_matmul_params(d: int, heads: int, kv_heads: int, ff: int) -> tuple[int, int, int]:
    """(q + o, k + v, MLP) weight counts of one decoder layer."""
    head_dim = d // heads
    return 2 * d * heads * head_dim, 2 * d * kv_heads * head_dim, 3 * d * ff


def copilot_param_count(copilot: CopilotConfig, pilot_hidden: int, vocab: int) -> int:
    """The Copilot's parameters; fields left to the feedback mode counted as a Copilot built for observed feedback
    gets them."""
    copilot = copy.deepcopy(copilot)
    copilot.resolve_for_feedback("observed")  # fills only the fields left unset
    d = copilot.hidden_size
    qo, kv, mlp = layer_matmul_params(
        d, copilot.num_attention_heads, copilot.num_key_value_heads, copilot.intermediate_size
    )
    memory_proj = pilot_hidden * d if pilot_hidden != d else 0
    memory_norm = pilot_hidden if copilot.memory_norm else 0
    projected_memory_norm = d if copilot.projected_memory_norm else 0
    vocabulary_tables = (3 if copilot.token_embedding is True else 2) * vocab * d  # W_in, W_out (and E)
    token_gain = d if copilot.token_embedding == "gain" else 0
    qk_norms = 2 * copilot.head_dim if copilot.qk_norm else 0
    layers = copilot.num_hidden_layers * (qo + kv + mlp + 2 * d + qk_norms)
    return vocabulary_tables + token_gain + memory_proj + memory_norm + projected_memory_norm + layers + d


def single_thread_run(script: str) -> str:
    """One torch thread, and transformers' logs and progress bars off (a run prints its own progress); returns
    the command that reproduces this run of `script`, as its results record it."""
    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return f"python benchmarks/{script} " + " ".join(sys.argv[1:])


def merged_commands(results: list[dict], command: str) -> list[str]:
    """What reproduces records merged from `results` (loaded result files): each run's command once, earlier merges
    left out, then this merge's `command`."""
    earlier = [c for result in results for c in result["commands"] if "--from-records" not in c]
    return [*dict.fromkeys(earlier), command]


def write_json_and_markdown(output: str, stem: str, payload: dict, markdown_text: str) -> None:
    """`{stem}.json` (the payload) and `{stem}.md` in the folder `output`, made if missing: what a result folder
    holds beside its plots."""
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, f"{stem}.json"), "w") as handle:
        json.dump(payload, handle, indent=1)
    with open(os.path.join(output, f"{stem}.md"), "w") as handle:
        handle.write(markdown_text)


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
        # PyTorch's switch for backing large CPU tensors with huge pages: it changes what page faults cost.
        **{key: os.environ[key] for key in ("THP_MEM_ALLOC_ENABLE",) if key in os.environ},
    }
