"""`hsstore demo`: the whole job on the embedded default, so a fresh machine sees every stage work.

Tiny random-weight Llama target with a BPE tokenizer trained on the packaged ShareGPT text -> generate
(hf backend) -> inspect -> verify -> draft vocab -> train an EAGLE-3 draft (a few steps) -> export.
The target is random, so the draft learns little: the point is the pipeline, not the numbers.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()
CACHE = Path(".hsstore-cache")


def demo(
    out: Annotated[Path, typer.Option(help="Directory for the demo's store/ and run/ (replaced).")] = Path("demo"),
    samples: Annotated[int, typer.Option(help="ShareGPT conversations to use.")] = 64,
    codec: Annotated[
        str | None, typer.Option(help="raw, lossless, fp8, mxfp6, mxfp4 or mxfp3 (default: generate's).")
    ] = None,
    train_steps: Annotated[int, typer.Option(help="Draft training steps.")] = 20,
) -> None:
    """End to end on the embedded default: tiny target + packaged ShareGPT -> store -> trained, exported draft."""
    from .cli import inspect, verify, vocab
    from .generate.cli import generate
    from .generate.pipeline import DEFAULT_CODEC
    from .generate.tiny import build_tiny_target
    from .train.cli import train

    target = build_tiny_target(CACHE / "tiny-llama3", template="llama3")
    store, run = out / "store", out / "run"
    shutil.rmtree(run, ignore_errors=True)  # the demo's own previous run
    console.rule(f"generate: tiny target at {target}")
    generate(
        model=str(target), data=["sharegpt"], out=str(store), codec=codec or DEFAULT_CODEC, seq_length=512,
        max_samples=samples, overwrite=True, chunk_tokens=64, shard_tokens=4096, batch_tokens=4096,
        cache_dir=str(CACHE / "datasets"),
    )  # fmt: skip
    console.rule("inspect")
    inspect(str(store), tokenizer=str(target), sample=0, top_k=10)
    console.rule("verify")
    verify(str(store))
    console.rule("draft vocab")
    vocab(str(store), draft_vocab_size=512)
    console.rule("train")
    train(
        store=str(store), target=str(target), out=str(run), eval_fraction=0.1, max_steps=train_steps,
        max_tokens_per_batch=1024, warmup_steps=2, lr=1e-3, ttt_steps=3, log_every=5, checkpoint_every=10,
        num_workers=0,
    )  # fmt: skip
    console.print(
        f"[bold green]done[/]: store {store}, checkpoints {run / 'checkpoints'}, exported draft {run / 'draft'}"
    )
