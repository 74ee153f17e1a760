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

from sift.server.cache.kv_manager import KVManager
from sift.server.config import SchedulerConfig
from sift.server.engine.outputs import ScheduledRequest, SchedulerOutput
from sift.server.engine.request import Request, RequestStatus
from sift.server.spec.tree import depths, limit_depth
from sift.server.techniques import Techniques


# options that change how a prompt's KV is computed: requests share prompt KV only if these match
_PREFILL_OPTIONS = ("eviction", "sparsity", "skipping")


class QueueFullError(RuntimeError):
    """The waiting queue is at --max-queued-requests."""


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVManager, max_model_len: int,
                 techniques: Optional[Techniques] = None, model_window: int = 0):
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        # what the techniques say of a request: its attention window, exact KV, peak, draft tree, rewind
        self.techniques = techniques or Techniques()
        # the widest of the model's own per-layer sliding windows when EVERY layer has one (else 0): KV wholly
        # outside it is never read again by any layer, so its blocks go back to the pool
        self.model_window = model_window
        self._block_copies: list = []  # copy-on-write decided between steps; sent with the next SchedulerOutput
        self._waiting: list = []  # heap of (priority, seq, request)
        self._seq = itertools.count()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_forks = 0
        self._prompt_owner: dict[int, str] = {}  # prompt hash -> first in-flight request with that prompt
        self._compactions: list = []  # CompactPlans decided between steps; sent with the next SchedulerOutput
        # requests of a step that failed without a known culprit: each runs alone until one of its steps succeeds
        # (then it is cleared), so a second failure names its culprit (see LLMEngine.step)
        self.suspects: set[str] = set()

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
        self._prompt_owner.setdefault(self._prompt_key(req), req.request_id)
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
        key = self._prompt_key(req)
        if self._prompt_owner.get(key) == req.request_id:
            del self._prompt_owner[key]
        if self.kv.has(req.request_id):
            self.kv.free(req.request_id)
        self.requests.pop(req.request_id, None)

    def queue_compaction(self, plan) -> None:
        """A compaction the KV manager already applied to its tables: the runner moves the KV before the next forward."""
        self._compactions.append(plan)

    # -- scheduling -----------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """The next step. While there are suspects, the first one (in queue order) is scheduled alone; when it
        cannot be (no KV room), the others run without any suspect, so that they free room."""
        self.suspects &= self.requests.keys()
        if not self.suspects:
            return self._schedule()
        suspect = min((self.requests[rid] for rid in self.suspects), key=lambda r: (r.priority, r.arrival_time))
        out = self._schedule_subset(lambda r: r is suspect)
        if out.requests:
            return out
        # nothing scheduled: keep what was decided between steps for the next SchedulerOutput
        self._compactions, self._block_copies = out.compactions + self._compactions, out.block_copies + self._block_copies
        return self._schedule_subset(lambda r: r.request_id not in self.suspects)

    def _schedule_subset(self, keep: Callable[[Request], bool]) -> SchedulerOutput:
        """``_schedule`` as if only the requests ``keep`` accepts existed (the others neither run, nor are
        admitted, nor are preempted)."""
        running, waiting = self.running, self._waiting
        self.running = [r for r in running if keep(r)]
        self._waiting = [e for e in waiting if keep(e[3])]
        heapq.heapify(self._waiting)
        try:
            return self._schedule()
        finally:
            self.running = [r for r in running if not keep(r)] + self.running
            self._waiting = [e for e in waiting if not keep(e[3])] + self._waiting
            heapq.heapify(self._waiting)

    def preempt_all(self) -> None:
        """Recompute every running request from scratch (after a failed step left their KV unknown)."""
        out = SchedulerOutput()
        for req in list(self.running):
            self._preempt(req, out)
        self._compactions, self._block_copies = [], []  # their KV is gone: nothing left to move

    def _schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(compactions=self._compactions, block_copies=self._block_copies)
        self._compactions, self._block_copies = [], []
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted_any = False
        drafts: dict = {}  # request id -> DraftTree fed after the request's last token
        self.techniques.begin_step(self.running)

        for req in list(self.running):
            if budget <= 0:
                break
            if req.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0:
                continue
            tree = self._draft(req, budget) if n == 1 else None
            if tree is not None:
                n += len(tree)
                drafts[req.request_id] = tree
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
            self._admit(scheduled, budget, out)

        for req, n, slots in scheduled:
            out.requests.append(self._make_scheduled(req, n, slots, drafts.get(req.request_id)))
        return out

    def _draft(self, req: Request, budget: int):
        """A draft tree for a decode, sized to the step budget and the context limit; None when the
        request does not speculate or its tree's blocks are not free (drafts never cause preemption)."""
        tree = self.techniques.draft(req, min(budget - 1, self.max_model_len - req.num_tokens))
        max_depth = self.techniques.draft_depth(req)
        if tree is not None and max_depth is not None:
            tree = limit_depth(tree, max_depth)
        if tree is not None and self.kv.blocks_needed(req.request_id, 1 + len(tree)) > self.kv.num_free_blocks:
            return None
        return tree

    def _admit(self, scheduled: list, budget: int, out: SchedulerOutput) -> None:
        deferred = []  # identical-prompt siblings waiting for their owner's prefill
        while self._waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self._waiting[0][3]
            fork = self._fork_from_owner(req, out)
            if fork == "wait":
                deferred.append(heapq.heappop(self._waiting))
                continue
            if fork is not None:
                heapq.heappop(self._waiting)
                self._start(req, req.num_computed_tokens, 1, fork, scheduled)
                budget -= 1
                continue
            if self.config.admission == "reserve" and not self._fits_reserved(req):
                break
            blocks, num_cached = ([], 0)
            if req.params.prompt_logprobs is None and self.techniques.exact_kv(req) > 0:
                blocks, num_cached = self.kv.get_computed_blocks(req.token_ids)
            n = min(req.num_tokens - num_cached, budget)
            if self.config.long_prefill_token_threshold > 0:
                n = min(n, self.config.long_prefill_token_threshold)
            slots = self.kv.allocate_slots(req.request_id, n, blocks, num_cached)
            if slots is None:
                break
            heapq.heappop(self._waiting)
            self._start(req, num_cached, n, slots, scheduled)
            budget -= n
        for entry in deferred:
            heapq.heappush(self._waiting, entry)

    def _peak_blocks(self, req: Request) -> int:
        tokens = min(self.techniques.peak_tokens(req), self.max_model_len)
        return -(-tokens // self.kv.block_size)

    def _fits_reserved(self, req: Request) -> bool:
        """Reserved admission: the peaks of the running requests and of ``req`` fit the pool together."""
        reserved = sum(self._peak_blocks(r) for r in self.running)
        return reserved + self._peak_blocks(req) <= self.kv.pool.num_usable_blocks

    def _start(self, req: Request, num_cached: int, n: int, slots: list, scheduled: list) -> None:
        req.status = RequestStatus.RUNNING
        req.num_computed_tokens = num_cached
        req.num_cached_tokens = max(req.num_cached_tokens, num_cached)
        if req.first_scheduled_time is None:
            req.first_scheduled_time = time.monotonic()
        self.running.append(req)
        scheduled.append((req, n, slots))

    def _fork_from_owner(self, req: Request, out: SchedulerOutput):
        """Share the KV of an in-flight request with the identical prompt (``n > 1`` fan-out, or the
        same prompt sent twice) by copy-on-write fork instead of a second prefill.

        Returns None (admit normally), "wait" (the owner is still prefilling), or the slot of the
        one token the child re-feeds (the last prompt token, whose logits the child samples from).
        Only requests whose prompt KV is computed identically (same prefill-affecting options, owner's
        KV never rewritten) share.
        """
        if req.num_output_tokens or req.num_preemptions or req.params.prompt_logprobs is not None:
            return None
        owner = self.requests.get(self._prompt_owner.get(self._prompt_key(req), ""))
        if owner is None or owner is req or owner.prompt_token_ids != req.prompt_token_ids:
            return None
        if any(getattr(owner.params, f) != getattr(req.params, f) for f in _PREFILL_OPTIONS):
            return None
        if owner.status != RequestStatus.RUNNING:
            return "wait" if owner.status == RequestStatus.WAITING and not owner.num_preemptions else None
        if owner.num_computed_tokens < owner.num_prompt_tokens:
            return "wait"
        if not self.kv.is_pristine(owner.request_id):
            return None
        copies = self.kv.fork(owner.request_id, req.request_id)
        if copies is None:
            return None
        more = self.kv.truncate(req.request_id, req.num_prompt_tokens - 1)
        slots = self.kv.allocate_slots(req.request_id, 1) if more is not None else None
        if slots is None:
            self.kv.free(req.request_id)
            return None
        out.block_copies.extend(copies + more)
        req.num_computed_tokens = req.num_prompt_tokens - 1
        self.num_forks += 1
        return slots

    @staticmethod
    def _prompt_key(req: Request) -> int:
        return hash(tuple(req.prompt_token_ids))

    def _pick_victim(self) -> Request:
        return max(self.running, key=lambda r: (r.priority, r.arrival_time))

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._push_waiting(req)

    def _make_scheduled(self, req: Request, n: int, slots: list, tree=None) -> ScheduledRequest:
        start = req.num_computed_tokens
        tokens = req.token_ids[start:start + n]
        positions = list(range(start, start + n))
        if tree is not None:  # root = the last token; a draft node sits at context length + depth - 1
            tokens = [req.token_ids[-1], *tree.tokens]
            positions = [start] + [start + d for d in depths(tree.parents)]
        window, sinks = self.techniques.window(req)
        return ScheduledRequest(
            request_id=req.request_id,
            token_ids=tokens,
            positions=positions,
            slot_mapping=slots,
            block_table=self.kv.block_table(req.request_id),
            kv_len=self.kv.num_resident(req.request_id),
            sample=tree is not None or start + n == req.num_tokens,
            draft_parents=None if tree is None else list(tree.parents),
            draft_ranks=None if tree is None else list(tree.ranks()),
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
            toks = sampled.get(s.request_id)
            num_done = len(s.token_ids)
            if s.draft_parents is not None and toks:
                # the runner compacted root + accepted drafts (one per token but the bonus) to the front
                num_done = len(toks)
                copies = self.kv.truncate(req.request_id, s.kv_len - len(s.token_ids) + num_done)
                assert copies == [], "draft slots lie in the request's private tail blocks"
            req.num_computed_tokens += num_done
            if s.sample and toks:
                req.output_token_ids.extend(toks)
                touched.append(req)
            if self.kv.has(req.request_id):
                self.kv.cache_blocks(req.request_id, req.token_ids,
                                     min(req.num_computed_tokens, self.techniques.exact_kv(req)))
                window, sinks = self.techniques.window(req)
                if window:
                    self.kv.release_outside_window(req.request_id, sinks, window)
                elif self.model_window and self.kv.is_pristine(req.request_id):  # kv index = position
                    self.kv.release_outside_window(req.request_id, 0, self.model_window)
                self._rewind(req)
        return touched

    def _rewind(self, req: Request) -> None:
        """Recompute the request's latest tokens in its next step (their K/V are overwritten)."""
        k = self.techniques.rewind(req)  # cheap, and 0 for almost every request: checked before the block-table scan
        if not k or not self.kv.is_pristine(req.request_id):
            return  # a compacted cache (a state it never leaves) no longer maps kv index = position
        copies = self.kv.truncate(req.request_id, req.num_computed_tokens - k)
        if copies is None:
            return
        self._block_copies.extend(copies)
        req.num_computed_tokens -= k

    def abort(self, request_ids: Iterable[str]) -> list[Request]:
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is not None:
                self.finish(req, RequestStatus.FINISHED_ABORTED)
                done.append(req)
        return done
