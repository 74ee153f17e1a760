"""HTTP endpoints: OpenAI-compatible generation, tokenizer utilities, probes and metrics.

No model logic: a route validates (``protocol.py``), tokenizes, hands engine requests to
``serving.submit`` and shapes the deltas into OpenAI responses or SSE chunks.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sift.server.api.bounds import Limits, check_request
from sift.server.api.errors import APIError, error_body
from sift.server.api.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                 CompletionResponse, DetokenizeRequest, DetokenizeResponse, ErrorResponse, ModelCard,
                                 ModelList, TokenizeRequest, TokenizeResponse)
from sift.server.api.prompting import (check_admissible, checked, encode_chat, encode_prompts,
                                  reject_if_surely_too_long, sampling_params)
from sift.server.api.serving import (ChoiceState, LogprobFormatter, SSEResponse, abort_error_event,
                                api_finish_reason, collect_unless_disconnected, merged, sse, submit, usage)
from sift.server.api.tool_calls import ToolOutput
from sift.server.engine.async_engine import AsyncEngine
from sift.server.structured.tools import render_messages

# Status 499 (client closed request): never seen by the client, only in the access log.
CLIENT_CLOSED = 499


def api_key_error(headers, key: str | None) -> APIError | None:
    """The 401 for a request without the right bearer token (None: authorized). Also called by the
    guard middleware before the body is read, so an unauthenticated client learns nothing else."""
    if not key:
        return None
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        return APIError(401, "missing or invalid API key", code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"})
    return None


async def require_api_key(request: Request) -> None:
    error = api_key_error(request.headers, request.app.state.api_key)
    if error is not None:
        raise error


async def off_loop(fn, *args, **kwargs):
    """CPU work on request data (tokenizing, chat templating, decoding) runs in a worker thread, so a
    large input never stalls the event loop (probes, other streams)."""
    return await asyncio.to_thread(fn, *args, **kwargs)


class OffLoopJSONRoute(APIRoute):
    """An APIRoute that decodes a large JSON body in a worker thread (FastAPI would on the event loop, where a
    multi-megabyte body stalls probes and streams); FastAPI then finds it decoded. A body that does not decode
    is left to FastAPI, which answers its usual 400."""

    OFF_LOOP_BYTES = 64 * 1024

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def decode_then_handle(request: Request) -> Response:
            body = await request.body()
            if len(body) > self.OFF_LOOP_BYTES:
                try:
                    request._json = await off_loop(json.loads, body)  # Request.json() returns it as is
                except ValueError:
                    pass
            return await handler(request)

        return decode_then_handle


public = APIRouter()
protected = APIRouter(dependencies=[Depends(require_api_key)], route_class=OffLoopJSONRoute,
                      responses={status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 503)})


def serving_engine(request: Request, model: str | None = None, body=None) -> AsyncEngine:
    """The engine, if it serves ``model`` now; checks ``body`` against the model's bounds first."""
    engine: AsyncEngine = request.app.state.engine
    if engine.draining:
        raise APIError(503, "the server is shutting down", code="draining", headers={"Retry-After": "1"})
    if engine.stalled:
        raise APIError(503, "the engine is stalled (no progress); see /health", code="engine_stalled",
                       headers={"Retry-After": "1"})
    if not engine.ready:
        raise APIError(503, engine.load_error or "the model is loading", code="not_ready",
                       headers={"Retry-After": "1"})
    if model is not None and model != engine.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {engine.model_name!r}",
                       param="model", code="model_not_found")
    if body is not None:
        check_request(body, Limits(engine.max_model_len, engine.vocab_size, engine.num_layers))
    return engine


# ---- probes, metrics, models ----------------------------------------------------------------

@public.get("/health")
async def health(request: Request) -> JSONResponse:
    """Liveness: the process and its engine loop are alive (loading counts as alive) and the engine is not
    stalled (no progress for --engine-stall-timeout s while requests are pending): then 503, so that an
    orchestrator restarts the process."""
    engine: AsyncEngine = request.app.state.engine
    if engine.dead:
        return JSONResponse(error_body(503, engine.load_error or "engine is dead"), status_code=503)
    if engine.stalled:
        body = error_body(503, f"engine stalled: no progress for {engine.stalled_for:.1f}s "
                               f"(--engine-stall-timeout {engine.stall_timeout:g}s)", code="engine_stalled")
        body.update(status="stalled", stalled_for_s=round(engine.stalled_for, 3),
                    step_request_ids=engine.step_request_ids())
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ok"})


@public.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: model loaded, not draining, engine not stalled."""
    engine: AsyncEngine = request.app.state.engine
    if engine.ready:
        return JSONResponse({"status": "ready"})
    state = ("draining" if engine.draining else "dead" if engine.dead else "stalled" if engine.stalled
             else "loading")
    return JSONResponse({"status": state}, status_code=503)


@public.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.engine.registry), media_type=CONTENT_TYPE_LATEST)


@protected.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    engine = serving_engine(request)
    return ModelList(data=[ModelCard(id=engine.model_name, max_model_len=engine.max_model_len)])


# ---- tokenizer utilities ------------------------------------------------------------------

@protected.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> Response:
    engine = serving_engine(request, body.model, body)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt or messages", param="prompt")
    if body.messages is not None:
        if not body.messages:
            raise APIError(400, "messages: must hold at least one message", param="messages",
                           code="invalid_value")
        tokens = await off_loop(encode_chat, engine.tokenizer,
                                [{"role": m.role, "content": m.text()} for m in body.messages],
                                body.chat_template_kwargs)
    else:
        tokens = await off_loop(engine.tokenizer.encode, body.prompt, add_special_tokens=body.add_special_tokens)
    # rendered off the loop too: a long text's token list is megabytes of JSON
    content = await off_loop(json.dumps, {"count": len(tokens), "max_model_len": engine.max_model_len,
                                          "tokens": tokens}, separators=(",", ":"))
    return Response(content, media_type="application/json")


@protected.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    engine = serving_engine(request, body.model, body)  # ids outside the vocabulary: 400 naming them
    return DetokenizeResponse(prompt=await off_loop(engine.tokenizer.decode, body.tokens, skip_special_tokens=False))


# ---- completions --------------------------------------------------------------------------

@protected.post("/v1/completions", response_model=CompletionResponse,
                description="OpenAI completions; with stream=true, an SSE stream of the same shape.")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    engine = serving_engine(request, body.model, body)
    tok = engine.tokenizer
    raw = body.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    if not raw:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of: only best_of == n is supported (no server-side ranking)", param="best_of",
                       code="invalid_value")
    params = sampling_params(body, default_max_tokens=16)
    for p in raw:
        if isinstance(p, str):
            reject_if_surely_too_long(engine, len(p), "prompt")
    prompts = await off_loop(encode_prompts, tok, raw)
    check_admissible(engine, prompts, params)
    rid = f"cmpl-{uuid.uuid4().hex}"
    streams = await submit(engine, rid, prompts, params, body.priority, grammar_param=body.constraint()[1])
    n, model, created = params.n, engine.model_name, int(time.time())
    fmt = LogprobFormatter(tok)

    echoed_prompts = ([p if isinstance(p, str) else await off_loop(tok.decode, prompts[i]) for i, p in enumerate(raw)]
                      if body.echo else [])

    def echo_text(k: int) -> str:
        return echoed_prompts[k // n]

    if body.stream:
        async def events() -> AsyncIterator[str]:
            output_tokens = [0] * len(streams)
            echoed = [not body.echo] * len(streams)
            offsets = [0] * len(streams)
            aborted = False
            async for k, out in merged(streams):
                if out.finish_reason == "error":
                    yield sse(error_body(500, "generation failed: internal engine error", code="engine_error"))
                    break
                aborted |= out.finish_reason == "abort"
                text, logprobs = out.new_text, None
                if body.logprobs is not None:
                    logprobs = fmt.completion(out.new_token_ids, out.new_logprobs, offsets[k])
                    offsets[k] += sum(len(t) for t in logprobs["tokens"])
                if not echoed[k]:
                    text, echoed[k] = echo_text(k) + text, True
                output_tokens[k] = out.num_output_tokens
                chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
                         "choices": [{"index": k, "text": text, "logprobs": logprobs,
                                      "finish_reason": api_finish_reason(out.finish_reason) if out.finished
                                      else None}]}
                if body.include_usage:
                    chunk["usage"] = None
                yield sse(chunk)
            else:
                if aborted:
                    yield sse(abort_error_event())
                if body.include_usage:
                    yield sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                               "choices": [], "usage": usage(prompts, output_tokens)})
            yield sse("[DONE]")

        return SSEResponse(events(), streams)

    choices = await collect_unless_disconnected(request, streams)
    if choices is None:
        return Response(status_code=CLIENT_CLOSED)
    out_choices = []
    for k, c in enumerate(choices):
        text, logprobs = "".join(c.text), None
        if body.echo:
            text = echo_text(k) + text
        if body.logprobs is not None:
            ids, lps = c.token_ids, c.logprobs
            if body.echo:
                ids, lps = prompts[k // n] + ids, (c.prompt_logprobs or [None] * len(prompts[k // n])) + lps
            logprobs = fmt.completion(ids, lps)
        out_choices.append({"index": k, "text": text, "logprobs": logprobs,
                            "finish_reason": api_finish_reason(c.finish_reason)})
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                         "choices": out_choices,
                         "usage": usage(prompts, [c.num_output_tokens for c in choices])})


# ---- chat completions -----------------------------------------------------------------------

@protected.post("/v1/chat/completions", response_model=ChatCompletionResponse,
                description="OpenAI chat completions; with stream=true, an SSE stream of chat.completion.chunk.")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    engine = serving_engine(request, body.model, body)
    tok = engine.tokenizer
    tool_choice = checked(body, body.effective_tool_choice)
    tools = body.tool_dicts() if tool_choice != "none" else None
    parser = engine.config.server.tool_call_parser
    native = tok.template_renders_tools
    messages = render_messages(body.chat_messages(), tools, native, parser)
    reject_if_surely_too_long(engine, sum(len(str(m.get("content") or "")) for m in messages), "messages")
    prompt = await off_loop(encode_chat, tok, messages, body.chat_template_kwargs, tools if native else None)
    # without max_tokens: what the context leaves, capped by --default-max-tokens
    default = min(engine.max_model_len - len(prompt), request.app.state.default_max_tokens)
    params = sampling_params(body, default_max_tokens=max(1, default))
    check_admissible(engine, [prompt], params)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    streams = await submit(engine, rid, [prompt], params, body.priority, grammar_param=body.constraint()[1])
    model, created = engine.model_name, int(time.time())
    fmt = LogprobFormatter(tok)
    tool_out = ToolOutput(tool_choice, tools or [], parser)

    if body.stream:
        def chunk(choices: list, **extra) -> str:
            payload = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": choices, **extra}
            if body.include_usage and "usage" not in extra:
                payload["usage"] = None
            return sse(payload)

        async def events() -> AsyncIterator[str]:
            output_tokens = [0] * len(streams)
            tool_streams = [tool_out.streamer() for _ in streams] if tool_out.active else None
            for k in range(len(streams)):
                yield chunk([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            aborted = False
            async for k, out in merged(streams):
                if out.finish_reason == "error":
                    yield sse(error_body(500, "generation failed: internal engine error", code="engine_error"))
                    break
                aborted |= out.finish_reason == "abort"
                output_tokens[k] = out.num_output_tokens
                finish_reason = out.finish_reason
                if tool_streams is not None:
                    # tool calls: the parser decides what is content; logprobs ride on the first delta
                    logprobs = fmt.chat(out.new_token_ids, out.new_logprobs) if body.logprobs else None
                    deltas = tool_streams[k].feed(out.new_text)
                    if out.finished:
                        more, finish_reason = tool_streams[k].finish(out.finish_reason)
                        deltas += more
                    for delta in deltas:
                        yield chunk([{"index": k, "delta": delta, "logprobs": logprobs, "finish_reason": None}])
                        logprobs = None
                elif out.new_text or out.new_token_ids:
                    logprobs = fmt.chat(out.new_token_ids, out.new_logprobs) if body.logprobs else None
                    yield chunk([{"index": k, "delta": {"content": out.new_text}, "logprobs": logprobs,
                                  "finish_reason": None}])
                if out.finished:
                    yield chunk([{"index": k, "delta": {}, "logprobs": None,
                                  "finish_reason": api_finish_reason(finish_reason)}])
            else:
                if aborted:
                    yield sse(abort_error_event())
                if body.include_usage:
                    yield chunk([], usage=usage([prompt], output_tokens))
            yield sse("[DONE]")

        return SSEResponse(events(), streams)

    choices: list[ChoiceState] | None = await collect_unless_disconnected(request, streams)
    if choices is None:
        return Response(status_code=CLIENT_CLOSED)
    out_choices = []
    for k, c in enumerate(choices):
        message, finish_reason = {"role": "assistant", "content": "".join(c.text)}, c.finish_reason
        if tool_out.active:
            message, finish_reason = tool_out.message("".join(c.text), c.finish_reason)
        out_choices.append({"index": k, "message": message,
                            "logprobs": fmt.chat(c.token_ids, c.logprobs) if body.logprobs else None,
                            "finish_reason": api_finish_reason(finish_reason)})
    return JSONResponse({
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": out_choices,
        "usage": usage([prompt], [c.num_output_tokens for c in choices]),
    })
