"""The teacher: the target's next-token distribution, rebuilt from the stored last-layer state.

The store keeps the last decoder layer's output before the final norm, so the target's logits are
lm_head(norm(last)). Only two tensors of the target are loaded (final norm, lm_head). The draft
predicts over its own vocabulary, so the teacher is the target softmax restricted to the draft vocab
and renormalized; it is computed in draft-vocab space (norm(last) @ W[draft ids].T), and the rest of
the vocabulary is visited in chunks only to learn whether the target's top-1 lies inside the draft
vocab and how much probability mass does. No [B, T, full vocab] tensor is ever built.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import HSStoreError

DEFAULT_CHUNK = 16384  # lm_head rows per matmul
DEFAULT_TOKEN_CHUNK = 4096  # positions per pass: at most [4096, 16384] fp32 (256 MiB) of logits at a time


@dataclass
class TeacherOutput:
    """Per position j of the batch, the target's distribution over token j + 1.

    probs [B, T, draft_vocab] fp32: softmax restricted to the draft vocab, renormalized (0 where not usable).
    mask  [B, T] bool: usable as a target: token j + 1 is in the same sample and in the loss mask, and the
          target's top-1 over the full vocab is a draft-vocab token.
    top1  [B, T] int64: the target's top-1 token id (target ids; -1 where not in the draft vocab).
    mass  [B, T] fp32: full-vocab probability inside the draft vocab (for expected acceptance).
    """

    probs: torch.Tensor
    mask: torch.Tensor
    top1: torch.Tensor
    mass: torch.Tensor


class Teacher(nn.Module):
    """Final norm + lm_head of the target, split into draft-vocab rows and the remaining rows."""

    def __init__(
        self,
        norm_weight: torch.Tensor,
        lm_head: torch.Tensor,
        d2t: torch.Tensor,
        t2d: torch.Tensor,
        eps: float,
        chunk_size: int = DEFAULT_CHUNK,
        token_chunk: int = DEFAULT_TOKEN_CHUNK,
    ) -> None:
        super().__init__()
        vocab, width = lm_head.shape
        if len(t2d) != vocab:
            raise HSStoreError(
                f"the target's lm_head has {vocab} rows but the store's vocab maps cover {len(t2d)} tokens; "
                "the store was made with another target (or tokenizer)"
            )
        if norm_weight.shape != (width,):
            raise HSStoreError(f"final norm weight {tuple(norm_weight.shape)} does not match lm_head width {width}")
        draft_ids = torch.arange(len(d2t)) + torch.as_tensor(d2t, dtype=torch.long)
        t2d = torch.as_tensor(t2d, dtype=torch.bool)
        if int(t2d.sum()) != len(draft_ids) or not bool(t2d[draft_ids].all()):
            raise HSStoreError("draft vocab maps: d2t and t2d disagree; rebuild with `hsstore vocab`")
        self.eps = eps
        self.chunk_size = chunk_size
        self.token_chunk = token_chunk
        # kept in the checkpoint's dtype (bf16 upcasts exactly), multiplied in fp32 one chunk at a time
        self.register_buffer("norm_weight", norm_weight.clone(), persistent=False)
        self.register_buffer("draft_rows", lm_head[draft_ids].clone(), persistent=False)
        self.register_buffer("other_rows", lm_head[~t2d].clone(), persistent=False)
        self.register_buffer("draft_ids", draft_ids, persistent=False)

    @classmethod
    def from_target(
        cls,
        target_dir: str | Path,
        d2t: torch.Tensor,
        t2d: torch.Tensor,
        chunk_size: int = DEFAULT_CHUNK,
        token_chunk: int = DEFAULT_TOKEN_CHUNK,
    ) -> Teacher:
        """Loads only the final norm and the lm_head (the embedding, for tied models) from safetensors."""
        from .target import load_final_norm, load_lm_head, read_target_config

        eps = float(read_target_config(target_dir).get("rms_norm_eps", 1e-6))
        return cls(load_final_norm(target_dir), load_lm_head(target_dir), d2t, t2d, eps, chunk_size, token_chunk)

    @property
    def draft_vocab_size(self) -> int:
        return len(self.draft_ids)

    def normed(self, last: torch.Tensor) -> torch.Tensor:
        """The target's final RMSNorm, in fp32."""
        x = last.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * self.norm_weight.float()

    def _chunked_logits(self, x: torch.Tensor, rows: torch.Tensor) -> Iterator[torch.Tensor]:
        for start in range(0, len(rows), self.chunk_size):
            yield x @ rows[start : start + self.chunk_size].float().T

    def _restricted(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Normed states [N, H] -> restricted probs, top-1-in-draft flag, top-1 target id, draft-vocab mass."""
        draft_logits = torch.cat(list(self._chunked_logits(x, self.draft_rows)), dim=-1)  # [N, draft_vocab]
        draft_max, draft_arg = draft_logits.max(-1)
        draft_lse = draft_logits.logsumexp(-1)
        other_max = torch.full_like(draft_max, float("-inf"))
        other_lse = torch.full_like(draft_max, float("-inf"))
        for chunk in self._chunked_logits(x, self.other_rows):
            other_max = torch.maximum(other_max, chunk.max(-1).values)
            other_lse = torch.logaddexp(other_lse, chunk.logsumexp(-1))
        in_draft = draft_max >= other_max  # the target's top-1 is a draft-vocab token
        probs = (draft_logits - draft_lse[:, None]).exp()
        top1 = torch.where(in_draft, self.draft_ids[draft_arg], -1)
        return probs, in_draft, top1, (draft_lse - torch.logaddexp(draft_lse, other_lse)).exp()

    @torch.no_grad()
    def forward(
        self, last: torch.Tensor, loss_mask: torch.Tensor, seq_ids: torch.Tensor | None = None
    ) -> TeacherOutput:
        """last [B, T, H]; loss_mask [B, T] (1 = token trained on); seq_ids [B, T] (None: one sample per row)."""
        b, t, _ = last.shape
        if seq_ids is None:
            seq_ids = torch.zeros(b, t, dtype=torch.long, device=last.device)
        next_in_sample = torch.zeros(b, t, dtype=torch.bool, device=last.device)
        next_in_sample[:, :-1] = (seq_ids[:, 1:] == seq_ids[:, :-1]) & loss_mask[:, 1:].bool()

        probs = torch.zeros(b, t, self.draft_vocab_size, device=last.device)
        mask = torch.zeros(b, t, dtype=torch.bool, device=last.device)
        top1 = torch.full((b, t), -1, dtype=torch.long, device=last.device)
        mass = torch.zeros(b, t, device=last.device)
        rows = next_in_sample.nonzero(as_tuple=True)  # only positions that can be a target
        for start in range(0, len(rows[0]), self.token_chunk):  # bounds the transient [tokens, chunk] logits
            block = (rows[0][start : start + self.token_chunk], rows[1][start : start + self.token_chunk])
            p, in_draft, top, m = self._restricted(self.normed(last[block]))
            probs[block], mask[block], top1[block], mass[block] = p, in_draft, top, m
        return TeacherOutput(probs, mask, top1, mass)
