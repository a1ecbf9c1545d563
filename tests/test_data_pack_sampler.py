"""Packing (best-fit decreasing, never split, positions, cu_seqlens) and the DP sampler (disjoint, exact resume)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from megalora.data.pack import best_fit_decreasing, collate, packing_efficiency
from megalora.data.sampler import EpochSampler, make_batches


class ListDataset:
    """Samples with recognisable tokens: sample i is [i*1000, i*1000+1, ...], every second token trained."""

    def __init__(self, lengths):
        self.lengths = np.asarray(lengths, dtype=np.int64)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        ids = np.arange(self.lengths[i], dtype=np.int32) + 1000 * i
        labels = np.where(np.arange(self.lengths[i]) % 2 == 1, ids, -100).astype(np.int32)
        return ids, labels


def _reference_bfd(lengths, capacity):
    """Plain quadratic best-fit decreasing."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, room = [], []
    for i in order:
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
            bins[b].append(i)
            room[b] -= lengths[i]
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def test_best_fit_decreasing_matches_reference():
    rng = np.random.default_rng(0)
    for capacity in (16, 64, 100):
        lengths = rng.integers(1, capacity + 1, size=200).tolist()
        bins = best_fit_decreasing(lengths, capacity)
        assert bins == _reference_bfd(lengths, capacity)
        assert sorted(itertools.chain(*bins)) == list(range(200))
        assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
        assert packing_efficiency(lengths, bins, capacity) == pytest.approx(sum(lengths) / (len(bins) * capacity))
    with pytest.raises(ValueError, match="more than the packing length"):
        best_fit_decreasing([5, 20], 10)


def _segments(batch):
    """Per segment of the flattened batch: (ids, labels, positions)."""
    cu = batch["cu_seqlens"].tolist()
    flat = {k: batch[k].reshape(-1) for k in ("input_ids", "labels", "position_ids")}
    return [tuple(flat[k][a:b].tolist() for k in ("input_ids", "labels", "position_ids")) for a, b in zip(cu, cu[1:])]


def test_collate_packed_rows():
    ds = ListDataset([5, 3, 7, 2])
    rows = [[ds[0], ds[1]], [ds[2]], [ds[3]]]
    batch = collate(rows, pad_token_id=9, pad_to_multiple_of=4)
    assert batch["input_ids"].shape == (3, 8) and batch["cu_seqlens"].dtype == torch.int32
    # Segments: 0, 1 (a full row) | 2, pad(1) | 3, pad(6); boundaries over the flattened 3*8 tokens.
    assert batch["cu_seqlens"].tolist() == [0, 5, 8, 15, 16, 18, 24]
    segs = _segments(batch)
    assert len(segs) == 6
    for seg, i in zip((segs[0], segs[1], segs[2], segs[4]), (0, 1, 2, 3)):
        ids, labels = ds[i]
        assert seg == (ids.tolist(), labels.tolist(), list(range(len(ids))))
    for pad in (segs[3], segs[5]):
        assert set(pad[0]) == {9} and set(pad[1]) == {-100} and pad[2] == list(range(len(pad[0])))
    assert batch["max_seqlen"].item() == 7
    assert batch["num_trained_tokens"].item() == sum(int((ds[i][1] != -100).sum()) for i in range(4))
    assert collate([[ds[2]]])["input_ids"].shape == (1, 7)  # no padding unless asked


def test_packed_epoch_never_splits_and_covers_every_sample():
    rng = np.random.default_rng(1)
    ds = ListDataset(rng.integers(1, 40, size=61).tolist())
    seen = []
    for rank in range(2):
        loader = make_batches(ds, micro_batch_size=2, dp_rank=rank, dp_size=2, packing=True, max_length=64,
                              pad_to_multiple_of=8, seed=3, pad_token_id=-1)
        for batch in itertools.islice(iter(loader), loader.batches_per_epoch):
            assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[1] <= 64
            for ids, labels, pos in _segments(batch):
                if ids[0] == -1:
                    assert set(ids) == {-1} and set(labels) == {-100}
                    continue  # padding
                i = ids[0] // 1000
                assert (ids, labels) == tuple(x.tolist() for x in ds[i]) and pos == list(range(len(ids)))
                seen.append(i)
    bins = best_fit_decreasing(ds.lengths, 64)
    used = EpochSampler(len(bins), micro_batch_size=2, dp_rank=0, dp_size=2, seed=3).epoch_order(0)
    used = used[:len(used) // 4 * 4]
    assert sorted(seen) == sorted(i for b in used for i in bins[b])
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize("num_items,dp,mbs", [(24, 3, 2), (25, 2, 3), (7, 1, 1)])
def test_sampler_ranks_disjoint_union_is_the_epoch(num_items, dp, mbs):
    samplers = [EpochSampler(num_items, micro_batch_size=mbs, dp_rank=r, dp_size=dp, seed=11) for r in range(dp)]
    for epoch in range(3):
        per_rank = [np.concatenate(s.micro_batches(epoch)).tolist() for s in samplers]
        union = list(itertools.chain(*per_rank))
        assert len(union) == len(set(union))
        steps = num_items // (dp * mbs)
        assert sorted(union) == sorted(samplers[0].epoch_order(epoch)[:steps * dp * mbs].tolist())
        assert samplers[0].num_dropped_per_epoch == num_items - steps * dp * mbs
        if num_items % (dp * mbs) == 0:
            assert sorted(union) == list(range(num_items))
    assert samplers[0].epoch_order(0).tolist() != samplers[0].epoch_order(1).tolist()
    fixed = EpochSampler(num_items, micro_batch_size=mbs, dp_rank=0, dp_size=dp, seed=11, shuffle=False)
    assert fixed.epoch_order(3).tolist() == list(range(num_items))
    # A global step holds the same items whether it is split over DP ranks or micro-batches.
    single = EpochSampler(num_items, micro_batch_size=dp * mbs, dp_rank=0, dp_size=1, seed=11)
    for k, step in enumerate(single.micro_batches(2)):
        assert sorted(step.tolist()) == sorted(np.concatenate([s.micro_batches(2)[k] for s in samplers]).tolist())


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("packing", [False, True])
def test_resume_mid_epoch_is_exact(packing):
    ds = ListDataset(np.random.default_rng(2).integers(2, 30, size=40).tolist())
    kw = dict(micro_batch_size=2, dp_rank=1, dp_size=2, packing=packing, max_length=48, seed=5)
    full = make_batches(ds, **kw)
    per_epoch = full.batches_per_epoch
    total = 2 * per_epoch + 3  # crosses two epoch ends
    reference = _take(full, total)
    for stop in (1, per_epoch - 1, per_epoch, per_epoch + 2):
        first = make_batches(ds, **kw)
        head = _take(first, stop)
        state = first.state_dict()
        assert state == {"epoch": stop // per_epoch, "position": stop % per_epoch} or (
            stop % per_epoch == 0 and state == {"epoch": stop // per_epoch - 1, "position": per_epoch})
        resumed = make_batches(ds, **kw)
        resumed.load_state_dict(state)
        tail = _take(resumed, total - stop)
        for got, want in zip(head + tail, reference):
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in got)


def test_worker_processes_give_the_same_batches():
    ds = ListDataset(np.random.default_rng(4).integers(2, 30, size=20).tolist())
    kw = dict(micro_batch_size=2, dp_rank=0, dp_size=1, packing=True, max_length=40, seed=1)
    inline = _take(make_batches(ds, **kw), 12)
    workers = make_batches(ds, num_workers=2, **kw)
    pooled = _take(workers, 12)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(inline, pooled) for k in a)
    assert workers.state_dict()["position"] + workers.state_dict()["epoch"] * workers.batches_per_epoch == 12


def test_accumulation_keeps_global_steps_equal_across_epoch_ends():
    """With 18 items and a global batch of 4, an epoch is 4 whole optimizer steps whatever the
    split (micro x DP x accumulation); every optimizer step holds the same items."""
    from megalora.data.sampler import EpochSampler

    def steps(micro, dp, accum, epochs=3):
        per_rank = [EpochSampler(18, micro_batch_size=micro, dp_rank=r, dp_size=dp, seed=3, accumulation=accum)
                    for r in range(dp)]
        out = []
        for epoch in range(epochs):
            rounds = [s.micro_batches(epoch) for s in per_rank]
            assert len(rounds[0]) == 4 * accum
            for k in range(4):
                items = [int(i) for j in range(accum) for r in range(dp) for i in rounds[r][k * accum + j]]
                out.append(sorted(items))
        return out

    reference = steps(4, 1, 1)
    assert steps(1, 1, 4) == reference
    assert steps(1, 2, 2) == reference
    assert steps(2, 2, 1) == reference
    assert len({i for step in reference[:4] for i in step}) == 16
