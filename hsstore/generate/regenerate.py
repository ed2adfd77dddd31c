"""`hsstore regenerate`: replace the assistant turns of conversations with the target model's own answers.

An EAGLE-3 draft learns to predict the target, so it trains better on what the target itself says than on
what another model said in the original data. Every conversation is replayed turn by turn against one or
more OpenAI-compatible servers (`vllm serve`, SGLang): system and user turns stay, each assistant turn
becomes the server's reply to everything before it. The output is the normalized JSONL `prepare` writes,
so `hsstore generate --data out.jsonl` reads it back unchanged.

Long runs must survive crashes without redoing or losing work:
- rows are written in input order (requests finish out of order; a bounded window puts them back in
  order), one flushed line each, to the output or, for a conversation that failed after retries, to the
  error file; together the two files always cover a prefix of the inputs, each input once;
- `resume` drops a torn last line, checks the written ids against the inputs and continues with the
  next input; rows in the error file stay there unless `retry_errors`, which rewrites both files in
  order from renamed copies of them (the "base"), so that this pass resumes exactly too;
- a server that stops accepting connections stops the run instead of sending every remaining
  conversation to the error file: restart it and resume.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from ..errors import HSStoreError
from .skips import DataError, SkipCounter
from .sources import Record, load_records

Message = dict[str, str]
Reply = Callable[[list[Message]], Awaitable[str]]
MAX_ERROR_CHARS = 500
RETRY_STATUS = frozenset({408, 429})  # plus every 5xx
CONNECT_TIMEOUT = 10.0
WINDOW_PER_SLOT = 8  # finished rows that may wait behind a slow one, per concurrent conversation


class RegenerateError(HSStoreError):
    """A problem with the whole run (server, model name, output files); the message names the fix."""


class ServerGone(RegenerateError):
    """A server stopped accepting connections mid-run; stopping keeps the output exactly resumable."""


class ConversationFailed(Exception):
    """One conversation cannot be answered (rejected by the server, no usable reply): it goes to the error file."""


# --- servers and the model they serve ------------------------------------------------------------
def normalize_url(url: str) -> str:
    """Accept `host:port`, `http://host:port` or `http://host:port/v1`; return the base URL without `/v1`."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    return url.removesuffix("/v1")


def _reason(err: Exception) -> str:
    return str(err) or type(err).__name__


def _error_text(response: httpx.Response) -> str:
    """The server's own error message (OpenAI style {"error": {"message"}}), else the start of the body."""
    try:
        body = response.json()
        error = body.get("error", body) if isinstance(body, dict) else body
        text = error.get("message") if isinstance(error, dict) else None
        text = str(text if text is not None else error)
    except ValueError:
        text = response.text
    return " ".join(text.split())[:MAX_ERROR_CHARS]


async def served_models(http: httpx.AsyncClient, url: str) -> list[str]:
    """The model names a server answers to, or a one-line error saying how to reach it."""
    try:
        response = await http.get(f"{url}/v1/models")
    except httpx.TransportError as err:
        raise RegenerateError(
            f"cannot reach the server at {url} ({_reason(err)}); start it (e.g. `vllm serve MODEL --port PORT`) "
            "or pass its address with --server http://HOST:PORT"
        ) from None
    if response.status_code != 200:
        raise RegenerateError(
            f"{url}/v1/models answered HTTP {response.status_code}; --server must be the base URL of an "
            "OpenAI-compatible server (vLLM or SGLang `serve`), e.g. http://127.0.0.1:8000"
        )
    try:
        return [str(entry["id"]) for entry in response.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise RegenerateError(
            f"{url}/v1/models did not answer with an OpenAI model list; is --server a vLLM or SGLang server?"
        ) from None


async def resolve_model(http: httpx.AsyncClient, urls: Sequence[str], model: str | None) -> str:
    """The model name to request: `model`, or the one model the first server serves; every server must serve it."""
    served = {url: await served_models(http, url) for url in urls}
    if model is None:
        names = served[urls[0]]
        if len(names) != 1:
            listed = ", ".join(names) or "no model"
            raise RegenerateError(f"{urls[0]} serves {listed}; choose the target with --model NAME")
        model = names[0]
    for url, names in served.items():
        if model not in names:
            raise RegenerateError(
                f"model {model!r} is not served by {url} (it serves: {', '.join(names) or 'nothing'}); "
                "pass --model with one of those names, or omit --model to use the server's"
            )
    return model


class ServerPool:
    """Chooses the server for each request: the least busy, ties in turn (round-robin). A server that
    refused a connection is avoided for `cooldown` seconds, so retries go to the others."""

    def __init__(self, urls: Sequence[str], cooldown: float = 5.0) -> None:
        if not urls:
            raise RegenerateError("no server given; pass --server http://HOST:PORT (repeat it for several servers)")
        self.urls = list(dict.fromkeys(urls))  # the same server twice would not be twice as fast
        self.busy = dict.fromkeys(self.urls, 0)
        self.requests = dict.fromkeys(self.urls, 0)
        self.down_until = dict.fromkeys(self.urls, 0.0)
        self.cooldown = cooldown
        self._turn = 0

    def pick(self) -> str:
        now = time.monotonic()
        order = self.urls[self._turn :] + self.urls[: self._turn]
        self._turn = (self._turn + 1) % len(self.urls)
        return min(order, key=lambda url: (self.down_until[url] > now, self.busy[url]))  # min keeps the first tie

    def mark_down(self, url: str) -> None:
        self.down_until[url] = time.monotonic() + self.cooldown

    @contextmanager
    def use(self) -> Iterator[str]:
        """A server for one request, counted as busy until the request ends."""
        url = self.pick()
        self.busy[url] += 1
        self.requests[url] += 1
        try:
            yield url
        finally:
            self.busy[url] -= 1


# --- one request -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """What every request asks for; temperature 0 is greedy, so a rerun gets the same answers."""

    model: str
    max_tokens: int | None = None
    temperature: float = 0.0

    def body(self, messages: list[Message]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry what may pass: refused connections, timeouts, 5xx, 408 and 429."""

    retries: int = 3
    backoff: float = 1.0
    max_backoff: float = 30.0

    def delay(self, attempt: int) -> float:
        return min(self.backoff * 2**attempt, self.max_backoff)


class _Transient(Exception):
    """A failure worth retrying; `unreachable` when no connection could be made at all."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class ChatClient:
    """Gets one assistant reply from the servers, retrying transient failures with exponential backoff."""

    def __init__(self, http: httpx.AsyncClient, pool: ServerPool, sampling: Sampling, retry: RetryPolicy) -> None:
        self.http = http
        self.pool = pool
        self.sampling = sampling
        self.retry = retry
        self.truncated = 0  # replies cut off by max_tokens

    async def reply(self, messages: list[Message]) -> str:
        attempts = self.retry.retries + 1
        for attempt in range(attempts):
            with self.pool.use() as url:
                try:
                    return await self._post(url, messages)
                except _Transient as err:
                    last = err
                    if err.unreachable:
                        self.pool.mark_down(url)
            if attempt + 1 < attempts:
                await asyncio.sleep(self.retry.delay(attempt))
        if last.unreachable:
            raise ServerGone(
                f"{last} after {attempts} attempt(s); the output so far is complete and in order: restart the "
                "server, then run the same command with --resume to continue where this run stopped"
            )
        raise ConversationFailed(f"{last} (after {attempts} attempt(s))")

    async def _post(self, url: str, messages: list[Message]) -> str:
        try:
            response = await self.http.post(f"{url}/v1/chat/completions", json=self.sampling.body(messages))
        except (httpx.ConnectError, httpx.ConnectTimeout) as err:
            raise _Transient(f"cannot reach {url} ({_reason(err)})", unreachable=True) from None
        except httpx.TransportError as err:  # read timeouts, dropped connections
            raise _Transient(f"{type(err).__name__} from {url}: {_reason(err)}") from None
        status = response.status_code
        if status >= 500 or status in RETRY_STATUS:
            raise _Transient(f"HTTP {status} from {url}: {_error_text(response)}")
        if status != 200:
            raise ConversationFailed(f"HTTP {status} from {url}: {_error_text(response)}")
        return self._content(response, url)

    def _content(self, response: httpx.Response, url: str) -> str:
        try:
            choice = response.json()["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ConversationFailed(f"{url} answered without a chat completion: {response.text[:200]!r}") from None
        if not isinstance(content, str):
            reason = choice.get("finish_reason")
            raise ConversationFailed(f"{url} replied without text content (finish_reason {reason!r})")
        self.truncated += choice.get("finish_reason") == "length"
        return content


# --- one conversation ------------------------------------------------------------------------------
async def regenerate_messages(messages: Sequence[Message], reply: Reply) -> tuple[Message, ...]:
    """Keep system and user turns; replace each assistant turn with the reply to everything before it."""
    done: list[Message] = []
    for message in messages:
        if message["role"] == "assistant":
            message = {"role": "assistant", "content": await reply([dict(m) for m in done])}
        done.append(dict(message))
    return tuple(done)


async def regenerate_record(record: Record, reply: Reply) -> Record:
    """The record with the target's answers; a pre-formatted text row has no turns to answer."""
    if record.messages is None:
        raise ConversationFailed("a pre-formatted 'text' row has no turns to answer; give it as messages")
    return Record(record.source, record.sample_id, messages=await regenerate_messages(record.messages, reply))


@dataclass(frozen=True)
class Row:
    """One finished input: the line (without newline) for the output, or for the error file if `failed`."""

    index: int
    line: str
    failed: bool = False
    copied: bool = False  # kept from the base of a retry pass, not answered by this run


def output_row(index: int, record: Record) -> Row:
    return Row(index, json.dumps(record.to_json(), ensure_ascii=False))


def error_row(index: int, record: Record, error: str) -> Row:
    """The index makes the error file self-describing: resume knows which inputs it covers."""
    body = {"index": index, "id": record.sample_id, "source": record.source, "error": error[:MAX_ERROR_CHARS]}
    return Row(index, json.dumps(body, ensure_ascii=False), failed=True)


# --- files: what is written already, resume, the base of a retry pass ------------------------------
def default_errors_path(out: Path) -> Path:
    """`out.jsonl` -> `out.errors.jsonl`, next to the output."""
    return out.with_name(f"{out.stem}.errors{out.suffix or '.jsonl'}")


@dataclass(frozen=True)
class RunFiles:
    """The output and error files, and the renamed copies (the base) a retry pass rewrites them from."""

    out: Path
    errors: Path

    @property
    def base_out(self) -> Path:
        return self.out.with_name(f".{self.out.name}.retry-base")

    @property
    def base_errors(self) -> Path:
        return self.errors.with_name(f".{self.errors.name}.retry-base")

    def all(self) -> tuple[Path, ...]:
        return self.out, self.errors, self.base_out, self.base_errors


def trim_torn_tail(path: Path) -> None:
    """Cut a last line that has no newline: the process died while writing it, so that input is redone."""
    if not path.exists():
        return
    with path.open("r+b") as fp:
        end = pos = fp.seek(0, os.SEEK_END)
        keep = 0
        while pos > 0:
            step = min(1 << 16, pos)
            fp.seek(pos - step)
            cut = fp.read(step).rfind(b"\n")
            if cut >= 0:
                keep = pos - step + cut + 1
                break
            pos -= step
        if keep != end:
            fp.truncate(keep)


def iter_lines(path: Path) -> Iterator[bytes]:
    """Complete lines of a file (none if it does not exist); splits on newline bytes only, as written."""
    if not path.exists():
        return
    with path.open("rb") as fp:
        for line in fp:
            yield line.rstrip(b"\n")


def _parse(line: bytes, path: Path, lineno: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
        if isinstance(row, dict):
            return row
    except ValueError:
        pass
    raise RegenerateError(
        f"{path}:{lineno} is not a line hsstore regenerate wrote; delete the files or start over with --overwrite"
    )


def read_errors(path: Path) -> dict[int, str]:
    """Error lines by input index."""
    errors: dict[int, str] = {}
    for lineno, line in enumerate(iter_lines(path), 1):
        index = _parse(line, path, lineno).get("index")
        if not isinstance(index, int) or index < 0 or index in errors:
            raise RegenerateError(f"{path}:{lineno} has a missing or repeated input index; start over with --overwrite")
        errors[index] = line.decode()
    return errors


def _check_row(where: str, row: dict[str, Any], index: int, records: Sequence[Record]) -> None:
    """The row at `where` must be input `index`: same id and source, else the inputs changed."""
    if index >= len(records):
        raise RegenerateError(
            f"{where} is row {index + 1} but there are {len(records)} inputs; pass the same --data and "
            "--max-samples as the run that wrote it, or --overwrite to start over"
        )
    record = records[index]
    if (str(row.get("id")), row.get("source")) != (record.sample_id, record.source):
        raise RegenerateError(
            f"{where} is {row.get('source')} id={row.get('id')}, but input {index} is {record.source} "
            f"id={record.sample_id}: these files came from other inputs; pass the same --data and --max-samples "
            "as the run that wrote them, or --overwrite to start over"
        )


class Written:
    """An output/error pair as written: its rows in input order, each checked against its input."""

    def __init__(self, out: Path, errors: Path, records: Sequence[Record]) -> None:
        self.out = out
        self.errors_path = errors
        self.errors = read_errors(errors)
        self.records = records
        self.done = sum(1 for _ in self.rows())

    def rows(self) -> Iterator[Row]:
        """Rows of inputs 0, 1, ... as long as one of the files holds the next; raises on a mismatch."""
        index = 0
        lines = enumerate(iter_lines(self.out), 1)
        while True:
            if index in self.errors:
                row = json.loads(self.errors[index])
                _check_row(f"{self.errors_path} (index {index})", row, index, self.records)
                yield Row(index, self.errors[index], failed=True)
            else:
                numbered = next(lines, None)
                if numbered is None:
                    break
                lineno, line = numbered
                _check_row(f"{self.out}:{lineno}", _parse(line, self.out, lineno), index, self.records)
                yield Row(index, line.decode())
            index += 1
        if any(i >= index for i in self.errors):
            raise RegenerateError(
                f"{self.errors_path} lists input {max(self.errors)} but {self.out} ends at input {index}; these "
                "files do not belong together: start over with --overwrite"
            )


def check_can_write(files: RunFiles, resume: bool, overwrite: bool) -> None:
    """Never append to or replace earlier output unless asked: that is hours of server time."""
    if files.out == files.errors:
        raise RegenerateError(f"the error file must differ from the output ({files.out}); pass another --errors")
    if resume and overwrite:
        raise RegenerateError("--resume and --overwrite contradict each other; pass one of them")
    existing = [path for path in files.all() if path.exists()]
    if existing and not resume and not overwrite:
        raise RegenerateError(
            f"{existing[0]} already exists; pass --resume to continue that run or --overwrite to start over"
        )


def _finish_interrupted_setup(files: RunFiles) -> None:
    """A retry pass renames out then errors to the base and cleans up base out then base errors; a crash
    between two steps leaves one base file, and which one says how to finish."""
    if files.base_out.exists() and not files.base_errors.exists():
        if files.errors.exists():
            files.errors.replace(files.base_errors)
        else:
            files.base_errors.touch()
    elif files.base_errors.exists() and not files.base_out.exists():
        files.base_errors.unlink()


def _start_retry_pass(files: RunFiles) -> None:
    """Move the current pair aside as the base; the pass writes both files anew, copying kept rows."""
    files.out.touch()
    files.out.replace(files.base_out)
    files.errors.replace(files.base_errors)


def open_run(
    files: RunFiles, records: Sequence[Record], *, overwrite: bool, retry_errors: bool
) -> tuple[int, Written | None]:
    """Bring the files to a consistent state; return how many inputs are done and the base of a retry pass."""
    if overwrite:
        for path in files.all():
            path.unlink(missing_ok=True)
    _finish_interrupted_setup(files)
    trim_torn_tail(files.out)
    trim_torn_tail(files.errors)
    current = Written(files.out, files.errors, records)
    done = current.done
    if retry_errors and current.errors and not files.base_out.exists():
        _start_retry_pass(files)
        done = 0
    base = Written(files.base_out, files.base_errors, records) if files.base_out.exists() else None
    return done, base


def close_run(files: RunFiles) -> None:
    """After the last input: drop the base (out first, see `_finish_interrupted_setup`)."""
    files.base_out.unlink(missing_ok=True)
    files.base_errors.unlink(missing_ok=True)


# --- the ordered run -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """One input to write: `kept` is a row copied from the base (no request needed)."""

    index: int
    record: Record
    kept: Row | None = None


def plan(records: Sequence[Record], start: int, base: Written | None, retry_errors: bool) -> Iterator[Task]:
    """Every input from `start` on, in order; base rows are kept, except failed ones when retrying errors."""
    base_rows = base.rows() if base is not None else iter(())
    for index, record in enumerate(records):
        kept = next(base_rows, None) if base is not None and index < base.done else None
        if index < start:
            continue
        if kept is not None and not (kept.failed and retry_errors):
            yield Task(index, record, replace(kept, copied=True))
        else:
            yield Task(index, record)


class OrderedSink:
    """Appends rows strictly in input order, one flushed line each, to the output or the error file."""

    def __init__(self, files: RunFiles, start: int, on_row: Callable[[Row], None] | None = None) -> None:
        self.files = files
        self.next_index = start
        self.on_row = on_row
        self.files.out.parent.mkdir(parents=True, exist_ok=True)
        self._out = files.out.open("ab")
        self._errors: Any = None  # opened at the first error: no empty error file after a clean run
        self.answered = 0
        self.failed = 0
        self.copied = 0

    def write(self, row: Row) -> None:
        if row.index != self.next_index:
            raise AssertionError(f"row {row.index} written out of order (expected {self.next_index})")
        if row.failed and self._errors is None:
            self.files.errors.parent.mkdir(parents=True, exist_ok=True)
            self._errors = self.files.errors.open("ab")
        fp = self._errors if row.failed else self._out
        fp.write(row.line.encode() + b"\n")
        fp.flush()
        self.next_index += 1
        if row.copied:
            self.copied += 1
        elif row.failed:
            self.failed += 1
        else:
            self.answered += 1
        if self.on_row is not None:
            self.on_row(row)

    def close(self) -> None:
        self._out.close()
        if self._errors is not None:
            self._errors.close()


def _ready(row: Row) -> asyncio.Future[Row]:
    future: asyncio.Future[Row] = asyncio.get_running_loop().create_future()
    future.set_result(row)
    return future


async def run_ordered(
    tasks: Iterable[Task], answer: Callable[[Task], Awaitable[Row]], sink: OrderedSink, concurrency: int
) -> None:
    """Answer up to `concurrency` conversations at once and write them in input order; finished rows wait
    for a slower one before them in a window of a few per slot, so memory stays bounded."""
    gate = asyncio.Semaphore(concurrency)
    window = WINDOW_PER_SLOT * concurrency

    async def gated(task: Task) -> Row:
        async with gate:
            return await answer(task)

    pending: deque[asyncio.Future[Row]] = deque()
    try:
        for task in tasks:
            pending.append(_ready(task.kept) if task.kept is not None else asyncio.ensure_future(gated(task)))
            while len(pending) >= window:
                sink.write(await pending.popleft())
        while pending:
            sink.write(await pending.popleft())
    finally:
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


# --- the whole command -----------------------------------------------------------------------------
@dataclass(frozen=True)
class RegenerateResult:
    """What a run did, for the summary line: the output files, counts and the request spread."""

    out: Path
    errors: Path
    model: str
    total: int  # inputs
    resumed: int  # inputs already done before this run
    answered: int  # conversations regenerated by this run
    failed: int  # conversations this run sent to the error file
    copied: int  # rows a retry pass copied from the base
    truncated: int  # replies cut off by max_tokens
    requests: dict[str, int]  # per server
    seconds: float


@dataclass(frozen=True)
class RegenerateSettings:
    """Everything about a run except its inputs and output, as the CLI options give it."""

    servers: tuple[str, ...]
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 0.0
    concurrency: int = 8
    timeout: float = 600.0
    retry: RetryPolicy = RetryPolicy()

    def check(self) -> None:
        if not self.servers:
            raise RegenerateError("no server given; pass --server http://HOST:PORT (repeat it for several servers)")
        if self.concurrency < 1:
            raise RegenerateError(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.retry.retries < 0:
            raise RegenerateError(f"--retries must be 0 or more, got {self.retry.retries}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise RegenerateError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if self.timeout <= 0:
            raise RegenerateError(f"--timeout must be positive, got {self.timeout}")

    def http_client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=self.concurrency + len(self.servers))
        timeout = httpx.Timeout(self.timeout, connect=min(self.timeout, CONNECT_TIMEOUT), pool=None)
        return httpx.AsyncClient(timeout=timeout, limits=limits)


async def find_model(settings: RegenerateSettings) -> str:
    """Check every server answers and serves the model before any file is touched."""
    async with settings.http_client() as http:
        return await resolve_model(http, [normalize_url(url) for url in settings.servers], settings.model)


async def _answer_all(
    settings: RegenerateSettings, model: str, tasks: Iterable[Task], sink: OrderedSink
) -> tuple[ChatClient, ServerPool]:
    pool = ServerPool([normalize_url(url) for url in settings.servers])
    async with settings.http_client() as http:
        chat = ChatClient(http, pool, Sampling(model, settings.max_tokens, settings.temperature), settings.retry)

        async def answer(task: Task) -> Row:
            try:
                return output_row(task.index, await regenerate_record(task.record, chat.reply))
            except ConversationFailed as err:
                return error_row(task.index, task.record, str(err))

        await run_ordered(tasks, answer, sink, settings.concurrency)
    return chat, pool


def regenerate(
    inputs: Sequence[str | Path],
    out: str | Path,
    settings: RegenerateSettings,
    *,
    errors: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    retry_errors: bool = False,
    max_samples: int | None = None,
    skips: SkipCounter | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_row: Callable[[Row], None] | None = None,
) -> RegenerateResult:
    """Answer every conversation of `inputs` (in input order) with the servers' model; write the normalized
    JSONL to `out` and the conversations that failed to `errors` (default: `<out stem>.errors.jsonl`).

    `on_start(total, done)` is called once the inputs are read and the files checked; `on_row` after each
    row is written."""
    started = time.perf_counter()
    settings.check()
    out = Path(out)
    files = RunFiles(out, Path(errors) if errors is not None else default_errors_path(out))
    check_can_write(files, resume, overwrite)
    model = asyncio.run(find_model(settings))
    skips = skips if skips is not None else SkipCounter()
    records = load_records(inputs, max_samples=max_samples, skips=skips)
    if not records:
        raise DataError(f"no usable conversations in {', '.join(map(str, inputs))}\n{skips.report()}".rstrip())
    done, base = open_run(files, records, overwrite=overwrite, retry_errors=retry_errors)
    if on_start is not None:
        on_start(len(records), done)
    sink = OrderedSink(files, done, on_row)
    try:
        chat, pool = asyncio.run(_answer_all(settings, model, plan(records, done, base, retry_errors), sink))
    finally:
        sink.close()
    if sink.next_index != len(records):
        raise AssertionError(f"wrote {sink.next_index} of {len(records)} rows")
    close_run(files)
    return RegenerateResult(
        files.out, files.errors, model, len(records), done, sink.answered, sink.failed, sink.copied,
        chat.truncated, dict(pool.requests), time.perf_counter() - started,
    )  # fmt: skip
