"""The top-k teacher at generate time: captured last-layer states -> the target's top-k next-token log-probs.

A store written with `--teacher topk` drops the last layer (H values per token) and keeps, at each
teacher position j (token j + 1 is trained on and in the same sample), the k largest log-probs of the
target's full-vocab log-softmax and their ids. The logits are the target's own: lm_head(final_norm(h_N)),
with the two tensors read alone from the checkpoint (`hsstore.targetweights`), in fp32 like the
trainer's `Teacher`. It runs after the backend's forward on the captured states, so the hf and vllm
backends share it. Rows are handled in token chunks so that no [tokens, vocab] fp32 tensor exceeds
`LOGITS_BUDGET_BYTES`; the lm_head stays in the checkpoint's dtype and is upcast `VOCAB_CHUNK` rows at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..manifest import TOPK_LOGPROB_FLOOR
from ..targetweights import chunked_logits, load_final_head, rms_norm
from ..writer import teacher_positions

LOGITS_BUDGET_BYTES = 256 << 20  # one token chunk's fp32 logits (and logsumexp's temporary of the same size)
VOCAB_CHUNK = 16384  # lm_head rows upcast to fp32 at a time


class TopkHead:
    """The target's final norm and lm_head on the generate device, answering top-k log-probs."""

    def __init__(
        self,
        norm_weight: torch.Tensor,
        lm_head: torch.Tensor,
        eps: float,
        k: int,
        *,
        device: str | torch.device = "cpu",
        logprob_floor: float = TOPK_LOGPROB_FLOOR,
        budget_bytes: int = LOGITS_BUDGET_BYTES,
    ) -> None:
        vocab = lm_head.shape[0]
        if not 1 <= k <= vocab:
            raise ValueError(f"k = {k} must be within 1..{vocab} (the lm_head's rows)")
        self.device = torch.device(device)
        self.norm_weight = norm_weight.to(self.device)
        self.lm_head = lm_head.to(self.device)
        self.eps = eps
        self.k = k
        self.logprob_floor = logprob_floor
        self.token_chunk = max(1, budget_bytes // (vocab * 4))

    @classmethod
    def from_target(cls, target_dir: str | Path, k: int, *, device: str | torch.device = "cpu") -> TopkHead:
        norm_weight, lm_head, eps = load_final_head(target_dir)
        return cls(norm_weight, lm_head, eps, k, device=device)

    @property
    def vocab_size(self) -> int:
        return self.lm_head.shape[0]

    @torch.inference_mode()
    def topk(self, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """last [n, H] (pre-norm) -> (log-probs [n, k] fp32, ids [n, k] int64) on the CPU, sorted descending,
        clamped to the floor."""
        n = len(last)
        logprobs = torch.empty(n, self.k, dtype=torch.float32)
        ids = torch.empty(n, self.k, dtype=torch.long)
        for start in range(0, n, self.token_chunk):
            x = rms_norm(last[start : start + self.token_chunk].to(self.device), self.norm_weight, self.eps)
            logits = torch.empty(len(x), self.vocab_size, dtype=torch.float32, device=self.device)
            for i, part in enumerate(chunked_logits(x, self.lm_head, VOCAB_CHUNK)):
                logits[:, i * VOCAB_CHUNK : i * VOCAB_CHUNK + part.shape[1]] = part
            lse = logits.logsumexp(-1, keepdim=True)
            values, top = logits.topk(self.k, dim=-1)
            del logits
            logprobs[start : start + len(x)] = (values - lse).clamp(min=self.logprob_floor).cpu()
            ids[start : start + len(x)] = top.cpu()
        return logprobs, ids

    def teachers(
        self, last: Sequence[torch.Tensor], loss_masks: Sequence[np.ndarray]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A batch of samples -> (log-probs [n, k], ids [n, k]) each, zeros off the teacher positions.

        Only teacher positions go through the lm_head, all samples together (one pass over its rows per
        token chunk, not per sample)."""
        rows = [torch.from_numpy(teacher_positions(np.asarray(m))) for m in loss_masks]
        lp_all, ids_all = self.topk(torch.cat([h[r] for h, r in zip(last, rows, strict=True)]))
        out, at = [], 0
        for r in rows:
            lp = torch.zeros(len(r), self.k, dtype=torch.float32)
            ids = torch.zeros(len(r), self.k, dtype=torch.long)
            count = int(r.sum())
            lp[r], ids[r] = lp_all[at : at + count], ids_all[at : at + count]
            at += count
            out.append((lp, ids))
        return out
