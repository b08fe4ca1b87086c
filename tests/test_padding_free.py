"""Padding-free batches (transformers' `DataCollatorWithFlattening`): one right-padded row per sequence for the
Copilot, whose attention mask cannot keep side-by-side sequences apart."""

from __future__ import annotations

import torch
from test_trainer import collate, counting_rows, logged, make_args, make_model
from transformers import DataCollatorWithFlattening

from hf_copilot.padding_free import unpack_padding_free
from hf_copilot.trainer import CopilotTrainer


def test_a_flattened_batch_becomes_a_right_padded_row_per_sequence():
    rows = [
        {"input_ids": [5, 6, 7], "labels": [5, -100, 7]},
        {"input_ids": [8, 9], "labels": [8, 9]},
        {"input_ids": [10, 11, 12, 13], "labels": [10, 11, 12, 13]},
    ]
    flattened = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)(rows)
    unpacked = unpack_padding_free(flattened)
    assert set(unpacked) == {"input_ids", "labels", "position_ids", "attention_mask"}
    assert unpacked["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 0, 0], [10, 11, 12, 13]]
    assert unpacked["labels"].tolist() == [[-100, -100, 7, -100], [-100, 9, -100, -100], [-100, 11, 12, 13]]
    assert unpacked["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert unpacked["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]]


def test_a_padded_batch_is_left_as_it_is():
    """Left padding makes position ids fall back too, but such a batch carries its attention mask."""
    batch = {
        "input_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]),
        "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
        "position_ids": torch.tensor([[1, 0, 1], [0, 1, 2]]),
    }
    assert unpack_padding_free(batch) is batch
    one_sequence = {"input_ids": torch.tensor([[5, 6, 7]]), "position_ids": torch.tensor([[2, 3, 4]])}
    assert unpack_padding_free(one_sequence) is one_sequence


def test_a_sequence_starts_wherever_a_position_is_not_one_past_the_last_as_transformers_reads_it():
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]]), "position_ids": torch.tensor([[0, 1, 4, 5, 0]])}
    unpacked = unpack_padding_free(batch)
    assert unpacked["input_ids"].tolist() == [[5, 6], [7, 8], [9, 0]]
    assert unpacked["position_ids"].tolist() == [[0, 1], [4, 5], [0, 1]]


def test_training_and_evaluation_on_flattened_batches_are_those_on_padded_rows(tmp_path):
    """The same examples through DataCollatorWithFlattening and through a padding collator: the same losses,
    metrics and weights, bit for bit (before, the Copilot attended across the flattened sequences)."""
    runs = {}
    for name, collator in (("padded", collate), ("flattened", DataCollatorWithFlattening())):
        trainer = CopilotTrainer(
            model=make_model(),
            args=make_args(tmp_path / name, per_device_eval_batch_size=4),
            train_dataset=counting_rows(),
            eval_dataset=counting_rows(8, seed=1),
            data_collator=collator,
        )
        trainer.train()
        runs[name] = (trainer, trainer.evaluate())
    (padded, padded_metrics), (flattened, flattened_metrics) = runs["padded"], runs["flattened"]
    for key in ("pilot_loss", "copilot_loss", "copilot_r2"):
        assert logged(flattened, key) == logged(padded, key)
    for key in ("eval_loss", "eval_copilot_r2", "eval_fused_token_accuracy", "eval_pilot_token_accuracy"):
        assert flattened_metrics[key] == padded_metrics[key]
    for (name, a), b in zip(
        padded.model.state_dict().items(), flattened.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
