"""Configurations of the Copilot network and of the Pilot + Copilot wrapper (SPEC sections 3 and 6).

Hub-facing: copied next to checkpoints for `trust_remote_code`, so it imports nothing from hf_copilot.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

FUSION_SPACES = ("probs", "logits")
COPILOT_FEEDBACK_MODES = ("copilot", "observed")


def validate_fusion_settings(copilot_lambda: float, fusion: str, copilot_feedback: str) -> None:
    """Reject fusion settings that generate() could not honour, naming the accepted values."""
    if fusion not in FUSION_SPACES:
        raise ValueError(f"Unknown fusion={fusion!r}: use one of {FUSION_SPACES} ('probs' is the paper's).")
    if copilot_feedback not in COPILOT_FEEDBACK_MODES:
        raise ValueError(
            f"Unknown copilot_feedback={copilot_feedback!r}: use one of {COPILOT_FEEDBACK_MODES} "
            "('copilot' is the paper's)."
        )
    if not isinstance(copilot_lambda, (int, float)) or copilot_lambda != copilot_lambda or copilot_lambda < 0:
        raise ValueError(f"copilot_lambda must be a finite number >= 0, got {copilot_lambda!r}.")


class CopilotConfig(PreTrainedConfig):
    """The Copilot transformer: alternating causal self-attention and cross-attention to the Pilot.

    `vocab_size` and `pilot_hidden_size` are filled from the Pilot when the Copilot is attached.
    `num_key_value_heads` and `attention_bias` exist so that a LLaMA/Qwen2/Mistral decoder's layer
    weights can initialise the Copilot (`copilot_init=`).
    """

    model_type = "copilot"

    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    pilot_hidden_size: int | None = None
    hidden_act: str = "silu"
    attention_bias: bool = False
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    base_model_name_or_path: str | None = None
    pilot_fingerprint: str | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self) -> None:
        if self.num_hidden_layers < 2 or self.num_hidden_layers % 2:
            raise ValueError(
                f"CopilotConfig.num_hidden_layers must be even and >= 2 (odd layers self-attend, even layers "
                f"cross-attend to the Pilot), got {self.num_hidden_layers}."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class PilotCopilotConfig(PreTrainedConfig):
    """A Pilot causal LM (its config nested as `text_config`), a Copilot, and how to fuse them."""

    model_type = "pilot_copilot"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "copilot_config": SubConfigSpec(config_class=CopilotConfig),
    }

    text_config: dict | PreTrainedConfig | None = None
    copilot_config: dict | CopilotConfig | None = None
    copilot_lambda: float = 1.0
    fusion: str = "probs"
    copilot_feedback: str = "copilot"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        validate_fusion_settings(self.copilot_lambda, self.fusion, self.copilot_feedback)
        pilot_vocab = self.text_config.get_text_config().vocab_size
        pilot_hidden = self.text_config.get_text_config().hidden_size
        if self.copilot_config.vocab_size is None:
            self.copilot_config.vocab_size = pilot_vocab
        if self.copilot_config.pilot_hidden_size is None:
            self.copilot_config.pilot_hidden_size = pilot_hidden
        if self.copilot_config.vocab_size != pilot_vocab:
            raise ValueError(
                f"The Copilot's vocabulary ({self.copilot_config.vocab_size}) differs from the Pilot's "
                f"({pilot_vocab}): the Copilot predicts an error over the Pilot's vocabulary. Build the Copilot "
                "for this Pilot (leave copilot_config.vocab_size unset and it is filled in)."
            )
        if self.copilot_config.pilot_hidden_size != pilot_hidden:
            raise ValueError(
                f"The Copilot expects Pilot hidden states of size {self.copilot_config.pilot_hidden_size}, but the "
                f"Pilot's hidden size is {pilot_hidden}. Build the Copilot for this Pilot (leave "
                "copilot_config.pilot_hidden_size unset and it is filled in)."
            )

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        # generate() sizes caches and reads special tokens from the text config: that is the Pilot's.
        return self.text_config.get_text_config(decoder=decoder, encoder=encoder)


__all__ = ["CopilotConfig", "PilotCopilotConfig"]
