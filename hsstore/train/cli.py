"""CLI commands of the train subpackage: train, eval, export (registered on hsstore's app).

`hsstore train` and `accelerate launch -m hsstore.train` run the same `train` function: the second
is this module's `main`, a one-command app, so every flag is spelled the same in both.
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from ..errors import HSStoreError

console = Console(soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.command("eval")(eval_command)
    app.command("export")(export_command)


def train(
    store: Annotated[str, typer.Option(help="Training store (needs a draft vocab: `hsstore vocab`).")],
    target: Annotated[
        str,
        typer.Option(
            help="Target model dir: its embedding, final norm and lm_head (draft init; the last-layer teacher)."
        ),
    ],
    out: Annotated[str, typer.Option(help="Run dir: checkpoints/, draft/ (the export), tracker logs.")],
    draft_config: Annotated[
        str | None, typer.Option(help="Draft config JSON/YAML or a bundled name (default: sized from --target).")
    ] = None,
    eval_fraction: Annotated[float, typer.Option(help="Hash-split this share of the store off for eval.")] = 0.0,
    eval_store: Annotated[str | None, typer.Option(help="A separate eval store (instead of --eval-fraction).")] = None,
    max_tokens_per_batch: Annotated[int, typer.Option(help="Tokens per packed batch per process.")] = 4096,
    epochs: Annotated[int, typer.Option(help="Passes over the training split (unless --max-steps).")] = 1,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps in all (overrides --epochs).")] = None,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 1e-4,
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps before the cosine decay.")] = 50,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    grad_clip: Annotated[float, typer.Option(help="Clip the global grad norm to this (0 = off).")] = 0.5,
    grad_accum: Annotated[int, typer.Option(help="Batches per optimizer step.")] = 1,
    ttt_steps: Annotated[int, typer.Option(help="Training-time-test unroll steps.")] = 7,
    ttt_decay: Annotated[float, typer.Option(help="Loss weight decay per TTT step (step k: decay^k).")] = 0.8,
    noise_std: Annotated[float, typer.Option(help="Uniform noise std added to the aux states (0 = off).")] = 0.0,
    num_workers: Annotated[int, typer.Option(help="DataLoader worker processes per training process.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the draft init, data order and noise.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0 = only at the end).")] = 500,
    keep_checkpoints: Annotated[int, typer.Option(help="Keep the last K checkpoints (0 = all).")] = 3,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in --out (if any).")] = False,
    log_every: Annotated[int, typer.Option(help="Log metrics every N steps.")] = 10,
    eval_every: Annotated[int, typer.Option(help="Evaluate every N steps (0 = only at the end).")] = 500,
    report_to: Annotated[
        Literal["none", "tensorboard", "wandb", "trackio"], typer.Option(help="Experiment tracker.")
    ] = "none",
    export_format: Annotated[
        Literal["vllm", "speculators"], typer.Option(help="Config flavour of the final export.")
    ] = "vllm",
    mixed_precision: Annotated[
        Literal["auto", "no", "bf16"],
        typer.Option(help="bf16 autocast with fp32 master weights; auto = the launcher's, else bf16 on GPU."),
    ] = "auto",
    teacher: Annotated[
        Literal["auto", "last", "topk"],
        typer.Option(
            help="Teacher: the stored top-k (topk), the last layer + target lm_head (last); auto = topk if stored."
        ),
    ] = "auto",
) -> None:
    """Train an EAGLE-3 draft on a store; checkpoints, resumes exactly, exports for vLLM/SGLang."""
    options = dict(locals())  # every parameter, taken before any other name is bound
    from .trainer import TrainSettings, run_training

    run_training(TrainSettings(**options))


def eval_command(
    checkpoint: Annotated[str, typer.Option(help="A checkpoint dir, or a training --out dir (its latest).")],
    store: Annotated[str, typer.Option(help="Store to evaluate on (every sample).")],
    target: Annotated[str | None, typer.Option(help="Target dir (default: the one the run trained with).")] = None,
    max_tokens_per_batch: Annotated[int | None, typer.Option(help="Tokens per batch (default: the run's).")] = None,
    ttt_steps: Annotated[int | None, typer.Option(help="TTT steps to measure (default: the run's).")] = None,
    num_workers: Annotated[int, typer.Option(help="DataLoader workers.")] = 1,
    teacher: Annotated[
        Literal["auto", "last", "topk"], typer.Option(help="Teacher: topk, last or auto (topk if the store has it).")
    ] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as one JSON object.")] = False,
) -> None:
    """Loss, per-step accuracy and acceptance, and the estimated acceptance length of a checkpoint."""
    from .trainer import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, store, target, max_tokens_per_batch, ttt_steps, num_workers, teacher)
    if as_json:
        typer.echo(json.dumps(result.values))
        return
    console.print(f"{result.checkpoint} on {store}: {result.samples:,} samples", highlight=False)
    table = Table()
    columns = ("TTT step", "loss", "accuracy", "expected acceptance", "positions", "chains alive", "walk alive")
    for col in columns:
        table.add_column(col, justify="right")
    v = result.values
    for k in range(result.steps):
        row = (f"{v[f'loss_{k}']:.4f}", f"{v[f'acc_{k}']:.3f}", f"{v[f'accept_{k}']:.3f}", f"{result.counts[k]:,}")
        table.add_row(str(k), *row, f"{v[f'chain_{k}']:.3f}", f"{v.get(f'walk_{k}', float('nan')):.3f}")
    console.print(table)
    console.print(
        f"loss {v['loss']:.4f} | estimated acceptance length {v['acceptance_length_greedy']:.2f} greedy, "
        f"{v['acceptance_length_chained']:.2f} chained, {v.get('acceptance_length_decoding', float('nan')):.2f} "
        f"decoding walk, {v['acceptance_length_sampled']:.2f} sampled",
        highlight=False,
    )


def export_command(
    checkpoint: Annotated[str, typer.Option(help="A checkpoint dir, or a training --out dir (its latest).")],
    out: Annotated[str, typer.Option(help="Directory to write config.json + model.safetensors to.")],
    target: Annotated[str | None, typer.Option(help="Target dir (default: the one the run trained with).")] = None,
    format: Annotated[Literal["vllm", "speculators"], typer.Option(help="Config flavour.")] = "vllm",
) -> None:
    """Write a checkpoint's draft as a directory vLLM and SGLang load as an EAGLE-3 speculator."""
    from .checkpoint import read_meta, resolve_checkpoint, restore_draft
    from .export import export_draft

    path = resolve_checkpoint(checkpoint)
    draft = restore_draft(path)
    target = target or read_meta(path)["settings"]["target"]
    export_draft(draft, out, target, format)
    console.print(f"[green]exported[/] {path} ({format} format) to {out}", highlight=False)


def main() -> None:
    """`python -m hsstore.train` / `accelerate launch -m hsstore.train`: the train command alone."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(train)
    try:
        app()
    except HSStoreError as e:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank fails the same way; say it once
            Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {e}", highlight=False)
        raise SystemExit(1) from None
