"""The Mistake Log: a bounded ring buffer with exact or compact (top-k) storage (SPEC section 2)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from hf_copilot.mistake_log import MistakeLog, collate_entries
from hf_copilot.mistake_log_entry import MistakeLogEntry, PilotErrors

B, T, V, D = 2, 5, 50, 8


def make_entry(marker: float = 0.0, seq_len: int = T, seed: int = 0) -> MistakeLogEntry:
    """A random entry; `x_tilde[0, 0, 0] == marker` identifies it."""
    g = torch.Generator().manual_seed(seed)
    x_tilde = torch.randn(B, seq_len, D, generator=g)
    x_tilde[0, 0, 0] = marker
    probs = torch.randn(B, seq_len, V, generator=g).mul(3).softmax(-1)
    mask = torch.ones(B, seq_len, dtype=torch.bool)
    mask[:, -1] = False  # the last position has no next token
    mask[1, -2] = False  # padding
    loss_mask = mask.clone()
    loss_mask[:, 0] = False  # a prompt position
    return MistakeLogEntry(
        x_tilde=x_tilde,
        h_bar=torch.randn(B, seq_len, D, generator=g),
        errors=PilotErrors(torch.randint(0, V, (B, seq_len), generator=g), mask, V, probs=probs),
        attention_mask=torch.ones(B, seq_len, dtype=torch.bool),
        loss_mask=loss_mask,
    )


def compacted(entry: MistakeLogEntry, k: int) -> MistakeLogEntry:
    return MistakeLogEntry(
        entry.x_tilde, entry.h_bar, entry.errors.compact(k), entry.attention_mask, entry.loss_mask
    )


def marker(entry: MistakeLogEntry) -> float:
    return entry.x_tilde[0, 0, 0].item()


def assert_entries_equal(a: MistakeLogEntry, b: MistakeLogEntry) -> None:
    assert a.errors.vocab_size == b.errors.vocab_size
    for name in ("x_tilde", "h_bar", "attention_mask", "loss_mask"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    for name in ("targets", "mask", "probs", "topk_indices", "topk_values"):
        x, y = getattr(a.errors, name), getattr(b.errors, name)
        assert (x is None and y is None) or torch.equal(x, y)


@pytest.mark.parametrize("topk", [0, 5])
def test_buffer_keeps_only_the_most_recent_entries(topk):
    log = MistakeLog(size=4, topk=topk)
    for i in range(4):
        log.add(make_entry(marker=i, seed=i))
    full_memory = log.memory_bytes()
    for i in range(4, 8):
        log.add(make_entry(marker=i, seed=i))
    assert len(log) == log.capacity == 4
    assert [marker(e) for e in log] == [4, 5, 6, 7]  # oldest first; 0..3 were dropped
    assert marker(log.latest()) == 7
    assert log.memory_bytes() == full_memory
    assert all(t.device.type == "cpu" for t in (log.latest().x_tilde, log.latest().errors.targets))


def test_sample_draws_without_replacement():
    log = MistakeLog(size=6, topk=0)
    for i in range(6):
        log.add(make_entry(marker=i, seed=i))
    drawn = [marker(e) for e in log.sample(4, torch.Generator().manual_seed(0))]
    assert len(drawn) == len(set(drawn)) == 4
    assert sorted(marker(e) for e in log.sample(100)) == list(range(6))
    assert log.sample(0) == []


@pytest.mark.parametrize("k", [1, 5, 50])
def test_compact_reconstruction_is_within_the_dropped_mass(k):
    exact = make_entry().errors
    log = MistakeLog(topk=k)
    log.add(make_entry())
    compact = log.latest().errors
    assert compact.is_compact and compact.topk_indices.shape[-1] == k

    difference = (exact.dense() - compact.dense()).norm(dim=-1)
    bound = MistakeLog.reconstruction_bound(log.latest())
    dropped_mass = (1 - compact.topk_values.sum(-1)).clamp_min(0) * exact.mask
    assert (difference <= bound + 1e-6).all()
    assert (bound <= dropped_mass + 1e-6).all()
    if k == V:
        assert torch.equal(compact.dense(), exact.dense())
        assert torch.allclose(bound, torch.zeros_like(bound), atol=1e-3)


@pytest.mark.parametrize("k", [None, 5, V])
def test_squared_distance_and_embed_match_the_dense_error(k):
    errors = make_entry().errors
    errors = errors if k is None else errors.compact(k)
    g = torch.Generator().manual_seed(1)
    prediction = torch.randn(B, T, V, generator=g) * 0.1
    weight = torch.randn(D, V, generator=g)

    expected = ((prediction - errors.dense()) ** 2).sum(-1)
    torch.testing.assert_close(errors.squared_distance(prediction), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(errors.embed(weight), errors.dense() @ weight.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("topk", [0, 5])
def test_state_dict_round_trip_restores_ring_order_and_sampling(topk):
    log = MistakeLog(size=4, topk=topk)
    for i in range(6):  # wraps: the write position is mid-ring
        log.add(make_entry(marker=i, seed=i))
    restored = MistakeLog(size=4, topk=topk)
    restored.load_state_dict(log.state_dict())

    for a, b in zip(log, restored, strict=True):
        assert_entries_equal(a, b)
    assert restored.stats() == log.stats()
    for original, copy in zip(
        log.sample(3, torch.Generator().manual_seed(7)),
        restored.sample(3, torch.Generator().manual_seed(7)),
        strict=True,
    ):
        assert_entries_equal(original, copy)
    log.add(make_entry(marker=6, seed=6))
    restored.add(make_entry(marker=6, seed=6))
    assert [marker(e) for e in restored] == [marker(e) for e in log] == [3, 4, 5, 6]


def test_load_state_dict_refuses_other_settings():
    log = MistakeLog(size=4, topk=5)
    log.add(make_entry())
    with pytest.raises(ValueError, match="size=4, topk=5"):
        MistakeLog(size=8, topk=5).load_state_dict(log.state_dict())


def test_save_load_file_round_trip_with_weights_only(tmp_path):
    log = MistakeLog(size=3, topk=5)
    for i in range(5):
        log.add(make_entry(marker=i, seed=i))
    path = tmp_path / "mistake_log.pt"
    log.save(path)

    assert os.listdir(tmp_path) == ["mistake_log.pt"]  # no temporary file left behind
    torch.load(path, weights_only=True)
    loaded = MistakeLog.load(path)
    assert (loaded.size, loaded.topk) == (3, 5)
    for a, b in zip(log, loaded, strict=True):
        assert_entries_equal(a, b)


def test_memory_bytes_counts_every_stored_tensor_and_compact_is_smaller():
    exact, compact = MistakeLog(topk=0), MistakeLog(topk=5)
    for i in range(3):
        exact.add(make_entry(seed=i))
        compact.add(make_entry(seed=i))
    for log in (exact, compact):
        assert log.memory_bytes() == stored_bytes(log)
        assert log.stats()["mistake_log/memory_mb"] == log.memory_bytes() / 2**20
    assert compact.bytes_per_entry < exact.bytes_per_entry


def stored_bytes(log: MistakeLog) -> int:
    """A recount of every tensor the log holds."""
    tensors = [getattr(e, n) for e in log for n in ("x_tilde", "h_bar", "attention_mask", "loss_mask")]
    return sum(t.nbytes for t in tensors) + sum(
        t.nbytes for e in log for t in vars(e.errors).values() if isinstance(t, torch.Tensor)
    )


@pytest.mark.parametrize("topk", [0, 5])
def test_memory_bytes_follows_writes_over_old_slots_undone_writes_and_loading(topk):
    log = MistakeLog(size=3, topk=topk)
    for seq_len in (3, 5, 7, 9, 4):  # entries of different sizes; the last two replace the oldest
        log.add(make_entry(seq_len=seq_len, seed=seq_len))
        assert log.memory_bytes() == stored_bytes(log)
    log.add(make_entry(seq_len=11, seed=11), defer_checks=True)  # replaces the 7-token entry
    log.add(_with_nan(make_entry(seq_len=2, seed=2)), defer_checks=True)  # replaces the 9-token one
    with pytest.raises(ValueError, match="NaN"):
        log.verify()  # puts the 9-token entry back
    assert [e.x_tilde.shape[1] for e in log] == [9, 4, 11] and log.memory_bytes() == stored_bytes(log)
    grown = MistakeLog(size=4, topk=topk)
    grown.add(make_entry(seq_len=6, seed=6), defer_checks=True)  # a write that appended, then undone
    grown.discard_unverified()
    assert grown.memory_bytes() == 0
    loaded = MistakeLog(size=3, topk=topk)
    loaded.load_state_dict(log.state_dict())
    assert loaded.memory_bytes() == stored_bytes(loaded) == stored_bytes(log)


def test_a_view_is_stored_without_its_base_storage():
    entry = make_entry()
    labels = torch.randint(0, V, (B, T + 1))
    entry.errors.targets = labels[:, 1:]  # a view, as built from shifted labels
    log = MistakeLog(topk=0)
    log.add(entry)
    stored = log.latest().errors.targets
    assert stored.untyped_storage().nbytes() == stored.nbytes
    assert torch.equal(stored, labels[:, 1:])


@pytest.mark.parametrize("topk", [0, 5])
def test_stats_describe_the_latest_entry_over_its_loss_mask(topk):
    log = MistakeLog(topk=topk)
    assert log.stats() == {"mistake_log/entries": 0.0, "mistake_log/memory_mb": 0.0}
    log.add(make_entry(seed=1))
    entry = make_entry(seed=2)
    log.add(entry)
    stats = log.stats()
    errors, loss_mask = entry.errors, entry.loss_mask
    gold = errors.probs.gather(-1, errors.targets.unsqueeze(-1)).squeeze(-1)

    assert stats["mistake_log/entries"] == 2.0
    expected_norm = errors.dense().square().sum(-1)[loss_mask].mean().item()
    assert stats["mistake_log/mean_error_norm"] == pytest.approx(expected_norm, abs=1e-5)
    assert stats["mistake_log/pilot_gold_prob"] == pytest.approx(gold[loss_mask].mean().item(), abs=1e-6)
    if topk:
        kept = errors.probs.topk(topk, dim=-1).values.sum(-1)
        expected_dropped = (1 - kept)[loss_mask].mean().item()
        assert stats["mistake_log/topk_dropped_mass"] == pytest.approx(expected_dropped, abs=1e-5)
    else:
        assert "mistake_log/topk_dropped_mass" not in stats


def test_a_log_of_size_zero_keeps_nothing_but_the_latest_entrys_statistics():
    kept, empty = MistakeLog(size=4, topk=5), MistakeLog(size=0, topk=5)
    for seed in (1, 2):
        kept.add(make_entry(seed=seed))
        empty.add(make_entry(seed=seed))
    assert len(empty) == 0 and empty.memory_bytes() == 0 and empty.state_dict()["entries"] == []
    assert empty.latest_error_norm_sum.item() == pytest.approx(kept.latest_error_norm_sum.item(), rel=1e-6)
    stats = empty.stats()
    assert stats.pop("mistake_log/entries") == 0.0 and stats.pop("mistake_log/memory_mb") == 0.0
    assert "mistake_log/topk_dropped_mass" not in stats  # nothing was compacted
    expected = {k: v for k, v in kept.stats().items() if k in stats}
    assert stats == pytest.approx(expected, rel=1e-6) and len(stats) == 2
    with pytest.raises(ValueError, match="probabilities contains NaN"):
        empty.add(_with_nan(make_entry()))  # still checked


@pytest.mark.parametrize("size", [0, 3])
def test_deferred_checks_read_nothing_back_from_the_entrys_device(size):
    """On the meta device any read-back (`.tolist()`, `bool()`, a copy to the CPU) raises: the deferred add
    computes its checks and statistics without one, and the checking add does read one back."""
    log = MistakeLog(size=size, topk=5, store_device="meta")
    meta = make_entry(seed=1).map_tensors(lambda tensor: tensor.to("meta"))
    log.add(meta, defer_checks=True)
    assert len(log) == min(size, 1) and log.latest_error_norm_sum.device.type == "meta"
    with pytest.raises((NotImplementedError, RuntimeError), match="meta"):
        log.verify()
    with pytest.raises((NotImplementedError, RuntimeError), match="meta"):
        MistakeLog(size=size, topk=5, store_device="meta").add(meta)


def test_verify_refuses_a_deferred_non_finite_entry_and_undoes_it_and_every_write_after_it():
    written = [make_entry(marker=float(i), seed=i) for i in range(6)]
    log, reference = MistakeLog(size=3, topk=5), MistakeLog(size=3, topk=5)
    for entry in written[:4]:  # the ring has wrapped: writes replace slots
        log.add(entry, defer_checks=True)
        reference.add(entry)
    log.verify()
    log.add(written[4], defer_checks=True)
    log.add(_with_nan(make_entry(marker=9.0)), defer_checks=True)
    log.add(written[5], defer_checks=True)
    reference.add(written[4])
    with pytest.raises(ValueError, match="errors probabilities contains NaN or inf.*not stored"):
        log.verify()
    assert [marker(entry) for entry in log] == [2.0, 3.0, 4.0] == [marker(entry) for entry in reference]
    for ours, theirs in zip(log, reference, strict=True):
        assert_entries_equal(ours, theirs)
    assert log.stats() == reference.stats()
    assert log.latest_error_norm_sum.item() == reference.latest_error_norm_sum.item()
    log.add(written[5])  # writes where the refused entry would have, as in the reference
    reference.add(written[5])
    assert [marker(entry) for entry in log] == [3.0, 4.0, 5.0] == [marker(entry) for entry in reference]
    log.verify()  # nothing left to check


def test_discard_unverified_leaves_the_log_as_before_the_deferred_writes():
    log = MistakeLog(size=4, topk=5)
    log.add(make_entry(marker=1.0, seed=1))
    before = log.stats()
    log.add(make_entry(marker=2.0, seed=2), defer_checks=True)
    log.add(_with_nan(make_entry(marker=3.0, seed=3)), defer_checks=True)
    log.discard_unverified()
    assert [marker(entry) for entry in log] == [1.0] and log.stats() == before
    log.verify()  # the discarded entries are not checked


def _with_grad(entry):
    entry.h_bar.requires_grad_(True)
    return entry


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("position", [1, T - 1])  # a labelled position; the last, which has no target
@pytest.mark.parametrize("topk", [0, 5])
def test_add_refuses_a_probability_that_is_not_finite_wherever_it_lies(value, position, topk):
    """The finite check reads the error norms' sum, which masks by multiplying: a NaN or inf off the mask counts."""
    entry = make_entry()
    assert bool(entry.errors.mask[0, position]) == (position != T - 1)
    entry.errors.probs[0, position, 2] = value
    log = MistakeLog(size=4, topk=topk)
    with pytest.raises(ValueError, match="probabilities contains NaN or inf"):
        log.add(entry)
    assert len(log) == 0


def _with_nan(entry):
    entry.errors.probs[0, 1, 2] = float("nan")
    return entry


def _with_hidden(entry):
    entry.x_tilde = entry.x_tilde.repeat(1, 1, 2)
    entry.h_bar = entry.h_bar.repeat(1, 1, 2)
    return entry


def _with_vocab(entry):
    entry.errors = PilotErrors(entry.errors.targets, entry.errors.mask, V + 1, probs=torch.rand(B, T, V + 1))
    return entry


def _with_long_mask(entry):
    entry.loss_mask = entry.loss_mask.long()
    return entry


def _with_short_h_bar(entry):
    entry.h_bar = entry.h_bar[:, :3]
    return entry


@pytest.mark.parametrize(
    ("topk", "corrupt", "match"),
    [
        (0, _with_grad, "h_bar requires grad.*detach"),
        (0, _with_nan, "NaN or inf"),
        (0, _with_hidden, "hidden size 16.*hidden size 8"),
        (0, _with_vocab, "vocab size 51.*vocab size 50"),
        (0, _with_long_mask, "loss_mask must be a bool"),
        (0, _with_short_h_bar, "h_bar has shape"),
        (0, lambda entry: compacted(entry, 5), "stores exact errors"),
        (5, lambda entry: compacted(entry, 3), "k=3.*top-5"),
    ],
)
def test_add_rejects_bad_entries_with_a_clear_message(topk, corrupt, match):
    log = MistakeLog(size=4, topk=topk)
    log.add(make_entry())
    with pytest.raises(ValueError, match=match):
        log.add(corrupt(make_entry(marker=1.0)))
    assert len(log) == 1 and marker(log.latest()) == 0.0  # nothing was written


def test_add_accepts_entries_already_compacted_to_the_log_k():
    entry = make_entry()
    log = MistakeLog(topk=5)
    log.add(compacted(entry, 5))
    assert log.latest().errors.topk_indices.shape[-1] == 5


@pytest.mark.parametrize("k", [None, 5])
def test_collate_pads_time_and_preserves_per_position_quantities(k):
    entries = [make_entry(seq_len=5, seed=0), make_entry(seq_len=3, seed=1)]
    if k is not None:
        entries = [compacted(e, k) for e in entries]
    batch = collate_entries(entries)
    g = torch.Generator().manual_seed(2)
    prediction = torch.randn(2 * B, 5, V, generator=g) * 0.1
    weight = torch.randn(D, V, generator=g)

    assert batch.x_tilde.shape == (2 * B, 5, D) and batch.errors.targets.shape == (2 * B, 5)
    distance, embedded, dense = (
        batch.errors.squared_distance(prediction),
        batch.errors.embed(weight),
        batch.errors.dense(),
    )
    for rows, entry in zip((slice(0, B), slice(B, 2 * B)), entries, strict=True):
        length = entry.x_tilde.shape[1]
        part = prediction[rows, :length]
        torch.testing.assert_close(distance[rows, :length], entry.errors.squared_distance(part))
        torch.testing.assert_close(embedded[rows, :length], entry.errors.embed(weight))
        assert torch.equal(dense[rows, :length], entry.errors.dense())
        assert torch.equal(batch.loss_mask[rows, :length], entry.loss_mask)
        assert torch.equal(batch.x_tilde[rows, :length], entry.x_tilde)
    padding = (slice(B, 2 * B), slice(3, 5))
    assert not batch.loss_mask[padding].any() and not batch.errors.mask[padding].any()
    assert not batch.attention_mask[padding].any() and not dense[padding].any()


def test_collate_refuses_different_k():
    a, b = make_entry(), make_entry(seq_len=3)
    a, b = compacted(a, 5), compacted(b, 3)
    with pytest.raises(ValueError, match="different top-k"):
        collate_entries([a, b])
    with pytest.raises(ValueError, match="at least one"):
        collate_entries([])


def test_sample_rows_draws_from_the_last_window_rounds_only_and_is_reproducible():
    log = MistakeLog(size=6, topk=0)
    for marker in range(6):  # each row's x_tilde[:, 0, 1] names its entry and row
        entry = make_entry(float(marker), seq_len=T + marker % 2, seed=marker)
        entry.x_tilde[:, 0, 1] = torch.tensor([10.0 * marker, 10.0 * marker + 1])
        log.add(entry)
    seen = set()
    for seed in range(20):
        rows = log.sample_rows(3, window=2, generator=torch.Generator().manual_seed(seed))
        names = rows.x_tilde[:, 0, 1].tolist()
        assert len(set(names)) == 3  # without replacement
        assert set(names) <= {40.0, 41.0, 50.0, 51.0}  # entries 4 and 5, the last two rounds
        seen.update(names)
        again = log.sample_rows(3, window=2, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(rows.x_tilde, again.x_tilde) and torch.equal(rows.errors.probs, again.errors.probs)
    assert seen == {40.0, 41.0, 50.0, 51.0}
    everything = log.sample_rows(100, window=2, generator=torch.Generator().manual_seed(0))
    assert sorted(everything.x_tilde[:, 0, 1].tolist()) == [40.0, 41.0, 50.0, 51.0]
    # Each sampled row is its entry's row, padded to the longest: per-position quantities are unchanged.
    source = list(log)[-1]
    row = everything.x_tilde[:, 0, 1].tolist().index(51.0)
    length = source.x_tilde.shape[1]
    assert torch.equal(everything.errors.probs[row, :length], source.errors.probs[1])
    assert torch.equal(everything.loss_mask[row, :length], source.loss_mask[1])
    assert not everything.loss_mask[row, length:].any()
    assert MistakeLog(size=2).sample_rows(4, window=2) is None


def test_exact_storage_warns_once_with_its_projected_size():
    entry = make_entry()
    entry_bytes = sum(t.nbytes for t in (entry.x_tilde, entry.h_bar, entry.attention_mask, entry.loss_mask))
    entry_bytes += sum(t.nbytes for t in (entry.errors.probs, entry.errors.targets, entry.errors.mask))
    size = 2**30 // entry_bytes + 1  # just over 1 GiB in all
    log = MistakeLog(size=size, topk=0)
    projected = f"{size * entry_bytes / 2**30:.1f} GiB"
    with pytest.warns(
        UserWarning, match=rf"Exact Mistake Log storage \(topk=0\) will hold about {projected} of cpu"
    ):
        log.add(entry)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log.add(make_entry(1.0))  # once, at the first entry
        MistakeLog(size=size - 2, topk=0).add(make_entry())  # under 1 GiB: silent
        MistakeLog(size=size, topk=4).add(make_entry())  # compact storage: silent
