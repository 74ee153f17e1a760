"""The SDK's error mapping and retry policy, against scripted transports (no server)."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from sift.clients.sdk import (APIConnectionError, AsyncClient, BadRequestError, Client, RateLimitError,
                         ServiceUnavailableError)

COMPLETION = {"id": "c", "object": "text_completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "text": "hi", "finish_reason": "length"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def error(status: int, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(status, headers=headers, json={"error": {"message": f"status {status}", "type": "t",
                                                                   "param": None, "code": None}})


def scripted(responses: list, calls: list):
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        item = responses.pop(0)
        if isinstance(item, Exception):
            raise item
        return item
    return handler


def test_retries_429_honouring_retry_after_then_succeeds(monkeypatch):
    slept: list = []
    monkeypatch.setattr("sift.clients.sdk.time.sleep", slept.append)
    calls: list = []
    transport = httpx.MockTransport(scripted([error(429, "3"), error(503), httpx.Response(200, json=COMPLETION)],
                                             calls))
    client = Client("http://x/v1", api_key="k", max_retries=2, backoff=0.25,
                    http_client=httpx.Client(transport=transport))
    out = client.completions.create(model="m", prompt="p", max_tokens=1)
    assert out.choices[0].text == "hi" and out.usage.total_tokens == 2
    assert len(calls) == 3 and calls[0].headers["authorization"] == "Bearer k"
    assert slept[0] == 3.0  # Retry-After wins over the backoff
    assert 0.25 <= slept[1] <= 0.5  # backoff * 2**1 with jitter in [0.5, 1)


def test_errors_map_to_exceptions_and_are_not_retried_when_permanent(monkeypatch):
    monkeypatch.setattr("sift.clients.sdk.time.sleep", lambda s: None)
    calls: list = []
    client = Client("http://x/v1", max_retries=3,
                    http_client=httpx.Client(transport=httpx.MockTransport(scripted([error(400)], calls))))
    with pytest.raises(BadRequestError) as info:
        client.completions.create(prompt="p")
    assert info.value.status_code == 400 and len(calls) == 1

    exhausted = Client("http://x/v1", max_retries=1, http_client=httpx.Client(
        transport=httpx.MockTransport(scripted([error(503), error(503)], []))))
    with pytest.raises(ServiceUnavailableError):
        exhausted.models.list()

    broken = Client("http://x/v1", max_retries=1, http_client=httpx.Client(transport=httpx.MockTransport(
        scripted([httpx.ConnectError("refused"), httpx.ConnectError("refused")], []))))
    with pytest.raises(APIConnectionError):
        broken.models.list()


def test_async_client_retries_and_maps(monkeypatch):
    async def no_sleep(seconds):
        return None

    monkeypatch.setattr("sift.clients.sdk.asyncio.sleep", no_sleep)

    async def main():
        ok = AsyncClient("http://x/v1", max_retries=1, http_client=httpx.AsyncClient(transport=httpx.MockTransport(
            scripted([error(429, "0"), httpx.Response(200, json=COMPLETION)], []))))
        assert (await ok.completions.create(prompt="p")).choices[0].text == "hi"
        limited = AsyncClient("http://x/v1", max_retries=0, http_client=httpx.AsyncClient(
            transport=httpx.MockTransport(scripted([error(429, "1")], []))))
        with pytest.raises(RateLimitError):
            await limited.completions.create(prompt="p")

    asyncio.run(main())
