"""Tokenized samples as an HF `datasets.Dataset`, cached on disk under a content key.

Rendering and masking 200k conversations takes minutes; a re-run (a crash, a second backend, another
layer choice) should not redo it. The cache key hashes what decides the output: the records' content,
the tokenizer (vocab, merges, specials, chat template), `seq_length` and the masking rules' version.
`Dataset.from_generator(fingerprint=key)` stores the result as Arrow files under `cache_dir`; the same
key finds them and nothing is tokenized again. Skipped samples stay in the cached table (with their
reason) so the skip report is the same on a cache hit, and are filtered out of the returned view.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .chat import check_chat_tokenizer, encode_record, tokenizer_fingerprint
from .skips import DataError, Reason, SkipCounter, SkipSample
from .sources import Record, records_fingerprint

MASK_VERSION = 1  # bump when rendering/masking rules change, so old caches are not reused
COLUMNS = ("input_ids", "loss_mask", "source", "sample_id")
_SKIP_COLUMNS = ["skip_reason", "skip_detail"]


def _features() -> Any:
    from datasets import Features, List, Value

    return Features(
        {
            "input_ids": List(Value("int32")),
            "loss_mask": List(Value("uint8")),
            "source": Value("string"),
            "sample_id": Value("string"),
            "skip_reason": Value("string"),
            "skip_detail": Value("string"),
        }
    )


def _generate(records: list[Record], tokenizer: Any, seq_length: int) -> Iterator[dict[str, Any]]:
    for record in records:
        try:
            encoded = encode_record(record, tokenizer, seq_length)
            ids, mask, reason, detail = encoded.input_ids, encoded.loss_mask, "", ""
        except SkipSample as skip:
            ids, mask, reason, detail = [], [], skip.reason.value, skip.detail
        yield {
            "input_ids": ids,
            "loss_mask": mask,
            "source": record.source,
            "sample_id": record.sample_id,
            "skip_reason": reason,
            "skip_detail": detail,
        }


def cache_key(records: Sequence[Record], tokenizer: Any, seq_length: int) -> str:
    """The content key of a tokenization: same records, tokenizer and length give the same key."""
    parts = {
        "records": records_fingerprint(records),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "seq_length": seq_length,
        "mask_version": MASK_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _report_skips(table: Any, key: str, skips: SkipCounter) -> None:
    skipped = table.filter(lambda reason: reason != "", input_columns="skip_reason", new_fingerprint=f"{key}-skipped")
    for row in skipped.select_columns(["source", "sample_id", *_SKIP_COLUMNS]):
        skips.skip(Reason(row["skip_reason"]), f"{row['source']} id={row['sample_id']}", row["skip_detail"] or "")


def tokenize_dataset(
    records: Sequence[Record],
    tokenizer: Any,
    seq_length: int,
    cache_dir: str | Path | None = None,
    *,
    skips: SkipCounter | None = None,
    num_proc: int | None = None,
) -> Any:
    """Render, tokenize and mask `records` -> `datasets.Dataset` with columns input_ids (int32),
    loss_mask (uint8), source, sample_id, in record order, skipped samples left out (and counted in
    `skips`, which raises on the first one when strict). Cached under `cache_dir` (default: the HF
    datasets cache) by content, see the module docstring."""
    from datasets import Dataset

    if seq_length <= 0:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    if not records:
        raise DataError("nothing to tokenize: the inputs are empty or every row was skipped")
    check_chat_tokenizer(tokenizer, need_template=any(r.messages is not None for r in records))
    skips = skips if skips is not None else SkipCounter()
    key = cache_key(records, tokenizer, seq_length)
    table = Dataset.from_generator(
        _generate,
        features=_features(),
        cache_dir=str(cache_dir) if cache_dir is not None else None,
        gen_kwargs={"records": list(records), "tokenizer": tokenizer, "seq_length": seq_length},
        num_proc=num_proc if num_proc and num_proc > 1 and len(records) >= num_proc else None,
        fingerprint=key,
    )
    _report_skips(table, key, skips)
    kept = table.filter(lambda reason: reason == "", input_columns="skip_reason", new_fingerprint=f"{key}-kept")
    return kept.remove_columns(_SKIP_COLUMNS)
