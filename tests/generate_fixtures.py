"""Fixtures for generate tests: tiny random Llama targets with real chat tokenizers, built offline.

Load them with `pytest_plugins = ["generate_fixtures"]` in tests/conftest.py (or in a test module).
Targets are built once per session (about 0.1 s each after imports) under a session tmp dir. The
hub is switched off before transformers/datasets are imported, so a test that would download fails
at once instead of hanging on retries.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TINY_TEMPLATES = ("llama3", "chatml", "mistral")

__all__ = [
    "CONFIDENT_LOGIT_SCALE",
    "RANDOM_LLAMA",
    "confident_target",
    "random_llama",
    "tiny_chatml",
    "tiny_llama3",
    "tiny_mistral",
    "tiny_target",
    "tiny_target_factory",
    "tiny_tokenizer",
]


@pytest.fixture(scope="session")
def tiny_target_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """build(template="llama3", **build_tiny_target_params) -> target dir, built once per parameter set."""
    from hsstore.generate.tiny import build_tiny_target

    root = tmp_path_factory.mktemp("tiny-targets")

    def build(template: str = "llama3", **params: Any) -> Path:
        suffix = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8] if params else "default"
        return build_tiny_target(root / f"{template}-{suffix}", template, **params)  # type: ignore[arg-type]

    return build


@pytest.fixture(scope="session")
def tiny_llama3(tiny_target_factory: Callable[..., Path]) -> Path:
    return tiny_target_factory("llama3")


@pytest.fixture(scope="session")
def tiny_chatml(tiny_target_factory: Callable[..., Path]) -> Path:
    return tiny_target_factory("chatml")


@pytest.fixture(scope="session")
def tiny_mistral(tiny_target_factory: Callable[..., Path]) -> Path:
    return tiny_target_factory("mistral")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_target_factory: Callable[..., Path]) -> Callable[[str], Any]:
    """load(template) -> the default tiny target's tokenizer, shared: tests that change one load their own."""
    from transformers import AutoTokenizer

    @cache
    def load(template: str = "llama3") -> Any:
        return AutoTokenizer.from_pretrained(tiny_target_factory(template))

    return load


@pytest.fixture(scope="session", params=TINY_TEMPLATES)
def tiny_target(request: pytest.FixtureRequest, tiny_target_factory: Callable[..., Path]) -> Path:
    """Each template in turn; the dir name starts with the template name."""
    return tiny_target_factory(request.param)


# A bare random Llama (no tokenizer) for backend tests that feed token ids directly. head_dim 32:
# vLLM's CPU attention rejects 16.
RANDOM_LLAMA = {
    "vocab_size": 300,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


@pytest.fixture(scope="session")
def random_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("random-llama")
    LlamaForCausalLM(LlamaConfig(**RANDOM_LLAMA)).save_pretrained(path)
    return str(path)


# A random tiny target's logits have std ~0.2: its softmax, the draft's teacher, is near uniform and
# there is nothing to learn. Scaling its lm_head makes a confident teacher for training tests.
CONFIDENT_LOGIT_SCALE = 40.0


@pytest.fixture(scope="session")
def confident_target(tiny_llama3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("targets") / "confident"
    shutil.copytree(tiny_llama3, path)
    weights = load_file(path / "model.safetensors")
    head = weights["lm_head.weight"]
    weights["lm_head.weight"] = (head.float() * CONFIDENT_LOGIT_SCALE).to(head.dtype)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path
