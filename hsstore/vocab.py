"""The draft vocabulary: the N most frequent loss-masked target tokens, as EAGLE-3 maps them.

d2t[i] is an offset: target id = i + d2t[i] for draft id i (draft ids are target ids in ascending
order); t2d is a bool mask over the target vocab. Stored in the store's `vocab/` group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

from .errors import HSStoreError
from .reader import StoreReader
from .storage import open_store

VOCAB_GROUP = "vocab"


@dataclass(frozen=True)
class DraftVocab:
    d2t: np.ndarray  # int64 [draft_vocab]
    t2d: np.ndarray  # bool [target_vocab]
    covered_share: float  # share of loss tokens whose target id is in the draft vocab

    @property
    def draft_ids_in_target(self) -> np.ndarray:
        return np.arange(len(self.d2t)) + self.d2t


def build_draft_vocab(freq: np.ndarray, draft_vocab_size: int, strict: bool = False) -> DraftVocab:
    """Top tokens by count (ties: lower id first); too few seen tokens fill with the lowest unseen ids."""
    vocab = len(freq)
    if not 0 < draft_vocab_size <= vocab:
        raise HSStoreError(f"--draft-vocab-size {draft_vocab_size} must be within 1..{vocab} (the target vocab)")
    seen = int((freq > 0).sum())
    if seen < draft_vocab_size and strict:
        raise HSStoreError(
            f"the store's loss tokens cover only {seen} distinct ids, fewer than --draft-vocab-size "
            f"{draft_vocab_size}; generate more data, lower the size, or drop --strict to fill with unseen ids"
        )
    order = np.lexsort((np.arange(vocab), -freq))  # by count descending, then id ascending
    chosen = np.sort(order[:draft_vocab_size])
    t2d = np.zeros(vocab, dtype=bool)
    t2d[chosen] = True
    total = int(freq.sum())
    covered = float(freq[chosen].sum() / total) if total else 0.0
    return DraftVocab(d2t=(chosen - np.arange(draft_vocab_size)).astype(np.int64), t2d=t2d, covered_share=covered)


def write_draft_vocab(location: str, vocab: DraftVocab) -> None:
    root = zarr.open_group(open_store(location, read_only=False), mode="r+", zarr_format=3)
    group = root.require_group(VOCAB_GROUP)
    group.create_array("d2t", data=vocab.d2t, chunks=(len(vocab.d2t),), overwrite=True)
    group.create_array("t2d", data=vocab.t2d, chunks=(len(vocab.t2d),), overwrite=True)
    group.attrs.update({"draft_vocab_size": len(vocab.d2t), "covered_share": vocab.covered_share})


def read_draft_vocab(reader: StoreReader) -> DraftVocab:
    root = zarr.open_group(open_store(reader.location, read_only=True), mode="r", zarr_format=3)
    if VOCAB_GROUP not in root:
        raise HSStoreError(
            f"{reader.location} has no draft vocab; run `hsstore vocab {reader.location} --draft-vocab-size N`"
        )
    g = root[VOCAB_GROUP]
    d2t, t2d = np.asarray(g["d2t"][:]), np.asarray(g["t2d"][:])
    if len(t2d) != reader.manifest.target.vocab_size or int(t2d.sum()) != len(d2t):
        raise HSStoreError(f"{reader.location}/vocab: d2t/t2d do not match the target vocab; rebuild it")
    return DraftVocab(d2t, t2d, float(g.attrs.get("covered_share", float("nan"))))
