"""Hidden-state codecs: how a [T, *shape] activation array becomes zarr arrays, and back.

A codec names the zarr codec chain of each stored array and, for quantizing codecs, the transform
around it. Every codec keeps the store a plain Zarr v3 group: `fp8` writes the e4m3 bits and the
per-token scales as two ordinary arrays, `mxfp4`/`mxfp6` their codes and per-block e8m0 scales
(`hsstore.blockscaled`), so any zarr reader sees them, and the trainer can move the bytes to the GPU
and decode there (`HiddenCodec.decode` on the device's tensors).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numcodecs.blosc
import numpy as np
import torch
from numcodecs import Blosc
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from . import blockscaled, dtypes
from .errors import HSStoreError, IncompatibleStoreError

FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOSC_DONT_SPLIT = 0x10  # header flag bit: set when blosc compressed the block without splitting
# c-blosc 1.x corrupts (undecodable output) some buffers under ~256 bytes in forced split mode, seen here
# on bf16 and small-int data; blosc is therefore used only for hidden-state chunks at least this large.
MIN_BLOSC_CHUNK_BYTES = 4096
SCALE_SUFFIX = "_scale"


@dataclass(frozen=True)
class StoredArray:
    """One zarr array a codec writes for a hidden-state role."""

    suffix: str  # "" for the main array, SCALE_SUFFIX for the scales of quantizing codecs
    per_token_shape: tuple[int, ...]
    dtype: np.dtype
    compressors: tuple[Any, ...]
    raw_layout: bool = False  # chunks are plain little-endian bytes: memory-mappable


def ensure_blosc_split() -> None:
    """Make blosc split byte planes before zstd, as the lossless codec needs, and prove it did.

    zarr sets `numcodecs.blosc.use_threads = False` on import, which routes blosc through its
    context API; that API ignores BLOSC_SPLITMODE and never splits for zstd, costing ~13% of the
    ratio on bf16 (1.25x instead of 1.43x). The global API honours the environment variable (and
    leaves blosc's global split mode set for context calls too). Decoding needs no setting.
    """
    os.environ["BLOSC_SPLITMODE"] = "ALWAYS"
    numcodecs.blosc.use_threads = True
    probe = np.arange(4096, dtype=np.uint16)
    header = Blosc("zstd", 1, Blosc.SHUFFLE).encode(probe)
    if header[2] & BLOSC_DONT_SPLIT:
        raise HSStoreError("blosc refused split mode; lossless compression would lose ~13% of its ratio")


def blosc_was_split(chunk: bytes) -> bool:
    """Whether a blosc buffer was compressed with split byte planes (read from its header)."""
    return not (chunk[2] & BLOSC_DONT_SPLIT)


def small_compressors(level: int = 3) -> tuple[Any, ...]:
    """Token ids, masks, scales, fp8 bytes: plain zstd (never blosc, see MIN_BLOSC_CHUNK_BYTES), checksummed."""
    return (ZstdCodec(level=level), Crc32cCodec())


class HiddenCodec(ABC):
    """The storage scheme of one hidden-state role."""

    name: str
    lossless: bool
    suffixes: tuple[str, ...] = ("",)  # of the arrays stored_arrays returns, whatever the shape

    @abstractmethod
    def stored_arrays(self, per_token_shape: tuple[int, ...], logical: str) -> list[StoredArray]: ...

    @abstractmethod
    def encode(self, hidden: torch.Tensor, logical: str) -> dict[str, np.ndarray]:
        """[n, *shape] tensor -> arrays keyed by StoredArray.suffix."""

    @abstractmethod
    def decode(self, stored: dict[str, torch.Tensor], logical: str) -> torch.Tensor:
        """Inverse of encode, on whatever device the stored tensors are on."""


class RawCodec(HiddenCodec):
    """Bytes only: readers memory-map shards and hand out views."""

    name = "raw"
    lossless = True

    def stored_arrays(self, per_token_shape, logical):
        return [StoredArray("", per_token_shape, dtypes.storage_dtype(logical), (), raw_layout=True)]

    def encode(self, hidden, logical):
        return {"": dtypes.to_storage(hidden, logical)}

    def decode(self, stored, logical):
        return stored[""]


class LosslessCodec(RawCodec):
    """Blosc zstd-1 over split, byte-shuffled planes: only the exponent byte compresses (~1.43x)."""

    name = "lossless"

    def stored_arrays(self, per_token_shape, logical):
        ndt = dtypes.storage_dtype(logical)
        blosc = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=ndt.itemsize)
        return [StoredArray("", per_token_shape, ndt, (blosc, Crc32cCodec()))]


class Fp8Codec(HiddenCodec):
    """e4m3 bits with one float32 scale per token and layer (amax / 448), then zstd (~2.3x)."""

    name = "fp8"
    lossless = False
    suffixes = ("", SCALE_SUFFIX)

    def stored_arrays(self, per_token_shape, logical):
        return [
            StoredArray("", per_token_shape, np.dtype("uint8"), small_compressors(1)),
            StoredArray(SCALE_SUFFIX, per_token_shape[:-1], np.dtype("float32"), small_compressors(1)),
        ]

    def encode(self, hidden, logical):
        x = hidden.detach().to("cpu", torch.float32)
        amax = x.abs().amax(dim=-1, keepdim=True)
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return {"": q.view(torch.uint8).numpy(), SCALE_SUFFIX: scale.squeeze(-1).numpy()}

    def decode(self, stored, logical):
        return dequantize_fp8(stored[""], stored[SCALE_SUFFIX], dtypes.torch_dtype(logical))


def dequantize_fp8(payload: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 e4m3 bits [.., H] and scales [..] -> dtype; runs on the tensors' device (GPU in training)."""
    values = payload.view(torch.float8_e4m3fn).to(torch.float32)
    return (values * scale.unsqueeze(-1).to(torch.float32)).to(dtype)


class BlockScaledCodec(HiddenCodec):
    """OCP-MX-style codes with one e8m0 scale per BLOCK values (scale rule CEIL: nothing clips), then zstd.

    Stored: uint8 codes [.., H] (one per byte: zstd's entropy stage removes the unused bits, smaller than
    packing 4 fp6 codes in 3 bytes), or for 4-bit formats two per byte [.., H / 2]; uint8 scales [.., H / 32].
    """

    lossless = False
    suffixes = ("", SCALE_SUFFIX)

    def __init__(self, name: str, fmt: blockscaled.ElementFormat) -> None:
        self.name = name
        self.fmt = fmt
        self.packed = fmt.bits == 4

    def stored_arrays(self, per_token_shape, logical):
        *lead, h = per_token_shape
        if h % blockscaled.BLOCK:
            raise IncompatibleStoreError(
                f"codec {self.name!r} scales blocks of {blockscaled.BLOCK} values, but the hidden size is {h}; "
                "use fp8 (any hidden size) or lossless for this model"
            )
        payload = h // 2 if self.packed else h
        return [
            StoredArray("", (*lead, payload), np.dtype("uint8"), small_compressors(1)),
            StoredArray(SCALE_SUFFIX, (*lead, h // blockscaled.BLOCK), np.dtype("uint8"), small_compressors(1)),
        ]

    def encode(self, hidden, logical):
        codes, scale = blockscaled.quantize(hidden.detach().to("cpu"), self.fmt)
        payload = blockscaled.pack_fp4(codes) if self.packed else codes
        return {"": payload.numpy(), SCALE_SUFFIX: scale.numpy()}

    def decode(self, stored, logical):
        dtype = dtypes.torch_dtype(logical)
        return blockscaled.dequantize(stored[""], stored[SCALE_SUFFIX], self.fmt, dtype, packed=self.packed)


CODECS: dict[str, HiddenCodec] = {
    c.name: c
    for c in (
        RawCodec(),
        LosslessCodec(),
        Fp8Codec(),
        BlockScaledCodec("mxfp4", blockscaled.E2M1),
        BlockScaledCodec("mxfp6", blockscaled.E2M3),
        BlockScaledCodec("mxfp3", blockscaled.E2M0),
    )
}


def get_codec(name: str) -> HiddenCodec:
    try:
        return CODECS[name]
    except KeyError:
        raise IncompatibleStoreError(
            f"unknown codec {name!r}; this hsstore knows {sorted(CODECS)} (upgrade hsstore to read newer stores)"
        ) from None
