"""Read a large JSON object's top-level lists one element at a time.

``instances_train2017.json`` is about 450 MB; ``json.load`` turns it into several GB of
Python objects. Checking it needs one record at a time, so this reader decodes each list
element with the C decoder (``json.JSONDecoder.raw_decode``) from a sliding text buffer:
memory stays at the buffer plus whatever the caller keeps.
"""

import json
import re
from collections.abc import Iterator
from typing import Any

CHUNK = 1 << 20  # characters read at a time; the buffer keeps at least this much ahead
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
END = object()  # yielded as ``(key, END)`` once the list under ``key`` is complete


class JSONStreamError(ValueError):
    """Invalid JSON, or not an object at the top level; the message gives the offset."""


class _Reader:
    def __init__(self, f: Any) -> None:
        self.f, self.buf, self.pos, self.offset, self.eof = f, "", 0, 0, False

    def _more(self, at_least: int = CHUNK) -> bool:
        """Append at least ``at_least`` characters, dropping what was consumed."""
        if self.eof:
            return False
        text = self.f.read(at_least)
        self.eof = len(text) < at_least
        self.offset += self.pos
        self.buf, self.pos = self.buf[self.pos :] + text, 0
        return bool(text)

    def peek(self) -> str:
        """The next non-whitespace character ('' at the end of the file)."""
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self._more():
                return self.buf[self.pos : self.pos + 1]

    def expect(self, chars: str, what: str) -> str:
        char = self.peek()
        if not char or char not in chars:
            raise JSONStreamError(f"Expecting {what} at char {self.offset + self.pos}")
        self.pos += 1
        return char

    def value(self) -> Any:
        """Decode one value; read further while it may be cut off by the buffer's end."""
        self.peek()
        if len(self.buf) - self.pos < CHUNK:
            self._more()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                # Double what is buffered: a value cut by the buffer's end decodes next time,
                # a real error is reported once the rest of the file is in.
                if self._more(max(CHUNK, len(self.buf) - self.pos)):
                    continue
                raise JSONStreamError(f"{e.msg} at char {self.offset + e.pos}") from None
            if end == len(self.buf) and self._more():
                continue  # a number at the buffer's end may go on
            self.pos = end
            return value


def iter_top_level(f: Any, list_keys: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    """``(key, element)`` for each element of the top-level lists named in ``list_keys``, then
    ``(key, END)``; ``(key, value)`` for any other top-level entry. ``f`` is a text file."""
    reader = _Reader(f)
    first = reader.peek()
    if first != "{":
        raise JSONStreamError("the top level is not an object" if first else "the file is empty")
    reader.pos += 1
    if reader.peek() == "}":
        reader.pos += 1
        return
    while True:
        if reader.peek() != '"':
            raise JSONStreamError(
                f"Expecting property name enclosed in double quotes at char "
                f"{reader.offset + reader.pos}"
            )
        key = reader.value()
        reader.expect(":", "':' delimiter")
        if key in list_keys:
            if reader.peek() != "[":
                raise JSONStreamError(f'"{key}" is not a list')
            reader.pos += 1
            if reader.peek() == "]":
                reader.pos += 1
            else:
                while True:
                    yield key, reader.value()
                    if reader.expect(",]", "',' delimiter") == "]":
                        break
            yield key, END
        else:
            yield key, reader.value()
        if reader.expect(",}", "',' delimiter") == "}":
            break
    if reader.peek():
        raise JSONStreamError(f"Extra data at char {reader.offset + reader.pos}")
