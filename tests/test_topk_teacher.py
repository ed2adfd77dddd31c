"""The top-k teacher: a store that keeps the target's top-k next-token log-probs instead of its last layer.

Checked on real tiny models (the confident tiny Llama of generate_fixtures): with k = the whole vocab
the stored top-k gives exactly the teacher the last layer gives, and a small k gives its renormalized
truncation; `hsstore generate --teacher topk` writes what the target's own forward says; the writer
refuses malformed teacher rows; `hsstore train` and `hsstore eval` run on a store without a last layer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zarr
from typer.testing import CliRunner

from hsstore import IncompatibleStoreError, SampleError, StoreReader, StoreWriter
from hsstore.manifest import Geometry, HiddenSpec, Manifest, TargetInfo, TeacherSpec
from hsstore.train.packing import pack_batch
from hsstore.train.teacher import Teacher, TopkTeacher
from hsstore.vocab import build_draft_vocab, read_draft_vocab

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
K = 16
DRAFT_VOCAB = 256
SEQ = 256


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: OpenMP spin-waits dominate a busy 2-CPU machine
    yield
    torch.set_num_threads(threads)


def chats(n: int) -> list[dict]:
    out = []
    for i in range(n):
        words = " ".join(f"word{j % 23}" for j in range(4 + (i * 5) % 30))
        out.append(
            {
                "id": f"chat-{i}",
                "conversations": [
                    {"from": "human", "value": f"Question {i}: tell me about {words}."},
                    {"from": "gpt", "value": f"Sure. {words}. That is all about {i % 7}."},
                ],
            }
        )
    return out


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=600, cwd=ROOT
    )
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def invoke(*args: str):
    from hsstore.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def read_all(reader: StoreReader) -> list[dict[str, torch.Tensor]]:
    return [reader[i] for i in range(len(reader))]


def next_trained(mask: torch.Tensor) -> torch.Tensor:
    """Teacher positions of one sample: loss_mask[j + 1] == 1."""
    out = torch.zeros(len(mask), dtype=torch.bool)
    out[:-1] = mask[1:].bool()
    return out


# --- (a) the stored top-k against the last-layer teacher ---------------------------------------------------
@pytest.fixture(scope="module")
def both_store(confident_target: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store keeping the last layer AND the top-k with k = the whole vocab, from the real pipeline."""
    from transformers import AutoTokenizer

    from hsstore.generate.backends.hf import HFBackend
    from hsstore.generate.inputs import load_samples
    from hsstore.generate.pipeline import StoreSettings, build_manifest, run_generate

    root = tmp_path_factory.mktemp("both")
    data = root / "chats.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in chats(12)) + "\n")
    loaded = load_samples([data], AutoTokenizer.from_pretrained(confident_target), seq_length=SEQ, cache_dir=root)
    backend = HFBackend(str(confident_target), dtype="bfloat16")
    settings = StoreSettings(
        out=str(root / "store"), aux_layer_ids=[1, 2, 3], geometry=Geometry(64, 1024), batch_tokens=1024,
        max_seq_length=SEQ, codec="lossless", teacher="both", topk=backend.vocab_size,
    )  # fmt: skip
    manifest = build_manifest(backend, str(confident_target), settings, loaded.tokenizer_info, loaded.sources)
    assert manifest.roles == ["aux", "last"] and manifest.teacher.k == backend.vocab_size
    run_generate(backend, manifest, loaded.samples, settings)
    return settings.out


def packed(reader: StoreReader, k: int | None = None) -> dict:
    samples = read_all(reader)
    if k is not None:
        samples = [
            {**s, "teacher_ids": s["teacher_ids"][:, :k], "teacher_logprobs": s["teacher_logprobs"][:, :k]}
            for s in samples
        ]
    n = len(samples)
    return pack_batch([samples[0::2], samples[1::2]], [range(0, n, 2), range(1, n, 2)], max_tokens=4096)


def reference_probs(target: Path, last: torch.Tensor) -> torch.Tensor:
    """The target's full-vocab softmax in float64 (final norm + lm_head of the checkpoint)."""
    from hsstore.targetweights import load_final_head

    norm, head, eps = load_final_head(target)
    x = last.double()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.double()
    return torch.softmax(x @ head.double().T, dim=-1)


def test_full_vocab_topk_equals_the_last_layer_teacher(both_store: str, confident_target: Path) -> None:
    reader = StoreReader(both_store)
    vocab = build_draft_vocab(reader.token_freq(), DRAFT_VOCAB)
    d2t, t2d = torch.as_tensor(vocab.d2t), torch.as_tensor(vocab.t2d)
    batch = packed(reader)
    assert batch["teacher_ids"].dtype == torch.int32 and batch["teacher_logprobs"].dtype == torch.float16
    want = Teacher.from_target(confident_target, d2t, t2d).from_batch(batch)
    got = TopkTeacher(d2t, t2d).from_batch(batch)
    assert torch.equal(got.mask, want.mask)
    assert bool(want.mask.any()) and bool((~want.mask & (want.mass > 0)).any())  # both cases occur
    assert torch.equal(got.top1, want.top1)
    torch.testing.assert_close(got.probs, want.probs, atol=2e-3, rtol=1e-2)  # log-probs are stored in fp16
    torch.testing.assert_close(got.mass, want.mass, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("k", [1, 4])
def test_small_k_is_the_renormalized_truncation(both_store: str, confident_target: Path, k: int) -> None:
    reader = StoreReader(both_store)
    vocab = build_draft_vocab(reader.token_freq(), DRAFT_VOCAB)
    t2d = torch.as_tensor(vocab.t2d)
    batch = packed(reader, k)
    got = TopkTeacher(torch.as_tensor(vocab.d2t), t2d).from_batch(batch)

    positions = torch.zeros_like(batch["loss_mask"])
    positions[:, :-1] = batch["loss_mask"][:, 1:] & (batch["seq_ids"][:, 1:] == batch["seq_ids"][:, :-1])
    full = reference_probs(confident_target, batch["last"][positions])  # [N, vocab]
    ids = batch["teacher_ids"][positions].long()  # [N, k]
    kth = full.topk(k, dim=-1).values[:, -1:]
    assert bool((full.gather(1, ids) >= kth - 1e-4).all()), "stored ids are the target's top-k"
    kept = t2d[ids]
    p = torch.where(kept, full.gather(1, ids), 0.0)
    expected = torch.zeros(len(ids), vocab.t2d.shape[0], dtype=torch.float64)
    expected.scatter_(1, ids, p / p.sum(-1, keepdim=True).clamp(min=1e-300))
    draft_ids = torch.as_tensor(vocab.draft_ids_in_target)
    torch.testing.assert_close(got.probs[positions].double(), expected[:, draft_ids], atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(got.mass[positions].double(), p.sum(-1), atol=2e-3, rtol=1e-2)
    assert torch.equal(got.mask[positions], kept[:, 0])
    assert torch.equal(got.top1[positions], torch.where(kept[:, 0], ids[:, 0], -1))
    assert not bool(got.mask[~positions].any()) and not bool(got.probs[~positions].any())


# --- (b) `hsstore generate --teacher topk` --------------------------------------------------------------
@pytest.fixture(scope="module")
def topk_store(confident_target: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("topk")
    data = root / "chats.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in chats(60)) + "\n")
    out = str(root / "store")
    run(
        "-m", "hsstore.cli", "generate", "--model", str(confident_target), "--data", str(data), "--out", out,
        "--seq-length", str(SEQ), "--layer-ids", "1,2,3", "--chunk-tokens", "64", "--shard-tokens", "1024",
        "--batch-tokens", "2048", "--cache-dir", str(root / "cache"), "--teacher", "topk", "--topk", str(K),
    )  # fmt: skip
    invoke("vocab", out, "--draft-vocab-size", str(DRAFT_VOCAB))
    return out


def test_generate_topk_stores_the_targets_top_k(topk_store: str, confident_target: Path) -> None:
    from transformers import AutoModelForCausalLM

    reader = StoreReader(topk_store)
    m = reader.manifest
    assert m.roles == ["aux"] and m.teacher == TeacherSpec.topk(K, m.target.num_layers, m.target.vocab_size)
    assert m.teacher.ids_dtype == "uint16"
    part = zarr.open_group(topk_store, mode="r")["parts/part-00000"]
    assert "last" not in part["hidden"] and part["teacher/ids"].shape[1:] == (K,)
    model = AutoModelForCausalLM.from_pretrained(confident_target, dtype=torch.bfloat16)
    matched = total = 0
    for i in range(0, len(reader), 7):
        s = reader[i]
        rows = next_trained(s["loss_mask"])
        ids, lp = s["teacher_ids"], s["teacher_logprobs"].float()
        assert bool(rows.any()) and not bool(rows[-1])
        assert not bool(ids[~rows].any()) and not bool(lp[~rows].any()), "rows off teacher positions are zero"
        assert bool((lp[rows] <= 0).all()) and bool((lp[rows].diff(dim=-1) <= 0).all())
        with torch.no_grad():
            logp = model(s["input_ids"].long()[None]).logits[0].float().log_softmax(-1)
        top2 = logp[rows].topk(2, dim=-1)
        clear = (top2.values[:, 0] - top2.values[:, 1]) > 0.5  # bf16 batches of other shapes may swap near-ties
        assert torch.equal(ids[rows][clear, 0].long(), top2.indices[clear, 0])
        torch.testing.assert_close(lp[rows][clear, 0], top2.values[clear, 0], atol=0.1, rtol=0.05)
        matched += int((ids[rows][:, 0].long() == top2.indices[:, 0]).sum())
        total += int(rows.sum())
    assert matched >= 0.95 * total, (matched, total)

    shown = " ".join(invoke("inspect", topk_store).output.split())  # however rich wrapped it
    assert f"teacher=[{m.target.num_layers}] [topk k={K}]" in shown and "instead of the last layer" in shown
    assert "teacher (top-16, for last)" in shown
    assert "ok:" in invoke("verify", topk_store).output


# --- (c) the writer refuses bad teacher input -------------------------------------------------------------
H, VOCAB, LAYERS = 64, 1000, 8


def topk_manifest(k: int = 4, vocab: int = VOCAB) -> Manifest:
    return Manifest(
        target=TargetInfo("tiny", H, LAYERS, vocab),
        hidden=(HiddenSpec("aux", (2, 4, 5), H),),
        geometry=Geometry(32, 128),
        teacher=TeacherSpec.topk(k, LAYERS, vocab),
    )


def teacher_sample(n: int, k: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, VOCAB, generator=g) * 3
    lp, ids = logits.log_softmax(-1).topk(k, dim=-1)
    return {
        "input_ids": torch.randint(0, VOCAB, (n,), generator=g),
        "loss_mask": (torch.rand(n, generator=g) > 0.4).to(torch.uint8),
        "hidden": {"aux": torch.randn(n, 3, H, generator=g).to(torch.bfloat16)},
        "teacher": (lp, ids),
    }


def poke(t: torch.Tensor, index, value) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def teacher_row(s: dict) -> int:
    """A teacher position of the sample (where the writer checks rows)."""
    return int(next_trained(s["loss_mask"]).nonzero()[0, 0])


BAD_TEACHER = {
    "missing": (lambda s: None, ["keeps a top-4 teacher", "none was passed"]),
    "not a pair": (lambda s: s["teacher"][0], ["pair (logprobs, ids)"]),
    "wrong k": (lambda s: (s["teacher"][0][:, :3], s["teacher"][1][:, :3]), ["logprobs has shape (20, 3)", "(20, 4)"]),
    "too short": (lambda s: (s["teacher"][0][:-1], s["teacher"][1][:-1]), ["shape (19, 4)"]),
    "id >= vocab": (
        lambda s: (s["teacher"][0], poke(s["teacher"][1], (teacher_row(s), 2), VOCAB)),
        ["id 1000", "0..999"],
    ),
    "negative id": (lambda s: (s["teacher"][0], poke(s["teacher"][1], (teacher_row(s), 0), -3)), ["id -3"]),
    "float ids": (lambda s: (s["teacher"][0], s["teacher"][1].float()), ["ids must be integers"]),
    "nan": (lambda s: (poke(s["teacher"][0], (teacher_row(s), 1), float("nan")), s["teacher"][1]), ["NaN"]),
    "probabilities": (lambda s: (s["teacher"][0].exp(), s["teacher"][1]), ["log-probabilities"]),
    "unsorted": (lambda s: (s["teacher"][0].flip(-1), s["teacher"][1].flip(-1)), ["sorted"]),
    "repeated id": (
        lambda s: (
            s["teacher"][0],
            poke(s["teacher"][1], (teacher_row(s), 1), int(s["teacher"][1][teacher_row(s), 0])),
        ),
        ["repeats a token id"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_TEACHER))
def test_writer_refuses_bad_teacher(case: str, tmp_path: Path) -> None:
    make_bad, expect = BAD_TEACHER[case]
    good, bad = teacher_sample(20, seed=1), teacher_sample(20, seed=2)
    location = str(tmp_path / "store")
    with StoreWriter(location, topk_manifest()) as w:
        w.append(good["input_ids"], good["loss_mask"], good["hidden"], sample_id="good", teacher=good["teacher"])
        with pytest.raises(SampleError) as err:
            w.append(bad["input_ids"], bad["loss_mask"], bad["hidden"], sample_id="bad-1", teacher=make_bad(bad))
    message = str(err.value)
    assert location in message and "'bad-1'" in message
    for piece in expect:
        assert piece in message, message
    reader = StoreReader(location)
    assert len(reader) == 1 and torch.equal(reader[0]["input_ids"].long(), good["input_ids"])


def test_teacher_for_a_store_without_one_is_refused(tmp_path: Path, make_manifest, make_sample) -> None:
    s = make_sample(0, 10)
    with StoreWriter(str(tmp_path / "store"), make_manifest()) as w, pytest.raises(SampleError, match="declares none"):
        w.append(s.input_ids, s.loss_mask, s.hidden, teacher=(torch.zeros(10, 4), torch.zeros(10, 4, dtype=torch.long)))


def test_teacher_rows_round_trip(tmp_path: Path) -> None:
    """Rows off teacher positions are stored as zeros whatever they held; -inf takes the floor; sizes count
    the teacher as the bf16 last layer it replaces."""
    from hsstore.summary import array_sizes, file_sizes

    location = str(tmp_path / "store")
    samples = [teacher_sample(n, seed=n) for n in (50, 130, 7)]
    samples[0]["teacher"] = (
        poke(samples[0]["teacher"][0], (teacher_row(samples[0]), 3), float("-inf")),
        samples[0]["teacher"][1],
    )
    with StoreWriter(location, topk_manifest()) as w:
        for i, s in enumerate(samples):
            w.append(s["input_ids"], s["loss_mask"], s["hidden"], sample_id=f"s{i}", teacher=s["teacher"])
    reader = StoreReader(location)
    for s, got in zip(samples, read_all(reader), strict=True):
        rows = next_trained(s["loss_mask"])
        lp, ids = s["teacher"]
        assert got["teacher_ids"].dtype == torch.int32 and got["teacher_logprobs"].dtype == torch.float16
        assert torch.equal(got["teacher_ids"][rows].long(), ids[rows])
        torch.testing.assert_close(got["teacher_logprobs"][rows].float(), lp[rows].clamp(min=-60).half().float())
        assert not bool(got["teacher_ids"][~rows].any()) and not bool(got["teacher_logprobs"][~rows].any())
    assert float(reader[0]["teacher_logprobs"][teacher_row(samples[0]), 3]) == -60.0
    sizes = {s.name: s for s in array_sizes(reader, file_sizes(location))}
    assert sizes["teacher (top-4, for last)"].logical_bytes == reader.num_tokens * H * 2
    assert sizes["teacher (top-4, for last)"].stored_bytes > 0


def test_topk_store_resumes_and_verifies(tmp_path: Path) -> None:
    """The teacher arrays ride the same shard path: a partial last shard is reloaded and rewritten on resume."""
    from hsstore.verify import verify_store

    location = str(tmp_path / "store")
    samples = [teacher_sample(n, seed=n) for n in (90, 70, 40, 100)]
    for part, resume in ((samples[:2], False), (samples[2:], True)):
        with StoreWriter(location, topk_manifest(), resume=resume) as w:
            for s in part:
                w.append(
                    s["input_ids"],
                    s["loss_mask"],
                    s["hidden"],
                    sample_id=str(len(s["input_ids"])),
                    teacher=s["teacher"],
                )
    reader = StoreReader(location)
    assert len(reader) == 4 and verify_store(location).ok
    for s, got in zip(samples, read_all(reader), strict=True):
        rows = next_trained(s["loss_mask"])
        assert torch.equal(got["teacher_ids"][rows].long(), s["teacher"][1][rows])


def test_manifest_teacher_validation_and_round_trip(make_manifest) -> None:
    m = topk_manifest()
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    old = make_manifest().to_dict()
    assert "teacher" not in old and Manifest.from_dict(old).teacher is None  # stores without a teacher unchanged
    for k in (0, VOCAB + 1):
        with pytest.raises(IncompatibleStoreError, match=r"k = \d+ must be within 1..1000"):
            topk_manifest(k=k)
    assert TeacherSpec.topk(8, LAYERS, 70000).ids_dtype == "int32"
    with pytest.raises(IncompatibleStoreError, match="cannot hold the ids"):
        Manifest(
            target=TargetInfo("big", H, LAYERS, 70000),
            hidden=(HiddenSpec("aux", (2, 4, 5), H),),
            teacher=TeacherSpec(8, LAYERS, ids_dtype="uint16"),
        )


# --- (d) training and eval on a store without the last layer ---------------------------------------------
def test_train_and_eval_on_a_topk_store(topk_store: str, confident_target: Path, tmp_path: Path) -> None:
    from hsstore.errors import HSStoreError
    from hsstore.train.trainer import METRICS_FILE, TrainSettings, check_inputs

    inputs = check_inputs(TrainSettings(store=topk_store, target=str(confident_target), out=str(tmp_path / "x")))
    assert isinstance(inputs.teacher, TopkTeacher)  # no lm_head loaded for the teacher
    with pytest.raises(HSStoreError, match=r"no 'last'.*--teacher topk"):
        check_inputs(TrainSettings(store=topk_store, target=str(confident_target), out="x", teacher="last"))

    out = tmp_path / "run"
    run(
        "-m", "hsstore.train", "--store", topk_store, "--target", str(confident_target), "--out", str(out),
        "--ttt-steps", "3", "--max-tokens-per-batch", "384", "--lr", "3e-3", "--warmup-steps", "2",
        "--log-every", "2", "--max-steps", "20", "--num-workers", "0", "--checkpoint-every", "0", "--eval-every", "0",
    )  # fmt: skip
    log = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    train = [e for e in log if e["split"] == "train"]
    assert train[-1]["loss"] < 0.6 * train[0]["loss"], (train[0]["loss"], train[-1]["loss"])
    assert train[-1]["acc_0"] > train[0]["acc_0"]
    assert (out / "draft" / "model.safetensors").is_file()

    result = invoke("eval", "--checkpoint", str(out), "--store", topk_store, "--json", "--num-workers", "0")
    values = json.loads(result.output)
    assert 0.0 <= values["acc_0"] <= 1.0 and values["loss"] > 0
    vocab = read_draft_vocab(StoreReader(topk_store))
    assert len(vocab.d2t) == DRAFT_VOCAB


@pytest.mark.slow
def test_vllm_backend_stores_what_hf_stores(topk_store: str, confident_target: Path, tmp_path: Path) -> None:
    """The top-k is computed after the backend's forward, so vLLM's captured last layer gives the same teacher."""
    pytest.importorskip("vllm")
    reference = StoreReader(topk_store)
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in chats(60)) + "\n")
    out = str(tmp_path / "store")
    run(
        "-m", "hsstore.cli", "generate", "--model", str(confident_target), "--data", str(data), "--out", out,
        "--seq-length", str(SEQ), "--layer-ids", "1,2,3", "--chunk-tokens", "64", "--shard-tokens", "1024",
        "--cache-dir", str(tmp_path / "cache"), "--teacher", "topk", "--topk", str(K), "--backend", "vllm",
        "--max-samples", "12",
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},  # GiB; vLLM's CPU build otherwise reserves 92% of RAM
    )  # fmt: skip
    reader = StoreReader(out)
    assert reader.manifest.content_fields() == reference.manifest.content_fields()
    by_id = {sid: i for i, sid in enumerate(reference.sample_ids)}
    agree = total = 0
    for i, sid in enumerate(reader.sample_ids):
        got, want = reader[i], reference[by_id[sid]]
        assert torch.equal(got["input_ids"], want["input_ids"])
        rows = next_trained(got["loss_mask"])
        assert not bool(got["teacher_ids"][~rows].any())
        agree += int((got["teacher_ids"][rows, 0] == want["teacher_ids"][rows, 0]).sum())
        total += int(rows.sum())
        diff = (got["teacher_logprobs"][rows, 0].float() - want["teacher_logprobs"][rows, 0].float()).abs()
        assert float(diff.max()) < 0.1, f"sample {sid}: top-1 log-prob differs by {float(diff.max()):.3f}"
    assert agree >= 0.98 * total, (agree, total)
