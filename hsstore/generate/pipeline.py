"""generate: tokenized samples -> target hidden states -> store, resumable and data-parallel.

Write order is deterministic (rank's share of the dataset, sorted by length within fixed windows so
batches pad little), so a resumed run skips exactly the samples its part has committed and checks
the last one's content hash to catch inputs that changed in between.

The teacher is the last layer (`last` role) or the target's top-k distribution computed from it
(`--teacher topk`, see `head.py`), or both: the backend captures layer N either way.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from ..errors import HSStoreError, IncompatibleStoreError
from ..manifest import Geometry, HiddenSpec, Manifest, SourceInfo, TargetInfo, TeacherSpec, TokenizerInfo
from ..writer import COMMIT_SECONDS, StoreWriter, content_hash
from .backends import HiddenStateBackend
from .inputs import TokenizedSample
from .layers import validate_layer_ids

if TYPE_CHECKING:
    from .head import TopkHead

SORT_WINDOW = 1024  # samples sorted by length together: little padding, bounded reordering
TeacherMode = Literal["last", "topk", "both"]
TEACHER_MODES = ("last", "topk", "both")
# 16 x (2-byte id + 2-byte log-prob) = 64 bytes per teacher token, ~0.3% of an 8B target's aux layers
# (3 x 4096 bf16); chat targets put most of their probability on far fewer tokens. A sweep is cheap: --topk.
DEFAULT_TOPK = 16
# `hsstore generate`'s defaults: the smallest store whose draft kept the raw-bf16 draft's accuracy in
# benchmarks/quality_bench.py (table in benchmarks/results/quality_bench.txt: mxfp3 + top-16 is 7.7x smaller
# than .pt at hidden 256 with τ est within 0.001 of raw on two seeds). Measured on a small target only:
# --codec mxfp4 (12% error per token instead of 24%) is the cautious choice for a first run at scale.
DEFAULT_CODEC = "mxfp3"
DEFAULT_TEACHER: TeacherMode = "topk"


@dataclass
class GenerateStats:
    samples: int = 0
    tokens: int = 0
    skipped_resume: int = 0
    forward_seconds: float = 0.0
    teacher_seconds: float = 0.0  # top-k teacher: final norm + lm_head + top-k on the captured last layer
    write_seconds: float = 0.0
    wall_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StoreSettings:
    out: str
    codec: str = DEFAULT_CODEC
    aux_layer_ids: Sequence[int] = ()
    geometry: Geometry = field(default_factory=Geometry)
    num_shards: int = 1
    shard_index: int = 0
    resume: bool = False
    overwrite: bool = False
    batch_tokens: int = 8192
    max_seq_length: int | None = None
    teacher: TeacherMode = DEFAULT_TEACHER  # last layer, top-k distribution, or both
    topk: int = DEFAULT_TOPK
    device: str = "cpu"  # where the top-k teacher's lm_head runs
    commit_seconds: float = COMMIT_SECONDS  # group commit interval: what a crash may lose


def build_manifest(
    backend: HiddenStateBackend,
    model: str,
    settings: StoreSettings,
    tokenizer_info: TokenizerInfo,
    sources: Sequence[SourceInfo],
    dtype: str = "bfloat16",
) -> Manifest:
    """The manifest a run would write; compared field by field with an existing store's."""
    validate_layer_ids(settings.aux_layer_ids, backend.num_layers)
    n, h, vocab = backend.num_layers, backend.hidden_size, backend.vocab_size
    if settings.teacher not in TEACHER_MODES:
        raise HSStoreError(f"--teacher {settings.teacher!r}: choose one of {', '.join(TEACHER_MODES)}")
    teacher = None
    if settings.teacher != "last":
        if not 1 <= settings.topk <= vocab:
            raise HSStoreError(f"--topk {settings.topk} must be within 1..{vocab} (the target's vocab)")
        teacher = TeacherSpec.topk(settings.topk, n, vocab)
    hidden = [HiddenSpec("aux", tuple(settings.aux_layer_ids), h, settings.codec, dtype)]
    if settings.teacher != "topk":
        hidden.append(HiddenSpec("last", (n,), h, settings.codec, dtype))
    return Manifest(
        target=TargetInfo(model, h, n, vocab, dtype=dtype, config_hash=config_hash(model)),
        hidden=tuple(hidden),
        teacher=teacher,
        geometry=settings.geometry,
        num_parts=settings.num_shards,
        tokenizer=tokenizer_info,
        sources=tuple(sources),
        max_seq_length=settings.max_seq_length,
    )


def config_hash(model: str) -> str | None:
    """Hash of the target's config.json: two stores agree on the target only if this matches."""
    path = Path(model) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    config.pop("transformers_version", None)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def write_order(samples: Sequence[TokenizedSample], num_shards: int, shard_index: int) -> list[TokenizedSample]:
    """This rank's samples, longest first within each window of SORT_WINDOW (deterministic)."""
    mine = list(samples[shard_index::num_shards])
    ordered: list[TokenizedSample] = []
    for start in range(0, len(mine), SORT_WINDOW):
        window = mine[start : start + SORT_WINDOW]
        ordered.extend(sorted(window, key=lambda s: -len(s.input_ids)))
    return ordered


def token_budget_batches(samples: Sequence[TokenizedSample], batch_tokens: int) -> Iterator[list[TokenizedSample]]:
    """Consecutive samples grouped so that batch size x longest length stays within the budget."""
    batch: list[TokenizedSample] = []
    longest = 0
    for s in samples:
        n = len(s.input_ids)
        if batch and max(longest, n) * (len(batch) + 1) > batch_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(s)
        longest = max(longest, n)
    if batch:
        yield batch


def resume_point(writer: StoreWriter, ordered: Sequence[TokenizedSample]) -> int:
    """How many samples of `ordered` the part already holds; refuses if they are not the same ones."""
    done = writer.commit.samples
    if done == 0:
        return 0
    if done > len(ordered):
        raise IncompatibleStoreError(
            f"{writer.location}: part {writer.rank} holds {done} samples but this run has only {len(ordered)}; "
            "the inputs changed since the store was started (same --data, --max-samples, --seed needed)"
        )
    last = ordered[done - 1]
    stored = int(writer._samples["content_hash"][done - 1])
    if content_hash(last.input_ids, last.loss_mask) != stored:
        raise IncompatibleStoreError(
            f"{writer.location}: sample {done - 1} ({last.sample_id!r}) differs from the one stored there; "
            "the inputs, tokenizer or chat template changed since the store was started"
        )
    return done


def run_generate(
    backend: HiddenStateBackend,
    manifest: Manifest,
    samples: Sequence[TokenizedSample],
    settings: StoreSettings,
    on_progress: Callable[[int, int, tuple[int, int] | None], None] | None = None,
    head: TopkHead | None = None,
) -> GenerateStats:
    """Capture hidden states for this rank's samples and append them to its part of the store.

    A store with a top-k teacher needs `head` (default: loaded from the manifest's target on settings.device)."""
    stats = GenerateStats()
    t0 = time.perf_counter()
    aux_ids = list(manifest.hidden_spec("aux").layer_ids)
    layer_ids = [*aux_ids, manifest.target.num_layers]
    if manifest.teacher is not None:
        if manifest.teacher.layer_id != manifest.target.num_layers:
            raise HSStoreError(f"the top-k teacher comes from the last layer ({manifest.target.num_layers})")
        if head is None:
            from .head import TopkHead

            head = TopkHead.from_target(manifest.target.name_or_path, manifest.teacher.k, device=settings.device)
        if head.k != manifest.teacher.k:
            raise HSStoreError(f"the top-k head gives k = {head.k}, the store keeps k = {manifest.teacher.k}")
    ordered = write_order(samples, settings.num_shards, settings.shard_index)
    if not ordered:
        raise HSStoreError(f"no samples for shard {settings.shard_index} of {settings.num_shards}: nothing to do")
    with StoreWriter(
        settings.out,
        manifest,
        rank=settings.shard_index,
        resume=settings.resume,
        overwrite=settings.overwrite,
        commit_seconds=settings.commit_seconds,
    ) as writer:
        skip = resume_point(writer, ordered)
        stats.skipped_resume = skip
        if on_progress and skip:
            on_progress(skip, sum(len(s.input_ids) for s in ordered[:skip]), writer.bytes_written)
        for batch in token_budget_batches(ordered[skip:], settings.batch_tokens):
            f0 = time.perf_counter()
            states = backend.hidden_states([s.input_ids for s in batch], layer_ids)
            f1 = time.perf_counter()
            roles = [split_roles(h, len(aux_ids)) for h in states]
            teachers = [None] * len(batch)
            if head is not None:
                teachers = head.teachers([r["last"] for r in roles], [s.loss_mask for s in batch])
            f2 = time.perf_counter()
            for s, r, t in zip(batch, roles, teachers, strict=True):
                writer.append(
                    s.input_ids,
                    s.loss_mask,
                    {role: x for role, x in r.items() if role in manifest.roles},
                    sample_id=s.sample_id,
                    source=s.source,
                    teacher=t,
                    copy=False,  # the backend's tensors are fresh for every batch and never written again
                )
            stats.forward_seconds += f1 - f0
            stats.teacher_seconds += f2 - f1
            stats.write_seconds += time.perf_counter() - f2
            n_tokens = sum(len(s.input_ids) for s in batch)
            stats.samples += len(batch)
            stats.tokens += n_tokens
            if on_progress:
                on_progress(len(batch), n_tokens, writer.bytes_written)
        c0 = time.perf_counter()
    stats.write_seconds += time.perf_counter() - c0  # close(): last shard and the wait for the writer
    stats.wall_seconds = time.perf_counter() - t0
    return stats


def split_roles(states: torch.Tensor, n_aux: int) -> dict[str, torch.Tensor]:
    """[n, n_aux + 1, H] captured states -> the store's roles (a single layer is stored as [n, H])."""
    aux = states[:, :n_aux]
    return {"aux": aux[:, 0] if n_aux == 1 else aux, "last": states[:, n_aux]}
