"""The draft-budget rule: a modelled forward cost, scaled by what decode steps really took."""
from sift.server.spec.budget import PLAIN_EVERY, DraftBudget
from sift.server.spec.drafters import SpecState


def _run(budget, steps, decodes, step_seconds, accepted=3):
    """Drive ``steps`` decode steps; ``step_seconds(d)`` is the wall time a step at budget d takes."""
    chosen = []
    for _ in range(steps):
        d = max(budget.choose(decodes, ["recycling"] * decodes, 8))
        chosen.append(d)
        if d:
            budget.record("recycling", d, min(accepted, d))
        budget.observe(step_seconds(d))
    return chosen


def test_memory_bound_forward_speculates():
    budget = DraftBudget(lambda b, q: 0.010)  # flat: a wider step costs nothing more
    chosen = _run(budget, 40, 1, lambda d: 0.010)
    assert chosen[0] == 0  # the plain step's real cost is observed first
    assert sum(d > 0 for d in chosen[1:]) >= len(chosen) - 1 - 40 // PLAIN_EVERY - 1


def test_compute_bound_forward_does_not_speculate():
    """Time grows with every token: no budget could pay even if every draft were accepted, so no step
    drafts."""
    budget = DraftBudget(lambda b, q: 0.001 * b * q)
    chosen = _run(budget, 4 * PLAIN_EVERY, 32, lambda d: 0.032 * (1 + d))
    assert not any(chosen)


def _half_cost(b, q):
    """A draft row costs half a plain row: d = 0 wins at the prior's acceptance, but a budget would pay if
    every draft were accepted."""
    return 0.001 * b * (1 + 0.5 * (q - 1))


def test_observed_overhead_turns_speculation_off():
    """The forward model says drafts are free, but speculative steps really take 3x: after a few
    observations the rule stops speculating (it never trades throughput for drafts)."""
    budget = DraftBudget(lambda b, q: 0.010)
    chosen = _run(budget, 60, 8, lambda d: 0.010 if d == 0 else 0.030, accepted=1)
    assert any(d > 0 for d in chosen[:10])  # tried at first, on the model's word
    assert sum(d > 0 for d in chosen[30:]) <= 1  # then dropped
    assert budget.overhead[(8, 0)] == 1.0 and min(v for (b, d), v in budget.overhead.items() if d) > 2.0


def test_steps_that_measure_are_not_samples():
    """The first step at a batch size times forwards for the model inside the step: that time is the cost
    model's, not the step's, so it must not inflate the plain step's observed cost."""
    budget = DraftBudget(lambda b, q: 0.010)
    budget.choose(4, ["ngram"] * 4, 8)
    assert budget.current is None  # measured this step
    budget.observe(5.0)
    assert (4, 0) not in budget.overhead
    d = budget.choose(4, ["ngram"] * 4, 8)
    assert budget.current == (4, max(d))


def _decoding(rid, prompt, method="ngram", temperature=0.0, num_draft_tokens=7):
    from sift.server.engine.request import Request, SamplingParams
    from sift.server.options import SpecOptions

    req = Request(rid, list(prompt), SamplingParams(temperature=temperature, speculative=SpecOptions(
        method, num_draft_tokens=num_draft_tokens)))
    req.num_computed_tokens = req.num_tokens - 1  # decoding: one new token to run
    return req


def test_shadow_trees_teach_every_budget_without_drafting():
    """Where no budget pays, no request drafts, yet the statistics learn: each step one plain request drafts a
    shadow tree that nothing runs, and the tokens it emits next score it as a verification would have."""
    from sift.server.options import SpecConfig
    from sift.server.spec import Speculator

    spec = Speculator(SpecConfig(controller="adaptive"), 128, measure=lambda b, q: 0.001 * b * q)  # compute-bound: d = 0 wins
    req = _decoding("r0", [1, 2, 3, 4] * 8)  # the last 3-gram recurs: the n-gram chain 1 2 3 4 1 2 3
    spec.on_admit(req)
    for token in (1, 2, 99):  # the target emits 1 2, then leaves the chain
        spec.begin_step([req])
        assert spec.draft(req, 64) is None  # nothing is drafted
        assert req.state_of(SpecState).control.shadow is not None and req.state_of(SpecState).control.shadow.start == 32
        req.output_token_ids.append(token)
        req.num_computed_tokens += 1
    assert ("ngram/3", 7) not in spec.controller.budget.accepted
    spec.begin_step([req])  # 1 2 99 decides the shadow: 2 drafts accepted; a new shadow follows from here
    assert {d: spec.controller.budget.accepted["ngram/3", d] for d in (1, 2, 3, 7)} == {1: 1, 2: 2, 3: 2, 7: 2}
    assert req.state_of(SpecState).control.shadow.start == 35


def test_one_shadow_a_step_the_plain_requests_in_turn():
    """A shadow waits for the tokens that decide it (none are emitted here); meanwhile the next step's shadow
    goes to another plain request."""
    from sift.server.options import SpecConfig
    from sift.server.spec import Speculator
    from sift.server.spec.adaptive import SHADOWS_PER_STEP

    spec = Speculator(SpecConfig(controller="adaptive"), 128, measure=lambda b, q: 0.001 * b * q)
    reqs = [_decoding(f"r{i}", [5 + i, 6, 7, 8] * 3) for i in range(4)]  # each an undecided n-gram chain
    for r in reqs:
        spec.on_admit(r)
    for step in range(1, 5):
        spec.begin_step(reqs)
        assert sum(r.state_of(SpecState).control.shadow is not None for r in reqs) == min(4, step * SHADOWS_PER_STEP)


def test_only_the_requests_likely_to_accept_draft():
    """4 of 32 decodes have a prompt match whose drafts are accepted, 28 have none: drafting for all 32 would
    cost more than it gains, so the rule lets the 4 draft (and not the rest) instead of nobody."""
    budget = DraftBudget(_half_cost)
    budget.calibrate(32, 32)
    for d in (1, 3, 7):
        budget.record("goose/3", d, d)
    for d in DraftBudget.candidates(32):
        budget.record("goose/0", d, 0)
    keys = ["goose/0"] * 14 + ["goose/3"] * 4 + ["goose/0"] * 14
    assert budget.choose(32, keys, 32) == [0] * 32  # the plain step's real cost is observed first
    budget.observe(0.032)
    budgets = budget.choose(32, keys, 32)
    assert budgets == [0] * 14 + [7] * 4 + [0] * 14


def test_acceptance_the_statistics_overpromise_is_scaled_down():
    """Trees that accept half of what the statistics predicted them: the rule learns the ratio and stops
    buying a budget that only pays at the predicted acceptance."""
    budget = DraftBudget(_half_cost)
    budget.calibrate(8, 8)
    budget.record("goose/3", 7, 4)  # the statistics: 4 of 7 drafts accepted
    keys = ["goose/3"] * 8
    assert budget.choose(8, keys, 8) == [0] * 8  # the plain step's real cost is observed first
    budget.observe(0.008)
    assert budget.choose(8, keys, 8) == [7] * 8 and budget.predicted == [4.0] * 8
    for _ in range(50):
        budget.realized(4.0, 2)
    assert budget.realism == 0.5
    assert budget.choose(8, keys, 8) == [0] * 8


def test_trees_that_beat_their_predictions_do_not_inflate_the_rest():
    """Realism only scales predictions down: trees accepting more than predicted raise their own statistics
    (and boosts), and a lucky early tree must not double every other request's prediction."""
    budget = DraftBudget(_half_cost)
    budget.realized(2.0, 4)
    assert budget.realism == 1.0


def test_first_sample_replaces_prior_and_budgets_share_a_floor():
    """One measured tree replaces the prior (an EMA from the prior would need ten to get there), and a larger
    budget, whose best-first tree contains the smaller one, is expected to accept at least as much."""
    budget = DraftBudget(lambda b, q: 0.010)
    assert budget.expected("goose/3", 7) == DraftBudget.prior(7)
    budget.record("goose/3", 3, 3)
    assert budget.expected("goose/3", 3) == 3.0
    budget.record("goose/3", 7, 0)  # an unlucky sample at the larger budget
    assert budget.expected("goose/3", 7) == 3.0
    assert budget.expected("goose/0", 7) == DraftBudget.prior(7)  # other evidence keys keep their own


def test_drafters_report_their_evidence():
    from sift.server.spec.drafters import RecyclingTable, make_drafter

    seq = [5, 6, 7, 8, 9, 5, 6, 7]  # the last 3-gram occurred before
    assert make_drafter("ngram", None).evidence(seq) == "ngram/3"
    assert make_drafter("goose", RecyclingTable(16)).evidence(seq) == "goose/3"
    assert make_drafter("goose", RecyclingTable(16)).evidence([1, 2, 3, 4]) == "goose/0"
    assert make_drafter("ngram", None).evidence([1, 2, 3, 1]) == "ngram/1"
    assert make_drafter("recycling", RecyclingTable(16)).evidence(seq) == "recycling"


def test_calibrate_times_every_bucket_before_serving():
    """A server speculating by default times its cost model at start-up: afterwards no step measures."""
    calls = []
    budget = DraftBudget(lambda b, q: calls.append((b, q)) or 0.001 * b * q)
    budget.calibrate(8, 7)
    assert {b for b, _ in calls} == {1, 2, 4, 8} and all((b, 0) in budget.step_time for b in (1, 2, 4, 8))
    calls.clear()
    for n in (1, 3, 8):
        budget.choose(n, ["goose/3"] * n, 7)
        assert budget.current is not None  # a sample: nothing was measured in the step
    assert calls == []


def test_a_greedy_tree_teaches_every_smaller_budget():
    """Greedy verification of a budget-d tree also gives what each smaller candidate budget would have accepted:
    the accepted path's nodes ranked below it. Sampled trees teach only the budget drafted."""
    from sift.server.engine.request import Request, SamplingParams
    from sift.server.options import SpecConfig, SpecOptions
    from sift.server.spec import Speculator
    from sift.server.spec.adaptive import AdaptiveState

    spec = Speculator(SpecConfig(controller="adaptive"), 64, measure=lambda b, q: 0.010)
    for rid, temperature in (("g", 0.0), ("s", 1.0)):
        req = Request(rid, [1, 2, 3, 4] * 8, SamplingParams(temperature=temperature, speculative=SpecOptions("ngram")))
        spec.on_admit(req)
        state = req.state_of(SpecState)
        state.control = AdaptiveState(evidence=f"key-{rid}")
        state.step_budget = 15
        spec.controller.verified(state, [0, 1, 2, 9], 4, req.params.greedy)  # ranks of the accepted path's nodes
    assert {d: spec.controller.budget.accepted["key-g", d] for d in (1, 3, 7, 15)} == {1: 1, 3: 3, 7: 3, 15: 4}
    assert [d for key, d in spec.controller.budget.accepted if key == "key-s"] == [15]


def test_clearly_losing_budgets_coast_without_scoring():
    """Where every budget is modelled clearly below the plain step, the next steps of that batch size are plain
    without scoring (up to COAST_STEPS), and another batch size is scored at once."""
    from sift.server.spec.budget import COAST_STEPS

    budget = DraftBudget(_half_cost)
    budget.calibrate(32, 32)
    for d in DraftBudget.candidates(32):
        budget.record("goose/0", d, 0)
    keys = ["goose/0"] * 32
    scored = []
    for _ in range(4 * PLAIN_EVERY):
        if budget.coast(32, 32):
            assert budget.coasting and budget.current == (32, 0) and budget.predicted == [0.0] * 32
            scored.append(False)
        else:
            scored.append(True)
            budget.choose(32, keys, 32)
        budget.observe(0.032)
    assert sum(scored) <= len(scored) // COAST_STEPS + 4  # a scored step, then coasting, renewed
    assert not budget.coast(8, 8)  # a different batch bucket is scored



def _payoff_run(tokens_when_drafting: int, steps: int = 200):
    """8 decodes whose d = 1 trees the statistics expect to accept 1 draft each: modelled 1.23x the plain
    rate once a drafting step's observed 13 ms (against 12 modelled) is learned. Plain steps emit 8 tokens in
    8 ms; drafting steps ``tokens_when_drafting`` in 13 ms."""
    budget = DraftBudget(_half_cost)
    budget.calibrate(8, 1)
    budget.record("goose/3", 1, 1)
    chosen = []
    for _ in range(steps):
        d = max(budget.choose(8, ["goose/3"] * 8, 1))
        chosen.append(d)
        budget.observe(0.013 if d else 0.008, tokens_when_drafting if d else 8)
    return budget, chosen


def test_drafting_steps_slower_than_plain_steps_raise_the_margin():
    """The model promises 1.23x, but the drafting steps emit 12 tokens in 13 ms (923 tok/s) against the plain
    steps' 1,000: the payoff check doubles the margin (0.1 -> 0.2 -> 0.4) and the rule stops drafting."""
    budget, chosen = _payoff_run(12)
    assert budget.margin[8] == 0.4
    assert sum(chosen[-100:]) == 0


def test_drafting_steps_that_deliver_keep_the_margin():
    budget, chosen = _payoff_run(16)  # 1,231 tok/s against 1,000: the trees pay as modelled
    assert budget.margin.get(8, 0.1) == 0.1 and sum(chosen[-100:]) >= 90


def test_payoff_window_sums_lost_time():
    """Plain steps: 32 tokens in 160 ms. Two drafting steps that each lose more than half a plain step raise the
    margin before the window ends; small losses paid back by wins in the same window never do; and a win's
    credit ends with its window's verdict, so it does not excuse the losses after it."""
    from sift.server.spec.budget import MARGIN

    def verdict(steps):
        budget = DraftBudget(_half_cost)
        budget.step_time[32, 0], budget.overhead[32, 0] = 0.160, 1.0  # the plain step, as observe() keeps it
        for _ in range(3):
            budget._check_payoff(32, 0, 32, 0.160)
        for tokens, seconds in steps:
            budget._check_payoff(32, 1, tokens, seconds)
        return budget.margin.get(32, MARGIN)

    assert verdict([(36, 0.270)]) == MARGIN  # 270 ms for what plain steps emit in 180: 90 ms lost
    assert verdict([(36, 0.270)] * 2) == 2 * MARGIN  # 180 ms lost, more than a plain step: at once
    assert verdict([(36, 0.200)] * 4) == 2 * MARGIN  # 20 ms lost a step: the window's verdict
    assert verdict([(8, 0.190), (96, 0.300)] * 20) == MARGIN  # 150 ms lost, 180 gained, ...: paid back
    assert verdict([(192, 0.300)] + [(36, 0.270)] * 2) == MARGIN  # 660 ms of credit, then 2 x 90 lost
    assert verdict([(192, 0.300)] + [(36, 0.270)] * 5) == 2 * MARGIN  # a new window after the first verdict


def test_an_unobserved_budget_borrows_the_nearest_tree_budgets_overhead():
    """What a tree step costs around its forward (per-request tree attention, verification) is there at every
    budget: a budget not yet observed borrows the factor of the nearest one observed, not the plain step's."""
    budget = DraftBudget(_half_cost)
    grid = DraftBudget.candidates(32)
    assert budget._factors(32, grid) == {d: 1.0 for d in grid}
    budget.overhead[32, 0], budget.overhead[32, 3] = 1.1, 1.4
    budget.overhead[32, 15] = 1.8
    factors = budget._factors(32, grid)
    assert factors[0] == 1.1 and factors[3] == 1.4 and factors[15] == 1.8
    assert factors[1] == 1.4 and factors[7] == 1.8 and factors[grid[-1]] == 1.8
