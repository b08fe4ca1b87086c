"""Checkpoints in and out: a folder's kind read as data (never by running its code), loaded tensors checked
against the model, the Pilot fingerprint (who a Copilot learnt from) checked when a Copilot is attached,
a PEFT Pilot's adapters recorded and applied again, a Copilot initialised from a pretrained decoder, and
saves that never leave a half-written folder.

Hub-facing: copied next to checkpoints for `trust_remote_code`, so it imports nothing from hf_copilot.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import uuid
import warnings
from contextlib import contextmanager
from typing import Any

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from .configuration_pilot_copilot import INITIAL_ERROR_NORM, T5_MODEL_TYPES

HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only")  # where a checkpoint's files come from
FINGERPRINT_TENSORS = 16  # tensors sampled for the fingerprint
FINGERPRINT_VALUES = 8  # values sampled per tensor


def pilot_fingerprint(pilot: PreTrainedModel) -> str:
    """Who the Copilot learnt from: a hash of the Pilot's architecture, a fixed sample of its weights and
    a readable summary of its architecture.

    `"<architecture hash>:<base64 float32 samples>:<summary>"`, the summary being
    `model_type=...,num_hidden_layers=...,num_tensors=...,num_parameters=...` so that a refusal can say
    what differs. The samples are compared with a tolerance (`same_pilot`), so the same Pilot loaded in
    bfloat16 or float16 matches while a fine-tuned or other Pilot does not. Fingerprints without the
    summary (written before it existed) are read as well. A peft `PeftModel` is read as its base model with the
    adapter layers in it: the same tensors as when transformers loads the adapter folder (`from_pretrained`).
    """
    if hasattr(pilot, "get_base_model"):
        pilot = pilot.get_base_model()
    state = sorted(pilot.state_dict().items())
    config = pilot.config.to_dict()
    identity = {
        key: config.get(key) for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")
    }
    identity["tensors"] = [(name, list(tensor.shape)) for name, tensor in state]
    architecture = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    chosen = state[:: max(1, len(state) // FINGERPRINT_TENSORS)][:FINGERPRINT_TENSORS]
    samples = [
        tensor.detach().flatten()[:: max(1, tensor.numel() // FINGERPRINT_VALUES)][:FINGERPRINT_VALUES]
        for _, tensor in chosen
    ]
    values = torch.cat([sample.float().cpu() for sample in samples]).numpy().astype("<f4")
    summary = {
        "model_type": config.get("model_type"),
        # The attribute, not the dict: GPT-2 style configs store it as n_layer.
        "num_hidden_layers": getattr(pilot.config.get_text_config(), "num_hidden_layers", None),
        "num_tensors": len(state),
        "num_parameters": sum(tensor.numel() for _, tensor in state),
    }
    summary = ",".join(f"{key}={value}" for key, value in summary.items())
    return f"{architecture}:{base64.b64encode(values.tobytes()).decode()}:{summary}"


def same_pilot(expected: str, actual: str, rtol: float = 2e-2) -> bool:
    """Whether two fingerprints name the same Pilot, up to half-precision rounding (~0.4% for bfloat16)."""
    expected_arch, expected_values = expected.split(":")[:2]
    actual_arch, actual_values = actual.split(":")[:2]
    if expected_arch != actual_arch:
        return False
    a = torch.frombuffer(bytearray(base64.b64decode(expected_values)), dtype=torch.float32)
    b = torch.frombuffer(bytearray(base64.b64decode(actual_values)), dtype=torch.float32)
    return a.shape == b.shape and bool(torch.allclose(b, a, rtol=rtol, atol=1e-6))


# What differs, in words, by field of the fingerprint's summary: given here, recorded in the Copilot's.
SUMMARY_DIFFERENCES = {
    "model_type": "model type {} here, {} in the Copilot's Pilot",
    "num_hidden_layers": "number of layers {} here, {} in the Copilot's Pilot",
    "num_tensors": "tensor names differ ({} tensors here, {} in the Copilot's Pilot)",
    "num_parameters": "tensor shapes differ ({} parameters here, {} in the Copilot's Pilot)",
}


def fingerprint_summary(fingerprint: str) -> dict[str, str]:
    """The readable part of a fingerprint; {} for one written before it existed."""
    parts = fingerprint.split(":")
    return dict(item.split("=", 1) for item in parts[2].split(",")) if len(parts) > 2 else {}


def fingerprint_difference(expected: str, actual: str) -> str:
    """What sets the Pilot of fingerprint `actual` apart from the one `expected` records, in words."""
    if expected.split(":")[0] == actual.split(":")[0]:
        return "same architecture, but its weights differ: a fine-tuned Pilot or another checkpoint"
    recorded, given = fingerprint_summary(expected), fingerprint_summary(actual)
    changed = [
        key for key in SUMMARY_DIFFERENCES if key in recorded and key in given and recorded[key] != given[key]
    ]
    # Another model type or number of layers explains the tensors; otherwise the tensors show the difference.
    shown = [key for key in changed if key in ("model_type", "num_hidden_layers")] or changed[:1]
    details = "; ".join(SUMMARY_DIFFERENCES[key].format(given[key], recorded[key]) for key in shown)
    return f"its architecture differs: {details or 'tensor names or shapes differ'}"


def check_copilot_fits_pilot(copilot_config, pilot: PreTrainedModel, allow_other_pilot: bool = False) -> None:
    """Refuse to attach a Copilot to a Pilot other than the one it was trained with, saying what differs.

    `allow_other_pilot=True` turns a refusal into a warning, except for another vocabulary or hidden size,
    which the Copilot cannot read at all.
    """
    text = pilot.config.get_text_config()
    sizes = [
        f"{label} {given} here, {recorded} in the Copilot's Pilot"
        for label, recorded, given in (
            ("vocabulary size", copilot_config.vocab_size, text.vocab_size),
            ("hidden size", copilot_config.pilot_hidden_size, text.hidden_size),
        )
        if recorded != given
    ]
    if sizes:
        raise ValueError(
            f"This Copilot does not fit this Pilot ({'; '.join(sizes)}): a Copilot reads its Pilot's hidden "
            "states and predicts over its vocabulary, so not even allow_other_pilot=True attaches it. Load it "
            f"onto the Pilot it was trained with ({copilot_config.base_model_name_or_path or 'not named'})."
        )
    expected = copilot_config.pilot_fingerprint
    if expected is None:
        if not allow_other_pilot:
            raise ValueError(
                "This Copilot checkpoint records no pilot_fingerprint, so nothing shows that this is the Pilot it "
                "was trained with. Save it again with save_copilot (which records the fingerprint), or pass "
                "allow_other_pilot=True to attach it without the check."
            )
        warnings.warn(
            "Attaching a Copilot without checking its Pilot: the checkpoint records no pilot_fingerprint.",
            stacklevel=3,
        )
        return
    actual = pilot_fingerprint(pilot)
    if same_pilot(expected, actual):
        return
    difference = fingerprint_difference(expected, actual)
    if not allow_other_pilot:
        raise ValueError(
            f"This Copilot was trained with a different Pilot ({difference}). A Copilot trained jointly "
            "belongs to the fine-tuned Pilot: save that Pilot (pilot.save_pretrained) and load the Copilot "
            "onto it, or pass allow_other_pilot=True to attach it to this one on purpose."
        )
    warnings.warn(f"Attaching a Copilot trained with another Pilot: {difference}.", stacklevel=3)


def read_checkpoint_config(
    path: str | os.PathLike, config: Any, model_types: tuple[str, ...], **hub_kwargs
) -> dict[str, Any]:
    """A checkpoint's config as plain data (from `config` when one is given) that names one of `model_types`.

    Read without AutoConfig, which imports the code an `auto_map` names: loading a folder runs none of it.
    """
    if isinstance(config, PreTrainedConfig):
        config_dict = config.to_dict()
    else:
        config_dict, _ = PreTrainedConfig.get_config_dict(config or path, **hub_kwargs)
    model_type = config_dict.get("model_type")
    if model_type not in model_types:
        raise ValueError(
            f"{os.fspath(path)} is a plain model folder (model_type {model_type!r}), not a Pilot+Copilot or "
            "Copilot checkpoint. Attach a Copilot to that model with "
            "PilotCopilotForCausalLM.from_pilot(AutoModelForCausalLM.from_pretrained(path))."
        )
    return config_dict


def check_loaded_tensors(loading_info: dict, checkpoint: str | os.PathLike) -> None:
    """Refuse a checkpoint whose tensors are not the model's: a missing one would stay randomly initialised.

    `loading_info` is what `from_pretrained(..., output_loading_info=True)` returns (tied weights are not
    missing there).
    """
    problems = []
    for kind in ("missing", "unexpected"):
        keys = sorted(loading_info[f"{kind}_keys"])
        if keys:
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            problems.append(f"{kind} tensors: {len(keys)} ({shown})")
    if not problems:
        return
    fix = (
        "Save the checkpoint again from the trained model (save_pretrained for the whole model, save_copilot "
        "for a Copilot)."
    )
    if any(key.startswith(PEFT_PILOT_PREFIX) for key in loading_info["unexpected_keys"]):
        # Written before config.json recorded the Pilot's adapter (pilot_peft_config): nothing says how to rebuild it.
        fix = (
            f"Its Pilot carried a PEFT adapter ({PEFT_PILOT_PREFIX}* tensors) that config.json does not record. "
            "Rebuild the model as it was trained and load the file into it: pilot = get_peft_model(base_pilot, "
            "lora_config); model = PilotCopilotForCausalLM.from_pilot(pilot, copilot_config); "
            "model.load_state_dict(safetensors.torch.load_file(<checkpoint>/model.safetensors)); then "
            "model.save_pretrained(path) writes a folder that loads (it records the adapter)."
        )
    raise ValueError(
        f"The weights in {os.fspath(checkpoint)} are not those of the model its config.json describes "
        f"({'; '.join(problems)}): a missing tensor would be left randomly initialised. {fix}"
    )


PEFT_PILOT_PREFIX = "pilot.base_model.model."  # a PEFT Pilot's tensors inside the wrapper


def pilot_adapter_configs(pilot: torch.nn.Module) -> dict[str, dict] | None:
    """The PEFT adapters of a Pilot that is a `PeftModel`, as JSON data ({adapter name: config}); None otherwise.

    The active adapter comes first. Read without importing peft: a plain Pilot needs none.
    """
    configs = getattr(pilot, "peft_config", None)
    if not isinstance(configs, dict) or not hasattr(pilot, "get_base_model"):
        return None
    active = getattr(pilot, "active_adapter", None)
    names = sorted(configs, key=lambda name: name != active)
    # As peft writes adapter_config.json: sets become lists.
    return {name: json.loads(json.dumps(configs[name].to_dict(), default=sorted)) for name in names}


def apply_pilot_adapters(pilot: PreTrainedModel, configs: dict[str, dict]) -> torch.nn.Module:
    """Wrap a Pilot in the PEFT adapters `pilot_adapter_configs` recorded, so that its tensors are a PEFT Pilot's."""
    try:
        from peft import PeftConfig, get_peft_model
    except ImportError as error:  # in a try block: checkpoints without an adapter load without peft
        raise ImportError(
            "This checkpoint's Pilot carries a PEFT adapter (pilot_peft_config in config.json): pip install peft "
            "to load it, or save it again with the adapter merged into the Pilot: "
            "model.pilot = model.pilot.merge_and_unload(); model.save_pretrained(path)."
        ) from error
    (name, config), *others = configs.items()
    # The base peft names in the adapter: the Pilot's own path, as when the adapter was first applied.
    pilot.name_or_path = config.get("base_model_name_or_path") or ""
    pilot = get_peft_model(pilot, PeftConfig.from_peft_type(**config), adapter_name=name)
    for name, config in others:
        pilot.add_adapter(name, PeftConfig.from_peft_type(**config))
    return pilot


STALE_WEIGHTS = re.compile(r"(model|copilot)(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
RENAME_EXCHANGE = 2  # renameat2 flag, linux/fs.h
AT_FDCWD = -100


@contextmanager
def atomic_save_directory(save_directory: str | os.PathLike):
    """Yield a new folder next to `save_directory`; once the body succeeds it replaces that folder in one step.

    A failure or a crash at any point leaves `save_directory` entirely old or entirely new: the complete
    new folder is swapped in by one rename (new or empty destination) or one renameat2(RENAME_EXCHANGE)
    (Linux); elsewhere two renames leave a short window without it. Files of an existing folder that the
    save does not write are carried over (hard links), except weight files of an earlier save (stale
    shards, as save_pretrained removes them).
    """
    target = os.path.realpath(os.fspath(save_directory))
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    os.mkdir(staging)  # mkdir (not mkdtemp) keeps the umask's permissions on the final folder
    try:
        yield staging
        if not os.path.isdir(target) or not os.listdir(target):
            os.replace(staging, target)  # a new or empty destination: one rename
            return
        carry_over(target, staging)
        os.chmod(staging, stat.S_IMODE(os.stat(target).st_mode))
        if not exchange_directories(staging, target):
            # A crash between the two renames leaves the old folder at `old` (not *.tmp: not swept away).
            old = os.path.join(parent, f".{name}.{uuid.uuid4().hex[:8]}.old")
            os.rename(target, old)
            os.rename(staging, target)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after an exchange: the old contents


def carry_over(source: str, staging: str) -> None:
    """Hard-link (copy where links fail) the entries of `source` that `staging` lacks, except stale weights."""

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst, follow_symlinks=False)
        except (OSError, NotImplementedError):  # no hard links on this filesystem or platform
            shutil.copy2(src, dst, follow_symlinks=False)

    written = set(os.listdir(staging))
    for entry in sorted(set(os.listdir(source)) - written):
        if STALE_WEIGHTS.fullmatch(entry):
            continue
        src, dst = os.path.join(source, entry), os.path.join(staging, entry)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(src, dst)


def exchange_directories(a: str, b: str) -> bool:
    """Swap two paths in one step with Linux's renameat2(RENAME_EXCHANGE); False where it is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.0
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # an old kernel or a filesystem without it
    raise OSError(code, os.strerror(code), a, None, b)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file beside `path`, then one rename: a crash never leaves a truncated file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, staging = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, staging)
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.unlink(staging)
        raise


T5_DECODER_LAYER_NAMES = {
    "input_layernorm.weight": "layer.0.layer_norm.weight",
    "self_attn.q_proj.weight": "layer.0.SelfAttention.q.weight",
    "self_attn.k_proj.weight": "layer.0.SelfAttention.k.weight",
    "self_attn.v_proj.weight": "layer.0.SelfAttention.v.weight",
    "self_attn.o_proj.weight": "layer.0.SelfAttention.o.weight",
    "cross_attention_layernorm.weight": "layer.1.layer_norm.weight",
    "cross_attn.q_proj.weight": "layer.1.EncDecAttention.q.weight",
    "cross_attn.k_proj.weight": "layer.1.EncDecAttention.k.weight",
    "cross_attn.v_proj.weight": "layer.1.EncDecAttention.v.weight",
    "cross_attn.o_proj.weight": "layer.1.EncDecAttention.o.weight",
    "post_attention_layernorm.weight": "layer.2.layer_norm.weight",
    "mlp.gate_proj.weight": "layer.2.DenseReluDense.wi_0.weight",  # gated T5 (v1.1, FLAN-T5) only
    "mlp.up_proj.weight": "layer.2.DenseReluDense.wi_1.weight",
    "mlp.down_proj.weight": "layer.2.DenseReluDense.wo.weight",
}
"""A T5 decoder block's weights under the encoder-decoder Copilot's names: self-attention, cross-attention and
gated MLP, each behind its RMS norm, as in the Copilot's layer."""


def is_t5_decoder(model: PreTrainedModel) -> bool:
    """A T5-layout encoder-decoder (T5, FLAN-T5, mT5, UMT5) whose decoder can initialise a Copilot."""
    return model.config.get_text_config().model_type in T5_MODEL_TYPES


LLAMA_LAYOUT_MODEL_TYPES = ("llama", "qwen2", "mistral", "qwen3")
"""Decoders whose layers compute what the Copilot's do (pre-norm RMS norms that scale by their weight, rotary
attention, Qwen3's query and key norms with `CopilotConfig.qk_norm`, a gated MLP), under the same names:
copilot_init copies them. Others share some names but not the computation: Gemma's norms scale by 1 + their
weight, OLMo 2 and Gemma 2/3 normalise after attention, Granite scales its residuals."""


def _llama_layout_map(
    copilot: PreTrainedModel, decoder: PreTrainedModel
) -> dict[str, tuple[str, float | None]]:
    source = decoder.state_dict()
    prefix = next((p for p in ("model.", "") if f"{p}embed_tokens.weight" in source), None)
    model_type = decoder.config.get_text_config().model_type
    if prefix is None or model_type not in LLAMA_LAYOUT_MODEL_TYPES:
        own = {
            name.removeprefix("layers.0.")
            for name, _ in copilot.named_parameters()
            if name.startswith("layers.0.")
        }
        first_layer = f"{prefix}layers.0."
        extra = sorted(
            name.removeprefix(first_layer)
            for name in source
            if prefix is not None
            and name.startswith(first_layer)
            and name.removeprefix(first_layer) not in own
        )
        held = f", whose layers also hold {', '.join(extra)}" if extra else ""
        raise ValueError(
            "copilot_init copies a decoder whose layers compute what the Copilot's do: a LLaMA, Qwen2, Qwen3 or "
            "Mistral model, or a T5-layout encoder-decoder for PilotCopilotForSeq2SeqLM. "
            f"{type(decoder).__name__} (model type {model_type!r}{held}) is not one: its weights would land in "
            "layers that compute something else. Pass a LLaMA, Qwen2, Qwen3 or Mistral model with the Pilot's "
            "vocabulary, or leave copilot_init out for a Copilot that starts from random weights."
        )
    mapping = {
        "error_proj.weight": f"{prefix}embed_tokens.weight",
        "error_head.weight": "lm_head.weight"
        if "lm_head.weight" in source
        else f"{prefix}embed_tokens.weight",
        "norm.weight": f"{prefix}norm.weight",
    }
    mapping |= {
        name: f"{prefix}{name}" for name, _ in copilot.named_parameters() if name.startswith("layers.")
    }
    return {name: (source_name, None) for name, source_name in mapping.items()}


def _t5_layout_map(copilot: PreTrainedModel, decoder: PreTrainedModel) -> dict[str, tuple[str, float | None]]:
    # T5 does not divide attention scores by sqrt(head_dim) (its initialisation absorbs it); the Copilot does, so
    # its copied queries are scaled up by as much and every attention weight matches T5's.
    query_scale = copilot.config.head_dim**0.5
    mapping = {
        "error_proj.weight": ("decoder.embed_tokens.weight", None),
        "error_head.weight": ("lm_head.weight", None),
        "norm.weight": ("decoder.final_layer_norm.weight", None),
    }
    # T5 v1.0's MLP is relu(wi x) (no gate): the Copilot's gated MLP then keeps its own initialisation.
    gated = decoder.config.get_text_config().is_gated_act
    for index in range(copilot.config.num_hidden_layers):
        for name, t5_name in T5_DECODER_LAYER_NAMES.items():
            if name.startswith("mlp.") and not gated:
                continue
            scale = query_scale if name.endswith("q_proj.weight") else None
            mapping[f"layers.{index}.{name}"] = (f"decoder.block.{index}.{t5_name}", scale)
    return mapping


@torch.no_grad()
def copy_pretrained_decoder(copilot: PreTrainedModel, decoder: PreTrainedModel) -> list[str]:
    """Initialise `copilot` (a CopilotModel) from a pretrained decoder (SPEC section 3): a LLaMA/Qwen2/Qwen3/Mistral
    layout, or for the encoder-decoder Copilot a T5 layout's decoder.

    Layer weights where shapes match; W_in from the token embeddings (so W_in e embeds the error
    distribution), rescaled to std `config.error_proj_init_std` unless that is None, and W_out from the LM head,
    rescaled to probability scale. Returns the names copied.
    """
    source = decoder.state_dict()
    t5 = is_t5_decoder(decoder)
    layout_map = _t5_layout_map if t5 else _llama_layout_map
    copied, not_copied = [], []
    target = copilot.state_dict()
    for name, (source_name, scale) in layout_map(copilot, decoder).items():
        if name not in target:
            continue
        value = source.get(source_name)
        if value is not None and name == "error_proj.weight":
            value = value.t()
        if value is not None and value.shape == target[name].shape:
            target[name].copy_(value if scale is None else value * scale)
            copied.append(name)
        elif "cross_att" not in name or t5:  # a decoder-only model has no cross-attention
            not_copied.append(name)
    if not_copied:
        warnings.warn(
            f"copilot_init copied {len(copied)} of the Copilot's weights from {type(decoder).__name__}; "
            f"{len(not_copied)} keep their random initialisation, the decoder having no weight of their name and "
            f"shape ({', '.join(not_copied[:4])}{', ...' if len(not_copied) > 4 else ''}). Leave copilot_config "
            "out to shape the Copilot like the decoder.",
            stacklevel=3,
        )
    input_std = copilot.config.error_proj_init_std
    if "error_proj.weight" in copied and input_std is not None:
        # The same directions at the scale a random W_in gets: embeddings (std ~0.02-0.05) would make the error
        # stream small next to the Pilot's states, which measured worse for random Copilots.
        embedding = target["error_proj.weight"]
        embedding.mul_(input_std / embedding.float().std().clamp_min(1e-12))
    if "error_head.weight" in copied:
        # The LM head outputs logits (norm ~10-100) where the Copilot predicts probability-scale errors
        # (norm <= sqrt(2)): rescaled so the initial ||f_C|| is about INITIAL_ERROR_NORM, near "no correction".
        head = target["error_head.weight"]
        norm = copilot.config.initial_error_norm or INITIAL_ERROR_NORM
        head.mul_(norm / (head.float().std() * head.numel() ** 0.5).clamp_min(1e-12))
    return copied


__all__ = [
    "HUB_KWARGS",
    "LLAMA_LAYOUT_MODEL_TYPES",
    "PEFT_PILOT_PREFIX",
    "apply_pilot_adapters",
    "atomic_save_directory",
    "check_copilot_fits_pilot",
    "check_loaded_tensors",
    "copy_pretrained_decoder",
    "atomic_torch_save",
    "is_t5_decoder",
    "pilot_adapter_configs",
    "pilot_fingerprint",
    "read_checkpoint_config",
    "same_pilot",
]
