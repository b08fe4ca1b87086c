"""Padding-free batches as one right-padded row per sequence, for `CopilotTrainer`.

A padding-free collator (transformers' `DataCollatorWithFlattening`) puts a batch's sequences side by side in one
row, with `position_ids` that start again at each sequence and no `attention_mask`; the Pilot's attention keeps
them apart by those positions. The Copilot's attention mask is a padding mask and cannot: it would read the errors
of the sequences before. Unpacked, each sequence is a row of its own, and the Pilot sees the sequences it saw
packed, with the same labels (so the same loss and token count).
"""

from __future__ import annotations

from typing import Any

import torch

# What a flattened batch carries about its own layout: meaningless once the sequences are rows.
FLATTENED_LAYOUT_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def sequence_starts(positions: torch.Tensor) -> torch.Tensor:
    """[rows, tokens - 1]: True where a token starts a new sequence, its position not one past its predecessor's,
    the rule by which transformers' masks keep packed sequences apart (`find_packed_sequence_indices`)."""
    return positions[..., 1:] - positions[..., :-1] != 1


def is_padding_free(inputs: dict[str, Any]) -> bool:
    """Sequences side by side in a row: `position_ids` that start again somewhere, and no `attention_mask`, as
    transformers reads a batch (a padded batch's position ids may start again under left padding, but it has its
    mask)."""
    positions = inputs.get("position_ids")
    if positions is None or inputs.get("attention_mask") is not None or positions.shape[-1] < 2:
        return False
    return bool(sequence_starts(positions).any())


def unpack_padding_free(inputs: dict[str, Any]) -> dict[str, Any]:
    """`inputs` unchanged unless padding-free (`is_padding_free`); then each sequence as a row, right-padded to the
    longest: every per-token tensor ([rows, tokens] like `input_ids`) is cut, padded with -100 for `labels` and 0
    otherwise, and an `attention_mask` marks the tokens; `position_ids` keep their values (padding continues them).
    The flattened layout's own keys (`FLATTENED_LAYOUT_KEYS`) are dropped; anything else is kept as it is."""
    if not is_padding_free(inputs):
        return inputs
    positions = inputs["position_ids"]
    per_token = [
        key
        for key, value in inputs.items()
        if key not in FLATTENED_LAYOUT_KEYS and torch.is_tensor(value) and value.shape == positions.shape
    ]
    spans = []  # (row, start, end) of every sequence
    for row, row_positions in enumerate(positions):
        starts = [0, *(sequence_starts(row_positions).nonzero().flatten() + 1).tolist()]
        spans += [
            (row, start, end) for start, end in zip(starts, [*starts[1:], positions.shape[-1]], strict=True)
        ]
    width = max(end - start for _, start, end in spans)
    unpacked = {
        key: value for key, value in inputs.items() if key not in (*per_token, *FLATTENED_LAYOUT_KEYS)
    }
    for key in per_token:
        value = inputs[key]
        rows = value.new_full((len(spans), width), -100 if key == "labels" else 0)
        for index, (row, start, end) in enumerate(spans):
            rows[index, : end - start] = value[row, start:end]
            if key == "position_ids":  # padding continues the positions, as a padded batch's would
                rows[index, end - start :] = (
                    torch.arange(width - (end - start), device=value.device) + value[row, end - 1] + 1
                )
        unpacked[key] = rows
    mask = torch.zeros(len(spans), width, dtype=torch.long, device=positions.device)
    for index, (_, start, end) in enumerate(spans):
        mask[index, : end - start] = 1
    unpacked["attention_mask"] = mask
    return unpacked


__all__ = ["is_padding_free", "sequence_starts", "unpack_padding_free"]
