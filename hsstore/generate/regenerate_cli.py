"""The `hsstore regenerate` command: answer conversations with the target through OpenAI-compatible servers.

Registered on hsstore's app by `hsstore.generate.cli.register`. The work happens in `regenerate.py`; this
module turns options into settings and shows progress.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console()


def regenerate(
    data: Annotated[list[str], typer.Option(help="JSON/JSONL file or dataset name (sharegpt, ultrachat); repeat.")],
    out: Annotated[Path, typer.Option(help="Normalized JSONL to write, one line per input conversation, in order.")],
    server: Annotated[
        list[str], typer.Option(help="Base URL of a vLLM/SGLang server, e.g. http://127.0.0.1:8000; repeat.")
    ],
    model: Annotated[str | None, typer.Option(help="Model name the servers serve (default: ask /v1/models).")] = None,
    errors: Annotated[
        Path | None, typer.Option(help="Where failed conversations go (default: <out stem>.errors.jsonl).")
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Longest reply in tokens (default: the server's).")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 0.0,
    concurrency: Annotated[int, typer.Option(help="Conversations in flight at once, over all servers.")] = 8,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for one reply.")] = 600.0,
    retries: Annotated[int, typer.Option(help="Retries of a request after a connection error, timeout or 5xx.")] = 3,
    max_samples: Annotated[int | None, typer.Option(help="Answer only the first this many conversations.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the output of an earlier run of the same inputs.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the output and error files.")] = False,
    retry_errors: Annotated[bool, typer.Option(help="With --resume: answer the error file's rows again.")] = False,
    strict: Annotated[bool, typer.Option(help="Stop at the first unusable input row instead of skipping it.")] = False,
) -> None:
    """Replace the assistant turns of conversations with the target's own answers (EAGLE-3 drafts train better
    on them), asking one or more OpenAI-compatible servers (`vllm serve`, SGLang). Resumable with --resume."""
    from .regenerate import RegenerateSettings, RetryPolicy, Row
    from .regenerate import regenerate as run
    from .skips import SkipCounter

    settings = RegenerateSettings(
        servers=tuple(server),
        model=model,
        max_tokens=max_tokens,
        temperature=temperature,
        concurrency=concurrency,
        timeout=timeout,
        retry=RetryPolicy(retries=retries),
    )
    skips = SkipCounter(strict=strict)
    progress = _progress()
    task = progress.add_task("regenerate", total=None, failed=0)

    def on_start(total: int, done: int) -> None:
        """Show progress only once the servers answered and the inputs are read."""
        progress.update(task, total=total, completed=done)
        progress.start()

    def on_row(row: Row) -> None:
        progress.update(task, advance=1, failed=progress.tasks[task].fields["failed"] + row.failed)

    try:
        result = run(
            data, out, settings, errors=errors, resume=resume, overwrite=overwrite, retry_errors=retry_errors,
            max_samples=max_samples, skips=skips, on_start=on_start, on_row=on_row,
        )  # fmt: skip
    except KeyboardInterrupt:
        progress.stop()
        console.print(f"interrupted; {out} is complete up to its last line: rerun with --resume to continue")
        raise typer.Exit(130) from None
    finally:
        progress.stop()
    spread = ", ".join(f"{url}: {count}" for url, count in result.requests.items())
    console.print(
        f"{result.answered:,} conversations answered by {result.model} in {result.seconds:.1f}s "
        f"({result.resumed:,} done before, {result.copied:,} kept) -> {result.out}; requests {spread}",
        highlight=False,
        markup=False,
    )
    if result.failed:
        retry = "(--resume --retry-errors tries them again)"
        console.print(f"{result.failed:,} failed -> {result.errors} {retry}", markup=False)
    if result.truncated:
        console.print(f"{result.truncated:,} replies stopped at --max-tokens", highlight=False)
    report = skips.report()
    if report:
        console.print(report, markup=False, highlight=False)


def _progress() -> Progress:
    return Progress(
        BarColumn(bar_width=12),
        MofNCompleteColumn(),
        TextColumn("conversations, {task.fields[failed]:,} failed"),
        TimeRemainingColumn(),
        console=console,
    )
