"""Length-aware packing: which samples share a row (planning), and the packed tensors of a batch.

Planning sees only sample lengths (from `StoreReader.index`), so an epoch's plan costs no token
reads. Best-fit decreasing runs inside consecutive windows of the shuffled order: rows come out
nearly full, yet a sample still lands near its shuffled position, so batch order stays random.
Rows of one window are shuffled again, or the longest samples would always open a window.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

ROW_KEYS = ("input_ids", "loss_mask")  # every other per-token tensor of a sample is a hidden-state array


@dataclass(frozen=True)
class PackStats:
    """What packing did to one epoch's samples; truncation is reported, never silent."""

    samples: int
    rows: int
    tokens: int  # after truncation
    max_tokens: int
    truncated: int  # samples longer than max_tokens
    truncated_tokens: int  # tokens those samples lost

    @property
    def fill(self) -> float:
        """Fraction of the rows' token budget holding real tokens."""
        return self.tokens / max(1, self.rows * self.max_tokens)

    def note(self) -> str | None:
        if not self.truncated:
            return None
        return (
            f"{self.truncated} of {self.samples} samples are longer than max_tokens={self.max_tokens} and are "
            f"truncated to it ({self.truncated_tokens} tokens dropped); raise --max-tokens-per-batch to keep them"
        )


def pack_rows(
    lengths: np.ndarray,
    order: np.ndarray,
    max_tokens: int,
    *,
    window: int = 1024,
    rng: np.random.Generator | None = None,
) -> list[list[int]]:
    """Rows of sample indices (from `order`), each holding at most max_tokens tokens after truncation.

    Best-fit decreasing per window of `window` samples of `order`: O(n log rows) with bisect, about a
    second per million samples. `rng` shuffles the rows of each window; None keeps them in fill order.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    order = np.asarray(order, dtype=np.int64)
    clipped = np.minimum(np.asarray(lengths, dtype=np.int64)[order], max_tokens)
    rows: list[list[int]] = []
    for lo in range(0, len(order), window):
        idx, lens = order[lo : lo + window], clipped[lo : lo + window]
        by_len = np.argsort(-lens, kind="stable")
        window_rows: list[list[int]] = []
        free: list[tuple[int, int]] = []  # (remaining tokens, row number), sorted: bisect finds the best fit
        for k in by_len.tolist():
            n = int(lens[k])
            at = bisect.bisect_left(free, (n, -1))
            if at < len(free):
                room, r = free.pop(at)
            else:
                room, r = max_tokens, len(window_rows)
                window_rows.append([])
            window_rows[r].append(int(idx[k]))
            if room - n > 0:
                bisect.insort(free, (room - n, r))
        if rng is not None:
            rng.shuffle(window_rows)
        rows.extend(window_rows)
    return rows


def pack_stats(lengths: np.ndarray, rows: Sequence[Sequence[int]], max_tokens: int) -> PackStats:
    lengths = np.asarray(lengths, dtype=np.int64)
    used = np.fromiter((i for row in rows for i in row), dtype=np.int64)
    lens = lengths[used]
    over = lens > max_tokens
    return PackStats(
        samples=len(used),
        rows=len(rows),
        tokens=int(np.minimum(lens, max_tokens).sum()),
        max_tokens=max_tokens,
        truncated=int(over.sum()),
        truncated_tokens=int((lens[over] - max_tokens).sum()),
    )


def pack_batch(
    rows: Sequence[Sequence[Mapping[str, torch.Tensor]]],
    sample_indices: Sequence[Sequence[int]],
    max_tokens: int,
    *,
    pad_id: int = 0,
    pad_to_multiple_of: int = 1,
) -> dict[str, object]:
    """Samples grouped by row -> the packed batch contract.

    input_ids long [B, T], loss_mask bool [B, T], one [B, T, ...] tensor per hidden array (its stored
    dtype: bf16, or a quantized codec's payload + scales when decoding is left to the device), position_ids
    long [B, T] restarting at 0 per sample, seq_ids long [B, T] = sample number within the row (-1 on
    padding), sample_indices (global store indices per row). Samples over max_tokens keep their head.
    """
    if not rows or not all(rows):
        raise ValueError("pack_batch needs at least one row and at least one sample per row")
    lens = [[min(len(s["input_ids"]), max_tokens) for s in row] for row in rows]
    width = max(sum(r) for r in lens)
    if width > max_tokens:
        raise ValueError(f"a row holds {width} tokens, over max_tokens={max_tokens}; rows must come from pack_rows")
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    first = rows[0][0]
    b = len(rows)
    out: dict[str, torch.Tensor] = {
        "input_ids": torch.full((b, width), pad_id, dtype=torch.long),
        "loss_mask": torch.zeros((b, width), dtype=torch.bool),
        "position_ids": torch.zeros((b, width), dtype=torch.long),
        "seq_ids": torch.full((b, width), -1, dtype=torch.long),
    }
    hidden = [k for k in first if k not in ROW_KEYS]
    for k in hidden:
        out[k] = torch.zeros((b, width, *first[k].shape[1:]), dtype=first[k].dtype)
    for r, (row, row_lens) in enumerate(zip(rows, lens, strict=True)):
        at = 0
        for j, (s, n) in enumerate(zip(row, row_lens, strict=True)):
            span = slice(at, at + n)
            out["input_ids"][r, span] = s["input_ids"][:n]
            out["loss_mask"][r, span] = s["loss_mask"][:n].bool()
            out["position_ids"][r, span] = torch.arange(n)
            out["seq_ids"][r, span] = j
            for k in hidden:
                out[k][r, span] = s[k][:n]
            at += n
    return {**out, "sample_indices": [list(map(int, ids)) for ids in sample_indices]}
