"""Tool-call parsers: whole-output parsing, and streaming that yields the same calls and content
whatever the chunking; forced-call schemas and the fallback prompt."""
import json
import random

import pytest

from sift.server.structured.tool_parsers import ToolCallStream, parse
from sift.server.structured.tools import forced_call_spec, render_messages

NAMES = {"get_weather", "add"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "add"}}]


def streamed(text: str, parser: str, seed: int) -> tuple:
    rng = random.Random(seed)
    stream, content, calls, i = ToolCallStream(parser, NAMES), "", [], 0
    while i < len(text):
        j = i + rng.randint(1, 7)
        c, found = stream.feed(text[i:j])
        content, calls, i = content + c, calls + found, j
    c, found = stream.finish()
    return content + c, calls + found


HERMES = [
    ('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Sure.\n", [("get_weather", {"city": "Paris"})]),
    ('<tool_call>{"name": "add", "arguments": {}}</tool_call><tool_call>{"name": "get_weather", '
     '"arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>', None, [("add", {}), ("get_weather", {"city": "Oslo"})]),
    ("no call here, just < text", "no call here, just < text", []),
    ('<tool_call>{"name": "unknown", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', []),
    ('<tool_call>{"name": "add", "argu', '<tool_call>{"name": "add", "argu', []),  # cut off by max_tokens
]


@pytest.mark.parametrize("text,content,calls", HERMES)
def test_hermes_whole_and_streamed(text, content, calls):
    got_content, got_calls = parse(text, "hermes", NAMES)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    for seed in range(5):
        s_content, s_calls = streamed(text, "hermes", seed)
        assert s_content == (content or "")
        assert [(c.name, json.loads(c.arguments)) for c in s_calls] == calls


@pytest.mark.parametrize("text,content,calls", [
    ('{"name": "add", "arguments": {"a": 1}}', None, [("add", {"a": 1})]),
    (' [{"name": "add", "parameters": {}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]', None,
     [("add", {}), ("get_weather", {"city": "Rome"})]),
    ('{"answer": 42}', '{"answer": 42}', []),
    ("It is sunny.", "It is sunny.", []),
])
def test_json_parser(text, content, calls):
    got_content, got_calls = parse(text, "json", NAMES)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    s_content, s_calls = streamed(text, "json", 0)
    assert s_content == (content or "")
    assert [c.name for c in s_calls] == [name for name, _ in calls]


def test_forced_call_schemas():
    named = json.loads(forced_call_spec(TOOLS, {"type": "function", "function": {"name": "get_weather"}},
                                        True).value)
    assert named == TOOLS[0]["function"]["parameters"]
    required = json.loads(forced_call_spec(TOOLS, "required", False).value)
    assert required["minItems"] == 1 and required["maxItems"] == 1
    assert [o["properties"]["name"]["enum"] for o in required["items"]["anyOf"]] == [["get_weather"], ["add"]]
    assert "maxItems" not in json.loads(forced_call_spec(TOOLS, "required", True).value)
    assert forced_call_spec(TOOLS, "auto", True) is None


def test_fallback_prompt_renders_tools_calls_and_results():
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "18C"}]
    out = render_messages(messages, TOOLS, native=False, parser="hermes")
    assert out[0]["role"] == "system" and "<tools>" in out[0]["content"] and '"get_weather"' in out[0]["content"]
    assert out[2] == {"role": "assistant",
                      "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'}
    assert out[3] == {"role": "user", "content": "<tool_response>\n18C\n</tool_response>"}
    native = render_messages(messages, TOOLS, native=True, parser="hermes")
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
