"""Trainer benchmark: `hsstore train` fed from raw / lossless / fp8 stores vs from one .pt file per sample.

Every variant is a real `hsstore train` run (python -m hsstore.train, one process, Accelerate) over the same
samples, with the same draft, target, seed, packing plan, max_tokens_per_batch, workers and step count. The .pt
run is the same command with one substitution: its TrainLoader reads each sample with torch.load of a
store_bench-style .pt file instead of StoreReader[i] (plan, packing, collate and workers unchanged).

Tokens/s and the data-wait share are what the trainer itself writes to OUT/metrics.jsonl (logged every step):
wait = time blocked in next(loader) + to_device, step = wait + forward/backward/optimizer. The first
--warmup steps (worker start-up, first batches) are left out. Each step's token count comes from the
sampler's plan (the same for every format); step time = tokens / logged tok/s.
"loader alone" iterates the same TrainLoader with to_device and no model, in this process: the tok/s a
faster (GPU) trainer could draw before it starts to wait.

Target: a random-weight Llama saved with save_pretrained under benchmarks/.cache/ (the draft loads its
embedding, the teacher its norm and lm_head). Data: synthetic LLM-like activations (store_bench's
generator), written to the page cache just before the runs, so this measures decode + packing, not disk.
On CPU the draft's compute dwarfs the data path; fewer TTT steps (--ttt-steps, default 2 instead of the
trainer's 7) make compute cheaper and the loader test stricter.

    python benchmarks/train_bench.py            # ~7 min on 2 cores
    python benchmarks/train_bench.py --quick    # under 2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store_bench import (  # a sibling script, not a package
    ActivationStats,
    Dataset,
    Sample,
    chat_lengths,
    disk_bytes,
    hsstore_revision,
    pt_path,
    write_pt,
    write_store,
)

from hsstore import StoreReader, TargetInfo

FORMATS = ("pt", "raw", "lossless", "fp8")
COLUMNS = {"pt": "pt-baseline", "raw": "raw", "lossless": "lossless", "fp8": "fp8"}
WAIT_TARGET = 0.05
CACHE = Path(__file__).resolve().parent / ".cache"
PT_WORKER_FLAG = "--pt-worker"
# TrainLoader's own arguments among build_loader's (the rest plan the batches or open the store)
LOADER_ARGS = ("num_workers", "prefetch_factor", "pin_memory", "pad_id", "pad_to_multiple_of", "noise")
LOADER_ARGS += ("multiprocessing_context",)

console = Console(width=120)


# --- configuration ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """Sizes of the target, the data and the runs (argparse fills it; --quick swaps in small ones)."""

    quick: bool
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    draft_vocab: int
    max_tokens: int
    steps: int
    warmup: int
    ttt_steps: int
    num_workers: int
    repeats: int
    mixed_precision: str
    median_len: int
    seed: int
    workdir: Path | None
    keep: bool

    @property
    def aux_layers(self) -> tuple[int, ...]:
        """EAGLE-3's low / middle / high picks; any distinct ids do (the weights are random)."""
        return (1, self.layers // 2, self.layers - 1)

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="hidden 256, a few steps: a smoke test under 2 minutes")
    p.add_argument("--hidden", type=int, help="target (and draft) hidden size (default 1024)")
    p.add_argument("--layers", type=int, default=4, help="target layers (only the saved checkpoint's size)")
    p.add_argument("--heads", type=int, help="attention heads (default hidden / 128)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (default heads / 4)")
    p.add_argument("--intermediate", type=int, help="MLP width (default 2 x hidden)")
    p.add_argument("--vocab", type=int, default=16384, help="target vocab")
    p.add_argument("--draft-vocab", type=int, default=4096, help="draft vocab (hsstore vocab on each store)")
    p.add_argument("--max-tokens", type=int, help="--max-tokens-per-batch (default 1024)")
    p.add_argument("--steps", type=int, help="measured optimizer steps per run (default 8)")
    p.add_argument("--warmup", type=int, help="steps run first and left out of the numbers (default 2)")
    p.add_argument("--ttt-steps", type=int, help="TTT unroll (default 2; the trainer's default is 7)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers of the trainer")
    p.add_argument("--repeats", type=int, help="runs per format, round robin; the fastest is kept (default 2)")
    p.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "bf16"), help="passed to the trainer")
    p.add_argument("--median-len", type=int, help="median sample length in tokens (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="where to write stores and runs (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    a = p.parse_args(argv)

    def pick(value: Any, default: Any, quick_default: Any) -> Any:
        return value if value is not None else (quick_default if a.quick else default)

    hidden = pick(a.hidden, 1024, 256)
    heads = a.heads or max(1, hidden // 128)
    return Config(
        quick=a.quick,
        hidden=hidden,
        layers=a.layers,
        heads=heads,
        kv_heads=a.kv_heads or max(1, heads // 4),
        intermediate=a.intermediate or 2 * hidden,
        vocab=a.vocab if not a.quick else min(a.vocab, 4096),
        draft_vocab=a.draft_vocab if not a.quick else min(a.draft_vocab, 1024),
        max_tokens=pick(a.max_tokens, 1024, 512),
        steps=pick(a.steps, 8, 4),
        warmup=pick(a.warmup, 2, 1),
        ttt_steps=pick(a.ttt_steps, 2, 1),
        num_workers=a.num_workers,
        repeats=pick(a.repeats, 2, 1),
        mixed_precision=a.mixed_precision,
        median_len=pick(a.median_len, 300, 150),
        seed=a.seed,
        workdir=a.workdir,
        keep=a.keep,
    )


def log(msg: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {msg}", highlight=False)


# --- target and data ----------------------------------------------------------------------------------------------
def build_target(cfg: Config) -> Path:
    """A random-weight Llama with the run's sizes, saved once: the draft needs a real embed, the teacher an lm_head."""
    name = f"train-bench-llama-h{cfg.hidden}-l{cfg.layers}-a{cfg.heads}-kv{cfg.kv_heads}-i{cfg.intermediate}"
    out = CACHE / f"{name}-v{cfg.vocab}-s{cfg.seed}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    transformers.logging.disable_progress_bar()

    config = LlamaConfig(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.hidden // cfg.heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp)
    tmp.rename(out)  # complete or absent: an interrupted build is never reused
    return out


def make_dataset(cfg: Config) -> Dataset:
    """LLM-like activations (store_bench's generator), enough tokens that one epoch covers every step."""
    g = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    total = int((cfg.total_steps + 1) * cfg.max_tokens * 1.1)
    lengths = chat_lengths(rng, total, 32, cfg.median_len, cfg.max_tokens)
    stats = ActivationStats.draw(g, len(cfg.aux_layers) + 1, cfg.hidden)
    samples = []
    for n in lengths:
        x = stats.sample(g, n)
        prompt = int(n * rng.uniform(0.1, 0.6))
        mask = torch.cat([torch.zeros(prompt, dtype=torch.uint8), torch.ones(n - prompt, dtype=torch.uint8)])
        ids = torch.from_numpy(rng.integers(0, cfg.vocab, n, dtype=np.int32))
        samples.append(Sample(ids, mask, x[:, :3].contiguous(), x[:, 3].contiguous()))
    target = TargetInfo("train-bench-llama", cfg.hidden, cfg.layers, cfg.vocab)
    return Dataset("synthetic", "synthetic LLM-like activations", target, cfg.aux_layers, samples)


def write_formats(ds: Dataset, root: Path, draft_vocab: int) -> dict[str, Path]:
    """The same samples as .pt files and as three stores, each store with its draft vocab (the trainer needs it)."""
    from hsstore.vocab import build_draft_vocab, write_draft_vocab

    paths = {fmt: root / fmt for fmt in FORMATS}
    write_pt(ds, paths["pt"])
    for fmt in FORMATS[1:]:
        write_store(ds, paths[fmt], fmt)
        vocab = build_draft_vocab(StoreReader(str(paths[fmt])).token_freq(), draft_vocab)
        write_draft_vocab(str(paths[fmt]), vocab)
    os.sync()
    return paths


# --- the .pt baseline loader --------------------------------------------------------------------------------------
class PtSamples(torch.utils.data.Dataset):
    """One store_bench-style .pt per sample, read whole with torch.load and renamed to the trainer's keys."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __len__(self) -> int:
        return len(list(self.root.iterdir()))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = torch.load(pt_path(self.root, int(i)), weights_only=True)
        keys = ("input_ids", "loss_mask", "hidden_states", "last_hidden_states")
        return dict(zip(("input_ids", "loss_mask", "aux", "last"), (r[k] for k in keys), strict=True))


def build_pt_loader(pt_dir: Path, location: str, *, build: Any = None, **kwargs: Any) -> Any:
    """build_loader's TrainLoader with only the per-sample read swapped: same sampler (plan), collate, workers.

    `build`: the original build_loader (the trainer's module attribute is replaced by this function)."""
    from hsstore.train.loader import TrainLoader, build_loader

    planned = (build or build_loader)(location, **kwargs)  # never iterated: no worker starts, only the plan is used
    own = {k: v for k, v in kwargs.items() if k in LOADER_ARGS}
    return TrainLoader(PtSamples(pt_dir), planned.sampler, **own)


def pt_worker(argv: list[str]) -> None:
    """`python train_bench.py --pt-worker PT_DIR <hsstore train flags>`: the real trainer, .pt samples."""
    import hsstore.train.loader as loader_module
    from hsstore.train.cli import main as train_main

    pt_dir, *flags = argv
    loader_module.build_loader = partial(build_pt_loader, Path(pt_dir), build=loader_module.build_loader)
    sys.argv = ["hsstore train", *flags]
    train_main()


# --- runs ---------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One format's training run: per measured step tokens, wall seconds and seconds waiting for data."""

    fmt: str
    tokens: list[int]
    seconds: list[float]
    wait: list[float]
    warmup_wait: list[float]
    final_loss: float
    load: float  # 1-min load average at the start

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens) / sum(self.seconds)

    @property
    def wait_share(self) -> float:
        return sum(self.wait) / sum(self.seconds)

    @property
    def worst_wait_share(self) -> float:
        return max(w / s for w, s in zip(self.wait, self.seconds, strict=True))

    @property
    def compute_s(self) -> float:
        return (sum(self.seconds) - sum(self.wait)) / len(self.seconds)


@dataclass
class Results:
    runs: dict[str, list[Run]] = field(default_factory=dict)
    loader_alone: dict[str, float] = field(default_factory=dict)
    disk: dict[str, int] = field(default_factory=dict)

    def best(self, fmt: str) -> Run:
        return max(self.runs[fmt], key=lambda r: r.tokens_per_s)


def step_tokens(store: Path, max_tokens: int, seed: int, count: int) -> list[int]:
    """Real tokens of the trainer's first `count` steps, from its plan (lengths only; equal for every format)."""
    from hsstore.train.sampler import PackedBatchSampler
    from hsstore.train.split import split_store

    reader = StoreReader(str(store))
    lengths = reader.index.length
    sampler = PackedBatchSampler(lengths, max_tokens, indices=split_store(reader).train, seed=seed)
    out: list[int] = []
    epoch = 0
    while len(out) < count:  # the trainer goes on into the next epoch's plan
        out += [sum(min(int(lengths[i]), max_tokens) for row in b for i in row) for b in sampler.rank_batches(epoch)]
        epoch += 1
    return out[:count]


def train_command(fmt: str, paths: dict[str, Path], target: Path, out: Path, cfg: Config) -> list[str]:
    """The `hsstore train` command line; the .pt run names the raw store only for its index and vocab."""
    flags = [
        *("--store", str(paths["raw" if fmt == "pt" else fmt]), "--target", str(target), "--out", str(out)),
        *("--max-tokens-per-batch", str(cfg.max_tokens), "--max-steps", str(cfg.total_steps)),
        *("--ttt-steps", str(cfg.ttt_steps), "--num-workers", str(cfg.num_workers), "--seed", str(cfg.seed)),
        *("--log-every", "1", "--checkpoint-every", "0", "--eval-every", "0", "--warmup-steps", "0"),
        *("--mixed-precision", cfg.mixed_precision),
    ]
    if fmt == "pt":
        return [sys.executable, str(Path(__file__).resolve()), PT_WORKER_FLAG, str(paths["pt"]), *flags]
    return [sys.executable, "-m", "hsstore.train", *flags]


def run_trainer(fmt: str, paths: dict[str, Path], target: Path, root: Path, tokens: list[int], cfg: Config) -> Run:
    """One real training run in its own process; its metrics.jsonl turned into per-step seconds."""
    out = root / "runs" / f"{fmt}-{time.time_ns()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    with open(f"{out}.log", "w") as logfile:
        proc = subprocess.run(train_command(fmt, paths, target, out, cfg), stdout=logfile, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = "".join(Path(f"{out}.log").read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"the {fmt} training run failed (exit {proc.returncode}); end of its log:\n{tail}")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = sorted((e for e in lines if e["split"] == "train"), key=lambda e: e["step"])
    if [e["step"] for e in steps] != list(range(1, cfg.total_steps + 1)):
        raise SystemExit(f"{fmt}: expected one metrics line per step, got steps {[e['step'] for e in steps]}")
    seconds = [n / e["tokens_per_s"] for n, e in zip(tokens, steps, strict=True)]
    wait = [s * e["data_wait_share"] for s, e in zip(seconds, steps, strict=True)]
    w = cfg.warmup
    return Run(fmt, tokens[w:], seconds[w:], wait[w:], wait[:w], steps[-1]["loss"], load)


def loader_alone(fmt: str, paths: dict[str, Path], cfg: Config) -> float:
    """Tokens/s of the trainer's TrainLoader + to_device with no model: the most a faster trainer could draw."""
    from hsstore.train.loader import build_loader

    kwargs: dict[str, Any] = dict(max_tokens=cfg.max_tokens, seed=cfg.seed, num_workers=cfg.num_workers)
    if fmt == "pt":
        loader = build_pt_loader(paths["pt"], str(paths["raw"]), **kwargs)
    else:
        loader = build_loader(str(paths[fmt]), **kwargs)
    tokens, start = 0, 0.0
    for i, batch in enumerate(loader):  # one epoch; the clock starts once the first batch is in (workers are up)
        batch = loader.to_device(batch, "cpu")
        if i == 0:
            start = time.perf_counter()
        else:
            tokens += int((batch["seq_ids"] >= 0).sum())
    seconds = time.perf_counter() - start
    del loader
    return tokens / seconds


# --- report -------------------------------------------------------------------------------------------------------
def ratio(x: float, base: float) -> str:
    return f"{x / base:.2f}x"


def results_table(res: Results, cfg: Config) -> Table:
    best = {fmt: res.best(fmt) for fmt in FORMATS}
    base = best["pt"]
    table = Table(
        title=f"hsstore train: {cfg.steps} measured steps (after {cfg.warmup} warm-up) of {cfg.max_tokens} tokens, "
        f"{cfg.num_workers} workers, TTT {cfg.ttt_steps}, hidden {cfg.hidden}"
    )
    table.add_column("metric")
    for fmt in FORMATS:
        table.add_column(COLUMNS[fmt], justify="right")

    def row(name: str, fn: Any) -> None:
        table.add_row(name, *(fn(fmt) for fmt in FORMATS))

    row("MB on disk", lambda f: f"{res.disk[f] / 1e6:,.0f}")
    row("trainer tokens/s", lambda f: f"{best[f].tokens_per_s:,.1f}")
    row("trainer tokens/s vs .pt", lambda f: ratio(best[f].tokens_per_s, base.tokens_per_s))
    row("data-wait share of step time", lambda f: f"{best[f].wait_share:.2%}")
    row("worst step's data-wait share", lambda f: f"{best[f].worst_wait_share:.2%}")
    row("mean data wait per step (ms)", lambda f: f"{1e3 * sum(best[f].wait) / len(best[f].wait):,.1f}")
    row("mean compute per step (s)", lambda f: f"{best[f].compute_s:.2f}")
    row("warm-up steps' data wait (s)", lambda f: " ".join(f"{w:.2f}" for w in best[f].warmup_wait))
    row("loss at the last step", lambda f: f"{best[f].final_loss:.4f}")
    row("wait < 5% of step time", lambda f: "PASS" if best[f].wait_share < WAIT_TARGET else "FAIL")
    table.add_section()
    row("loader alone: tokens/s", lambda f: f"{res.loader_alone[f]:,.0f}")
    row("loader alone vs .pt", lambda f: ratio(res.loader_alone[f], res.loader_alone["pt"]))
    row("loader alone / trainer tokens/s", lambda f: f"{res.loader_alone[f] / best[f].tokens_per_s:,.0f}x")
    return table


def report(res: Results, cfg: Config) -> None:
    console.print(results_table(res, cfg))
    for fmt in FORMATS:
        run = res.best(fmt)
        verdict = "PASS" if run.wait_share < WAIT_TARGET else "FAIL"
        console.print(
            f"{verdict} {COLUMNS[fmt]}: the trainer waits for data {run.wait_share:.2%} of step time "
            f"(target < {WAIT_TARGET:.0%}; worst step {run.worst_wait_share:.2%})",
            highlight=False,
        )
    compute = [res.best(f).compute_s for f in FORMATS]
    console.print(
        f"compute per step (the same work in every run) spans {min(compute):.2f}-{max(compute):.2f} s across the "
        "columns: CPU contention (loader workers, other jobs on the 2 cores) moves tok/s by as much",
        highlight=False,
    )
    loads = ", ".join(f"{COLUMNS[f]} {' '.join(f'{r.load:.1f}' for r in res.runs[f])}" for f in FORMATS)
    console.print(f"1-min load average at the start of each run: {loads} (2 cpus)", highlight=False)


def print_header(cfg: Config, ds: Dataset, target: Path, workdir: Path) -> None:
    import accelerate

    versions = ", ".join(f"{m.__name__} {m.__version__}" for m in (torch, accelerate, np))
    console.print("[bold]hsstore trainer benchmark[/bold] vs the per-sample torch.save (.pt) baseline")
    console.print(
        f"{os.cpu_count()} cpus, python {platform.python_version()}, {versions}; hsstore {hsstore_revision()}; "
        f"data in {workdir}",
        highlight=False,
    )
    tokens, mb = ds.tokens, ds.tokens * ds.logical_bytes_per_token / 1e6
    lens = sorted(len(s.input_ids) for s in ds.samples)
    console.print(
        f"target: random-weight Llama {target.name} (hidden {cfg.hidden}, {cfg.heads} heads / {cfg.kv_heads} kv, "
        f"MLP {cfg.intermediate}, vocab {cfg.vocab:,}); draft vocab {cfg.draft_vocab:,}; aux layers {cfg.aux_layers} "
        f"+ last; data: {len(ds.samples)} synthetic samples, {tokens:,} tokens (length "
        f"{lens[0]}/{lens[len(lens) // 2]}/{lens[-1]} min/median/max), {mb:,.0f} MB bf16 hidden states",
        highlight=False,
    )
    console.print(
        "method: each format is one `hsstore train` process (.pt: the same trainer, its TrainLoader reading "
        "torch.load per sample); tok/s and data-wait share from the trainer's metrics.jsonl, step tokens from the "
        "sampler's plan; the device is the CPU, so fp8 dequantization (to_device) counts as data wait; files in "
        f"the page cache; best of {cfg.repeats} run(s) per format (by tok/s); ratios are vs the pt-baseline column.",
        highlight=False,
    )
    if cfg.quick:
        console.print("[yellow]--quick: a smoke test; a few short steps, the ratios are noise[/yellow]")


def run(cfg: Config) -> None:
    workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix="hsstore-train-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        target = build_target(cfg)
        ds = make_dataset(cfg)
        paths = write_formats(ds, workdir, cfg.draft_vocab)
        print_header(cfg, ds, target, workdir)
        log(f"target and {len(FORMATS)} formats ready in {time.perf_counter() - t0:.0f} s")
        del ds
        res = Results(disk={fmt: disk_bytes(p) for fmt, p in paths.items()})
        tokens = step_tokens(paths["raw"], cfg.max_tokens, cfg.seed, cfg.total_steps)
        for i in range(cfg.repeats):
            for fmt in FORMATS:
                r = run_trainer(fmt, paths, target, workdir, tokens, cfg)
                res.runs.setdefault(fmt, []).append(r)
                log(f"run {i + 1}/{cfg.repeats} {COLUMNS[fmt]}: {r.tokens_per_s:,.1f} tok/s, wait {r.wait_share:.2%}")
        for fmt in FORMATS:
            res.loader_alone[fmt] = loader_alone(fmt, paths, cfg)
        log(f"loader alone: {', '.join(f'{COLUMNS[f]} {v:,.0f} tok/s' for f, v in res.loader_alone.items())}")
        report(res, cfg)
    finally:
        if not cfg.keep and cfg.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [PT_WORKER_FLAG]:
        pt_worker(argv[1:])
        return
    run(parse_args(argv))


if __name__ == "__main__":
    main()
