"""The Mistake Log: a bounded ring buffer of the most recent training steps' entries (SPEC section 2).

Each step writes one `MistakeLogEntry`; the Copilot's replay batch is drawn from here. Entries live on
the CPU so the log costs no accelerator memory, and compact storage (the Pilot's top-k probabilities)
keeps 128 entries affordable for real vocabularies. The log reports what it holds and never grows
past `size` entries.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

from .checkpointing import atomic_torch_save
from .mistake_log_entry import MistakeLogEntry, PilotErrors, error_norm_and_gold_prob

_ENTRY_FIELDS = ("x_tilde", "h_bar", "attention_mask", "loss_mask")
_ERROR_FIELDS = ("targets", "mask", "probs", "topk_indices", "topk_values")
_FORMAT_VERSION = 1
EXACT_STORAGE_WARNING_BYTES = 2**30  # exact storage projected above this size warns once, at the first entry


def _flatten(entry: MistakeLogEntry) -> dict[str, torch.Tensor]:
    """Every tensor of an entry under a flat name (`x_tilde`, `errors.probs`, ...)."""
    tensors = {name: getattr(entry, name) for name in _ENTRY_FIELDS}
    if entry.encoder_attention_mask is not None:  # an encoder-decoder Pilot's entry
        tensors["encoder_attention_mask"] = entry.encoder_attention_mask
    for name in _ERROR_FIELDS:
        value = getattr(entry.errors, name)
        if value is not None:
            tensors[f"errors.{name}"] = value
    return tensors


def _entry_bytes(entry: MistakeLogEntry) -> int:
    return sum(t.nbytes for t in _flatten(entry).values())


def _unflatten(tensors: dict[str, torch.Tensor], vocab_size: int) -> MistakeLogEntry:
    errors = PilotErrors(
        vocab_size=vocab_size, **{name: tensors.get(f"errors.{name}") for name in _ERROR_FIELDS}
    )
    return MistakeLogEntry(
        errors=errors,
        encoder_attention_mask=tensors.get("encoder_attention_mask"),
        **{name: tensors[name] for name in _ENTRY_FIELDS},
    )


def _pad_time(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad dim 1 (time) with zeros, which is False for masks."""
    if tensor.shape[1] == length:
        return tensor
    padded = tensor.new_zeros((tensor.shape[0], length, *tensor.shape[2:]))
    padded[:, : tensor.shape[1]] = tensor
    return padded


def _top_k(errors: PilotErrors) -> int | None:
    return errors.topk_indices.shape[-1] if errors.is_compact else None


class _Write(NamedTuple):
    """An entry's write awaiting its finite check: its flags, the slot it took, the entry it replaced (None when
    appended) and the latest statistics before it."""

    finite: torch.Tensor
    slot: int
    replaced: MistakeLogEntry | None
    statistics: tuple[tuple[str, ...], torch.Tensor, torch.Tensor]


def refuse_if_not_finite(finite: list[bool]) -> None:
    """The ValueError for an entry whose finite flags [x_tilde, h_bar, probabilities] are not all set."""
    if all(finite):
        return
    name = ("x_tilde", "h_bar", "errors probabilities")[finite.index(False)]
    raise ValueError(
        f"MistakeLogEntry {name} contains NaN or inf: the Pilot's forward pass diverged "
        "(check the learning rate / mixed precision); the entry was not stored."
    )


def collate_entries(entries: list[MistakeLogEntry]) -> MistakeLogEntry:
    """Concatenate entries along the batch dim, right-padding shorter sequences (zeros / False).

    T differs between steps (and an encoder-decoder Pilot's source length S). Padded positions carry no
    error and no loss, and padded source positions are masked, so every per-position quantity on the
    original positions is unchanged.
    """
    if not entries:
        raise ValueError("collate_entries needs at least one entry.")
    first = entries[0]
    for entry in entries[1:]:
        if entry.errors.vocab_size != first.errors.vocab_size:
            raise ValueError(
                f"Cannot collate entries with vocab sizes {first.errors.vocab_size} and "
                f"{entry.errors.vocab_size}: they come from different Pilots."
            )
        if _top_k(entry.errors) != _top_k(first.errors):
            raise ValueError(
                f"Cannot collate entries stored with different top-k ({_top_k(first.errors)} and "
                f"{_top_k(entry.errors)}; None means exact): compact them to the same k first, e.g. "
                "with `errors.compact(k)` or by writing both through one MistakeLog."
            )
        if entry.x_tilde.shape[-1] != first.x_tilde.shape[-1]:
            raise ValueError(
                f"Cannot collate entries with hidden sizes {first.x_tilde.shape[-1]} and "
                f"{entry.x_tilde.shape[-1]}: they come from different Pilots."
            )
        if entry.is_encoder_decoder != first.is_encoder_decoder:
            raise ValueError(
                "Cannot collate an encoder-decoder Pilot's entries with a decoder-only Pilot's: they come from "
                "different Pilots."
            )
    length = max(entry.h_bar.shape[1] for entry in entries)
    source_length = max(entry.x_tilde.shape[1] for entry in entries)
    source_fields = ("x_tilde", "encoder_attention_mask") if first.is_encoder_decoder else ()
    flat = [_flatten(entry) for entry in entries]
    tensors = {
        name: torch.cat(
            [_pad_time(f[name], source_length if name in source_fields else length) for f in flat]
        )
        for name in flat[0]
    }
    return _unflatten(tensors, first.errors.vocab_size)


class MistakeLog:
    """Ring buffer of the most recent `size` Mistake Log entries, written once per training step.

    `topk=0` stores the Pilot's probabilities exactly (dense [B,T,V]); `topk>0` keeps only the top-k
    per position (SPEC: compact storage, default 64), see `reconstruction_bound`. `size=0` keeps no entries,
    only the latest entry's statistics: what a run needs whose Copilot reads nothing but the fresh entry.
    """

    def __init__(self, size: int = 128, topk: int = 64, store_device: str | torch.device = "cpu") -> None:
        if size < 0:
            raise ValueError(f"MistakeLog size must be >= 0 (0 = keep no entries), got {size}.")
        if topk < 0:
            raise ValueError(f"MistakeLog topk must be >= 0 (0 = exact storage), got {topk}.")
        self.size = size
        self.topk = topk
        self.store_device = torch.device(store_device)
        self._slots: list[MistakeLogEntry] = []
        self._next = 0  # the slot the next entry writes; once full, also the oldest entry
        # memory_bytes(), kept as entries come and go: training reports it every micro-batch.
        self._bytes = 0
        # The latest entry's statistics as a device vector [has loss positions, *means] (names beside it),
        # read back only when reported: a training step waits for no value.
        self._latest_names: tuple[str, ...] = ()
        self._latest_values = torch.zeros(1)
        # sum ||e_j||^2 over the latest entry's loss mask (0-dim, the entry's device): the denominator of the
        # Copilot's R^2, from the statistics add() computes anyway, so the step makes no extra [B,T,V] pass.
        self.latest_error_norm_sum = torch.zeros(())
        # Finite checks of entries added with `defer_checks`, and how to undo each write: see `verify`.
        self._unverified: list[_Write] = []

    # ---- buffer ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._slots)

    @property
    def capacity(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[MistakeLogEntry]:
        """Entries from oldest to newest."""
        return iter(self._slots[self._next :] + self._slots[: self._next])

    def latest(self) -> MistakeLogEntry:
        if not self._slots:
            raise IndexError("The Mistake Log is empty: add() an entry first.")
        return self._slots[self._next - 1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> list[MistakeLogEntry]:
        """`min(n, len)` entries drawn uniformly without replacement (a CPU generator, if given)."""
        order = torch.randperm(len(self._slots), generator=generator)[: max(n, 0)]
        return [self._slots[i] for i in order.tolist()]

    def sample_rows(
        self, n: int, window: int, generator: torch.Generator | None = None
    ) -> MistakeLogEntry | None:
        """`min(n, rows)` rows drawn uniformly without replacement from the newest `window` entries.

        The paper's Copilot draws its batch from the log of recent rounds: rows of different steps
        decorrelate the batch at the same compute as one fresh entry. None when the log is empty.
        """
        entries = list(self)[-window:]
        if not entries:
            return None
        sizes = torch.tensor([entry.x_tilde.shape[0] for entry in entries])
        chosen = torch.randperm(int(sizes.sum()), generator=generator)[:n].sort().values
        owner = torch.bucketize(chosen, sizes.cumsum(0), right=True)
        starts = sizes.cumsum(0) - sizes
        parts = []
        for index in owner.unique().tolist():
            rows = chosen[owner == index] - starts[index]
            parts.append(entries[index].map_tensors(lambda t, rows=rows: t[rows.to(t.device)]))
        return collate_entries(parts)

    def add(self, entry: MistakeLogEntry, defer_checks: bool = False) -> None:
        """Validate, compact (if `topk > 0`), move to `store_device` and write over the oldest slot.

        An entry with NaN or inf is refused (ValueError) and not kept. That check reads a value back from
        the entry's device; `defer_checks=True` leaves it to the next `verify()` (or `stats()`), which undoes
        the writes of refused entries, so a training step on an accelerator waits for nothing here.
        """
        self._validate(entry)
        errors = entry.errors
        if self.size and self.topk and not errors.is_compact:  # a log of size 0 stores nothing to compact
            errors = errors.compact(self.topk)
        finite, *statistics = self._entry_stats(entry, errors)
        slot = self._next if len(self._slots) == self.size else len(self._slots)
        replaced = self._slots[slot] if slot < len(self._slots) else None
        self._unverified.append(_Write(finite, slot, replaced, self._latest_statistics()))
        self._latest_names, self._latest_values, self.latest_error_norm_sum = statistics
        if self.size:
            self._store(entry, errors)
        if not defer_checks:
            self.verify()

    def _latest_statistics(self) -> tuple[tuple[str, ...], torch.Tensor, torch.Tensor]:
        return self._latest_names, self._latest_values, self.latest_error_norm_sum

    def unverified_flags(self) -> torch.Tensor | None:
        """The finite flags [entries, 3] of the entries added with `defer_checks` since the last `verify()`, on
        their device (None when there are none): for a caller that reads them back with its own values."""
        if not self._unverified:
            return None
        device = self._unverified[0].finite.device
        return torch.stack([write.finite.to(device) for write in self._unverified])

    def verify(self, flags: list[list[bool]] | None = None) -> None:
        """Raise for an entry added with `defer_checks` that holds NaN or inf, after undoing the writes of it and
        of every entry added since (newest first), so the log is as it was before it; one read-back for all, or
        none when given `flags`, `unverified_flags()` already read back."""
        if not self._unverified:
            return
        if flags is None:
            flags = self.unverified_flags().tolist()
        pending, self._unverified = self._unverified, []
        for index, row in enumerate(flags):
            if not all(row):
                self._undo(pending[index:])
                refuse_if_not_finite(row)

    def discard_unverified(self) -> None:
        """Undo every write since the last `verify()`: a training step refused for another reason (a loss that
        is not finite) leaves the log as it was before the step."""
        pending, self._unverified = self._unverified, []
        self._undo(pending)

    def _undo(self, writes: list[_Write]) -> None:
        for write in reversed(writes if self.size else []):
            self._bytes -= _entry_bytes(self._slots[write.slot])
            if write.replaced is None:
                self._slots.pop()
            else:
                self._slots[write.slot] = write.replaced
                self._bytes += _entry_bytes(write.replaced)
            self._next = write.slot
        if writes:
            self._latest_names, self._latest_values, self.latest_error_norm_sum = writes[0].statistics

    def _store(self, entry: MistakeLogEntry, errors: PilotErrors) -> None:
        stored = MistakeLogEntry(
            entry.x_tilde,
            entry.h_bar,
            errors,
            entry.attention_mask,
            entry.loss_mask,
            entry.encoder_attention_mask,
        )
        stored = stored.map_tensors(self._to_store)
        if not self._slots and not self.topk:
            self._warn_if_exact_storage_is_large(stored)
        if len(self._slots) < self.size:
            self._slots.append(stored)
        else:
            self._bytes -= _entry_bytes(self._slots[self._next])
            self._slots[self._next] = stored
        self._bytes += _entry_bytes(stored)
        self._next = (self._next + 1) % self.size

    def _warn_if_exact_storage_is_large(self, first: MistakeLogEntry) -> None:
        projected = self.size * _entry_bytes(first)
        if projected > EXACT_STORAGE_WARNING_BYTES:
            warnings.warn(
                f"Exact Mistake Log storage (topk=0) will hold about {projected / 2**30:.1f} GiB of "
                f"{self.store_device} memory ({self.size} entries like the first, "
                f"{first.errors.vocab_size} probabilities per position). Compact storage "
                "(mistake_log_topk=64, the default) keeps the top-k probabilities at a fraction of that.",
                stacklevel=3,
            )

    def _to_store(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.store_device)
        # A view (e.g. labels[:, 1:]) would keep its whole base storage alive and hide it from
        # memory_bytes(): own exactly what we hold.
        if tensor.untyped_storage().nbytes() > tensor.nbytes:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        return tensor

    # ---- validation -----------------------------------------------------------------------------
    def _validate(self, entry: MistakeLogEntry) -> None:
        if not isinstance(entry, MistakeLogEntry):
            raise TypeError(f"MistakeLog.add expects a MistakeLogEntry, got {type(entry).__name__}.")
        tensors = _flatten(entry)
        for name, tensor in tensors.items():
            if tensor.requires_grad:
                raise ValueError(
                    f"MistakeLogEntry.{name} requires grad: the Mistake Log must never hold the Pilot's "
                    "autograd graph. Build the entry from detached tensors (`tensor.detach()`)."
                )
        if entry.x_tilde.ndim != 3:
            raise ValueError(f"x_tilde must be [B,T,d_P], got shape {tuple(entry.x_tilde.shape)}.")
        batch_time = tuple(entry.x_tilde.shape[:2])
        hidden, errors, vocab = entry.x_tilde.shape[-1], entry.errors, entry.errors.vocab_size
        names = ("h_bar", "attention_mask", "loss_mask", "errors.targets", "errors.mask")
        positions = "h_bar" if entry.is_encoder_decoder else "x_tilde"
        masks = ("attention_mask", "loss_mask", "errors.mask")
        if entry.is_encoder_decoder:
            # x_tilde is the encoder output [B,S,d_P]: the decoder positions are h_bar's.
            if tuple(entry.encoder_attention_mask.shape) != batch_time:
                raise ValueError(
                    f"MistakeLogEntry.encoder_attention_mask has shape {tuple(entry.encoder_attention_mask.shape)} "
                    f"but x_tilde (the encoder output) is [B,S]={batch_time}."
                )
            if entry.h_bar.ndim != 3 or entry.h_bar.shape[0] != batch_time[0]:
                raise ValueError(
                    f"h_bar must be [B,T,d_P] with B={batch_time[0]}, got {tuple(entry.h_bar.shape)}."
                )
            batch_time, names, masks = (
                tuple(entry.h_bar.shape[:2]),
                names[1:],
                (*masks, "encoder_attention_mask"),
            )
        for name in names:
            if tuple(tensors[name].shape[:2]) != batch_time:
                raise ValueError(
                    f"MistakeLogEntry.{name} has shape {tuple(tensors[name].shape)} but {positions} is "
                    f"[B,T]={batch_time}: every tensor of an entry must cover the same batch and positions."
                )
        for name in masks:
            if tensors[name].dtype != torch.bool or tensors[name].ndim != 2:
                raise ValueError(
                    f"MistakeLogEntry.{name} must be a bool [B,T] tensor, got {tensors[name].dtype} "
                    f"{tuple(tensors[name].shape)}: convert it with `.bool()`."
                )
        if entry.h_bar.shape[-1] != hidden:
            raise ValueError(f"h_bar has hidden size {entry.h_bar.shape[-1]} but x_tilde has {hidden}.")
        if not errors.is_compact and tuple(errors.probs.shape) != (*batch_time, vocab):
            raise ValueError(
                f"errors.probs has shape {tuple(errors.probs.shape)}, expected "
                f"[B,T,V]={(*batch_time, vocab)} with V = errors.vocab_size."
            )
        if errors.is_compact:
            k = errors.topk_indices.shape[-1]
            if errors.topk_values.shape != errors.topk_indices.shape or errors.topk_indices.ndim != 3:
                raise ValueError("errors.topk_indices and errors.topk_values must both be [B,T,k].")
            if self.topk == 0:
                raise ValueError(
                    "This MistakeLog stores exact errors (topk=0) but got compact ones: pass the dense "
                    "`probs`, or create the log with MistakeLog(topk=k)."
                )
            if k != min(self.topk, vocab):
                raise ValueError(
                    f"Entry errors are compact with k={k} but this MistakeLog stores top-{self.topk}: "
                    f"pass dense probs (the log compacts them) or compact with k={self.topk}."
                )
        if self._slots:
            previous = self.latest()
            if previous.is_encoder_decoder != entry.is_encoder_decoder:
                raise ValueError(
                    "Entry and log come from different kinds of Pilot (encoder-decoder and decoder-only): one "
                    "MistakeLog serves one Pilot, create a new one."
                )
            if previous.x_tilde.shape[-1] != hidden:
                raise ValueError(
                    f"Entry has Pilot hidden size {hidden} but the log holds entries with hidden size "
                    f"{previous.x_tilde.shape[-1]}: one MistakeLog serves one Pilot, create a new one."
                )
            if previous.errors.vocab_size != vocab:
                raise ValueError(
                    f"Entry has vocab size {vocab} but the log holds entries with vocab size "
                    f"{previous.errors.vocab_size}: one MistakeLog serves one Pilot, create a new one."
                )

    @staticmethod
    def _entry_stats(
        entry: MistakeLogEntry, stored_errors: PilotErrors
    ) -> tuple[torch.Tensor, tuple[str, ...], torch.Tensor, torch.Tensor]:
        """Finite flags [x_tilde, h_bar, probabilities], the statistic names, their vector [has loss positions,
        *means over the loss mask] and the error-norm sum: device tensors, nothing read back.

        Norm and gold probability come from the errors as written (before compaction), so they
        describe the Pilot, not the storage.
        """
        errors = entry.errors
        norm, p_gold = error_norm_and_gold_prob(errors)
        loss_mask = entry.loss_mask
        count = loss_mask.sum()
        denominator = count.clamp_min(1)
        finite = torch.stack(
            [
                torch.isfinite(entry.x_tilde).all(),
                torch.isfinite(entry.h_bar).all(),
                # Probabilities are bounded, so the sum of every position's squared norm (NaN or inf off the mask
                # too: `norm` masks by multiplying) is finite iff every one is: no pass of its own over them, and
                # no [B,T,V] mask as isfinite().all() would allocate.
                torch.isfinite(norm.sum()),
            ]
        )
        error_norm_sum = (norm * loss_mask).sum()
        means = [error_norm_sum / denominator, (p_gold * loss_mask).sum() / denominator]
        names = ("mean_error_norm", "pilot_gold_prob")
        if stored_errors.is_compact:
            dropped = (1.0 - stored_errors.topk_values.float().sum(-1)).clamp_min(0.0)
            means.append((dropped * loss_mask).sum() / denominator)
            names = (*names, "topk_dropped_mass")
        values = torch.stack([(count > 0).float(), *means])
        return finite, tuple(f"mistake_log/{name}" for name in names), values, error_norm_sum

    # ---- reporting ------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes held by the stored tensors."""
        return self._bytes

    @property
    def bytes_per_entry(self) -> float:
        return self.memory_bytes() / len(self) if self._slots else 0.0

    def stats(self) -> dict[str, float]:
        """Size and memory of the log, and error statistics of the latest entry over its loss mask.

        `mean_error_norm` is the mean `||e_j||^2`, `pilot_gold_prob` the mean Pilot probability of the
        gold token, `topk_dropped_mass` (compact storage) the mean probability mass outside the top k.
        """
        return {
            "mistake_log/entries": float(len(self)),
            "mistake_log/memory_mb": self.memory_bytes() / 2**20,
            **self._latest_entry_stats(),
        }

    def _latest_entry_stats(self) -> dict[str, float]:
        """The latest entry's error statistics (empty when it has no loss positions), read back from its
        device after `verify()`."""
        self.verify()
        has_positions, *means = self._latest_values.tolist()
        return dict(zip(self._latest_names, means, strict=True)) if has_positions else {}

    def latest_entry_stat_values(self) -> tuple[tuple[str, ...], torch.Tensor]:
        """The latest entry's statistic names and their device vector [has loss positions, *means]: what a
        training step accumulates without reading anything back."""
        return self._latest_names, self._latest_values

    @staticmethod
    def reconstruction_bound(entry: MistakeLogEntry | PilotErrors) -> torch.Tensor:
        """Per-position bound [B,T] on `||e_exact - e_compact||_2` (zero for exact errors).

        The difference is the vector q of dropped probabilities: q_i >= 0, sum q = m (the mass outside
        the top k) and each q_i <= p_(k), the smallest kept probability. Hence
        `||q||_2 <= sqrt(m * min(m, p_(k))) <= m`.
        """
        errors = entry.errors if isinstance(entry, MistakeLogEntry) else entry
        if not errors.is_compact:
            return torch.zeros(errors.targets.shape, device=errors.targets.device)
        values = errors.topk_values.float()
        dropped = (1.0 - values.sum(-1)).clamp_min(0.0)
        smallest_kept = values.min(-1).values
        return (dropped * torch.minimum(dropped, smallest_kept)).sqrt() * errors.mask

    # ---- checkpointing --------------------------------------------------------------------------
    def state_dict(self, newest: int | None = None, max_bytes: int | None = None) -> dict[str, Any]:
        """Plain tensors, ints and floats only, so `torch.load(..., weights_only=True)` reads it.

        `newest`: keep only the newest entries (all when None); `max_bytes`: then drop the oldest until the
        entries fit. A reduced log restores those entries oldest first, so the newest ones, all that window
        sampling reads, come back exactly.
        """
        chronological = list(self)
        kept = chronological if newest is None else chronological[len(chronological) - newest :]
        if max_bytes is not None:
            sizes = [_entry_bytes(entry) for entry in kept]
            while kept and sum(sizes) > max_bytes:
                kept, sizes = kept[1:], sizes[1:]
        slots, next_slot = self._slots, self._next
        if len(kept) < len(chronological):
            slots, next_slot = kept, len(kept) % max(1, self.size)
        return {
            "format_version": _FORMAT_VERSION,
            "size": self.size,
            "topk": self.topk,
            "next": next_slot,
            "stats": self._latest_entry_stats(),
            "entries": [
                {"vocab_size": entry.errors.vocab_size, "tensors": _flatten(entry)} for entry in slots
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore entries, ring order and write position exactly (resume gives the same replay)."""
        if state.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"Unknown MistakeLog state format {state.get('format_version')!r}.")
        if (state["size"], state["topk"]) != (self.size, self.topk):
            raise ValueError(
                f"Checkpointed MistakeLog has size={state['size']}, topk={state['topk']} but this one has "
                f"size={self.size}, topk={self.topk}: create it with the checkpoint's settings "
                "(or MistakeLog.load) to resume, or start from an empty log."
            )
        if not 0 <= state["next"] < max(1, state["size"]) or len(state["entries"]) > state["size"]:
            raise ValueError(
                f"next={state['next']} with {len(state['entries'])} entries does not fit a log of size {state['size']}"
            )
        entries = [_unflatten(item["tensors"], item["vocab_size"]) for item in state["entries"]]
        self._slots, self._next, self._unverified, self._bytes = [], 0, [], 0
        for index, entry in enumerate(entries):
            try:
                self._validate(entry)
                refuse_if_not_finite(self._entry_stats(entry, entry.errors)[0].tolist())
            except ValueError as error:
                raise ValueError(f"entry {index}: {error}") from error
            self._slots.append(entry.map_tensors(self._to_store))
            self._bytes += _entry_bytes(self._slots[-1])
        self._next = state["next"]
        stats = dict(state["stats"])
        self._latest_names = tuple(stats)
        self._latest_values = torch.tensor([1.0 if stats else 0.0, *stats.values()])

    def check_serves(self, pilot_hidden_size: int, vocab_size: int) -> None:
        """Refuse a log written by a Pilot of another hidden size or vocabulary (ValueError naming both)."""
        if not self._slots:
            return
        entry = self.latest()
        if entry.x_tilde.shape[-1] != pilot_hidden_size:
            raise ValueError(
                f"x_tilde has hidden size {entry.x_tilde.shape[-1]} but the Pilot's is {pilot_hidden_size}"
            )
        if entry.errors.vocab_size != vocab_size:
            raise ValueError(f"vocab_size is {entry.errors.vocab_size} but the Pilot's is {vocab_size}")

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the log to one file atomically: a crash mid-write never leaves a truncated log."""
        atomic_torch_save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], store_device: str | torch.device = "cpu") -> MistakeLog:
        state = torch.load(path, map_location=store_device, weights_only=True)
        log = cls(size=state["size"], topk=state["topk"], store_device=store_device)
        log.load_state_dict(state)
        return log
