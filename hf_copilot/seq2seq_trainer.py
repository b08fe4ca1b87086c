"""`CopilotSeq2SeqTrainer` / `CopilotSeq2SeqTrainingArguments`: `Seq2SeqTrainer` with the Copilot.

For a `Seq2SeqTrainer` script with an encoder-decoder Pilot wrapped in `PilotCopilotForSeq2SeqLM`. Training
is `CopilotTrainer`'s (the joint objective, the Mistake Log, the Copilot's metrics); `CopilotTrainer` alone
trains the same model too. What `Seq2SeqTrainer` adds is evaluation with `predict_with_generate=True`: the
predictions `compute_metrics` scores come from the fused `generate()`, so they are the Pilot + Copilot's, at the
model's `copilot_lambda` (or `generation_config`'s settings). `eval_loss` stays the Pilot's, as in `CopilotTrainer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

from .trainer import CopilotTrainer
from .training_args import CopilotTrainingArguments


@dataclass
class CopilotSeq2SeqTrainingArguments(CopilotTrainingArguments, Seq2SeqTrainingArguments):
    """`CopilotTrainingArguments` plus `Seq2SeqTrainingArguments`' generation settings (`predict_with_generate`,
    `generation_max_length`, `generation_num_beams`, `generation_config`, `sortish_sampler`)."""


class CopilotSeq2SeqTrainer(CopilotTrainer, Seq2SeqTrainer):
    """`Seq2SeqTrainer` for a `PilotCopilotForSeq2SeqLM`: the same arguments, with `CopilotSeq2SeqTrainingArguments`."""

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
        **gen_kwargs,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        if not self.args.predict_with_generate or prediction_loss_only or "labels" not in inputs:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys, **gen_kwargs)
        # The loss through compute_loss (the Pilot's, and the Copilot's evaluation sums), the tokens through the
        # fused generate(): Seq2SeqTrainer's own step would report the joint loss and skip those sums.
        loss, _, _ = super().prediction_step(model, inputs, True, ignore_keys)
        dropped = ("labels", "decoder_input_ids", "decoder_attention_mask")  # the decoder generates freely
        unlabelled = {k: v for k, v in inputs.items() if k not in dropped}
        _, generated_tokens, _ = super().prediction_step(model, unlabelled, False, ignore_keys, **gen_kwargs)
        labels = inputs["labels"]
        gen_config = self.model.generation_config
        if labels.shape[-1] < gen_config.max_length:  # as Seq2SeqTrainer pads them
            labels = self._pad_tensors_to_max_len(labels, gen_config.max_length)
        elif gen_config.max_new_tokens is not None and labels.shape[-1] < gen_config.max_new_tokens + 1:
            labels = self._pad_tensors_to_max_len(labels, gen_config.max_new_tokens + 1)
        return loss, generated_tokens, labels

    def _pad_tensors_to_max_len(self, tensor: torch.Tensor, max_length: int) -> torch.Tensor:
        if self.processing_class is None or not hasattr(self.processing_class, "pad_token_id"):
            # Without a tokenizer Seq2SeqTrainer reads the model config's pad token: the Pilot's here.
            pad_token_id = self.pilot_copilot().config.get_text_config().pad_token_id
            if pad_token_id is not None:
                padded = tensor.new_full((tensor.shape[0], max_length), pad_token_id)
                padded[:, : tensor.shape[-1]] = tensor
                return padded
        return super()._pad_tensors_to_max_len(tensor, max_length)


__all__ = ["CopilotSeq2SeqTrainer", "CopilotSeq2SeqTrainingArguments"]
