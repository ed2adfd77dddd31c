"""Where things live inside a store: group and array names, and the arrays a manifest implies.

zarr.json                    root group; attributes["hsstore"] = manifest
parts/part-00000/            one group per data-parallel writer (rank)
    zarr.json                attributes["commit"] = commit record (the only truth about extent)
    input_ids   [T] int32    tokens of every sample, concatenated
    loss_mask   [T] uint8
    hidden/<role>[_scale]    [T, L, H] or [T, H]; fp8 adds per-token scales
    samples/{offset,length,loss_tokens,source,sample_id,content_hash}   [N]
    token_freq  [V] int64    loss-masked target-token counts of this part
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec

from .codecs import MIN_BLOSC_CHUNK_BYTES, StoredArray, get_codec, small_compressors
from .errors import IncompatibleStoreError
from .manifest import Manifest

PARTS_GROUP = "parts"
COMMIT_KEY = "commit"
TOKEN_FREQ = "token_freq"
SAMPLES_GROUP = "samples"
SAMPLE_CHUNK = 65536

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
    role: str | None = None  # None for input_ids / loss_mask


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
    return out


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
