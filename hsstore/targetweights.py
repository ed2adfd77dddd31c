"""Read a target checkpoint's config and a few named tensors, never the whole model, and apply its head.

The draft needs the target's embedding, the teacher its final norm and lm_head: three tensors out of
a checkpoint that may be hundreds of GB. safetensors opens each shard lazily, so only those tensors
are read (the sharded index, model.safetensors.index.json, says which shard holds which). Both
`generate` (top-k teacher) and `train` (teacher from the last layer) turn the last layer into logits
the same way, so the norm and the chunked lm_head product live here too; nothing heavy is imported.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import HSStoreError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Where Llama/Qwen-style checkpoints keep each tensor; multimodal wrappers nest the language model.
_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "")
EMBED_NAMES = tuple(f"{p}embed_tokens.weight" for p in _PREFIXES)
NORM_NAMES = tuple(f"{p}norm.weight" for p in _PREFIXES)
LM_HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight")


def read_target_config(target_dir: str | Path) -> dict[str, Any]:
    """config.json as a dict; for multimodal targets, the text model's config with the top-level flags."""
    path = Path(target_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise HSStoreError(f"{target_dir}: no config.json; pass a local transformers model directory") from None
    text = config.get("text_config")
    if isinstance(text, dict):
        merged = {**text}
        if "tie_word_embeddings" in config:
            merged.setdefault("tie_word_embeddings", config["tie_word_embeddings"])
        return merged
    return config


def _weight_map(target_dir: Path) -> dict[str, str]:
    """tensor name -> file name, from the sharded index or the single file's header."""
    index = target_dir / INDEX_FILE
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = target_dir / SINGLE_FILE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    raise HSStoreError(f"{target_dir}: neither {SINGLE_FILE} nor {INDEX_FILE}; only safetensors checkpoints load")


def load_target_tensor(target_dir: str | Path, candidates: Sequence[str]) -> torch.Tensor:
    """The first of `candidates` (alternative names of one tensor) the checkpoint holds."""
    from safetensors import safe_open

    target_dir = Path(target_dir)
    weight_map = _weight_map(target_dir)
    for name in candidates:
        if name in weight_map:
            with safe_open(target_dir / weight_map[name], framework="pt") as f:
                return f.get_tensor(name)
    raise HSStoreError(f"{target_dir}: none of {list(candidates)} in the checkpoint; is this a Llama/Qwen-style model?")


def load_embed_tokens(target_dir: str | Path) -> torch.Tensor:
    return load_target_tensor(target_dir, EMBED_NAMES)


def load_final_norm(target_dir: str | Path) -> torch.Tensor:
    return load_target_tensor(target_dir, NORM_NAMES)


def load_lm_head(target_dir: str | Path) -> torch.Tensor:
    """The output projection [vocab, H]; tied models reuse the input embedding."""
    if read_target_config(target_dir).get("tie_word_embeddings", False):
        return load_embed_tokens(target_dir)
    try:
        return load_target_tensor(target_dir, LM_HEAD_NAMES)
    except HSStoreError:  # some tied checkpoints omit the flag and the tensor
        return load_embed_tokens(target_dir)


def load_final_head(target_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(final norm weight [H], lm_head [vocab, H], RMSNorm eps): what turns the last layer into logits."""
    eps = float(read_target_config(target_dir).get("rms_norm_eps", 1e-6))
    return load_final_norm(target_dir), load_lm_head(target_dir), eps


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The target's final RMSNorm, in fp32 (the store's last layer is taken before it)."""
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * weight.float()


def chunked_logits(x: torch.Tensor, rows: torch.Tensor, chunk_size: int) -> Iterator[torch.Tensor]:
    """x [N, H] fp32 times lm_head rows [V, H] (kept in the checkpoint's dtype), `chunk_size` rows at a time:
    only one chunk is ever upcast to fp32."""
    for start in range(0, len(rows), chunk_size):
        yield x @ rows[start : start + chunk_size].float().T
