"""`hsstore prepare`: write the normalized conversations as JSONL, to look at (or fix) before generating.

Each line is {"id", "source", "messages": [{"role", "content"}]} (or {"id", "source", "text"}), the
exact form `load_records` reads back: a prepared file given as input reproduces the same records,
source names and ids included. It is also the way to bring a hub dataset onto an offline machine.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .skips import DataError, SkipCounter
from .sources import Record, load_records


@dataclass(frozen=True)
class PrepareResult:
    path: Path
    written: int
    per_source: dict[str, int]


def write_jsonl(records: Iterable[Record], out_path: str | Path, overwrite: bool = False) -> PrepareResult:
    """Write records one per line; the file appears only once complete (written aside, then renamed)."""
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise DataError(f"{out_path} already exists; remove it or pass overwrite (--overwrite)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.partial-{os.getpid()}")
    per_source: Counter[str] = Counter()
    try:
        with partial.open("w", encoding="utf-8") as fp:
            for record in records:
                fp.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
                per_source[record.source] += 1
        partial.replace(out_path)
    finally:
        partial.unlink(missing_ok=True)
    return PrepareResult(out_path, sum(per_source.values()), dict(per_source))


def prepare(
    inputs: Sequence[str | Path],
    out_path: str | Path,
    *,
    max_samples: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    skips: SkipCounter | None = None,
    overwrite: bool = False,
) -> PrepareResult:
    """Load `inputs` exactly as `generate` would (same skips, limit and shuffle) and write them to `out_path`."""
    records = load_records(inputs, max_samples=max_samples, shuffle=shuffle, seed=seed, skips=skips)
    return write_jsonl(records, out_path, overwrite=overwrite)
