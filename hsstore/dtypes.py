"""Logical dtypes: what readers hand out, versus the dtype zarr stores.

Zarr v3 has no bfloat16, so bf16 is stored as its uint16 bit pattern and the manifest records the
logical dtype; readers reinterpret the bits (a view, no copy).
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import IncompatibleStoreError

# logical name -> (torch dtype, numpy dtype the bits are stored as)
_LOGICAL: dict[str, tuple[torch.dtype, np.dtype]] = {
    "bfloat16": (torch.bfloat16, np.dtype("uint16")),
    "float16": (torch.float16, np.dtype("float16")),
    "float32": (torch.float32, np.dtype("float32")),
}


def logical_dtypes() -> list[str]:
    return list(_LOGICAL)


def torch_dtype(logical: str) -> torch.dtype:
    return _lookup(logical)[0]


def storage_dtype(logical: str) -> np.dtype:
    return _lookup(logical)[1]


def logical_name(dtype: torch.dtype) -> str:
    for name, (tdt, _) in _LOGICAL.items():
        if tdt == dtype:
            return name
    raise IncompatibleStoreError(f"hidden-state dtype {dtype} is not storable; use one of {logical_dtypes()}")


def _lookup(logical: str) -> tuple[torch.dtype, np.dtype]:
    try:
        return _LOGICAL[logical]
    except KeyError:
        raise IncompatibleStoreError(
            f"unknown logical dtype {logical!r}; this hsstore knows {logical_dtypes()}"
        ) from None


def to_storage(t: torch.Tensor, logical: str, *, copy: bool = False) -> np.ndarray:
    """Bits of a tensor as the numpy array zarr stores (bf16 -> uint16, no arithmetic), contiguous.

    `copy`: never share the tensor's memory (a cast or a gather of a strided view already copies; else clone)."""
    src = t.detach()
    t = src.to("cpu", torch_dtype(logical)).contiguous()
    if copy and t.data_ptr() == src.data_ptr():
        t = t.clone()
    return storage_view(t, logical)


def storage_view(t: torch.Tensor, logical: str) -> np.ndarray:
    """The bits to_storage gives, as a view of the tensor's memory (any strides) when it already is a CPU tensor
    of the logical dtype; a cast copy otherwise."""
    tdt, ndt = _lookup(logical)
    t = t.detach().to("cpu", tdt)
    if tdt == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ndt)
    return t.numpy()


def all_finite(bits: np.ndarray, logical: str) -> bool:
    """No NaN/inf among stored bits (to_storage's output): bf16 is read off its exponent, ~20x faster
    than torch.isfinite on bf16 here."""
    if logical == "bfloat16":  # exponent all ones = inf or NaN; no masked exponent exceeds that, so max finds it
        return int(np.bitwise_and(bits, 0x7F80).max(initial=0)) != 0x7F80
    return bool(np.isfinite(bits).all())


def from_storage(a: np.ndarray, logical: str) -> torch.Tensor:
    """Inverse of to_storage: a tensor sharing memory with the stored bits."""
    tdt, ndt = _lookup(logical)
    if a.dtype != ndt:
        raise IncompatibleStoreError(f"stored dtype {a.dtype} does not hold logical {logical} (expected {ndt})")
    if tdt == torch.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)
