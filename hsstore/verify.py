"""`hsstore verify`: read every committed byte once and check it against its checksum.

Compressed arrays carry a crc32c per chunk (checked by zarr on decode); raw arrays carry a crc32c
per shard in `shard_crc32c/` (per-chunk checksums would break zero-copy views). Sample content
hashes are recomputed from the stored tokens and masks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import crc32c
import numpy as np

from . import layout
from .errors import HSStoreError
from .reader import PartReader, StoreReader
from .writer import content_hash


@dataclass
class VerifyReport:
    location: str
    shards_checked: int = 0
    samples_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(location: str, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Check every shard and sample of a store; problems are collected, not raised."""
    report = VerifyReport(location)
    try:
        reader = StoreReader(location)
    except HSStoreError as e:
        report.problems.append(str(e))
        return report
    geometry = reader.manifest.geometry
    for part in reader.parts:
        found = len(report.problems)
        n_shards = -(-part.commit.tokens // geometry.shard_tokens)
        for a in reader.arrays:
            for k in range(n_shards):
                _check_shard(part, a, k, geometry.shard_tokens, geometry.chunk_tokens, report)
                if progress:
                    progress(1)
        _check_samples(part, report)
        if len(report.problems) > found and not part.commit.closed:
            # a writer killed mid-commit leaves its last shard's crc and token_freq behind the data
            report.problems[found:] = [
                f"{p} (the part's writer did not close; `--resume` repairs a crash)" for p in report.problems[found:]
            ]
    return report


def _check_shard(part: PartReader, a: layout.TokenArray, k: int, shard: int, chunk: int, report: VerifyReport) -> None:
    stop = min(part.commit.tokens, (k + 1) * shard)
    try:
        if a.stored.raw_layout:
            crcs = part.group[f"shard_crc32c/{a.name}"]
            if k >= crcs.shape[0]:
                report.problems.append(f"{part.where}/{a.name} shard {k}: no checksum recorded")
                return
            expected = int(crcs[k])
            raw = part.local_arrays.get(a.name)
            if raw is not None:
                actual = raw.shard(k).data_crc32c()
            else:  # remote store: checksum the rows as zarr returns them, zero-padded to whole chunks as written
                rows = np.asarray(part.arrays[a.name][k * shard : (k + 1) * shard])
                pad = (-len(rows)) % chunk
                actual = crc32c.crc32c(
                    np.ascontiguousarray(np.concatenate([rows, np.zeros_like(rows[:1].repeat(pad, 0))]))
                )
            if actual != expected:
                report.problems.append(f"{part.where}/{a.name} shard {k}: crc32c {actual:#010x} != {expected:#010x}")
        else:
            part.read(a.name, k * shard, stop)
    except HSStoreError as e:
        report.problems.append(str(e))
    finally:
        report.shards_checked += 1


def _check_samples(part: PartReader, report: VerifyReport) -> None:
    try:
        offsets = part.sample_column("offset")
        lengths = part.sample_column("length")
        hashes = part.sample_column("content_hash")
        loss = part.sample_column("loss_tokens")
        freq = np.asarray(part.group[layout.TOKEN_FREQ][:])
        if int(freq.sum()) != part.commit.loss_tokens:
            report.problems.append(
                f"{part.where}: token_freq sums to {int(freq.sum())}, the commit names {part.commit.loss_tokens}"
            )
        for off, n, h, nl in zip(offsets, lengths, hashes, loss, strict=True):
            ids = part.read("input_ids", int(off), int(off + n))
            mask = part.read("loss_mask", int(off), int(off + n))
            if content_hash(ids, mask) != int(h) or int(mask.sum()) != int(nl):
                report.problems.append(f"{part.where}: sample at row {int(off)} does not match its content hash")
            report.samples_checked += 1
    except HSStoreError as e:
        report.problems.append(str(e))
