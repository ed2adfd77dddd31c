"""Zero-copy reads of `raw` arrays: memory-map a shard file and slice rows straight out of it.

A raw shard is the sharding codec's layout with plain little-endian chunks: the inner chunks, then
an index of (offset, nbytes) pairs with a crc32c (Zarr v3 sharding spec, index at the end). A whole
shard written at once lays its chunks in order, back to back, so rows r0:r1 of the shard are the
byte range r0*row_bytes : r1*row_bytes. We check that against the index before trusting it.
"""

from __future__ import annotations

import mmap
import threading
from collections import OrderedDict
from pathlib import Path

import crc32c
import numpy as np

from .errors import CorruptStoreError

EMPTY = np.uint64(2**64 - 1)
MAX_OPEN_SHARDS = 512


class RawShard:
    """One memory-mapped raw shard file, validated against its own index."""

    def __init__(self, path: Path, chunk_tokens: int, shard_tokens: int, row_dtype: np.dtype, row_shape: tuple):
        self.path = path
        self.dtype = row_dtype
        self.row_shape = row_shape
        row_nbytes = int(np.prod(row_shape, dtype=np.int64)) * row_dtype.itemsize
        n_chunks = shard_tokens // chunk_tokens
        index_nbytes = n_chunks * 16 + 4
        try:
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except FileNotFoundError:
            raise CorruptStoreError(f"{path}: shard file is missing; run `hsstore verify` and regenerate") from None
        except ValueError:  # empty file
            raise CorruptStoreError(f"{path}: shard file is empty (truncated write?)") from None
        size = len(self._map)
        if size < index_nbytes:
            raise CorruptStoreError(f"{path}: {size} bytes is too small for a shard index; the file is truncated")
        index_bytes = self._map[size - index_nbytes : size - 4]
        stored_crc = int.from_bytes(self._map[size - 4 : size], "little")
        if crc32c.crc32c(index_bytes) != stored_crc:
            raise CorruptStoreError(f"{path}: shard index checksum mismatch (truncated or overwritten file)")
        index = np.frombuffer(index_bytes, dtype="<u8").reshape(n_chunks, 2)
        chunk_nbytes = chunk_tokens * row_nbytes
        present = index[:, 0] != EMPTY
        self.rows = int(present.sum()) * chunk_tokens  # rows backed by bytes (last chunk may be padding)
        expected = np.arange(n_chunks, dtype=np.uint64) * np.uint64(chunk_nbytes)
        contiguous = (
            bool(present[: present.sum()].all())
            and np.array_equal(index[present, 0], expected[present])
            and bool((index[present, 1] == chunk_nbytes).all())
        )
        if not contiguous:
            raise CorruptStoreError(
                f"{path}: raw shard chunks are not laid out back to back; it was not written by hsstore"
            )
        if self.rows * row_nbytes > size - index_nbytes:
            raise CorruptStoreError(f"{path}: index points past the end of the file (truncated)")
        self._row_nbytes = row_nbytes

    def rows_view(self, r0: int, r1: int) -> np.ndarray:
        if r1 > self.rows:
            raise CorruptStoreError(f"{self.path}: rows {r0}:{r1} requested but the shard holds {self.rows}")
        arr = np.frombuffer(
            self._map,
            dtype=self.dtype,
            count=(r1 - r0) * self._row_nbytes // self.dtype.itemsize,
            offset=r0 * self._row_nbytes,
        )
        return arr.reshape(r1 - r0, *self.row_shape)

    def data_crc32c(self) -> int:
        return crc32c.crc32c(memoryview(self._map)[: self.rows * self._row_nbytes])


class RawArrayMap:
    """Row ranges of one raw array of one part, served from memory-mapped shards (LRU of open maps)."""

    def __init__(self, array_dir: Path, chunk_tokens: int, shard_tokens: int, dtype: np.dtype, row_shape: tuple):
        self.array_dir = array_dir
        self.chunk_tokens = chunk_tokens
        self.shard_tokens = shard_tokens
        self.dtype = dtype
        self.row_shape = row_shape
        self._open: OrderedDict[int, RawShard] = OrderedDict()
        self._lock = threading.Lock()  # get_batch reads from several threads

    def shard_path(self, k: int) -> Path:
        return self.array_dir.joinpath("c", str(k), *(["0"] * len(self.row_shape)))

    def shard(self, k: int) -> RawShard:
        with self._lock:
            s = self._open.get(k)
            if s is not None:
                self._open.move_to_end(k)
                return s
        s = RawShard(self.shard_path(k), self.chunk_tokens, self.shard_tokens, self.dtype, self.row_shape)
        with self._lock:
            s = self._open.setdefault(k, s)
            self._open.move_to_end(k)
            if len(self._open) > MAX_OPEN_SHARDS:
                self._open.popitem(last=False)
        return s

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start:stop; a view when they sit in one shard, one copy when they cross shards."""
        S = self.shard_tokens
        pieces = []
        pos = start
        while pos < stop:
            k = pos // S
            end = min(stop, (k + 1) * S)
            pieces.append(self.shard(k).rows_view(pos - k * S, end - k * S))
            pos = end
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
