"""Scheduler policy with the real KV manager and no model."""
import pytest

from sift.server.cache.kv_manager import KVManager
from sift.server.config import SchedulerConfig
from sift.server.engine.request import Request, RequestStatus, SamplingParams
from sift.server.engine.scheduler import QueueFullError, Scheduler
from sift.server.techniques import Technique, Techniques


def _sched(num_blocks=64, **kw):
    return Scheduler(SchedulerConfig(**kw), KVManager(num_blocks, 4), max_model_len=256)


def _req(rid, n, priority=0, t=0.0):
    base = 1000 * (sum(map(ord, rid)) % 50)  # distinct prompts: no accidental prefix-cache hits
    return Request(rid, list(range(base + 1, base + n + 1)), SamplingParams(max_tokens=8), priority=priority, arrival_time=t)


def _fake_step(s, out):
    s.update(out, {r.request_id: [7] for r in out.requests if r.sample})


def test_budget_decodes_first_then_chunked_prefill():
    s = _sched(max_num_batched_tokens=10)
    s.add_request(_req("a", 6, t=0))
    out = s.schedule()
    assert [(r.request_id, len(r.token_ids), r.sample) for r in out.requests] == [("a", 6, True)]
    _fake_step(s, out)
    s.add_request(_req("b", 20, t=1))
    out = s.schedule()
    # a decodes 1 token first, then b gets the remaining 9 of the budget
    assert [(r.request_id, len(r.token_ids), r.sample) for r in out.requests] == [("a", 1, True), ("b", 9, False)]
    assert out.requests[1].positions == list(range(9))
    _fake_step(s, out)
    out = s.schedule()
    assert [(r.request_id, len(r.token_ids)) for r in out.requests] == [("a", 1), ("b", 9)]


def test_priority_order_and_queue_limit():
    s = _sched(max_num_batched_tokens=4, max_queued_requests=3)
    s.add_request(_req("low", 4, priority=5, t=0))
    s.add_request(_req("high", 4, priority=-1, t=1))
    s.add_request(_req("mid", 4, priority=0, t=2))
    with pytest.raises(QueueFullError):
        s.add_request(_req("x", 4))
    assert [r.request_id for r in s.schedule().requests] == ["high"]


def test_preemption_by_recompute_frees_blocks():
    s = _sched(num_blocks=5, max_num_batched_tokens=64)  # 4 usable blocks of 4 tokens
    s.add_request(_req("a", 8, t=0))
    s.add_request(_req("b", 8, t=1))
    out = s.schedule()
    assert len(out.requests) == 2
    _fake_step(s, out)  # 8 resident entries each = 2 full blocks each: the pool is full
    out = s.schedule()
    # a needs a 3rd block: b (latest) is preempted and its blocks freed
    b = s.requests["b"]
    assert s.num_preemptions == 1 and b.num_preemptions == 1 and s.requests["a"].num_preemptions == 0
    assert [r.request_id for r in out.requests] == ["a"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    s.finish(s.requests["a"], RequestStatus.FINISHED_ABORTED)
    out = s.schedule()
    r = out.requests[0]
    # recompute prompt + output; its first block survives in the prefix cache after the preemption
    assert r.request_id == "b" and r.positions[-1] == 8 and r.kv_len == 9 and r.sample
    assert s.requests["b"].num_cached_tokens == 4
    s.finish(s.requests["b"], RequestStatus.FINISHED_ABORTED)
    assert s.kv.num_free_blocks == 4


def test_max_num_seqs():
    s = _sched(max_num_seqs=2)
    for i in range(3):
        s.add_request(_req(f"r{i}", 3, t=i))
    assert len(s.schedule().requests) == 2 and s.num_waiting == 1


def _long_req(rid, n, max_tokens):
    base = 1000 * (sum(map(ord, rid)) % 50)
    return Request(rid, list(range(base + 1, base + n + 1)), SamplingParams(max_tokens=max_tokens))


def _run_all(s):
    admitted_together = 0
    while s.has_unfinished():
        out = s.schedule()
        admitted_together = max(admitted_together, s.num_running)
        s.update(out, {r.request_id: [7] for r in out.requests if r.sample})
        for req in list(s.running):
            if req.num_output_tokens >= req.params.max_tokens:
                s.finish(req, RequestStatus.FINISHED_LENGTH)
    return admitted_together


class BoundedKV(Technique):
    """A technique bounding every request's resident KV to 16 tokens."""

    name = "bounded"

    def peak_tokens(self, req) -> int:
        return 16


def test_reserved_admission_counts_peaks_and_never_preempts():
    # 8-token prompts + 24 tokens = 8 blocks of 4 at peak; 33 usable blocks hold 4 such requests at once
    s = Scheduler(SchedulerConfig(admission="reserve"), KVManager(34, 4), max_model_len=256)
    for i in range(6):
        s.add_request(_long_req(f"r{i}", 8, 24))
    assert _run_all(s) == 4 and s.num_preemptions == 0
    # optimistic admission takes all six at once and has to preempt as they grow
    s = Scheduler(SchedulerConfig(), KVManager(34, 4), max_model_len=256)
    for i in range(6):
        s.add_request(_long_req(f"r{i}", 8, 24))
    assert _run_all(s) == 6 and s.num_preemptions > 0
    # a policy bounding a request's resident KV to 16 tokens (4 blocks) lets 8 fit in the same pool
    s = Scheduler(SchedulerConfig(admission="reserve"), KVManager(34, 4), max_model_len=256,
                  techniques=Techniques(BoundedKV()))
    for i in range(10):
        s.add_request(_long_req(f"r{i}", 8, 24))
    assert s.schedule() and s.num_running == 8
