"""A small client for Sift (or any OpenAI-compatible server), on httpx.

    from sift.clients.sdk import Client
    client = Client("http://127.0.0.1:8000/v1")
    reply = client.chat.completions.create(model="SmolLM2-135M-Instruct",
                                           messages=[{"role": "user", "content": "Hi"}])
    for chunk in client.completions.create(model=..., prompt="Once", stream=True):
        print(chunk.choices[0].text, end="")

``AsyncClient`` mirrors ``Client`` with ``await`` / ``async for``. Failures raise the
exceptions below, mapped from the HTTP status; 429, 503 and connection errors are retried
with exponential backoff, honouring ``Retry-After``. Independent of the ``server`` package.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field, fields
from typing import Any, AsyncIterator, Iterator, Optional

import httpx


# ---- errors -----------------------------------------------------------------------------

class APIError(Exception):
    def __init__(self, message: str, status_code: Optional[int] = None, body: Optional[dict] = None,
                 request_id: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.body = body
        self.request_id = request_id
        error = (body or {}).get("error") or {}
        self.type, self.code, self.param = error.get("type"), error.get("code"), error.get("param")


class BadRequestError(APIError): pass  # noqa: E701
class AuthenticationError(APIError): pass  # noqa: E701
class NotFoundError(APIError): pass  # noqa: E701
class RateLimitError(APIError): pass  # noqa: E701
class InternalServerError(APIError): pass  # noqa: E701
class ServiceUnavailableError(APIError): pass  # noqa: E701
class APIConnectionError(APIError): pass  # noqa: E701
class APITimeoutError(APIConnectionError): pass  # noqa: E701


_BY_STATUS = {400: BadRequestError, 401: AuthenticationError, 404: NotFoundError, 429: RateLimitError,
              500: InternalServerError, 503: ServiceUnavailableError}
_RETRY_STATUS = (429, 503)


def _error_from(response: httpx.Response, body: Optional[dict]) -> APIError:
    message = ((body or {}).get("error") or {}).get("message") or f"HTTP {response.status_code}"
    cls = _BY_STATUS.get(response.status_code, APIError)
    return cls(message, response.status_code, body, response.headers.get("x-request-id"))


# ---- typed responses ----------------------------------------------------------------------

def _build(cls, data: dict):
    """Dataclass from a JSON object, ignoring fields this SDK does not know."""
    return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass
class CompletionChoice:
    index: int
    text: str
    finish_reason: Optional[str] = None
    logprobs: Optional[dict] = None


@dataclass
class Completion:
    """Also the type of a streamed completion chunk (``usage`` only on the last one, if asked)."""

    id: str
    model: str
    created: int
    choices: list = field(default_factory=list)
    usage: Optional[Usage] = None
    object: str = "text_completion"

    @classmethod
    def parse(cls, data: dict) -> "Completion":
        obj = _build(cls, data)
        obj.choices = [_build(CompletionChoice, c) for c in data.get("choices", [])]
        obj.usage = _build(Usage, data["usage"]) if data.get("usage") else None
        return obj


@dataclass
class ChatMessage:
    role: Optional[str] = None
    content: Optional[str] = None


@dataclass
class ChatChoice:
    """``message`` in a full response, ``delta`` in a streamed chunk."""

    index: int
    message: Optional[ChatMessage] = None
    delta: Optional[ChatMessage] = None
    finish_reason: Optional[str] = None
    logprobs: Optional[dict] = None


@dataclass
class ChatCompletion:
    """Also the type of a streamed chunk (object ``chat.completion.chunk``)."""

    id: str
    model: str
    created: int
    choices: list = field(default_factory=list)
    usage: Optional[Usage] = None
    object: str = "chat.completion"

    @classmethod
    def parse(cls, data: dict) -> "ChatCompletion":
        obj = _build(cls, data)
        obj.choices = []
        for c in data.get("choices", []):
            choice = _build(ChatChoice, c)
            choice.message = _build(ChatMessage, c["message"]) if c.get("message") is not None else None
            choice.delta = _build(ChatMessage, c["delta"]) if c.get("delta") is not None else None
            obj.choices.append(choice)
        obj.usage = _build(Usage, data["usage"]) if data.get("usage") else None
        return obj


@dataclass
class Model:
    id: str
    created: int = 0
    owned_by: str = ""
    max_model_len: Optional[int] = None


# ---- transport-independent parts ----------------------------------------------------------

class _Base:
    def __init__(self, base_url: str, api_key: Optional[str], timeout: float, max_retries: int,
                 backoff: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("SIFT_API_KEY")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _delay(self, attempt: int, response: Optional[httpx.Response]) -> float:
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after is not None:
            try:
                return min(float(retry_after), 60.0)
            except ValueError:
                pass
        return self.backoff * (2 ** attempt) * (0.5 + random.random() / 2)

    @staticmethod
    def _payload(kwargs: dict) -> dict:
        return {k: v for k, v in kwargs.items() if v is not None}


def _json(response: httpx.Response) -> Optional[dict]:
    try:
        return response.json()
    except ValueError:
        return None


_DONE = object()


def _sse_data(line: str):
    """The JSON of one ``data:`` line, ``_DONE`` at ``[DONE]``, None for anything else."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return _DONE
    event = json.loads(data)
    if "error" in event:
        raise APIError(event["error"].get("message", "stream error"), None, event)
    return event


def _connection_error(exc: Exception) -> APIConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"request timed out: {exc}")
    return APIConnectionError(f"connection failed: {exc}")


# ---- sync -----------------------------------------------------------------------------------

class Stream:
    """Iterator over parsed chunks of one SSE response; closes the connection when done."""

    def __init__(self, response: httpx.Response, parse) -> None:
        self.response = response
        self._parse = parse

    def __iter__(self) -> Iterator:
        try:
            for line in self.response.iter_lines():
                event = _sse_data(line)
                if event is _DONE:
                    return
                if event is not None:
                    yield self._parse(event)
        finally:
            self.response.close()

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Client(_Base):
    def __init__(self, base_url: str = "http://127.0.0.1:8000/v1", api_key: Optional[str] = None,
                 timeout: float = 600.0, max_retries: int = 2, backoff: float = 0.5,
                 http_client: Optional[httpx.Client] = None) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, backoff)
        self._http = http_client or httpx.Client(timeout=timeout)
        self.completions = _Resource(self, "/completions", Completion.parse)
        self.chat = _Namespace(completions=_Resource(self, "/chat/completions", ChatCompletion.parse))
        self.models = _Models(self)

    def request(self, method: str, path: str, body: Optional[dict] = None, stream: bool = False):
        """The raw ``httpx.Response`` (open, when streaming) after retries; raises on error statuses."""
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                req = self._http.build_request(method, self.base_url + path, json=body, headers=self._headers())
                response = self._http.send(req, stream=stream)
            except httpx.TransportError as e:
                if last:
                    raise _connection_error(e) from e
                time.sleep(self._delay(attempt, None))
                continue
            if response.status_code < 400:
                return response
            if stream:
                response.read()
            if response.status_code in _RETRY_STATUS and not last:
                time.sleep(self._delay(attempt, response))
                continue
            raise _error_from(response, _json(response))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Namespace:
    def __init__(self, **attrs) -> None:
        self.__dict__.update(attrs)


class _Resource:
    def __init__(self, client, path: str, parse) -> None:
        self._client, self._path, self._parse = client, path, parse

    def create(self, **kwargs: Any):
        """OpenAI's parameters as keywords; ``stream=True`` returns an iterator of chunks."""
        body = _Base._payload(kwargs)
        if body.get("stream"):
            return Stream(self._client.request("POST", self._path, body, stream=True), self._parse)
        return self._parse(self._client.request("POST", self._path, body).json())


class _Models:
    def __init__(self, client) -> None:
        self._client = client

    def list(self) -> list:
        return [_build(Model, m) for m in self._client.request("GET", "/models").json()["data"]]


# ---- async ----------------------------------------------------------------------------------

class AsyncStream:
    def __init__(self, response: httpx.Response, parse) -> None:
        self.response = response
        self._parse = parse

    async def __aiter__(self) -> AsyncIterator:
        try:
            async for line in self.response.aiter_lines():
                event = _sse_data(line)
                if event is _DONE:
                    return
                if event is not None:
                    yield self._parse(event)
        finally:
            await self.response.aclose()

    async def close(self) -> None:
        await self.response.aclose()

    async def __aenter__(self) -> "AsyncStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class AsyncClient(_Base):
    def __init__(self, base_url: str = "http://127.0.0.1:8000/v1", api_key: Optional[str] = None,
                 timeout: float = 600.0, max_retries: int = 2, backoff: float = 0.5,
                 http_client: Optional[httpx.AsyncClient] = None) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, backoff)
        self._http = http_client or httpx.AsyncClient(timeout=timeout)
        self.completions = _AsyncResource(self, "/completions", Completion.parse)
        self.chat = _Namespace(completions=_AsyncResource(self, "/chat/completions", ChatCompletion.parse))
        self.models = _AsyncModels(self)

    async def request(self, method: str, path: str, body: Optional[dict] = None, stream: bool = False):
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                req = self._http.build_request(method, self.base_url + path, json=body, headers=self._headers())
                response = await self._http.send(req, stream=stream)
            except httpx.TransportError as e:
                if last:
                    raise _connection_error(e) from e
                await asyncio.sleep(self._delay(attempt, None))
                continue
            if response.status_code < 400:
                return response
            if stream:
                await response.aread()
            if response.status_code in _RETRY_STATUS and not last:
                await asyncio.sleep(self._delay(attempt, response))
                continue
            raise _error_from(response, _json(response))

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class _AsyncResource(_Resource):
    async def create(self, **kwargs: Any):
        body = _Base._payload(kwargs)
        if body.get("stream"):
            return AsyncStream(await self._client.request("POST", self._path, body, stream=True), self._parse)
        return self._parse((await self._client.request("POST", self._path, body)).json())


class _AsyncModels(_Models):
    async def list(self) -> list:
        return [_build(Model, m) for m in (await self._client.request("GET", "/models")).json()["data"]]
