"""The `hsstore` command line. Heavy imports (transformers, vllm, accelerate) stay inside commands."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .errors import HSStoreError

app = typer.Typer(
    help="hsstore: hidden states of a target LLM in a compact Zarr v3 store, for training EAGLE-3 drafts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()

StoreArg = Annotated[str, typer.Argument(help="Store path or fsspec URL (s3://..., gs://...).")]


def main() -> None:
    """Console-script entry: hsstore's own errors become one red line and exit code 1."""
    try:
        app()
    except HSStoreError as e:
        # soft_wrap: one line however narrow the terminal, so logs and tests see the whole message
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {e}", highlight=False)
        raise SystemExit(1) from None


@app.command()
def inspect(
    store: StoreArg,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer path: decode top tokens and the sample.")] = None,
    sample: Annotated[int | None, typer.Option(help="Show this sample with its loss mask coloured.")] = None,
    top_k: Annotated[int, typer.Option(help="How many of the most frequent loss tokens to list.")] = 10,
) -> None:
    """Manifest, sizes, compression ratio, bytes/token, token frequencies, and a sample."""
    from . import layout
    from .reader import StoreReader
    from .summary import array_sizes, file_sizes, teacher_description, top_tokens

    reader = StoreReader(store)
    m = reader.manifest
    tok = _load_tokenizer(tokenizer) if tokenizer else None
    head = Table.grid(padding=(0, 2))
    head.add_row("store", reader.location)
    head.add_row("format", f"hsstore v{m.format_version}, created {m.created_at} by hsstore {m.tool_version}")
    head.add_row(
        "target",
        f"{m.target.name_or_path} (hidden {m.target.hidden_size}, {m.target.num_layers} layers, "
        f"vocab {m.target.vocab_size}, {m.target.dtype})",
    )
    layers = [f"{h.role}={list(h.layer_ids)} [{h.codec}]" for h in m.hidden]
    if m.teacher is not None:
        layers.append(f"teacher={[m.teacher.layer_id]} [{m.teacher.kind} k={m.teacher.k}]")
    head.add_row("layers", escape(", ".join(layers)))  # escaped: "[lossless]" is not rich markup
    if m.teacher is not None:
        head.add_row("teacher", escape(teacher_description(m)))
    head.add_row("convention", m.layer_convention)
    head.add_row(
        "geometry",
        f"{m.geometry.chunk_tokens}-token chunks in {m.geometry.shard_tokens}-token shards, "
        f"{m.num_parts} part(s), {len(reader.parts)} written",
    )
    head.add_row(
        "samples", f"{len(reader):,} samples, {reader.num_tokens:,} tokens, {reader.num_loss_tokens:,} loss tokens"
    )
    if m.sources:
        head.add_row("sources", ", ".join(s.name for s in m.sources))
    open_parts = [p.where for p in reader.parts if not p.commit.closed]
    if open_parts:
        head.add_row("[yellow]unfinished[/]", f"{', '.join(open_parts)} (writer did not close; --resume continues)")
    console.print(head)

    files = file_sizes(store)
    sizes = array_sizes(reader, files)
    table = Table(title="sizes")
    for col in ("array", "stored", "logical", "ratio", "bytes/token"):
        table.add_column(col, justify="right" if col != "array" else "left")
    tokens = max(reader.num_tokens, 1)
    for s in sizes:
        table.add_row(
            s.name,
            _human(s.stored_bytes),
            _human(s.logical_bytes),
            f"{s.ratio:.2f}x",
            f"{s.stored_bytes / tokens:,.1f}",
        )
    total_stored = sum(files.values())
    total_logical = sum(s.logical_bytes for s in sizes)
    table.add_row(
        "[bold]all files",
        _human(total_stored),
        _human(total_logical),
        f"{total_logical / max(total_stored, 1):.2f}x",
        f"{total_stored / tokens:,.1f}",
    )
    console.print(table)
    if m.teacher is not None and "last" not in m.roles:
        own = reader.num_tokens * layout.teacher_own_row_bytes(m.teacher)
        console.print(
            f"teacher: logical size = the last layer it replaces ([T, {m.target.hidden_size}] "
            f"{m.hidden[0].logical_dtype}); its own [T, {m.teacher.k}] arrays are {_human(own)} uncompressed",
            markup=False,
        )
    console.print(f"{len(files):,} files on disk")

    freq = reader.token_freq()
    top = Table(title=f"top {top_k} loss tokens")
    for col in ("token id", "text", "count", "share"):
        top.add_column(col)
    total = max(int(freq.sum()), 1)
    for t, c in top_tokens(freq, top_k):
        top.add_row(str(t), repr(tok.decode([t])) if tok else "", f"{c:,}", f"{c / total:.2%}")
    console.print(top)
    if sample is not None:
        console.print(_render_sample(reader, sample, tok))


def _render_sample(reader, i: int, tok) -> Text:
    s = reader[i]
    ids = s["input_ids"].tolist()
    mask = s["loss_mask"].tolist()
    text = Text.assemble(
        f"sample {i} ({reader.sample_ids[i]}), {len(ids)} tokens, {sum(mask)} in the loss (",
        ("green", "bold green"),
        " = trained on):\n",
    )
    for t, m in zip(ids, mask, strict=True):
        piece = tok.decode([t]) if tok else f"{t} "
        text.append(piece, style="bold green" if m else "dim")
    return text


@app.command()
def query(
    store: StoreArg,
    min_len: Annotated[int | None, typer.Option(help="Keep samples with at least this many tokens.")] = None,
    max_len: Annotated[int | None, typer.Option(help="Keep samples with at most this many tokens.")] = None,
    source: Annotated[list[str] | None, typer.Option(help="Keep samples from this source (repeatable).")] = None,
    min_loss_tokens: Annotated[
        int | None, typer.Option(help="Keep samples with at least this many loss tokens.")
    ] = None,
    ids: Annotated[str | None, typer.Option(help="Comma-separated original sample ids.")] = None,
    limit: Annotated[int, typer.Option(help="Print at most this many rows (0 = all).")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
) -> None:
    """Select samples by length, source, loss tokens or ids (reads only the sample table)."""
    from .query import SampleQuery, rows_for
    from .reader import StoreReader

    reader = StoreReader(store)
    q = SampleQuery(
        min_len, max_len, tuple(source or ()), min_loss_tokens, tuple(x.strip() for x in ids.split(",")) if ids else ()
    )
    selected = q.select(reader)
    shown = selected[:limit] if limit else selected
    rows = rows_for(reader, shown)
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r))
        return
    table = Table(
        title=f"{len(selected):,} of {len(reader):,} samples match"
        + (f" (first {len(shown)} shown)" if len(shown) < len(selected) else "")
    )
    for col in ("index", "sample_id", "source", "length", "loss_tokens", "part"):
        table.add_column(col, justify="right" if col in ("index", "length", "loss_tokens", "part") else "left")
    for r in rows:
        table.add_row(*(str(v) for v in r.values()))
    console.print(table)


@app.command()
def verify(store: StoreArg) -> None:
    """Read every committed byte and check checksums, sample hashes and commit records."""
    from rich.progress import Progress

    from .verify import verify_store

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("verifying shards", total=None)
        report = verify_store(store, progress=lambda n: progress.advance(task, n))
    if report.ok:
        console.print(f"[green]ok[/]: {report.shards_checked} shards and {report.samples_checked} samples verified")
        return
    for p in report.problems:
        console.print(f"[red]problem:[/] {p}", highlight=False)
    raise typer.Exit(1)


@app.command()
def vocab(
    store: StoreArg,
    draft_vocab_size: Annotated[int, typer.Option(help="Draft vocabulary size (EAGLE-3 uses 32000 for Llama-3).")],
    strict: Annotated[
        bool, typer.Option(help="Fail if the data has fewer distinct loss tokens than the size.")
    ] = False,
) -> None:
    """Build the draft vocab (d2t/t2d) from the store's token frequencies into STORE/vocab."""
    from .reader import StoreReader
    from .vocab import build_draft_vocab, write_draft_vocab

    reader = StoreReader(store)
    built = build_draft_vocab(reader.token_freq(), draft_vocab_size, strict=strict)
    write_draft_vocab(store, built)
    console.print(
        f"draft vocab of {draft_vocab_size:,} tokens written to {store}/vocab; "
        f"it covers {built.covered_share:.2%} of {reader.num_loss_tokens:,} loss tokens"
    )


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def _register_subcommands() -> None:
    """Commands whose modules import heavy libraries register lazily (see hsstore/generate/cli.py)."""
    from .demo import demo
    from .train.cli import register as register_train  # train, eval, export

    register_train(app)
    app.command()(demo)
    try:
        from .generate.cli import register
    except ImportError:  # the generate subpackage is optional at import time
        return
    register(app)


_register_subcommands()

if __name__ == "__main__":
    main()
