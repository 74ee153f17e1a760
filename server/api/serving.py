"""Generation plumbing shared by the completion and chat routes.

Fan-out of one HTTP request into ``n x prompts`` engine requests, merging their delta
streams, aborting them when the client goes away, and turning deltas into OpenAI
choices. No route definitions here; see ``routes.py``.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import StreamingResponse

from sift.server.api.errors import APIError
from sift.server.engine.async_engine import AsyncEngine, EngineDrainingError, EngineNotReadyError, RequestStream
from sift.server.engine.llm_engine import QueueFullError
from sift.server.engine.outputs import RequestOutput
from sift.server.engine.request import SamplingParams

RETRY_AFTER_S = "1"

# The engine's "abort" (drain timeout, shutdown) is not an OpenAI finish reason: clients see the output
# cut off as "length" (as if the server's limit had been reached), and streams get an error event too.
_API_FINISH_REASONS = {"abort": "length"}


def api_finish_reason(reason: Optional[str]) -> Optional[str]:
    return _API_FINISH_REASONS.get(reason, reason)


def abort_error_event() -> dict:
    """The SSE error event that follows the final chunks of a stream the server aborted."""
    return {"error": {"message": "the server aborted this generation (shutting down); the output is incomplete",
                      "type": "service_unavailable", "param": None, "code": "aborted"}}


def sse(payload) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


def to_api_error(exc: Exception) -> APIError:
    """Map an admission failure onto its HTTP status."""
    if isinstance(exc, QueueFullError):
        return APIError(429, "the server's request queue is full; retry later", code="queue_full",
                        headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(exc, EngineDrainingError):
        return APIError(503, "the server is shutting down", code="draining", headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(exc, EngineNotReadyError):
        return APIError(503, str(exc), code="not_ready", headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), code="invalid_value")
    return APIError(500, "internal server error")


async def submit(engine: AsyncEngine, base_id: str, prompts: list, params: SamplingParams,
                 priority: int, grammar_param: Optional[str] = None) -> list[RequestStream]:
    """Admit ``len(prompts) * params.n`` engine requests (seed + i per sample), all or none.

    Stream ``k`` belongs to prompt ``k // n``; it is also the OpenAI choice index. A grammar
    constraint is compiled first (cached; off the engine thread); one that does not compile is a
    400 naming ``grammar_param``.
    """
    if params.structured is not None:
        try:
            params = replace(params, structured=await engine.compile_grammar(params.structured))
        except ValueError as e:
            raise APIError(400, str(e), param=grammar_param, code="invalid_grammar") from None
    n = params.n
    subs = [replace(params, n=1, seed=None if params.seed is None else params.seed + i) for i in range(n)]
    results = await asyncio.gather(
        *(engine.add_request(f"{base_id}-{k}", prompts[k // n], subs[k % n], priority)
          for k in range(len(prompts) * n)),
        return_exceptions=True)
    streams = [r for r in results if isinstance(r, RequestStream)]
    failure = next((r for r in results if not isinstance(r, RequestStream)), None)
    if failure is not None:
        for stream in streams:
            await stream.aclose()
        if isinstance(failure, asyncio.CancelledError):
            raise failure
        raise to_api_error(failure)
    return streams


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Deltas of all streams as they come, tagged with the stream's index; closing (or
    cancelling) the iterator aborts whatever is unfinished."""
    outputs: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        async for out in stream:
            outputs.put_nowait((index, out))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            index, out = await outputs.get()
            remaining -= out.finished
            yield index, out
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            await stream.aclose()


class SSEResponse(StreamingResponse):
    """An event stream that aborts its engine requests however it ends, including a
    disconnect before the body iterator was ever started (its ``finally`` would not run)."""

    def __init__(self, events: AsyncIterator[str], streams: list[RequestStream]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self.streams = streams

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for stream in self.streams:
                await stream.aclose()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect_unless_disconnected(request: Request, streams: list[RequestStream]) -> Optional[list]:
    """All choices, or None when the client disconnected first (its requests are aborted)."""
    choices = [ChoiceState() for _ in streams]

    async def collect() -> None:
        async for index, out in merged(streams):
            choices[index].add(out)

    work = asyncio.create_task(collect())
    gone = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, gone):
            task.cancel()
    if not work.done() or work.cancelled():
        await asyncio.gather(work, return_exceptions=True)  # let merged() abort the engine requests
        return None
    work.result()
    for choice in choices:
        choice.raise_if_failed()
    return choices


@dataclass
class ChoiceState:
    """Accumulates one choice's deltas."""

    text: list = field(default_factory=list)
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prompt_logprobs: Optional[list] = None
    finish_reason: Optional[str] = None
    num_output_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.new_text)
        self.token_ids += out.new_token_ids
        self.logprobs += out.new_logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            self.finish_reason = out.finish_reason
            self.num_output_tokens = max(out.num_output_tokens, len(self.token_ids))

    def raise_if_failed(self) -> None:
        if self.finish_reason == "error":
            raise APIError(500, "generation failed: internal engine error", code="engine_error")


def usage(prompts: list, choices_output_tokens: list) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(choices_output_tokens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class LogprobFormatter:
    """OpenAI's two logprob shapes from engine tuples ``(logprob, [(token_id, logprob), ...])``."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def completion(self, token_ids: list, logprobs: list, text_offset: int = 0) -> dict:
        """Legacy completions shape; ``None`` entries (the first prompt token) have no logprob."""
        tokens, token_lps, tops, offsets = [], [], [], []
        for token_id, entry in zip(token_ids, logprobs):
            text = self.token(token_id)
            tokens.append(text)
            offsets.append(text_offset)
            text_offset += len(text)
            if entry is None:
                token_lps.append(None)
                tops.append(None)
            else:
                token_lps.append(entry[0])
                tops.append({self.token(t): lp for t, lp in entry[1]})
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def chat(self, token_ids: list, logprobs: list) -> dict:
        content = []
        for token_id, (lp, top) in zip(token_ids, logprobs):
            text = self.token(token_id)
            content.append({"token": text, "logprob": lp, "bytes": list(text.encode()),
                            "top_logprobs": [{"token": (t_text := self.token(t)), "logprob": t_lp,
                                              "bytes": list(t_text.encode())} for t, t_lp in top]})
        return {"content": content}
