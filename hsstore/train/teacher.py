"""The teacher: the target's next-token distribution, from the stored last layer or a stored top-k.

`Teacher` rebuilds it from the last layer: the store keeps the last decoder layer's output before the
final norm, so the target's logits are lm_head(norm(last)). Only two tensors of the target are loaded
(final norm, lm_head). The draft predicts over its own vocabulary, so the teacher is the target softmax
restricted to the draft vocab and renormalized; it is computed in draft-vocab space
(norm(last) @ W[draft ids].T), and the rest of the vocabulary is visited in chunks only to learn whether
the target's top-1 lies inside the draft vocab and how much probability mass does. No [B, T, full vocab]
tensor is ever built.

`TopkTeacher` reads a store's top-k teacher arrays instead (written by `hsstore generate --teacher topk`):
no lm_head at all, and the same `TeacherOutput` from the k stored log-probs restricted to the draft vocab.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import HSStoreError
from ..targetweights import chunked_logits, load_final_head, rms_norm

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

    From a top-k teacher, "the draft vocab" means the k stored tokens that are in it: probs renormalize
    over those, and mass is their probability, a lower bound of the full-vocab draft mass.
    """

    probs: torch.Tensor
    mask: torch.Tensor
    top1: torch.Tensor
    mass: torch.Tensor


class Teacher(nn.Module):
    """Final norm + lm_head of the target, split into draft-vocab rows and the remaining rows."""

    batch_keys = ("last",)  # what it reads from a packed batch

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
        norm_weight, lm_head, eps = load_final_head(target_dir)
        return cls(norm_weight, lm_head, d2t, t2d, eps, chunk_size, token_chunk)

    @property
    def draft_vocab_size(self) -> int:
        return len(self.draft_ids)

    def normed(self, last: torch.Tensor) -> torch.Tensor:
        """The target's final RMSNorm, in fp32."""
        return rms_norm(last, self.norm_weight, self.eps)

    def _restricted(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Normed states [N, H] -> restricted probs, top-1-in-draft flag, top-1 target id, draft-vocab mass."""
        draft_logits = torch.cat(list(chunked_logits(x, self.draft_rows, self.chunk_size)), dim=-1)  # [N, draft_vocab]
        draft_max, draft_arg = draft_logits.max(-1)
        draft_lse = draft_logits.logsumexp(-1)
        other_max = torch.full_like(draft_max, float("-inf"))
        other_lse = torch.full_like(draft_max, float("-inf"))
        for chunk in chunked_logits(x, self.other_rows, self.chunk_size):
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
        next_in_sample = teacher_positions(loss_mask, seq_ids)

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

    def from_batch(self, batch: Mapping[str, torch.Tensor]) -> TeacherOutput:
        return self(batch["last"], batch["loss_mask"], batch["seq_ids"].long())


def teacher_positions(loss_mask: torch.Tensor, seq_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] bool: positions j whose next token is in the same packed sample and in the loss mask.

    The batch form of `hsstore.writer.teacher_positions` (a top-k store holds rows exactly there)."""
    if seq_ids is None:
        seq_ids = torch.zeros(loss_mask.shape, dtype=torch.long, device=loss_mask.device)
    out = torch.zeros(loss_mask.shape, dtype=torch.bool, device=loss_mask.device)
    out[:, :-1] = (seq_ids[:, 1:] == seq_ids[:, :-1]) & loss_mask[:, 1:].bool()
    return out


class TopkTeacher(nn.Module):
    """The teacher from a store's top-k arrays: the draft-vocab maps only, no target weights."""

    batch_keys = ("teacher_ids", "teacher_logprobs")

    def __init__(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        super().__init__()
        draft_ids = torch.arange(len(d2t)) + torch.as_tensor(d2t, dtype=torch.long)
        t2d = torch.as_tensor(t2d, dtype=torch.bool)
        if int(t2d.sum()) != len(draft_ids) or not bool(t2d[draft_ids].all()):
            raise HSStoreError("draft vocab maps: d2t and t2d disagree; rebuild with `hsstore vocab`")
        to_draft = torch.full((len(t2d),), -1, dtype=torch.long)
        to_draft[draft_ids] = torch.arange(len(draft_ids))
        self.register_buffer("to_draft", to_draft, persistent=False)  # target id -> draft id, -1 outside
        self.draft_vocab_size = len(draft_ids)

    @torch.no_grad()
    def forward(
        self,
        ids: torch.Tensor,
        logprobs: torch.Tensor,
        loss_mask: torch.Tensor,
        seq_ids: torch.Tensor | None = None,
    ) -> TeacherOutput:
        """ids, logprobs [B, T, k] (sorted descending, as stored); loss_mask, seq_ids [B, T] as for `Teacher`."""
        return topk_teacher_output(ids, logprobs, loss_mask, seq_ids, self.to_draft, self.draft_vocab_size)

    def from_batch(self, batch: Mapping[str, torch.Tensor]) -> TeacherOutput:
        return self(batch["teacher_ids"], batch["teacher_logprobs"], batch["loss_mask"], batch["seq_ids"].long())


def topk_teacher_output(
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    seq_ids: torch.Tensor | None,
    to_draft: torch.Tensor,
    draft_vocab_size: int,
) -> TeacherOutput:
    """The target's top-k (full-vocab log-probs) -> `TeacherOutput` over the draft vocab.

    Entries outside the draft vocab are dropped and the rest renormalized (a softmax over their
    log-probs), so with k = the whole vocab this is exactly `Teacher`'s restricted softmax; a smaller k
    truncates it to the top-k first. mask and top1 follow `Teacher`: the stored top-1 (ids[..., 0]) is
    the target's top-1, usable when it is a draft token. mass sums the kept probabilities: a lower
    bound of the full-vocab draft mass (the draft tokens outside the top-k are missing)."""
    positions = teacher_positions(loss_mask, seq_ids)
    draft = to_draft[ids.long()]  # [B, T, k]
    kept = (draft >= 0) & positions[..., None]
    lp = logprobs.float().masked_fill(~kept, float("-inf"))
    lse = lp.logsumexp(-1, keepdim=True)
    weights = torch.where(kept, (lp - lse).exp(), 0.0)  # no kept entry: lse = -inf, weights stay 0
    probs = torch.zeros(*ids.shape[:-1], draft_vocab_size, device=ids.device)
    probs.scatter_add_(-1, draft.clamp(min=0), weights)  # ids are distinct per row; dropped entries add 0
    mask = positions & (draft[..., 0] >= 0)
    top1 = torch.where(mask, ids[..., 0].long(), -1)
    mass = torch.where(positions, lse.squeeze(-1).exp(), 0.0)
    return TeacherOutput(probs, mask, top1, mass)
