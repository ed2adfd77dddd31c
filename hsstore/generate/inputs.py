"""The data side of `hsstore generate` in one call: inputs -> tokenized samples + manifest provenance.

Glue only: `sources` reads and normalizes, `dataset` renders/masks/caches, `chat` describes the
tokenizer. The result carries what the pipeline and the manifest need, and the skip report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..manifest import SourceInfo, TokenizerInfo
from .chat import tokenizer_info
from .dataset import tokenize_dataset
from .skips import DataError, SkipCounter
from .sources import load_records, resolve_sources, source_infos


@dataclass(frozen=True)
class TokenizedSample:
    """One sample ready for a backend: int32 ids, uint8 mask (1 = train on this token)."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    source: str
    sample_id: str


@dataclass
class LoadedSamples:
    samples: list[TokenizedSample]
    tokenizer_info: TokenizerInfo
    sources: tuple[SourceInfo, ...]
    skips: SkipCounter = field(default_factory=SkipCounter)

    def report(self, console: Any) -> None:
        """Print the skip counts (with examples and fixes) and notes on a rich Console, if any.

        Markup is off: sample text such as "[/INST]" would read as rich closing tags."""
        text = self.skips.report()
        if text:
            console.print(text, markup=False, highlight=False)


def _no_samples(data: Sequence[str | Path], skips: SkipCounter) -> DataError:
    return DataError(f"no usable samples in {', '.join(map(str, data))}\n{skips.report()}".rstrip())


def load_samples(
    data: Sequence[str | Path],
    tokenizer: Any,
    *,
    seq_length: int,
    max_samples: int | None = None,
    seed: int = 0,
    shuffle: bool = False,
    cache_dir: str | Path | None = None,
    strict: bool = False,
    num_proc: int | None = None,
) -> LoadedSamples:
    """Read `data`, render and mask it with `tokenizer`'s chat template, cut to `seq_length` tokens.

    `max_samples` counts conversations read (before tokenization skips). `strict` raises `DataError`
    at the first bad sample instead of skipping it."""
    skips = SkipCounter(strict=strict)
    records = load_records(data, max_samples=max_samples, shuffle=shuffle, seed=seed, skips=skips)
    if not records:
        raise _no_samples(data, skips)
    table = tokenize_dataset(records, tokenizer, seq_length, cache_dir, skips=skips, num_proc=num_proc)
    if len(table) == 0:
        raise _no_samples(data, skips)
    samples = [
        TokenizedSample(
            np.asarray(row["input_ids"], dtype=np.int32),
            np.asarray(row["loss_mask"], dtype=np.uint8),
            row["source"],
            row["sample_id"],
        )
        for row in table.with_format("numpy")
    ]
    infos = tuple(source_infos(records, resolve_sources(data)))
    return LoadedSamples(samples, tokenizer_info(tokenizer), infos, skips)
