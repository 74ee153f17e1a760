"""AsyncEngine: the asyncio face of the synchronous :class:`LLMEngine`.

The core loop (``core_loop.py``: load the model, then ``step()`` while there is work) runs
in a background thread. The two sides share no engine state: the event loop sends plain
commands (``Add``/``Abort``/``STOP``) through a thread-safe queue, and the core sends back
one ``Batch`` per iteration (acks, deltas, a ``stats()`` snapshot) through
``loop.call_soon_threadsafe``. Swapping the thread for a process means swapping those two
channels, nothing else.

Metrics are recorded on the event-loop side from timestamps the core attaches, so they
stay in the front-end process once the core moves out.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional

from prometheus_client import CollectorRegistry

from sift.server.config import EngineConfig
from sift.server.engine.core_loop import STOP, Abort, Add, Batch, CoreLoop, final_output
from sift.server.engine.metrics import EngineMetrics
from sift.server.engine.outputs import RequestOutput
from sift.server.engine.request import SamplingParams
from sift.server.structured.spec import StructuredSpec

logger = logging.getLogger("sift.engine")


class EngineNotReadyError(RuntimeError):
    """The model is still loading, or failed to load."""


class EngineDrainingError(RuntimeError):
    """The engine is draining for shutdown and admits no new requests."""


@dataclass
class _Tracked:
    """Event-loop side state of one in-flight request."""

    queue: asyncio.Queue
    arrival: float
    first_token: Optional[float] = None
    last_token: Optional[float] = None


class RequestStream:
    """Deltas of one admitted request. ``aclose()`` before the end aborts the request."""

    def __init__(self, engine: "AsyncEngine", request_id: str, tracked: _Tracked) -> None:
        self.request_id = request_id
        self._engine = engine
        self._tracked = tracked
        self._done = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        out = await self._tracked.queue.get()
        if out.finished:
            self._done = True
        return out

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._engine.abort(self.request_id)

    async def __aenter__(self) -> "RequestStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class AsyncEngine:
    """Owns the core thread; hands out per-request async streams of :class:`RequestOutput`."""

    def __init__(self, config: EngineConfig, engine_factory: Optional[Callable[[], object]] = None) -> None:
        self.config = config
        self._factory = engine_factory or self._default_factory
        self.registry = CollectorRegistry()
        self.metrics: Optional[EngineMetrics] = None
        self.tokenizer = None
        self.model_name: Optional[str] = None
        self.max_model_len = 0
        self.vocab_size = 0
        self.num_layers = 0
        self.load_error: Optional[str] = None
        self.dead = False
        self.draining = False
        self._inputs: queue.SimpleQueue = queue.SimpleQueue()
        self._requests: dict[str, _Tracked] = {}
        self._loaded: Optional[asyncio.Future] = None
        self._idle: Optional[asyncio.Event] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        # watchdog: the core reports after every iteration; no report for stall_timeout s while requests are in
        # flight means the engine is stuck (a hung kernel, a runaway step): /ready and /health say so
        self.stall_timeout = config.server.engine_stall_timeout
        self._last_report = time.monotonic()
        self._busy_since = time.monotonic()
        self._core_engine = None  # the synchronous engine, only to read the ids of the step it is in
        self._stall_logged = False
        self._watchdog: Optional[asyncio.Task] = None
        # grammar compilation happens here, before a request enters the engine's queue, so the core
        # thread keeps stepping while a schema compiles (one worker: compiles are short and cached)
        self._grammar_pool: Optional[ThreadPoolExecutor] = None
        self.grammars = None  # sift.server.structured.compiler.GrammarCompiler, built on the first constrained request

    def _default_factory(self):
        from sift.server.engine.llm_engine import LLMEngine
        return LLMEngine(self.config)

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self.metrics is not None

    @property
    def ready(self) -> bool:
        return self.loaded and not self.draining and not self.dead and not self.stalled

    @property
    def stalled_for(self) -> float:
        """Seconds the core has made no progress while requests are in flight (0 when idle)."""
        if not self._requests or self._thread is None:
            return 0.0
        return time.monotonic() - max(self._last_report, self._busy_since)

    @property
    def stalled(self) -> bool:
        return self.stalled_for > self.stall_timeout

    def step_request_ids(self) -> list:
        """Ids of the requests in the step the core is running now (all in flight if it cannot tell)."""
        ids = getattr(self._core_engine, "current_step_ids", None)
        return list(ids) if ids else sorted(self._requests)

    async def _watch(self) -> None:
        """Log once when the engine stalls (naming the step's requests) and once when it recovers."""
        period = min(1.0, self.stall_timeout / 4)
        while True:
            await asyncio.sleep(period)
            if self.stalled and not self._stall_logged:
                self._stall_logged = True
                logger.error("engine stalled: no progress for %.1fs with %d request(s) in flight; the step's "
                             "request(s): %s; /ready and /health report 503", self.stalled_for,
                             len(self._requests), ", ".join(self.step_request_ids()))
            elif self._stall_logged and not self.stalled:
                self._stall_logged = False
                logger.warning("engine progressing again after a stall")

    @property
    def num_in_flight(self) -> int:
        return len(self._requests)

    def start(self) -> None:
        """Start the core thread, which loads the model and then serves. Returns at once."""
        self._loop = asyncio.get_running_loop()
        self._loaded = self._loop.create_future()
        self._idle = asyncio.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._core_main, name="sift-core", daemon=True)
        self._thread.start()
        self._watchdog = self._loop.create_task(self._watch())

    async def wait_loaded(self) -> None:
        """Raise :class:`EngineNotReadyError` if loading fails."""
        await asyncio.shield(self._loaded)

    async def drain(self, timeout: float) -> bool:
        """Stop admitting, wait up to ``timeout`` s for in-flight requests; abort the rest.
        Returns True when everything finished in time."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            logger.warning("drain timeout: aborting %d request(s)", len(self._requests))
            for request_id in list(self._requests):
                self._finish_locally(request_id, "abort")
            return False

    async def shutdown(self) -> None:
        self.draining = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._thread is not None and self._thread.is_alive():
            self._inputs.put(STOP)
            await asyncio.to_thread(self._thread.join, 10.0)
        if self._grammar_pool is not None:
            self._grammar_pool.shutdown(wait=False)

    # ---- requests --------------------------------------------------------------------------

    async def add_request(self, request_id: str, prompt_token_ids: list, params: SamplingParams,
                          priority: int = 0) -> RequestStream:
        """Submit a request and wait for the core to admit it.

        Raises ValueError (bad input), the engine's QueueFullError, EngineDrainingError or
        EngineNotReadyError before anything is generated.
        """
        if self.dead or not self.loaded:
            raise EngineNotReadyError(self.load_error or "the model is not loaded")
        if self.draining:
            raise EngineDrainingError("the server is shutting down")
        if request_id in self._requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        tracked = _Tracked(asyncio.Queue(), time.monotonic())
        if not self._requests:
            self._busy_since = tracked.arrival  # the core was idle (blocked on its queue), not stalled
        self._requests[request_id] = tracked
        self._idle.clear()
        self._inputs.put(Add(request_id, list(prompt_token_ids), params, priority))
        try:
            ack = await tracked.queue.get()
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        if isinstance(ack, BaseException):
            self._forget(request_id)
            raise ack
        if isinstance(ack, RequestOutput):  # finished (drain timeout, dead core) before admission
            tracked.queue.put_nowait(ack)
        return RequestStream(self, request_id, tracked)

    async def compile_grammar(self, spec: StructuredSpec) -> StructuredSpec:
        """``spec`` with its compiled grammar attached: from the cache inline, else compiled on a worker thread.
        Raises ``GrammarError`` (a ValueError) with the reason when it cannot compile."""
        if spec.compiled is not None:
            return spec
        if self.grammars is not None:
            compiled = self.grammars.cached(spec)
            if compiled is not None:
                self.metrics.grammar_cache_hits.inc()
                return StructuredSpec(spec.kind, spec.value, compiled=compiled)
        if self._grammar_pool is None:
            self._grammar_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sift-grammar")
        compiled, seconds = await asyncio.get_running_loop().run_in_executor(self._grammar_pool, self._compile, spec)
        if seconds:
            self.metrics.grammar_compile.observe(seconds)
        else:
            self.metrics.grammar_cache_hits.inc()
        return StructuredSpec(spec.kind, spec.value, compiled=compiled)

    def _compile(self, spec: StructuredSpec) -> tuple:
        if self.grammars is None:  # the tokenizer info takes ~0.2 s to build: once, on this worker
            from sift.server.structured.compiler import GrammarCompiler
            self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.tokenizer.eos_token_ids)
        return self.grammars.get(spec)

    async def generate(self, request_id: str, prompt_token_ids: list, params: SamplingParams,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Deltas until the request finishes; stopping early (or cancellation) aborts it."""
        stream = await self.add_request(request_id, prompt_token_ids, params, priority)
        async with stream:
            async for out in stream:
                yield out

    def abort(self, request_id: str) -> None:
        """Abort an in-flight request; its KV blocks are freed before the next step."""
        if request_id in self._requests:
            self._finish_locally(request_id, "abort", notify=False)

    def _finish_locally(self, request_id: str, reason: str, notify: bool = True) -> None:
        tracked = self._forget(request_id)
        self._inputs.put(Abort(request_id))
        if self.metrics is not None:
            self.metrics.observe_finished(reason)
        if notify and tracked is not None:
            tracked.queue.put_nowait(final_output(request_id, reason))

    def _forget(self, request_id: str) -> Optional[_Tracked]:
        tracked = self._requests.pop(request_id, None)
        if not self._requests:
            self._idle.set()
        return tracked

    # ---- event-loop side of the channel ------------------------------------------------------

    def _on_loaded(self, tokenizer, model_name: str, max_model_len: int, vocab_size: int, num_layers: int) -> None:
        self.tokenizer = tokenizer
        self.num_layers = num_layers
        self.model_name = self.config.model.served_model_name or model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.metrics = EngineMetrics(self.model_name, self.registry)
        self._loaded.set_result(None)
        logger.info("model %s loaded (context %d)", self.model_name, max_model_len)

    def _on_fatal(self, message: str) -> None:
        self.dead = True
        self.load_error = message
        if not self._loaded.done():
            self._loaded.set_exception(EngineNotReadyError(message))
        for request_id in list(self._requests):
            self._finish_locally(request_id, "error")

    def _on_batch(self, batch: Batch) -> None:
        self._last_report = batch.step_end
        metrics = self.metrics
        for request_id, payload in batch.messages:
            tracked = self._requests.get(request_id)
            if tracked is None:  # aborted by its consumer meanwhile
                continue
            if isinstance(payload, RequestOutput):
                self._observe(tracked, payload, batch)
                if payload.finished:
                    self._forget(request_id)
                    metrics.observe_finished(payload.finish_reason or "stop")
            tracked.queue.put_nowait(payload)
        metrics.observe_engine_stats(batch.stats)

    def _observe(self, tracked: _Tracked, out: RequestOutput, batch: Batch) -> None:
        metrics, now = self.metrics, batch.step_end
        if out.new_token_ids:
            if tracked.first_token is None:
                tracked.first_token = now
                metrics.ttft.observe(now - tracked.arrival)
                metrics.queue_time.observe(max(0.0, batch.step_start - tracked.arrival))
            else:
                metrics.itl.observe(now - tracked.last_token)
            tracked.last_token = now
        if out.finished and out.finish_reason in ("stop", "length"):
            metrics.e2e.observe(now - tracked.arrival)

    def _send(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed under us during interpreter shutdown
            pass

    # ---- the core thread ---------------------------------------------------------------------

    def _core_main(self) -> None:
        try:
            engine = self._factory()
        except ValueError as e:  # ModelLoadError and config errors: one clear line, no traceback
            self._send(self._on_fatal, f"model load failed: {e}")
            return
        except Exception as e:  # noqa: BLE001 - any load failure is reported, not raised
            logger.exception("model load failed")
            self._send(self._on_fatal, f"model load failed: {e}")
            return
        self._core_engine = engine
        arch = getattr(engine, "arch", None)
        self._send(self._on_loaded, engine.tokenizer, engine.model_name, engine.max_model_len, engine.vocab_size,
                   getattr(arch, "num_layers", 0))
        try:
            CoreLoop(engine, self._inputs, lambda batch: self._send(self._on_batch, batch)).run()
        except Exception as e:  # noqa: BLE001 - a bug outside step(): fail everything, stay up as dead
            logger.exception("engine core loop crashed")
            self._send(self._on_fatal, f"engine crashed: {e}")
