"""Bad input: skip it and count why, or stop at the first one with a message that says how to fix it.

Real chat dumps always hold a few broken rows; failing a multi-hour run on row 90 000 helps nobody,
but silently dropping rows hides real problems. So every stage reports a skip with a reason and a
location, a `SkipCounter` tallies them for the end-of-run report, and `strict=True` turns the first
skip into a `DataError` instead.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum

from ..errors import HSStoreError


class DataError(HSStoreError, ValueError):
    """Input data that cannot be used as given; the message names the file/sample and the fix."""


class Reason(StrEnum):
    """Why a sample was skipped. The value is the short text shown in reports."""

    MALFORMED_JSON = "malformed JSON"
    TRUNCATED_FILE = "truncated JSON file"
    NOT_A_CONVERSATION = "no conversation"
    EMPTY = "empty conversation"
    MISSING_ROLE = "message without a role"
    UNKNOWN_ROLE = "unknown role"
    BAD_CONTENT = "message without text content"
    STARTS_WITH_ASSISTANT = "starts with the assistant"
    NO_ASSISTANT = "no assistant turn"
    CONTROL_TOKEN = "control token inside a message"
    TEMPLATE_ERROR = "chat template rejected the conversation"
    REPLY_NOT_FOUND = "assistant reply not found in the rendered chat"
    NO_LOSS_TOKENS = "no assistant tokens within seq_length"


FIXES: dict[Reason, str] = {
    Reason.MALFORMED_JSON: "fix or delete that line (each JSONL line must be one JSON object)",
    Reason.TRUNCATED_FILE: "the file ends in the middle of a record; re-download or re-export it",
    Reason.NOT_A_CONVERSATION: "give each row a 'conversations' or 'messages' list, or a 'text' string",
    Reason.EMPTY: "drop the row or give it at least a user and an assistant message",
    Reason.MISSING_ROLE: "give every message a 'role' (user/assistant/system) or 'from' (human/gpt/system)",
    Reason.UNKNOWN_ROLE: "use user/assistant/system (or ShareGPT's human/gpt/system) as roles",
    Reason.BAD_CONTENT: "give every message its text as a string in 'content' or 'value'",
    Reason.STARTS_WITH_ASSISTANT: "drop the leading assistant message or put the user prompt before it",
    Reason.NO_ASSISTANT: "add the assistant's reply; only assistant tokens are trained on",
    Reason.CONTROL_TOKEN: "remove the tokenizer's special-token strings from the message text",
    Reason.TEMPLATE_ERROR: "make the conversation follow the roles/order the chat template requires",
    Reason.REPLY_NOT_FOUND: "the chat template rewrites message text; check it renders replies verbatim",
    Reason.NO_LOSS_TOKENS: "raise --seq-length or shorten the first turns",
}


class SkipSample(Exception):
    """Raised inside a stage to drop the current sample; the caller records it in a `SkipCounter`."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else str(reason))
        self.reason = reason
        self.detail = detail


@dataclass
class SkipCounter:
    """Counts skipped samples per reason (keeping a few examples), or raises on the first if `strict`."""

    strict: bool = False
    max_examples: int = 3
    counts: Counter[Reason] = field(default_factory=Counter)
    examples: dict[Reason, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def skip(self, reason: Reason, where: str, detail: str = "") -> None:
        """Record one skipped sample at `where` (e.g. "data.jsonl:17" or "sharegpt id=abc")."""
        message = f"{where}: {reason}" + (f" ({detail})" if detail else "")
        if self.strict:
            raise DataError(f"{message}; fix: {FIXES[reason]}")
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(message)

    def note(self, message: str) -> None:
        """Something the user should know that is not a skipped sample (e.g. an expected truncation)."""
        self.notes.append(message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: SkipCounter) -> None:
        for reason, count in other.counts.items():
            self.counts[reason] += count
            room = self.max_examples - len(self.examples.setdefault(reason, []))
            self.examples[reason].extend(other.examples.get(reason, [])[: max(room, 0)])
        self.notes.extend(other.notes)

    def report(self) -> str:
        """A few lines for the end of a run: totals per reason with examples and the fix, then notes."""
        lines = [f"skipped {self.total} sample(s)"] if self.total else []
        for reason, count in self.counts.most_common():
            lines.append(f"  {count:>8}  {reason} - fix: {FIXES[reason]}")
            lines.extend(f"            e.g. {example}" for example in self.examples.get(reason, []))
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)
