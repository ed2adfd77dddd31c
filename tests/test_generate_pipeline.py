"""`hsstore generate` end to end through the real CLI: tiny target, real transformers, real zarr.

Covers what a user relies on: stored states are the backend's states for the stored tokens, the
manifest records the layers, a killed run resumes without holes or duplicates, data-parallel
shards merge, and bad settings fail with one clear line before anything is written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from hsstore import StoreReader
from hsstore.generate.backends.hf import HFBackend
from hsstore.writer import content_hash

SEQ = 256
CLI = [sys.executable, "-m", "hsstore.cli"]


def conversations(n: int) -> list[dict]:
    """Small multi-turn chats with a system prompt; lengths vary so batches pad and shards fill."""
    out = []
    for i in range(n):
        words = " ".join(f"word{j % 37}" for j in range(5 + (i * 7) % 40))
        out.append(
            {
                "id": f"conv-{i}",
                "conversations": [
                    {"from": "system", "value": "You are terse."},
                    {"from": "human", "value": f"Question {i}: what about {words}?"},
                    {"from": "gpt", "value": f"Answer {i}: {words}."},
                    {"from": "human", "value": "And then?"},
                    {"from": "gpt", "value": f"Then {i % 5} more."},
                ],
            }
        )
    return out


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in conversations(60)) + "\n")
    return path


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    # VLLM_CPU_KVCACHE_SPACE: vLLM's CPU build otherwise reserves 92% of RAM for its KV cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"hsstore {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def generate_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "generate", "--model", str(model), "--data", str(data), "--out", str(out), "--seq-length", str(SEQ),
        "--layer-ids", "1,2,3", "--chunk-tokens", "64", "--shard-tokens", "512", "--batch-tokens", "1024",
        "--no-shuffle", "--cache-dir", str(out.parent / "cache"), "--codec", "lossless", "--teacher", "last", *extra,
    ]  # fmt: skip


def test_generate_stores_the_backends_states(tiny_llama3: Path, chat_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    run_cli(*generate_args(tiny_llama3, chat_file, out))
    reader = StoreReader(str(out))
    m = reader.manifest
    assert len(reader) == 60
    assert m.hidden_spec("aux").layer_ids == (1, 2, 3)
    assert m.hidden_spec("last").layer_ids == (m.target.num_layers,)
    assert m.max_seq_length == SEQ and m.sources[0].content_hash
    assert "vllm" in m.layer_convention
    backend = HFBackend(str(tiny_llama3))
    for i in (0, 17, 59):
        s = reader[i]
        ids = s["input_ids"].numpy()
        (expected,) = backend.hidden_states([ids], [1, 2, 3, m.target.num_layers])
        # generate ran these in padded batches; bf16 matmuls of other shapes round differently
        torch.testing.assert_close(s["aux"].float(), expected[:, :3].float(), atol=0.05, rtol=0.05)
        torch.testing.assert_close(s["last"].float(), expected[:, 3].float(), atol=0.05, rtol=0.05)
        assert 0 < int(s["loss_mask"].sum()) < len(ids)
    freq = reader.token_freq()
    assert int(freq.sum()) == reader.num_loss_tokens


def _committed_samples(out: Path, rank: int = 0) -> int:
    try:
        attrs = json.loads((out / "parts" / f"part-{rank:05d}" / "zarr.json").read_text())["attributes"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return 0
    return int(attrs.get("commit", {}).get("samples", 0))


@pytest.mark.slow
def test_killed_generate_resumes_without_holes_or_duplicates(
    tiny_llama3: Path, chat_file: Path, tmp_path: Path
) -> None:
    clean, crashed = tmp_path / "clean" / "store", tmp_path / "crashed" / "store"
    run_cli(*generate_args(tiny_llama3, chat_file, clean, "--shard-tokens", "256", "--batch-tokens", "256"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # commit after every shard (not once a second), so that the kill lands between commits of a sub-second run
    args = generate_args(
        tiny_llama3, chat_file, crashed, "--shard-tokens", "256", "--batch-tokens", "256", "--commit-seconds", "0"
    )
    child = subprocess.Popen([*CLI, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while _committed_samples(crashed) == 0 and child.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at = _committed_samples(crashed)
    assert 0 < killed_at < 60, f"the kill should land mid-run (committed {killed_at})"
    refused = run_cli(*args, check=False)
    assert refused.returncode == 1 and "--resume" in refused.stderr
    run_cli(*args, "--resume")
    a, b = StoreReader(str(clean)), StoreReader(str(crashed))
    assert len(b) == 60
    assert list(b.sample_ids) == list(a.sample_ids)
    assert np.array_equal(b.index.content_hash, a.index.content_hash)
    for i in (0, killed_at - 1, killed_at, 59):
        assert torch.equal(b[i]["aux"], a[i]["aux"]) and torch.equal(b[i]["last"], a[i]["last"])
    assert run_cli("verify", str(crashed)).returncode == 0


@pytest.mark.slow
def test_data_parallel_shards_merge(tiny_llama3: Path, chat_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [*CLI, *generate_args(tiny_llama3, chat_file, out, "--num-shards", "2", "--shard-index", str(r))],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for r in (0, 1)
    ]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read().decode()
    reader = StoreReader(str(out))
    assert len(reader) == 60 and len(reader.parts) == 2
    assert sorted(reader.sample_ids) == sorted(f"conv-{i}" for i in range(60))
    assert set(reader.sample_ids[reader.index.part == 0]) == {f"conv-{i}" for i in range(0, 60, 2)}
    for i in range(len(reader)):
        s = reader[i]
        assert content_hash(s["input_ids"].numpy(), s["loss_mask"].numpy()) == int(reader.index.content_hash[i])


def test_bad_settings_fail_with_one_clear_line(
    tiny_llama3: Path, tiny_target_factory, chat_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "store"
    bad_layers = run_cli(*generate_args(tiny_llama3, chat_file, out)[:-2], "--layer-ids", "1,9", check=False)
    assert bad_layers.returncode == 1
    assert "out of range" in bad_layers.stderr and "Traceback" not in bad_layers.stderr
    assert not out.exists(), "nothing is written when the settings are wrong"
    negative = run_cli(*generate_args(tiny_llama3, chat_file, out, "--commit-seconds", "-1"), check=False)
    assert negative.returncode == 2 and "--commit-seconds" in negative.stderr and "Traceback" not in negative.stderr
    assert not out.exists()

    run_cli(*generate_args(tiny_llama3, chat_file, out, "--max-samples", "5"))
    wider = tiny_target_factory("llama3", hidden_size=128)
    other_model = run_cli(*generate_args(wider, chat_file, out, "--resume"), check=False)
    assert other_model.returncode == 1 and "different configuration" in other_model.stderr
    assert "hidden_size" in other_model.stderr
    assert len(StoreReader(str(out))) == 5, "the existing store is untouched"

    changed = tmp_path / "changed.jsonl"
    changed.write_text("\n".join(json.dumps(c) for c in reversed(conversations(60))) + "\n")
    moved = run_cli(*generate_args(tiny_llama3, changed, out, "--resume"), check=False)
    assert moved.returncode == 1 and "changed" in moved.stderr
    assert len(StoreReader(str(out))) == 5


def test_store_is_plain_zarr_after_generate(tiny_llama3: Path, chat_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    run_cli(*generate_args(tiny_llama3, chat_file, out, "--max-samples", "8", "--codec", "fp8"))
    group = zarr.open_group(str(out), mode="r")
    part = group["parts/part-00000"]
    assert part["hidden/aux"].dtype == np.uint8 and part["hidden/aux_scale"].shape[1] == 3
    assert group.attrs["hsstore"]["hidden"][0]["codec"] == "fp8"
    shown = run_cli("query", str(out), "--min-len", "1", "--json")
    rows = [json.loads(line) for line in shown.stdout.splitlines()]
    assert len(rows) == 8 and all("chats" in r["source"] for r in rows)


@pytest.mark.slow
def test_vllm_backend_stores_what_hf_stores(tiny_llama3: Path, chat_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    hf_store, vllm_store = tmp_path / "hf" / "store", tmp_path / "vllm" / "store"
    run_cli(*generate_args(tiny_llama3, chat_file, hf_store, "--max-samples", "12"))
    run_cli(*generate_args(tiny_llama3, chat_file, vllm_store, "--max-samples", "12", "--backend", "vllm"))
    a, b = StoreReader(str(hf_store)), StoreReader(str(vllm_store))
    assert a.manifest.content_fields() == b.manifest.content_fields()
    assert list(a.sample_ids) == list(b.sample_ids) and len(b) == 12
    for i in range(len(b)):
        x, y = a[i], b[i]
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["loss_mask"], y["loss_mask"])
        for role in ("aux", "last"):
            diff = (x[role].float() - y[role].float()).norm(dim=-1) / x[role].float().norm(dim=-1)
            assert diff.max() < 0.03, f"sample {i} {role}: relative error {diff.max():.4f} (bf16 kernels differ)"
