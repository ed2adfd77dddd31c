"""The commit record: a part's only truth about how much of its data is complete.

Writers write whole shards, then the sample table, then this record (one atomic write of the part's
zarr.json). A crash before the record leaves the previous one in force, and everything it names is
still intact, because shards and index chunks are replaced by atomic renames, never edited in place.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import CorruptStoreError


@dataclass
class CommitRecord:
    samples: int = 0  # complete samples, rows 0..tokens of the part
    tokens: int = 0  # rows that belong to complete samples
    loss_tokens: int = 0
    shards: int = 0  # shard slots holding committed rows
    source_names: list[str] = field(default_factory=list)  # samples/source indexes this list
    closed: bool = False  # the writer finished cleanly (no partial sample in flight)
    updated_at: str = ""

    def stamped(self) -> dict[str, Any]:
        self.updated_at = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        return asdict(self)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any] | None, where: str) -> CommitRecord:
        if attrs is None:
            return cls()
        try:
            rec = cls(**attrs)
        except TypeError as e:
            raise CorruptStoreError(f"{where}: malformed commit record ({e})") from e
        if min(rec.samples, rec.tokens, rec.loss_tokens, rec.shards) < 0 or rec.loss_tokens > rec.tokens:
            raise CorruptStoreError(f"{where}: impossible commit record {attrs}")
        return rec
