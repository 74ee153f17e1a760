"""Tool definitions -> prompts and forced-call constraints.

Prompt: a chat template that renders tools itself (it mentions ``tools``, as Qwen2.5's, Llama 3.1's
and Hermes' do) gets them through ``apply_chat_template(..., tools=...)``. A template without a
tools section (SmolLM2's) gets the fallback: a system message listing the tools as JSON inside
``<tools></tools>`` with the call format of the configured parser, earlier calls written back as
that format, and tool results as ``<tool_response>`` user turns (the Hermes conventions).

Forced calls (``tool_choice`` ``required`` or a named function) are constrained by a JSON schema,
as vLLM does, whatever the parser: a named function's output *is* its arguments object;
``required`` outputs a JSON array of ``{"name", "arguments"}`` objects (one at most when
``parallel_tool_calls`` is false). So even a small model always yields a call whose arguments
validate against the function's schema.
"""
from __future__ import annotations

import json
from typing import Optional

from sift.server.structured.spec import StructuredSpec

EMPTY_PARAMETERS = {"type": "object", "properties": {}}

_CALL_FORMAT = {
    "hermes": ("For each function call, return a JSON object with the function name and arguments within "
               "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
               "<args-json-object>}\n</tool_call>"),
    "json": ("To call a function, reply with only a JSON object of the form {\"name\": <function-name>, "
             "\"arguments\": <args-json-object>} and nothing else."),
}


def parameters_of(tool: dict) -> dict:
    return tool["function"].get("parameters") or EMPTY_PARAMETERS


def forced_call_spec(tools: list, tool_choice, parallel_tool_calls: bool) -> Optional[StructuredSpec]:
    """The constraint for ``required`` / a named function; None for ``auto`` / ``none``."""
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        tool = next(t for t in tools if t["function"]["name"] == name)
        return StructuredSpec.json_schema(parameters_of(tool))
    if tool_choice != "required":
        return None
    calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                               "arguments": parameters_of(t)},
              "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    schema = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return StructuredSpec.json_schema(schema)


def _arguments_object(arguments: str):
    try:
        return json.loads(arguments)
    except (json.JSONDecodeError, TypeError):
        return arguments


def render_messages(messages: list, tools: Optional[list], native: bool, parser: str) -> list:
    """Messages ready for ``apply_chat_template``. ``native``: the template renders tools, tool calls and
    tool results itself (arguments are handed over as objects, as HF templates expect)."""
    if native:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c["function"],
                                                      "arguments": _arguments_object(c["function"]["arguments"])}}
                                   for c in m["tool_calls"]]
            out.append(m)
        return out
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [json.dumps({"name": c["function"]["name"],
                                 "arguments": _arguments_object(c["function"]["arguments"])}) for c in m["tool_calls"]]
            written = "\n".join(f"<tool_call>\n{c}\n</tool_call>" for c in calls) if parser == "hermes" \
                else "\n".join(calls)
            out.append({"role": "assistant", "content": (content + "\n" if content else "") + written})
        elif role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({"role": role, "content": content})
    if tools:
        listing = "\n".join(json.dumps(t["function"]) for t in tools)
        prompt = ("You are a function calling AI model. You are provided with function signatures within "
                  f"<tools></tools> XML tags:\n<tools>\n{listing}\n</tools>\n{_CALL_FORMAT[parser]}")
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out
