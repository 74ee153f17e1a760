"""Structured outputs and tool calling through the official ``openai`` client on a real server.

Must-shows of issue 28: twenty JSON Schemas validate (temperature 0 and 0.8, streamed and not,
n=2), ``parse()`` with a pydantic model, choice and regex, tool calls (two turns; required and
named validate against the function schema; none never calls), 400s for unknown fields and
uncompilable constraints, and a constrained request leaves its batch mates' outputs unchanged.
Requests run concurrently so the whole file stays short.
"""
from __future__ import annotations

import asyncio
import json
import re
from typing import Annotated

import httpx
import jsonschema
import pytest
from openai import AsyncOpenAI, OpenAI
from pydantic import BaseModel, Field

from structured_schemas import SCHEMAS

CONCURRENCY = 12
MODEL = ""


@pytest.fixture(scope="module", autouse=True)
def _served_model(model_name):
    global MODEL
    MODEL = model_name


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=600)


def run_all(server, calls):
    """Run ``calls`` (functions of an AsyncOpenAI client returning coroutines) concurrently, bounded."""
    async def main():
        aclient = AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=600)
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(call):
            async with gate:
                return await call(aclient)
        try:
            return await asyncio.gather(*(one(c) for c in calls))
        finally:
            await aclient.close()
    return asyncio.run(main())


async def collect_stream(stream) -> dict:
    """{choice index: (text, finish_reason)} from a chat stream."""
    out: dict = {}
    async for chunk in stream:
        for ch in chunk.choices:
            text, reason = out.get(ch.index, ("", None))
            out[ch.index] = (text + (ch.delta.content or ""), ch.finish_reason or reason)
    return out


def schema_request(name: str, schema: dict, temperature: float, stream: bool):
    async def call(c: AsyncOpenAI):
        kwargs = dict(model=MODEL, n=2, temperature=temperature, max_tokens=220, seed=7,
                      messages=[{"role": "user", "content": f"Write an example {name.replace('_', ' ')} record."}],
                      response_format={"type": "json_schema",
                                       "json_schema": {"name": name, "schema": schema, "strict": True}})
        if stream:
            got = await collect_stream(await c.chat.completions.create(stream=True, **kwargs))
            return [got[i] for i in sorted(got)]
        resp = await c.chat.completions.create(**kwargs)
        return [(ch.message.content, ch.finish_reason) for ch in resp.choices]
    return call


def test_twenty_json_schemas_validate(server, model_name):
    # every schema runs at temperature 0 and 0.8 with n=2; which of the two is streamed alternates, so all
    # four (temperature, stream) pairs are covered across the schemas
    cases = [(name, t, (i + j) % 2 == 0) for i, name in enumerate(SCHEMAS) for j, t in enumerate((0.0, 0.8))]
    results = run_all(server, [schema_request(name, SCHEMAS[name], t, s) for name, t, s in cases])
    for (name, t, s), choices in zip(cases, results):
        assert len(choices) == 2
        for text, reason in choices:
            assert reason == "stop", (name, t, s, text)
            jsonschema.validate(json.loads(text), SCHEMAS[name])


class CalendarEvent(BaseModel):
    name: str = Field(max_length=30)
    day: int = Field(ge=1, le=31)
    participants: list[Annotated[str, Field(max_length=20)]] = Field(max_length=3)


def test_sdk_parse_returns_a_parsed_object(client):
    completion = client.chat.completions.parse(
        model=MODEL, temperature=0, max_tokens=150,
        messages=[{"role": "user", "content": "Alice and Bob go to a science fair on Friday the 5th."}],
        response_format=CalendarEvent)
    event = completion.choices[0].message.parsed
    assert isinstance(event, CalendarEvent)


def test_choice_and_regex_always_hold(server):
    choices = ["positive", "negative", "neutral"]
    regex = r"[A-Z][a-z]{2,8}-[0-9]{2,4}"

    def completion(extra, temperature):
        async def call(c):
            r = await c.completions.create(model=MODEL, prompt="Sentiment of 'I love it':", n=3, max_tokens=12, seed=0,
                                           temperature=temperature, extra_body={"structured_outputs": extra})
            return [ch.text for ch in r.choices]
        return call

    def chat(extra, temperature):
        async def call(c):
            got = await collect_stream(await c.chat.completions.create(
                model=MODEL, stream=True, n=2, max_tokens=12, temperature=temperature, seed=0,
                messages=[{"role": "user", "content": "Give a product code."}], extra_body={"structured_outputs": extra}))
            return [got[i][0] for i in sorted(got)]
        return call

    calls = [f({"choice": choices}, t) for f in (completion, chat) for t in (0.0, 1.0)]
    calls += [f({"regex": regex}, t) for f in (completion, chat) for t in (0.0, 1.0)]
    results = run_all(server, calls)
    for texts in results[:4]:
        assert all(t in choices for t in texts), texts
    for texts in results[4:]:
        assert all(re.fullmatch(regex, t) for t in texts), texts


def test_length_stop_and_logprobs_with_a_constraint(client):
    schema = {"type": "object", "properties": {"words": {"type": "array", "items": {"type": "string"}}},
              "required": ["words"]}
    r = client.completions.create(model=MODEL, prompt="List words:", max_tokens=5, temperature=0, logprobs=2,
                                  extra_body={"structured_outputs": {"json": schema}})
    ch = r.choices[0]
    assert ch.finish_reason == "length" and ch.text.startswith('{"words"')
    assert len(ch.logprobs.tokens) == 5 and all(len(top) == 2 for top in ch.logprobs.top_logprobs)
    r = client.completions.create(model=MODEL, prompt="Count:", max_tokens=30, temperature=0, stop=["3"],
                                  extra_body={"structured_outputs": {"regex": "1,2,3,4,5"}})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == "1,2,"


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}},
                   "required": ["timezone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def assert_valid_calls(calls, names=None):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


def test_required_named_and_none_tool_choice(server):
    named = {"type": "function", "function": {"name": "get_time"}}
    # seeded: with parallel calls allowed the grammar admits any number of calls, and an unseeded draw at
    # 0.8 runs past max_tokens about 1 time in 12 (finish_reason "length", correctly); seed 0 ends in time

    def call(tool_choice, temperature, parallel=True):
        async def run(c):
            return await c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice,
                                                   parallel_tool_calls=parallel, max_tokens=200, n=2,
                                                   temperature=temperature, seed=0)
        return run

    cases = [("required", t, p) for t in (0.0, 0.8) for p in (True, False)] + [(named, t, True) for t in (0.0, 0.8)]
    cases += [("none", t, True) for t in (0.0, 0.8)]
    results = run_all(server, [call(*c) for c in cases])
    for (choice, _, parallel), resp in zip(cases, results):
        for ch in resp.choices:
            if choice == "none":
                assert not ch.message.tool_calls and ch.message.content is not None
                continue
            assert ch.finish_reason == "tool_calls" and ch.message.content is None
            assert_valid_calls(ch.message.tool_calls, {"get_time"} if choice is named else None)
            if not parallel:
                assert len(ch.message.tool_calls) == 1


def test_two_turn_tool_conversation(client):
    for stream in (False, True):
        first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                               temperature=0, max_tokens=120, stream=stream)
        if stream:
            calls: dict = {}
            reason = None
            for chunk in first:
                for ch in chunk.choices:
                    reason = ch.finish_reason or reason
                    for d in ch.delta.tool_calls or ():
                        entry = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
                        entry["arguments"] += d.function.arguments or ""
            assert reason == "tool_calls" and calls
            tool_calls = [{"id": c["id"], "type": "function",
                           "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls.values()]
            assistant = {"role": "assistant", "content": None, "tool_calls": tool_calls}
        else:
            message = first.choices[0].message
            assert_valid_calls(message.tool_calls)
            assistant, tool_calls = message, [c.model_dump() for c in message.tool_calls]
        history = ASK + [assistant] + [{"role": "tool", "tool_call_id": c["id"],
                                        "content": json.dumps({"temperature": 18, "unit": "celsius"})}
                                       for c in tool_calls]
        final = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                               temperature=0, max_tokens=40, stream=stream)
        if stream:
            text = "".join(ch.choices[0].delta.content or "" for ch in final if ch.choices)
        else:
            assert final.choices[0].message.tool_calls is None
            text = final.choices[0].message.content
        assert text.strip()


def test_named_tool_call_streams_arguments(client):
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=80,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            stream=True)
    deltas = [d for chunk in stream for ch in chunk.choices for d in ch.delta.tool_calls or ()]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), SCHEMA_OF["get_weather"])


@pytest.mark.parametrize("path,body,param,needle", [
    ("/completions", {"prompt": "x", "frobnicate": 1}, "frobnicate", "unrecognized"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x", "colour": "red"}]}, "messages.0.colour",
     "unrecognized"),
    ("/completions", {"prompt": "x", "guided_json": {"type": "object"}}, "guided_json", "structured_outputs.json"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "audio": {"voice": "alloy"}}, "audio",
     "not supported"),
    ("/completions", {"prompt": "x", "tools": [WEATHER]}, "tools", "unrecognized"),
    ("/completions", {"prompt": "x", "structured_outputs": {"regex": "((("}}, "structured_outputs.regex",
     "parenthesis"),
    ("/completions", {"prompt": "x", "structured_outputs": {"grammar": "root ::= "}}, "structured_outputs.grammar",
     "cannot compile"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", "properties": {
            "a": {"$ref": "#/definitions/missing"}}}}}}, "response_format.json_schema.schema", "cannot compile"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER],
                           "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice",
     "requires tools"),
    ("/completions", {"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs",
     "exactly one"),
])
def test_unsupported_and_uncompilable_are_400(server, path, body, param, needle):
    r = httpx.post(server.v1 + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert needle in err["message"], err["message"]


def test_ignored_fields_are_accepted(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, user="u1", store=False,
                                       metadata={"k": "v"}, service_tier="auto")
    assert r.choices[0].message.content is not None


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "The three primary colours are"]


def test_constrained_request_leaves_batch_mates_unchanged(server, read_metric):
    def plain(prompt):
        async def call(c):
            r = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
            return r.choices[0].text
        return call

    def constrained(temperature):
        # greedy: any JSON object; sampled: a bounded schema, so it surely finishes within max_tokens
        fmt = {"type": "json_object"} if temperature == 0 else {
            "type": "json_schema", "json_schema": {"name": "light", "schema": SCHEMAS["traffic_light"]}}
        async def call(c):
            r = await c.completions.create(model=MODEL, prompt="A person as JSON:", max_tokens=60,
                                           temperature=temperature,
                                           extra_body={"response_format": fmt, "speculative": {"method": "ngram"}})
            return r.choices[0].text
        return call

    solo = [run_all(server, [plain(p)])[0] for p in PROMPTS]
    disabled_before = read_metric(server, "sift:structured_spec_disabled_total")
    mixed = run_all(server, [constrained(0.0), *[plain(p) for p in PROMPTS], constrained(0.9)])
    assert mixed[1:-1] == solo
    for text in (mixed[0], mixed[-1]):
        assert isinstance(json.loads(text), dict)
    assert read_metric(server, "sift:structured_spec_disabled_total") == disabled_before + 2
    assert read_metric(server, "sift:structured_requests_total") >= 2
    assert read_metric(server, "sift:grammar_compile_seconds_count") >= 1
    assert read_metric(server, "sift:structured_mask_seconds_total") > 0


def test_constraint_composes_with_kv_eviction_and_sparsity(client):
    schema = SCHEMAS["movie"]
    for extra in ({"kv_eviction": {"method": "streaming", "budget": 24, "window": 8}},
                  {"sparsity": {"method": "window", "window": 16}}):
        r = client.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=120, extra_body=extra,
            messages=[{"role": "user", "content": "Describe a movie you like, with its year and genres."}],
            response_format={"type": "json_schema", "json_schema": {"name": "movie", "schema": schema}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
