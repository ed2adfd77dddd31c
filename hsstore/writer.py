"""StoreWriter: append samples, write whole shards in the background, commit, resume.

One writer owns one part (a data-parallel rank). Samples are buffered token-major until a shard
boundary; each full shard is encoded and written by a background thread (overlapping the caller's
forward pass). Quantizing codecs (fp8, mx*) encode there too, a whole shard slot of a role per call:
append checks the tensor's bits and buffers them (a copy, or with copy=False a view), so the caller's
thread pays neither the encode nor a GIL hand-off per sample. The bookkeeping that makes written
shards count (the array extents, raw checksums, sample table, token_freq, then the commit record:
~25 zarr calls, all but the record sent together) runs at most once per `commit_seconds`, for every
shard written since (a group commit), so small shards do not pay it one by one. `close()` writes
the last, partial shard and commits. Reopening with `resume=True` drops whatever lies past the
commit record and reloads the partial tail into the buffer, so the next shard rewrite (an atomic
file replace) extends it: no holes, no duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Coroutine, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import crc32c
import numpy as np
import torch
import zarr
from zarr.core.sync import sync
from zarr.errors import ContainsGroupError

from . import dtypes, layout
from .codecs import HiddenCodec, ensure_blosc_split, get_codec
from .commit import CommitRecord
from .dtypes import torch_dtype
from .errors import HSStoreError, IncompatibleStoreError, NotAStoreError, SampleError, StoreExistsError
from .layout import TokenArray
from .manifest import MANIFEST_KEY, Manifest
from .shardfile import chunk_encoder, encode_shard
from .storage import local_path, open_store, write_atomic

MAX_PENDING_SHARDS = 2  # bounds memory: shards encoded/written while the caller keeps appending
ENCODE_BYTES = 32 << 20  # input rows per quantizing encode call (its float32 temporaries are a few times this)
# group commit: a crash loses at most this much written work, plus the shards in flight. A commit is ~25 zarr calls,
# run mostly in zarr's event-loop thread, whose Python takes the GIL that a forward pass's Python (vLLM's
# scheduler) also needs: rare commits keep that off the forward
COMMIT_SECONDS = 10.0
TeacherRows = tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]  # (log-probs [n, k], ids [n, k])


@dataclass
class _PendingSample:
    length: int
    loss_tokens: int
    sample_id: str
    source: int
    content_hash: int
    loss_ids: np.ndarray  # target ids under the loss mask, for token_freq


@dataclass(frozen=True)
class _Encoded:
    """Rows of a quantized role that are already encoded ({suffix: rows}): a resumed part's committed tail.

    Buffers slice it like the tensors of new rows (`len`, `[:n]`, `[n:]`); the shard job keeps it as is."""

    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, rows: slice) -> _Encoded:
        return _Encoded({suffix: a[rows] for suffix, a in self.arrays.items()})


# a buffered piece of rows: stored rows, or for a quantized role the logical bits to encode (or encoded rows)
RowPiece = np.ndarray | _Encoded


@dataclass
class _ShardJob:
    start: int  # first row of the shard slot
    rows: dict[str, list[RowPiece]]  # buffer key -> pieces covering rows [start, start + n)
    completed: list[_PendingSample] = field(default_factory=list)


class StoreWriter:
    """Appends samples to one part of a store. Use as a context manager, or call close()."""

    def __init__(
        self,
        location: str,
        manifest: Manifest,
        *,
        rank: int = 0,
        resume: bool = False,
        overwrite: bool = False,
        commit_seconds: float = COMMIT_SECONDS,
    ) -> None:
        """`commit_seconds`: shards written within this long of the last commit wait for the next one
        (0 commits after every shard)."""
        if not 0 <= rank < manifest.num_parts:
            raise IncompatibleStoreError(f"rank {rank} is outside 0..{manifest.num_parts - 1} (num_parts)")
        layout.check_chunk_sizes(manifest)
        ensure_blosc_split()
        self.location = location
        self.rank = rank
        self._store = open_store(location, read_only=False)
        self._local_part = local_path(location)  # the store's directory (None if remote): shards are written there
        self.manifest = self._open_root(manifest, overwrite)
        self._arrays = layout.token_arrays(self.manifest)
        self._shard = self.manifest.geometry.shard_tokens
        self._vocab = self.manifest.target.vocab_size
        self._part, self.commit = self._open_part(resume, overwrite)
        # write_empty_chunks is not persisted: without it zarr drops all-zero chunks, breaking raw layout
        self._zarr = {a.name: self._part[a.name].with_config({"write_empty_chunks": True}) for a in self._arrays}
        self._samples = {name: self._part[f"{layout.SAMPLES_GROUP}/{name}"] for name in layout.SAMPLE_FIELDS}
        self._crc_arrays = {a.name: self._part[f"shard_crc32c/{a.name}"] for a in self._arrays if a.stored.raw_layout}
        self._freq_array = self._part[layout.TOKEN_FREQ]
        self._truncate_to_commit()
        self._token_freq = self._load_token_freq()
        # buffer: rows from self._buffer_start on, not yet handed to a shard job
        self._buffer_start = (self.commit.tokens // self._shard) * self._shard
        # quantized roles (main array name -> spec) buffer their logical bits under one key and encode per shard
        self._quantized = {
            layout.hidden_array_name(h.role): h for h in self.manifest.hidden if not get_codec(h.codec).lossless
        }
        self._buffer: dict[str, list[RowPiece]] = {self._buffer_key(a): [] for a in self._arrays}
        self._buffered_rows = 0
        self._reload_tail()
        self._pending: list[_PendingSample] = []
        self._pending_end_rows: list[int] = []
        self._appended = self.commit.samples  # samples accepted so far, committed or not
        self._rows = self.commit.tokens  # rows accepted so far
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hsstore-writer")
        self._inflight: list[Future] = []
        self._failed: BaseException | None = None  # first background failure: later jobs must not commit
        self._closed = False
        self.commit.closed = False
        self._commit_seconds = commit_seconds
        self._last_commit = time.monotonic()
        self._written_rows = self.commit.tokens  # rows of the shard slots written so far (committed or not)
        self._uncommitted: list[_PendingSample] = []  # samples completed by written shards, awaiting the commit
        self._uncommitted_crcs: dict[str, dict[int, int]] = {}  # raw array -> {shard: crc32c} awaiting the commit
        self._shard_file_bytes: dict[tuple[str, int], int] = {}  # (array, shard) -> size on disk, for progress
        self._shard_logical_bytes: dict[int, int] = {}  # shard -> bf16 bytes of its rows, for progress

    # --- opening ----------------------------------------------------------------------------
    def _open_root(self, manifest: Manifest, overwrite: bool) -> Manifest:
        try:
            root = zarr.open_group(self._store, mode="r+", zarr_format=3)
        except FileNotFoundError:
            root = None
        if root is not None and MANIFEST_KEY not in root.attrs:
            # `parts` alone is another rank's store in the making (zarr may rewrite the root's metadata
            # while ranks race to create it); anything else belongs to someone else
            if set(root.keys()) - {layout.PARTS_GROUP}:
                raise NotAStoreError(f"{self.location} is a zarr group but not an hsstore store; pick another path")
            root = None
        if root is not None and not overwrite:
            existing = Manifest.from_dict(dict(root.attrs[MANIFEST_KEY]), where=self.location)
            manifest.check_same_content(existing, where=self.location)
            return existing
        if overwrite and root is not None and manifest.num_parts == 1:
            root = zarr.open_group(self._store, mode="w", zarr_format=3)
        elif root is None:
            try:
                root = zarr.open_group(self._store, mode="a", zarr_format=3)
            except ContainsGroupError:  # another rank created the root a moment ago: open it as theirs
                return self._open_root(manifest, overwrite)
        root.attrs[MANIFEST_KEY] = manifest.to_dict()
        return manifest

    def _open_part(self, resume: bool, overwrite: bool) -> tuple[zarr.Group, CommitRecord]:
        path = layout.part_path(self.rank)
        root = zarr.open_group(self._store, mode="r+", zarr_format=3)
        if path in root and not overwrite:
            part = root[path]
            commit = CommitRecord.from_attrs(part.attrs.get(layout.COMMIT_KEY), f"{self.location}/{path}")
            if commit.samples and not resume:
                raise StoreExistsError(
                    f"{self.location}/{path} already holds {commit.samples} committed samples; "
                    "pass resume=True (--resume) to continue it or overwrite=True (--overwrite) to replace it"
                )
            return part, commit
        part = root.create_group(path, overwrite=True)
        self._create_arrays(path)
        commit = CommitRecord()
        part.attrs[layout.COMMIT_KEY] = commit.stamped()
        return part, commit

    def _create_arrays(self, path: str) -> None:
        """Every array of a new part, created together: one round trip to zarr's event loop, not one per array."""
        g = self.manifest.geometry
        specs: dict[str, dict[str, Any]] = {}
        for a in self._arrays:
            shape = a.stored.per_token_shape
            specs[a.name] = dict(
                shape=(0, *shape),
                dtype=a.stored.dtype,
                chunks=(g.chunk_tokens, *shape),
                shards=(g.shard_tokens, *shape),
                compressors=a.stored.compressors or None,
                fill_value=0,
                attributes=self._array_attrs(a),
                config={"write_empty_chunks": True},
            )
            if a.stored.raw_layout:
                specs[f"shard_crc32c/{a.name}"] = dict(shape=(0,), dtype="uint32", chunks=(4096,))
        for name, dtype in layout.SAMPLE_FIELDS.items():
            specs[f"{layout.SAMPLES_GROUP}/{name}"] = dict(shape=(0,), dtype=dtype, chunks=(layout.SAMPLE_CHUNK,))
        specs[layout.TOKEN_FREQ] = dict(shape=(self._vocab,), dtype="int64", chunks=(self._vocab,), fill_value=0)

        async def create_all() -> None:
            part = await zarr.api.asynchronous.open_group(store=self._store, path=path, mode="r+", zarr_format=3)
            subgroups = {name.rpartition("/")[0] for name in specs} - {""}
            await asyncio.gather(*(part.create_group(name) for name in subgroups))  # before their arrays
            await asyncio.gather(*(part.create_array(name, **kwargs) for name, kwargs in specs.items()))

        sync(create_all())

    def _array_attrs(self, a: TokenArray) -> dict:
        t = self.manifest.teacher
        if t is not None and a.name in (layout.TEACHER_IDS, layout.TEACHER_LOGPROBS):
            return {"teacher": t.kind, "k": t.k, "layer_ids": [t.layer_id]}
        if a.role is None:
            return {}
        spec = self.manifest.hidden_spec(a.role)
        return {
            "role": a.role,
            "layer_ids": list(spec.layer_ids),
            "codec": spec.codec,
            "logical_dtype": spec.logical_dtype if not a.stored.suffix else str(a.stored.dtype),
        }

    def _truncate_to_commit(self) -> None:
        """Drop whatever a crashed writer left past its last commit record.

        zarr rewrites a shard by merging into the chunks already in its file, so rows of a crashed,
        uncommitted job must leave the last committed shard before it is extended: its uncommitted
        rows become zeros and its uncommitted chunks are dropped (each an atomic shard rewrite that
        keeps the committed chunks), then the arrays shrink to the committed rows, deleting later shards.
        The shard then holds what a clean close would have left, and raw checksums match it again.
        """
        self._adopt_unrecorded_shards()
        tokens = self.commit.tokens
        for arr in self._samples.values():
            if arr.shape[0] != self.commit.samples:
                arr.resize((self.commit.samples,))
        chunk = self.manifest.geometry.chunk_tokens
        tail_start = (tokens // self._shard) * self._shard
        for a in self._arrays:
            arr = self._zarr[a.name]
            extent = arr.shape[0]
            if extent > tokens:
                slot_end = min(extent, tail_start + self._shard) if tokens > tail_start else tokens
                chunk_end = min(slot_end, -(-tokens // chunk) * chunk)
                if tokens < chunk_end:
                    arr[tokens:chunk_end] = 0
                if chunk_end < slot_end:
                    arr.with_config({"write_empty_chunks": False})[chunk_end:slot_end] = 0
                arr.resize((tokens, *arr.shape[1:]))
                if a.stored.raw_layout and tokens > tail_start:
                    tail_crc = self._shard_crc(np.asarray(arr[tail_start:tokens]))
                    self._write_crcs(a.name, {tail_start // self._shard: tail_crc})
            if a.stored.raw_layout:
                crc = self._crc_arrays[a.name]
                n_shards = -(-tokens // self._shard)
                if crc.shape[0] > n_shards:
                    crc.resize((n_shards,))
        path = self._local_part
        if path is not None and not self.commit.closed:  # temp files of atomic writes a kill interrupted (zarr's)
            for leftover in path.joinpath(layout.part_path(self.rank)).rglob("*.partial"):
                leftover.unlink(missing_ok=True)

    def _adopt_unrecorded_shards(self) -> None:
        """Extend each local array over the shard files a crash left past its recorded extent.

        Between group commits a local writer writes shard files beyond the extent the last commit
        recorded; growing the extent over them lets the truncation below drop them like any other
        uncommitted rows (zarr deletes the chunks a shrinking resize leaves outside)."""
        path = self._local_part
        if path is None:
            return
        for a in self._arrays:
            array_dir = path / layout.part_path(self.rank) / a.name
            dims = len(a.stored.per_token_shape)
            names = [p.name for p in array_dir.joinpath("c").iterdir()] if array_dir.joinpath("c").is_dir() else []
            slots = [
                int(name)
                for name in names
                if name.isdigit() and array_dir.joinpath(layout.shard_chunk_key(int(name), dims)).is_file()
            ]
            arr = self._zarr[a.name]
            if slots and (max(slots) + 1) * self._shard > arr.shape[0]:
                arr.resize(((max(slots) + 1) * self._shard, *arr.shape[1:]))

    def _reload_tail(self) -> None:
        """Put committed rows of the last, partial shard back in the buffer to be rewritten whole."""
        tail = self.commit.tokens - self._buffer_start
        if tail <= 0:
            return
        rows = {name: np.asarray(arr[self._buffer_start : self.commit.tokens]) for name, arr in self._zarr.items()}
        for key in self._buffer:
            spec = self._quantized.get(key)
            if spec is None:
                self._buffer[key].append(rows[key])
            else:
                suffixes = get_codec(spec.codec).suffixes
                encoded = {suffix: rows[layout.hidden_array_name(spec.role, suffix)] for suffix in suffixes}
                self._buffer[key].append(_Encoded(encoded))
        self._buffered_rows = tail

    def _buffer_key(self, a: TokenArray) -> str:
        """Stored arrays buffer their own rows; a quantized role's arrays share its main array's key."""
        main = layout.hidden_array_name(a.role) if a.role is not None else a.name
        return main if main in self._quantized else a.name

    def _load_token_freq(self) -> np.ndarray:
        freq = np.asarray(self._freq_array[:], dtype=np.int64)
        if int(freq.sum()) == self.commit.loss_tokens:
            return freq
        # a crash between the freq write and the commit record: recount from committed rows
        freq = recount_token_freq(self._zarr["input_ids"], self._zarr["loss_mask"], self.commit.tokens, self._vocab)
        self._freq_array[:] = freq
        return freq

    # --- appending --------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Samples accepted so far (committed or buffered)."""
        return self._appended

    def committed_sample_ids(self) -> list[str]:
        return [str(s) for s in self._samples["sample_id"][: self.commit.samples]]

    def append(
        self,
        input_ids: torch.Tensor | np.ndarray,
        loss_mask: torch.Tensor | np.ndarray,
        hidden: dict[str, torch.Tensor],
        *,
        sample_id: str | None = None,
        source: str = "",
        teacher: TeacherRows | None = None,
        copy: bool = True,
    ) -> None:
        """Buffer one sample; full shards go to the background writer. What is kept is copied: the caller may
        reuse its arrays as soon as this returns. `copy=False` keeps references instead (no copy on the caller's
        thread; the shard job makes the contiguous one): only for arrays the caller never changes afterwards,
        like the fresh tensors generate's backends return for each batch.

        `teacher` = (log-probs [n, k] float, ids [n, k] int), required iff the manifest declares a top-k
        teacher: row j is the target's top-k at position j, sorted descending. Only teacher positions
        (loss_mask[j + 1] == 1) are stored; other rows are written as zeros, whatever they hold."""
        self._raise_background_error()
        if self._failed is not None:
            raise HSStoreError(
                f"{self.location}: an earlier shard write failed; fix it and rerun with resume=True (--resume)"
            ) from self._failed
        if self._closed:
            raise RuntimeError(f"writer for {self.location} is closed")
        sid = str(sample_id) if sample_id is not None else str(self._appended)
        ids, mask = self._check_tokens(input_ids, loss_mask, sid, copy)
        encoded = {"input_ids": ids, "loss_mask": mask}
        encoded.update(self._encode_hidden(hidden, len(ids), sid, copy))
        encoded.update(self._encode_teacher(teacher, mask, sid))
        for name, rows in encoded.items():
            self._buffer[name].append(rows)
        self._buffered_rows += len(ids)
        self._rows += len(ids)
        loss_ids = ids[mask.view(np.bool_)]  # mask is 0/1 uint8 (checked)
        self._pending.append(
            _PendingSample(
                length=len(ids),
                loss_tokens=len(loss_ids),
                sample_id=sid,
                source=self._source_index(str(source)),
                content_hash=content_hash(ids, mask),
                loss_ids=loss_ids,
            )
        )
        self._pending_end_rows.append(self._rows)
        self._appended += 1
        while self._buffered_rows >= self._shard:
            self._submit(self._take_rows(self._shard))

    def _check_tokens(self, input_ids, loss_mask, sid: str, copy: bool) -> tuple[np.ndarray, np.ndarray]:
        ids = _as_numpy(input_ids)
        mask = _as_numpy(loss_mask)
        where = f"{self.location}: sample {sid!r}"
        if ids.ndim != 1 or mask.ndim != 1:
            raise SampleError(
                f"{where}: input_ids and loss_mask must be 1-D [tokens], got shapes {ids.shape} and {mask.shape}; "
                "append one sample at a time, without a batch dimension"
            )
        if len(ids) == 0:
            raise SampleError(f"{where}: empty sample (0 tokens); drop it before writing")
        if len(mask) != len(ids):
            raise SampleError(
                f"{where}: loss_mask has {len(mask)} tokens but input_ids has {len(ids)}; "
                "they must cover the same tokens, one mask value per token"
            )
        if ids.dtype.kind not in "iu":
            raise SampleError(f"{where}: input_ids must be integers, got {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self._vocab:
            raise SampleError(
                f"{where}: token id {int(ids.max() if ids.max() >= self._vocab else ids.min())} is outside the "
                f"target vocab 0..{self._vocab - 1}; was it tokenized with another tokenizer?"
            )
        if mask.dtype.kind not in "iub" or mask.max(initial=0) > 1 or (mask.dtype.kind == "i" and mask.min() < 0):
            raise SampleError(
                f"{where}: loss_mask must hold only 0/1 (or bool), got {mask.dtype} {np.unique(mask)[:5]}"
            )
        limit = self.manifest.max_seq_length
        if limit is not None and len(ids) > limit:
            raise SampleError(f"{where}: {len(ids)} tokens exceeds max_seq_length {limit}; truncate it first")
        return ids.astype(np.int32, copy=copy), mask.astype(np.uint8, copy=copy)

    def _encode_hidden(self, hidden: dict[str, torch.Tensor], n: int, sid: str, copy: bool) -> dict[str, RowPiece]:
        where = f"{self.location}: sample {sid!r}"
        expected = set(self.manifest.roles)
        if not isinstance(hidden, Mapping):
            raise SampleError(f"{where}: hidden must be a dict role -> tensor (roles {sorted(expected)})")
        if set(hidden) != expected:
            missing, extra = sorted(expected - set(hidden)), sorted(set(hidden) - expected)
            raise SampleError(
                f"{where}: hidden states for roles {sorted(hidden)}, the store needs {sorted(expected)} "
                f"(missing {missing}, unexpected {extra}); capture the layers the manifest declares"
            )
        out: dict[str, RowPiece] = {}
        for spec in self.manifest.hidden:
            t = hidden[spec.role]
            if not isinstance(t, torch.Tensor):
                raise SampleError(f"{where}: hidden[{spec.role!r}] must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != (n, *spec.per_token_shape):
                raise SampleError(
                    f"{where}: hidden[{spec.role!r}] has shape {tuple(t.shape)}, expected "
                    f"{(n, *spec.per_token_shape)} (tokens, {'layers, ' if len(spec.layer_ids) > 1 else ''}hidden)"
                )
            if not t.is_floating_point():
                raise SampleError(
                    f"{where}: hidden[{spec.role!r}] must be floating point, got {t.dtype}; "
                    f"pass the target's activations as they come out of the model ({spec.logical_dtype} or float32)"
                )
            # every codec stores the logical values or encodes them: check those bits here, for all codecs
            logical = spec.logical_dtype
            bits = dtypes.to_storage(t, logical, copy=True) if copy else dtypes.storage_view(t, logical)
            if not dtypes.all_finite(bits, logical):
                bad_tokens = (~torch.isfinite(t)).reshape(n, -1).any(dim=1).nonzero()
                at = (
                    f"first at token {int(bad_tokens[0, 0])}"
                    if len(bad_tokens)
                    else f"after casting to {spec.logical_dtype}"
                )
                raise SampleError(
                    f"{where}: hidden[{spec.role!r}] holds NaN/inf ({at}); "
                    "check the target's dtype (fp16 overflow?) and skip this sample"
                )
            # lossless codecs store the logical bits as they are (what the reader assumes too); quantizing ones encode
            # them with their shard slot, on the writer's thread
            out[layout.hidden_array_name(spec.role)] = bits
        return out

    def _encode_teacher(self, teacher: TeacherRows | None, mask: np.ndarray, sid: str) -> dict[str, np.ndarray]:
        """Checked, floored and cast top-k rows, zeroed off the teacher positions."""
        spec = self.manifest.teacher
        where = f"{self.location}: sample {sid!r}"
        if spec is None:
            if teacher is not None:
                raise SampleError(f"{where}: a teacher was passed but the store's manifest declares none")
            return {}
        if teacher is None:
            raise SampleError(
                f"{where}: the store keeps a top-{spec.k} teacher and none was passed; "
                f"pass teacher=(logprobs [n, {spec.k}], ids [n, {spec.k}])"
            )
        if not isinstance(teacher, tuple | list) or len(teacher) != 2:
            raise SampleError(f"{where}: teacher must be a pair (logprobs, ids), got {type(teacher).__name__}")
        logprobs, ids = (_as_numpy(x) for x in teacher)
        n, k = len(mask), spec.k
        for name, arr in (("logprobs", logprobs), ("ids", ids)):
            if arr.shape != (n, k):
                raise SampleError(f"{where}: teacher {name} has shape {arr.shape}, expected {(n, k)} (tokens, k)")
        if ids.dtype.kind not in "iu":
            raise SampleError(f"{where}: teacher ids must be integers, got {ids.dtype}")
        if not np.issubdtype(logprobs.dtype, np.floating):
            raise SampleError(f"{where}: teacher logprobs must be floating point, got {logprobs.dtype}")
        rows = teacher_positions(mask)
        ids, logprobs = ids[rows], logprobs[rows].astype(np.float32)
        if ids.size and (ids.min() < 0 or ids.max() >= self._vocab):
            bad = int(ids.max() if ids.max() >= self._vocab else ids.min())
            raise SampleError(f"{where}: teacher token id {bad} is outside the target vocab 0..{self._vocab - 1}")
        if np.isnan(logprobs).any() or (logprobs > 1e-3).any():  # -inf is a log-prob (of 0); the floor takes it
            raise SampleError(f"{where}: teacher logprobs must be log-probabilities (<= 0, no NaN/+inf)")
        stored_lp = np.clip(logprobs, spec.logprob_floor, 0.0).astype(spec.logprob_dtype)
        if (np.diff(stored_lp.astype(np.float32), axis=1) > 0).any():
            raise SampleError(f"{where}: teacher rows must be sorted by log-prob, largest first (as torch.topk gives)")
        if k > 1 and (np.diff(np.sort(ids, axis=1), axis=1) == 0).any():
            raise SampleError(f"{where}: a teacher row repeats a token id")
        out_ids = np.zeros((n, k), dtype=spec.ids_dtype)
        out_lp = np.zeros((n, k), dtype=spec.logprob_dtype)
        out_ids[rows], out_lp[rows] = ids, stored_lp
        return {layout.TEACHER_IDS: out_ids, layout.TEACHER_LOGPROBS: out_lp}

    def _source_index(self, source: str) -> int:
        names = self.commit.source_names
        if source not in names:
            names.append(source)
        return names.index(source)

    def _take_rows(self, n: int) -> _ShardJob:
        """Cut the first n buffered rows (one shard slot) into a job with the samples they complete."""
        job = _ShardJob(start=self._buffer_start, rows={})
        for name, pieces in self._buffer.items():
            job.rows[name], self._buffer[name] = _split_pieces(pieces, n)
        self._buffer_start += n
        self._buffered_rows -= n
        done = 0
        while done < len(self._pending_end_rows) and self._pending_end_rows[done] <= self._buffer_start:
            done += 1
        job.completed, self._pending = self._pending[:done], self._pending[done:]
        self._pending_end_rows = self._pending_end_rows[done:]
        if n < self._shard:
            # a partial shard is rewritten by the next writer: keep its rows buffered
            for name, pieces in job.rows.items():
                self._buffer[name] = [*pieces, *self._buffer[name]]
            self._buffer_start = job.start
            self._buffered_rows += n
        return job

    def _submit(self, job: _ShardJob) -> None:
        while len(self._inflight) >= MAX_PENDING_SHARDS:
            self._inflight.pop(0).result()
        self._inflight.append(self._pool.submit(self._write_job, job))

    def _raise_background_error(self) -> None:
        """A finished job's failure, raised on the caller's thread. Once a job has failed (it sets `_failed`, then
        commits what came before it), wait for it: the caller must see its cause, not the refusal of a later one."""
        failed = self._failed is not None
        for f in [f for f in self._inflight if failed or f.done()]:
            self._inflight.remove(f)
            f.result()

    # --- the background half: shard, sample table, commit -----------------------------------
    def _write_job(self, job: _ShardJob) -> None:
        """Run one job; after a failure no later job runs, or its samples would be committed at the
        offsets of the failed job's samples (the commit record only moves past complete work)."""
        slot = job.start // self._shard
        if self._failed is not None:
            raise HSStoreError(
                f"{self.location}: shard slot {slot} not written, an earlier shard write failed"
            ) from self._failed
        try:
            self._write_shard_and_commit(job)
        except BaseException as e:
            self._failed = e
            with contextlib.suppress(Exception):  # keep the shards written before this one, if the disk lets us
                self._commit()
            raise HSStoreError(
                f"{self.location}/{layout.part_path(self.rank)}: writing shard slot {slot} failed "
                f"({type(e).__name__}: {e}); the {self.commit.samples} committed samples are intact: "
                "fix the cause and rerun with resume=True (--resume)"
            ) from e

    def _write_shard_and_commit(self, job: _ShardJob) -> None:
        self._write_shard(job)
        if time.monotonic() - self._last_commit >= self._commit_seconds:
            self._commit()

    def _write_shard(self, job: _ShardJob) -> None:
        """Write one shard slot of every token array; the samples it completes wait for the next commit."""
        # the copy into one shard-sized array happens here, off the caller's (forward pass's) thread
        rows: dict[str, np.ndarray] = {}
        for key, pieces in job.rows.items():
            spec = self._quantized.get(key)
            if spec is None:
                rows[key] = np.concatenate(pieces) if len(pieces) > 1 else np.ascontiguousarray(pieces[0])
            else:
                for suffix, encoded in _encode_pieces(get_codec(spec.codec), pieces, spec.logical_dtype).items():
                    rows[layout.hidden_array_name(spec.role, suffix)] = encoded
        n = len(rows["input_ids"])
        shard_index = job.start // self._shard
        crcs = {}
        for a in self._arrays:
            self._write_rows(a, job.start, rows[a.name])
            if a.stored.raw_layout:
                crcs[a.name] = self._shard_crc(rows[a.name])
        # the slot is on disk: only now does it join what the next commit publishes
        for name, crc in crcs.items():
            self._uncommitted_crcs.setdefault(name, {})[shard_index] = crc
        self._shard_logical_bytes[shard_index] = n * self._logical_row_bytes
        self._written_rows = job.start + n
        self._uncommitted.extend(job.completed)

    def _commit(self, *, closed: bool = False) -> None:
        """Make every shard written so far count: extents, raw checksums, sample table, token_freq, then
        the commit record, the one write that publishes them (in memory too, only once it is on disk).
        The writes before the record go to zarr together, in one round trip to its event loop."""
        writes = [_extend(self._zarr[a.name], self._written_rows) for a in self._arrays]
        writes += [self._crc_write(name, crcs) for name, crcs in self._uncommitted_crcs.items()]
        done = list(self._uncommitted)
        record = replace(self.commit, closed=closed)  # shares source_names, which append extends
        freq = self._token_freq
        if done:
            writes += self._sample_writes(done)
            freq = freq + np.bincount(np.concatenate([s.loss_ids for s in done]), minlength=self._vocab)
            writes.append(self._freq_array.async_array.setitem(slice(None), freq))
        _concurrently(writes)
        if done:
            record.samples += len(done)
            record.tokens += sum(s.length for s in done)
            record.loss_tokens += sum(s.loss_tokens for s in done)
        record.shards = -(-record.tokens // self._shard)
        self._part.attrs[layout.COMMIT_KEY] = record.stamped()
        self.commit, self._token_freq = record, freq
        del self._uncommitted[: len(done)]
        self._uncommitted_crcs = {}
        self._last_commit = time.monotonic()

    def _write_rows(self, a: TokenArray, start: int, rows: np.ndarray) -> None:
        """One shard slot: local stores get the shard's bytes built in one pass (an atomic file replace,
        past the recorded extent until the commit), remote ones go through zarr (extent first)."""
        if self._local_part is None:
            arr = self._zarr[a.name]
            if arr.shape[0] < start + len(rows):
                arr.resize((start + len(rows), *arr.shape[1:]))
            arr[start : start + len(rows)] = rows
            return
        g = self.manifest.geometry
        shard_index = start // g.shard_tokens
        data = encode_shard(rows, g.chunk_tokens, g.shard_tokens, self._encoders[a.name])
        key = layout.shard_chunk_key(shard_index, len(a.stored.per_token_shape))
        write_atomic(self._local_part / layout.part_path(self.rank) / a.name / key, data)
        self._shard_file_bytes[(a.name, shard_index)] = len(data)  # for progress: the file is exactly this

    @cached_property
    def _encoders(self) -> dict[str, Any]:
        return {a.name: chunk_encoder(a.stored.compressors) for a in self._arrays}

    @cached_property
    def _logical_row_bytes(self) -> int:
        """Bytes one token takes uncompressed: ids, mask and every role at its logical dtype."""
        hidden = sum(
            int(np.prod(h.per_token_shape)) * torch_dtype(h.logical_dtype).itemsize for h in self.manifest.hidden
        )
        return 4 + 1 + hidden + layout.teacher_logical_row_bytes(self.manifest)

    @property
    def bytes_written(self) -> tuple[int, int] | None:
        """(uncompressed, on-disk) bytes of the token arrays written by this writer so far; None if remote."""
        if self._local_part is None:
            return None
        return sum(self._shard_logical_bytes.values()), sum(self._shard_file_bytes.values())

    def _shard_crc(self, rows: np.ndarray) -> int:
        """Per-shard checksum of raw arrays (per-chunk crc32c would break zero-copy views): the slot's
        rows padded to whole chunks, as stored."""
        pad = (-len(rows)) % self.manifest.geometry.chunk_tokens
        crc = crc32c.crc32c(np.ascontiguousarray(rows))
        if pad:
            crc = crc32c.crc32c(bytes(pad * rows[0].nbytes), crc)
        return crc

    def _write_crcs(self, name: str, crcs: dict[int, int]) -> None:
        _concurrently([self._crc_write(name, crcs)])

    def _crc_write(self, name: str, crcs: dict[int, int]) -> Coroutine[Any, Any, None]:
        """Store {shard: crc32c} of one raw array (consecutive shards: one zarr write)."""
        lo, hi = min(crcs), max(crcs) + 1
        return _extend(self._crc_arrays[name], hi, lo, np.array([crcs[k] for k in range(lo, hi)], dtype=np.uint32))

    def _sample_writes(self, done: list[_PendingSample]) -> list[Coroutine[Any, Any, None]]:
        """The sample table's rows of `done`, which follow the committed samples."""
        start = self.commit.samples
        end = start + len(done)
        offsets = self.commit.tokens + np.concatenate([[0], np.cumsum([s.length for s in done])[:-1]])
        columns = {
            "offset": offsets.astype(np.int64),
            "length": np.array([s.length for s in done], dtype=np.int32),
            "loss_tokens": np.array([s.loss_tokens for s in done], dtype=np.int32),
            "source": np.array([s.source for s in done], dtype=np.int32),
            "sample_id": np.array([s.sample_id for s in done], dtype=object),
            "content_hash": np.array([s.content_hash for s in done], dtype=np.uint64),
        }
        return [_extend(self._samples[name], end, start, values) for name, values in columns.items()]

    # --- closing ----------------------------------------------------------------------------
    def close(self) -> CommitRecord:
        """Write the partial last shard, wait for the background writer, mark the part closed."""
        if self._closed:
            return self.commit
        self._closed = True
        try:
            if self._buffered_rows:
                self._submit(self._take_rows(self._buffered_rows))
            for f in self._inflight:
                f.result()
            self._commit(closed=True)
        finally:
            self._pool.shutdown(wait=True)
        return self.commit

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # let the background writer finish its shards and commit them; skip the unwritten tail
            self._closed = True
            self._pool.shutdown(wait=True)
            if self._failed is None:  # a failed job sets it, and has committed what came before it
                self._commit()


async def _extend(arr: zarr.Array, end: int, start: int = 0, values: np.ndarray | None = None) -> None:
    """Grow `arr` to `end` rows if it is shorter, then write `values` at row `start` (one array's writes in order)."""
    a = arr.async_array
    if a.shape[0] < end:
        await a.resize((end, *a.shape[1:]))
    if values is not None:
        await a.setitem(slice(start, start + len(values)), values)


def _concurrently(writes: list[Coroutine[Any, Any, None]]) -> None:
    """Run zarr writes on zarr's event loop together: one round trip from this thread instead of one per call."""

    async def run_all() -> None:
        await asyncio.gather(*writes)

    sync(run_all())


def _encode_pieces(codec: HiddenCodec, pieces: list[RowPiece], logical: str) -> dict[str, np.ndarray]:
    """A quantized role's pieces of one shard slot -> its stored arrays. New rows (logical bits) are encoded a
    run of consecutive pieces at a time, up to ENCODE_BYTES a call: few calls (each is ~25 small torch ops,
    and on a small target per-sample calls were mostly GIL hand-offs), bounded temporaries (the codecs
    work in float32). Already encoded pieces are kept as they are."""
    parts: list[dict[str, np.ndarray]] = []
    run: list[np.ndarray] = []
    run_bytes = 0
    for piece in [*pieces, None]:
        if isinstance(piece, np.ndarray):
            run.append(piece)
            run_bytes += piece.nbytes
            if run_bytes < ENCODE_BYTES:
                continue
        if run:
            bits = np.concatenate(run) if len(run) > 1 else run[0]
            parts.append(codec.encode(dtypes.from_storage(bits, logical), logical))
            run, run_bytes = [], 0
        if isinstance(piece, _Encoded):
            parts.append(piece.arrays)
    return {s: np.concatenate([p[s] for p in parts]) if len(parts) > 1 else parts[0][s] for s in codec.suffixes}


def _split_pieces(pieces: list[RowPiece], n: int) -> tuple[list[RowPiece], list[RowPiece]]:
    """Row pieces -> (pieces holding the first n rows, pieces holding the rest), as views: no copy."""
    head: list[np.ndarray] = []
    for i, piece in enumerate(pieces):
        if n <= 0:
            return head, pieces[i:]
        if len(piece) <= n:
            head.append(piece)
            n -= len(piece)
        else:
            head.append(piece[:n])
            return head, [piece[n:], *pieces[i + 1 :]]
    return head, []


def teacher_positions(loss_mask: np.ndarray) -> np.ndarray:
    """Rows j of one sample whose next token is trained on (loss_mask[j + 1] == 1): where a teacher is needed.

    The sample's last token never is one (its next token is not in the sample)."""
    rows = np.zeros(len(loss_mask), dtype=bool)
    rows[:-1] = np.asarray(loss_mask[1:]).astype(bool)
    return rows


def content_hash(ids: np.ndarray, mask: np.ndarray) -> int:
    """64-bit digest of a sample's tokens and mask: finds duplicates and mismatched resumes."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.ascontiguousarray(ids, dtype=np.int32))
    h.update(np.ascontiguousarray(mask, dtype=np.uint8))
    return int.from_bytes(h.digest(), "little")


def recount_token_freq(input_ids: zarr.Array, loss_mask: zarr.Array, rows: int, vocab: int) -> np.ndarray:
    freq = np.zeros(vocab, dtype=np.int64)
    step = 1 << 20
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        ids = np.asarray(input_ids[start:stop])
        mask = np.asarray(loss_mask[start:stop]).astype(bool)
        freq += np.bincount(ids[mask], minlength=vocab)
    return freq


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
