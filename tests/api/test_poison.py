"""No request may harm another (#27): poison bodies built from the request schemas while 6 streams run, a
schema-driven fuzz over the POST endpoints, a 5 MB body next to /health, the body limit, and the 400s that
used to be 500s. One module-scoped server serves them all.
"""
from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import typing
from typing import Literal

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from sift.server.api.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

BODY_LIMIT = 8 * 2**20
VICTIMS, VICTIM_TOKENS = 6, 256
COMPLETIONS, CHAT, TOKENIZE, DETOKENIZE = "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"
MESSAGES = [{"role": "user", "content": "Hi"}]

# a technique option is only read under some methods: poison it where it is read
METHOD_FOR = {"kv_eviction": {"sinks": "streaming", None: "h2o"},
              "sparsity": {"window": "window", "sinks": "window", "rank": "loki", None: "tidal"},
              "token_skipping": {None: "spts"}, "speculative": {None: "ngram"}}
INT_POISONS = [2**64, 2**63, -1, 1e300, math.nan, math.inf, "x", 0.5]
FLOAT_POISONS = [1e300, -1, math.nan, math.inf, -math.inf, "x"]


@pytest.fixture(scope="module")
def server(launch_server):
    srv = launch_server("--max-request-body-bytes", str(BODY_LIMIT), "--num-kv-blocks", "400")
    yield srv
    srv.stop()


def numeric_fields(model: type[BaseModel], prefix: tuple = ()) -> list[tuple[tuple, type]]:
    """(path, int or float) of every numeric field of ``model``, nested option objects included."""
    found = []
    for name, info in model.model_fields.items():
        path = (*prefix, info.alias or name)
        todo, kind = [info.annotation], None
        while todo:
            t = todo.pop()
            if t is float or (t is int and kind is None):
                kind = t
            elif isinstance(t, type) and issubclass(t, BaseModel):
                found += numeric_fields(t, path)
            elif typing.get_origin(t) is not Literal:
                todo += [a for a in typing.get_args(t) if a is not type(None)]
        if kind is not None:
            found.append((path, kind))
    return found


def place(path: tuple, value) -> dict:
    """The request fields that put ``value`` at ``path`` (with a method that reads it, in a list or map where the
    field is one)."""
    top, leaf = path[0], path[-1]
    if top in ("stop_token_ids", "tokens") or leaf == "reselection_layer":
        value = [value]
    elif top == "prompt":
        value = [1, value]
    elif top == "logit_bias":
        value = {"5": value}
    if len(path) == 1:
        return {top: value}
    method = METHOD_FOR[top].get(leaf, METHOD_FOR[top][None])
    if path[1] == "relaxed":
        return {top: {"method": method, "relaxed": {"k": 1, leaf: value}}}
    return {top: {"method": method, leaf: value}}


def poisons() -> list[tuple[str, str, dict]]:
    """(endpoint, field, body): every numeric field of every request model, each poison value."""
    chat_only = set(ChatCompletionRequest.model_fields) - set(CompletionRequest.model_fields)
    cases = []
    for model, endpoint, base in ((CompletionRequest, COMPLETIONS, {"prompt": "Hi", "max_tokens": 1}),
                                  (ChatCompletionRequest, CHAT, {"messages": MESSAGES, "max_tokens": 1}),
                                  (TokenizeRequest, TOKENIZE, {"prompt": "Hi"}),
                                  (DetokenizeRequest, DETOKENIZE, {"tokens": [1, 2]})):
        for path, kind in numeric_fields(model):
            if model is ChatCompletionRequest and path[0] not in chat_only:
                continue  # shared sampling fields: poisoned once, through completions
            for value in INT_POISONS if kind is int else FLOAT_POISONS:
                cases.append((endpoint, ".".join(path), {**base, **place(path, value)}))
    for key in ("-1", "99999999", str(2**64), "x", "\ud800"):  # logit_bias keys are token ids
        cases.append((COMPLETIONS, "logit_bias", {"prompt": "Hi", "max_tokens": 2, "logit_bias": {key: 1}}))
    # the issue's own bodies
    cases += [
        (COMPLETIONS, "kv_eviction.budget", {"prompt": "hi", "max_tokens": 4,
                                             "kv_eviction": {"method": "h2o", "budget": 1e300}}),
        (COMPLETIONS, "top_k", {"prompt": "hi", "max_tokens": 4, "top_k": 2**63, "temperature": 1}),
        (COMPLETIONS, "sparsity.window", {"prompt": "hi", "max_tokens": 4,
                                          "sparsity": {"method": "window", "window": 2**70}}),
        (COMPLETIONS, "seed", {"prompt": "hi", "max_tokens": 2, "seed": 2**63}),
        (COMPLETIONS, "temperature", {"prompt": "hi", "max_tokens": 2, "temperature": math.nan}),
        (COMPLETIONS, "prompt", {"prompt": "x \ud800", "max_tokens": 2}),
        (CHAT, "messages", {"messages": [{"role": "user", "content": "x \ud800"}], "max_tokens": 2}),
        (TOKENIZE, "messages", {"messages": []}),
        (COMPLETIONS, "n", {"prompt": ["hi"] * 100, "n": 16, "max_tokens": 1}),  # 1600 > the queue of 1024
    ]
    return cases


def encode(body: dict) -> bytes:
    return json.dumps(body, allow_nan=True).encode()  # NaN and Infinity as Python's JSON parser reads them


async def stream_victim(client: httpx.AsyncClient, k: int, decoding: asyncio.Event) -> dict:
    body = {"prompt": f"Count to a thousand, stream {k}: 1, 2, 3,", "max_tokens": VICTIM_TOKENS, "stream": True,
            "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    result = {"finish_reason": None, "tokens": 0, "errors": []}
    async with client.stream("POST", COMPLETIONS, json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                result["errors"].append(chunk["error"])
            for choice in chunk.get("choices", ()):
                result["finish_reason"] = choice["finish_reason"] or result["finish_reason"]
                decoding.set()
            if chunk.get("usage"):
                result["tokens"] = chunk["usage"]["completion_tokens"]
    result["done_at"] = time.monotonic()
    return result


def test_poisons_harm_no_victim(server):
    cases = poisons()
    assert len(cases) > 250  # built from the schemas: every numeric field x every poison value

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            decoding = [asyncio.Event() for _ in range(VICTIMS)]
            victims = [asyncio.create_task(stream_victim(client, k, d)) for k, d in enumerate(decoding)]
            await asyncio.gather(*(d.wait() for d in decoding))  # every victim is decoding
            limit = asyncio.Semaphore(8)

            async def send(case):
                async with limit:
                    endpoint, _, body = case
                    return await client.post(endpoint, content=encode(body),
                                             headers={"content-type": "application/json"})
            poisons_started = time.monotonic()
            responses = await asyncio.gather(*(send(c) for c in cases))
            return responses, await asyncio.gather(*victims), poisons_started

    responses, victims, poisons_started = asyncio.run(main())
    failures = []
    for (endpoint, field, body), response in zip(cases, responses):
        if 200 <= response.status_code < 300:
            continue  # a legal value
        error = response.json().get("error", {})
        named = (error.get("param") or "").startswith(field) or field in error.get("message", "")
        if not 400 <= response.status_code < 500 or not named:
            failures.append((endpoint, field, encode(body)[:160], response.status_code, error))
    assert not failures, failures[:10]
    for victim in victims:
        assert victim["finish_reason"] == "length" and victim["tokens"] == VICTIM_TOKENS, victim
        assert not victim["errors"]
    assert min(v["done_at"] for v in victims) > poisons_started, "a victim ended before the poisons began"
    fresh = httpx.post(server.url + COMPLETIONS, json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
    assert fresh.status_code == 200 and fresh.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("endpoint,body,param", [
    (COMPLETIONS, {"prompt": "x \ud800", "max_tokens": 2}, "prompt"),
    (COMPLETIONS, {"prompt": ["ok", "y\udc00"], "max_tokens": 2}, "prompt.1"),
    (CHAT, {"messages": [{"role": "user", "content": "x \ud800"}]}, "messages.0.content"),
    (TOKENIZE, {"prompt": "\ud800"}, "prompt"),
    (TOKENIZE, {"messages": []}, "messages"),
    (CHAT, {"messages": []}, "messages"),
])
def test_lone_surrogates_and_empty_messages_are_400(server, endpoint, body, param):
    response = httpx.post(server.url + endpoint, content=encode(body), headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_n_alone_beyond_the_queue_is_400_not_429(server):
    response = httpx.post(server.url + COMPLETIONS, json={"prompt": ["a"] * 65, "n": 16, "max_tokens": 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"
    assert "retry-after" not in response.headers


# ---- large bodies -------------------------------------------------------------------------------------------

def health_latencies_while(server, post) -> tuple[list, httpx.Response]:
    """Latencies of /health polled while ``post()`` runs in another thread, and its response."""
    result = {}
    worker = threading.Thread(target=lambda: result.update(response=post()))
    latencies = []
    with httpx.Client(base_url=server.url, timeout=10) as client:
        client.get("/health")  # connection open before the clock starts
        worker.start()
        while worker.is_alive():
            start = time.perf_counter()
            assert client.get("/health").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.01)
    worker.join()
    return latencies, result["response"]


def test_a_5mb_body_leaves_health_responsive_and_a_larger_one_gets_413(server):
    text = "The quick brown fox jumps over the lazy dog. " * (5_000_000 // 45)
    for endpoint, body in ((COMPLETIONS, {"prompt": text, "max_tokens": 4}),
                           (CHAT, {"messages": [{"role": "user", "content": text}], "max_tokens": 4})):
        payload = encode(body)
        assert 5_000_000 <= len(payload) < BODY_LIMIT
        latencies, response = health_latencies_while(server, lambda: httpx.post(
            server.url + endpoint, content=payload, headers={"content-type": "application/json"}, timeout=120))
        assert response.status_code == 400 and "context length" in response.json()["error"]["message"]
        assert latencies and max(latencies) < 0.1, (endpoint, max(latencies))
    # tokenized for real (in a worker thread): 1 MB through /tokenize
    small = text[:1_000_000]
    latencies, response = health_latencies_while(server, lambda: httpx.post(
        server.url + TOKENIZE, json={"prompt": small}, timeout=120))
    assert response.status_code == 200 and response.json()["count"] > 100_000
    assert latencies and max(latencies) < 0.1, max(latencies)
    too_big = encode({"prompt": "a" * (BODY_LIMIT + 1)})
    response = httpx.post(server.url + COMPLETIONS, content=too_big, headers={"content-type": "application/json"},
                          timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


# ---- fuzz ---------------------------------------------------------------------------------------------------

EDGE_NUMBERS = st.sampled_from([0, 1, -1, 2, 16, 17, 511, 512, 513, 2**31, 2**63, 2**64, -(2**63) - 1, 0.5, 1e300,
                                -1e300, math.nan, math.inf, -math.inf, 1e-320])
JUNK = st.one_of(st.none(), st.booleans(), EDGE_NUMBERS, st.text(max_size=8), st.just("\ud800"),
                 st.lists(st.integers(-5, 5), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def value_strategy(annotation) -> st.SearchStrategy:
    """Values of the annotated type, edge cases first, mixed with values of the wrong type."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return model_strategy(annotation)
    if origin is Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return st.one_of([value_strategy(a) for a in args])
    if origin is list:
        return st.lists(value_strategy(args[0]), max_size=3)
    if origin is dict:
        return st.dictionaries(st.one_of(st.integers(-3, 70000).map(str), st.text(max_size=3)),
                               value_strategy(args[1]), max_size=3)
    if annotation is type(None):
        return st.none()
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.one_of(EDGE_NUMBERS, st.integers(-(2**70), 2**70))
    if annotation is float:
        return st.one_of(EDGE_NUMBERS, st.floats(allow_nan=True, allow_infinity=True))
    if annotation is str:
        return st.text(max_size=12)
    return JUNK


def model_strategy(model: type[BaseModel]) -> st.SearchStrategy:
    fields = {info.alias or name: st.one_of(value_strategy(info.annotation), JUNK)
              for name, info in model.model_fields.items()}
    return st.fixed_dictionaries({}, optional=fields)


def short(body):
    """Keep fuzzed generation short (length is the poison suite's business): valid token counts capped at 8."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and 8 < value <= 512:
                body[key] = 8
        body.setdefault("max_tokens", 4)
    return body


FUZZ_BODIES = st.one_of(
    st.tuples(st.just(COMPLETIONS), model_strategy(CompletionRequest).map(short)),
    st.tuples(st.just(CHAT), model_strategy(ChatCompletionRequest).map(short)),
    st.tuples(st.just(TOKENIZE), model_strategy(TokenizeRequest)),
    st.tuples(st.just(DETOKENIZE), model_strategy(DetokenizeRequest)),
    st.tuples(st.sampled_from([COMPLETIONS, CHAT, TOKENIZE, DETOKENIZE]), JUNK),
)


def test_fuzzed_post_bodies_never_get_a_5xx(server):
    seen = []

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(FUZZ_BODIES)
    def check(case):
        endpoint, body = case
        response = httpx.post(server.url + endpoint, content=encode(body),
                              headers={"content-type": "application/json"}, timeout=60)
        seen.append(response.status_code)
        assert response.status_code < 500, (endpoint, encode(body)[:300], response.text[:300])

    check()
    assert any(200 <= s < 300 for s in seen) and any(s == 400 for s in seen)  # both sides were explored
    assert httpx.get(server.url + "/ready", timeout=10).status_code == 200
