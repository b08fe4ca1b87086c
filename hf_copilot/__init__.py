"""hf_copilot: Transformer Copilot for Hugging Face Transformers.

Importing the package registers the Pilot+Copilot classes with the Auto classes, so checkpoints load
without `trust_remote_code`.
"""

import importlib

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from .checkpointing import pilot_fingerprint
from .configuration_pilot_copilot import CopilotConfig, PilotCopilotConfig, PilotCopilotSeq2SeqConfig
from .generation_pilot_copilot import CopilotLogitsProcessor, PilotCopilotCache, fuse_scores
from .hub import attach_push_methods
from .mistake_log import MistakeLog
from .mistake_log_entry import MistakeLogEntry, PilotErrors
from .modeling_pilot_copilot import CopilotCheckpointForCausalLM, CopilotModel, PilotCopilotForCausalLM
from .modeling_pilot_copilot_seq2seq import CopilotCheckpointForSeq2SeqLM, PilotCopilotForSeq2SeqLM

__version__ = "0.1.0"

AutoConfig.register(CopilotConfig.model_type, CopilotConfig, exist_ok=True)
AutoConfig.register(PilotCopilotConfig.model_type, PilotCopilotConfig, exist_ok=True)
AutoModelForCausalLM.register(PilotCopilotConfig, PilotCopilotForCausalLM, exist_ok=True)
# A Copilot-only folder loads onto its base Pilot through the Auto classes too.
AutoModelForCausalLM.register(CopilotConfig, CopilotCheckpointForCausalLM, exist_ok=True)
# save_pretrained() then writes auto_map and copies the Hub-facing modeling files next to the weights.
PilotCopilotConfig.register_for_auto_class()
PilotCopilotForCausalLM.register_for_auto_class("AutoModelForCausalLM")
# Encoder-decoder Pilots (T5, BART): their own config, so each Auto class maps one config to one model.
AutoConfig.register(PilotCopilotSeq2SeqConfig.model_type, PilotCopilotSeq2SeqConfig, exist_ok=True)
AutoModelForSeq2SeqLM.register(PilotCopilotSeq2SeqConfig, PilotCopilotForSeq2SeqLM, exist_ok=True)
AutoModelForSeq2SeqLM.register(CopilotConfig, CopilotCheckpointForSeq2SeqLM, exist_ok=True)
PilotCopilotSeq2SeqConfig.register_for_auto_class()
PilotCopilotForSeq2SeqLM.register_for_auto_class("AutoModelForSeq2SeqLM")
attach_push_methods(PilotCopilotForCausalLM)
attach_push_methods(PilotCopilotForSeq2SeqLM)

# Training classes import transformers.Trainer (and accelerate): loaded on first use only.
_LAZY_ATTRIBUTES = {
    "CopilotTrainer": ".trainer",
    "CopilotTrainingArguments": ".training_args",
    "CopilotSeq2SeqTrainer": ".seq2seq_trainer",
    "CopilotSeq2SeqTrainingArguments": ".seq2seq_trainer",
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
    "CopilotCheckpointForCausalLM",
    "CopilotCheckpointForSeq2SeqLM",
    "CopilotConfig",
    "CopilotLogitsProcessor",
    "CopilotModel",
    "CopilotSeq2SeqTrainer",
    "CopilotSeq2SeqTrainingArguments",
    "CopilotTrainer",
    "CopilotTrainingArguments",
    "MistakeLog",
    "MistakeLogCallback",
    "MistakeLogEntry",
    "NonFiniteTrainingError",
    "PilotCopilotCache",
    "PilotCopilotConfig",
    "PilotCopilotForCausalLM",
    "PilotCopilotForSeq2SeqLM",
    "PilotCopilotSeq2SeqConfig",
    "PilotErrors",
    "fuse_scores",
    "pilot_fingerprint",
]
