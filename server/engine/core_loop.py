"""The core side of the AsyncEngine channel: the loop that owns the synchronous engine.

It runs in its own thread (later: its own process) and touches no asyncio object. In:
``Add``/``Abort``/``STOP`` commands from a queue. Out: one :class:`Batch` per iteration
through a ``report`` callback: admission acks or errors, the step's deltas, a stats snapshot.
"""
from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass
from typing import Callable, Optional

from sift.server.engine.outputs import RequestOutput
from sift.server.engine.request import SamplingParams

logger = logging.getLogger("sift.engine")


@dataclass(frozen=True)
class Add:
    request_id: str
    prompt_token_ids: list
    params: SamplingParams
    priority: int


@dataclass(frozen=True)
class Abort:
    request_id: str


STOP = "stop"
ACCEPTED = "accepted"  # payload acknowledging admission


@dataclass(frozen=True)
class Batch:
    """What the core sends back after each loop iteration."""

    messages: list  # [(request_id, RequestOutput | Exception | ACCEPTED)]
    stats: dict
    step_start: float
    step_end: float


class CoreLoop:
    """Runs in the core thread: apply commands, step, report. Touches no asyncio object."""

    def __init__(self, engine, inputs: queue.SimpleQueue, report: Callable[[Batch], None]) -> None:
        self.engine = engine
        self.inputs = inputs
        self.report = report
        self.live: set[str] = set()

    def run(self) -> None:
        while True:
            start = time.monotonic()
            messages: list = []
            # Block only when there is nothing to step; otherwise take what is queued and go.
            commands = [self.inputs.get()] if not self.engine.has_unfinished_requests() else []
            while True:
                try:
                    commands.append(self.inputs.get_nowait())
                except queue.Empty:
                    break
            for command in commands:
                if command == STOP:
                    for request_id in list(self.live):
                        self.engine.abort_request(request_id)
                    return
                self._apply(command, messages)
            if self.engine.has_unfinished_requests():
                start = time.monotonic()
                try:
                    outputs = self.engine.step()
                except Exception as e:  # noqa: BLE001 - one bad step must not kill the server
                    logger.exception("engine step failed; failing %d request(s)", len(self.live))
                    outputs = [final_output(rid, "error", f"engine error: {e}") for rid in self._fail_live()]
                for out in outputs:
                    if out.finished:
                        self.live.discard(out.request_id)
                    messages.append((out.request_id, out))
            self.report(Batch(messages, self.engine.stats(), start, time.monotonic()))

    def _apply(self, command, messages: list) -> None:
        if isinstance(command, Abort):
            if command.request_id in self.live:
                self.live.discard(command.request_id)
                self.engine.abort_request(command.request_id)
            return
        try:
            self.engine.add_request(command.request_id, command.prompt_token_ids, command.params,
                                    command.priority)
        except Exception as e:  # noqa: BLE001 - ValueError / QueueFullError go back to the caller
            messages.append((command.request_id, e))
            return
        self.live.add(command.request_id)
        messages.append((command.request_id, ACCEPTED))

    def _fail_live(self) -> list:
        failed = sorted(self.live)
        for request_id in failed:
            try:
                self.engine.abort_request(request_id)
            except Exception:  # noqa: BLE001 - best effort: the request is failed either way
                logger.exception("abort of %s after a failed step also failed", request_id)
        self.live.clear()
        return failed


def final_output(request_id: str, reason: str, error: Optional[str] = None) -> RequestOutput:
    return RequestOutput(request_id=request_id, new_token_ids=[], new_text="", new_logprobs=[],
                         finished=True, finish_reason=reason, num_prompt_tokens=0, num_output_tokens=0,
                         error=error)
