"""Tokenized fine-tuning data: the loss sees the answer and eos only; batches pad on the right."""

from __future__ import annotations

import pytest
import torch

from hf_copilot.experiments.data import (
    DataCollatorForCompletion,
    tokenize_examples,
    tokenize_seq2seq_examples,
)
from hf_copilot.experiments.tasks import Example
from hf_copilot.experiments.tokenizer import build_char_tokenizer


@pytest.fixture
def tokenizer():
    # ids: <pad>=0 <s>=1 </s>=2 <unk>=3 +=4 0..9=5..14 ==15
    return build_char_tokenizer(alphabet="0123456789+=")


def test_prompt_is_masked_and_answer_ends_with_eos(tokenizer):
    dataset = tokenize_examples([Example("12+3=", "15"), Example("9+9=", "18")], tokenizer)
    assert dataset.column_names == ["input_ids", "attention_mask", "labels"]
    assert dataset[0] == {
        "input_ids": [1, 6, 7, 4, 8, 15, 6, 10, 2],
        "attention_mask": [1, 1, 1, 1, 1, 1, 1, 1, 1],
        "labels": [-100, -100, -100, -100, -100, -100, 6, 10, 2],
    }
    assert dataset[1]["labels"] == [-100, -100, -100, -100, -100, 6, 13, 2]


def test_collator_pads_on_the_right_whatever_the_tokenizer_side(tokenizer):
    assert tokenizer.padding_side == "left"
    dataset = tokenize_examples([Example("12+3=", "15"), Example("9+9=", "8")], tokenizer)
    batch = DataCollatorForCompletion(tokenizer)([dataset[0], dataset[1]])
    assert torch.equal(
        batch["input_ids"], torch.tensor([[1, 6, 7, 4, 8, 15, 6, 10, 2], [1, 14, 4, 14, 15, 13, 2, 0, 0]])
    )
    assert torch.equal(batch["attention_mask"], torch.tensor([[1] * 9, [1] * 7 + [0, 0]]))
    assert torch.equal(
        batch["labels"], torch.tensor([[-100] * 6 + [6, 10, 2], [-100] * 5 + [13, 2, -100, -100]])
    )


def test_seq2seq_examples_are_the_prompt_as_source_and_the_answer_as_labels(tokenizer):
    dataset = tokenize_seq2seq_examples([Example("12+3=", "15"), Example("9+9=", "8")], tokenizer)
    assert dataset[0] == {"input_ids": [1, 6, 7, 4, 8, 15], "attention_mask": [1] * 6, "labels": [6, 10, 2]}
    batch = DataCollatorForCompletion(tokenizer)([dataset[0], dataset[1]])  # each key to its own width
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 6, 7, 4, 8, 15], [1, 14, 4, 14, 15, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1] * 6, [1] * 5 + [0]]))
    assert torch.equal(batch["labels"], torch.tensor([[6, 10, 2], [13, 2, -100]]))


def test_empty_examples_are_an_error(tokenizer):
    with pytest.raises(ValueError, match="no examples"):
        tokenize_examples([], tokenizer)


def test_missing_special_tokens_are_errors(tokenizer):
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no eos token"):
        tokenize_examples([Example("1+1=", "2")], tokenizer)
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        DataCollatorForCompletion(tokenizer)
