"""The served split: each held-out prompt with the target's own greedy reply, as vLLM produced it.

`hsstore eval` on a store of these conversations measures a draft on the text vLLM drafted on. Its
chained acceptance length (each chain followed position by position, true tokens as inputs) should then
match vLLM's measured one: where the data is the target's greedy output, the true next tokens are the
tokens an accepted draft chain feeds. So this split checks the estimate against the measurement.

The replies go through text (the chat template renders them again), so the split also counts the
replies that re-tokenize to the same ids; the others differ from what vLLM saw at a few tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ServedSplit:
    rows: list[dict[str, Any]]  # conversations in the generate input form (id, source, messages)
    same_ids: int  # replies whose text re-tokenizes to the ids vLLM generated


def served_split(prompts: Sequence[str], replies: Sequence[Sequence[int]], tokenizer: Any) -> ServedSplit:
    """One conversation per prompt: the user turn, then the reply decoded without special tokens (the
    template adds its own end of turn)."""
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies; was the vLLM run made on these?")
    special = set(tokenizer.all_special_ids)
    rows, same = [], 0
    for i, (prompt, ids) in enumerate(zip(prompts, replies, strict=True)):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        same += tokenizer.encode(text, add_special_tokens=False) == [t for t in ids if t not in special]
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        rows.append({"id": f"served-{i}", "source": "served", "messages": messages})
    return ServedSplit(rows, same)
