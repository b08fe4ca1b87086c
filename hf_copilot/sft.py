"""`CopilotSFTTrainer` / `CopilotSFTConfig`: trl's `SFTTrainer` that also trains the Copilot.

`pip install "hf-copilot[trl]"`. trl prepares the data (language-modeling text, prompt/completion with
completion-only loss, conversations through the chat template, packing) exactly as it does for a plain
model; `CopilotTrainer` computes the joint objective on the batches it builds, so the Copilot is trained on
the very positions the Pilot is (labels -100 on prompts and padding are -100 for both). trl's metrics
(`mean_token_accuracy`, `entropy`, `num_tokens`) are computed from the Pilot's logits and logged next to
CopilotTrainer's.

Two trl paths are changed for the wrapper (docs/howto-train.md, "trl"):
- trl's fused LM head (per-token log-probabilities without the logits) is removed from the model: the Mistake
  Log needs the Pilot's full next-token distribution, so the wrapper computes the logits anyway.
- Packed and padding-free batches (`packing=True` with the "bfd" strategies, `padding_free=True`) are
  unpacked into one right-padded row per packed sequence: the Copilot's attention mask is a padding mask and
  cannot keep packed sequences apart, and the Pilot then sees exactly the sequences it sees under trl's
  padding-free attention. "wrapped" packing (sequences cut into full rows) is kept as trl builds it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from packaging.version import Version
from torch import nn
from transformers.trainer_utils import unwrap_peft_model

from .trainer import CopilotTrainer, _is_pilot_copilot
from .training_args import CopilotTrainingArguments

# The oldest trl tests/test_sft.py passes with (also run: 1.6.0, 1.7.1, 1.8.0, 1.12.0, 1.14.2, 1.16.0).
MIN_TRL_VERSION = "1.5.1"
# Positions whose logits trl's metrics read at a time (float32 copies of `_METRICS_CHUNK x vocab`).
_METRICS_CHUNK = 256

try:
    import trl
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
except ImportError as error:  # trl missing, or one that does not import with this transformers
    raise ImportError(
        f'CopilotSFTTrainer and CopilotSFTConfig need trl>={MIN_TRL_VERSION}: pip install "hf-copilot[trl]" '
        f"({error})."
    ) from error
if Version(trl.__version__) < Version(MIN_TRL_VERSION):
    raise ImportError(
        f"CopilotSFTTrainer needs trl>={MIN_TRL_VERSION}, found trl {trl.__version__}: "
        'pip install -U "hf-copilot[trl]".'
    )


# SFTConfig first: dataclass fields are collected from the last base to the first, so its defaults
# (learning_rate, bf16, gradient_checkpointing, logging_steps) win over TrainingArguments' ones.
@dataclass
class CopilotSFTConfig(SFTConfig, CopilotTrainingArguments):
    """trl's `SFTConfig` (same fields and defaults) plus the Copilot's fields of `CopilotTrainingArguments`."""

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type == "chunked_nll":
            # The same loss, which trl < 1.16 computes by patching the model's forward with a head that skips the
            # logits: the Mistake Log needs them, and the wrapper computes the Pilot's loss itself.
            self.loss_type = "nll"
        if self.loss_type != "nll":
            raise ValueError(
                f"loss_type={self.loss_type!r} is not supported by CopilotSFTTrainer: the Pilot's loss is its own "
                "cross-entropy and the Mistake Log measures its errors against the hard labels. Set loss_type='nll'."
            )
        if self.use_liger_kernel:
            raise ValueError(
                "use_liger_kernel=True is not supported by CopilotSFTTrainer: Liger patches models by model type, "
                "and its fused cross-entropy would compute the Pilot's loss without the logits the Mistake Log "
                "needs. Set use_liger_kernel=False."
            )


@dataclass
class _SplitPackedCollator(DataCollatorForLanguageModeling):
    """trl's padded collator, with each packed example split into its sequences (`seq_lengths`), a row each.

    An example without `seq_lengths` ("wrapped" packing, or no packing) stays one row. A subclass, so that trl's
    checks on its own collator still apply.
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        sequences = []
        for example in examples:
            example = dict(example)
            lengths = example.pop("seq_lengths", None) or [len(example["input_ids"])]
            start = 0
            for length in lengths:
                # Per-token columns (input_ids, labels, masks) are cut; others are kept as they are.
                sequences.append(
                    {
                        key: value[start : start + length]
                        if isinstance(value, list) and len(value) == len(example["input_ids"])
                        else value
                        for key, value in example.items()
                    }
                )
                start += length
        return super().torch_call(sequences)


class CopilotSFTTrainer(CopilotTrainer, SFTTrainer):
    """trl's `SFTTrainer` for a `PilotCopilotForCausalLM`, trained with `CopilotTrainer`'s joint objective.

    Takes `SFTTrainer`'s arguments (pass them by keyword) with a `CopilotSFTConfig`. `peft_config` applies the
    adapter to the Pilot (the Copilot trains whole), as `get_peft_model(pilot, ...)` before wrapping does.
    Logs are CopilotTrainer's (`loss` is the Pilot's, `joint_loss` the objective) plus trl's metrics.
    """

    _tag_names = ["trl", "sft", "hf-copilot"]

    def __init__(self, model, args: CopilotSFTConfig | None = None, peft_config=None, **kwargs):
        if args is None:
            args = CopilotSFTConfig(output_dir="tmp_trainer")
        if not isinstance(args, CopilotSFTConfig):
            raise TypeError(
                f"CopilotSFTTrainer needs CopilotSFTConfig, got {type(args).__name__}: replace SFTConfig(...) "
                "with CopilotSFTConfig(...) (the same fields and defaults, plus the Copilot's)."
            )
        if isinstance(model, nn.Module):
            if not _is_pilot_copilot(unwrap_peft_model(model)):
                raise TypeError(
                    f"CopilotSFTTrainer trains a PilotCopilotForCausalLM, got {type(model).__name__}: wrap your "
                    "model with PilotCopilotForCausalLM.from_pilot(model)."
                )
            if peft_config is not None:
                model = self._apply_peft_to_pilot(model, peft_config, args)
        had_own_forward = isinstance(model, nn.Module) and "forward" in vars(unwrap_peft_model(model))
        super().__init__(model=model, args=args, **kwargs)
        pilot_copilot = unwrap_peft_model(self.model)
        patched = vars(pilot_copilot).get("forward")
        if not had_own_forward and getattr(patched, "__wrapped__", None) is type(pilot_copilot).forward:
            del pilot_copilot.forward  # trl's fused LM head: see the module docstring
        collator = self.data_collator
        if isinstance(collator, DataCollatorForLanguageModeling) and not isinstance(
            collator, _SplitPackedCollator
        ):
            settings = {f.name: getattr(collator, f.name) for f in fields(collator) if f.init}
            self.data_collator = _SplitPackedCollator(**{**settings, "padding_free": False})

    def _set_signature_columns_if_needed(self) -> None:
        """trl's columns, not CopilotTrainer's: trl keeps what its own dataset preparation and collators read."""
        SFTTrainer._set_signature_columns_if_needed(self)

    @staticmethod
    def _apply_peft_to_pilot(model, peft_config, args: CopilotSFTConfig):
        from peft import PeftModel, get_peft_model
        from transformers import set_seed

        if isinstance(model, PeftModel) or isinstance(model.pilot, PeftModel):
            raise ValueError(
                "The model already has a PEFT adapter and peft_config would add another: pass one of them."
            )
        set_seed(args.seed)  # as SFTTrainer does: the adapter's initialisation is reproducible
        model.pilot = get_peft_model(model.pilot, peft_config)
        if args.gradient_checkpointing:
            # The frozen embeddings' outputs must require grad for checkpointed layers to reach the adapter.
            model.enable_input_require_grads()
        return model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        self._record_sft_metrics(inputs, outputs.logits)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _record_sft_metrics(self, inputs: dict[str, Any], logits: torch.Tensor) -> None:
        """trl's `entropy`, `mean_token_accuracy` and `num_tokens`, from the Pilot's logits."""
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"][:, 1:]
        mask = labels != -100
        rows, positions = mask.nonzero(as_tuple=True)
        entropy = logits.new_zeros((), dtype=torch.float32)
        correct = torch.zeros((), dtype=torch.long, device=logits.device)
        # A float copy of a few positions' logits at a time: the whole [positions, vocab] would double the memory.
        for start in range(0, rows.numel(), _METRICS_CHUNK):
            chunk = slice(start, start + _METRICS_CHUNK)
            scores = logits[rows[chunk], positions[chunk]].float()
            log_probs = torch.log_softmax(scores, dim=-1)
            entropy += -(log_probs.exp() * log_probs).sum()
            correct += (scores.argmax(-1) == labels[rows[chunk], positions[chunk]]).sum()
        gather = self.accelerator.gather_for_metrics
        num_valid, entropy, correct = (
            gather(value.reshape(1)).sum() for value in (mask.sum(), entropy, correct)
        )
        metrics = self._metrics[mode]
        metrics["entropy"].append((entropy / num_valid).item() if num_valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((correct / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            tokens = gather(inputs["attention_mask"].sum().reshape(1)).sum().item()
            self._total_train_tokens += tokens // getattr(self, "_tp_size", 1)
        metrics["num_tokens"] = [self._total_train_tokens]


__all__ = ["CopilotSFTConfig", "CopilotSFTTrainer", "MIN_TRL_VERSION"]
