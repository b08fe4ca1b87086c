"""The Pilot + Copilot causal LM (SPEC sections 2, 4 and 6); the Copilot network is modeling_copilot.py.

Hub-facing: copied next to checkpoints for `trust_remote_code`, so it imports only its sibling files.
Data flows one way: Pilot pass -> Mistake Log entry -> Copilot pass -> losses (training), and
Pilot step -> Copilot step -> `CopilotLogitsProcessor` (generation).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .checkpointing import (
    HUB_KWARGS,
    check_loaded_tensors,
    pilot_fingerprint,
    read_checkpoint_config,
)
from .configuration_pilot_copilot import (
    CopilotConfig,
    PilotCopilotConfig,
    validate_fusion_settings,
)
from .generation_pilot_copilot import (
    CACHE_KEYWORD,
    CopilotStateCache,
    PilotCopilotCache,
    PilotCopilotStaticCache,
    copilot_generation_step,
    copilot_teacher_forced_pass,
    fuse_scores,
)
from .mistake_log_entry import (
    NO_LABELS_WARNING,
    MistakeLogEntry,
    joint_losses,
    mistake_log_entry_from_pilot_pass,
    pilot_loss_keeping_probabilities,
    pilot_probabilities,
)
from .modeling_copilot import CopilotModel, PilotCopilotMixin


@dataclass
class PilotCopilotOutput(ModelOutput):
    """`logits` are the Pilot's; `predicted_error` is f_C, the Copilot's predicted error (None from a training
    pass, see `return_predicted_error`)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: PilotCopilotCache | None = None
    if CACHE_KEYWORD != "cache":  # transformers < 5.24 reads the cache under its old name
        past_key_values: PilotCopilotCache | None = None
    pilot_loss: torch.Tensor | None = None
    copilot_loss: torch.Tensor | None = None
    copilot_squared_error: torch.Tensor | None = None
    copilot_num_tokens: torch.Tensor | None = None
    copilot_loss_sum: torch.Tensor | None = None
    predicted_error: torch.Tensor | None = None
    fused_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None  # the Pilot's, with output_attentions
    mistake_log_entry: MistakeLogEntry | None = None


class PilotCopilotForCausalLM(PilotCopilotMixin, PreTrainedModel, GenerationMixin):
    """A fine-tuned causal LM (the Pilot) with a Copilot that rectifies its next-token distribution."""

    config_class = PilotCopilotConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["CopilotLayer"]
    pilot_auto_class = AutoModelForCausalLM
    copilot_checkpoint_class = "modeling_pilot_copilot.CopilotCheckpointForCausalLM"

    def __init__(self, config: PilotCopilotConfig, pilot: PreTrainedModel | None = None):
        config.validate_architecture()
        super().__init__(config)
        self.pilot = self.prepared_pilot(config, pilot)
        self.copilot = CopilotModel(config.copilot_config)
        self.post_init()

    # ----------------------------------------------------------------------------------------------
    # Construction
    @classmethod
    def from_pilot(
        cls,
        pilot: PreTrainedModel,
        copilot_config: CopilotConfig | dict | None = None,
        copilot_init: PreTrainedModel | str | None = None,
        copilot_lambda: float = 1.0,
        fusion: str = "probs",
        copilot_feedback: str = "observed",
    ) -> PilotCopilotForCausalLM:
        """Attach a new Copilot to `pilot` without changing the Pilot in any way.

        `copilot_init` (a decoder or its path) initialises the Copilot from a pretrained decoder of
        the LLaMA/Qwen2/Qwen3/Mistral family; without `copilot_config` the Copilot then takes its shape.
        """
        validate_fusion_settings(copilot_lambda, fusion, copilot_feedback)
        if getattr(pilot.config, "is_encoder_decoder", False):
            raise ValueError(
                f"{type(pilot).__name__} is an encoder-decoder model: wrap it with PilotCopilotForSeq2SeqLM.from_pilot, "
                "which gives it the paper's encoder-decoder Copilot."
            )
        return cls.attach_new_copilot(
            pilot, copilot_config, copilot_init, copilot_lambda, fusion, copilot_feedback
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a whole Pilot+Copilot checkpoint, or a Copilot-only one onto its base Pilot.

        The folder's kind is read from config.json as data: no code from the folder runs. Tensors that
        the checkpoint lacks or has in excess are refused (`check_loaded_tensors`).
        """
        hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        kinds = (PilotCopilotConfig.model_type, CopilotConfig.model_type)
        config = read_checkpoint_config(
            pretrained_model_name_or_path, kwargs.get("config"), kinds, **hub_kwargs
        )
        allow, wants_info = kwargs.pop("allow_other_pilot", False), kwargs.pop("output_loading_info", False)
        if config["model_type"] == PilotCopilotConfig.model_type:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
            check_loaded_tensors(info, pretrained_model_name_or_path)
            model.restore_peft_trainable()
            return (model, info) if wants_info else model
        return cls.from_copilot_folder(
            pretrained_model_name_or_path, config, allow, wants_info, hub_kwargs, kwargs
        )

    # ----------------------------------------------------------------------------------------------
    # Forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: PilotCopilotCache | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        copilot_lambda: float | None = None,
        fusion: str | None = None,
        copilot_feedback: str | None = None,
        return_fused: bool | None = None,
        return_mistake_log: bool = False,
        copilot_batch: MistakeLogEntry | None = None,
        copilot_feedback_fraction: float = 0.0,
        pilot_forward: Callable | None = None,
        copilot_step: Callable | None = None,
        return_predicted_error: bool | None = None,
        **kwargs,
    ) -> PilotCopilotOutput:
        """Teacher-forced pass (training, evaluation) or one incremental generation step (with `cache`).

        With labels: `loss = pilot_loss + copilot_loss`, where `pilot_loss` is exactly the Pilot's own
        loss and `copilot_loss` the Copilot's over positions whose next label is not -100: the paper's RMSE, or
        the mean cross-entropy (`CopilotConfig.error_loss`); `copilot_loss_sum` is its sum that training minimises.
        `copilot_batch` (Mistake Log rows) replaces this pass's fresh entry as the Copilot's input and
        target; `copilot_feedback_fraction`: see `copilot_stream`. `pilot_forward`: the Pilot's compiled call,
        which generate() hands over through `get_compiled_call`, with the Copilot's compiled decoding step
        (`copilot_step`). `return_predicted_error`: None returns f_C except
        from a training pass (labels, the Copilot in train mode, gradients on), whose Copilot loss then never
        forms the [B,T,V] f_C unless it needs it (`copilot_loss_terms_on_entry`); True or `return_fused` always return it;
        False skips it (generate() does, its processor fusing what the step records). `return_fused`: True adds
        `fused_logits`; None (unset) does so only where `fused_as_logits` makes them the returned `logits`.
        """
        copilot_lambda, fusion, copilot_feedback = self.fusion_settings(
            copilot_lambda, fusion, copilot_feedback
        )
        fused_as_logits = self.fused_as_logits(return_fused, labels)
        return_fused = bool(return_fused) or fused_as_logits
        cache = kwargs.pop("past_key_values", None) if cache is None else cache  # transformers < 5.24
        if input_ids is None:
            raise ValueError("PilotCopilotForCausalLM needs input_ids: the Copilot reads the tokens' errors.")
        if cache is not None and not isinstance(cache, CopilotStateCache):
            raise ValueError(
                f"PilotCopilotForCausalLM keeps the Copilot's state in a PilotCopilotCache (or PilotCopilotStaticCache), "
                f"got {type(cache).__name__}. Let generate() create the cache, or pass "
                "PilotCopilotCache(config=model.config)."
            )
        kwargs.pop("return_dict", None)
        wants_hidden_states = kwargs.pop("output_hidden_states", False)
        if cache is None and use_cache:
            cache = PilotCopilotCache(config=self.config.get_text_config(decoder=True))
        pilot_kwargs = {"num_items_in_batch": num_items_in_batch} if labels is not None else {}
        # `attention_mask` is None where there is no padding (generate() drops an all-ones mask), and the Pilot gets it
        # so, as in its own generate(): its masking then builds no mask and reads none back to the host.
        pilot_mask = attention_mask
        if isinstance(cache, PilotCopilotStaticCache):
            # Padded to the cache's length, as the Pilot's masking would: one shape for a compiled Pilot all along.
            if pilot_mask is None:
                pilot_mask = input_ids.new_ones(
                    input_ids.shape[0], cache.get_seq_length() + input_ids.shape[1]
                )
            if pilot_mask.shape[1] > cache.max_positions:
                raise ValueError(
                    f"This forward reaches position {pilot_mask.shape[1]}, past the {cache.max_positions} positions "
                    "the PilotCopilotStaticCache was built for: build it with a larger max_cache_len."
                )
            pilot_mask = F.pad(pilot_mask, (0, cache.max_positions - pilot_mask.shape[1]))
        # With labels, the Pilot's loss keeps the p it computes on the way (one pass over the vocabulary for both).
        keeps_probs = labels is not None and pilot_forward is None
        with (
            pilot_loss_keeping_probabilities(self.pilot, self.pilot_probs_out, self.pilot_gradient_buffer)
            if keeps_probs
            else nullcontext()
        ) as pilot_loss:
            pilot_out = (pilot_forward or self.pilot)(
                input_ids=input_ids,
                attention_mask=pilot_mask,
                position_ids=position_ids,
                labels=labels,
                **{CACHE_KEYWORD: cache},
                use_cache=cache is not None,
                output_hidden_states=True,
                return_dict=True,
                **pilot_kwargs,
                **kwargs,
            )
        logits = pilot_out.logits
        probs = None if pilot_loss is None else pilot_loss.probs_of(logits)
        if probs is None:
            probs = pilot_probabilities(logits, self.pilot_probs_out(logits))
        entry = mistake_log_entry_from_pilot_pass(
            input_ids, attention_mask, labels, logits, pilot_out.hidden_states, probs
        )
        if cache is not None:
            predicted_errors = copilot_generation_step(
                self.copilot,
                input_ids,
                attention_mask,
                entry,
                cache,
                copilot_feedback,
                copilot_step,
                return_fused or return_predicted_error is not False,
            )
        else:
            copilot_entry = entry if copilot_batch is None else copilot_batch.to(logits.device)
            predicted_errors, copilot_terms = copilot_teacher_forced_pass(
                self.copilot,
                copilot_entry,
                copilot_feedback_fraction,
                labels is not None,
                True if return_fused else return_predicted_error,
            )

        output = PilotCopilotOutput(
            logits=logits,
            **{CACHE_KEYWORD: cache},
            predicted_error=predicted_errors,
            hidden_states=pilot_out.hidden_states if wants_hidden_states else None,
            attentions=pilot_out.attentions,
            mistake_log_entry=entry if return_mistake_log else None,
        )
        if return_fused:
            # The p that f_C was predicted against (the entry's), where f_C is this pass's: p + f_C then adds
            # back exactly what a reweighted f_C subtracted.
            pilot_probs = entry.errors.probs if copilot_batch is None else None
            output.fused_logits = fuse_scores(logits, predicted_errors, copilot_lambda, fusion, pilot_probs)
            if fused_as_logits:
                output.logits = output.fused_logits
        if labels is not None:
            objective, output.copilot_squared_error, num_tokens = copilot_terms
            output.copilot_loss_sum, output.copilot_num_tokens = objective, num_tokens
            if not self.training and num_tokens == 0:  # in training, CopilotTrainer warns at the step's check
                warnings.warn(NO_LABELS_WARNING, stacklevel=2)
            output.pilot_loss, output.copilot_loss = joint_losses(
                pilot_out.loss, objective, num_tokens, self.copilot.config.error_loss
            )
            output.loss = output.pilot_loss + output.copilot_loss
        return output

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # The Copilot's state lives in the cache, so fused generation always uses one, whatever the Pilot's
        # use_cache says (Trainer saves Pilots with use_cache=False); the tokens are the same either way.
        generation_config.use_cache = True
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get(CACHE_KEYWORD)
        if isinstance(cache, CopilotStateCache):
            return
        kind = type(cache).__name__
        if getattr(cache, "_is_user_defined", False) or kind not in ("DynamicCache", "StaticCache"):
            raise ValueError(
                f"Fused generation needs a PilotCopilotCache, got {kind}: use the default dynamic cache or "
                "cache_implementation='static', or pass PilotCopilotCache(config=model.config)."
            )
        # The cache generate() just built, with the Copilot's state: same kind, same settings.
        config = self.config.get_text_config(decoder=True)
        offloading = "offloaded" in (generation_config.cache_implementation or "")
        if kind == "StaticCache":
            # The length generate() sized that cache for (`_prepare_static_cache` records it on the model): its
            # `get_max_length()` is the window where every layer slides.
            max_cache_len = getattr(self, "_previous_max_cache_length", None) or cache.get_max_length()
            model_kwargs[CACHE_KEYWORD] = PilotCopilotStaticCache(
                config, max_cache_len, offloading=offloading
            )
            return
        model_kwargs[CACHE_KEYWORD] = PilotCopilotCache(config=config, offloading=offloading)
        if generation_config.is_assistant:
            model_kwargs[CACHE_KEYWORD].activate_past_recording()


PilotCopilotForCausalLM.wrapper_class = PilotCopilotForCausalLM


class CopilotCheckpointForCausalLM(PilotCopilotForCausalLM):
    """What the Auto classes load from a Copilot-only folder: its base Pilot with the Copilot attached.

    Its own class only because the Auto classes pair one model class with one config class; loading returns a
    `PilotCopilotForCausalLM`.
    """

    config_class = CopilotConfig


__all__ = [
    "CopilotCheckpointForCausalLM",
    "CopilotModel",
    "PilotCopilotForCausalLM",
    "PilotCopilotOutput",
    "pilot_fingerprint",
]
