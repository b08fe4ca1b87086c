"""The Pilot + Copilot for encoder-decoder Pilots: T5, FLAN-T5, BART (SPEC section 8).

Hub-facing: copied next to checkpoints for `trust_remote_code`, so it imports only its sibling files.
The same one-way data flow as the causal wrapper (modeling_pilot_copilot.py): Pilot pass -> Mistake Log entry
-> Copilot pass -> losses, and at generation Pilot step -> Copilot step -> `CopilotLogitsProcessor`. What
differs is the entry (`x_tilde` is the encoder output, one row per decoder position) and the Copilot's layers
(the paper's encoder-decoder Copilot: self- and cross-attention in every layer).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForSeq2SeqLM,
    DynamicCache,
    EncoderDecoderCache,
    GenerationMixin,
    PreTrainedModel,
    StaticCache,
)
from transformers.utils import ModelOutput

from .checkpointing import (
    HUB_KWARGS,
    check_loaded_tensors,
    read_checkpoint_config,
)
from .configuration_pilot_copilot import (
    FUSION_FIELDS,
    CopilotConfig,
    PilotCopilotSeq2SeqConfig,
    validate_fusion_settings,
)
from .generation_pilot_copilot import (
    CACHE_KEYWORD,
    PilotCopilotEncoderDecoderCache,
    copilot_generation_step,
    copilot_teacher_forced_pass,
    fuse_scores,
)
from .mistake_log_entry import (
    NO_LABELS_WARNING,
    MistakeLogEntry,
    joint_losses,
    mistake_log_entry_from_seq2seq_pass,
    pilot_probabilities,
)
from .modeling_copilot import CopilotModel, PilotCopilotMixin


@dataclass
class PilotCopilotSeq2SeqOutput(ModelOutput):
    """`logits` are the Pilot's; `predicted_error` is f_C, the Copilot's predicted error per decoder position
    (None from a training pass, see `return_predicted_error`)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: PilotCopilotEncoderDecoderCache | None = None
    if CACHE_KEYWORD != "cache":  # transformers < 5.24 reads the cache under its old name
        past_key_values: PilotCopilotEncoderDecoderCache | None = None
    pilot_loss: torch.Tensor | None = None
    copilot_loss: torch.Tensor | None = None
    copilot_squared_error: torch.Tensor | None = None
    copilot_num_tokens: torch.Tensor | None = None
    copilot_loss_sum: torch.Tensor | None = None
    predicted_error: torch.Tensor | None = None
    fused_logits: torch.Tensor | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    # The Pilot's, with output_attentions.
    decoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: tuple[torch.Tensor, ...] | None = None
    mistake_log_entry: MistakeLogEntry | None = None


class PilotCopilotForSeq2SeqLM(PilotCopilotMixin, PreTrainedModel, GenerationMixin):
    """A fine-tuned encoder-decoder LM (the Pilot) with a Copilot that rectifies its next-token distribution."""

    config_class = PilotCopilotSeq2SeqConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["CopilotEncoderDecoderLayer"]
    pilot_auto_class = AutoModelForSeq2SeqLM
    copilot_checkpoint_class = "modeling_pilot_copilot_seq2seq.CopilotCheckpointForSeq2SeqLM"
    copilot_config_defaults = {"encoder_decoder": True}  # a dict may give an odd number of layers

    def __init__(self, config: PilotCopilotSeq2SeqConfig, pilot: PreTrainedModel | None = None):
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
    ) -> PilotCopilotForSeq2SeqLM:
        """Attach a new encoder-decoder Copilot to `pilot` (T5, FLAN-T5, BART, ...) without changing the Pilot.

        `copilot_init` (a pretrained model or its path) initialises the Copilot: a T5-layout encoder-decoder of
        the Pilot's family (the paper's choice) gives every weight of its decoder, cross-attention included; a
        LLaMA/Qwen2/Qwen3/Mistral-layout decoder gives all but the cross-attention.
        """
        validate_fusion_settings(copilot_lambda, fusion, copilot_feedback)
        if not getattr(pilot.config, "is_encoder_decoder", False):
            raise ValueError(
                f"PilotCopilotForSeq2SeqLM wraps an encoder-decoder Pilot (T5, BART, ...), got "
                f"{type(pilot).__name__}: use PilotCopilotForCausalLM.from_pilot for a decoder-only Pilot."
            )
        return cls.attach_new_copilot(
            pilot, copilot_config, copilot_init, copilot_lambda, fusion, copilot_feedback
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a whole Pilot+Copilot checkpoint; the folder's kind is read from config.json as data first, and
        tensors that the checkpoint lacks or has in excess are refused (`check_loaded_tensors`)."""
        hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        try:
            config = read_checkpoint_config(
                pretrained_model_name_or_path,
                kwargs.get("config"),
                (PilotCopilotSeq2SeqConfig.model_type, CopilotConfig.model_type),
                **hub_kwargs,
            )
        except ValueError as error:
            raise ValueError(
                f"{os.fspath(pretrained_model_name_or_path)} is not a PilotCopilotForSeq2SeqLM checkpoint. Attach a "
                "Copilot to a plain encoder-decoder model with "
                "PilotCopilotForSeq2SeqLM.from_pilot(AutoModelForSeq2SeqLM.from_pretrained(path))."
            ) from error
        allow, wants_info = kwargs.pop("allow_other_pilot", False), kwargs.pop("output_loading_info", False)
        if config["model_type"] == CopilotConfig.model_type:
            return cls.from_copilot_folder(
                pretrained_model_name_or_path, config, allow, wants_info, hub_kwargs, kwargs
            )
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
        )
        check_loaded_tensors(info, pretrained_model_name_or_path)
        model.restore_peft_trainable()
        return (model, info) if wants_info else model

    def get_encoder(self, modality: str | None = None) -> nn.Module:
        return self.pilot.get_encoder()

    def get_decoder(self) -> nn.Module:
        return self.pilot.get_decoder()

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The Pilot's own shift (T5: pad first; BART: decoder_start_token_id first), as DataCollatorForSeq2Seq uses."""
        return self.pilot.prepare_decoder_input_ids_from_labels(labels=labels)

    # ----------------------------------------------------------------------------------------------
    # Forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: ModelOutput | tuple | None = None,
        labels: torch.LongTensor | None = None,
        cache: PilotCopilotEncoderDecoderCache | None = None,
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
    ) -> PilotCopilotSeq2SeqOutput:
        """Teacher-forced pass (training, evaluation) or one incremental generation step (with `cache`).

        As in T5/BART, `labels` alone give `decoder_input_ids` (the labels shifted right). With labels:
        `loss = pilot_loss + copilot_loss`, where `pilot_loss` is exactly the Pilot's own loss (with
        `num_items_in_batch`: its token cross-entropy summed and divided by it, exact under gradient
        accumulation) and `copilot_loss` the Copilot's over decoder positions whose label is not -100 (the
        paper's RMSE, or the mean cross-entropy: `CopilotConfig.error_loss`; `copilot_loss_sum` is its sum).
        `pilot_forward`: the Pilot's compiled call, which generate() hands over through `get_compiled_call`, with
        the Copilot's compiled decoding step (`copilot_step`). `return_predicted_error`: see
        PilotCopilotForCausalLM.forward.
        """
        copilot_lambda, fusion, copilot_feedback = self.fusion_settings(
            copilot_lambda, fusion, copilot_feedback
        )
        fused_as_logits = self.fused_as_logits(return_fused, labels)
        return_fused = bool(return_fused) or fused_as_logits
        cache = kwargs.pop("past_key_values", None) if cache is None else cache  # transformers < 5.24
        if cache is not None and not isinstance(cache, PilotCopilotEncoderDecoderCache):
            raise ValueError(
                f"PilotCopilotForSeq2SeqLM keeps the Copilot's state in a PilotCopilotEncoderDecoderCache, got "
                f"{type(cache).__name__}. Let generate() create the cache."
            )
        if labels is not None and decoder_input_ids is None and kwargs.get("decoder_inputs_embeds") is None:
            decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        if decoder_input_ids is None:
            raise ValueError(
                "PilotCopilotForSeq2SeqLM needs decoder_input_ids or labels: the Copilot reads the decoder tokens' errors."
            )
        kwargs.pop("return_dict", None)
        wants_hidden_states = kwargs.pop("output_hidden_states", False)
        if cache is None and use_cache:
            decoder_config = self.config.get_text_config(decoder=True)
            cache = PilotCopilotEncoderDecoderCache(
                DynamicCache(config=decoder_config), DynamicCache(config=decoder_config)
            )
        pilot_out = (pilot_forward or self.pilot)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            labels=labels,
            **{CACHE_KEYWORD: cache},
            # Without a cache, the Pilot's own default: T5's arithmetic differs slightly with and without one.
            use_cache=True if cache is not None else use_cache,
            output_hidden_states=True,
            return_dict=True,
            **kwargs,
        )
        logits = pilot_out.logits
        entry = mistake_log_entry_from_seq2seq_pass(
            decoder_input_ids,
            decoder_attention_mask,
            labels,
            logits,
            pilot_out.encoder_last_hidden_state,
            attention_mask,
            pilot_out.decoder_hidden_states,
            pilot_probabilities(logits, self.pilot_probs_out(logits)),
        )
        if cache is not None:
            predicted_errors = copilot_generation_step(
                self.copilot,
                decoder_input_ids,
                decoder_attention_mask,
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

        output = PilotCopilotSeq2SeqOutput(
            logits=logits,
            **{CACHE_KEYWORD: cache},
            predicted_error=predicted_errors,
            encoder_last_hidden_state=pilot_out.encoder_last_hidden_state,
            decoder_hidden_states=pilot_out.decoder_hidden_states if wants_hidden_states else None,
            encoder_hidden_states=pilot_out.encoder_hidden_states if wants_hidden_states else None,
            decoder_attentions=pilot_out.decoder_attentions,
            cross_attentions=pilot_out.cross_attentions,
            encoder_attentions=pilot_out.encoder_attentions,
            mistake_log_entry=entry if return_mistake_log else None,
        )
        if return_fused:
            output.fused_logits = fuse_scores(logits, predicted_errors, copilot_lambda, fusion)
            if fused_as_logits:
                output.logits = output.fused_logits
        if labels is not None:
            objective, output.copilot_squared_error, num_tokens = copilot_terms
            output.copilot_loss_sum, output.copilot_num_tokens = objective, num_tokens
            if not self.training and num_tokens == 0:  # in training, CopilotTrainer warns at the step's check
                warnings.warn(NO_LABELS_WARNING, stacklevel=2)
            pilot_loss = pilot_out.loss
            if num_items_in_batch is not None:
                # T5/BART average over this micro-batch: summed here and divided by the optimizer batch's count.
                flat = logits.float().reshape(-1, logits.shape[-1])
                summed = F.cross_entropy(flat, labels.reshape(-1).to(logits.device), reduction="sum")
                pilot_loss = summed / torch.as_tensor(num_items_in_batch, device=logits.device)
            output.pilot_loss, output.copilot_loss = joint_losses(
                pilot_loss, objective, num_tokens, self.copilot.config.error_loss
            )
            output.loss = output.pilot_loss + output.copilot_loss
        return output

    # ----------------------------------------------------------------------------------------------
    # generate() hooks
    def _prepare_text_encoder_decoder_kwargs_for_generation(
        self, inputs_tensor, model_kwargs, *args, **kwargs
    ):
        # The fusion settings are this model's, not the encoder's: generate() would hand them to it.
        fusion = {k: model_kwargs.pop(k) for k in FUSION_FIELDS if k in model_kwargs}
        model_kwargs = super()._prepare_text_encoder_decoder_kwargs_for_generation(
            inputs_tensor, model_kwargs, *args, **kwargs
        )
        model_kwargs.update(fusion)
        return model_kwargs

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # The Copilot's state lives in the cache, so fused generation always uses one (see the causal wrapper).
        generation_config.use_cache = True
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get(CACHE_KEYWORD)
        if isinstance(cache, PilotCopilotEncoderDecoderCache):
            return
        if (
            getattr(cache, "_is_user_defined", False)
            or type(cache) is not EncoderDecoderCache
            or type(cache.self_attention_cache) not in (DynamicCache, StaticCache)
        ):
            raise ValueError(
                f"Fused generation needs a PilotCopilotEncoderDecoderCache, got {type(cache).__name__}: use the "
                "default dynamic cache or cache_implementation='static'."
            )
        # The two empty caches generate() just built (dynamic or static), with the Copilot's state alongside.
        model_kwargs[CACHE_KEYWORD] = PilotCopilotEncoderDecoderCache(
            cache.self_attention_cache, cache.cross_attention_cache
        )


PilotCopilotForSeq2SeqLM.wrapper_class = PilotCopilotForSeq2SeqLM


class CopilotCheckpointForSeq2SeqLM(PilotCopilotForSeq2SeqLM):
    """What `AutoModelForSeq2SeqLM` loads from a Copilot-only folder: its base Pilot with the Copilot attached
    (its own class only because an Auto class pairs one model class with one config class)."""

    config_class = CopilotConfig


__all__ = ["CopilotCheckpointForSeq2SeqLM", "PilotCopilotForSeq2SeqLM", "PilotCopilotSeq2SeqOutput"]
