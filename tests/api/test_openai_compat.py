"""Must-shows 1 and 2: unmodified clients work; streaming equals non-streaming; usage is exact."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai

from sift.clients.sdk import AsyncClient, ChatCompletion, Client, Completion

PROMPT = "The capital of France is"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def test_openai_package_sync_async_and_streaming(server, model_name):
    client = openai.OpenAI(base_url=server.v1, api_key="unused")
    assert [m.id for m in client.models.list()] == [model_name]

    done = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=5, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == done.choices[0].text

    chat = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant"

    async def run_async() -> tuple[str, str]:
        aclient = openai.AsyncOpenAI(base_url=server.v1, api_key="unused")
        full = await aclient.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=5,
                                                     temperature=0)
        parts = []
        async for chunk in await aclient.chat.completions.create(model=model_name, messages=MESSAGES,
                                                                 max_tokens=5, temperature=0, stream=True):
            parts.extend(c.delta.content or "" for c in chunk.choices)
        await aclient.close()
        return full.choices[0].message.content, "".join(parts)

    full, joined = asyncio.run(run_async())
    assert full == joined == chat.choices[0].message.content


def test_our_sdk_sync_and_async(server, model_name):
    with Client(server.v1) as client:
        assert [m.id for m in client.models.list()] == [model_name]
        done = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=4, temperature=0)
        assert isinstance(done, Completion) and done.usage.completion_tokens == 4
        chunks = list(client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=4,
                                                     temperature=0, stream=True))
        assert all(isinstance(c, ChatCompletion) for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    async def run_async():
        async with AsyncClient(server.v1) as client:
            full = await client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=4,
                                                        temperature=0)
            parts = [c.choices[0].text async for c in await client.completions.create(
                model=model_name, prompt=PROMPT, max_tokens=4, temperature=0, stream=True) if c.choices]
            return full, "".join(parts)

    full, async_streamed = asyncio.run(run_async())
    assert full.choices[0].message.content == streamed
    assert async_streamed == done.choices[0].text


def _sse_events(response: httpx.Response) -> list:
    events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_stream_equals_non_stream_and_usage_is_exact(server, model_name):
    body = {"model": model_name, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "logprobs": 0}
    full = httpx.post(server.v1 + "/completions", json=body, timeout=120).json()
    with httpx.stream("POST", server.v1 + "/completions", timeout=120,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = _sse_events(r)
    *chunks, usage_chunk = events
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert all(c["usage"] is None for c in chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == full["usage"]

    prompt_ids = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    tokens = full["choices"][0]["logprobs"]["tokens"]
    usage = full["usage"]
    assert usage["prompt_tokens"] == len(prompt_ids)
    assert usage["completion_tokens"] == len(tokens) <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert "".join(tokens) == full["choices"][0]["text"]


def test_n2_streams_two_indexed_choices(server, model_name):
    body = {"model": model_name, "messages": MESSAGES, "max_tokens": 6, "temperature": 1.0, "seed": 7, "n": 2}
    full = httpx.post(server.v1 + "/chat/completions", json=body, timeout=120).json()
    assert [c["index"] for c in full["choices"]] == [0, 1]
    with httpx.stream("POST", server.v1 + "/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        events = _sse_events(r)
    texts, roles, finishes = {0: "", 1: ""}, {}, {}
    for event in events:
        (choice,) = event["choices"]
        index, delta = choice["index"], choice["delta"]
        if "role" in delta:
            assert index not in roles and not texts[index]  # the role chunk comes first
            roles[index] = delta["role"]
        texts[index] += delta.get("content") or ""
        if choice["finish_reason"]:
            finishes[index] = choice["finish_reason"]
    assert roles == {0: "assistant", 1: "assistant"}
    assert set(finishes) == {0, 1}
    # seeded sampling (seed + i per choice) reproduces the non-streamed choices
    assert [texts[0], texts[1]] == [c["message"]["content"] for c in full["choices"]]
    if all(c["finish_reason"] == "length" for c in full["choices"]):
        assert full["usage"]["completion_tokens"] == 2 * 6


def test_technique_options_pass_through_the_openai_client(server, model_name, read_metric):
    """A per-request technique option (Loki sparse decode) rides in the official client's extra_body and runs:
    every decode step after the first token attends sparsely."""
    client = openai.OpenAI(base_url=server.v1, api_key="unused")
    before = read_metric(server, "sift:sparse_decode_tokens_total")
    out = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=5, temperature=0,
                                    extra_body={"sparsity": {"method": "loki", "budget": 4, "rank": 8}})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5
    assert read_metric(server, "sift:sparse_decode_tokens_total") == before + 4
