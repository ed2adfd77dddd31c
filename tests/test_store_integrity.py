"""Stores that are missing, foreign, too new, differently configured or damaged: each gives its own
error class with a message naming the path and the way out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from hsstore import (
    CorruptStoreError,
    IncompatibleStoreError,
    NotAStoreError,
    StoreExistsError,
    StoreReader,
    StoreWriter,
)
from hsstore.manifest import MANIFEST_KEY

PART0 = "parts/part-00000"
LENGTHS = [100, 100, 100, 60]  # 360 tokens: shards 0, 1 full, shard 2 partial; sample 1 crosses 0|1


@pytest.fixture
def written(store_path, make_manifest, make_sample, write_samples):
    """A factory: a closed store of LENGTHS samples in the given codec, and its samples."""

    def write(codec: str):
        samples = [make_sample(i, n) for i, n in enumerate(LENGTHS)]
        write_samples(store_path, make_manifest(codec), samples)
        return samples

    return write


def _shard(store_path: str, array: str, k: int) -> Path:
    base = Path(store_path, PART0, array, "c", str(k))
    return base / "0" if array == "hidden/last" else base / "0" / "0" if array == "hidden/aux" else base


def test_missing_path_is_not_a_store(tmp_path):
    with pytest.raises(NotAStoreError, match="no such file or directory"):
        StoreReader(str(tmp_path / "nowhere"))


def test_empty_directory_is_not_a_store(tmp_path):
    with pytest.raises(NotAStoreError, match="not a Zarr v3 group"):
        StoreReader(str(tmp_path))


def test_plain_zarr_group_is_not_a_store(tmp_path, make_manifest):
    loc = str(tmp_path / "plain")
    g = zarr.open_group(loc, mode="w", zarr_format=3)
    g.create_array("x", shape=(4,), dtype="int32")
    with pytest.raises(NotAStoreError, match="without an hsstore manifest"):
        StoreReader(loc)
    # a writer refuses to take it over as well, and leaves it alone
    with pytest.raises(NotAStoreError, match="not an hsstore store; pick another path"):
        StoreWriter(loc, make_manifest())
    assert list(zarr.open_group(loc, mode="r").keys()) == ["x"]


def test_newer_format_version_is_refused(store_path, written):
    written("lossless")
    root = zarr.open_group(store_path, mode="r+")
    manifest = dict(root.attrs[MANIFEST_KEY])
    root.attrs[MANIFEST_KEY] = {**manifest, "format_version": 2}
    with pytest.raises(IncompatibleStoreError) as info:
        StoreReader(store_path)
    msg = str(info.value)
    assert store_path in msg and "format version 2" in msg and "reads version 1" in msg, msg
    assert "matching hsstore release or regenerate" in msg


def test_foreign_format_name_is_refused(store_path, written):
    written("raw")
    root = zarr.open_group(store_path, mode="r+")
    root.attrs[MANIFEST_KEY] = {**dict(root.attrs[MANIFEST_KEY]), "format": "something-else"}
    with pytest.raises(IncompatibleStoreError, match="not an hsstore store"):
        StoreReader(store_path)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hidden_size": 128}, "target"),
        ({"aux_layers": (1, 4, 5)}, "hidden"),
        ({"codec": "fp8"}, "hidden"),
        ({"shard_tokens": 256}, "geometry"),
        ({"num_parts": 2}, "num_parts"),
        ({"max_seq_length": 512}, "max_seq_length"),
    ],
)
def test_writer_refuses_a_differently_configured_store(
    change, field, store_path, written, make_manifest, assert_sample
):
    samples = written("lossless")
    with pytest.raises(IncompatibleStoreError) as info:
        StoreWriter(store_path, make_manifest(**{"codec": "lossless", **change}), resume=True)
    msg = str(info.value)
    assert store_path in msg and "different configuration" in msg and f"{field}:" in msg, msg
    assert "write to a new store" in msg
    r = StoreReader(store_path)  # untouched
    assert len(r) == len(samples)
    assert_sample(r[1], samples[1], "lossless")


def test_reopening_without_resume_is_refused(store_path, written, make_manifest, make_sample, assert_sample):
    samples = written("lossless")
    with pytest.raises(StoreExistsError) as info:
        StoreWriter(store_path, make_manifest("lossless"))
    msg = str(info.value)
    assert "already holds 4 committed samples" in msg and "resume=True" in msg and "overwrite=True" in msg, msg
    r = StoreReader(store_path)
    assert len(r) == 4
    assert_sample(r[3], samples[3], "lossless")
    # overwrite really starts over
    fresh = make_sample(50, 10)
    with StoreWriter(store_path, make_manifest("lossless"), overwrite=True) as w:
        fresh.append_to(w)
    r = StoreReader(store_path)
    assert r.sample_ids.tolist() == ["s50"]
    assert_sample(r[0], fresh, "lossless")


def test_truncated_raw_shard(store_path, written, assert_sample):
    samples = written("raw")
    path = _shard(store_path, "hidden/last", 1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    r = StoreReader(store_path)  # opening reads metadata only
    with pytest.raises(CorruptStoreError, match=f"{path}: shard index checksum mismatch"):
        r[2]  # rows 200:300, shard 1
    assert_sample(r[0], samples[0], "raw")  # shard 0 is fine
    path.write_bytes(data[:10])
    with pytest.raises(CorruptStoreError, match="too small for a shard index; the file is truncated"):
        StoreReader(store_path)[2]
    path.write_bytes(b"")
    with pytest.raises(CorruptStoreError, match="empty"):
        StoreReader(store_path)[2]


@pytest.mark.parametrize("codec", ["lossless", "fp8"])
def test_truncated_compressed_shard(codec, store_path, written):
    written(codec)
    path = _shard(store_path, "hidden/aux", 1)
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(CorruptStoreError, match=f"{path}.*run `hsstore verify`"):
        StoreReader(store_path)[2]


@pytest.mark.parametrize("codec", ["lossless", "fp8"])
def test_flipped_byte_in_compressed_shard(codec, store_path, written, assert_sample):
    samples = written(codec)
    path = _shard(store_path, "hidden/aux", 1)
    data = bytearray(path.read_bytes())
    data[100] ^= 0x40  # inside the shard's first inner chunk (rows 128:160), not its index
    path.write_bytes(bytes(data))
    r = StoreReader(store_path)
    with pytest.raises(CorruptStoreError) as info:
        r[1]  # rows 100:200: shard 0, then the damaged chunk of shard 1
    msg = str(info.value)
    assert str(path) in msg and "checksum" in msg, msg  # the shard file that failed, not its neighbour
    assert str(_shard(store_path, "hidden/aux", 0)) not in msg
    assert_sample(r[0], samples[0], codec)  # shard 0 still reads
    assert_sample(r[2], samples[2], codec)  # other chunks of shard 1 too: reads touch only their own chunks
    assert_sample(r[3], samples[3], codec)


@pytest.mark.parametrize(("codec", "array"), [("raw", "hidden/aux"), ("lossless", "hidden/last"), ("fp8", "input_ids")])
def test_deleted_shard_file(codec, array, store_path, written, assert_sample):
    """zarr would read a missing shard as zeros; every committed slot was written, so it is corruption."""
    samples = written(codec)
    path = _shard(store_path, array, 1)
    path.unlink()
    r = StoreReader(store_path)
    with pytest.raises(CorruptStoreError, match=f"{path}: shard file is missing"):
        r[1]  # rows 100:200 cross into shard 1
    with pytest.raises(CorruptStoreError, match=f"{path}: shard file is missing"):
        r.get_batch([0, 2], threads=2)
    assert_sample(r[0], samples[0], codec)


def test_commit_record_beyond_the_data(store_path, written):
    written("lossless")
    meta_path = Path(store_path, PART0, "zarr.json")
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["commit"]["tokens"] += 1000
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CorruptStoreError, match="commit record names 1360"):
        StoreReader(store_path)


def test_malformed_commit_record(store_path, written):
    written("lossless")
    meta_path = Path(store_path, PART0, "zarr.json")
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["commit"]["loss_tokens"] = -5
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CorruptStoreError, match="impossible commit record"):
        StoreReader(store_path)


def test_sample_table_disagreeing_with_commit(store_path, written):
    written("raw")
    lengths = zarr.open_array(str(Path(store_path, PART0, "samples/length")), mode="r+")
    lengths[1] = 99
    with pytest.raises(CorruptStoreError, match=r"offsets are not contiguous|lengths sum to"):
        StoreReader(store_path)
    assert np.asarray(lengths[:]).tolist() == [100, 99, 100, 60]
