"""The technique lifecycle's plumbing: how the collection combines the techniques' answers, and the one epoch
check of the typed per-request states."""
from dataclasses import dataclass

from sift.server.engine.request import Request, SamplingParams
from sift.server.techniques import ALL_TOKENS, Technique, Techniques, TechniqueState, reads_every_token


class Windowed(Technique):
    name = "windowed"

    def window(self, req):
        return 64, 4

    def exact_kv(self, req):
        return 0


class Bounded(Technique):
    name = "bounded"

    def peak_tokens(self, req):
        return 20

    def draft_depth(self, req):
        return 3


class Drafting(Technique):
    name = "drafting"

    def extra_tokens(self, req):
        return 8

    def draft_depth(self, req):
        return 5

    def rewind(self, req):
        return 2


def _req(max_tokens=100):
    return Request("r", list(range(10)), SamplingParams(max_tokens=max_tokens))


def test_neutral_answers_without_techniques():
    t, req = Techniques(), _req()
    assert t.window(req) == (0, 0) and t.exact_kv(req) == ALL_TOKENS and t.peak_tokens(req) == 110
    assert t.draft(req, 8) is None and t.draft_depth(req) is None and t.rewind(req) == 0
    assert t.after_step(None, None, {}) == [] and t.stats([]) == {}


def test_answers_combine():
    t, req = Techniques(Bounded(), Windowed(), Drafting()), _req()
    assert t["windowed"].name == "windowed"
    assert t.window(req) == (64, 4)
    assert t.exact_kv(req) == 0  # the least exact technique decides what the prefix cache may share
    assert t.peak_tokens(req) == 20 + 8  # the tightest bound, plus a step's draft tree
    assert t.draft_depth(req) == 3 and t.rewind(req) == 2
    assert Techniques(Drafting()).peak_tokens(_req(max_tokens=5)) == 15 + 8


def test_only_techniques_that_answer_are_asked():
    t = Techniques(Windowed(), Bounded())
    assert t._asks["window"] == [t["windowed"]] and t._asks["rewind"] == []


@dataclass
class Counting(TechniqueState):
    restarts: int = 0

    def restart(self, req) -> None:
        self.restarts += 1


def test_state_restarts_once_per_preemption():
    req = _req()
    assert req.state_of(Counting) is None and not reads_every_token(req)
    req.technique_state[Counting] = Counting()
    assert req.state_of(Counting).restarts == 0 and reads_every_token(req)
    req.num_preemptions = 2  # preempted twice before its next access: one restart, from an empty cache
    assert req.state_of(Counting).restarts == 1
    assert req.state_of(Counting).restarts == 1
    req.num_preemptions = 3
    assert req.state_of(Counting).restarts == 2


def test_an_evicting_request_restarts_from_an_empty_policy_after_preemption():
    from sift.server.options import EvictionOptions
    from sift.server.policies.eviction import H2O, Eviction, EvictionState

    eviction, req = Eviction(EvictionOptions(method="h2o", budget=16, window=4), 1, 1, kv=None), _req()
    eviction.on_admit(req)
    policy = req.state_of(EvictionState).policy
    policy.num_entries = 30
    assert eviction.draft_depth(req) is not None and req.state_of(EvictionState).policy is policy
    req.num_preemptions = 1
    fresh = req.state_of(EvictionState).policy
    assert isinstance(fresh, H2O) and fresh is not policy and fresh.num_entries == 0 and fresh.capacity == 16
