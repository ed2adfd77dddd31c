"""Train/eval split: a hash of each sample's key against --eval-fraction, or an explicit eval store.

A hash (not a seeded shuffle) keeps a sample on the same side across runs, machines, seeds and
store growth: appending samples never moves existing ones between train and eval. The default
key is the content hash, so duplicated conversations cannot sit on both sides.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import HSStoreError
from ..reader import StoreReader

log = logging.getLogger(__name__)

SplitKey = Literal["content_hash", "sample_id"]


class EmptySplitError(HSStoreError, ValueError):
    """A split selected no sample: training or evaluation would silently do nothing."""


@dataclass(frozen=True)
class Split:
    """Global sample indices of the train store and of the eval store (the same store unless given)."""

    train: np.ndarray  # int64
    eval: np.ndarray  # int64, empty when evaluation is off
    eval_location: str | None  # None: eval indices refer to the train store


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads any uint64 key uniformly (vectorized)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def hash_unit(reader: StoreReader, key: SplitKey = "content_hash", salt: str = "hsstore-eval") -> np.ndarray:
    """A stable float in [0, 1) per sample, from its key and the salt only."""
    salt64 = np.uint64(int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=8).digest(), "little"))
    if key == "content_hash":
        h = _mix64(reader.index.content_hash ^ salt64)
    elif key == "sample_id":
        digests = b"".join(
            hashlib.blake2b(str(s).encode(), digest_size=8, key=salt.encode()[:64]).digest() for s in reader.sample_ids
        )
        h = np.frombuffer(digests, dtype="<u8")
    else:
        raise ValueError(f"split key must be content_hash or sample_id, got {key!r}")
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def split_store(
    reader: StoreReader,
    *,
    eval_fraction: float = 0.0,
    eval_reader: StoreReader | None = None,
    key: SplitKey = "content_hash",
    salt: str = "hsstore-eval",
) -> Split:
    """Train/eval indices: hash-split `reader` by eval_fraction, or use all of `eval_reader` for eval.

    With an eval store, train samples whose content hash also occurs there are dropped (and logged).
    eval_fraction 0 without an eval store turns evaluation off; any split selecting nothing raises.
    """
    n = len(reader)
    if eval_reader is not None:
        if eval_fraction:
            raise ValueError("pass either an eval store or --eval-fraction, not both")
        if not len(eval_reader):
            raise EmptySplitError(f"eval store {eval_reader.location} holds no committed samples")
        leaked = np.isin(reader.index.content_hash, eval_reader.index.content_hash)
        if leaked.any():
            log.warning("dropped %d train samples whose content also occurs in the eval store", int(leaked.sum()))
        train, ev, where = np.flatnonzero(~leaked), np.arange(len(eval_reader)), eval_reader.location
    else:
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
        is_eval = hash_unit(reader, key, salt) < eval_fraction if eval_fraction else np.zeros(n, dtype=bool)
        train, ev, where = np.flatnonzero(~is_eval), np.flatnonzero(is_eval), None
        if eval_fraction and not len(ev):
            raise EmptySplitError(
                f"--eval-fraction {eval_fraction} selects no sample of the {n} in {reader.location} "
                f"(expected about {eval_fraction * n:.1f}); raise it, or pass an explicit eval store"
            )
    if not len(train):
        raise EmptySplitError(f"no training samples left in {reader.location} ({n} samples) after the eval split")
    return Split(train.astype(np.int64), ev.astype(np.int64), where)
