"""Resuming a part: after a clean close, after a crash simulated by rolling the commit record back,
after a real SIGKILL of a writer process in the middle of a shard write, and after one that wrote
shards a group commit had not yet published."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hsstore import HSStoreError, SampleError, StoreExistsError, StoreReader, StoreWriter

PART0 = "parts/part-00000"


def _commit(store_path: str) -> dict:
    return json.loads(Path(store_path, PART0, "zarr.json").read_text())["attributes"]["commit"]


def _check_store(store_path, expected, codec, assert_sample) -> StoreReader:
    """Every expected sample exactly once, in order, with its content; counts and token_freq agree."""
    r = StoreReader(store_path)
    assert r.sample_ids.tolist() == [s.sample_id for s in expected]
    assert r.index.length.tolist() == [len(s) for s in expected]
    assert r.num_tokens == sum(len(s) for s in expected)
    for i, s in enumerate(expected):
        assert_sample(r[i], s, codec)
    ids = torch.cat([s.input_ids for s in expected]).numpy()
    mask = torch.cat([s.loss_mask for s in expected]).numpy().astype(bool)
    np.testing.assert_array_equal(r.token_freq(), np.bincount(ids[mask], minlength=r.manifest.target.vocab_size))
    assert r.num_loss_tokens == int(mask.sum())
    return r


def _check_shard_files(r: StoreReader, store_path: str) -> None:
    """Every array's committed shard files hold exactly the committed chunks (read from each shard's index),
    and no shard file lies past the commit: what a clean, uninterrupted run leaves."""
    g = r.manifest.geometry
    tokens = r.parts[0].commit.tokens
    n_shards = -(-tokens // g.shard_tokens)
    for a in r.arrays:
        array_dir = Path(store_path, PART0, a.name, "c")
        files = sorted(p for p in array_dir.rglob("*") if p.is_file())
        assert len(files) == n_shards, (a.name, files)
        for k in range(n_shards):
            path = array_dir.joinpath(str(k), *["0"] * len(a.stored.per_token_shape))
            n_chunks = g.shard_tokens // g.chunk_tokens
            index = np.frombuffer(path.read_bytes()[-(16 * n_chunks + 4) : -4], dtype="<u8").reshape(n_chunks, 2)
            rows = min(tokens - k * g.shard_tokens, g.shard_tokens)
            present = int((index[:, 0] != 2**64 - 1).sum())
            assert present == -(-rows // g.chunk_tokens), (a.name, k, present)


def _check_raw_shards(r: StoreReader) -> None:
    """Each committed raw shard holds exactly its committed chunks, and its recorded crc32c matches them."""
    p = r.parts[0]
    g = r.manifest.geometry
    tokens = p.commit.tokens
    n_shards = -(-tokens // g.shard_tokens)
    for name, raw in p.local_arrays.items():
        if raw.decompress is not None:  # compressed arrays carry crc32c per chunk instead
            continue
        crcs = p.group[f"shard_crc32c/{name}"][:]
        assert len(crcs) == n_shards, name
        for k in range(n_shards):
            rows = min(tokens - k * g.shard_tokens, g.shard_tokens)
            shard = raw.shard(k)
            assert shard.rows == -(-rows // g.chunk_tokens) * g.chunk_tokens, (name, k)
            assert shard.data_crc32c() == int(crcs[k]), (name, k)
        assert not raw.shard_path(n_shards).exists(), name  # nothing left past the commit


@pytest.mark.parametrize("codec", ["raw", "lossless", "fp8"])
def test_resume_after_close_appends_exactly_once(codec, store_path, make_manifest, make_sample, assert_sample):
    m = make_manifest(codec)
    first = [make_sample(i, n) for i, n in enumerate([70, 90, 30])]  # 190 tokens: shard 1 is a partial tail
    second = [make_sample(10 + i, n) for i, n in enumerate([20, 150, 5, 61])]
    with StoreWriter(store_path, m) as w:
        for s in first:
            s.append_to(w)
    assert _commit(store_path)["closed"] and _commit(store_path)["tokens"] == 190
    w = StoreWriter(store_path, m, resume=True)
    assert w.commit.samples == w.num_samples == 3
    assert w.committed_sample_ids() == ["s0", "s1", "s2"]
    for s in second:
        s.append_to(w)
    w.close()
    r = _check_store(store_path, first + second, codec, assert_sample)
    _check_shard_files(r, store_path)
    assert r.commits[0].closed and r.commits[0].shards == -(-r.num_tokens // 128)
    if codec == "raw":
        _check_raw_shards(r)


def test_resume_on_a_shard_boundary_and_with_nothing_new(store_path, make_manifest, make_sample, assert_sample):
    m = make_manifest("raw")
    first = [make_sample(0, 100), make_sample(1, 156)]  # exactly two shards
    with StoreWriter(store_path, m) as w:
        for s in first:
            s.append_to(w)
    with StoreWriter(store_path, m, resume=True):  # open and close, appending nothing
        pass
    _check_raw_shards(_check_store(store_path, first, "raw", assert_sample))
    more = [make_sample(2, 128), make_sample(3, 3)]
    with StoreWriter(store_path, m, resume=True) as w:
        assert w.num_samples == 2
        for s in more:
            s.append_to(w)
    _check_raw_shards(_check_store(store_path, first + more, "raw", assert_sample))


def test_reopen_without_resume_raises(store_path, make_manifest, make_sample, assert_sample):
    m = make_manifest("lossless")
    s = make_sample(0, 40)
    with StoreWriter(store_path, m) as w:
        s.append_to(w)
    with pytest.raises(StoreExistsError, match=r"already holds 1 committed samples.*resume=True"):
        StoreWriter(store_path, m)
    _check_store(store_path, [s], "lossless", assert_sample)


def test_store_with_no_committed_sample_reopens_without_resume(store_path, make_manifest, make_sample, assert_sample):
    m = make_manifest("lossless")
    StoreWriter(store_path, m).close()
    s = make_sample(0, 40)
    with StoreWriter(store_path, m) as w:
        s.append_to(w)
    _check_store(store_path, [s], "lossless", assert_sample)


@pytest.mark.parametrize("codec", ["raw", "lossless"])
def test_resume_drops_rows_of_an_uncommitted_job(codec, store_path, make_manifest, make_sample, assert_sample):
    """The disk state of a crash after shards (and sample rows, token counts) were written but before
    their commit record: the data of a later run, with the commit record of an earlier one."""
    m = make_manifest(codec)
    kept = [make_sample(0, 100), make_sample(1, 100)]  # commit: 200 tokens, tail shard 1 holds 72 of them
    with StoreWriter(store_path, m) as w:
        for s in kept:
            s.append_to(w)
    part_meta = Path(store_path, PART0, "zarr.json")
    committed_record = part_meta.read_bytes()
    lost = [make_sample(100 + i, 100) for i in range(3)]  # fills shard 1 and writes shards 2, 3
    with StoreWriter(store_path, m, resume=True) as w:
        for s in lost:
            s.append_to(w)
    assert StoreReader(store_path).num_tokens == 500
    part_meta.write_bytes(committed_record)  # the crash: this record never got replaced

    r = StoreReader(store_path)  # a reader sees exactly the committed samples
    assert r.sample_ids.tolist() == ["s0", "s1"]
    assert_sample(r[1], kept[1], codec)

    more = [make_sample(2, 10), make_sample(3, 20)]
    w = StoreWriter(store_path, m, resume=True)
    assert w.committed_sample_ids() == ["s0", "s1"] and w.num_samples == 2
    for s in more:
        s.append_to(w)
    w.close()
    r = _check_store(store_path, kept + more, codec, assert_sample)
    assert r.parts[0].arrays["input_ids"].shape == (230,)
    assert not Path(store_path, PART0, "input_ids/c/2").exists()  # the lost job's shards are gone
    _check_shard_files(r, store_path)
    if codec == "raw":
        _check_raw_shards(r)


@pytest.mark.parametrize("codec", ["raw", "lossless"])
def test_failed_shard_write_stops_the_writer_and_resume_recovers(
    codec, store_path, make_manifest, make_sample, assert_sample
):
    """A real I/O failure in the background writer (a file where shard slot 1's directory must go): no
    later shard may commit, since its samples would land at the failed job's offsets."""
    m = make_manifest(codec)
    StoreWriter(store_path, m).close()
    obstacle = Path(store_path, PART0, "hidden/aux/c/1")
    obstacle.parent.mkdir(parents=True, exist_ok=True)
    obstacle.write_text("in the way")
    samples = [make_sample(i, 100) for i in range(8)]
    with pytest.raises(HSStoreError) as info, StoreWriter(store_path, m, resume=True) as w:
        for s in samples:
            s.append_to(w)
    msg = str(info.value)
    assert "writing shard slot 1 failed" in msg and "resume=True" in msg, msg
    assert isinstance(info.value.__cause__, OSError)
    _check_store(store_path, samples[:1], codec, assert_sample)  # only slot 0's sample is committed

    obstacle.unlink()
    with StoreWriter(store_path, m, resume=True) as w:
        for s in samples[w.commit.samples :]:
            s.append_to(w)
    r = _check_store(store_path, samples, codec, assert_sample)
    _check_shard_files(r, store_path)


@pytest.mark.parametrize("codec", ["raw", "lossless"])
def test_group_commit_publishes_written_shards_together(codec, store_path, make_manifest, make_sample, assert_sample):
    """Shards go to disk as they fill, but readers see their samples only once a commit publishes them;
    an error in the caller still commits every shard already written (and nothing of the unwritten tail)."""
    m = make_manifest(codec)
    samples = [make_sample(i, 100) for i in range(5)]  # 500 tokens: slots 0-2 full (384 rows), s0-s2 complete
    with pytest.raises(SampleError), StoreWriter(store_path, m, commit_seconds=3600) as w:
        for s in samples:
            s.append_to(w)
        assert len(StoreReader(store_path)) == 0  # written (or being written), not yet committed
        w.append(torch.zeros(3, dtype=torch.int64), torch.zeros(4, dtype=torch.uint8), {})  # mask != ids
    r = _check_store(store_path, samples[:3], codec, assert_sample)
    assert not r.parts[0].commit.closed

    with StoreWriter(store_path, m, resume=True, commit_seconds=3600) as w:
        for s in samples[3:]:
            s.append_to(w)
    r = _check_store(store_path, samples, codec, assert_sample)
    _check_shard_files(r, store_path)
    if codec == "raw":
        _check_raw_shards(r)


@pytest.mark.parametrize("codec", ["lossless", "fp8"])
@pytest.mark.parametrize("commit_seconds", [0, 3600])
def test_remote_store_writes_through_zarr_and_resumes(codec, commit_seconds, make_manifest, make_sample, assert_sample):
    """An fsspec URL (memory://) takes zarr's write path, where extents grow before each shard is written;
    a group commit and a resume there leave the same samples as a local store."""
    import fsspec

    location = f"memory://hsstore-test/{codec}-{commit_seconds}"
    m = make_manifest(codec)
    first, more = [make_sample(i, 100) for i in range(5)], [make_sample(10 + i, 50) for i in range(3)]
    try:
        with StoreWriter(location, m, commit_seconds=commit_seconds) as w:
            for s in first:
                s.append_to(w)
        with StoreWriter(location, m, resume=True, commit_seconds=commit_seconds) as w:
            assert w.committed_sample_ids() == [s.sample_id for s in first]
            for s in more:
                s.append_to(w)
        r = StoreReader(location)
        assert r.sample_ids.tolist() == [s.sample_id for s in first + more]
        for i, s in enumerate(first + more):
            assert_sample(r[i], s, codec)
    finally:
        fsspec.filesystem("memory").rm(location.removeprefix("memory://"), recursive=True)


# --- a real crash: SIGKILL a writer process while it writes shards -----------------------------------

CRASH_H = 256
CRASH_SHARD = 1024  # 2 KiB of hidden state per token: 2 MiB per shard slot, compressed in the background


def crash_manifest():
    from conftest import build_manifest

    return build_manifest("lossless", hidden_size=CRASH_H, chunk_tokens=64, shard_tokens=CRASH_SHARD)


def crash_sample(i: int):
    """Sample i of the crash test's endless stream, a pure function of i."""
    from conftest import build_sample

    s = build_sample(10_000 + i, 64 + (i * 131) % 400, hidden_size=CRASH_H)
    s.sample_id = f"c{i}"
    return s


def _crash_child(location: str) -> None:
    """Resume the store and append samples forever, reporting each commit; the parent kills us."""
    torch.set_num_threads(1)  # the machine is small and shared; threads only add contention here
    # group commits a second apart: a kill finds shard files both in flight and written past the last commit
    with StoreWriter(location, crash_manifest(), resume=True, commit_seconds=1.0) as w:
        assert w.num_samples == w.commit.samples == len(w.committed_sample_ids())
        i = w.num_samples
        print(f"start {w.commit.samples} {w.commit.tokens} 0", flush=True)
        while True:
            crash_sample(i).append_to(w)
            i += 1
            busy = sum(not f.done() for f in w._inflight)  # shard jobs being encoded/written right now
            print(f"commit {w.commit.samples} {w.commit.tokens} {busy}", flush=True)


def _run_until_killed(location: str, new_shards: int, delay: float) -> tuple[int, int]:
    """Start a child writer; SIGKILL it `delay` seconds after `new_shards` more shards are committed while
    a shard job is in flight. Returns (samples, tokens) of the child's last report."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "crash-child", location], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        start_tokens = None
        for line in proc.stdout:
            word, samples, tokens, busy = line.split()
            if word == "start":
                start_tokens = int(tokens)
            elif int(tokens) >= start_tokens + new_shards * CRASH_SHARD and int(busy):
                # the report follows a commit, so the next job has just begun: let it get into its shard
                # writes (a job takes ~70 ms here, most of it compressing and writing hidden states)
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
        else:
            pytest.fail(f"crash child exited early: {proc.wait()} {proc.stderr.read()}")
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        return int(samples), int(tokens)
    finally:
        watchdog.cancel()
        proc.stdout.close()
        proc.stderr.close()


def _uncommitted_child(location: str) -> None:
    """Write three shard slots under a commit interval that never comes due, then wait to be killed."""
    torch.set_num_threads(1)
    with StoreWriter(location, crash_manifest(), commit_seconds=3600) as w:
        i = tokens = 0
        while tokens < 3 * CRASH_SHARD:
            crash_sample(i).append_to(w)
            tokens += len(crash_sample(i))
            i += 1
        for job in w._inflight:  # the shard files are on disk
            job.result()
        print("written", flush=True)
        time.sleep(120)


def test_sigkill_between_group_commits_then_resume(store_path, assert_sample):
    """Shard files a killed writer wrote past its last commit are dropped on resume, not adopted as data."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "uncommitted-child", store_path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "written", f"child failed: {line!r} {proc.stderr.read() if not line else ''}"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    part = Path(store_path, PART0)
    assert all(Path(part, "input_ids/c", str(k)).is_file() for k in range(3))  # written ...
    assert _commit(store_path)["samples"] == 0 and len(StoreReader(store_path)) == 0  # ... never committed

    w = StoreWriter(store_path, crash_manifest(), resume=True)
    assert w.num_samples == 0
    for i in range(5):
        crash_sample(i).append_to(w)
    w.close()
    r = _check_store(store_path, [crash_sample(i) for i in range(5)], "lossless", assert_sample)
    _check_shard_files(r, store_path)  # the killed writer's later shards are gone


@pytest.mark.slow
def test_crash_with_sigkill_then_resume(store_path, assert_sample):
    in_flight_kills = 0
    cycles = 0
    while cycles < 2 or (in_flight_kills == 0 and cycles < 4):
        part = Path(store_path, PART0)
        partial_before = set(part.rglob("*.partial"))
        reported_samples, _ = _run_until_killed(store_path, new_shards=2, delay=0.02 + 0.01 * cycles)
        cycles += 1
        commit = _commit(store_path)
        assert not commit["closed"]
        assert commit["samples"] >= reported_samples  # the record only moves forward
        # evidence the kill hit a shard job in flight: the next shard slot was (being) written, uncommitted
        next_slot = -(-commit["tokens"] // CRASH_SHARD)
        grown = json.loads(Path(part, "input_ids/zarr.json").read_text())["shape"][0] > next_slot * CRASH_SHARD
        started = Path(part, "input_ids/c", str(next_slot)).exists()
        if grown or started or set(part.rglob("*.partial")) - partial_before:
            in_flight_kills += 1
        # the store opens and holds exactly the committed samples, each complete and correct
        r = StoreReader(store_path)
        assert len(r) == commit["samples"] and r.num_tokens == commit["tokens"]
        assert commit["tokens"] >= 2 * CRASH_SHARD * cycles
        assert r.sample_ids.tolist() == [f"c{i}" for i in range(len(r))]
        for i in range(len(r)):
            assert_sample(r[i], crash_sample(i), "lossless")
    assert in_flight_kills >= 1, "no kill landed while a shard job was in flight"

    # a resumed writer continues from the commit record and completes the store
    w = StoreWriter(store_path, crash_manifest(), resume=True)
    start = w.commit.samples
    assert start == len(w.committed_sample_ids()) == w.num_samples
    total = start + 7
    for i in range(start, total):
        crash_sample(i).append_to(w)
    w.close()
    r = _check_store(store_path, [crash_sample(i) for i in range(total)], "lossless", assert_sample)
    assert len(set(r.sample_ids.tolist())) == total  # no duplicates
    idx = r.index
    assert idx.offset[0] == 0 and np.array_equal(idx.offset[1:], (idx.offset + idx.length)[:-1])  # no holes
    assert r.parts[0].arrays["input_ids"].shape == (r.num_tokens,)
    assert not list(Path(store_path, PART0).rglob("*.partial"))  # the resumed writer swept killed temp files
    _check_shard_files(r, store_path)


if __name__ == "__main__":  # child process of the crash test
    sys.path.insert(0, str(Path(__file__).parent))
    if sys.argv[1] == "crash-child":
        _crash_child(sys.argv[2])
    elif sys.argv[1] == "uncommitted-child":
        _uncommitted_child(sys.argv[2])
