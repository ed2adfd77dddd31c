"""A resumable, distributed sampler of packed batches.

Every rank computes the same global plan for an epoch from the sample lengths alone (seeded
permutation -> packed rows -> batches of `rows_per_batch` rows), then takes every world_size-th
batch. The plan is a pure function of (seed, epoch, lengths, settings), so resuming needs only
(epoch, position): the next batch after a restart is the one an uninterrupted run would yield.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .packing import PackStats, pack_rows, pack_stats

log = logging.getLogger(__name__)

Batch = list[list[int]]  # rows of global sample indices


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's global batches and what packing them did."""

    epoch: int
    batches: list[Batch]  # global, len divisible by world_size
    stats: PackStats
    repeated: int  # batches repeated to even out ranks (only when no batch could be split)


def balance(batches: list[Batch], world_size: int) -> tuple[list[Batch], int]:
    """Make len(batches) a multiple of world_size so every rank runs the same number of steps.

    Splits the batch holding most samples in two (by rows, or a row by samples) until the count
    divides; every sample still appears exactly once. Only when no batch holds two samples are the
    first batches repeated, as DistributedSampler pads.
    """
    batches = list(batches)
    while len(batches) % world_size:
        sizes = [sum(len(r) for r in b) for b in batches]
        k = int(np.argmax(sizes)) if sizes else 0
        if not sizes or sizes[k] < 2:
            break
        b = batches[k]
        if len(b) > 1:
            halves = [b[: len(b) // 2], b[len(b) // 2 :]]
        else:
            row = b[0]
            halves = [[row[: len(row) // 2]], [row[len(row) // 2 :]]]
        batches[k : k + 1] = halves
    repeated = -len(batches) % world_size
    if repeated and not batches:
        raise ValueError("no samples to batch")
    return batches + batches[:repeated], repeated


def fingerprint(indices: np.ndarray, lengths: np.ndarray) -> str:
    """Identifies the sample set a state_dict's position refers to."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.ascontiguousarray(indices, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(lengths[indices], dtype=np.int64).tobytes())
    return h.hexdigest()


class PackedBatchSampler:
    """Yields this rank's packed batches (rows of global sample indices), resumable mid-epoch.

    `lengths` is the store's per-sample length table (`reader.index.length`); `indices` the samples
    to use (a split), default all. Nothing here touches token data.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        max_tokens: int,
        *,
        indices: np.ndarray | None = None,
        rows_per_batch: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        window: int = 1024,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if rows_per_batch < 1:
            raise ValueError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.indices = np.arange(len(self.lengths)) if indices is None else np.asarray(indices, dtype=np.int64)
        if not len(self.indices):
            raise ValueError("the sampler got no samples")
        self.max_tokens = max_tokens
        self.rows_per_batch = rows_per_batch
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.window = seed, shuffle, window
        self.fingerprint = fingerprint(self.indices, self.lengths)
        self.epoch = 0
        self.position = 0  # batches of this rank already handed out in `epoch`
        self._plan: EpochPlan | None = None

    def plan(self, epoch: int) -> EpochPlan:
        """The global plan of an epoch (cached for the latest one asked)."""
        if self._plan is not None and self._plan.epoch == epoch:
            return self._plan
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.indices) if self.shuffle else self.indices
        rows = pack_rows(self.lengths, order, self.max_tokens, window=self.window, rng=rng if self.shuffle else None)
        stats = pack_stats(self.lengths, rows, self.max_tokens)
        if note := stats.note():
            log.warning("epoch %d: %s", epoch, note)
        per = self.rows_per_batch
        batches, repeated = balance([rows[i : i + per] for i in range(0, len(rows), per)], self.world_size)
        if repeated:
            log.warning("epoch %d: %d batches repeated so %d ranks run equal steps", epoch, repeated, self.world_size)
        self._plan = EpochPlan(epoch, batches, stats, repeated)
        return self._plan

    def rank_batches(self, epoch: int) -> list[Batch]:
        return self.plan(epoch).batches[self.rank :: self.world_size]

    def steps(self, epoch: int | None = None) -> int:
        """Batches this rank runs in an epoch (the same on every rank)."""
        return len(self.plan(self.epoch if epoch is None else epoch).batches) // self.world_size

    def __len__(self) -> int:
        return self.steps()

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch from `position`; afterwards the sampler sits at the next epoch."""
        if self.position >= self.steps():
            self.epoch, self.position = self.epoch + 1, 0
        epoch = self.epoch
        for batch in self.rank_batches(epoch)[self.position :]:
            self.position += 1
            yield batch
        if self.epoch == epoch:
            self.epoch, self.position = epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "world_size": self.world_size,
            "rank": self.rank,
            "max_tokens": self.max_tokens,
            "rows_per_batch": self.rows_per_batch,
            "shuffle": self.shuffle,
            "window": self.window,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at (epoch, position); refuses a state from different data or settings (its position would lie)."""
        mine = self.state_dict()
        keys = ("seed", "world_size", "max_tokens", "rows_per_batch", "shuffle", "window", "fingerprint")
        diff = {k: (state.get(k), mine[k]) for k in keys if state.get(k) != mine[k]}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume the data order exactly, the plan changed ({detail})")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
