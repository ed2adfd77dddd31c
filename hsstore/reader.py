"""StoreReader: random access to samples of a store, local or remote.

Opening reads only small metadata (the manifest, each part's commit record and sample table), so a
store of any size opens in well under a second per million samples. `reader[i]` returns torch
tensors: `raw` arrays as zero-copy views of memory-mapped shards (local stores), compressed arrays
decoded through zarr's codec pipeline (crc32c-checked). With `decode=False`, quantized roles (fp8, mxfp4,
mxfp6) come back as their stored payload and `_scale` arrays, so the trainer decodes them on the GPU
(`hsstore.train.loader.to_device` calls the role's codec).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import zarr
from zarr.core.sync import sync

from . import dtypes, layout
from .codecs import get_codec
from .commit import CommitRecord
from .errors import CorruptStoreError, NotAStoreError
from .layout import TokenArray
from .manifest import MANIFEST_KEY, Manifest
from .shardfile import LocalArray, chunk_decoder
from .storage import local_path, open_store


@dataclass(frozen=True)
class SampleIndex:
    """The per-sample table of the whole store, as numpy arrays (global sample order: part by part)."""

    part: np.ndarray  # int32
    offset: np.ndarray  # int64, row within the part
    length: np.ndarray  # int32
    loss_tokens: np.ndarray  # int32
    source: np.ndarray  # object: source names
    content_hash: np.ndarray  # uint64

    def __len__(self) -> int:
        return len(self.length)


class PartReader:
    """One committed part: its arrays and the extent its commit record vouches for."""

    def __init__(
        self, group: zarr.Group, where: str, manifest: Manifest, arrays: list[TokenArray], root, location: str = ""
    ):
        self.group = group
        self.where = where
        self.location = location
        self.shard_tokens = manifest.geometry.shard_tokens
        self._present: set[tuple[str, int]] = set()  # (array, shard) whose file was seen to exist
        self.commit = CommitRecord.from_attrs(group.attrs.get(layout.COMMIT_KEY), where)
        self.arrays = {}
        for a in arrays:
            try:
                self.arrays[a.name] = group[a.name]
            except KeyError:
                raise CorruptStoreError(f"{where}: array {a.name!r} is missing") from None
        # local stores: shard files read directly (zarr's per-call overhead dominated sample reads)
        self.local_arrays: dict[str, LocalArray] = {}
        if root is not None:
            g = manifest.geometry
            for a in arrays:
                self.local_arrays[a.name] = LocalArray(
                    root / where / a.name,
                    g.chunk_tokens,
                    g.shard_tokens,
                    a.stored.dtype,
                    a.stored.per_token_shape,
                    chunk_decoder(a.stored.compressors),
                )
        for name, arr in self.arrays.items():
            if arr.shape[0] < self.commit.tokens:
                raise CorruptStoreError(
                    f"{where}/{name}: holds {arr.shape[0]} rows but the commit record names {self.commit.tokens}"
                )

    def sample_column(self, name: str) -> np.ndarray:
        arr = self.group[f"{layout.SAMPLES_GROUP}/{name}"]
        if arr.shape[0] < self.commit.samples:
            raise CorruptStoreError(
                f"{self.where}/samples/{name}: {arr.shape[0]} rows but the commit record names {self.commit.samples}"
            )
        return np.asarray(arr[: self.commit.samples]) if self.commit.samples else np.zeros(0, arr.dtype)

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        local = self.local_arrays.get(name)
        try:
            if local is not None:
                return local.read(start, stop)
            self._check_shards_exist(name, start, stop)
            return np.asarray(self.arrays[name][start:stop])
        except CorruptStoreError:
            raise
        except Exception as e:  # zarr raises ValueError/RuntimeError on checksum or decode failures
            raise CorruptStoreError(
                f"{self._bad_shard_file(name, start, stop)} (rows {start}:{stop}): {type(e).__name__}: {e}; "
                "run `hsstore verify` and regenerate"
            ) from e

    def _bad_shard_file(self, name: str, start: int, stop: int) -> str:
        """The shard file a failed read came from (re-read shard by shard, only on this error path)."""
        shards = self._shards(start, stop)
        for k in shards:
            lo, hi = max(start, k * self.shard_tokens), min(stop, (k + 1) * self.shard_tokens)
            try:
                self.arrays[name][lo:hi]
            except Exception:
                return self._shard_file(name, k)
        return ", ".join(self._shard_file(name, k) for k in shards)

    def _shards(self, start: int, stop: int) -> range:
        return range(start // self.shard_tokens, (max(stop, start + 1) - 1) // self.shard_tokens + 1)

    def _shard_key(self, name: str, k: int) -> str:
        arr = self.arrays[name]
        return f"{arr.path}/{arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))}"

    def _shard_file(self, name: str, k: int) -> str:
        return f"{self.location.rstrip('/')}/{self._shard_key(name, k)}"

    def _check_shards_exist(self, name: str, start: int, stop: int) -> None:
        """zarr reads a missing shard as fill values; every committed shard slot was written, so it is corruption."""
        for k in self._shards(start, stop):
            if (name, k) in self._present or stop <= start:
                continue
            if not sync(self.arrays[name].store.exists(self._shard_key(name, k))):
                raise CorruptStoreError(
                    f"{self._shard_file(name, k)}: shard file is missing; run `hsstore verify` and regenerate"
                )
            self._present.add((name, k))


class StoreReader:
    """Random-access reader over every committed sample of a store."""

    def __init__(self, location: str, *, decode: bool = True, mmap: bool = True) -> None:
        self.location = str(location)
        self.decode = decode
        path = local_path(self.location)
        if path is not None and not path.exists():
            raise NotAStoreError(f"{self.location}: no such file or directory")
        self._store = open_store(self.location, read_only=True)
        try:
            self._root = zarr.open_group(self._store, mode="r", zarr_format=3)
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise NotAStoreError(f"{self.location}: not a Zarr v3 group, so not an hsstore store ({e})") from None
        if MANIFEST_KEY not in self._root.attrs:
            raise NotAStoreError(f"{self.location}: a zarr group without an hsstore manifest")
        self.manifest = Manifest.from_dict(dict(self._root.attrs[MANIFEST_KEY]), where=self.location)
        self.arrays = layout.token_arrays(self.manifest)
        self.parts: list[PartReader] = []
        for rank in range(self.manifest.num_parts):
            p = layout.part_path(rank)
            if p in self._root:
                self.parts.append(
                    PartReader(
                        self._root[p], p, self.manifest, self.arrays, path if (mmap and path) else None, self.location
                    )
                )
        lengths = [p.commit.samples for p in self.parts]
        self._part_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._offsets = [p.sample_column("offset") for p in self.parts]
        self._lengths = [p.sample_column("length") for p in self.parts]
        self._check_sample_tables()

    def _check_sample_tables(self) -> None:
        for p, off, ln in zip(self.parts, self._offsets, self._lengths, strict=True):
            if len(off) and (off[0] != 0 or not np.array_equal(off[1:], (off + ln)[:-1])):
                raise CorruptStoreError(f"{self.location}/{p.where}: sample offsets are not contiguous")
            if int(ln.sum(dtype=np.int64)) != p.commit.tokens:
                raise CorruptStoreError(
                    f"{self.location}/{p.where}: sample lengths sum to {int(ln.sum())}, commit says {p.commit.tokens}"
                )

    # --- sizes ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._part_starts[-1])

    @property
    def num_tokens(self) -> int:
        return sum(p.commit.tokens for p in self.parts)

    @property
    def num_loss_tokens(self) -> int:
        return sum(p.commit.loss_tokens for p in self.parts)

    @property
    def commits(self) -> list[CommitRecord]:
        return [p.commit for p in self.parts]

    @cached_property
    def index(self) -> SampleIndex:
        """The per-sample table (lengths, loss tokens, sources, hashes) without touching token data."""
        parts = np.concatenate(
            [np.full(p.commit.samples, i, dtype=np.int32) for i, p in enumerate(self.parts)] or [np.zeros(0, np.int32)]
        )

        def cat(name: str, dtype) -> np.ndarray:
            cols = [p.sample_column(name) for p in self.parts]
            return np.concatenate(cols).astype(dtype, copy=False) if cols else np.zeros(0, dtype)

        sources = [
            np.asarray(p.commit.source_names, dtype=object)[p.sample_column("source")]
            if p.commit.samples
            else np.zeros(0, dtype=object)
            for p in self.parts
        ]
        return SampleIndex(
            part=parts,
            offset=np.concatenate(self._offsets or [np.zeros(0, np.int64)]),
            length=np.concatenate(self._lengths or [np.zeros(0, np.int32)]),
            loss_tokens=cat("loss_tokens", np.int32),
            source=np.concatenate(sources) if sources else np.zeros(0, dtype=object),
            content_hash=cat("content_hash", np.uint64),
        )

    @cached_property
    def sample_ids(self) -> np.ndarray:
        """Original sample ids (strings); loaded on first use only."""
        cols = [p.sample_column("sample_id") for p in self.parts]
        return np.concatenate(cols).astype(object) if cols else np.zeros(0, dtype=object)

    def token_freq(self) -> np.ndarray:
        """Loss-masked counts of every target token id, summed over parts."""
        total = np.zeros(self.manifest.target.vocab_size, dtype=np.int64)
        for p in self.parts:
            freq = np.asarray(p.group[layout.TOKEN_FREQ][:], dtype=np.int64)
            if int(freq.sum()) != p.commit.loss_tokens:
                from .writer import recount_token_freq

                freq = recount_token_freq(p.arrays["input_ids"], p.arrays["loss_mask"], p.commit.tokens, len(total))
            total += freq
        return total

    # --- samples ----------------------------------------------------------------------------
    def locate(self, i: int) -> tuple[int, int, int]:
        """Global sample index -> (part, first row, length)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {self.location} with {n} samples")
        i %= n
        part = int(np.searchsorted(self._part_starts, i, side="right")) - 1
        local = i - int(self._part_starts[part])
        return part, int(self._offsets[part][local]), int(self._lengths[part][local])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        part, start, length = self.locate(int(i))
        return self.read_rows(part, start, start + length)

    def read_rows(self, part: int, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows start:stop of one part: input_ids, loss_mask, one tensor per hidden role and, for a store
        with a top-k teacher, teacher_ids [n, k] int32 and teacher_logprobs [n, k] (float16 as stored)."""
        p = self.parts[part]
        out: dict[str, torch.Tensor] = {
            "input_ids": torch.from_numpy(p.read("input_ids", start, stop)),
            "loss_mask": torch.from_numpy(p.read("loss_mask", start, stop)),
        }
        for spec in self.manifest.hidden:
            codec = get_codec(spec.codec)
            stored = {}
            for s in codec.stored_arrays(spec.per_token_shape, spec.logical_dtype):
                rows = p.read(layout.hidden_array_name(spec.role, s.suffix), start, stop)
                # lossless codecs store the logical dtype's bits; quantized ones their own arrays
                stored[s.suffix] = (
                    dtypes.from_storage(rows, spec.logical_dtype) if codec.lossless else torch.from_numpy(rows)
                )
            if self.decode or codec.lossless:
                out[spec.role] = codec.decode(stored, spec.logical_dtype)
            else:
                for suffix, t in stored.items():
                    out[spec.role + suffix] = t
        if self.manifest.teacher is not None:
            out.update(self._teacher_rows(p, start, stop))
        return out

    def _teacher_rows(self, p: PartReader, start: int, stop: int) -> dict[str, torch.Tensor]:
        """teacher_ids int32 (uint16 ids widened: torch indexes with signed ints) and teacher_logprobs as stored."""
        ids = p.read(layout.TEACHER_IDS, start, stop)
        return {
            "teacher_ids": torch.from_numpy(ids.astype(np.int32, copy=False)),
            "teacher_logprobs": torch.from_numpy(p.read(layout.TEACHER_LOGPROBS, start, stop)),
        }

    def get_batch(self, ids: Sequence[int], threads: int = 1) -> list[dict[str, torch.Tensor]]:
        """Many samples; `threads` > 1 overlaps decompression (blosc and zstd release the GIL)."""
        if threads <= 1:
            return [self[i] for i in ids]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(self.__getitem__, ids))

    def close(self) -> None:
        """Drop the shard mappings now (tensors already handed out keep theirs alive)."""
        for p in self.parts:
            for arr in p.local_arrays.values():
                arr.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterable[dict[str, torch.Tensor]]:
        for i in range(len(self)):
            yield self[i]
