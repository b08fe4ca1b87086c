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
    # Every sequence's row in the batch, first token and length, in order: a gather per tensor, no Python loop.
    begins = torch.ones_like(positions, dtype=torch.bool)
    begins[:, 1:] = sequence_starts(positions)
    rows, starts = begins.nonzero(as_tuple=True)
    same_row_next = torch.cat([rows[1:] == rows[:-1], rows.new_zeros(1, dtype=torch.bool)])
    ends = torch.where(same_row_next, starts.roll(-1), positions.shape[-1])
    lengths = ends - starts
    offsets = torch.arange(int(lengths.max()), device=positions.device)
    is_token = offsets < lengths[:, None]
    columns = (starts[:, None] + offsets).clamp_max(positions.shape[-1] - 1)
    unpacked = {
        key: value for key, value in inputs.items() if key not in (*per_token, *FLATTENED_LAYOUT_KEYS)
    }
    for key in per_token:
        if key == "position_ids":  # a sequence's positions are consecutive; padding continues them
            unpacked[key] = positions[rows, starts][:, None] + offsets
        else:
            taken = inputs[key][rows[:, None], columns]
            unpacked[key] = taken.masked_fill(~is_token, -100 if key == "labels" else 0)
    unpacked["attention_mask"] = is_token.long()
    return unpacked


__all__ = ["is_padding_free", "sequence_starts", "unpack_padding_free"]
