"""The manifest: a typed, versioned description of a store, kept in the root group's attributes.

Everything a reader must not guess lives here: which target produced the states, which layers (in
vLLM's numbering) fill which array, each array's codec and logical dtype, the chunk geometry and the
data-parallel parts. Counts are not stored here: each part's commit record owns its own, and the
reader sums them, so concurrent ranks never race on one file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import platform
import sys
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from . import __version__
from .codecs import CODECS
from .dtypes import logical_dtypes
from .errors import IncompatibleStoreError

FORMAT_NAME = "hsstore"
FORMAT_VERSION = 1
MANIFEST_KEY = "hsstore"
LAYER_CONVENTION = (
    "vllm: layer id k is the input of decoder layer k (id 0 = embeddings); "
    "id N = the last decoder layer's output before the final norm"
)


@dataclass(frozen=True)
class TargetInfo:
    """The model whose hidden states the store holds."""

    name_or_path: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    dtype: str = "bfloat16"
    revision: str | None = None
    config_hash: str | None = None


@dataclass(frozen=True)
class HiddenSpec:
    """One hidden-state array: a role (aux, last, ...) holding one or more target layers."""

    role: str
    layer_ids: tuple[int, ...]
    hidden_size: int
    codec: str = "lossless"
    logical_dtype: str = "bfloat16"

    @property
    def per_token_shape(self) -> tuple[int, ...]:
        """[L, H] for several layers, [H] for one (the EAGLE-3 `last` role)."""
        if len(self.layer_ids) == 1:
            return (self.hidden_size,)
        return (len(self.layer_ids), self.hidden_size)


TEACHER_KINDS = ("topk",)
TOPK_LOGPROB_DTYPES = ("float16", "float32")
TOPK_IDS_DTYPES = ("uint16", "int32")
TOPK_LOGPROB_FLOOR = -60.0  # log-probs below are stored as this: finite in fp16, exp() ~ 1e-26 is nothing


def topk_ids_dtype(vocab_size: int) -> str:
    """The narrowest stored dtype that holds every target token id."""
    return "uint16" if vocab_size <= 65536 else "int32"


@dataclass(frozen=True)
class TeacherSpec:
    """The target's next-token distribution, stored instead of (or beside) the `last` hidden role.

    kind "topk": per token j, the k largest log-probs of the target's full-vocab log-softmax at j and their
    token ids, sorted descending, only where j is a teacher position (token j + 1 is in the loss mask and
    in the same sample); other rows are zeros. Computed from layer `layer_id` (N: the last layer) through
    the target's final norm and lm_head; log-probs are clamped to `logprob_floor` so fp16 stays finite.
    """

    k: int
    layer_id: int
    kind: str = "topk"
    ids_dtype: str = "uint16"
    logprob_dtype: str = "float16"
    logprob_floor: float = TOPK_LOGPROB_FLOOR

    @classmethod
    def topk(cls, k: int, layer_id: int, vocab_size: int, logprob_dtype: str = "float16") -> TeacherSpec:
        return cls(k=k, layer_id=layer_id, ids_dtype=topk_ids_dtype(vocab_size), logprob_dtype=logprob_dtype)


@dataclass(frozen=True)
class TokenizerInfo:
    name_or_path: str | None = None
    hash: str | None = None
    chat_template_hash: str | None = None


@dataclass(frozen=True)
class SourceInfo:
    name: str
    path: str | None = None
    content_hash: str | None = None


@dataclass(frozen=True)
class Geometry:
    """Chunks are small along tokens for cheap random access; shards pack them into few files."""

    chunk_tokens: int = 64
    shard_tokens: int = 16384

    def __post_init__(self) -> None:
        if self.chunk_tokens <= 0 or self.shard_tokens <= 0 or self.shard_tokens % self.chunk_tokens:
            raise IncompatibleStoreError(
                f"shard_tokens ({self.shard_tokens}) must be a positive multiple of chunk_tokens ({self.chunk_tokens})"
            )


@dataclass(frozen=True)
class Manifest:
    target: TargetInfo
    hidden: tuple[HiddenSpec, ...]
    geometry: Geometry = Geometry()
    num_parts: int = 1
    tokenizer: TokenizerInfo = TokenizerInfo()
    sources: tuple[SourceInfo, ...] = ()
    max_seq_length: int | None = None
    layer_convention: str = LAYER_CONVENTION
    format_version: int = FORMAT_VERSION
    created_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    tool_version: str = __version__
    library_versions: dict[str, str] = field(default_factory=lambda: library_versions())
    command: str = field(default_factory=lambda: " ".join(sys.argv))
    extra: dict[str, Any] = field(default_factory=dict)
    teacher: TeacherSpec | None = None

    def __post_init__(self) -> None:
        self.validate()

    # --- validation -----------------------------------------------------------------------
    def validate(self) -> None:
        if not self.hidden:
            raise IncompatibleStoreError("manifest declares no hidden-state arrays")
        roles = [h.role for h in self.hidden]
        if len(set(roles)) != len(roles):
            raise IncompatibleStoreError(f"hidden roles must be unique, got {roles}")
        for h in self.hidden:
            if h.codec not in CODECS:
                raise IncompatibleStoreError(f"role {h.role!r}: unknown codec {h.codec!r} (known: {sorted(CODECS)})")
            if h.logical_dtype not in logical_dtypes():
                raise IncompatibleStoreError(f"role {h.role!r}: unknown dtype {h.logical_dtype!r}")
            if h.hidden_size != self.target.hidden_size:
                raise IncompatibleStoreError(
                    f"role {h.role!r}: hidden size {h.hidden_size} != target hidden size {self.target.hidden_size}"
                )
            bad = [i for i in h.layer_ids if not 0 <= i <= self.target.num_layers]
            if bad or not h.layer_ids:
                raise IncompatibleStoreError(
                    f"role {h.role!r}: layer ids {list(h.layer_ids)} must be non-empty and within "
                    f"0..{self.target.num_layers} ({LAYER_CONVENTION})"
                )
        if self.num_parts < 1:
            raise IncompatibleStoreError(f"num_parts must be >= 1, got {self.num_parts}")
        if self.teacher is not None:
            self._validate_teacher(self.teacher)

    def _validate_teacher(self, t: TeacherSpec) -> None:
        vocab = self.target.vocab_size
        if t.kind not in TEACHER_KINDS:
            raise IncompatibleStoreError(f"teacher: unknown kind {t.kind!r} (known: {list(TEACHER_KINDS)})")
        if not 1 <= t.k <= vocab:
            raise IncompatibleStoreError(f"teacher: k = {t.k} must be within 1..{vocab} (the target vocab)")
        if not 0 <= t.layer_id <= self.target.num_layers:
            raise IncompatibleStoreError(
                f"teacher: layer id {t.layer_id} must be within 0..{self.target.num_layers} ({LAYER_CONVENTION})"
            )
        if t.logprob_dtype not in TOPK_LOGPROB_DTYPES:
            raise IncompatibleStoreError(
                f"teacher: log-prob dtype {t.logprob_dtype!r} not one of {list(TOPK_LOGPROB_DTYPES)}"
            )
        if t.ids_dtype not in TOPK_IDS_DTYPES or (t.ids_dtype == "uint16" and vocab > 65536):
            raise IncompatibleStoreError(
                f"teacher: ids dtype {t.ids_dtype!r} cannot hold the ids of a {vocab}-token vocab "
                f"(use {topk_ids_dtype(vocab)!r})"
            )
        if not t.logprob_floor < 0 or t.logprob_floor < -60000.0:  # fp16 holds down to -65504
            raise IncompatibleStoreError(f"teacher: log-prob floor {t.logprob_floor} must be in [-60000, 0)")

    def hidden_spec(self, role: str) -> HiddenSpec:
        for h in self.hidden:
            if h.role == role:
                return h
        raise KeyError(f"store has no hidden role {role!r}; roles: {[h.role for h in self.hidden]}")

    @property
    def roles(self) -> list[str]:
        return [h.role for h in self.hidden]

    # --- compatibility --------------------------------------------------------------------
    def content_fields(self) -> dict[str, Any]:
        """What must match for two writers to add to the same store (provenance may differ)."""
        return {
            "target": asdict(self.target),
            "hidden": [asdict(h) for h in self.hidden],
            "geometry": asdict(self.geometry),
            "num_parts": self.num_parts,
            "tokenizer": asdict(self.tokenizer),
            "max_seq_length": self.max_seq_length,
            "teacher": asdict(self.teacher) if self.teacher is not None else None,
        }

    def check_same_content(self, other: Manifest, where: str) -> None:
        mine, theirs = self.content_fields(), other.content_fields()
        diffs = [f"{k}: store has {theirs[k]!r}, this run has {mine[k]!r}" for k in mine if mine[k] != theirs[k]]
        if diffs:
            raise IncompatibleStoreError(
                f"{where} was written with a different configuration ({'; '.join(diffs)}); "
                "write to a new store, or rerun with the store's settings"
            )

    # --- (de)serialization ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = FORMAT_NAME
        if d["teacher"] is None:  # stores without a teacher keep exactly the fields they always had
            del d["teacher"]
        return _jsonable(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "store") -> Manifest:
        if d.get("format") != FORMAT_NAME:
            raise IncompatibleStoreError(f"{where} is not an hsstore store (format={d.get('format')!r})")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise IncompatibleStoreError(
                f"{where} has format version {version}, this hsstore ({__version__}) reads version "
                f"{FORMAT_VERSION}; use a matching hsstore release or regenerate the store"
            )
        try:
            kwargs = {f.name: d[f.name] for f in fields(cls) if f.name in d}
            kwargs["target"] = TargetInfo(**d["target"])
            kwargs["hidden"] = tuple(HiddenSpec(**{**h, "layer_ids": tuple(h["layer_ids"])}) for h in d["hidden"])
            kwargs["geometry"] = Geometry(**d.get("geometry", {}))
            kwargs["tokenizer"] = TokenizerInfo(**d.get("tokenizer", {}))
            kwargs["sources"] = tuple(SourceInfo(**s) for s in d.get("sources", ()))
            if d.get("teacher") is not None:
                kwargs["teacher"] = TeacherSpec(**d["teacher"])
            return cls(**kwargs)
        except (KeyError, TypeError) as e:
            raise IncompatibleStoreError(f"{where} has a malformed manifest ({type(e).__name__}: {e})") from e


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("zarr", "numcodecs", "torch", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x
