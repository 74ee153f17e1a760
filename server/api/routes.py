"""HTTP endpoints: OpenAI-compatible generation, tokenizer utilities, probes and metrics.

No model logic: a route validates (``protocol.py``), tokenizes, hands engine requests to
``serving.submit`` and shapes the deltas into OpenAI responses or SSE chunks.
"""
from __future__ import annotations

import hmac
import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.errors import APIError, error_body
from server.api.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                 CompletionResponse, DetokenizeRequest, DetokenizeResponse, ErrorResponse, ModelCard,
                                 ModelList, TokenizeRequest, TokenizeResponse)
from server.api.serving import (ChoiceState, LogprobFormatter, SSEResponse, collect_unless_disconnected, merged,
                                sse, submit, usage)
from server.api.tool_calls import ToolOutput
from server.engine.async_engine import AsyncEngine
from server.structured.tools import render_messages

# Status 499 (client closed request): never seen by the client, only in the access log.
CLIENT_CLOSED = 499


async def require_api_key(request: Request) -> None:
    key = request.app.state.api_key
    if not key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "missing or invalid API key", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


public = APIRouter()
protected = APIRouter(dependencies=[Depends(require_api_key)],
                      responses={status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 503)})


def serving_engine(request: Request, model: str | None = None) -> AsyncEngine:
    engine: AsyncEngine = request.app.state.engine
    if engine.draining:
        raise APIError(503, "the server is shutting down", code="draining", headers={"Retry-After": "1"})
    if not engine.ready:
        raise APIError(503, engine.load_error or "the model is loading", code="not_ready",
                       headers={"Retry-After": "1"})
    if model is not None and model != engine.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {engine.model_name!r}",
                       param="model", code="model_not_found")
    return engine


def _params(body, default_max_tokens: int):
    return _checked(body, body.to_sampling_params, default_max_tokens)


def _checked(body, fn, *args):
    """``fn(*args)``, its ValueError as a 400 naming the field the message starts with."""
    try:
        return fn(*args)
    except ValueError as e:
        # SamplingParams' messages start with the field they reject ("temperature must be >= 0")
        words = str(e).split()
        field = words[0].rstrip(":") if words else ""
        param = field if field.split(".")[0] in type(body).model_fields else None
        raise APIError(400, str(e), param=param, code="invalid_value") from None


# ---- probes, metrics, models ----------------------------------------------------------------

@public.get("/health")
async def health(request: Request) -> JSONResponse:
    """Liveness: the process and its engine loop are alive (loading counts as alive)."""
    engine: AsyncEngine = request.app.state.engine
    if engine.dead:
        return JSONResponse(error_body(503, engine.load_error or "engine is dead"), status_code=503)
    return JSONResponse({"status": "ok"})


@public.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: model loaded and not draining."""
    engine: AsyncEngine = request.app.state.engine
    if engine.ready:
        return JSONResponse({"status": "ready"})
    state = "draining" if engine.draining else ("dead" if engine.dead else "loading")
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
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    engine = serving_engine(request, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt or messages", param="prompt")
    if body.messages is not None:
        text = engine.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.text()} for m in body.messages], add_generation_prompt=True)
        tokens = engine.tokenizer.encode(text, add_special_tokens=False)
    else:
        tokens = engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens)


@protected.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    engine = serving_engine(request, body.model)
    if any(not 0 <= t < engine.vocab_size for t in body.tokens):
        raise APIError(400, f"tokens: ids must be in [0, {engine.vocab_size})", param="tokens")
    return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens, skip_special_tokens=False))


# ---- completions --------------------------------------------------------------------------

@protected.post("/v1/completions", response_model=CompletionResponse,
                description="OpenAI completions; with stream=true, an SSE stream of the same shape.")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    engine = serving_engine(request, body.model)
    tok = engine.tokenizer
    raw = body.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    if not raw:
        raise APIError(400, "prompt must not be empty", param="prompt")
    prompts = [tok.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p) for p in raw]
    params = _params(body, default_max_tokens=16)
    rid = f"cmpl-{uuid.uuid4().hex}"
    streams = await submit(engine, rid, prompts, params, body.priority, grammar_param=body.constraint()[1])
    n, model, created = params.n, engine.model_name, int(time.time())
    fmt = LogprobFormatter(tok)

    def echo_text(k: int) -> str:
        return raw[k // n] if isinstance(raw[k // n], str) else tok.decode(prompts[k // n])

    if body.stream:
        async def events() -> AsyncIterator[str]:
            output_tokens = [0] * len(streams)
            echoed = [not body.echo] * len(streams)
            offsets = [0] * len(streams)
            async for k, out in merged(streams):
                if out.finish_reason == "error":
                    yield sse(error_body(500, "generation failed: internal engine error", code="engine_error"))
                    break
                text, logprobs = out.new_text, None
                if body.logprobs is not None:
                    logprobs = fmt.completion(out.new_token_ids, out.new_logprobs, offsets[k])
                    offsets[k] += sum(len(t) for t in logprobs["tokens"])
                if not echoed[k]:
                    text, echoed[k] = echo_text(k) + text, True
                output_tokens[k] = out.num_output_tokens
                chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
                         "choices": [{"index": k, "text": text, "logprobs": logprobs,
                                      "finish_reason": out.finish_reason if out.finished else None}]}
                if body.include_usage:
                    chunk["usage"] = None
                yield sse(chunk)
            else:
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
        out_choices.append({"index": k, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason})
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                         "choices": out_choices,
                         "usage": usage(prompts, [c.num_output_tokens for c in choices])})


# ---- chat completions -----------------------------------------------------------------------

@protected.post("/v1/chat/completions", response_model=ChatCompletionResponse,
                description="OpenAI chat completions; with stream=true, an SSE stream of chat.completion.chunk.")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    engine = serving_engine(request, body.model)
    tok = engine.tokenizer
    tool_choice = _checked(body, body.effective_tool_choice)
    tools = body.tool_dicts() if tool_choice != "none" else None
    parser = engine.config.server.tool_call_parser
    native = tok.template_renders_tools
    messages = render_messages(body.chat_messages(), tools, native, parser)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tools=tools if native else None)
    prompt = tok.encode(text, add_special_tokens=False)
    params = _params(body, default_max_tokens=max(1, engine.max_model_len - len(prompt)))
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
            async for k, out in merged(streams):
                if out.finish_reason == "error":
                    yield sse(error_body(500, "generation failed: internal engine error", code="engine_error"))
                    break
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
                    yield chunk([{"index": k, "delta": {}, "logprobs": None, "finish_reason": finish_reason}])
            else:
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
                            "finish_reason": finish_reason})
    return JSONResponse({
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": out_choices,
        "usage": usage([prompt], [c.num_output_tokens for c in choices]),
    })
