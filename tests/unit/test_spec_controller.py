"""The simple speculation controller on a fake forward-timing function (no model)."""
from sift.server.engine.request import Request, SamplingParams
from sift.server.options import SpecConfig, SpecOptions
from sift.server.spec import Speculator
from sift.server.spec.controller import PRIOR_ACCEPT, SimpleController, expected_accepted
from sift.server.spec.drafters import SpecState


def _forward(b, q):
    """Flat (memory-bound) up to 20 rows, then 0.5 ms a row: a draft row is free at small batches and costs
    what a plain row does at large ones."""
    return max(0.010, 0.0005 * b * q)


def _speculator(**spec):
    return Speculator(SpecConfig(method="goose", controller="simple", **spec), 128, measure=_forward, max_batch=64)


def _decodes(spec, n, method="goose", num_draft_tokens=15):
    reqs = []
    for i in range(n):
        req = Request(f"r{i}", [1, 2, 3, 4] * 4, SamplingParams(temperature=0.0, speculative=SpecOptions(
            method, num_draft_tokens=num_draft_tokens)))
        req.num_computed_tokens = req.num_tokens - 1  # decoding: one new token to run
        spec.on_admit(req)
        reqs.append(req)
    return reqs


def _budgets(spec, reqs):
    spec.begin_step(reqs)
    return [r.state_of(SpecState).step_budget for r in reqs]


def test_n_is_the_largest_batch_where_a_tree_pays_at_the_prior():
    calls = []
    ctl = SimpleController(lambda b, q: calls.append(b) or _forward(b, q), max_batch=64)
    ctl.calibrate(15)
    # 8 x 2 rows are still free (a d = 1 tree gains 1.5x); 16 x 2 rows cost 1.6 plain steps for 1.5x the tokens
    assert ctl.limit == 8
    assert set(calls) == {1, 2, 4, 8, 16}  # the first bucket that does not pay ends the timing
    assert ctl.times[16][0] == 0.010 and 1 in ctl.times[16]


def test_drafts_at_small_batches_and_stops_above_n():
    spec = _speculator()
    assert all(d > 0 for d in _budgets(spec, _decodes(spec, 8)))
    assert not spec.controller.off
    assert _budgets(spec, _decodes(spec, 9)) == [0] * 9
    assert spec.controller.off


def test_the_flag_sets_n_and_times_only_the_batches_below_it():
    calls = []
    spec = Speculator(SpecConfig(method="goose", controller="simple", disable_by_batch_size=2), 128,
                      measure=lambda b, q: calls.append(b) or _forward(b, q), max_batch=64)
    assert all(d > 0 for d in _budgets(spec, _decodes(spec, 2)))  # timed at the first speculating step
    assert set(calls) == {1, 2}
    assert _budgets(spec, _decodes(spec, 3)) == [0] * 3


def test_tree_size_grows_with_acceptance_and_shrinks_without():
    spec = _speculator()
    reqs = _decodes(spec, 4)  # 4 x 5 rows are free: at the prior, d = 3 is the best buy
    assert _budgets(spec, reqs) == [3] * 4
    for _ in range(30):  # every tree's path reaches its deepest node
        spec.controller.record("goose", 3, 3)
    grown = _budgets(spec, reqs)[0]
    assert grown > 3
    for _ in range(30):  # nothing accepted
        spec.controller.record("goose", 0, grown)
    assert _budgets(spec, reqs)[0] < grown
    for _ in range(30):
        spec.controller.record("goose", 0, 3)
    assert _budgets(spec, reqs) == [0] * 4  # even free rows are not worth a tree that accepts nothing
    assert spec.controller.alpha("ngram") == PRIOR_ACCEPT  # each drafting method keeps its own rate


def test_tree_size_capped_by_the_request():
    spec = _speculator()
    for _ in range(30):
        spec.controller.record("goose", 7, 7)
    assert _budgets(spec, _decodes(spec, 1, num_draft_tokens=2)) == [2]


def test_without_timing_every_request_drafts_its_full_budget():
    spec = Speculator(SpecConfig(), 128)
    spec.controller = SimpleController(None, 64)
    assert _budgets(spec, _decodes(spec, 40, "ngram", 12)) == [12] * 40


def test_expected_accepted_is_the_chain_sum():
    assert expected_accepted(0.5, 1) == 0.5 and expected_accepted(0.5, 3) == 0.875
    assert expected_accepted(1.0, 7) == 7.0 and expected_accepted(0.0, 7) == 0.0
