"""The hf backend obeys the store's layer convention (vLLM's) and is padding-invariant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from generate_fixtures import RANDOM_LLAMA
from transformers import LlamaForCausalLM

from hsstore.errors import HSStoreError
from hsstore.generate.backends.hf import HFBackend
from hsstore.generate.layers import default_aux_layer_ids, parse_layer_ids

N_LAYERS = RANDOM_LLAMA["num_hidden_layers"]
HIDDEN = RANDOM_LLAMA["hidden_size"]


def test_layer_ids_follow_vllm_convention(random_llama: str) -> None:
    backend = HFBackend(random_llama, dtype="float32")
    ids = np.arange(1, 20)
    (captured,) = backend.hidden_states([ids], [0, 1, 2, N_LAYERS])
    model = LlamaForCausalLM.from_pretrained(random_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.model(input_ids=torch.as_tensor(ids)[None], output_hidden_states=True)
    ref = out.hidden_states  # ref[k] is the input of decoder layer k for k < N
    torch.testing.assert_close(captured[:, 0], model.model.embed_tokens(torch.as_tensor(ids)))
    torch.testing.assert_close(captured[:, 1], ref[1][0])
    torch.testing.assert_close(captured[:, 2], ref[2][0])
    # id N is the last layer's output BEFORE the final norm: norm(id N) is transformers' last state
    torch.testing.assert_close(model.model.norm(captured[:, 3]), out.last_hidden_state[0])
    assert not torch.allclose(captured[:, 3], out.last_hidden_state[0])


def test_padding_does_not_change_states(random_llama: str) -> None:
    backend = HFBackend(random_llama, dtype="float32")
    short, long = np.arange(3, 10), np.arange(5, 40)
    batched = backend.hidden_states([long, short], [2, N_LAYERS])
    alone = backend.hidden_states([short], [2, N_LAYERS])
    assert batched[1].shape == (len(short), 2, HIDDEN)
    torch.testing.assert_close(batched[1], alone[0], atol=1e-5, rtol=1e-4)


def test_layer_id_validation() -> None:
    assert default_aux_layer_ids(32) == [2, 16, 29]
    assert default_aux_layer_ids(4) == [1, 2, 3], "shallow targets still get three distinct layers"
    assert parse_layer_ids("1,2,4", 4) == [1, 2, 4]
    with pytest.raises(HSStoreError, match="out of range"):
        parse_layer_ids("1,2,5", 4)
    with pytest.raises(HSStoreError, match="comma-separated"):
        parse_layer_ids("a,b", 4)
