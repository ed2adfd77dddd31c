"""The training DataLoader: worker processes read and pack batches ahead; the device decodes quantized roles.

`TrainLoader` wraps a torch DataLoader whose sampler is a `PackedBatchSampler`: each DataLoader item
is one whole packed batch (batch_size=None), read and collated in a worker. Workers run ahead of the
training loop, so the resumable position is counted here, at the batches actually handed out, not
in the sampler. Pass batches through `to_device`; do not hand the DataLoader to
`accelerator.prepare` (the sampler already shards by rank).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..codecs import HiddenCodec, get_codec
from ..manifest import Manifest
from .data import NoiseConfig, SampleDataset, add_noise
from .packing import pack_batch
from .sampler import Batch, PackedBatchSampler

RoleCodecs = Mapping[str, tuple[HiddenCodec, str]]  # role -> (its codec, its logical dtype name)


class _BatchReader(Dataset):
    """DataLoader item = one planned batch: reads its samples, grouped by row."""

    def __init__(self, samples: SampleDataset) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, batch: Batch) -> tuple[list[list[dict[str, torch.Tensor]]], Batch]:
        return [[self.samples[i] for i in row] for row in batch], batch


def collate_packed(
    item: tuple[Sequence[Sequence[Mapping[str, torch.Tensor]]], Batch],
    *,
    max_tokens: int,
    pad_id: int = 0,
    pad_to_multiple_of: int = 1,
) -> dict[str, Any]:
    """Runs in the worker: samples of one planned batch -> packed tensors (see `pack_batch`)."""
    rows, batch = item
    return pack_batch(rows, batch, max_tokens, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)


def role_codecs(manifest: Manifest) -> dict[str, tuple[HiddenCodec, str]]:
    """Every hidden role's codec and logical dtype, as `to_device` needs them to decode on the device."""
    return {spec.role: (get_codec(spec.codec), spec.logical_dtype) for spec in manifest.hidden}


def to_device(batch: Mapping[str, Any], device: torch.device | str, codecs: RoleCodecs) -> dict[str, Any]:
    """Moves every tensor to `device`, then decodes there each role still in its stored form.

    A reader with decode=False hands a quantized role out as "<role>" + "<role><suffix>" (e.g. fp8 or
    mxfp4 payload + "<role>_scale"); the role's codec turns them into one "<role>" tensor of its logical
    dtype on the device, so only the compact bytes cross PCIe. Roles already decoded pass through.
    """
    device = torch.device(device)
    out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    for role, (codec, logical) in codecs.items():
        extra = [role + suffix for suffix in codec.suffixes if suffix]
        if codec.lossless or not any(k in out for k in extra):
            continue
        missing = [k for k in (role, *extra) if k not in out]
        if missing:
            raise ValueError(f"{role!r} is only partly in the batch (missing {missing}); it cannot be decoded")
        out[role] = codec.decode({suffix: out.pop(role + suffix) for suffix in codec.suffixes}, logical)
    return out


class TrainLoader:
    """Iterates this rank's packed batches epoch after epoch; state_dict() resumes exactly."""

    def __init__(
        self,
        dataset: SampleDataset,
        sampler: PackedBatchSampler,
        *,
        num_workers: int = 2,
        prefetch_factor: int = 2,
        pin_memory: bool | None = None,
        pad_id: int = 0,
        pad_to_multiple_of: int = 1,
        noise: NoiseConfig | None = None,
        multiprocessing_context: str | None = None,
    ) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.noise = noise or NoiseConfig()
        # other datasets (the benchmarks' .pt baselines) hand out decoded tensors: nothing to decode
        self.codecs = role_codecs(dataset.reader.manifest) if isinstance(dataset, SampleDataset) else {}
        self.epoch, self.position = sampler.epoch, sampler.position
        collate = partial(
            collate_packed, max_tokens=sampler.max_tokens, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of
        )
        self.loader = DataLoader(
            _BatchReader(dataset),
            sampler=sampler,
            batch_size=None,
            collate_fn=collate,
            num_workers=num_workers,
            prefetch_factor=prefetch_factor if num_workers else None,
            persistent_workers=num_workers > 0,
            pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
            multiprocessing_context=multiprocessing_context if num_workers else None,
        )

    def __len__(self) -> int:
        """Steps of the current epoch (equal on every rank)."""
        return self.sampler.steps(self.epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch (from `position`); then the loader sits at the next epoch."""
        if self.position >= self.sampler.steps(self.epoch):
            self.epoch, self.position = self.epoch + 1, 0
        self.sampler.load_state_dict(self.state_dict())
        epoch = self.epoch
        for batch in self.loader:
            self.position += 1
            yield batch
        if self.epoch == epoch:
            self.epoch, self.position = epoch + 1, 0

    def to_device(
        self, batch: Mapping[str, Any], device: torch.device | str, *, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """Batch on the device, quantized roles decoded there, noise augmentation applied."""
        return add_noise(to_device(batch, device, self.codecs), self.noise, generator=generator)

    def state_dict(self) -> dict[str, Any]:
        return {**self.sampler.state_dict(), "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(dict(state))  # validates that the plan is unchanged
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def build_loader(
    location: str,
    *,
    max_tokens: int,
    indices: np.ndarray | None = None,
    rows_per_batch: int = 1,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    window: int = 1024,
    num_workers: int = 2,
    prefetch_factor: int = 2,
    pin_memory: bool | None = None,
    device_decode: bool = True,
    pad_id: int = 0,
    pad_to_multiple_of: int = 1,
    noise: NoiseConfig | None = None,
    multiprocessing_context: str | None = None,
) -> TrainLoader:
    """A TrainLoader over `indices` of the store at `location` (e.g. `split_store(...).train`).

    Start-up reads only the store's index. device_decode=True ships quantized codecs' bytes + scales
    (fp8, mxfp4, mxfp6) to the device (less host work and PCIe traffic); False decodes them on the host
    in the workers.
    """
    dataset = SampleDataset(location, decode=not device_decode, max_tokens=max_tokens)
    sampler = PackedBatchSampler(
        dataset.lengths,
        max_tokens,
        indices=indices,
        rows_per_batch=rows_per_batch,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle=shuffle,
        window=window,
    )
    return TrainLoader(
        dataset,
        sampler,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor,
        pin_memory=pin_memory,
        pad_id=pad_id,
        pad_to_multiple_of=pad_to_multiple_of,
        noise=noise,
        multiprocessing_context=multiprocessing_context,
    )
