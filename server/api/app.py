"""The FastAPI app factory and the uvicorn server that drains gracefully.

Shutdown order on SIGTERM (or the first Ctrl+C): ``/ready`` turns 503 and new requests get
503 while the listening socket stays open; in-flight requests run to completion for up to
``shutdown_timeout`` seconds (then they are aborted); only then does uvicorn close
connections and run the lifespan shutdown, which stops the engine. The process exits 0.
"""
from __future__ import annotations

import asyncio
import logging
import re
import signal
import time
import uuid
from contextlib import asynccontextmanager
from typing import Optional

import uvicorn
from fastapi import FastAPI
from prometheus_client import Counter
from starlette.datastructures import Headers

from sift.server.api.errors import error_response, install_error_handlers
from sift.server.api.routes import api_key_error, protected, public
from sift.server.config import EngineConfig
from sift.server.engine.async_engine import AsyncEngine, EngineNotReadyError

logger = logging.getLogger("sift.api")
access_logger = logging.getLogger("sift.access")

# A client-supplied request id is echoed only if it is short and harmless in a log line.
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class RequestIdMiddleware:
    """Echo ``X-Request-Id`` (or generate one) and write one access-log line per request.

    Also the last line of defence: an exception no handler took becomes a 500 in the OpenAI shape, carrying
    the request id, logged once with its traceback (not re-raised, so neither Starlette nor uvicorn logs it
    again); every 5xx is logged at error level with its real status and counted in
    ``sift:http_server_errors_total{status, endpoint}`` (but the 503s of /health and /ready, which report a
    state to an orchestrator polling them, stay at info level and uncounted).

    Plain ASGI rather than ``BaseHTTPMiddleware``, which would buffer streamed responses
    and hide client disconnects from the routes.
    """

    def __init__(self, app, server_errors: Optional[Counter] = None, model_name=lambda: "") -> None:
        self.app = app
        self.server_errors = server_errors
        self.model_name = model_name

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SAFE_REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 0
        start = time.perf_counter()

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                   (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - rendered here, logged once
            logger.exception("unhandled error on %s %s request_id=%s", scope["method"], scope["path"], request_id)
            if status == 0:
                await error_response(500, "internal server error")(scope, receive, send_with_id)
            else:
                status = 500  # the response had started: the client sees a cut stream; the log says why
        finally:
            client = scope.get("client") or ("-", 0)
            # a probe's 503 (loading, draining, stalled) reports a state, it is not a failed request
            failed = status >= 500 and scope["path"] not in PROBES
            level = logging.ERROR if failed else logging.INFO
            access_logger.log(level, '%s "%s %s" %d %.1fms request_id=%s', client[0], scope["method"],
                              scope["path"], status, (time.perf_counter() - start) * 1e3, request_id)
            if failed and self.server_errors is not None:
                route = scope.get("route")
                endpoint = getattr(route, "path", None) or "unmatched"
                self.server_errors.labels(self.model_name() or "", str(status), endpoint).inc()


PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
PROBES = ("/health", "/ready")


class GuardMiddleware:
    """Checks that cost nothing run before any byte of the body is read, in this order: the API key (401),
    then the body size (413: from ``Content-Length`` at once, else by counting while reading). The body is
    read here, up to the limit, and replayed to the app."""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        denied = api_key_error(headers, self.api_key)
        if denied is not None:
            await error_response(denied.status, denied.message, code=denied.code,
                                 headers=denied.headers)(scope, receive, send)
            return
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        response = error_response(413, f"request body larger than the server's limit of {self.max_body_bytes} "
                                       "bytes (--max-request-body-bytes)", code="body_too_large",
                                  headers={"Connection": "close"})
        await response(scope, receive, send)


def build_app(engine: AsyncEngine, config: EngineConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.drain(config.server.shutdown_timeout)
        await engine.shutdown()

    app = FastAPI(title="Sift", description="OpenAI-compatible LLM inference server", version="0.1.0",
                  lifespan=lifespan)
    app.state.engine = engine
    app.state.api_key = config.server.api_key
    app.state.default_max_tokens = config.server.default_max_tokens
    install_error_handlers(app)
    app.include_router(public)
    app.include_router(protected)
    app.add_middleware(GuardMiddleware, api_key=config.server.api_key,
                       max_body_bytes=config.server.max_request_body_bytes)
    server_errors = Counter("sift:http_server_errors", "HTTP responses with a 5xx status, by status and endpoint.",
                            ["model_name", "status", "endpoint"], registry=engine.registry)
    app.add_middleware(RequestIdMiddleware, server_errors=server_errors, model_name=lambda: engine.model_name)
    return app


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the engine before the usual shutdown."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout
        self.exit_code = 0
        self._loop = None
        self._tasks: list[asyncio.Task] = []

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        self._tasks.append(asyncio.create_task(self._exit_if_load_fails()))

    def handle_exit(self, sig, frame) -> None:
        if self._loop is None or self.engine.draining or sig not in (signal.SIGTERM, signal.SIGINT):
            super().handle_exit(sig, frame)  # a second signal: uvicorn's own (forced) shutdown
            return
        # Not recorded as captured: uvicorn would re-raise it after serve() and the exit code would
        # be the signal's, not 0.
        self.engine.draining = True
        self._loop.call_soon_threadsafe(lambda: self._tasks.append(asyncio.create_task(self._drain_then_exit())))

    async def _drain_then_exit(self) -> None:
        logger.info("shutdown requested: draining %d in-flight request(s) (timeout %.0fs)",
                    self.engine.num_in_flight, self.shutdown_timeout)
        await self.engine.drain(self.shutdown_timeout)
        self.should_exit = True

    async def _exit_if_load_fails(self) -> None:
        try:
            await self.engine.wait_loaded()
        except EngineNotReadyError as e:
            logger.error("%s", e)
            self.exit_code = 1
            self.should_exit = True


def run_server(config: EngineConfig, engine: AsyncEngine | None = None) -> int:
    """Serve until shut down; the process exit code."""
    engine = engine or AsyncEngine(config)
    app = build_app(engine, config)
    sc = config.server
    uv_config = uvicorn.Config(app, host=sc.host, port=sc.port, log_level=sc.log_level, access_log=False,
                               timeout_graceful_shutdown=5, lifespan="on")
    server = DrainingServer(uv_config, engine, sc.shutdown_timeout)
    server.run()
    if not server.started and server.exit_code == 0:
        return 1  # could not bind, or the lifespan startup failed
    return server.exit_code
