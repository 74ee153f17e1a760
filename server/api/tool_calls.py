"""Chat output -> OpenAI message / delta shapes when a request offers tools.

Modes (``effective_tool_choice``): ``none`` (plain content), ``auto`` (the configured parser finds
calls in free text), ``required`` (the grammar forced a JSON array of calls) and a named function
(the grammar forced its arguments object). A choice that produced calls finishes with
``tool_calls`` unless it ran out of tokens (``length``; its text then comes back as content).
"""
from __future__ import annotations

import json
from typing import Optional

from sift.server.structured.tool_parsers import ToolCall, ToolCallStream, calls_from_json, parse


class ToolOutput:
    def __init__(self, tool_choice, tools: list, parser: str) -> None:
        self.names = {t["function"]["name"] for t in tools}
        self.named: Optional[str] = None
        if isinstance(tool_choice, str):
            self.mode = tool_choice
        else:
            self.mode, self.named = "named", tool_choice.function.name
        self.parser = parser

    @property
    def active(self) -> bool:
        return self.mode != "none"

    # ---- whole responses -------------------------------------------------------------------
    def message(self, text: str, finish_reason: Optional[str]) -> tuple:
        """``(message dict, finish_reason)``."""
        calls: list = []
        content: Optional[str] = text
        if finish_reason != "length":
            if self.mode == "named" and _is_json_object(text):
                calls, content = [ToolCall(self.named, text)], None
            elif self.mode == "required":
                calls = calls_from_json(text, self.names) or []
                content = None if calls else text
            elif self.mode == "auto":
                content, calls = parse(text, self.parser, self.names)
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [c.to_openai() for c in calls]
            finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        return message, finish_reason

    def streamer(self) -> "ToolDeltaStream":
        return ToolDeltaStream(self)


class ToolDeltaStream:
    """One choice's streamed deltas: ``feed(text)`` and ``finish(reason)`` return lists of delta dicts
    (``finish`` also the final finish_reason)."""

    def __init__(self, owner: ToolOutput) -> None:
        self.owner = owner
        self.text = ""
        self.num_calls = 0
        self.named_call: Optional[ToolCall] = None
        self.parser = ToolCallStream(owner.parser, owner.names) if owner.mode == "auto" else None

    def _calls(self, calls: list) -> list:
        deltas = [{"tool_calls": [c.to_openai(self.num_calls + i) for i, c in enumerate(calls)]}] if calls else []
        self.num_calls += len(calls)
        return deltas

    def feed(self, delta: str) -> list:
        self.text += delta
        mode = self.owner.mode
        if mode == "named":  # the arguments stream as they come, after one delta naming the call
            out = []
            if self.named_call is None:
                self.named_call = ToolCall(self.owner.named, "")
                out.append({"tool_calls": [self.named_call.to_openai(0)]})
                self.num_calls = 1
            if delta:
                out.append({"tool_calls": [{"index": 0, "function": {"arguments": delta}}]})
            return out
        if mode == "required":  # the array is parsed whole at the end
            return []
        content, calls = self.parser.feed(delta)
        return ([{"content": content}] if content else []) + self._calls(calls)

    def finish(self, finish_reason: Optional[str]) -> tuple:
        out: list = []
        mode = self.owner.mode
        if mode == "required":
            calls = calls_from_json(self.text, self.owner.names) if finish_reason != "length" else None
            out = self._calls(calls) if calls else ([{"content": self.text}] if self.text else [])
        elif mode == "auto":
            content, calls = self.parser.finish()
            out = ([{"content": content}] if content else []) + self._calls(calls)
        if self.num_calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        return out, finish_reason


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False
