"""The app in-process over a fake engine (#27): the watchdog with a step made to hang, 5xx responses (request id,
one log record, the access log, /metrics), and the checks made before the body is read (401, then 413)."""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import httpx
import pytest

from sift.server.api.app import build_app
from sift.server.config import EngineConfig, ServerConfig
from sift.server.engine.async_engine import AsyncEngine
from sift.server.engine.outputs import RequestOutput

STALL_TIMEOUT = 0.5
API_KEY = "k-123"


class FakeTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        if "explode" in text:
            raise RuntimeError("tokenizer exploded")
        return [1 + ord(c) % 50 for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(97 + i % 26) for i in ids)

    template_renders_tools = False

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True, template_kwargs=None,
                            tools=None) -> str:
        return "".join(m["content"] for m in messages)


class FakeEngine:
    """One token per step per request (token k at step k)."""

    tokenizer = FakeTokenizer()
    model_name = "fake"
    max_model_len = 64
    vocab_size = 100

    def __init__(self) -> None:
        self.requests: dict = {}
        self.current_step_ids: tuple = ()

    def add_request(self, request_id, prompt_token_ids, params, priority=0) -> None:
        params.validate_for_model(self.vocab_size, len(prompt_token_ids), self.max_model_len)
        self.requests[request_id] = [params.max_tokens, 0, len(prompt_token_ids)]

    def abort_request(self, request_id) -> None:
        self.requests.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list:
        self.current_step_ids = tuple(self.requests)
        outputs = []
        for request_id, state in list(self.requests.items()):
            state[1] += 1
            finished = state[1] >= state[0]
            if finished:
                del self.requests[request_id]
            outputs.append(RequestOutput(request_id, [state[1]], "x", [], finished,
                                         "length" if finished else None, state[2], state[1]))
        return outputs

    def stats(self) -> dict:
        return {"num_running": len(self.requests), "num_waiting": 0}


def serve(scenario, fake: FakeEngine, **server):
    """Run ``scenario(client, engine)`` against the app, its engine started (no lifespan in ASGITransport)."""
    config = EngineConfig(server=ServerConfig(**server))

    async def main():
        engine = AsyncEngine(config, engine_factory=lambda: fake)
        app = build_app(engine, config)
        engine.start()
        await engine.wait_loaded()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sift",
                                         timeout=30) as client:
                return await scenario(client, engine)
        finally:
            await engine.shutdown()
    return asyncio.run(main())


def test_a_hung_step_turns_ready_and_health_503_within_the_stall_timeout(monkeypatch, caplog):
    fake = FakeEngine()
    release = threading.Event()
    real_step = fake.step

    def hanging_step():  # the first step hangs until released, like a wedged kernel
        fake.current_step_ids = tuple(fake.requests)
        release.wait(30)
        monkeypatch.setattr(fake, "step", real_step)
        return real_step()

    monkeypatch.setattr(fake, "step", hanging_step)

    async def scenario(client, engine):
        assert (await client.get("/ready")).status_code == 200
        request = asyncio.create_task(client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3}))
        start = time.monotonic()
        while (ready := await client.get("/ready")).status_code == 200:
            assert time.monotonic() - start < STALL_TIMEOUT + 5, "the stall was never reported"
            await asyncio.sleep(0.05)
        assert time.monotonic() - start >= STALL_TIMEOUT * 0.9  # not before the configured time either
        assert ready.json()["status"] == "stalled"
        health = await client.get("/health")
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "stalled" and body["error"]["code"] == "engine_stalled"
        [step_id] = body["step_request_ids"]
        assert step_id.startswith("cmpl-")
        refused = await client.post("/v1/completions", json={"prompt": [1], "max_tokens": 1})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_stalled"
        await asyncio.sleep(0.3)  # a watchdog tick: the log line
        stalled_logs = [r for r in caplog.records if "engine stalled" in r.getMessage()]
        assert len(stalled_logs) == 1 and step_id in stalled_logs[0].getMessage()
        release.set()  # progress again: ready, and the request completes
        response = await request
        assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] == "length"
        assert (await client.get("/ready")).status_code == 200
        assert (await client.get("/health")).json() == {"status": "ok"}

    with caplog.at_level(logging.INFO):
        serve(scenario, fake, engine_stall_timeout=STALL_TIMEOUT)


def test_a_5xx_carries_the_request_id_is_logged_once_and_counted(caplog):
    async def scenario(client, engine):
        response = await client.post("/v1/completions", json={"prompt": "explode", "max_tokens": 2},
                                     headers={"X-Request-Id": "req-500"})
        assert response.status_code == 500
        assert response.headers["x-request-id"] == "req-500"
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert "exploded" not in response.text  # the traceback stays in the log
        fresh = await client.post("/v1/completions", json={"prompt": "fine", "max_tokens": 2})
        assert fresh.status_code == 200 and fresh.headers["x-request-id"]
        return engine.registry.get_sample_value(
            "sift:http_server_errors_total", {"model_name": "fake", "status": "500", "endpoint": "/v1/completions"})

    with caplog.at_level(logging.INFO):
        count = serve(scenario, FakeEngine())
    assert count == 1
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "req-500" in tracebacks[0].getMessage()
    access = [r.getMessage() for r in caplog.records if r.name == "sift.access" and "req-500" in r.getMessage()]
    assert len(access) == 1 and '"POST /v1/completions" 500' in access[0]
    assert [r.levelno for r in caplog.records if r.name == "sift.access" and " 500 " in r.getMessage()] == [
        logging.ERROR]


@pytest.mark.parametrize("case", ["malformed", "oversized", "oversized-chunked", "authorized-oversized",
                                  "authorized-oversized-chunked", "authorized-malformed"])
def test_the_api_key_is_checked_before_the_body_then_its_size(case):
    limit = 4096
    headers = {"content-type": "application/json"}
    if case.startswith("authorized"):
        headers["authorization"] = f"Bearer {API_KEY}"
    body = b'{"prompt": "hi", ' if case.endswith("malformed") else b'{"prompt": "' + b"a" * (2 * limit) + b'"}'

    async def chunks():
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    async def scenario(client, engine):
        content = chunks() if case.endswith("chunked") else body
        return await client.post("/v1/completions", content=content, headers=headers)

    response = serve(scenario, FakeEngine(), api_key=API_KEY, max_request_body_bytes=limit)
    expected = {"malformed": 401, "oversized": 401, "oversized-chunked": 401, "authorized-oversized": 413,
                "authorized-oversized-chunked": 413, "authorized-malformed": 400}[case]
    assert response.status_code == expected, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_drain_timeout_ends_streams_with_an_openai_finish_reason_and_an_error_event(monkeypatch):
    fake = FakeEngine()
    real_step = fake.step
    monkeypatch.setattr(fake, "step", lambda: (time.sleep(0.05), real_step())[1])  # 60 tokens take 3 s

    async def scenario(client, engine):
        body = {"prompt": [1, 2], "max_tokens": 60, "stream": True}
        streaming = asyncio.create_task(client.post("/v1/completions", json=body))
        chat = asyncio.create_task(client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "stream": False}))
        while engine.num_in_flight < 2:
            assert not streaming.done() and not chat.done(), (streaming.done() and streaming.result().text)
            await asyncio.sleep(0.01)
        assert await engine.drain(timeout=0.1) is False  # neither can finish in time: aborted
        return await streaming, await chat

    streamed, whole = serve(scenario, fake)
    events = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    reasons = [c["finish_reason"] for e in events for c in e.get("choices", ()) if c["finish_reason"]]
    assert reasons == ["length"]  # not "abort", which OpenAI clients do not know
    assert events[-1]["error"]["code"] == "aborted"
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert whole.status_code == 200 and whole.json()["choices"][0]["finish_reason"] == "length"


def test_large_bodies_are_decoded_off_the_loop_and_malformed_ones_still_get_400():
    text = "a" * 200_000  # above OffLoopJSONRoute.OFF_LOOP_BYTES

    async def scenario(client, engine):
        ok = await client.post("/tokenize", json={"prompt": text})
        bad = await client.post("/tokenize", content=b'{"prompt": "' + text.encode() + b'"',
                                headers={"content-type": "application/json"})
        return ok, bad

    ok, bad = serve(scenario, FakeEngine())
    assert ok.status_code == 200 and ok.json()["count"] == len(text)
    assert bad.status_code == 400 and bad.json()["error"]["message"] == "request body is not valid JSON"
