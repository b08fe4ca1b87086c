"""Configurations of the Copilot network and of the Pilot + Copilot wrapper (SPEC sections 3 and 6).

Hub-facing: copied next to checkpoints for `trust_remote_code`, so it imports nothing from hf_copilot.

Validated like transformers' own configs (`@strict`): a field of the wrong type or out of its range is
refused when it is set, at construction or later (`StrictDataclassFieldValidationError`, naming the
field); rules between fields live in `validate_architecture`, run at construction and by
`save_pretrained` (`StrictDataclassClassValidationError`) and callable again (plain `ValueError`).
No `from __future__ import annotations` here: `@strict` cannot check types written as strings.
"""

import math
import warnings

from huggingface_hub.dataclasses import strict, validated_field
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils.type_validators import activation_fn_key, interval, positive_int_field, probability

FUSION_SPACES = ("probs", "logits")
# Decoders copilot_config_like gives query and key norms (CopilotConfig.qk_norm).
QK_NORM_MODEL_TYPES = ("qwen3",)
T5_MODEL_TYPES = ("t5", "mt5", "umt5")  # decoders copilot_config_like shapes an encoder-decoder Copilot after
INITIAL_ERROR_NORM = 0.1  # ||f_C|| of a Copilot initialised from a pretrained decoder (copilot_init)
COPILOT_FEEDBACK_MODES = ("copilot", "observed")
# How the Copilot's head output becomes f_C: "linear" is the paper's (f_C = W_out h); "reweight" makes W_out h
# a logit correction of the Pilot's own distribution, f_C = softmax(log p + W_out h) - p (see CopilotModel).
ERROR_FORMS = ("linear", "reweight")
ERROR_LOSSES = ("squared_error", "cross_entropy")
# Where the Copilot's attention gets its sense of order: "none" is the paper's (no positional encoding; causal
# masking and the Pilot's states carry order); "rope" rotates queries and keys by their positions as LLaMA does.
POSITION_ENCODINGS = ("none", "rope")
# The token term of the Copilot's input (CopilotConfig.token_embedding): True, a learnt V x d_C table; "gain", d_C
# learnt gains on W_in's own column for the token (no V-sized table); False, none (the paper's input).
TOKEN_EMBEDDINGS = (True, "gain", False)
# Rotary frequency rescalings the Copilot can rotate with (CopilotConfig.rotary_scaling), as transformers'
# rope_parameters name them, with the keys each reads. Both are fixed per frequency, whatever the sequence length.
ROTARY_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
# What a Copilot saved before a field existed was built with: its file loads as that Copilot, whatever the default.
FIELDS_OF_EARLIER_FILES = {
    "error_form": "linear",
    "error_loss": "squared_error",
    "position_encoding": "none",
    "memory_norm": False,
    "token_embedding": False,
    "projected_memory_norm": False,
    "qk_norm": False,
}
FUSION_FIELDS = ("copilot_lambda", "fusion", "copilot_feedback")  # how a model fuses; per generate() call too
# What a forward without labels returns as `logits` (PilotCopilotConfig.forward_logits): the Pilot's, or the fused
# scores generate() picks from, for tools that score text by reading `model(...).logits`.
FORWARD_LOGITS = ("pilot", "fused")
# The wrapper's own settings: loading a Copilot-only folder sets these on the model, never on its Pilot.
WRAPPER_SETTINGS = (*FUSION_FIELDS, "forward_logits")


def check_copilot_lambda(copilot_lambda) -> None:
    if (
        isinstance(copilot_lambda, bool)
        or not isinstance(copilot_lambda, (int, float))
        or not math.isfinite(copilot_lambda)
        or copilot_lambda < 0
    ):
        raise ValueError(f"copilot_lambda must be a finite number >= 0, got {copilot_lambda!r}.")


def is_positive_number(value) -> bool:
    """A finite int or float > 0 (not a bool)."""
    return (
        not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0
    )


def positive_scale_or_none(name: str):
    """A field validator: a finite number > 0, or None (the initialisation scales are such fields)."""

    def check(value) -> None:
        if value is not None and not is_positive_number(value):
            raise ValueError(f"{name} must be a finite number > 0, or None, got {value!r}.")

    return check


def check_error_form(error_form) -> None:
    if error_form is not None and error_form not in ERROR_FORMS:
        raise ValueError(
            f"Unknown error_form={error_form!r}: use one of {ERROR_FORMS} ('linear' is the paper's), or None for "
            "the feedback mode's own."
        )


def default_error_loss(error_form: str) -> str:
    """The loss each head trains on unless told: the cross-entropy where p + f_C is a distribution."""
    return "cross_entropy" if error_form == "reweight" else "squared_error"


def check_error_loss(error_loss) -> None:
    if error_loss is not None and error_loss not in ERROR_LOSSES:
        raise ValueError(
            f"Unknown error_loss={error_loss!r}: use one of {ERROR_LOSSES} ('squared_error' is the paper's), or "
            "None for the error form's own."
        )


def check_position_encoding(position_encoding) -> None:
    if position_encoding not in POSITION_ENCODINGS:
        raise ValueError(
            f"Unknown position_encoding={position_encoding!r}: use one of {POSITION_ENCODINGS} "
            "('none' is the paper's)."
        )


def check_token_embedding(token_embedding) -> None:
    if not (isinstance(token_embedding, bool) or token_embedding == "gain"):
        raise ValueError(
            f"Unknown token_embedding={token_embedding!r}: use one of {TOKEN_EMBEDDINGS} (True: a learnt table, "
            "'gain': learnt gains on W_in's column for the token, False: none, the paper's input)."
        )


def check_rotary_scaling(rotary_scaling) -> None:
    if rotary_scaling is None:
        return
    rope_type = rotary_scaling.get("rope_type") if isinstance(rotary_scaling, dict) else None
    keys = ROTARY_SCALING_KEYS.get(rope_type)
    if keys is None or set(rotary_scaling) != {"rope_type", *keys}:
        raise ValueError(
            f"rotary_scaling must be None or a dict with a rope_type of {tuple(ROTARY_SCALING_KEYS)} and that type's "
            f"keys ({ROTARY_SCALING_KEYS}), as a decoder's rope_parameters hold them, got {rotary_scaling!r}."
        )
    for key in keys:
        if not is_positive_number(rotary_scaling[key]):
            raise ValueError(
                f"rotary_scaling[{key!r}] must be a finite number > 0, got {rotary_scaling[key]!r}."
            )
    if rope_type == "llama3" and rotary_scaling["high_freq_factor"] <= rotary_scaling["low_freq_factor"]:
        raise ValueError(
            f"rotary_scaling's high_freq_factor ({rotary_scaling['high_freq_factor']}) must exceed its "
            f"low_freq_factor ({rotary_scaling['low_freq_factor']}), as LLaMA 3's rope scaling requires."
        )


def saved_copilot_dict(config_dict: dict) -> dict:
    """A Copilot config read from a file, with the fields that files of earlier versions leave out."""
    return {**FIELDS_OF_EARLIER_FILES, **config_dict}


def check_fusion(fusion) -> None:
    if fusion not in FUSION_SPACES:
        raise ValueError(f"Unknown fusion={fusion!r}: use one of {FUSION_SPACES} ('probs' is the paper's).")


def check_copilot_feedback(copilot_feedback) -> None:
    if copilot_feedback not in COPILOT_FEEDBACK_MODES:
        raise ValueError(
            f"Unknown copilot_feedback={copilot_feedback!r}: use one of {COPILOT_FEEDBACK_MODES} "
            "('copilot' is the paper's)."
        )


def check_forward_logits(forward_logits) -> None:
    if forward_logits not in FORWARD_LOGITS:
        raise ValueError(
            f"Unknown forward_logits={forward_logits!r}: use one of {FORWARD_LOGITS} ('fused' for tools that score "
            "text with model(...).logits)."
        )


def validate_fusion_settings(copilot_lambda: float, fusion: str, copilot_feedback: str) -> None:
    """Reject fusion settings that generate() could not honour, naming the accepted values (ValueError)."""
    check_fusion(fusion)
    check_copilot_feedback(copilot_feedback)
    check_copilot_lambda(copilot_lambda)


@strict
class CopilotConfig(PreTrainedConfig):
    """The Copilot transformer: alternating causal self-attention and cross-attention to the Pilot.

    `vocab_size` and `pilot_hidden_size` are filled from the Pilot when the Copilot is attached.
    `num_key_value_heads`, `attention_bias`, `attention_head_dim` and `qk_norm` exist so that a LLaMA, Qwen2,
    Qwen3 or Mistral decoder's layer weights can initialise the Copilot (`copilot_init=`).
    """

    model_type = "copilot"

    hidden_size: int = positive_int_field(default=256)
    num_hidden_layers: int = 4  # even and >= 2 (>= 1 with encoder_decoder): see validate_architecture
    num_attention_heads: int = positive_int_field(default=4)
    num_key_value_heads: int | None = positive_int_field(default=None)
    intermediate_size: int | None = positive_int_field(default=None)
    vocab_size: int | None = positive_int_field(default=None)
    pilot_hidden_size: int | None = positive_int_field(default=None)
    hidden_act: str = activation_fn_key(default="silu")
    attention_bias: bool = False
    # Width of an attention head; None: hidden_size / num_attention_heads. Set by copilot_init for a decoder whose
    # heads are wider or narrower than that (Qwen3-0.6B: 16 heads of 128 over a hidden size of 1024).
    attention_head_dim: int | None = positive_int_field(default=None)
    # RMS-normalise each head's queries and keys before the rotation (Qwen3's q_norm / k_norm). copilot_init sets it
    # as the decoder has it, so the copied attention weights keep their meaning. None: on for a Copilot built for
    # observed feedback, where a random Copilot with it was ahead on the mean in seven settings of the protocol's
    # eleven, level in three, behind in one (benchmarks/results/qk_norm/); off for the paper's mode, where it was
    # mixed, ahead on four settings of eight and behind on three (benchmarks/results/qk_norm_paper/).
    qk_norm: bool | None = None
    attention_dropout: int | float = probability(default=0.0)
    hidden_dropout: int | float = probability(default=0.0)
    rms_norm_eps: int | float = interval(min=0.0, exclude_min=True)(default=1e-6)
    initializer_range: int | float = interval(min=0.0, max=1.0)(default=0.02)
    # Optional, for the linear head: W_out drawn so that ||f_C|| starts near this (near "no correction") instead of at
    # initializer_range, where a random head predicts errors of norm ~std * sqrt(V * d) >> ||e|| <= sqrt(2).
    # Measured: it helps a Copilot trained alone on a frozen Pilot and hurts joint training in every seed
    # (benchmarks/results/initial_error_norm/quality.md), so the default leaves it off.
    initial_error_norm: int | float | None = validated_field(
        positive_scale_or_none("initial_error_norm"), default=None
    )
    # "linear" (the paper's f_C = W_out h) or "reweight" (f_C = softmax(log p + W_out h) - p). None: set when the
    # Copilot is attached, by the feedback it is built for (`resolve_for_feedback`): "reweight" with observed
    # feedback, where it lifted every pretrained family trained on the cross-entropy, "linear" for the paper's mode,
    # where the reweight head lifted less (benchmarks/results/error_loss/).
    error_form: str | None = validated_field(check_error_form, default=None)
    # What the Copilot's training minimises per position: the paper's squared error ||f_C - e||^2, or, for the reweight
    # form, whose p + f_C is a distribution, the cross-entropy of the observed token under it (the fused
    # distribution at lambda 1). None: cross-entropy for "reweight", the squared error for "linear".
    error_loss: str | None = validated_field(check_error_loss, default=None)
    # W_in's initial std (None: initializer_range): the error stream W_in e enters the Copilot at ~std * ||e||
    # per coordinate. At 1 rather than 0.02 the Copilot learnt more on every task measured, pretrained
    # arithmetic most (benchmarks/results/error_proj_init_std/); copilot_init copies W_in instead.
    error_proj_init_std: int | float | None = validated_field(
        positive_scale_or_none("error_proj_init_std"), default=1.0
    )
    # "rope" measured better where order matters (scratch recommendation R^2 0.039 -> 0.194, pretrained
    # recommendation) and level elsewhere (benchmarks/results/position_encoding/).
    position_encoding: str = validated_field(check_position_encoding, default="rope")
    # RMS-normalise each of the Pilot's states (learnt scale) before the Copilot's memory projection. The Pilot's input
    # embeddings x_tilde are often far smaller than its layer-mean states h_bar (0.05 against 0.7-0.9 RMS in the
    # benchmarks' family), so without it the Copilot's cross-attention barely reads the tokens themselves. None: on
    # for a Copilot built for the paper's feedback mode (PilotCopilotConfig.copilot_feedback="copilot"), whose
    # stream carries no observed error at generated positions (measured: that mode then learns; observed feedback
    # lost with it, benchmarks/results/memory_norm/), off otherwise.
    memory_norm: bool | None = None
    # RMS-normalise each memory entry after its projection to d_C (learnt scale), so the cross-attention reads
    # keys and values from unit-scale entries as the self-attention reads the normed stream. Without it a projection
    # drawn at initializer_range leaves the entries at about 0.2 RMS (x_tilde far less), and under Adam a small
    # input learns as if at a smaller learning rate, as the error stream did before error_proj_init_std. Measured
    # (benchmarks/results/projected_memory_norm/): pretrained arithmetic ahead in 6 seeds of 6, the paper's feedback
    # mode ahead on both families measured (arithmetic in two seeds of six), the other families level.
    projected_memory_norm: bool = True
    # A learnt embedding E of the token each stream row's error is about, added to the row: position j reads
    # W_in e_{j-1} + E[x_j], in either feedback mode (the paper's reads W_in f_C_{j-1} + E[x_j] at generated
    # positions). W_in e says which token came only where the Pilot was unsure of it (e ~ 0 where it was right and
    # confident); E says so everywhere. Zero at initialisation, so the Copilot starts as without it. Measured
    # (benchmarks/results/token_embedding/): observed feedback ahead on recommendation and worked word problems,
    # level on arithmetic; the paper's mode ahead on both families it was measured on. "gain": the term is
    # g * W_in[:, x_j] instead, d_C learnt gains (zero at start) on W_in's own column for the token, for vocabularies
    # where a third V x d_C table costs too much. Measured (benchmarks/results/token_gain/): as good as the table in
    # the paper's mode; with observed feedback behind it on recommendation, level on the two other families.
    token_embedding: bool | str = validated_field(check_token_embedding, default=True)
    # The rotary base (LLaMA's rope_theta); copilot_init copies the decoder's, so its attention weights keep their
    # meaning.
    rotary_base: int | float = interval(min=1.0, exclude_min=True)(default=10000.0)
    # The decoder's rotary frequency rescaling (None: none), for a copilot_init decoder that has one: LLaMA 3.1-3.3
    # slow their long wavelengths ({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
    # "high_freq_factor": 4.0, "original_max_position_embeddings": 8192} in Llama-3.2-1B), "linear" slows all.
    rotary_scaling: dict | None = validated_field(check_rotary_scaling, default=None)
    base_model_name_or_path: str | None = None
    pilot_fingerprint: str | None = None
    # The paper's Copilot for an encoder-decoder Pilot: self- and cross-attention in every layer, the
    # cross-attention reading [encoder output ; h_bar]. Set by PilotCopilotSeq2SeqConfig.
    encoder_decoder: bool = False

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.error_loss is None and self.error_form is not None:
            self.error_loss = default_error_loss(self.error_form)
        super().__post_init__(**kwargs)

    def resolve_for_feedback(self, copilot_feedback: str) -> None:
        """Fill the fields left to the feedback mode the Copilot is built for (`memory_norm`, `qk_norm`,
        `error_form`, then `error_loss`), each chosen on measured evidence (see the fields' comments)."""
        paper_mode = copilot_feedback == "copilot"
        if self.memory_norm is None:
            self.memory_norm = paper_mode
        if self.qk_norm is None:
            self.qk_norm = not paper_mode
        if self.error_form is None:  # a cross-entropy asked for needs the reweight form
            self.error_form = "linear" if paper_mode and self.error_loss != "cross_entropy" else "reweight"
        if self.error_loss is None:
            self.error_loss = default_error_loss(self.error_form)

    def validate_architecture(self):
        """Part of `@strict`-powered validation: the rules between fields. Call it again after a change."""
        if self.encoder_decoder and self.num_hidden_layers < 1:
            raise ValueError(
                f"CopilotConfig.num_hidden_layers must be >= 1 for an encoder-decoder Pilot's Copilot, got "
                f"{self.num_hidden_layers}."
            )
        if not self.encoder_decoder and (self.num_hidden_layers < 2 or self.num_hidden_layers % 2):
            raise ValueError(
                f"CopilotConfig.num_hidden_layers must be even and >= 2 (odd layers self-attend, even layers "
                f"cross-attend to the Pilot), got {self.num_hidden_layers}."
            )
        if self.attention_head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}), or attention_head_dim set."
            )
        if self.position_encoding == "rope" and self.head_dim % 2:
            raise ValueError(
                f"position_encoding='rope' rotates pairs of coordinates: head_dim (attention_head_dim, or "
                f"hidden_size / num_attention_heads, = {self.head_dim}) must be even."
            )
        if self.error_loss == "cross_entropy" and self.error_form == "linear":
            raise ValueError(
                f"error_loss='cross_entropy' scores p + f_C as a distribution, which only error_form='reweight' "
                f"guarantees; got error_form={self.error_form!r}. Set error_form='reweight', or error_loss="
                "'squared_error' (or None, the error form's own)."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})."
            )

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """Files (Copilot-only folders included) of earlier versions load as the Copilot they were saved with."""
        return super().from_dict(saved_copilot_dict(config_dict), **kwargs)


@strict
class PilotCopilotConfig(PreTrainedConfig):
    """A Pilot causal LM (its config nested as `text_config`), a Copilot, and how to fuse them."""

    model_type = "pilot_copilot"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "copilot_config": SubConfigSpec(config_class=CopilotConfig),
    }

    text_config: dict | PreTrainedConfig | None = None
    copilot_config: dict | CopilotConfig | None = None
    copilot_lambda: int | float = validated_field(check_copilot_lambda, default=1.0)
    fusion: str = validated_field(check_fusion, default="probs")
    copilot_feedback: str = validated_field(check_copilot_feedback, default="observed")
    forward_logits: str = validated_field(check_forward_logits, default="pilot")
    tie_word_embeddings: bool = False
    # Written by save_pretrained when the Pilot is a peft PeftModel ({adapter name: its config}); loading
    # wraps the Pilot in the same adapters, so that the tensors' names (pilot.base_model.model.*) match.
    pilot_peft_config: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        pilot = self.get_text_config()
        if self.copilot_config.vocab_size is None:
            self.copilot_config.vocab_size = pilot.vocab_size
        if self.copilot_config.pilot_hidden_size is None:
            self.copilot_config.pilot_hidden_size = pilot.hidden_size
        self.copilot_config.resolve_for_feedback(self.copilot_feedback)  # built for the feedback it will read
        self.check_copilot_fits_pilot()

    def validate_architecture(self):
        """Part of `@strict`-powered validation: the Copilot's own rules, and that it fits the Pilot."""
        self.copilot_config.validate_architecture()
        self.check_copilot_fits_pilot()

    def check_copilot_fits_pilot(self) -> None:
        pilot = self.get_text_config()
        if self.copilot_config.vocab_size != pilot.vocab_size:
            raise ValueError(
                f"The Copilot's vocabulary ({self.copilot_config.vocab_size}) differs from the Pilot's "
                f"({pilot.vocab_size}): the Copilot predicts an error over the Pilot's vocabulary. Build the Copilot "
                "for this Pilot (leave copilot_config.vocab_size unset and it is filled in)."
            )
        if self.copilot_config.pilot_hidden_size != pilot.hidden_size:
            raise ValueError(
                f"The Copilot expects Pilot hidden states of size {self.copilot_config.pilot_hidden_size}, but the "
                f"Pilot's hidden size is {pilot.hidden_size}. Build the Copilot for this Pilot (leave "
                "copilot_config.pilot_hidden_size unset and it is filled in)."
            )

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """A nested Copilot config saved by an earlier version loads as the Copilot it was saved with."""
        if isinstance(config_dict.get("copilot_config"), dict):
            config_dict = {**config_dict, "copilot_config": saved_copilot_dict(config_dict["copilot_config"])}
        return super().from_dict(config_dict, **kwargs)

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        # generate() sizes caches and reads special tokens from the text config: that is the Pilot's.
        return self.text_config.get_text_config(decoder=decoder, encoder=encoder)


@strict
class PilotCopilotSeq2SeqConfig(PilotCopilotConfig):
    """An encoder-decoder Pilot (T5, FLAN-T5, BART: its config nested as `text_config`), the paper's
    encoder-decoder Copilot (`copilot_config.encoder_decoder`, set here) and how to fuse them (SPEC section 8)."""

    model_type = "pilot_copilot_seq2seq"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="t5"),
        "copilot_config": SubConfigSpec(config_class=CopilotConfig),
    }

    is_encoder_decoder: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not self.get_text_config().is_encoder_decoder:
            raise ValueError(
                f"PilotCopilotSeq2SeqConfig wraps an encoder-decoder Pilot, got a {self.text_config.model_type!r} "
                "config: use PilotCopilotConfig (PilotCopilotForCausalLM) for a decoder-only Pilot."
            )
        self.copilot_config.encoder_decoder = True


def rotary_scaling_like(rope_parameters: dict) -> dict | None:
    """The decoder's rotary rescaling as CopilotConfig.rotary_scaling holds it; None, with a warning, for one the
    Copilot cannot rotate with (its copied attention weights then see other angles at long wavelengths)."""
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type in ROTARY_SCALING_KEYS:
        return {"rope_type": rope_type} | {
            key: rope_parameters[key] for key in ROTARY_SCALING_KEYS[rope_type]
        }
    if rope_type != "default":
        warnings.warn(
            f"copilot_init: the decoder's rope_type {rope_type!r} is not copied (the Copilot rotates with "
            f"{tuple(ROTARY_SCALING_KEYS)} or none); the Copilot rotates at the plain rope_theta.",
            stacklevel=4,
        )
    return None


def has_query_key_norms(decoder_config) -> bool:
    """Whether a decoder normalises each head's queries and keys (CopilotConfig.qk_norm for a Copilot that copies it,
    not left to the feedback mode)."""
    return decoder_config.get_text_config().model_type in QK_NORM_MODEL_TYPES


def copilot_config_like(decoder_config) -> CopilotConfig:
    """A Copilot shaped like a pretrained decoder, so all of its layer weights can be copied: a LLaMA/Qwen2/
    Qwen3/Mistral layout, or a T5 layout's decoder (then the encoder-decoder Copilot, one layer per decoder block).
    `qk_norm` is the decoder's, not left to the feedback mode."""
    text = decoder_config.get_text_config()
    if text.model_type in T5_MODEL_TYPES:
        return CopilotConfig(
            hidden_size=text.d_model,
            num_hidden_layers=text.num_decoder_layers,
            num_attention_heads=text.num_heads,
            num_key_value_heads=text.num_heads,
            intermediate_size=text.d_ff,
            hidden_act=text.dense_act_fn,
            rms_norm_eps=text.layer_norm_epsilon,
            qk_norm=has_query_key_norms(decoder_config),
            encoder_decoder=True,
        )
    layers = text.num_hidden_layers - text.num_hidden_layers % 2
    rope = getattr(text, "rope_parameters", None) or {}
    head_dim = getattr(text, "head_dim", None)
    return CopilotConfig(
        rotary_base=rope.get("rope_theta", CopilotConfig().rotary_base),
        rotary_scaling=rotary_scaling_like(rope),
        hidden_size=text.hidden_size,
        num_hidden_layers=max(2, layers),
        num_attention_heads=text.num_attention_heads,
        attention_head_dim=None if head_dim == text.hidden_size // text.num_attention_heads else head_dim,
        qk_norm=has_query_key_norms(decoder_config),
        num_key_value_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        intermediate_size=text.intermediate_size,
        hidden_act=getattr(text, "hidden_act", "silu"),
        attention_bias=getattr(text, "attention_bias", False) or text.model_type == "qwen2",
        rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
    )


__all__ = ["CopilotConfig", "PilotCopilotConfig", "PilotCopilotSeq2SeqConfig"]
