"""Training-time-test (TTT) loss of the EAGLE-3 draft, and the metrics that predict its speed-up.

Step k of the unroll (see `model.Eagle3Draft.unroll`) at index t stands for position t + k and
predicts token t + k + 2, so its teacher is the target's distribution at position j = t + k + 1. The
pair counts when the teacher is usable there (`TeacherOutput.mask`: token j + 1 is trained on and the
target's top-1 is a draft-vocab token) and t, j lie in the same packed sample; so the last k + 2
indices of every sample drop out at step k. The loss is sum_k decay^k * mean over those positions of
the soft cross-entropy -sum_v teacher(v) log draft(v).

Metrics are kept as per-step sums and counts (tensors on the batch's device), so a runner can add
them over batches and all-reduce them across ranks before dividing.

Greedy acceptance length is estimated three ways. `acceptance_length_greedy` multiplies the per-step accuracies
(each over its own usable positions), so it assumes the steps fail independently and leaves out the
positions whose target top-1 the draft vocab cannot express. `acceptance_length_chained` follows each
chain as serving does: a chain starts at every index whose next-but-one token is trained on, step k
counts only if steps 0..k were all right at that index, and a position the draft cannot be right at
(target top-1 outside the draft vocab, teacher unusable) ends the chain. It still feeds the true tokens
rather than the draft's own, which is exact wherever the data is the target's greedy output.

Serving does not start a chain at every position: after a chain keeps a drafts, the target adds its own
token and the next chain starts a + 1 positions later. `decoding_walk` (eval only: it reads the batch on
the host) replays that over each assistant reply, giving `acceptance_length_decoding` and per-step rates
that count what vLLM's spec-decode counters count, when the replies are the target's own greedy output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .model import Eagle3Draft
from .teacher import Teacher, TeacherOutput, TopkTeacher, teacher_positions

# what every packed batch holds; a teacher module adds its own inputs (`batch_keys`: "last", or the top-k arrays)
BATCH_KEYS = ("input_ids", "loss_mask", "aux", "position_ids", "seq_ids")


@dataclass
class StepMetrics:
    """Per TTT step k (tensors of shape [steps]): sums over the positions counted at step k."""

    loss_sum: torch.Tensor  # soft cross-entropy
    correct: torch.Tensor  # draft argmax (mapped to target ids) == target argmax
    accept_sum: torch.Tensor  # expected acceptance sum_v min(p_target(v), p_draft(v))
    count: torch.Tensor  # positions counted
    chained: torch.Tensor  # chains whose drafts 0..k were all right
    chains: torch.Tensor  # chains started (the same at every step)
    walked: torch.Tensor  # chains of the decoding walk whose drafts 0..k were all right
    walks: torch.Tensor  # chains of the decoding walk (the same at every step)

    @classmethod
    def zeros(cls, steps: int, device: torch.device | str = "cpu") -> StepMetrics:
        return cls(*(torch.zeros(steps, dtype=torch.float64, device=device) for _ in fields(cls)))

    def __add__(self, other: StepMetrics) -> StepMetrics:
        return StepMetrics(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_tensor(self) -> torch.Tensor:
        """[fields, steps], e.g. for one all_reduce; `from_tensor` undoes it."""
        return torch.stack([getattr(self, f.name) for f in fields(self)])

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> StepMetrics:
        return cls(*t.unbind(0))

    @property
    def loss(self) -> torch.Tensor:
        return self.loss_sum / self.count.clamp(min=1)

    @property
    def accuracy(self) -> torch.Tensor:
        return self.correct / self.count.clamp(min=1)

    @property
    def expected_acceptance(self) -> torch.Tensor:
        return self.accept_sum / self.count.clamp(min=1)

    @property
    def chain_survival(self) -> torch.Tensor:
        """Share of chains whose drafts 0..k were all accepted, per k."""
        return self.chained / self.chains.clamp(min=1)

    @property
    def walk_survival(self) -> torch.Tensor:
        """Share of the decoding walk's chains whose drafts 0..k were all accepted (vLLM's per-position rate)."""
        return self.walked / self.walks.clamp(min=1)

    def summary(self) -> dict[str, float]:
        """Flat floats for logging: loss_k, acc_k, accept_k, chain_k (and walk_k after a walk) per step, and the
        estimated acceptance lengths."""
        out: dict[str, float] = {}
        per_step = (self.loss, self.accuracy, self.expected_acceptance, self.chain_survival)
        for k, (loss, acc, accept, chain) in enumerate(zip(*(t.tolist() for t in per_step), strict=True)):
            out.update({f"loss_{k}": loss, f"acc_{k}": acc, f"accept_{k}": accept, f"chain_{k}": chain})
        out["acceptance_length_greedy"] = estimated_acceptance_length(self.accuracy)
        out["acceptance_length_sampled"] = estimated_acceptance_length(self.expected_acceptance)
        out["acceptance_length_chained"] = 1.0 + float(self.chain_survival.sum())
        if bool(self.walks.gt(0).any()):  # only evaluation walks
            out.update({f"walk_{k}": rate for k, rate in enumerate(self.walk_survival.tolist())})
            out["acceptance_length_decoding"] = 1.0 + float(self.walk_survival.sum())
        return out


def estimated_acceptance_length(per_step_acc: Sequence[float] | torch.Tensor) -> float:
    """Tokens per target forward for chain drafting: 1 + sum_k prod_{j<=k} acc_j.

    The target always yields one token; draft k is kept only if drafts 0..k all were. TTT's step-k
    accuracy is measured on positions whose earlier drafts were right, so it estimates acc_k given that."""
    accs = per_step_acc.tolist() if isinstance(per_step_acc, torch.Tensor) else list(per_step_acc)
    length, survive = 1.0, 1.0
    for acc in accs:
        survive *= float(acc)
        length += survive
    return length


def unwrap(model: nn.Module) -> nn.Module:
    """The draft inside DDP/FSDP wrappers (they keep it as `.module`)."""
    while not hasattr(model, "d2t") and hasattr(model, "module"):
        model = model.module
    return model


def ttt_loss(
    draft: Eagle3Draft | nn.Module,
    batch: Mapping[str, torch.Tensor],
    teacher: Teacher | TopkTeacher | TeacherOutput,
    ttt_steps: int = 7,
    decay: float = 0.8,
    walk: bool = False,
) -> tuple[torch.Tensor, StepMetrics]:
    """Unroll `ttt_steps` steps over a packed batch (see BATCH_KEYS); returns the loss and per-step metrics.

    `teacher` is a module that reads its inputs from the batch (`Teacher`: the last layer, `TopkTeacher`:
    the stored top-k) or a ready `TeacherOutput`. `draft` may be wrapped (DDP, FSDP): it is only called, once.
    `walk` adds the decoding walk's counts (a host loop: for evaluation, not for every training step)."""
    needed = (*BATCH_KEYS, *getattr(teacher, "batch_keys", ()))
    missing = [k for k in needed if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing}; a packed batch for this teacher has {list(needed)}")
    seq_ids = batch["seq_ids"].long()
    if not isinstance(teacher, TeacherOutput):
        teacher = teacher.from_batch(batch)
    valid = step_positions(teacher.mask, seq_ids, ttt_steps)
    starts = step_positions(teacher_positions(batch["loss_mask"], seq_ids), seq_ids, 1)[0]
    alive = starts.clone()  # chains whose drafts so far were all right
    chains = starts.sum().double()
    accepted = torch.zeros_like(seq_ids)  # drafts each chain keeps
    logits = draft(batch["input_ids"], batch["aux"], batch["position_ids"], seq_ids, steps=ttt_steps, select=valid)
    d2t = unwrap(draft).d2t

    metrics = StepMetrics.zeros(ttt_steps, seq_ids.device)
    loss = torch.zeros((), device=seq_ids.device)
    for k, (step_logits, sel) in enumerate(zip(logits, valid, strict=True)):
        target = ahead(teacher.probs, sel, k + 1)  # [N, draft_vocab]: the teacher at t + k + 1
        logp = F.log_softmax(step_logits.float(), dim=-1)
        ce = -(target * logp).sum(-1)
        count = sel.sum()
        loss = loss + decay**k * ce.sum() / count.clamp(min=1)
        with torch.no_grad():
            pred = logp.argmax(-1)
            correct = (pred + d2t[pred]) == ahead(teacher.top1, sel, k + 1)
            p_target = target * ahead(teacher.mass, sel, k + 1)[:, None]  # full-vocab probabilities
            accept = torch.minimum(p_target, logp.exp()).sum(-1)
            metrics.loss_sum[k] = ce.sum().double()
            metrics.correct[k] = correct.sum().double()
            metrics.accept_sum[k] = accept.sum().double()
            metrics.count[k] = count.double()
            alive &= scatter_true(sel, correct)
            metrics.chained[k] = alive.sum().double()
            metrics.chains[k] = chains
            accepted += alive
    if walk:
        walked, walks = decoding_walk(accepted, starts, batch["loss_mask"], seq_ids, ttt_steps)
        metrics.walked.copy_(walked)
        metrics.walks.fill_(walks)
    return loss, metrics


def decoding_walk(
    accepted: torch.Tensor, starts: torch.Tensor, loss_mask: torch.Tensor, seq_ids: torch.Tensor, steps: int
) -> tuple[torch.Tensor, int]:
    """Greedy speculative decoding replayed over every assistant reply (a run of loss-masked tokens).

    The first chain starts where the reply's first token has just come from the target (index P - 1 for a
    reply starting at P: its aux states and token P predict P + 1); a chain at t keeps accepted[t] drafts,
    the target adds one token, so the next chain starts at t + accepted[t] + 1, until the reply ends.
    Returns, per step k, the chains whose drafts 0..k were all kept, and the number of chains."""
    kept, ok = accepted.tolist(), starts.tolist()
    mask = loss_mask.bool()
    reply_start = mask[:, 1:] & ~mask[:, :-1] & (seq_ids[:, 1:] == seq_ids[:, :-1]) & (seq_ids[:, 1:] >= 0)
    survived = [0] * steps
    chains = 0
    for b, t in reply_start.nonzero().tolist():
        while t < len(ok[b]) and ok[b][t]:
            chains += 1
            for k in range(kept[b][t]):
                survived[k] += 1
            t += kept[b][t] + 1
    return torch.tensor(survived, dtype=torch.float64), chains


def scatter_true(sel: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: `values` (one per True of `sel`, in order) at the indices `sel` marks, False elsewhere."""
    out = torch.zeros_like(sel)
    out[sel] = values
    return out


def shift_left(x: torch.Tensor, n: int, fill: int = 0) -> torch.Tensor:
    """[B, T] -> x[:, t + n] at t, `fill` past the end."""
    out = torch.full_like(x, fill)
    if n < x.shape[1]:
        out[:, : x.shape[1] - n] = x[:, n:]
    return out


def ahead(x: torch.Tensor, sel: torch.Tensor, n: int) -> torch.Tensor:
    """x[:, t + n] at the indices t that `sel` marks (sel is False past T - n), without copying all of x."""
    if n >= x.shape[1]:
        return x.new_zeros((0, *x.shape[2:]))
    return x[:, n:][sel[:, : x.shape[1] - n]]


def step_positions(teacher_mask: torch.Tensor, seq_ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """[B, T] bool per step k: indices t whose teacher position t + k + 1 is usable and in t's sample."""
    masks = []
    for k in range(steps):
        same_sample = shift_left(seq_ids, k + 1, fill=-2) == seq_ids
        masks.append(shift_left(teacher_mask, k + 1) & same_sample & (seq_ids >= 0))
    return masks
