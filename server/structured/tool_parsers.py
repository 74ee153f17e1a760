"""Model output -> OpenAI tool calls, whole or streamed.

``hermes``: calls are ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks; text
outside them is content. ``json``: the whole output is one call object ``{"name", "arguments"}``
(or ``"parameters"``) or a JSON array of them; anything else is content. A block naming a
function the request did not offer, or whose JSON does not parse, stays content.

Streaming holds back only what could still become a call (text after a possible ``<tool_call>``
prefix; for ``json``, an output starting with ``{`` or ``[``) and emits each call as one
``tool_calls`` delta (id, name and the complete arguments) when its block closes.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Optional

PARSERS = ("hermes", "json")
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self, index: Optional[int] = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def _call_from(obj, names: set) -> Optional[ToolCall]:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def calls_from_json(text: str, names: set) -> Optional[list]:
    """One call object or an array of them; None unless every element is a call."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    calls = [_call_from(o, names) for o in items]
    return calls if calls and all(calls) else None


def parse(text: str, parser: str, names: set) -> tuple:
    """``(content or None, [ToolCall])`` for a finished output."""
    if parser == "json":
        calls = calls_from_json(text.strip(), names) if text.strip()[:1] in ("{", "[") else None
        return (None, calls) if calls else (text, [])
    stream = ToolCallStream(parser, names)
    content, calls = stream.feed(text)
    more, late = stream.finish()
    content += more
    calls += late
    return (content if content.strip() or not calls else None), calls


class ToolCallStream:
    """Incremental :func:`parse`: ``feed(delta)`` and ``finish()`` return ``(content delta, [new ToolCall])``."""

    def __init__(self, parser: str, names: set) -> None:
        self.parser = parser
        self.names = names
        self.buffer = ""
        self.in_call = False
        self.json_mode: Optional[bool] = None  # json parser: decided by the first non-blank character

    def feed(self, delta: str) -> tuple:
        self.buffer += delta
        if self.parser == "json":
            return self._feed_json()
        content, calls = "", []
        while True:
            if self.in_call:
                end = self.buffer.find(_CLOSE)
                if end < 0:
                    return content, calls
                block, self.buffer, self.in_call = self.buffer[:end], self.buffer[end + len(_CLOSE):], False
                found = calls_from_json(block.strip(), self.names)
                if found:
                    calls += found
                else:
                    content += _OPEN + block + _CLOSE
                continue
            start = self.buffer.find(_OPEN)
            if start >= 0:
                content += self.buffer[:start]
                self.buffer, self.in_call = self.buffer[start + len(_OPEN):], True
                continue
            keep = _partial_suffix(self.buffer, _OPEN)
            content += self.buffer[:len(self.buffer) - keep]
            self.buffer = self.buffer[len(self.buffer) - keep:]
            return content, calls

    def _feed_json(self) -> tuple:
        if self.json_mode is None:
            stripped = self.buffer.lstrip()
            if not stripped:
                return "", []
            self.json_mode = stripped[0] in "{["
        if self.json_mode:
            return "", []
        out, self.buffer = self.buffer, ""
        return out, []

    def finish(self) -> tuple:
        """Whatever is held back: calls if it completes one, else content."""
        rest, self.buffer = self.buffer, ""
        if self.parser == "json":
            if self.json_mode:
                calls = calls_from_json(rest.strip(), self.names)
                return ("", calls) if calls else (rest, [])
            return rest, []
        if self.in_call:
            self.in_call = False
            return _OPEN + rest, []
        return rest, []


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
