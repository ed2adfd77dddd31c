"""Read a big JSON document one element at a time, and tell a truncated file from a broken one.

Chat dumps ship as one JSON array of 100+ MB (the bundled ShareGPT file is 120 MB and its end is cut
off mid-record). `json.load` would hold all of it in memory and fail on the truncation, losing
everything; here each element is decoded with `JSONDecoder.raw_decode` from a sliding text buffer, so
memory stays at about one chunk plus one element, and a cut-off end stops the stream cleanly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, TextIO

_NON_SPACE = re.compile(r"\S")
_TAIL_CHARS = 16


class JSONStreamError(Exception):
    """An element did not parse. `truncated` is True when the text simply ran out (a cut-off file)."""

    def __init__(self, index: int, line: int, message: str, truncated: bool) -> None:
        kind = "file ends inside" if truncated else "malformed"
        super().__init__(f"line {line}, element {index}: {kind} ({message})")
        self.index = index
        self.line = line
        self.message = message
        self.truncated = truncated


class _Buffer:
    """A window on the text: consumed text is dropped when more is read; `line` tracks the position."""

    def __init__(self, fp: TextIO, chunk_chars: int) -> None:
        self.fp = fp
        self.chunk_chars = chunk_chars
        self.text = ""
        self.pos = 0
        self.line = 1
        self.eof = False

    def more(self) -> bool:
        """Append text; read at least as much as is pending so one huge element costs O(n), not O(n^2)."""
        if self.eof:
            return False
        data = self.fp.read(max(self.chunk_chars, len(self.text) - self.pos))
        if not data:
            self.eof = True
            return False
        self.text = self.text[self.pos :] + data
        self.pos = 0
        return True

    def consume_to(self, end: int) -> None:
        self.line += self.text.count("\n", self.pos, end)
        self.pos = end

    def peek(self) -> str | None:
        """Skip whitespace; the next character (not consumed), or None at the end of the input."""
        while True:
            found = _NON_SPACE.search(self.text, self.pos)
            if found:
                self.consume_to(found.start())
                return self.text[self.pos]
            self.consume_to(len(self.text))
            if not self.more():
                return None

    def decode(self, decoder: json.JSONDecoder, index: int) -> Any:
        while True:
            try:
                value, end = decoder.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as err:
                # running out of text looks like an unterminated string or an error within the last few
                # characters (a cut-off \uXXXX escape, literal or number)
                incomplete = err.msg.startswith("Unterminated string") or len(self.text) - err.pos < _TAIL_CHARS
                if incomplete and self.more():
                    continue
                line = self.line + self.text.count("\n", self.pos, err.pos)
                raise JSONStreamError(index, line, err.msg, truncated=incomplete) from None
            # a number cut by the chunk boundary parses short: only trust a value with text after it
            if end < len(self.text) or not self.more():
                self.consume_to(end)
                return value


def iter_json_values(fp: TextIO, chunk_chars: int = 1 << 20) -> Iterator[tuple[int, Any]]:
    """Yield (line, value) for each element of a top-level JSON array, or for each of several top-level
    values separated by whitespace (a single object, or JSON Lines saved as .json).

    Raises `JSONStreamError` at the first element that does not parse, after yielding all before it.
    """
    buf = _Buffer(fp, chunk_chars)
    decoder = json.JSONDecoder()
    in_array = buf.peek() == "["
    if in_array:
        buf.consume_to(buf.pos + 1)
    index = 0
    while True:
        char = buf.peek()
        if char is None:
            if in_array:  # the closing bracket never came
                raise JSONStreamError(index, buf.line, "missing ']' at the end", truncated=True)
            return
        if in_array and char == "]" and index == 0:
            return
        if in_array and index:
            if char == "]":
                return
            if char != ",":
                raise JSONStreamError(index, buf.line, f"expected ',' or ']', found {char!r}", truncated=False)
            buf.consume_to(buf.pos + 1)
            if buf.peek() is None:
                raise JSONStreamError(index, buf.line, "file ends after ','", truncated=True)
        line = buf.line
        yield line, buf.decode(decoder, index)
        index += 1
