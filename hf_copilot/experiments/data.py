"""Examples -> tokenized `datasets.Dataset` for fine-tuning a causal or encoder-decoder LM, and the collator.

The loss is on the answer only: prompt tokens get label -100, the answer and a closing eos keep
their ids, so the model learns to answer and then stop. The prompt is tokenized on its own, exactly
as `generate()` will see it at evaluation time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .tasks import Example

IGNORE_INDEX = -100


def prompt_and_answer_ids(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[list[int]], list[list[int]]]:
    """Each prompt tokenized as generate() will see it, and each answer without special tokens."""
    if not examples:
        raise ValueError("Got no examples to tokenize: generate or load some first.")
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos token: set one so the model learns where answers end.")
    prompts = tokenizer([e.prompt for e in examples])["input_ids"]
    answers = tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]
    return prompts, answers


def tokenize_examples(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """A Dataset with `input_ids`, `attention_mask` and `labels` (prompt masked to -100) per example."""
    prompts, answers = prompt_and_answer_ids(examples, tokenizer)
    input_ids = [p + a + [tokenizer.eos_token_id] for p, a in zip(prompts, answers, strict=True)]
    labels = [
        [IGNORE_INDEX] * len(p) + a + [tokenizer.eos_token_id] for p, a in zip(prompts, answers, strict=True)
    ]
    return Dataset.from_dict(
        {"input_ids": input_ids, "attention_mask": [[1] * len(ids) for ids in input_ids], "labels": labels}
    )


def tokenize_seq2seq_examples(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """The same examples for an encoder-decoder Pilot: the prompt is the source, the answer and eos the labels."""
    sources, answers = prompt_and_answer_ids(examples, tokenizer)
    return Dataset.from_dict(
        {
            "input_ids": sources,
            "attention_mask": [[1] * len(ids) for ids in sources],
            "labels": [a + [tokenizer.eos_token_id] for a in answers],
        }
    )


@dataclass
class DataCollatorForCompletion:
    """Pads a batch on the right: inputs with the pad token, attention mask with 0, labels with -100.

    Right padding keeps every example's positions the same as unpadded, whatever the tokenizer's
    (generation-side) padding setting. Each key is padded to its own longest row, so the same collator
    batches an encoder-decoder Pilot's sources and labels.
    """

    tokenizer: PreTrainedTokenizerBase

    def __post_init__(self) -> None:
        if self.tokenizer.pad_token_id is None:
            raise ValueError(
                "The tokenizer has no pad token: set one (e.g. tokenizer.pad_token = tokenizer.eos_token)."
            )

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        padding = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch = {}
        for key, value in padding.items():
            width = max(len(f[key]) for f in features)
            batch[key] = torch.tensor([list(f[key]) + [value] * (width - len(f[key])) for f in features])
        return batch
