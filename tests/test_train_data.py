"""The training data pipeline on real small stores: packing, sharding, resume, split, device decode, workers."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import build_manifest, build_sample

from hsstore import StoreReader, StoreWriter
from hsstore.reader import PartReader
from hsstore.train.data import NoiseConfig, SampleDataset, add_noise
from hsstore.train.loader import build_loader, to_device
from hsstore.train.packing import pack_batch, pack_rows, pack_stats
from hsstore.train.sampler import PackedBatchSampler, balance
from hsstore.train.split import EmptySplitError, split_store

MAX_TOKENS = 128
NUM_SAMPLES = 40


def sample_lengths(n: int = NUM_SAMPLES) -> list[int]:
    """Mostly short samples, a few over MAX_TOKENS (truncated), deterministic."""
    rng = np.random.default_rng(7)
    lens = rng.integers(3, 90, n)
    lens[[5, 17]] = [MAX_TOKENS + 22, MAX_TOKENS]
    return lens.tolist()


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    """One store per codec, same samples; the lossless one has two parts (global order spans parts)."""
    root = tmp_path_factory.mktemp("train-stores")
    samples = [build_sample(i, n, source="src-a" if i % 3 else "src-b") for i, n in enumerate(sample_lengths())]
    out = {}
    for codec in ("raw", "lossless", "fp8"):
        parts = 2 if codec == "lossless" else 1
        path = str(root / codec)
        for rank in range(parts):
            with StoreWriter(path, build_manifest(codec, num_parts=parts), rank=rank) as w:
                for s in samples[rank::parts]:
                    s.append_to(w)
        out[codec] = path
    return out


def collect(loader, steps: int | None = None) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if steps is not None and len(out) == steps:
            break
    return out


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["sample_indices"] == y["sample_indices"]
        assert x.keys() == y.keys()
        for k, v in x.items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == y[k].dtype and torch.equal(v, y[k]), k


# --- packing ---------------------------------------------------------------------------------
def test_pack_rows_respects_budget_and_keeps_every_sample():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, 2000)
    rows = pack_rows(lengths, rng.permutation(2000), 256, window=200, rng=rng)
    assert sorted(i for r in rows for i in r) == list(range(2000))
    assert all(np.minimum(lengths[r], 256).sum() <= 256 for r in rows)
    stats = pack_stats(lengths, rows, 256)
    assert stats.truncated == int((lengths > 256).sum()) > 0
    assert stats.truncated_tokens == int((lengths[lengths > 256] - 256).sum())
    assert "truncated" in stats.note() and stats.fill > 0.9


def test_packed_batch_positions_seq_ids_and_contents(stores):
    ds = SampleDataset(stores["lossless"], max_tokens=MAX_TOKENS)
    ref = StoreReader(stores["lossless"])
    lengths = ref.index.length
    longest = int(np.argmax(lengths))  # over the budget: truncated to MAX_TOKENS
    short = [int(i) for i in np.argsort(lengths, kind="stable") if i != longest][:5]
    assert lengths[longest] > MAX_TOKENS and lengths[short].sum() <= MAX_TOKENS
    rows = [[longest], short[:3], short[3:]]
    batch = pack_batch([[ds[i] for i in r] for r in rows], rows, MAX_TOKENS, pad_to_multiple_of=8)
    b, t = batch["input_ids"].shape
    assert (b, t) == (3, MAX_TOKENS) and batch["sample_indices"] == rows
    assert batch["input_ids"].dtype == batch["position_ids"].dtype == batch["seq_ids"].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.bool and batch["aux"].shape == (3, t, 3, 64)
    assert batch["last"].shape == (3, t, 64) and batch["last"].dtype == torch.bfloat16
    for r, row in enumerate(rows):
        at = 0
        for j, i in enumerate(row):
            want = ref[i]
            n = min(len(want["input_ids"]), MAX_TOKENS)
            span = slice(at, at + n)
            assert torch.equal(batch["input_ids"][r, span], want["input_ids"][:n].long())
            assert torch.equal(batch["loss_mask"][r, span], want["loss_mask"][:n].bool())
            assert torch.equal(batch["aux"][r, span], want["aux"][:n])
            assert torch.equal(batch["last"][r, span], want["last"][:n])
            assert torch.equal(batch["position_ids"][r, span], torch.arange(n))
            assert bool((batch["seq_ids"][r, span] == j).all())
            at += n
        pad = slice(at, t)
        assert bool((batch["seq_ids"][r, pad] == -1).all()) and not bool(batch["loss_mask"][r, pad].any())
        assert bool((batch["input_ids"][r, pad] == 0).all()) and not bool(batch["aux"][r, pad].any())


# --- sampler ---------------------------------------------------------------------------------
@pytest.mark.parametrize("rows_per_batch", [1, 3])
@pytest.mark.parametrize("n", [1, 2, 41, 300])
def test_each_sample_once_per_epoch_across_two_ranks(n, rows_per_batch):
    lengths = np.random.default_rng(n).integers(1, 200, n)
    ranks = [
        PackedBatchSampler(lengths, 128, rank=r, world_size=2, rows_per_batch=rows_per_batch, seed=3, window=64)
        for r in range(2)
    ]
    for epoch in range(2):
        got = [list(s) for s in ranks]
        assert len(got[0]) == len(got[1]) == ranks[0].steps(epoch) == ranks[1].steps(epoch)
        seen = Counter(i for per_rank in got for batch in per_rank for row in batch for i in row)
        if n >= 2:
            assert sorted(seen) == list(range(n)) and set(seen.values()) == {1}, epoch
        else:  # one sample cannot feed two ranks: it is repeated, not dropped
            assert seen == {0: 2} and ranks[0].plan(epoch).repeated == 1
        for per_rank in got:
            for batch in per_rank:
                assert len(batch) <= rows_per_batch
                assert all(np.minimum(lengths[row], 128).sum() <= 128 for row in batch)
        assert all(s.epoch == epoch + 1 and s.position == 0 for s in ranks)


def test_balance_splits_batches_before_repeating():
    batches, repeated = balance([[[0, 1, 2]], [[3]], [[4]]], 2)
    assert repeated == 0 and len(batches) == 4
    assert sorted(i for b in batches for r in b for i in r) == [0, 1, 2, 3, 4]
    batches, repeated = balance([[[0]], [[1]], [[2]]], 2)
    assert repeated == 1 and batches[-1] == [[0]]


def test_reshuffle_per_epoch_and_same_seed_same_order():
    lengths = np.random.default_rng(1).integers(1, 100, 500)

    def order(seed: int, epoch: int) -> list:
        return PackedBatchSampler(lengths, 256, seed=seed).plan(epoch).batches

    assert order(0, 0) == order(0, 0) and order(0, 1) == order(0, 1)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    unshuffled = PackedBatchSampler(lengths, 256, shuffle=False)
    assert unshuffled.plan(0).batches == unshuffled.plan(1).batches


@pytest.mark.parametrize("stop", ["mid", "end"])
def test_sampler_resume_continues_exactly(stop):
    lengths = np.random.default_rng(2).integers(1, 100, 300)
    full = PackedBatchSampler(lengths, 200, seed=5)
    want = list(full) + list(full)  # two uninterrupted epochs
    first = PackedBatchSampler(lengths, 200, seed=5)
    k = len(first) - 3 if stop == "mid" else len(first)
    it = iter(first)
    head = [next(it) for _ in range(k)]
    resumed = PackedBatchSampler(lengths, 200, seed=5)
    resumed.load_state_dict(first.state_dict())
    rest = list(resumed)
    rest += list(resumed) if stop == "mid" else []
    assert head + rest == want


def test_sampler_refuses_state_of_another_plan():
    lengths = np.random.default_rng(2).integers(1, 100, 300)
    state = PackedBatchSampler(lengths, 200, seed=5).state_dict()
    with pytest.raises(ValueError, match="seed"):
        PackedBatchSampler(lengths, 200, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprint"):
        PackedBatchSampler(lengths, 200, seed=5, indices=np.arange(299)).load_state_dict(state)


# --- loader ------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["raw", "lossless", "fp8"])
def test_loader_resume_mid_epoch_reproduces_remaining_batches(stores, codec):
    def make():
        return build_loader(stores[codec], max_tokens=MAX_TOKENS, rows_per_batch=2, seed=11, num_workers=0)

    full = make()
    steps = len(full)
    want = collect(full) + collect(full)  # epochs 0 and 1
    assert full.epoch == 2 and len(want) > 4
    first = make()
    head = collect(first, steps - 2)
    state = first.state_dict()
    assert (state["epoch"], state["position"]) == (0, steps - 2)
    resumed = make()
    resumed.load_state_dict(state)
    assert_batches_equal(head + collect(resumed) + collect(resumed), want)


def test_loader_workers_match_inline(stores):
    def run(workers: int) -> list[dict]:
        loader = build_loader(stores["raw"], max_tokens=MAX_TOKENS, seed=4, num_workers=workers, prefetch_factor=2)
        # abandon the epoch after 2 batches (workers have prefetched more), continue, then start the next epoch
        return collect(loader, 2) + collect(loader) + collect(loader, 3)

    inline = run(0)
    assert_batches_equal(run(2), inline)
    uninterrupted = build_loader(stores["raw"], max_tokens=MAX_TOKENS, seed=4, num_workers=0)
    assert_batches_equal(inline, collect(uninterrupted) + collect(uninterrupted, 3))


def test_loader_world2_equal_steps_and_every_sample_once(stores):
    loaders = [
        build_loader(stores["lossless"], max_tokens=MAX_TOKENS, rank=r, world_size=2, num_workers=0) for r in range(2)
    ]
    got = [collect(lo) for lo in loaders]
    assert len(got[0]) == len(got[1]) == len(loaders[0])
    seen = Counter(i for per_rank in got for b in per_rank for row in b["sample_indices"] for i in row)
    assert sorted(seen) == list(range(NUM_SAMPLES)) and set(seen.values()) == {1}
    assert all(b["input_ids"].shape[1] <= MAX_TOKENS for per_rank in got for b in per_rank)


def test_truncation_is_counted_and_logged(stores, caplog):
    loader = build_loader(stores["raw"], max_tokens=MAX_TOKENS, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="hsstore.train.sampler"):
        stats = loader.sampler.plan(0).stats
    assert stats.truncated == 1 and stats.truncated_tokens == 22
    assert "1 of 40 samples are longer than max_tokens=128" in caplog.text


def test_fp8_device_decode_equals_reader_decode(stores):
    loader = build_loader(stores["fp8"], max_tokens=MAX_TOKENS, num_workers=0, device_decode=True)
    host = next(iter(loader))
    assert host["aux"].dtype == torch.uint8 and host["aux_scale"].dtype == torch.float32
    assert host["last"].dtype == torch.uint8 and host["last_scale"].shape == host["last"].shape[:2]
    batch = to_device(host, "cpu", loader.codecs)  # dequantized "on the device" (CPU here; same code on CUDA)
    assert "aux_scale" not in batch and batch["aux"].dtype == torch.bfloat16
    ref = StoreReader(stores["fp8"], decode=True)
    for r, row in enumerate(batch["sample_indices"]):
        at = 0
        for i in row:
            want = ref[i]
            n = min(len(want["input_ids"]), MAX_TOKENS)
            assert torch.equal(batch["aux"][r, at : at + n], want["aux"][:n])
            assert torch.equal(batch["last"][r, at : at + n], want["last"][:n])
            at += n
    assert torch.equal(loader.to_device(host, "cpu")["aux"], batch["aux"])


def test_startup_reads_only_the_index(stores, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("token data read at start-up")

    monkeypatch.setattr(StoreReader, "read_rows", forbidden)
    monkeypatch.setattr(PartReader, "read", forbidden)
    for codec in stores:
        loader = build_loader(stores[codec], max_tokens=MAX_TOKENS, world_size=2, rank=1, num_workers=0)
        assert len(loader) > 0 and loader.sampler.plan(1).stats.samples == NUM_SAMPLES
        split_store(StoreReader(stores[codec]), eval_fraction=0.25)
        split_store(StoreReader(stores[codec]), eval_fraction=0.25, key="sample_id")
    with pytest.raises(AssertionError, match="start-up"):
        next(iter(loader))  # the guard is live: iterating does read


def test_pack_batch_refuses_over_budget_rows(stores):
    ds = SampleDataset(stores["raw"])
    with pytest.raises(ValueError, match="over max_tokens"):
        pack_batch([[ds[0], ds[1], ds[2], ds[3]]], [[0, 1, 2, 3]], 16)


# --- split -------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["content_hash", "sample_id"])
def test_eval_split_is_deterministic_and_disjoint(stores, key):
    a = split_store(StoreReader(stores["raw"]), eval_fraction=0.3, key=key)
    b = split_store(StoreReader(stores["lossless"]), eval_fraction=0.3, key=key)
    assert np.array_equal(a.train, split_store(StoreReader(stores["raw"]), eval_fraction=0.3, key=key).train)
    assert len(a.eval) and not np.intersect1d(a.train, a.eval).size
    assert sorted(np.concatenate([a.train, a.eval]).tolist()) == list(range(NUM_SAMPLES))
    # the split follows the sample, not its position: the 2-part store orders samples differently
    ids_raw, ids_ll = StoreReader(stores["raw"]).sample_ids, StoreReader(stores["lossless"]).sample_ids
    assert set(ids_raw[a.eval]) == set(ids_ll[b.eval])
    other = split_store(StoreReader(stores["raw"]), eval_fraction=0.3, key=key, salt="other")
    assert not np.array_equal(a.eval, other.eval)


def test_eval_split_errors_and_eval_store(stores, tmp_path):
    reader = StoreReader(stores["raw"])
    with pytest.raises(EmptySplitError, match="selects no sample"):
        split_store(reader, eval_fraction=1e-9)
    off = split_store(reader)
    assert len(off.train) == NUM_SAMPLES and not len(off.eval) and off.eval_location is None
    eval_path = str(tmp_path / "eval")
    with StoreWriter(eval_path, build_manifest("raw")) as w:
        build_sample(3, sample_lengths()[3]).append_to(w)  # also in the train store: dropped from train
        build_sample(1000, 20).append_to(w)
    split = split_store(reader, eval_reader=StoreReader(eval_path))
    assert split.eval_location == eval_path and split.eval.tolist() == [0, 1]
    assert 3 not in split.train and len(split.train) == NUM_SAMPLES - 1
    with pytest.raises(ValueError, match="not both"):
        split_store(reader, eval_fraction=0.1, eval_reader=StoreReader(eval_path))


# --- noise -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_noise_has_requested_std_and_leaves_ids(stores, kind):
    loader = build_loader(stores["raw"], max_tokens=MAX_TOKENS, rows_per_batch=4, num_workers=0)
    clean = to_device(next(iter(loader)), "cpu", loader.codecs)
    noisy = add_noise(clean, NoiseConfig(kind, 0.2), generator=torch.Generator().manual_seed(0))
    real = clean["seq_ids"] >= 0
    diff = (noisy["aux"].float() - clean["aux"].float())[real]
    assert noisy["aux"].dtype == torch.bfloat16 and abs(diff.std().item() - 0.2) < 0.02
    assert abs(diff.mean().item()) < 0.01
    if kind == "uniform":  # bounded by std*sqrt(3), up to bf16 rounding (checked where values are small)
        small = (clean["aux"].float().abs() < 1)[real]
        assert diff[small].abs().max().item() <= 0.2 * 3**0.5 + 0.005
    assert not noisy["aux"][~real].any()  # padding stays zero
    for k in ("input_ids", "loss_mask", "position_ids", "seq_ids", "last"):
        assert torch.equal(noisy[k], clean[k]), k
    assert add_noise(clean, NoiseConfig()) is clean
    with pytest.raises(ValueError, match="fp8 payload"):
        fp8 = build_loader(stores["fp8"], max_tokens=MAX_TOKENS, num_workers=0)
        add_noise(next(iter(fp8)), NoiseConfig(kind, 0.1))
