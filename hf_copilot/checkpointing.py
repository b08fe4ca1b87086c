"""Weights from elsewhere and to disk: the Pilot fingerprint (who a Copilot learnt from), a Copilot
initialised from a pretrained decoder, and saves that never leave half-written files.

Hub-facing: copied next to checkpoints for `trust_remote_code`, so it imports nothing from hf_copilot.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from typing import Any

import torch
from transformers import PreTrainedModel

FINGERPRINT_TENSORS = 16  # tensors sampled for the fingerprint
FINGERPRINT_VALUES = 8  # values sampled per tensor
INITIAL_ERROR_NORM = 0.1  # expected ||f_C|| of a Copilot initialised from a pretrained decoder


def pilot_fingerprint(pilot: PreTrainedModel) -> str:
    """Who the Copilot learnt from: a hash of the Pilot's architecture and a fixed sample of its weights.

    `"<architecture hash>:<base64 float32 samples>"`. The samples are compared with a tolerance
    (`same_pilot`), so the same Pilot loaded in bfloat16 or float16 matches while a fine-tuned or
    other Pilot does not.
    """
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
    return f"{architecture}:{base64.b64encode(values.tobytes()).decode()}"


def same_pilot(expected: str, actual: str, rtol: float = 2e-2) -> bool:
    """Whether two fingerprints name the same Pilot, up to half-precision rounding (~0.4% for bfloat16)."""
    expected_arch, _, expected_values = expected.partition(":")
    actual_arch, _, actual_values = actual.partition(":")
    if expected_arch != actual_arch:
        return False
    a = torch.frombuffer(bytearray(base64.b64decode(expected_values)), dtype=torch.float32)
    b = torch.frombuffer(bytearray(base64.b64decode(actual_values)), dtype=torch.float32)
    return a.shape == b.shape and bool(torch.allclose(b, a, rtol=rtol, atol=1e-6))


@contextmanager
def atomic_save_directory(save_directory: str | os.PathLike):
    """Yield a new folder next to `save_directory`; once the body succeeds its files move there.

    A failure while writing (full disk, a crash in serialization) leaves `save_directory` as it was:
    a new or empty destination appears in one rename, an existing one gets each file by rename, and
    weight files of an earlier save that the new one does not overwrite are removed (as save_pretrained
    does for stale shards).
    """
    target = os.path.realpath(os.fspath(save_directory))
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    os.mkdir(staging)  # mkdir (not mkdtemp) keeps the umask's permissions on the final folder
    try:
        yield staging
        if not os.path.isdir(target) or not os.listdir(target):
            os.replace(staging, target)
            return
        written = set(os.listdir(staging))
        for stale in set(os.listdir(target)) - written:
            if re.fullmatch(r"(model|copilot)(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", stale):
                os.remove(os.path.join(target, stale))
        for entry in written:
            destination = os.path.join(target, entry)
            if os.path.isdir(destination):
                shutil.rmtree(destination)
            os.replace(os.path.join(staging, entry), destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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


@torch.no_grad()
def copy_pretrained_decoder(copilot: PreTrainedModel, decoder: PreTrainedModel) -> list[str]:
    """Initialise `copilot` (a CopilotModel) from a LLaMA/Qwen2/Mistral-layout decoder (SPEC section 3).

    Layer weights where shapes match; W_in from the token embeddings (so W_in e embeds the error
    distribution) and W_out from the LM head, rescaled to probability scale. Returns the names copied.
    """
    source = decoder.state_dict()
    prefix = next((p for p in ("model.", "") if f"{p}embed_tokens.weight" in source), None)
    if prefix is None:
        raise ValueError(
            f"copilot_init: {type(decoder).__name__} has no `model.embed_tokens`; use a LLaMA, Qwen2 or "
            "Mistral-layout decoder."
        )
    mapping = {
        "error_proj.weight": (f"{prefix}embed_tokens.weight", True),
        "error_head.weight": (
            "lm_head.weight" if "lm_head.weight" in source else f"{prefix}embed_tokens.weight",
            False,
        ),
        "norm.weight": (f"{prefix}norm.weight", False),
    }
    for name, _ in copilot.named_parameters():
        if name.startswith("layers."):
            mapping[name] = (f"{prefix}{name}", False)
    copied = []
    target = copilot.state_dict()
    for name, (source_name, transpose) in mapping.items():
        if source_name not in source:
            continue
        value = source[source_name].t() if transpose else source[source_name]
        if value.shape == target[name].shape:
            target[name].copy_(value)
            copied.append(name)
    if "error_head.weight" in copied:
        # The LM head outputs logits (norm ~10-100) where the Copilot predicts probability-scale errors
        # (norm <= sqrt(2)): rescaled so the initial ||f_C|| is about INITIAL_ERROR_NORM, near "no correction".
        head = target["error_head.weight"]
        head.mul_(INITIAL_ERROR_NORM / (head.float().std() * head.numel() ** 0.5).clamp_min(1e-12))
    return copied


__all__ = [
    "atomic_save_directory",
    "copy_pretrained_decoder",
    "atomic_torch_save",
    "pilot_fingerprint",
    "same_pilot",
]
