"""hf_copilot: Transformer Copilot for Hugging Face Transformers.

Importing the package registers the Pilot+Copilot classes with the Auto classes, so checkpoints load
without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_pilot_copilot import CopilotConfig, PilotCopilotConfig
from .generation_pilot_copilot import CopilotLogitsProcessor, PilotCopilotCache, fuse_scores
from .mistake_log_entry import MistakeLogEntry, PilotErrors
from .modeling_pilot_copilot import CopilotModel, PilotCopilotForCausalLM, pilot_fingerprint

AutoConfig.register(CopilotConfig.model_type, CopilotConfig, exist_ok=True)
AutoConfig.register(PilotCopilotConfig.model_type, PilotCopilotConfig, exist_ok=True)
AutoModelForCausalLM.register(PilotCopilotConfig, PilotCopilotForCausalLM, exist_ok=True)
# save_pretrained() then writes auto_map and copies the Hub-facing modeling files next to the weights.
PilotCopilotConfig.register_for_auto_class()
PilotCopilotForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "CopilotConfig",
    "CopilotLogitsProcessor",
    "CopilotModel",
    "MistakeLogEntry",
    "PilotCopilotCache",
    "PilotCopilotConfig",
    "PilotCopilotForCausalLM",
    "PilotErrors",
    "fuse_scores",
    "pilot_fingerprint",
]
