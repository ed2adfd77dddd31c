"""`hsstore train`, `eval` and `export` end to end: a real store, real subprocesses, real Accelerate.

The store comes from the generate CLI on the tiny Llama target (its lm_head scaled up, so the teacher is
confident and there is something to learn), then `hsstore vocab --draft-vocab-size 256`. Training runs
as users run it: `python -m hsstore.train` (the `hsstore train` entry point) in one process, and
`accelerate launch --config_file configs/accelerate/{ddp,fsdp}_cpu_2.yaml -m hsstore.train` in two
gloo processes. Resume is checked for exact equality against the uninterrupted run. Bad inputs must
fail before anything trains, with the fix in the message. Sizes are tiny: every run takes seconds.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from hsstore.errors import HSStoreError
from hsstore.train.checkpoint import latest_checkpoint, list_checkpoints, load_model_state, save_checkpoint
from hsstore.train.config import DraftConfig
from hsstore.train.trainer import METRICS_FILE, warmup_cosine

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"
DRAFT_VOCAB = 256
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# small and fast: 3 TTT steps over 384-token batches, a high learning rate so 20 steps show learning
COMMON = [
    "--ttt-steps", "3", "--max-tokens-per-batch", "384", "--lr", "3e-3", "--warmup-steps", "2", "--log-every", "2",
]  # fmt: skip
VLLM_NAMES = {
    "fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d", "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight", "midlayer.post_attention_layernorm.weight", "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight", "midlayer.self_attn.v_proj.weight", "midlayer.self_attn.o_proj.weight",
    "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight",
}  # fmt: skip


def cli_app():
    """hsstore's app with the train commands, whether or not hsstore/cli.py registers them yet."""
    from hsstore.cli import app
    from hsstore.train.cli import register

    if "export" not in {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}:
        register(app)
    return app


def invoke(*args: str):
    return CliRunner().invoke(cli_app(), list(args))


def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def train(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "hsstore.train", *args], check)


def launch(config: str, *args: str) -> subprocess.CompletedProcess:
    accelerate = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]
    return run([*accelerate, "--config_file", str(ACCELERATE_CONFIGS / config), "-m", "hsstore.train", *args])


def metrics(out: Path, split: str = "train") -> list[dict]:
    lines = (out / METRICS_FILE).read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["split"] == split]


# --- a real store ---------------------------------------------------------------------------------------
def chats(n: int) -> list[dict]:
    out = []
    for i in range(n):
        words = " ".join(f"word{j % 29}" for j in range(4 + (i * 5) % 30))
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


@pytest.fixture(scope="module")
def target(confident_target: Path) -> Path:
    return confident_target


@pytest.fixture(scope="module")
def store(target: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """`hsstore generate` on 80 chats, then `hsstore vocab --draft-vocab-size 256`."""
    root = tmp_path_factory.mktemp("train-runner")
    data = root / "chats.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in chats(80)) + "\n")
    out = str(root / "store")
    run(
        [sys.executable, "-m", "hsstore.cli", "generate", "--model", str(target), "--data", str(data), "--out", out,
         "--seq-length", "256", "--layer-ids", "1,2,3", "--chunk-tokens", "64", "--shard-tokens", "1024",
         "--batch-tokens", "2048", "--cache-dir", str(root / "cache"), "--codec", "lossless", "--teacher", "last"]
    )  # fmt: skip
    result = invoke("vocab", out, "--draft-vocab-size", str(DRAFT_VOCAB))
    assert result.exit_code == 0, result.output
    return out


# --- one process: train, checkpoints, export, exact resume -------------------------------------------------
RUN_ARGS = [
    *COMMON, "--max-steps", "20", "--grad-accum", "2", "--noise-std", "0.05", "--eval-fraction", "0.2",
    "--eval-every", "10", "--checkpoint-every", "10", "--num-workers", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(store: str, target: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """20 optimizer steps of 2 accumulated batches, with noise, an eval split and checkpoints at 10 and 20."""
    out = tmp_path_factory.mktemp("single") / "run"
    proc = train("--store", store, "--target", str(target), "--out", str(out), *RUN_ARGS)
    return SimpleNamespace(out=out, stdout=proc.stdout, store=store, target=target)


@pytest.mark.slow
def test_single_process_training_learns_checkpoints_and_exports(trained: SimpleNamespace) -> None:
    log = metrics(trained.out)
    assert [e["step"] for e in log] == list(range(2, 21, 2))
    first, last = log[0], log[-1]
    assert last["loss"] < 0.5 * first["loss"], (first["loss"], last["loss"])
    assert last["acc_0"] > first["acc_0"]
    for e in log:
        assert 1.0 <= e["acceptance_length_greedy"] <= 4.0 and 0.0 <= e["data_wait_share"] <= 1.0
        assert e["tokens_per_s"] > 0 and all(0.0 <= e[f"accept_{k}"] <= 1.0 for k in range(3))
    assert [e["step"] for e in metrics(trained.out, "eval")] == [10, 20]
    assert "step 20/20" in trained.stdout and "tok/s" in trained.stdout and "data wait" in trained.stdout

    assert [p.name for p in list_checkpoints(trained.out)] == ["step-0000010", "step-0000020"]
    ckpt = latest_checkpoint(trained.out)
    assert {"model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl", "rank-00000.pt"} <= {
        p.name for p in ckpt.iterdir()
    }
    meta = json.loads((ckpt / "hsstore_train.json").read_text())
    assert (meta["step"], meta["world_size"], meta["settings"]["grad_accum"]) == (20, 1, 2)

    draft = trained.out / "draft"
    config = json.loads((draft / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == DRAFT_VOCAB
    weights = load_file(draft / "model.safetensors")
    assert set(weights) == VLLM_NAMES
    trained_state = load_model_state(ckpt)
    torch.testing.assert_close(weights["fc.weight"], trained_state["fc.weight"].to(torch.bfloat16))


@pytest.mark.slow
def test_resume_ends_exactly_where_the_uninterrupted_run_did(trained: SimpleNamespace, tmp_path: Path) -> None:
    """Restart from the step-10 checkpoint in a fresh process: model, AdamW state, LR schedule, data
    position and noise generator must continue exactly, so step 20 matches the uninterrupted run."""
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(trained.out / "checkpoints" / "step-0000010", out / "checkpoints" / "step-0000010")
    (out / "checkpoints" / ".tmp-step-0000015").mkdir()  # a save that crashed half-way: never resumed from
    proc = train("--store", trained.store, "--target", str(trained.target), "--out", str(out), *RUN_ARGS, "--resume")
    assert "resumed from" in proc.stdout and "step-0000010 at step 10" in proc.stdout

    want, got = trained.out / "checkpoints" / "step-0000020", out / "checkpoints" / "step-0000020"
    want_state, got_state = load_model_state(want), load_model_state(got)
    assert set(want_state) == set(got_state)
    for name, tensor in want_state.items():
        torch.testing.assert_close(got_state[name], tensor, rtol=0, atol=1e-6, msg=name)
    want_opt = torch.load(want / "optimizer.bin", weights_only=False)
    got_opt = torch.load(got / "optimizer.bin", weights_only=False)
    for i, state in want_opt["state"].items():
        torch.testing.assert_close(got_opt["state"][i]["exp_avg_sq"], state["exp_avg_sq"], rtol=0, atol=1e-9)
    resumed = {e["step"]: e["loss"] for e in metrics(out)}
    assert resumed == pytest.approx({e["step"]: e["loss"] for e in metrics(trained.out) if e["step"] > 10}, abs=1e-6)
    assert (
        torch.load(got / "rank-00000.pt", weights_only=True)["loader"]
        == torch.load(want / "rank-00000.pt", weights_only=True)["loader"]
    )


def test_checkpoints_are_pruned_and_half_written_ones_ignored(tmp_path: Path) -> None:
    class OneProcess:
        is_main_process, process_index, num_processes = True, 0, 1

        def wait_for_everyone(self) -> None:
            pass

        def save_state(self, path: str) -> None:
            (Path(path) / "model.safetensors").write_bytes(b"x")

    for step in (5, 10, 15):
        save_checkpoint(OneProcess(), tmp_path, step, {}, {"loader": {}}, keep=2)
    (tmp_path / "checkpoints" / ".tmp-step-0000020").mkdir()
    (tmp_path / "checkpoints" / "step-0000025").mkdir()  # no hsstore_train.json: not a checkpoint
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000010", "step-0000015"]
    assert latest_checkpoint(tmp_path).name == "step-0000015"


def test_warmup_then_cosine_to_zero() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup=4, total=12)
    lrs = []
    for _ in range(12):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == pytest.approx(1.0) and lrs[8] == pytest.approx(0.5)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:])) and sched.get_last_lr()[0] == pytest.approx(0)


# --- eval and export commands --------------------------------------------------------------------------------
@pytest.mark.slow
def test_eval_command_prints_metrics(trained: SimpleNamespace) -> None:
    result = invoke("eval", "--checkpoint", str(trained.out), "--store", trained.store, "--json", "--num-workers", "0")
    assert result.exit_code == 0, result.output
    values = json.loads(result.output.strip().splitlines()[-1])
    assert 0 < values["loss"] < metrics(trained.out)[0]["loss"]
    assert 1.0 <= values["acceptance_length_greedy"] <= 4.0 and 0.0 <= values["acc_2"] <= 1.0
    # a chain (of every position, or of the decoding walk) survives step k only if it survived step k - 1
    for kind in ("chain", "walk"):
        rates = [values[f"{kind}_{k}"] for k in range(3)]
        assert 1.0 >= rates[0] >= rates[1] >= rates[2] >= 0.0, (kind, rates)
        name = "chained" if kind == "chain" else "decoding"
        assert values[f"acceptance_length_{name}"] == pytest.approx(1.0 + sum(rates))
    table = invoke("eval", "--checkpoint", str(trained.out), "--store", trained.store, "--num-workers", "0")
    assert table.exit_code == 0 and "estimated acceptance length" in table.output and "80 samples" in table.output
    assert "decoding walk" in table.output and "chained" in table.output


@pytest.mark.slow
def test_export_command_from_a_checkpoint(trained: SimpleNamespace, tmp_path: Path) -> None:
    ckpt = trained.out / "checkpoints" / "step-0000020"
    for fmt in ("vllm", "speculators"):
        result = invoke("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / fmt), "--format", fmt)
        assert result.exit_code == 0, result.output
    exported = load_file(tmp_path / "vllm" / "model.safetensors")
    final = load_file(trained.out / "draft" / "model.safetensors")
    assert set(exported) == set(final) == VLLM_NAMES
    for name, tensor in final.items():
        assert torch.equal(exported[name], tensor), name
    spec = json.loads((tmp_path / "speculators" / "config.json").read_text())
    assert spec["speculators_model_type"] == "eagle3"
    assert spec["speculators_config"]["verifier"]["name_or_path"] == str(trained.target)


# --- two CPU processes: DDP and FSDP ---------------------------------------------------------------------------
MULTI_ARGS = [*COMMON, "--max-steps", "8", "--checkpoint-every", "4", "--eval-fraction", "0.2"]


def multi_args(store: str, target: Path, out: Path, workers: int) -> list[str]:
    return ["--store", store, "--target", str(target), "--out", str(out), *MULTI_ARGS, "--num-workers", str(workers)]


@pytest.fixture(scope="module")
def ddp_run(store: str, target: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("ddp") / "run"
    args = multi_args(store, target, out, 1)
    return SimpleNamespace(out=out, args=args, config="ddp_cpu_2.yaml", stdout=launch("ddp_cpu_2.yaml", *args).stdout)


@pytest.fixture(scope="module")
def fsdp_run(store: str, target: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    args = multi_args(store, target, out, 0)
    return SimpleNamespace(out=out, args=args, config="fsdp_cpu_2.yaml", stdout=launch("fsdp_cpu_2.yaml", *args).stdout)


def check_multi_process_run(run: SimpleNamespace, kind: str) -> None:
    assert f"2 process(es), {kind}" in run.stdout, run.stdout
    log = metrics(run.out)
    assert [e["step"] for e in log] == [2, 4, 6, 8]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"], (log[0]["loss"], log[-1]["loss"])
    assert [e["step"] for e in metrics(run.out, "eval")] == [8]
    ckpt = latest_checkpoint(run.out)
    assert {"rank-00000.pt", "rank-00001.pt", "random_states_0.pkl", "random_states_1.pkl"} <= {
        p.name for p in ckpt.iterdir()
    }
    assert json.loads((ckpt / "hsstore_train.json").read_text())["world_size"] == 2
    weights = load_file(run.out / "draft" / "model.safetensors")
    assert set(weights) == VLLM_NAMES and all(bool(t.float().isfinite().all()) for t in weights.values())


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(ddp_run: SimpleNamespace) -> None:
    check_multi_process_run(ddp_run, "MULTI_CPU")
    assert (latest_checkpoint(ddp_run.out) / "model.safetensors").is_file()


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes(fsdp_run: SimpleNamespace, ddp_run: SimpleNamespace, tmp_path: Path) -> None:
    """FSDP2 really shards (checkpoints are per-rank DCP shards) and computes what DDP computes."""
    check_multi_process_run(fsdp_run, "FSDP")
    ckpt = latest_checkpoint(fsdp_run.out)
    assert {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in (ckpt / "pytorch_model_fsdp_0").iterdir()}
    fsdp, ddp = (
        load_file(fsdp_run.out / "draft" / "model.safetensors"),
        load_file(ddp_run.out / "draft" / "model.safetensors"),
    )
    for name, tensor in ddp.items():
        torch.testing.assert_close(fsdp[name].float(), tensor.float(), rtol=0, atol=1e-2, msg=name)
    result = invoke("export", "--checkpoint", str(fsdp_run.out), "--out", str(tmp_path / "from-shards"))
    assert result.exit_code == 0, result.output
    merged = load_file(tmp_path / "from-shards" / "model.safetensors")
    for name, tensor in fsdp.items():
        assert torch.equal(merged[name], tensor), name


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_multi_process_resume_is_exact(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Both ranks restore their data position and RNG; FSDP reloads its sharded model and AdamW state."""
    done = request.getfixturevalue(f"{kind}_run")
    out = tmp_path / "resumed"
    shutil.copytree(done.out / "checkpoints" / "step-0000004", out / "checkpoints" / "step-0000004")
    args = [a if a != str(done.out) else str(out) for a in done.args]
    assert "at step 4" in launch(done.config, *args, "--resume").stdout
    want = load_model_state(done.out / "checkpoints" / "step-0000008")
    got = load_model_state(out / "checkpoints" / "step-0000008")
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert [e["loss"] for e in metrics(out)] == pytest.approx([e["loss"] for e in metrics(done.out)][2:], abs=1e-6)


# --- bad inputs fail before anything trains ------------------------------------------------------------------
def copy_store(store: str, dest: Path, *, vocab: bool = True) -> str:
    shutil.copytree(store, dest, ignore=None if vocab else shutil.ignore_patterns("vocab"))
    return str(dest)


def drop_last_role(store: str) -> None:
    meta_path = Path(store) / "zarr.json"
    meta = json.loads(meta_path.read_text())
    hidden = meta["attributes"]["hsstore"]["hidden"]
    meta["attributes"]["hsstore"]["hidden"] = [h for h in hidden if h["role"] != "last"]
    meta_path.write_text(json.dumps(meta))


def draft_config_file(target: Path, path: Path, **changes) -> str:
    base = DraftConfig.from_target(target, DRAFT_VOCAB, (1, 2, 3)).to_dict()
    path.write_text(json.dumps({**base, **changes}))
    return str(path)


def target_with_lm_head_rows(target: Path, dest: Path, rows: int) -> str:
    shutil.copytree(target, dest)
    weights = load_file(dest / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"][:rows].clone()
    save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    return str(dest)


@pytest.mark.parametrize(
    "case",
    ["no-vocab", "no-last", "hidden-size", "layers", "lm-head-vocab", "empty-eval", "existing-checkpoints"],
)
def test_bad_inputs_fail_before_training(case: str, store: str, target: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = {"--store": store, "--target": str(target), "--out": str(out)}
    extra: list[str] = []
    if case == "no-vocab":
        args["--store"], expect = copy_store(store, tmp_path / "s", vocab=False), "hsstore vocab"
    elif case == "no-last":
        args["--store"] = copy_store(store, tmp_path / "s")
        drop_last_role(args["--store"])
        expect = "no 'last'"
    elif case == "hidden-size":
        extra = [
            "--draft-config",
            draft_config_file(target, tmp_path / "c.json", hidden_size=128, target_hidden_size=128),
        ]
        expect = "target hidden size is 64, the draft config expects 128"
    elif case == "layers":
        extra = ["--draft-config", draft_config_file(target, tmp_path / "c.json", target_num_layers=8)]
        expect = "target number of layers is 4, the draft config expects 8"
    elif case == "lm-head-vocab":
        args["--target"] = target_with_lm_head_rows(target, tmp_path / "t", 1000)
        expect = "lm_head has 1000 rows"
    elif case == "empty-eval":
        extra, expect = ["--eval-fraction", "0.001"], "selects no sample"
    else:
        (out / "checkpoints" / "step-0000004").mkdir(parents=True)
        (out / "checkpoints" / "step-0000004" / "hsstore_train.json").write_text("{}")
        expect = "pass --resume"
    result = invoke("train", *[x for kv in args.items() for x in kv], *extra, "--num-workers", "0")
    assert result.exit_code != 0
    assert isinstance(result.exception, HSStoreError), result.exception
    assert expect in str(result.exception), str(result.exception)
    assert not (out / METRICS_FILE).exists()  # nothing trained


def test_missing_tracker_package_is_named(store: str, target: Path, tmp_path: Path) -> None:
    from accelerate.utils import is_tensorboard_available

    if is_tensorboard_available():
        pytest.skip("tensorboard is installed here")
    result = invoke(
        "train", "--store", store, "--target", str(target), "--out", str(tmp_path), "--report-to", "tensorboard"
    )
    assert isinstance(result.exception, HSStoreError)
    assert "pip install tensorboard" in str(result.exception)


@pytest.mark.slow
def test_entry_point_prints_one_error_line(store: str, target: Path, tmp_path: Path) -> None:
    bare = copy_store(store, tmp_path / "s", vocab=False)
    proc = train("--store", bare, "--target", str(target), "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "hsstore vocab" in proc.stderr and "Traceback" not in proc.stderr
