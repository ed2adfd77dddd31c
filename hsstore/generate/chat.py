"""Render a conversation with the tokenizer's own chat template and mark the tokens to train on.

The loss mask covers each assistant reply, from right after the assistant header through its
end-of-turn token (inclusive): exactly the tokens the target generates when serving. Templates differ
in headers, whitespace, BOS handling and where they put the system prompt, so nothing here knows any
template; each assistant turn's span is measured on the template's own output:

1. prefix diff (the normal case): render messages[:k] with the generation prompt and messages[:k+1]
   without it; turn k is the text between the two. This includes whatever the template writes between
   the header and the content (a leading space, an empty <think> block). Trailing whitespace after the
   turn's last control token (ChatML's "\n" after <|im_end|>) is not part of the turn. Used for turn k
   only when verified there: each render must be a prefix of the next and of the whole conversation.
2. reply search, for turns where that check fails (templates that rewrite earlier turns: Qwen3 drops
   old <think> blocks, Mistral v0.3 moves the system prompt into the last user turn): find the reply's
   text in the full render after everything already placed, plus the control token right after it.

Char spans become token masks through the fast tokenizer's offsets on the full text, tokenized once,
as a server tokenizes a rendered prompt. Messages that contain a control-token string (say "</s>")
are skipped: such text would be read as a real turn boundary and corrupt both the input and the mask.

Pre-formatted {"text"} rows carry no roles, so they are tokenized as they are (no BOS added: the text
is taken to hold whatever special tokens it needs) and every token is trained on.
"""

from __future__ import annotations

import hashlib
import json
import re
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ..manifest import TokenizerInfo
from .skips import DataError, Reason, SkipSample
from .sources import Record

Messages = Sequence[dict[str, str]]
Span = tuple[int, int]


@dataclass(frozen=True)
class Encoded:
    """One tokenized sample: `loss_mask[i]` is 1 where token i is trained on."""

    input_ids: list[int]
    loss_mask: list[int]


# --- tokenizer facts ------------------------------------------------------------------------------
def check_chat_tokenizer(tokenizer: Any, need_template: bool = True) -> None:
    """Fail early, with the fix, on tokenizers this module cannot mask with."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"tokenizer {name!r} is not a fast (tokenizers-backed) tokenizer; masks need its offsets")
    if need_template and not tokenizer.chat_template:
        raise DataError(
            f"tokenizer {name!r} has no chat template; use the chat/instruct variant of the model, "
            "pass a tokenizer that has one, or give pre-formatted {'text': ...} rows instead"
        )


def control_tokens(tokenizer: Any) -> tuple[str, ...]:
    """The special tokens that structure a chat (BOS/EOS, headers, end-of-turn markers)."""
    added = tokenizer.added_tokens_decoder.values()
    return tuple(sorted({t.content for t in added if t.special and t.content.strip()}, key=len, reverse=True))


@lru_cache(maxsize=16)
def _pattern(tokens: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(map(re.escape, tokens)) or "(?!)")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides token ids and masks: vocab, merges, normalizers, specials, template.

    Truncation/padding settings are left out: calling the tokenizer changes them, the ids do not."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    backend.pop("truncation", None)
    backend.pop("padding", None)
    payload = {"backend": backend, "template": tokenizer.chat_template, "special": tokenizer.special_tokens_map}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_info(tokenizer: Any) -> TokenizerInfo:
    """The manifest's tokenizer entry."""
    template = tokenizer.chat_template
    template_hash = None if template is None else hashlib.sha256(json.dumps(template).encode()).hexdigest()
    return TokenizerInfo(tokenizer.name_or_path or None, tokenizer_fingerprint(tokenizer), template_hash)


# --- assistant spans in the rendered text ---------------------------------------------------------
def _render_fn(tokenizer: Any) -> Callable[[Messages, bool], str]:
    def render(messages: Messages, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)

    return render


def _end_of_turn(text: str, start: int, end: int, control: re.Pattern[str]) -> int:
    """Cut the span after its last control token when only whitespace follows it."""
    matches = list(control.finditer(text, start, end))
    if matches and not text[matches[-1].end() : end].strip():
        return matches[-1].end()
    return end


def _prefix_span(messages: Messages, k: int, full: str, render: Callable) -> Span | None:
    """Message k's turn as the difference of two prefix renders, if the template is prefix-stable there."""
    if k == 0:
        return None
    try:
        before = render(messages[:k], True)
        through = render(messages[: k + 1], False)
    except Exception:  # a template may refuse a partial conversation
        return None
    if through.startswith(before) and full.startswith(through):
        return len(before), len(through)
    return None


def _find(full: str, content: str, cursor: int) -> Span | None:
    """Where `content` (or, as templates often trim, its stripped form) is rendered at or after `cursor`."""
    for needle in dict.fromkeys((content, content.strip())):
        found = full.find(needle, cursor) if needle else -1
        if found >= 0:
            return found, found + len(needle)
    return None


def assistant_spans(messages: Messages, tokenizer: Any) -> tuple[str, list[Span]]:
    """The rendered conversation and the char spans of its assistant turns (see the module docstring)."""
    render = _render_fn(tokenizer)
    try:
        full = render(messages, False)
    except Exception as err:  # jinja TemplateError, raise_exception, bad types
        raise SkipSample(Reason.TEMPLATE_ERROR, str(err).splitlines()[0][:200] if str(err) else "") from None
    control = _pattern(control_tokens(tokenizer))
    spans: list[Span] = []
    cursor = 0  # replies are searched after everything already placed
    for k, message in enumerate(messages):
        if message["role"] == "system":  # templates move system prompts around; never anchor on them
            continue
        if message["role"] != "assistant":
            found = _find(full, message["content"], cursor)
            cursor = found[1] if found else cursor
            continue
        span = _prefix_span(messages, k, full, render)
        if span is not None and span[0] >= cursor:
            span = (span[0], _end_of_turn(full, *span, control))
        else:
            span = _find(full, message["content"], cursor)
            if span is None:
                if not message["content"].strip():
                    continue  # an empty reply the template dropped: nothing to train on
                raise SkipSample(Reason.REPLY_NOT_FOUND, f"reply starting {message['content'][:40]!r}")
            eot = control.match(full, span[1])
            span = (span[0], eot.end() if eot else span[1])
        spans.append(span)
        cursor = span[1]
    return full, spans


# --- tokens and masks -----------------------------------------------------------------------------
def _check_control_text(messages: Messages, tokenizer: Any) -> None:
    control = _pattern(control_tokens(tokenizer))
    for message in messages:
        found = control.search(message["content"])
        if found:
            raise SkipSample(Reason.CONTROL_TOKEN, f"{found.group()!r} in a {message['role']} message")


def _spans_to_mask(offsets: Sequence[Span], spans: Sequence[Span]) -> list[int]:
    """Token i is masked when it starts inside a span (token offsets are in order)."""
    starts = [start for start, _ in offsets]
    mask = [0] * len(starts)
    for begin, end in spans:
        lo, hi = bisect_left(starts, begin), bisect_left(starts, end)
        mask[lo:hi] = [1] * (hi - lo)
    return mask


def _truncate(input_ids: list[int], loss_mask: list[int], seq_length: int) -> Encoded:
    ids, mask = input_ids[:seq_length], loss_mask[:seq_length]
    if not any(mask):
        detail = f"none in the first {seq_length} tokens" if any(loss_mask) else "the template rendered none"
        raise SkipSample(Reason.NO_LOSS_TOKENS, detail)
    return Encoded(ids, mask)


def encode_conversation(messages: Messages, tokenizer: Any, seq_length: int) -> Encoded:
    """Token ids and assistant loss mask of one conversation, cut to `seq_length` tokens."""
    _check_control_text(messages, tokenizer)
    full, spans = assistant_spans(messages, tokenizer)
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return _truncate(encoding["input_ids"], _spans_to_mask(encoding["offset_mapping"], spans), seq_length)


def encode_text(text: str, tokenizer: Any, seq_length: int) -> Encoded:
    """A pre-formatted row: tokens as they are, every token trained on."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return _truncate(ids, [1] * len(ids), seq_length)


def encode_record(record: Record, tokenizer: Any, seq_length: int) -> Encoded:
    """Either kind of record; raises `SkipSample` when it yields nothing to train on."""
    if record.messages is None:
        return encode_text(record.text or "", tokenizer, seq_length)
    return encode_conversation(record.messages, tokenizer, seq_length)
