"""The transformers backend: a forward pass with hooks on the decoder layers.

Hooks, not `output_hidden_states`, because transformers' last hidden state has the final norm
applied, while the store's convention (vLLM's) wants the last layer's raw output. A pre-hook on
decoder layer k sees id k; a hook on the last layer's output gives id N. The lm_head is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from ...errors import HSStoreError
from . import TargetDims


class HFBackend:
    def __init__(self, model: str, *, device: str = "cpu", dtype: str = "bfloat16") -> None:
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        dims = TargetDims.of(model)
        self.num_layers, self.hidden_size, self.vocab_size = dims.num_layers, dims.hidden_size, dims.vocab_size
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=self.dtype)
        self.decoder = lm.get_decoder().to(self.device).eval()
        self.layers = self.decoder.layers
        if len(self.layers) != self.num_layers:
            raise HSStoreError(f"{model}: config says {self.num_layers} layers, the module has {len(self.layers)}")

    @torch.inference_mode()
    def hidden_states(self, batch: Sequence[np.ndarray], layer_ids: Sequence[int]) -> list[torch.Tensor]:
        lengths = [len(x) for x in batch]
        width = max(lengths)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        attn = torch.zeros(len(batch), width, dtype=torch.long)
        for row, x in enumerate(batch):  # right padding: positions 0..n-1 match an unpadded run
            ids[row, : len(x)] = torch.as_tensor(x, dtype=torch.long)
            attn[row, : len(x)] = 1
        captured: dict[int, torch.Tensor] = {}
        handles = [self._hook(k, captured) for k in sorted(set(layer_ids))]
        try:
            self.decoder(input_ids=ids.to(self.device), attention_mask=attn.to(self.device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        stacked = torch.stack([captured[k] for k in layer_ids], dim=2).cpu()  # [B, S, L, H]
        return [stacked[row, :n] for row, n in enumerate(lengths)]

    def _hook(self, layer_id: int, captured: dict[int, torch.Tensor]):
        if layer_id < self.num_layers:

            def pre(module, args, kwargs):
                captured[layer_id] = (args[0] if args else kwargs["hidden_states"]).detach()

            return self.layers[layer_id].register_forward_pre_hook(pre, with_kwargs=True)

        def post(module, args, output):
            captured[layer_id] = (output[0] if isinstance(output, tuple) else output).detach()

        return self.layers[-1].register_forward_hook(post)
