"""Where things live inside a store: group and array names, and the arrays a manifest implies.

zarr.json                    root group; attributes["hsstore"] = manifest
parts/part-00000/            one group per data-parallel writer (rank)
    zarr.json                attributes["commit"] = commit record (the only truth about extent)
    input_ids   [T] int32    tokens of every sample, concatenated
    loss_mask   [T] uint8
    hidden/<role>[_scale]    [T, L, H] or [T, H]; quantized codecs add scales (fp8 per token, mx per 32)
    teacher/{ids,logprobs}   [T, k]   top-k teacher (manifest.teacher): ids and log-probs, zeros off teacher positions
    samples/{offset,length,loss_tokens,source,sample_id,content_hash}   [N]
    token_freq  [V] int64    loss-masked target-token counts of this part
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec

from .codecs import MIN_BLOSC_CHUNK_BYTES, StoredArray, get_codec, small_compressors
from .dtypes import torch_dtype
from .errors import IncompatibleStoreError
from .manifest import Manifest, TeacherSpec

PARTS_GROUP = "parts"
COMMIT_KEY = "commit"
TOKEN_FREQ = "token_freq"
SAMPLES_GROUP = "samples"
SAMPLE_CHUNK = 65536
TEACHER_GROUP = "teacher"
TEACHER_IDS = f"{TEACHER_GROUP}/ids"
TEACHER_LOGPROBS = f"{TEACHER_GROUP}/logprobs"

# name -> dtype of the per-sample index table
SAMPLE_FIELDS: dict[str, Any] = {
    "offset": np.dtype("int64"),
    "length": np.dtype("int32"),
    "loss_tokens": np.dtype("int32"),
    "source": np.dtype("int32"),
    "sample_id": str,
    "content_hash": np.dtype("uint64"),
}


@dataclass(frozen=True)
class TokenArray:
    """A token-major array of a part, with the role/codec slot it fills."""

    name: str
    stored: StoredArray
    role: str | None = None  # the hidden role; None for input_ids, loss_mask and the teacher arrays


def part_name(rank: int) -> str:
    return f"part-{rank:05d}"


def part_path(rank: int) -> str:
    return f"{PARTS_GROUP}/{part_name(rank)}"


def shard_chunk_key(shard_index: int, trailing_dims: int) -> str:
    """Key of a token-major array's shard file inside the array (zarr's default "c/k/0/..." encoding)."""
    return "/".join(["c", str(shard_index), *(["0"] * trailing_dims)])


def hidden_array_name(role: str, suffix: str = "") -> str:
    return f"hidden/{role}{suffix}"


def token_arrays(manifest: Manifest) -> list[TokenArray]:
    """Every token-major array a part of this manifest holds, in write order."""
    out = [
        TokenArray("input_ids", StoredArray("", (), np.dtype("int32"), small_compressors())),
        TokenArray("loss_mask", StoredArray("", (), np.dtype("uint8"), small_compressors())),
    ]
    for spec in manifest.hidden:
        codec = get_codec(spec.codec)
        for stored in codec.stored_arrays(spec.per_token_shape, spec.logical_dtype):
            out.append(TokenArray(hidden_array_name(spec.role, stored.suffix), stored, spec.role))
    if manifest.teacher is not None:
        out.extend(teacher_arrays(manifest.teacher))
    return out


def teacher_arrays(spec: TeacherSpec) -> list[TokenArray]:
    """The top-k teacher's [T, k] ids and log-probs: mostly zero rows, so plain zstd (never blosc) suits them."""
    return [
        TokenArray(TEACHER_IDS, StoredArray("", (spec.k,), np.dtype(spec.ids_dtype), small_compressors())),
        TokenArray(TEACHER_LOGPROBS, StoredArray("", (spec.k,), np.dtype(spec.logprob_dtype), small_compressors())),
    ]


def teacher_own_row_bytes(spec: TeacherSpec) -> int:
    """Uncompressed bytes of one token's teacher rows (ids + log-probs)."""
    return spec.k * (np.dtype(spec.ids_dtype).itemsize + np.dtype(spec.logprob_dtype).itemsize)


def teacher_logical_row_bytes(manifest: Manifest) -> int:
    """Uncompressed bytes per token the teacher arrays stand for, for compression ratios.

    A top-k teacher replaces the last layer, so without a `last` role it counts as the last layer it
    stands in for (H values at the store's logical dtype): ratios then compare with a store that keeps
    the last layer, not with the mostly-zero [T, k] arrays. Beside a `last` role it replaces nothing and
    counts its own bytes."""
    t = manifest.teacher
    if t is None:
        return 0
    if "last" in manifest.roles:
        return teacher_own_row_bytes(t)
    dtype = manifest.hidden[0].logical_dtype if manifest.hidden else manifest.target.dtype
    return manifest.target.hidden_size * torch_dtype(dtype).itemsize


def check_chunk_sizes(manifest: Manifest) -> None:
    """Refuse geometries whose blosc chunks would be too small to compress safely in split mode."""
    chunk_tokens = manifest.geometry.chunk_tokens
    for a in token_arrays(manifest):
        chunk_bytes = chunk_tokens * int(np.prod(a.stored.per_token_shape, dtype=np.int64)) * a.stored.dtype.itemsize
        if any(isinstance(c, BloscCodec) for c in a.stored.compressors) and chunk_bytes < MIN_BLOSC_CHUNK_BYTES:
            raise IncompatibleStoreError(
                f"{a.name}: {chunk_bytes}-byte chunks are too small for blosc's split mode "
                f"(needs >= {MIN_BLOSC_CHUNK_BYTES}); raise chunk_tokens or use the raw codec"
            )
