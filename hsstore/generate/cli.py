"""CLI commands of the generate subpackage: generate, prepare, regenerate (registered on hsstore's app)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..writer import COMMIT_SECONDS
from .pipeline import DEFAULT_CODEC, DEFAULT_TEACHER, DEFAULT_TOPK
from .regenerate_cli import regenerate

console = Console()


def register(app: typer.Typer) -> None:
    app.command()(generate)
    app.command()(prepare)
    app.command()(regenerate)


def generate(
    model: Annotated[str, typer.Option(help="Target model: a local transformers directory.")],
    data: Annotated[list[str], typer.Option(help="JSON/JSONL file or dataset name (sharegpt, ultrachat); repeat.")],
    out: Annotated[str, typer.Option(help="Store path or fsspec URL to write.")],
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer path (default: the model's).")] = None,
    backend: Annotated[str, typer.Option(help="hf (transformers) or vllm.")] = "hf",
    codec: Annotated[
        str, typer.Option(help="Hidden-state codec: raw, lossless, fp8, mxfp6, mxfp4 or mxfp3 (docs/FORMAT.md).")
    ] = DEFAULT_CODEC,
    seq_length: Annotated[int, typer.Option(help="Truncate samples to this many tokens.")] = 2048,
    max_samples: Annotated[int | None, typer.Option(help="Use at most this many samples.")] = None,
    seed: Annotated[int, typer.Option(help="Shuffle seed.")] = 0,
    shuffle: Annotated[bool, typer.Option(help="Shuffle samples before --max-samples.")] = True,
    layer_ids: Annotated[str | None, typer.Option(help="Aux layer ids, e.g. '2,16,29' (default: EAGLE-3's).")] = None,
    batch_tokens: Annotated[int, typer.Option(help="Padded tokens per forward batch.")] = 8192,
    chunk_tokens: Annotated[int, typer.Option(help="Tokens per chunk (random-access unit).")] = 64,
    shard_tokens: Annotated[int, typer.Option(help="Tokens per shard file.")] = 16384,
    num_shards: Annotated[int, typer.Option(help="Data-parallel writers in all (one part each).")] = 1,
    shard_index: Annotated[int, typer.Option(help="Which of them this process is.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue a store this shard already started.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace this shard's part of an existing store.")] = False,
    commit_seconds: Annotated[
        float,
        typer.Option(min=0, help="Seconds between commits of written shards (0: after each); what a crash may lose."),
    ] = COMMIT_SECONDS,
    device: Annotated[
        str, typer.Option(help="cpu or cuda (hf also takes cuda:1; vllm uses CUDA_VISIBLE_DEVICES).")
    ] = "cpu",
    tensor_parallel_size: Annotated[int, typer.Option(help="vllm backend: tensor-parallel GPUs.")] = 1,
    dtype: Annotated[str, typer.Option(help="Target dtype and stored logical dtype.")] = "bfloat16",
    cache_dir: Annotated[str | None, typer.Option(help="Tokenized-dataset cache directory.")] = None,
    strict: Annotated[bool, typer.Option(help="Stop at the first bad sample instead of skipping it.")] = False,
    teacher: Annotated[
        Literal["last", "topk", "both"],
        typer.Option(
            help="What the draft's teacher reads: the last layer (H values a token), or the target's top-k "
            "next-token log-probs at loss positions instead (topk: --topk ids + log-probs), or both."
        ),
    ] = DEFAULT_TEACHER,
    topk: Annotated[
        int, typer.Option(help="k of --teacher topk/both: tokens kept per teacher position.")
    ] = DEFAULT_TOPK,
) -> None:
    """Chat data -> tokens and loss masks -> target hidden states (or the target's top-k teacher) -> a store."""
    import datasets
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()  # one progress bar: ours
    hf_logging.disable_progress_bar()

    from ..manifest import Geometry
    from .backends import load_backend
    from .inputs import load_samples
    from .layers import parse_layer_ids
    from .pipeline import StoreSettings, build_manifest, run_generate

    tok = AutoTokenizer.from_pretrained(tokenizer or model)
    loaded = load_samples(
        data,
        tok,
        seq_length=seq_length,
        max_samples=max_samples,
        seed=seed,
        shuffle=shuffle,
        cache_dir=cache_dir,
        strict=strict,
    )
    console.print(f"{len(loaded.samples):,} samples tokenized from {', '.join(data)}")
    engine_options = {"tensor_parallel_size": tensor_parallel_size, "max_model_len": seq_length + 1}
    runner = load_backend(backend, model, device=device, dtype=dtype, **(engine_options if backend == "vllm" else {}))
    settings = StoreSettings(
        out=out,
        codec=codec,
        aux_layer_ids=parse_layer_ids(layer_ids, runner.num_layers),
        geometry=Geometry(chunk_tokens, shard_tokens),
        num_shards=num_shards,
        shard_index=shard_index,
        resume=resume,
        overwrite=overwrite,
        commit_seconds=commit_seconds,
        batch_tokens=batch_tokens,
        max_seq_length=seq_length,
        teacher=teacher,
        topk=topk,
        device=device,
    )
    manifest = build_manifest(runner, model, settings, loaded.tokenizer_info, loaded.sources, dtype=dtype)
    total_tokens = sum(len(s.input_ids) for s in loaded.samples[shard_index::num_shards])
    with _progress() as progress:
        task = progress.add_task("generate", total=total_tokens, samples=0, rate="")
        started = time.perf_counter()

        def advance(samples: int, tokens: int, written: tuple[int, int] | None) -> None:
            done = progress.tasks[task].fields["samples"] + samples
            elapsed = max(time.perf_counter() - started, 1e-9)
            rate = f"{(progress.tasks[task].completed + tokens) / elapsed:,.0f} tok/s {done / elapsed:,.1f} smp/s"
            if written and written[1]:
                rate += f" {written[1] / 2**20:,.1f} MiB {written[0] / written[1]:.2f}x"
            progress.update(task, advance=tokens, samples=done, rate=rate)

        stats = run_generate(runner, manifest, loaded.samples, settings, on_progress=advance)
    overhead = stats.write_seconds / max(stats.wall_seconds, 1e-9)
    teacher_share = (
        f", top-{topk} teacher {stats.teacher_seconds / max(stats.wall_seconds, 1e-9):.1%}"
        if manifest.teacher is not None
        else ""
    )
    console.print(
        f"wrote {stats.samples:,} samples / {stats.tokens:,} tokens to {out} "
        f"({stats.skipped_resume:,} already there) in {stats.wall_seconds:.1f}s: "
        f"{stats.tokens / max(stats.wall_seconds, 1e-9):,.0f} tok/s; writer share of wall time {overhead:.1%}"
        f"{teacher_share}"
    )
    loaded.report(console)


def _progress() -> Progress:
    return Progress(
        BarColumn(bar_width=12),
        MofNCompleteColumn(),
        TextColumn("tok {task.fields[samples]:,} smp | {task.fields[rate]}"),
        TimeRemainingColumn(),
        console=console,
    )


def prepare(
    data: Annotated[list[str], typer.Option(help="JSON/JSONL file or dataset name; repeat to mix.")],
    out: Annotated[Path, typer.Option(help="Normalized JSONL to write.")],
    max_samples: Annotated[int | None, typer.Option(help="Keep at most this many conversations.")] = None,
    seed: Annotated[int, typer.Option(help="Shuffle seed.")] = 0,
    shuffle: Annotated[bool, typer.Option(help="Shuffle before --max-samples.")] = True,
) -> None:
    """Write normalized JSONL ({id, source, messages: [{role, content}]}) to look at before generating."""
    from .prepare import prepare as write_prepared
    from .skips import SkipCounter

    skips = SkipCounter()
    result = write_prepared(data, out, max_samples=max_samples, seed=seed, shuffle=shuffle, skips=skips, overwrite=True)
    console.print(f"{result.written:,} conversations written to {result.path}")
    console.print(skips.report(), highlight=False, markup=False)
