"""Continuous batching under one token budget per step.

Each step: running requests first (decodes, and the rest of chunked prefills),
then waiting requests in (priority, arrival) order as chunked prefills, while
the budget, the sequence cap and the KV pool allow. When the pool runs dry for a
running request, the latest lowest-priority running request is preempted by
recompute (its blocks are freed; it re-enters the front of the queue).

Pure Python: no tensors, testable with the KV manager alone.
"""
from __future__ import annotations

import heapq
import itertools
import time
from typing import Callable, Iterable, Optional

from server.cache.kv_manager import KVManager
from server.config import SchedulerConfig
from server.engine.outputs import ScheduledRequest, SchedulerOutput
from server.engine.request import Request, RequestStatus


class QueueFullError(RuntimeError):
    """The waiting queue is at --max-queued-requests."""


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVManager, max_model_len: int,
                 window_of: Optional[Callable[[Request], tuple]] = None):
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        # (window, sinks) of a request: 0 window = dense. Supplied by the sparsity policy.
        self.window_of = window_of or (lambda req: (0, 0))
        self._waiting: list = []  # heap of (priority, seq, request)
        self._seq = itertools.count()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # -- queue ---------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self.running)

    def add_request(self, req: Request) -> None:
        if len(self._waiting) >= self.config.max_queued_requests:
            raise QueueFullError(f"waiting queue is full ({self.config.max_queued_requests} requests)")
        self.requests[req.request_id] = req
        self._push_waiting(req)

    def _push_waiting(self, req: Request) -> None:
        heapq.heappush(self._waiting, (req.priority, req.arrival_time, next(self._seq), req))

    def finish(self, req: Request, status: RequestStatus) -> None:
        """End a request (stop, length, abort, error) and free its KV blocks at once."""
        if req.status.finished:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self._waiting = [e for e in self._waiting if e[3] is not req]
            heapq.heapify(self._waiting)
        req.status = status
        if self.kv.has(req.request_id):
            self.kv.free(req.request_id)
        self.requests.pop(req.request_id, None)

    # -- scheduling -----------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted_any = False

        for req in list(self.running):
            if budget <= 0:
                break
            if req.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0:
                continue
            while True:
                slots = self.kv.allocate_slots(req.request_id, n)
                if slots is not None:
                    break
                victim = self._pick_victim()
                self._preempt(victim, out)
                preempted_any = True
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                continue
            scheduled.append((req, n, slots))
            budget -= n

        if not preempted_any:
            self._admit(scheduled, budget)

        for req, n, slots in scheduled:
            out.requests.append(self._make_scheduled(req, n, slots))
        return out

    def _admit(self, scheduled: list, budget: int) -> None:
        while self._waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self._waiting[0][3]
            blocks, num_cached = ([], 0)
            if req.params.prompt_logprobs is None:
                blocks, num_cached = self.kv.get_computed_blocks(req.token_ids)
            n = min(req.num_tokens - num_cached, budget)
            if self.config.long_prefill_token_threshold > 0:
                n = min(n, self.config.long_prefill_token_threshold)
            slots = self.kv.allocate_slots(req.request_id, n, blocks, num_cached)
            if slots is None:
                break
            heapq.heappop(self._waiting)
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_cached
            req.num_cached_tokens = max(req.num_cached_tokens, num_cached)
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            self.running.append(req)
            scheduled.append((req, n, slots))
            budget -= n

    def _pick_victim(self) -> Request:
        return max(self.running, key=lambda r: (r.priority, r.arrival_time))

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(req.request_id)
        self._push_waiting(req)

    def _make_scheduled(self, req: Request, n: int, slots: list) -> ScheduledRequest:
        start = req.num_computed_tokens
        tokens = req.token_ids[start:start + n]
        window, sinks = self.window_of(req)
        return ScheduledRequest(
            request_id=req.request_id,
            token_ids=tokens,
            positions=list(range(start, start + n)),
            slot_mapping=slots,
            block_table=self.kv.block_table(req.request_id),
            kv_len=self.kv.num_resident(req.request_id),
            sample=start + n == req.num_tokens,
            window=window,
            sinks=sinks,
        )

    # -- after the step ---------------------------------------------------------------
    def update(self, sched: SchedulerOutput, sampled: dict) -> list[Request]:
        """Advance computed counts and append sampled tokens. Returns the requests that got tokens."""
        touched = []
        for s in sched.requests:
            req = self.requests.get(s.request_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            req.num_computed_tokens += len(s.token_ids)
            toks = sampled.get(s.request_id)
            if s.sample and toks:
                req.output_token_ids.extend(toks)
                touched.append(req)
            if self.kv.has(req.request_id):
                self.kv.cache_blocks(req.request_id, req.token_ids, req.num_computed_tokens)
        return touched

    def abort(self, request_ids: Iterable[str]) -> list[Request]:
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is not None:
                self.finish(req, RequestStatus.FINISHED_ABORTED)
                done.append(req)
        return done
