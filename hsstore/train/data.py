"""Per-sample access to a store for training, and EAGLE's noise augmentation of hidden states.

The dataset opens its StoreReader lazily in whichever process first reads: zarr's event loop and
memory-mapped shards must not be shared across a fork, so each DataLoader worker opens its own
(the pid check), and pickling (spawn/forkserver workers) drops the handle.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from ..reader import StoreReader


class SampleDataset(Dataset):
    """dataset[i] = store sample i (global index) as the reader returns it, truncated to max_tokens.

    decode=False leaves quantized roles (fp8, mxfp4, mxfp6) as their stored arrays, payload "<role>" +
    "<role>_scale", so the device decodes them (`loader.to_device`); lossless codecs return bf16 either way.
    """

    def __init__(self, location: str, *, decode: bool = False, max_tokens: int | None = None) -> None:
        self.location = str(location)
        self.decode = decode
        self.max_tokens = max_tokens
        self._reader: StoreReader | None = None
        self._pid = -1

    @property
    def reader(self) -> StoreReader:
        if self._reader is None or self._pid != os.getpid():
            self._reader, self._pid = StoreReader(self.location, decode=self.decode), os.getpid()
        return self._reader

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every sample, from the index (no token data read)."""
        return self.reader.index.length

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = self.reader[int(i)]
        n = self.max_tokens
        if n is not None and len(sample["input_ids"]) > n:
            sample = {k: v[:n] for k, v in sample.items()}
        return sample

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None, "_pid": -1}


@dataclass(frozen=True)
class NoiseConfig:
    """Noise added to hidden states on the device, as EAGLE does to make the draft robust to its own errors.

    `std` is the noise's standard deviation for both kinds (uniform draws U(-a, a) with a = std*sqrt(3)).
    Only `roles` are noised: by default the draft's input features (aux), not the teacher's last layer.
    """

    kind: Literal["none", "uniform", "gaussian"] = "none"
    std: float = 0.0
    roles: Sequence[str] = ("aux",)

    def __post_init__(self) -> None:
        if self.kind not in ("none", "uniform", "gaussian"):
            raise ValueError(f"noise kind must be none, uniform or gaussian, got {self.kind!r}")
        if self.std < 0:
            raise ValueError(f"noise std must be >= 0, got {self.std}")

    @property
    def active(self) -> bool:
        return self.kind != "none" and self.std > 0


def add_noise(batch: dict[str, Any], noise: NoiseConfig, *, generator: torch.Generator | None = None) -> dict[str, Any]:
    """A copy of the batch with noise added to the noised roles on their device; padding stays zero.

    Call after `to_device` (quantized payloads must be decoded first); ids, masks and positions are untouched.
    """
    if not noise.active:
        return batch
    out = dict(batch)
    real = batch["seq_ids"] >= 0
    for role in noise.roles:
        x = batch[role]
        if not x.is_floating_point():
            raise ValueError(
                f"{role} is still a quantized {x.dtype} payload (fp8 payload or mx codes); add noise after to_device"
            )
        shape, dev = x.shape, x.device
        if noise.kind == "gaussian":
            z = torch.randn(shape, device=dev, generator=generator) * noise.std
        else:
            z = (torch.rand(shape, device=dev, generator=generator) * 2 - 1) * (noise.std * math.sqrt(3))
        z = z * real.view(*real.shape, *([1] * (x.dim() - 2)))
        out[role] = (x.float() + z).to(x.dtype)
    return out
