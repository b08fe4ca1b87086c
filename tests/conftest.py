"""Shared tiny-model fixtures: random-weight Pilots built from configs, never downloaded.

Every Pilot has hidden size 32, 2 layers, 4 heads and a vocabulary of `VOCAB_SIZE` (64) tokens, with
`PAD_TOKEN_ID`/`BOS_TOKEN_ID`/`EOS_TOKEN_ID` inside it, is seeded with `torch.manual_seed` and put
in `.eval()`. A forward pass takes milliseconds, so tests can afford several architectures.

Helpers (plain functions, also importable: `from conftest import build_pilot`):
- `PILOT_ARCHITECTURES`: "llama", "qwen2", "mistral", "gpt2", "phi3", "gemma".
- `build_pilot(arch, seed=0, **config_overrides)`: a tiny random Pilot of that architecture.
- `build_pilot_copilot(arch_or_pilot, copilot_config=None, copilot_std=0.5, seed=0, **fusion)`:
  `PilotCopilotForCausalLM.from_pilot(pilot, CopilotConfig(hidden_size=32, num_hidden_layers=2,
  num_attention_heads=4), **fusion)` in eval mode, with the Copilot's Linear weights re-drawn with
  std `copilot_std` (the default init, std 0.02, predicts errors too small to change a decision;
  0.5 makes the Copilot visible in fused scores and generated tokens). `fusion` takes
  `copilot_lambda`, `fusion`, `copilot_feedback`. Pass a Pilot instead of an architecture name to
  wrap that very model.
- `build_batch(batch_size=2, seq_len=8, left_padding=(0, 3), prompt_len=2, seed=0)`: a dict with
  `input_ids`, `attention_mask`, `labels` (-100 on padding and on the first `prompt_len` real
  tokens of each row), left-padded with `PAD_TOKEN_ID`.
- `padded_position_ids(attention_mask)`: positions that restart at 0 on the first real token (what
  generate() passes), needed by absolute-position Pilots (GPT-2) under left padding.
- `build_multimodal_pilot(seed=0)`: a tiny Gemma 3 Pilot with a vision tower (Gemma3ForConditionalGeneration,
  what AutoModelForCausalLM loads for Gemma 3 checkpoints); `multimodal_example(text_before, text_after, seed)`:
  one example for it, its tokens around one image, with `token_type_ids` and `pixel_values`.

Importing this file sets `torch.set_num_threads(1)`: tiny models run faster on one thread, and
subprocesses that must reproduce this process's numbers bit for bit should set OMP_NUM_THREADS=1.

Fixtures:
- `arch`: parametrized over `PILOT_ARCHITECTURES` (a test that takes it runs once per Pilot family).
- `make_pilot`, `make_pilot_copilot`, `make_batch`: the helpers above, as factory fixtures.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3Config,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hf_copilot import CopilotConfig, PilotCopilotForCausalLM
from hf_copilot.modeling_copilot import TokenGain

# Tiny models gain nothing from intra-op threads; on a busy machine the thread pool's spinning
# made the suite several times slower than this.
torch.set_num_threads(1)

# The Hub-facing files a save copies next to the weights (for trust_remote_code), per wrapper.
SHARED_HUB_FILES = {
    "checkpointing.py",
    "configuration_pilot_copilot.py",
    "generation_pilot_copilot.py",
    "mistake_log_entry.py",
    "modeling_copilot.py",
}
CAUSAL_HUB_FILES = SHARED_HUB_FILES | {"modeling_pilot_copilot.py"}
SEQ2SEQ_HUB_FILES = SHARED_HUB_FILES | {"modeling_pilot_copilot_seq2seq.py"}
VOCAB_SIZE = 64
HIDDEN_SIZE = 32
PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 1, 2
FIRST_REGULAR_TOKEN = 3  # random batches avoid the special tokens

_SPECIAL_TOKENS = dict(pad_token_id=PAD_TOKEN_ID, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID)
_DECODER = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=HIDDEN_SIZE,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    **_SPECIAL_TOKENS,
)

# arch -> (config class, model class, config kwargs)
_PILOTS = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(_DECODER, num_key_value_heads=2)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(_DECODER, num_key_value_heads=2)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(_DECODER, num_key_value_heads=2)),
    # Absolute positions and tied input/output embeddings.
    "gpt2": (
        GPT2Config,
        GPT2LMHeadModel,
        dict(
            vocab_size=VOCAB_SIZE, n_embd=HIDDEN_SIZE, n_layer=2, n_head=4, n_positions=64, **_SPECIAL_TOKENS
        ),
    ),
    # Fused qkv / gate_up projections.
    "phi3": (Phi3Config, Phi3ForCausalLM, dict(_DECODER, num_key_value_heads=4)),
    # Scaled embeddings (hidden_states[0] is not the raw embedding) and tied embeddings.
    "gemma": (GemmaConfig, GemmaForCausalLM, dict(_DECODER, num_key_value_heads=2, head_dim=8)),
}
PILOT_ARCHITECTURES = tuple(_PILOTS)


def tiny_pilot_config(arch: str, **config_overrides):
    config_class, _, kwargs = _PILOTS[arch]
    return config_class(**{**kwargs, **config_overrides})


def build_pilot(arch: str, seed: int = 0, **config_overrides) -> PreTrainedModel:
    """A tiny random Pilot; the same `arch` and `seed` give the same weights."""
    _, model_class, _ = _PILOTS[arch]
    torch.manual_seed(seed)
    return model_class(tiny_pilot_config(arch, **config_overrides)).eval()


# A multimodal Pilot as AutoModelForCausalLM loads Gemma 3 (Gemma3ForConditionalGeneration): text tokens and
# images, each image one run of IMAGE_TOKENS tokens between its begin and end tokens.
IMAGE_TOKEN_ID, IMAGE_BEGIN_ID, IMAGE_END_ID, IMAGE_TOKENS = VOCAB_SIZE - 1, VOCAB_SIZE - 3, VOCAB_SIZE - 2, 4
IMAGE_SIZE = 32


def build_multimodal_pilot(seed: int = 0) -> PreTrainedModel:
    """A tiny random Gemma 3 Pilot with a vision tower, built through AutoModelForCausalLM as its checkpoints load."""
    config = Gemma3Config(
        text_config=dict(_DECODER, num_key_value_heads=2, head_dim=8, sliding_window=16),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=8,
        ),
        mm_tokens_per_image=IMAGE_TOKENS,
        image_token_index=IMAGE_TOKEN_ID,
        boi_token_index=IMAGE_BEGIN_ID,
        eoi_token_index=IMAGE_END_ID,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def multimodal_example(text_before: int, text_after: int, seed: int) -> dict[str, torch.Tensor]:
    """Tokens around one image, the image's `token_type_ids` (1 on its tokens) and its pixels [3, H, W]."""
    generator = torch.Generator().manual_seed(seed)
    image = [IMAGE_BEGIN_ID] + [IMAGE_TOKEN_ID] * IMAGE_TOKENS + [IMAGE_END_ID]
    before, after = (
        torch.randint(FIRST_REGULAR_TOKEN, IMAGE_BEGIN_ID, (n,), generator=generator).tolist()
        for n in (text_before, text_after)
    )
    input_ids = torch.tensor([BOS_TOKEN_ID, *before, *image, *after])
    return {
        "input_ids": input_ids,
        "token_type_ids": (input_ids == IMAGE_TOKEN_ID).long(),
        "pixel_values": torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
    }


def tiny_copilot_config(**overrides) -> CopilotConfig:
    return CopilotConfig(**{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, **overrides})


def token_term(copilot, tokens: torch.Tensor) -> torch.Tensor:
    """What `CopilotConfig.token_embedding` adds to the rows of errors about `tokens` [..., d_C], by indexing: E[x]
    for the table, g * W_in[:, x] for the gains, zeros without."""
    embedding = copilot.token_embedding
    if embedding is None:
        return copilot.error_proj.weight.new_zeros(*tokens.shape, copilot.config.hidden_size)
    if isinstance(embedding, TokenGain):
        return embedding.weight * copilot.error_proj.weight.t()[tokens]
    return embedding.weight[tokens]


@torch.no_grad()
def randomize_copilot(model: PilotCopilotForCausalLM, std: float = 0.5, seed: int = 0) -> None:
    """Re-draw every Linear weight of the Copilot (and its token embedding) with a large std so its effect is
    visible."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.copilot.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, TokenGain)):
            weight = torch.randn(module.weight.shape, generator=generator) * std
            module.weight.copy_(weight.to(module.weight.dtype))


def build_pilot_copilot(
    arch_or_pilot: str | PreTrainedModel = "llama",
    copilot_config: CopilotConfig | None = None,
    copilot_std: float | None = 0.5,
    seed: int = 0,
    **fusion,
) -> PilotCopilotForCausalLM:
    """A tiny Pilot (or the given one) wrapped with a tiny Copilot; `copilot_std=None` keeps the default init."""
    pilot = build_pilot(arch_or_pilot, seed=seed) if isinstance(arch_or_pilot, str) else arch_or_pilot
    model = PilotCopilotForCausalLM.from_pilot(pilot, copilot_config or tiny_copilot_config(), **fusion)
    if copilot_std is not None:
        randomize_copilot(model, copilot_std, seed=seed + 1)
    return model.eval()


def build_batch(
    batch_size: int = 2,
    seq_len: int = 8,
    left_padding: tuple[int, ...] = (0, 3),
    prompt_len: int = 2,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Left-padded random tokens; `left_padding[i]` pad tokens in row i (cycled over the rows)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(FIRST_REGULAR_TOKEN, VOCAB_SIZE, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    labels = input_ids.clone()
    for row in range(batch_size):
        pad = left_padding[row % len(left_padding)] if left_padding else 0
        input_ids[row, :pad] = PAD_TOKEN_ID
        attention_mask[row, :pad] = 0
        labels[row, : pad + prompt_len] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def padded_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def graph_recorder() -> tuple[Callable, list]:
    """A torch.compile backend that records each graph it compiles and runs it as is (a function, so that
    generate()'s copy of the generation config keeps recording into the same list)."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    return backend, graphs


@pytest.fixture(params=PILOT_ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture
def make_pilot():
    return build_pilot


@pytest.fixture
def make_pilot_copilot():
    return build_pilot_copilot


@pytest.fixture
def make_batch():
    return build_batch


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character over the tiny Pilots' 64 ids; 0-2 are pad/bos/eos as in conftest."""
    characters = "abcdefghijklmnopqrstuvwxyz0123456789 ABCDEFGHIJKLMNOPQRSTUVWX"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(characters)}
    assert len(vocab) == VOCAB_SIZE
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


def run_without_hf_copilot(script: str, cwd, *args) -> subprocess.CompletedProcess:
    """Run Python source `script` (with `args` as sys.argv[1:]) where only transformers is installed: a new
    interpreter that cannot import hf_copilot, offline, copying remote code under `cwd`, one thread as here (so
    the arithmetic is the same). Asserts that it succeeded."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(Path(cwd) / "modules"),
        "PYTHONPATH": "",
        "OMP_NUM_THREADS": "1",
    }
    code = 'import sys\nsys.modules["hf_copilot"] = None  # how Python spells "not installed"\n' + script
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def assert_card_usage_prints_the_models_generation(folder, model, tokenizer, cwd) -> None:
    """The python block of the model card in `folder`, run where hf_copilot is absent, prints what `model`
    generates for the card's prompt."""
    from hf_copilot.hub import README_NAME, USAGE_PROMPT

    code = (Path(folder) / README_NAME).read_text().split("```python\n", 1)[1].split("```", 1)[0]
    result = run_without_hf_copilot(code, cwd)
    with torch.no_grad():
        inputs = tokenizer([USAGE_PROMPT], return_tensors="pt")
        expected = tokenizer.batch_decode(
            model.generate(**inputs, max_new_tokens=32), skip_special_tokens=True
        )
    assert result.stdout.strip() == repr(expected)
