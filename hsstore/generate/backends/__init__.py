"""Hidden-state backends: token batches in, per-layer hidden states out (vLLM's layer numbering)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class TargetDims:
    """The sizes a backend reports, read from the target's config alone (no weights loaded)."""

    num_layers: int
    hidden_size: int
    vocab_size: int

    @classmethod
    def of(cls, model: str) -> TargetDims:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return cls(int(text.num_hidden_layers), int(text.hidden_size), int(text.vocab_size))


class HiddenStateBackend(Protocol):
    """What the generate pipeline needs from a model runner."""

    num_layers: int
    hidden_size: int
    vocab_size: int

    def hidden_states(self, batch: Sequence[np.ndarray], layer_ids: Sequence[int]) -> list[torch.Tensor]:
        """For each sequence of n token ids: a [n, len(layer_ids), H] tensor in the model's dtype."""
        ...


def load_backend(name: str, model: str, **kwargs) -> HiddenStateBackend:
    if name == "hf":
        from .hf import HFBackend

        return HFBackend(model, **kwargs)
    if name == "vllm":
        from .vllm import VLLMBackend

        return VLLMBackend(model, **kwargs)
    from ...errors import HSStoreError

    raise HSStoreError(f"unknown backend {name!r}; choose 'hf' or 'vllm'")
