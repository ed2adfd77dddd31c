"""Direct reads of local shard files: memory-map, validate the index, slice or decode chunks.

A shard is the Zarr v3 sharding codec's layout: inner chunks, then an index of (offset, nbytes)
pairs with a crc32c (index at the end). zarr's own read path costs ~2 ms per call in its async
machinery (~0.2 ms per chunk), which dominated whole-sample reads (benchmarks/store_bench.py), so
local stores read shards here instead; remote stores still go through zarr.

- `raw` chunks are plain little-endian bytes laid back to back (whole shards are written at once),
  so rows r0:r1 of a shard are one byte range: the reader hands out views of the mapping (zero copy).
- Compressed chunks end with a crc32c (zarr's crc32c codec), checked here before numcodecs decodes
  them, straight into the output array when a chunk lies wholly inside the requested rows. Blosc's
  decompress is called directly (the Codec class's buffer checks cost a third of a 32 KiB chunk's
  decode); zstd chunks go through one reused zstandard context per thread, as numcodecs builds a
  context per call (~10 us, most of the cost of a sample's 64-token input_ids and loss_mask chunks).
"""

from __future__ import annotations

import mmap
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import crc32c
import numcodecs
import numcodecs.blosc
import numpy as np
import zstandard
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from .errors import CorruptStoreError, IncompatibleStoreError
from .layout import shard_chunk_key

EMPTY = np.uint64(2**64 - 1)
MAX_OPEN_SHARDS = 512

Decompress = Callable[[Any, np.ndarray], Any]  # (compressed bytes, contiguous destination) -> fills it
CompressChunks = Callable[[np.ndarray], Sequence[Any]]  # [chunks, values] contiguous -> a compressed buffer per chunk


def corrupt(path: Path, what: str) -> CorruptStoreError:
    return CorruptStoreError(f"{path}: {what}; run `hsstore verify` and regenerate the affected part")


_zstd_contexts = threading.local()


def zstd_decompress(source: Any, dest: np.ndarray) -> None:
    """One zstd frame into `dest` (contiguous), through this thread's reused context (contexts are not thread-safe)."""
    dctx = getattr(_zstd_contexts, "dctx", None)
    if dctx is None:
        dctx = _zstd_contexts.dctx = zstandard.ZstdDecompressor()
    try:
        out = dctx.decompress(source, max_output_size=dest.nbytes)
    except zstandard.ZstdError as e:
        raise ValueError(str(e)) from e
    if len(out) != dest.nbytes:
        raise ValueError(f"decodes to {len(out)} bytes, expected {dest.nbytes}")
    dest.reshape(-1).view(np.uint8)[:] = np.frombuffer(out, dtype=np.uint8)


def chunk_decoder(compressors: Sequence[Any]) -> Decompress | None:
    """The decompress function for a StoredArray's zarr compressors (None for raw bytes).

    Only the chains hsstore writes are accepted: [], [blosc, crc32c], [zstd, crc32c].
    """
    if not compressors:
        return None
    if len(compressors) == 2 and isinstance(compressors[1], Crc32cCodec):
        if isinstance(compressors[0], BloscCodec):
            return numcodecs.blosc.decompress  # blosc buffers carry their own parameters
        if isinstance(compressors[0], ZstdCodec):
            return zstd_decompress
    raise IncompatibleStoreError(f"no direct decoder for codec chain {list(compressors)}")


def _zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's reused context for `level`; numcodecs builds a context per call (~9 us, most of a small chunk's
    cost). Frames carry the content size in the header and no checksum: what numcodecs writes."""
    contexts = getattr(_zstd_contexts, "cctx", None)
    if contexts is None:
        contexts = _zstd_contexts.cctx = {}
    cctx = contexts.get(level)
    if cctx is None:
        cctx = contexts[level] = zstandard.ZstdCompressor(level=level)
    return cctx


def zstd_compress_chunks(chunks: np.ndarray, level: int) -> Sequence[Any]:
    """One zstd frame per row of `chunks` [n, ...] (contiguous), the bytes numcodecs' Zstd gives for each row, in one
    call that releases the GIL once for all of them instead of once per chunk: each re-acquire can make a forward
    pass that runs Python (vLLM's scheduler) wait for the GIL."""
    n, size = len(chunks), chunks.nbytes // len(chunks)
    segments = np.empty((n, 2), dtype=np.uint64)
    segments[:, 0] = np.arange(n, dtype=np.uint64) * np.uint64(size)
    segments[:, 1] = size
    frames = _zstd_compressor(level).multi_compress_to_buffer(zstandard.BufferWithSegments(chunks, segments.tobytes()))
    return [frames[i] for i in range(n)]


def chunk_encoder(compressors: Sequence[Any]) -> CompressChunks | None:
    """The compress function matching a StoredArray's zarr compressors (None for raw bytes)."""
    if not compressors:
        return None
    first = compressors[0]
    if isinstance(first, BloscCodec):
        shuffle = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE}[first.shuffle.value]
        blosc = numcodecs.Blosc(cname=first.cname.value, clevel=first.clevel, shuffle=shuffle)
        # blosc has no batch call; it reads the typesize from each row's itemsize
        return lambda chunks: [bytes(blosc.encode(chunk)) for chunk in chunks]
    if isinstance(first, ZstdCodec):
        return partial(zstd_compress_chunks, level=first.level)
    raise IncompatibleStoreError(f"no direct encoder for codec chain {list(compressors)}")


def encode_shard(rows: np.ndarray, chunk_tokens: int, shard_tokens: int, encoder: CompressChunks | None) -> bytes:
    """Rows [n <= shard_tokens, ...] -> the bytes zarr's sharding codec would write for that shard slot.

    Same layout as zarr (chunks in order, a trailing zero-padded last chunk, index at the end with
    crc32c; compressed chunks end with their own crc32c), built in one pass: zarr's per-chunk write
    path cost ~150 us a chunk, which capped the writer near 50-100k tokens/s (generate_bench.py).
    Raw chunks are the rows' bytes as they lie (one copy, into the result); compressed chunks are
    encoded in one call per shard where the codec allows (zstd). The writer runs this beside the
    forward pass, holding the GIL for its Python steps, so those are kept few.
    """
    n_chunks = shard_tokens // chunk_tokens
    used = -(-len(rows) // chunk_tokens)
    data = np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<"))
    if used * chunk_tokens > len(rows):  # zarr pads the last chunk with the fill value (0)
        pad = np.zeros((used * chunk_tokens - len(rows), *rows.shape[1:]), data.dtype)
        data = np.concatenate([data, pad])
    if encoder is None:
        pieces: list[Any] = [memoryview(data).cast("B")]
        sizes = np.full(used, data.nbytes // max(used, 1), dtype="<u8")
    else:
        pieces = []
        for payload in encoder(data.reshape(used, -1)) if used else []:
            pieces += (payload, crc32c.crc32c(payload).to_bytes(4, "little"))
        sizes = np.array([len(p) + 4 for p in pieces[::2]], dtype="<u8")
    index = np.full((n_chunks, 2), EMPTY, dtype="<u8")
    index[:used, 1] = sizes
    index[:used, 0] = np.cumsum(sizes) - sizes
    index_bytes = index.tobytes()
    return b"".join([*pieces, index_bytes, crc32c.crc32c(index_bytes).to_bytes(4, "little")])


class ShardFile:
    """One memory-mapped shard file, validated against its own index."""

    def __init__(self, path: Path, n_chunks: int):
        self.path = path
        index_nbytes = n_chunks * 16 + 4
        try:
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except FileNotFoundError:
            raise corrupt(path, "shard file is missing") from None
        except ValueError:  # an empty file cannot be mapped
            raise corrupt(path, "shard file is empty (truncated write?)") from None
        size = len(self._map)
        if size < index_nbytes:
            raise corrupt(path, f"{size} bytes is too small for a shard index; the file is truncated")
        index_bytes = self._map[size - index_nbytes : size - 4]
        if crc32c.crc32c(index_bytes) != int.from_bytes(self._map[size - 4 : size], "little"):
            raise corrupt(path, "shard index checksum mismatch (truncated or overwritten file)")
        self.index = np.frombuffer(index_bytes, dtype="<u8").reshape(n_chunks, 2)
        present = self.index[:, 0] != EMPTY
        ends = self.index[present, 0] + self.index[present, 1]
        if len(ends) and int(ends.max()) > size - index_nbytes:
            raise corrupt(path, "index points past the end of the file (truncated)")
        self.present_chunks = int(present.sum())
        self._offsets, self._nbytes = self.index[:, 0].tolist(), self.index[:, 1].tolist()  # fast per-chunk lookups
        self._view = memoryview(self._map)

    def chunk(self, i: int) -> memoryview:
        offset = self._offsets[i]
        if offset == int(EMPTY):
            raise corrupt(self.path, f"chunk {i} of a committed row range is missing")
        return self._view[offset : offset + self._nbytes[i]]

    def contiguous_prefix(self, chunk_nbytes: int) -> bool:
        """Whether the present chunks are chunks 0..n-1, in order, back to back from offset 0 (raw layout)."""
        n = self.present_chunks
        expected = np.arange(n, dtype=np.uint64) * np.uint64(chunk_nbytes)
        return (
            bool((self.index[:n, 0] != EMPTY).all())
            and np.array_equal(self.index[:n, 0], expected)
            and bool((self.index[:n, 1] == chunk_nbytes).all())
        )


class RawShard(ShardFile):
    """A raw shard: rows are byte ranges of the mapping."""

    def __init__(self, path: Path, chunk_tokens: int, shard_tokens: int, dtype: np.dtype, row_shape: tuple):
        super().__init__(path, shard_tokens // chunk_tokens)
        self.dtype = dtype
        self.row_shape = row_shape
        self._row_nbytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        if not self.contiguous_prefix(chunk_tokens * self._row_nbytes):
            raise corrupt(path, "raw shard chunks are not laid out back to back (not written by hsstore)")
        self.rows = self.present_chunks * chunk_tokens  # rows backed by bytes (the last chunk may be padding)

    def rows_view(self, r0: int, r1: int) -> np.ndarray:
        if r1 > self.rows:
            raise corrupt(self.path, f"rows {r0}:{r1} requested but the shard holds {self.rows}")
        count = (r1 - r0) * self._row_nbytes // self.dtype.itemsize
        arr = np.frombuffer(self._map, dtype=self.dtype, count=count, offset=r0 * self._row_nbytes)
        return arr.reshape(r1 - r0, *self.row_shape)

    def data_crc32c(self) -> int:
        return crc32c.crc32c(memoryview(self._map)[: self.rows * self._row_nbytes])


class LocalArray:
    """Row ranges of one token-major array of one part, read from its shard files (LRU of open maps)."""

    def __init__(
        self,
        array_dir: Path,
        chunk_tokens: int,
        shard_tokens: int,
        dtype: np.dtype,
        row_shape: tuple,
        decompress: Decompress | None,
    ):
        self.array_dir = array_dir
        self.chunk_tokens = chunk_tokens
        self.shard_tokens = shard_tokens
        self.dtype = dtype
        self.row_shape = tuple(row_shape)
        self.decompress = decompress
        self._open: OrderedDict[int, ShardFile] = OrderedDict()
        self._lock = threading.Lock()  # get_batch reads from several threads

    def shard_path(self, k: int) -> Path:
        return self.array_dir / shard_chunk_key(k, len(self.row_shape))

    def shard(self, k: int) -> ShardFile:
        with self._lock:
            s = self._open.get(k)
            if s is not None:
                self._open.move_to_end(k)
                return s
        path = self.shard_path(k)
        if self.decompress is None:
            s = RawShard(path, self.chunk_tokens, self.shard_tokens, self.dtype, self.row_shape)
        else:
            s = ShardFile(path, self.shard_tokens // self.chunk_tokens)
        with self._lock:
            s = self._open.setdefault(k, s)
            self._open.move_to_end(k)
            if len(self._open) > MAX_OPEN_SHARDS:
                self._open.popitem(last=False)
        return s

    def close(self) -> None:
        with self._lock:
            self._open.clear()

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start:stop. Raw: a view when they sit in one shard. Compressed: decoded into one array."""
        if self.decompress is None:
            pieces = [self.shard(k).rows_view(lo, hi) for k, lo, hi in self._spans(start, stop, self.shard_tokens)]
            return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        out = np.empty((stop - start, *self.row_shape), dtype=self.dtype)
        C = self.chunk_tokens
        per_shard = self.shard_tokens // C
        for c, lo, hi in self._spans(start, stop, C):
            self._decode_chunk(c // per_shard, c % per_shard, lo, hi, out[c * C + lo - start : c * C + hi - start])
        return out

    def _decode_chunk(self, k: int, i: int, lo: int, hi: int, dest: np.ndarray) -> None:
        shard = self.shard(k)
        data = shard.chunk(i)
        payload, stored = data[:-4], int.from_bytes(data[-4:], "little")
        if crc32c.crc32c(payload) != stored:
            raise corrupt(shard.path, f"chunk {i} fails its crc32c checksum")
        try:
            if lo == 0 and hi == self.chunk_tokens:
                self.decompress(payload, dest)
            else:
                full = np.empty((self.chunk_tokens, *self.row_shape), dtype=self.dtype)
                self.decompress(payload, full)
                dest[...] = full[lo:hi]
        except (RuntimeError, ValueError) as e:
            raise corrupt(shard.path, f"chunk {i} does not decode ({e})") from e

    @staticmethod
    def _spans(start: int, stop: int, size: int) -> list[tuple[int, int, int]]:
        """Blocks of `size` rows touched by start:stop, as (block, first row in it, end row in it)."""
        spans = []
        pos = start
        while pos < stop:
            b = pos // size
            end = min(stop, (b + 1) * size)
            spans.append((b, pos - b * size, end - b * size))
            pos = end
        return spans
