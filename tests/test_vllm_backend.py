"""The vllm backend, run for real on vLLM's CPU build, gives the hf backend's states in the same layer convention.

Skipped without vllm. The backend runs vLLM's engine core in this process (no worker processes to spawn,
so no `__main__` guard is needed), and the module builds the engine twice: once for the first layer
ids, once more when a call asks for an id the engine does not capture.

The tiny Llama has head_dim 32 (hidden 128, 4 heads), the smallest vLLM's CPU attention supports. No
tokenizer is needed: the backend passes token ids and starts vLLM with skip_tokenizer_init.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from generate_fixtures import RANDOM_LLAMA

from hsstore.errors import HSStoreError
from hsstore.generate.backends import load_backend
from hsstore.generate.backends.hf import HFBackend

pytest.importorskip("vllm")
from hsstore.generate.backends import vllm_connector

pytestmark = pytest.mark.slow

N_LAYERS = RANDOM_LLAMA["num_hidden_layers"]
MAX_LEN = 256
LAYER_IDS = [0, 1, 2, N_LAYERS]
# bf16 on both sides, different CPU kernels: the per-token relative L2 error of vLLM vs transformers grows
# with depth, measured at most 0.008 and on average at most 0.0055 per layer (bf16 rounds at 0.0039); id 0,
# an embedding lookup, is exact. Neighbouring layers and the normed output differ by more than 0.3, so an
# off-by-one id or a post-norm state fails the bounds by far.
MAX_REL_ERR = 0.02
MEAN_REL_ERR = 0.01
# lengths: a single token, shorter and longer than a KV block, and the longest vLLM accepts here
SEQS = [np.array([7]), np.arange(3, 22), np.arange(5, 100) % 300, (np.arange(MAX_LEN - 1) * 7) % 300]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-token relative L2 error over the hidden dimension."""
    got, ref = got.float(), ref.float()
    return (got - ref).norm(dim=-1) / ref.norm(dim=-1)


@pytest.fixture(scope="module")
def hf(random_llama: str) -> HFBackend:
    return HFBackend(random_llama, dtype="bfloat16")


@pytest.fixture(scope="module")
def backend(random_llama: str):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default reserves a share of RAM
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the backend's default, restored afterwards
        # 64-token steps: longer prompts are prefilled in chunks, so states gather over several steps
        b = load_backend(
            "vllm",
            random_llama,
            device="cpu",
            dtype="bfloat16",
            enforce_eager=True,
            max_num_batched_tokens=64,
            max_model_len=MAX_LEN,
        )
        yield b
        b.close()


@pytest.fixture(scope="module")
def states(backend) -> list[torch.Tensor]:
    return backend.hidden_states(SEQS, LAYER_IDS)


def test_states_match_hf(backend, hf: HFBackend, states: list[torch.Tensor]) -> None:
    ref = hf.hidden_states(SEQS, LAYER_IDS)
    errs = []
    for seq, got, want in zip(SEQS, states, ref, strict=True):
        assert got.shape == (len(seq), len(LAYER_IDS), 128) and got.dtype == torch.bfloat16
        torch.testing.assert_close(got[:, 0], want[:, 0], atol=0, rtol=0)  # id 0: the embedding rows, exact
        errs.append(rel_err(got, want))
    err = torch.cat(errs)
    print(f"vllm vs hf, per-token relative error by layer: max {err.amax(0).tolist()} mean {err.mean(0).tolist()}")
    assert float(err.max()) < MAX_REL_ERR and float(err.mean(0).max()) < MEAN_REL_ERR
    # the bound tells layers apart: id N is not its neighbour, and it is the output BEFORE the final norm
    last, ref_last = torch.cat([s[:, -1] for s in states]), torch.cat([r[:, -1] for r in ref])
    assert float(rel_err(last, torch.cat([r[:, -2] for r in ref])).min()) > 10 * MAX_REL_ERR
    with torch.no_grad():
        normed = hf.decoder.norm(ref_last)
    assert float(rel_err(last, normed).min()) > 10 * MAX_REL_ERR


def test_any_order_and_repeats_reuse_the_engine(backend, states: list[torch.Tensor]) -> None:
    engine = backend._llm
    again = backend.hidden_states(SEQS, [N_LAYERS, 1, 1])  # captured ids, reordered and repeated
    assert backend._llm is engine
    for got, first in zip(again, states, strict=True):
        torch.testing.assert_close(got, first[:, [3, 1, 1]], atol=0, rtol=0)
    assert vllm_connector._INBOX == {}  # everything delivered was taken


def test_empty_and_too_long_sequences(backend) -> None:
    out = backend.hidden_states([np.array([], dtype=np.int64), np.array([5, 6])], [1])
    assert [tuple(t.shape) for t in out] == [(0, 1, 128), (2, 1, 128)]
    with pytest.raises(HSStoreError, match="max_model_len"):
        backend.hidden_states([np.arange(MAX_LEN) % 300], [1])


def test_new_layer_ids_rebuild_the_engine(backend, hf: HFBackend) -> None:
    engine = backend._llm
    (got,) = backend.hidden_states(SEQS[2:3], [3])
    assert backend._llm is not engine and backend._engine_ids == [3]
    (want,) = hf.hidden_states(SEQS[2:3], [3])
    assert float(rel_err(got, want).max()) < MAX_REL_ERR


@pytest.mark.parametrize("in_memory", [True, False])
def test_handoff_roundtrip(tmp_path, in_memory: bool) -> None:
    """The multi-process path's files are complete when visible and gone once taken."""
    where = None if in_memory else str(tmp_path)
    states = torch.randn(5, 2, 8).to(torch.bfloat16)
    assert vllm_connector.take("k", where) is None
    vllm_connector.deliver("k", states, where)
    torch.testing.assert_close(vllm_connector.take("k", where), states, atol=0, rtol=0)
    assert vllm_connector.take("k", where) is None
    assert in_memory or os.listdir(tmp_path) == []
