"""Queries over the sample table: length, source, loss tokens, ids. No token data is read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .reader import StoreReader


@dataclass(frozen=True)
class SampleQuery:
    min_len: int | None = None
    max_len: int | None = None
    sources: Sequence[str] = ()
    min_loss_tokens: int | None = None
    sample_ids: Sequence[str] = ()

    def select(self, reader: StoreReader) -> np.ndarray:
        """Global indices of matching samples, in store order."""
        idx = reader.index
        keep = np.ones(len(idx), dtype=bool)
        if self.min_len is not None:
            keep &= idx.length >= self.min_len
        if self.max_len is not None:
            keep &= idx.length <= self.max_len
        if self.min_loss_tokens is not None:
            keep &= idx.loss_tokens >= self.min_loss_tokens
        if self.sources:
            keep &= np.isin(idx.source, list(self.sources))
        if self.sample_ids:
            keep &= np.isin(reader.sample_ids, list(self.sample_ids))
        return np.flatnonzero(keep)


def rows_for(reader: StoreReader, indices: np.ndarray) -> list[dict]:
    """One plain dict per selected sample, for tables and JSON output."""
    idx = reader.index
    ids = reader.sample_ids
    return [
        {
            "index": int(i),
            "sample_id": str(ids[i]),
            "source": str(idx.source[i]),
            "length": int(idx.length[i]),
            "loss_tokens": int(idx.loss_tokens[i]),
            "part": int(idx.part[i]),
        }
        for i in indices
    ]
