"""Round trips through real zarr stores: every codec, shard crossings, the index table, token
frequencies, threaded batches, fp8 payloads, zero-copy raw views, plain-zarr readability, blosc
split mode, and data-parallel parts (sequential and two concurrent processes)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from hsstore import StoreReader, StoreWriter
from hsstore.codecs import blosc_was_split, dequantize_fp8
from hsstore.manifest import FORMAT_VERSION, MANIFEST_KEY
from hsstore.shardfile import zstd_compress_chunks, zstd_decompress

# lengths chosen against shards of 128 tokens: samples inside one shard, ending exactly on a boundary,
# crossing one boundary, longer than a shard (300 spans three slots), and single tokens
LENGTHS = [5, 40, 83, 1, 128, 300, 77, 33, 64, 200, 9, 1]
PART0 = "parts/part-00000"


@pytest.fixture
def samples(make_sample):
    return [make_sample(i, n, source="src-a" if i % 3 else "src-b") for i, n in enumerate(LENGTHS)]


def _starts() -> list[int]:
    return np.concatenate([[0], np.cumsum(LENGTHS)[:-1]]).tolist()


@pytest.mark.parametrize("codec", ["raw", "lossless", "fp8"])
def test_round_trip_every_codec(codec, store_path, samples, make_manifest, write_samples, assert_sample):
    commit = write_samples(store_path, make_manifest(codec), samples)
    assert commit.closed and commit.samples == len(LENGTHS) and commit.tokens == sum(LENGTHS)
    # the long sample really spans three shard slots, and some samples cross a boundary
    starts = _starts()
    assert (starts[5] // 128, (starts[5] + 299) // 128) == (2, 4)
    assert any(s // 128 != (s + n - 1) // 128 for s, n in zip(starts, LENGTHS, strict=True) if n < 128)

    r = StoreReader(store_path)
    assert len(r) == len(samples) and r.num_tokens == sum(LENGTHS)
    for i, s in enumerate(samples):
        assert_sample(r[i], s, codec)
    assert_sample(r[-1], samples[-1], codec)
    for got, s in zip(r, samples, strict=True):  # iteration gives the same samples in order
        assert_sample(got, s, codec)
    with pytest.raises(IndexError, match="out of range"):
        r[len(samples)]


def test_fp8_error_is_bounded_per_token(store_path, make_manifest, make_sample):
    """e4m3 with a per-token, per-layer scale: error is a small fraction of that token's amax, at any scale."""
    s = make_sample(0, 200)
    s.hidden["aux"][:, 1] *= 1e-3  # one layer much smaller than the others: it keeps its own scale
    s.hidden["last"][7] = 0  # an all-zero token must come back exactly zero
    with StoreWriter(store_path, make_manifest("fp8")) as w:
        s.append_to(w)
    got = StoreReader(store_path)[0]
    for role, ref in s.hidden.items():
        ref32, out = ref.float(), got[role].float()
        amax = ref32.abs().amax(dim=-1, keepdim=True)
        rel = ((out - ref32).abs() / amax.clamp_min(1e-30)).amax(dim=-1)
        assert float(rel.max()) <= 0.04, role  # measured 0.038 (16/448 rounding + bf16 output)
        assert float(rel.max()) > 0.005, role  # it is lossy: the bound is tight, not vacuous
        if role == "aux":  # the small layer is as accurate, relative to itself, as the others
            assert float(rel[:, 1].max()) <= 0.04
    assert torch.equal(got["last"][7], torch.zeros(64, dtype=torch.bfloat16))


def test_index_table(store_path, samples, make_manifest, write_samples):
    write_samples(store_path, make_manifest("lossless"), samples)
    r = StoreReader(store_path)
    idx = r.index
    assert len(idx) == len(samples)
    assert idx.length.tolist() == LENGTHS
    assert idx.offset.tolist() == _starts()
    assert idx.part.tolist() == [0] * len(samples)
    assert idx.loss_tokens.tolist() == [int(s.loss_mask.sum()) for s in samples]
    assert idx.source.tolist() == [s.source for s in samples]
    assert r.sample_ids.tolist() == [s.sample_id for s in samples]
    assert r.num_loss_tokens == sum(int(s.loss_mask.sum()) for s in samples)

    def digest(s) -> int:  # the format's content hash: blake2b-64 of int32 ids then uint8 mask bytes
        h = hashlib.blake2b(digest_size=8)
        h.update(s.input_ids.numpy().astype("<i4").tobytes())
        h.update(s.loss_mask.numpy().astype(np.uint8).tobytes())
        return int.from_bytes(h.digest(), "little")

    assert idx.content_hash.dtype == np.uint64
    assert idx.content_hash.tolist() == [digest(s) for s in samples]
    assert len(set(idx.content_hash.tolist())) == len(samples)
    assert r.locate(5) == (0, _starts()[5], 300)


def test_token_freq_is_bincount_of_loss_tokens(store_path, samples, make_manifest, write_samples):
    write_samples(store_path, make_manifest("lossless"), samples)
    ids = torch.cat([s.input_ids for s in samples]).numpy()
    mask = torch.cat([s.loss_mask for s in samples]).numpy().astype(bool)
    expected = np.bincount(ids[mask], minlength=1000)
    freq = StoreReader(store_path).token_freq()
    assert freq.dtype == np.int64 and freq.shape == (1000,)
    np.testing.assert_array_equal(freq, expected)
    assert freq.sum() == mask.sum() > 0


@pytest.mark.parametrize("codec", ["raw", "lossless"])
def test_get_batch_with_threads(codec, store_path, samples, make_manifest, write_samples, assert_sample):
    write_samples(store_path, make_manifest(codec), samples)
    r = StoreReader(store_path)
    order = [5, 0, 11, 9, 5, 3, 7, 2, 10, 1, 4, 6, 8]  # includes a repeat
    batch = r.get_batch(order, threads=4)
    assert len(batch) == len(order)
    for i, got in zip(order, batch, strict=True):
        assert_sample(got, samples[i], codec)
    assert [int(b["input_ids"][0]) for b in r.get_batch(order, threads=1)] == [int(b["input_ids"][0]) for b in batch]


def test_fp8_undecoded_payload_and_scales(store_path, samples, make_manifest, write_samples):
    write_samples(store_path, make_manifest("fp8"), samples)
    decoded = StoreReader(store_path)
    raw = StoreReader(store_path, decode=False)
    for i in (0, 5, 9):  # inside a shard, longer than a shard, crossing a boundary
        n = LENGTHS[i]
        d, p = decoded[i], raw[i]
        assert set(p) == {"input_ids", "loss_mask", "aux", "aux_scale", "last", "last_scale"}
        assert p["aux"].dtype == torch.uint8 and p["aux"].shape == (n, 3, 64)
        assert p["aux_scale"].dtype == torch.float32 and p["aux_scale"].shape == (n, 3)
        assert p["last"].dtype == torch.uint8 and p["last"].shape == (n, 64)
        assert p["last_scale"].dtype == torch.float32 and p["last_scale"].shape == (n,)
        assert bool((p["aux_scale"] > 0).all())
        for role in ("aux", "last"):
            again = dequantize_fp8(p[role], p[f"{role}_scale"], torch.bfloat16)
            assert torch.equal(again.view(torch.int16), d[role].view(torch.int16)), (i, role)
        assert torch.equal(p["input_ids"], d["input_ids"])


def test_raw_reads_are_zero_copy_views_of_the_mmap(store_path, samples, make_manifest, write_samples, assert_sample):
    write_samples(store_path, make_manifest("raw"), samples)
    r = StoreReader(store_path)
    i = 2  # rows 45:128, inside shard 0
    start = _starts()[i]
    t = r[i]["last"]
    shard = r.parts[0].local_arrays["hidden/last"].shard(0)
    base = np.frombuffer(shard._map, dtype=np.uint8).ctypes.data  # address of the mapped shard file
    row_bytes = 64 * 2
    # the tensor's memory is the mapping itself, at this sample's rows: no copy was made
    assert t.data_ptr() == base + start * row_bytes
    aux = r[i]["aux"]
    aux_base = np.frombuffer(r.parts[0].local_arrays["hidden/aux"].shard(0)._map, dtype=np.uint8).ctypes.data
    assert aux.data_ptr() == aux_base + start * 3 * row_bytes
    # and a second read sees a write through the first (same memory), while the file stays intact
    again = r[i]["last"]
    assert again.data_ptr() == t.data_ptr()
    original = t[0, 0].clone()
    t[0, 0] = 4096.0
    assert float(again[0, 0]) == 4096.0
    t[0, 0] = original
    assert_sample(StoreReader(store_path)[i], samples[i], "raw")
    # a sample crossing shards is assembled (one copy) and still exact
    assert_sample(r[9], samples[9], "raw")


@pytest.mark.parametrize("codec", ["raw", "lossless", "fp8"])
def test_store_is_a_plain_zarr_v3_group(codec, store_path, samples, make_manifest, write_samples):
    write_samples(store_path, make_manifest(codec), samples)
    root = zarr.open_group(store_path, mode="r", zarr_format=3)
    manifest = root.attrs[MANIFEST_KEY]
    assert manifest["format"] == "hsstore" and manifest["format_version"] == FORMAT_VERSION
    assert [h["codec"] for h in manifest["hidden"]] == [codec, codec]
    part = root[PART0]
    T = sum(LENGTHS)
    ids = torch.cat([s.input_ids for s in samples]).numpy()
    mask = torch.cat([s.loss_mask for s in samples]).numpy()
    assert part["input_ids"].shape == (T,) and part["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(part["input_ids"][:], ids)
    np.testing.assert_array_equal(part["loss_mask"][:], mask)
    for role, shape in (("aux", (T, 3, 64)), ("last", (T, 64))):
        ref = torch.cat([s.hidden[role] for s in samples])
        arr = part[f"hidden/{role}"]
        assert arr.shape == shape
        assert arr.attrs["role"] == role and arr.attrs["codec"] == codec
        if codec == "fp8":
            assert arr.dtype == np.uint8 and part[f"hidden/{role}_scale"].shape == shape[:-1]
            scale = torch.from_numpy(part[f"hidden/{role}_scale"][:])
            got = dequantize_fp8(torch.from_numpy(arr[:]), scale, torch.bfloat16)
            via_reader = StoreReader(store_path).read_rows(0, 0, T)[role]
            assert torch.equal(got.view(torch.int16), via_reader.view(torch.int16))
        else:
            assert arr.dtype == np.uint16 and arr.attrs["logical_dtype"] == "bfloat16"
            bits = torch.from_numpy(arr[:].view(np.int16))
            assert torch.equal(bits, ref.view(torch.int16))
    np.testing.assert_array_equal(part["samples/length"][:], LENGTHS)


def _shard_chunks(path: Path, n_chunks: int) -> list[bytes]:
    """Inner chunk bytes of a shard file, via the index at its end ((offset, nbytes) pairs + crc32c)."""
    data = path.read_bytes()
    index = np.frombuffer(data[-(n_chunks * 16 + 4) : -4], dtype="<u8").reshape(n_chunks, 2)
    return [data[int(o) : int(o + n)] for o, n in index if o != 2**64 - 1]


def test_lossless_is_blosc_split_with_its_ratio(store_path, make_manifest, make_sample):
    """Split byte planes are what make bf16 compress ~1.4x (without split blosc+zstd gives ~1.30x here)."""
    samples = [make_sample(i, 256) for i in range(4)]
    for s in samples:  # plain N(0, 1) bf16 activations, the case the 1.43x figure is quoted for
        g = torch.Generator().manual_seed(int(s.sample_id[1:]))
        s.hidden = {"aux": torch.randn(256, 3, 64, generator=g).to(torch.bfloat16), "last": s.hidden["last"]}
    with StoreWriter(store_path, make_manifest("lossless")) as w:
        for s in samples:
            s.append_to(w)
    aux_dir = Path(store_path, PART0, "hidden/aux/c")
    files = sorted(p for p in aux_dir.rglob("*") if p.is_file())
    assert len(files) == 1024 // 128
    stored = sum(p.stat().st_size for p in files)
    ratio = 1024 * 3 * 64 * 2 / stored
    assert ratio >= 1.38, ratio
    chunks = [c for p in files for c in _shard_chunks(p, 128 // 32)]
    assert len(chunks) == 1024 // 32
    assert all(blosc_was_split(c) for c in chunks)
    # chunk = blosc frame + crc32c; the blosc header records the typesize (2: bf16 bits)
    assert all(c[3] == 2 for c in chunks)


def test_multi_part_sequential(store_path, make_manifest, make_sample, assert_sample):
    m = make_manifest("lossless", num_parts=2)
    parts = {0: [make_sample(i, 50 + 23 * i) for i in range(5)], 1: [make_sample(100 + i, 90) for i in range(4)]}
    # rank 1 first: order in the store is by part, not by write time
    for rank in (1, 0):
        with StoreWriter(store_path, m, rank=rank) as w:
            for s in parts[rank]:
                s.append_to(w)
    r = StoreReader(store_path)
    everything = parts[0] + parts[1]
    assert len(r) == 9 and len(r.parts) == 2
    assert r.index.part.tolist() == [0] * 5 + [1] * 4
    assert r.sample_ids.tolist() == [s.sample_id for s in everything]
    assert r.num_tokens == sum(len(s) for s in everything) == sum(c.tokens for c in r.commits)
    assert r.num_loss_tokens == sum(int(s.loss_mask.sum()) for s in everything)
    for i, s in enumerate(everything):
        assert_sample(r[i], s, "lossless")
    ids = torch.cat([s.input_ids for s in everything]).numpy()
    mask = torch.cat([s.loss_mask for s in everything]).numpy().astype(bool)
    np.testing.assert_array_equal(r.token_freq(), np.bincount(ids[mask], minlength=1000))
    # part 1 offsets restart at 0: each rank owns its own token-major arrays
    assert r.index.offset[5] == 0 and r.locate(5) == (1, 0, 90)


def test_multi_part_only_one_rank_written(store_path, make_manifest, make_sample, assert_sample):
    m = make_manifest("raw", num_parts=2)
    s = make_sample(1, 70)
    with StoreWriter(store_path, m, rank=1) as w:
        s.append_to(w)
    r = StoreReader(store_path)
    assert len(r) == 1
    assert_sample(r[0], s, "raw")


def test_multi_part_ranks_racing_to_create_the_store(tmp_path, make_manifest, make_sample, assert_sample):
    """Ranks start together on an empty location: whoever loses the race to create the root uses it."""
    m = make_manifest("lossless", num_parts=2)
    for attempt in range(10):
        loc = str(tmp_path / f"race-{attempt}")
        barrier = threading.Barrier(2)
        errors = []

        def run(rank: int, loc=loc, barrier=barrier, errors=errors) -> None:
            try:
                barrier.wait()
                with StoreWriter(loc, m, rank=rank) as w:
                    make_sample(rank, 20).append_to(w)
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        r = StoreReader(loc)
        assert r.sample_ids.tolist() == ["s0", "s1"]
        assert_sample(r[1], make_sample(1, 20), "lossless")


def _rank_child(location: str, rank: int) -> None:
    from conftest import build_manifest, build_sample

    torch.set_num_threads(1)  # two writers share a small machine
    with StoreWriter(location, build_manifest("lossless", num_parts=2), rank=rank) as w:
        for i in range(12):
            build_sample(1000 * rank + i, 40 + 17 * i).append_to(w)


@pytest.mark.slow
def test_multi_part_two_concurrent_processes(store_path, make_sample, assert_sample):
    """Two ranks start on an empty location at the same time: both create the root, each its own part."""
    cmd = [sys.executable, __file__, "rank-child", store_path]
    procs = [subprocess.Popen([*cmd, str(rank)], stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    r = StoreReader(store_path)
    expected = [make_sample(1000 * rank + i, 40 + 17 * i) for rank in (0, 1) for i in range(12)]
    assert len(r) == 24 and [c.samples for c in r.commits] == [12, 12]
    assert r.sample_ids.tolist() == [s.sample_id for s in expected]
    assert r.num_tokens == sum(len(s) for s in expected)
    for i, s in enumerate(expected):
        assert_sample(r[i], s, "lossless")


if __name__ == "__main__":  # child processes of the tests above
    sys.path.insert(0, str(Path(__file__).parent))
    if sys.argv[1] == "rank-child":
        _rank_child(sys.argv[2], int(sys.argv[3]))


@pytest.mark.parametrize("codec", ["raw", "lossless", "fp8"])
def test_all_zero_chunks_are_stored(codec, store_path, make_manifest, make_sample, write_samples, assert_sample):
    """zarr drops all-zero chunks unless told not to, and does not persist that setting: raw layout needs them."""
    zero = make_sample(1, 96)
    for role in zero.hidden:
        zero.hidden[role].zero_()
    samples = [make_sample(0, 64), zero, make_sample(2, 200), make_sample(3, 40)]
    write_samples(store_path, make_manifest(codec), samples[:2])
    m = make_manifest(codec)
    with StoreWriter(store_path, m, resume=True) as w:  # reopened arrays must keep writing empty chunks
        for s in samples[2:]:
            s.append_to(w)
    r = StoreReader(store_path)
    for got, want in zip(r, samples, strict=True):
        assert_sample(got, want, codec)


@pytest.mark.parametrize("codec", ["raw", "lossless", "fp8", "mxfp4"])
def test_every_codec_keeps_an_own_copy(codec, store_path, make_manifest, make_sample):
    """Rows are buffered until their shard fills and fp8/mx encode later, on the writer's shard thread: a caller
    reusing its activation buffer right after append (as a backend with a persistent capture buffer does) must
    not change what gets stored, even when its arrays are already contiguous bf16, int32, uint8 (nothing to cast).
    What it stores is what copy=False stores from views of one capture."""
    samples = [make_sample(i, 100) for i in range(6)]
    buffers = {role: torch.empty_like(t) for role, t in samples[0].hidden.items()}
    ids, mask = np.empty(100, np.int32), np.empty(100, np.uint8)  # the stored dtypes: nothing to cast either
    with StoreWriter(store_path, make_manifest(codec)) as w:
        for s in samples:
            for role, t in s.hidden.items():
                buffers[role].copy_(t)
            ids[:], mask[:] = s.input_ids, s.loss_mask
            w.append(ids, mask, dict(buffers), sample_id=s.sample_id)
        for t in buffers.values():
            t.fill_(1e4)  # overwrite after the last append: any encode still reading it would see this
        ids[:], mask[:] = 0, 0
    with StoreWriter(f"{store_path}-direct", make_manifest(codec)) as w:
        for s in samples:  # copy=False, as generate appends: strided role views of one capture, kept until written
            states = torch.cat([s.hidden["aux"], s.hidden["last"].unsqueeze(1)], dim=1)
            roles = {"aux": states[:, :-1], "last": states[:, -1]}
            w.append(s.input_ids, s.loss_mask, roles, sample_id=s.sample_id, copy=False)
    queued, direct = StoreReader(store_path), StoreReader(f"{store_path}-direct")
    for i in range(len(samples)):
        for role in ("aux", "last"):
            assert torch.equal(queued[i][role], direct[i][role])
            assert float(queued[i][role].float().abs().max()) < 1e3
        assert np.array_equal(np.asarray(queued[i]["input_ids"]), np.asarray(samples[i].input_ids))
        assert np.array_equal(np.asarray(queued[i]["loss_mask"]), np.asarray(samples[i].loss_mask))


def test_zstd_chunks_decode_through_a_reused_context_and_check_their_size() -> None:
    """The reader's zstd path (one zstandard context per thread) reads numcodecs' frames, in several threads,
    and refuses a frame whose size does not fill the destination exactly."""
    import numcodecs

    frames = [
        (x, bytes(numcodecs.Zstd(level=3).encode(x))) for x in (np.arange(64, dtype=np.int32) * k for k in range(8))
    ]

    def decode_all(_: int) -> bool:
        ok = True
        for x, frame in frames:
            out = np.empty_like(x)
            zstd_decompress(frame, out)
            ok &= bool(np.array_equal(out, x))
        return ok

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(decode_all, range(16)))
    with pytest.raises(ValueError, match="decodes to 256 bytes, expected 260"):
        zstd_decompress(frames[1][1], np.empty(65, dtype=np.int32))
    # the writer's frames (a shard's chunks in one call, a reused context) are, frame for frame, zarr's own codec's
    chunks = np.stack([x for x, _ in frames])
    for level in (1, 3):
        expected = [bytes(numcodecs.Zstd(level=level).encode(x)) for x in chunks]
        assert [bytes(f) for f in zstd_compress_chunks(chunks, level)] == expected
