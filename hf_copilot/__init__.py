"""hf_copilot: Transformer Copilot for Hugging Face Transformers.

Importing the package registers the Pilot+Copilot classes with the Auto classes, so checkpoints load
without `trust_remote_code`.
"""

import importlib

from transformers import AutoConfig, AutoModelForCausalLM

from .checkpointing import pilot_fingerprint
from .configuration_pilot_copilot import CopilotConfig, PilotCopilotConfig
from .generation_pilot_copilot import CopilotLogitsProcessor, PilotCopilotCache, fuse_scores
from .hub import attach_push_methods
from .mistake_log import MistakeLog
from .mistake_log_entry import MistakeLogEntry, PilotErrors
from .modeling_pilot_copilot import CopilotCheckpointForCausalLM, CopilotModel, PilotCopilotForCausalLM

__version__ = "0.1.0"

AutoConfig.register(CopilotConfig.model_type, CopilotConfig, exist_ok=True)
AutoConfig.register(PilotCopilotConfig.model_type, PilotCopilotConfig, exist_ok=True)
AutoModelForCausalLM.register(PilotCopilotConfig, PilotCopilotForCausalLM, exist_ok=True)
# A Copilot-only folder loads onto its base Pilot through the Auto classes too.
AutoModelForCausalLM.register(CopilotConfig, CopilotCheckpointForCausalLM, exist_ok=True)
# save_pretrained() then writes auto_map and copies the Hub-facing modeling files next to the weights.
PilotCopilotConfig.register_for_auto_class()
PilotCopilotForCausalLM.register_for_auto_class("AutoModelForCausalLM")
attach_push_methods(PilotCopilotForCausalLM)

# Training classes import transformers.Trainer (and accelerate): loaded on first use only.
_LAZY_ATTRIBUTES = {
    "CopilotTrainer": ".trainer",
    "CopilotTrainingArguments": ".training_args",
    # trl's SFTTrainer with the Copilot (`pip install "hf-copilot[trl]"`): not in __all__, so that
    # `from hf_copilot import *` works without trl.
    "CopilotSFTConfig": ".sft",
    "CopilotSFTTrainer": ".sft",
    "MistakeLogCallback": ".mistake_log_callback",
    "NonFiniteTrainingError": ".training_errors",
}


def __getattr__(name: str):
    if name in _LAZY_ATTRIBUTES:
        return getattr(importlib.import_module(_LAZY_ATTRIBUTES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__",
    "CopilotConfig",
    "CopilotLogitsProcessor",
    "CopilotModel",
    "CopilotTrainer",
    "CopilotTrainingArguments",
    "MistakeLog",
    "MistakeLogCallback",
    "MistakeLogEntry",
    "NonFiniteTrainingError",
    "PilotCopilotCache",
    "PilotCopilotConfig",
    "PilotCopilotForCausalLM",
    "PilotErrors",
    "fuse_scores",
    "pilot_fingerprint",
]
