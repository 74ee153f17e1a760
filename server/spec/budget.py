"""How many draft tokens a step can afford: a measured step-cost model times running acceptance.

For a step with B running decodes, a budget d from ``CANDIDATES`` (capped by each request's own
``num_draft_tokens``) goes to the m speculating requests expected to accept the most at d, with (d, m)
chosen to maximise expected tokens per second::

    (B + sum of the m largest accepted_i(d)) / step_time(B, d * m / B)

so that where only a few requests have a continuation worth drafting (a matched n-gram, a repetitive code
prompt) those few draft, instead of every request's tree or none being bought. ``step_time(B, e)`` is
measured the first time a batch-size bucket (a power of two) speculates: a forward of B sequences of 1 + d
tokens each, for every candidate d (short, bounded by ``MEASURE_SECONDS``; sizes past the limit are
extrapolated linearly); a step where only some draft, e draft rows per sequence, costs what the smallest
candidate budget >= e does (a forward's cost grows in steps with its rows, :meth:`DraftBudget._class`).
``accepted_i(d)`` is the running mean of accepted draft tokens per verified tree at budget d, kept per
*evidence key* (the method and what its drafter found this step, :meth:`Drafter.evidence`: ``goose/3`` = a
3-gram prompt match to build the spine from, ``goose/0`` = a table-only tree) as the plain mean of its first
samples, an EMA after (one measurement replaces the prior), times each request's own ``boost`` (its
acceptance relative to its key's, a faster EMA), at most d: acceptance differs far more between a matched
continuation and a guess, or a repetitive code prompt and free prose, than between budgets. Every prediction
is scaled by ``realism``, the measured ratio of accepted drafts to predicted ones over recent trees:
choosing the requests whose statistics look best biases the chosen ones' predictions high (on CPU, about 2x
on chat prompts), and an unbiased rule would buy trees that do not pay. When the batch is compute-bound the
time grows with B(1 + d) and the rule picks d = 0 (no speculation); a budget that stops paying off is
abandoned as its EMA falls. While d = 0 wins, the statistics still learn, at no forward cost, from *shadow*
trees (:meth:`sift.server.spec.Speculator.plan`): a tree drafted but not run, scored against the tokens the
request then emits, which is what verifying it would have accepted. So a recovering acceptance rate (a new
prompt, a code block) is noticed, and a large budget whose acceptance the prior underrates (a code prompt's
n-gram chains: 4 accepted tokens per tree at d = 15 against the prior's 2) is measured, without buying a
tree to find out (the probe trees this replaced cost 0.4-0.6% of a 32-stream chat run on CPU, where a step
with any tree in it took 25% longer). Where no budget is modelled even half the margin above the plain step,
the next few steps of that batch size are plain without being scored (:meth:`DraftBudget.coast`): scoring is
itself a cost. A budget must promise ``MARGIN`` more throughput than the plain step: a marginal modelled
gain is within the noise of the model and of the machine, and the rule's promise is never to cost
throughput. That promise is also checked on outcomes (:meth:`DraftBudget._check_payoff`): per batch size,
the time a window of drafting steps lost against the plain steps' token rate; where they lost, the
margin doubles (at 32 streams on CPU a tree step emitted 120-160 tokens/s against the plain steps'
190, so only sure trees pay there).

The forward alone misses what a speculative step costs around it (drafting, tree masks, verification,
Token Recycling's table updates, per-request attention of tree rows). So the engine reports the wall
time of every decode-only step (:meth:`DraftBudget.observe`), and each (bucket, d) keeps an EMA of
observed / modelled time that scales its modelled time (a step where m of B draft d counts under the
smallest candidate >= d * m / B); a budget not yet observed borrows the factor of the nearest budget
d > 0 observed at that batch size (what a tree step costs around its forward, per-request tree attention
and verification, is there at every budget), or d = 0's before any tree step was observed. d = 0 itself is
observed first and then again every ``PLAIN_EVERY`` steps while speculation wins, so the comparison is
always against the plain step's real cost.
"""
from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

# 1 + d tree rows a power of two (whole tiles on a GPU), and d = 2: where the CPU's BLAS runs up to three
# rows at the cost of one (a one-stream forward of 1/3/4 tokens: 45/47/62 ms on this project's machine),
# a two-token chain is almost free
CANDIDATES = (0, 1, 2, 3, 7, 15, 31, 63)
MARGIN = 0.1  # a budget must promise this much more throughput than the plain step to be chosen
MEASURE_SECONDS = 1.5
EMA = 0.1
BOOST_EMA = 0.3  # per request: reacts within a few steps
PLAIN_EVERY = 32  # while speculation wins, every PLAIN_EVERY-th step is plain, to observe the plain step's cost
MAX_MARGIN = 0.8  # the most the payoff check (DraftBudget._check_payoff) raises a batch size's margin to
PAYOFF_STEPS = 4  # drafting steps in one payoff verdict (_check_payoff) of a batch size
PAYOFF_LOSS = 1.0  # plain steps' worth of time lost that brings the verdict forward
COAST_STEPS = 8  # steps of a batch size run plain without scoring after one where no budget came close
REALISM_EMA = 0.02  # over trees (a step verifies up to a batch of them)


@dataclass
class _Payoff:
    """One batch size's payoff window (:meth:`DraftBudget._check_payoff`)."""

    plain_rate: Optional[float] = None  # plain steps' tokens per second (EMA)
    tokens: int = 0  # drafting steps since the last verdict: their tokens, seconds and count
    seconds: float = 0.0
    steps: int = 0


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class DraftBudget:
    """``measure(num_seqs, q_len) -> seconds`` times one forward; None disables the cost model (every
    request then drafts up to its own ``num_draft_tokens``)."""

    def __init__(self, measure: Optional[Callable[[int, int], float]] = None):
        self.measure = measure
        self.step_time: dict = {}  # (batch bucket, d) -> seconds
        self.accepted: dict = {}  # (evidence key, d) -> running mean of accepted draft tokens per tree
        self.samples: dict = {}  # (evidence key, d) -> how many trees that mean has seen
        self.overhead: dict = {}  # (bucket, d) -> EMA of observed step time / modelled forward time
        self.current: Optional[tuple] = None  # (bucket, budget class) of the step being run, None: not a sample
        self._modelled = 0.0  # the modelled forward time of that step
        self._measured = False  # this step's choose() ran forwards to measure them
        self._steps = 0
        self.predicted: list = []  # the last choose()'s expected accepted drafts per request (0: no tree)
        self._pred_mean = self._real_mean = 0.0  # running means over trees: predicted vs realized acceptance
        self._trees = 0
        self._coast: Optional[tuple] = None  # (bucket, step): steps of that batch bucket before it are plain
        self.margin: dict = {}  # bucket -> the margin in force there (MARGIN unless the payoff check raised it)
        self._payoff: dict = {}  # bucket -> _Payoff (see _check_payoff)

    @staticmethod
    def candidates(cap: int) -> list:
        return [d for d in CANDIDATES if d < cap] + [cap]

    @staticmethod
    def prior(d: int) -> float:
        return 0.5 * math.log2(1 + d)

    def expected(self, key: str, d: int) -> float:
        """Accepted drafts per tree at budget d: its own mean (or the prior), and at least any smaller
        budget's mean (every drafter's tree of d nodes contains the tree of fewer, :mod:`sift.server.spec.tree`,
        so greedy acceptance of the smaller one carries over), so a few unlucky samples at one budget do
        not hide it."""
        own = self.accepted.get((key, d), self.prior(d))
        return max([own] + [self.accepted[key, c] for c in CANDIDATES if c < d and (key, c) in self.accepted])

    def _time(self, bucket: int, d: int, deadline: Optional[float]) -> float:
        """Measured step time, measuring it now while the deadline allows, else extrapolated
        linearly in d from the two largest measured budgets."""
        key = (bucket, d)
        if key in self.step_time:
            return self.step_time[key]
        done = sorted(m for (b, m) in self.step_time if b == bucket)
        guess = None
        if done:
            hi = done[-1]
            lo = done[-2] if len(done) > 1 else hi
            t_hi, t_lo = self.step_time[(bucket, hi)], self.step_time[(bucket, lo)]
            slope = (t_hi - t_lo) / (hi - lo) if hi > lo else t_hi / (1 + hi)
            guess = t_hi + slope * (d - hi)
        if guess is None or (deadline is not None and time.perf_counter() + guess < deadline):
            self.step_time[key] = min(self.measure(bucket, 1 + d), self.measure(bucket, 1 + d))  # damp noise
            self._measured = True
            return self.step_time[key]
        return guess

    def calibrate(self, max_batch: int, cap: int) -> None:
        """Time every batch-size bucket up to ``max_batch`` now (start-up), so that no serving step pauses
        to measure (each bucket's first speculating step would otherwise run its forwards, up to
        ``MEASURE_SECONDS``, inside a user's step)."""
        if self.measure is None:
            return
        bucket = 1
        while bucket <= _bucket(max_batch):
            deadline = self._deadline(bucket)
            if deadline is not None:
                for d in self.candidates(cap):
                    self._time(bucket, d, deadline)
            bucket *= 2
        self._measured = False

    def _deadline(self, bucket: int) -> Optional[float]:
        """For a bucket not timed yet: warm its forward up and return the time its measurements must end
        by (``MEASURE_SECONDS`` from now); None once it is timed."""
        if (bucket, 0) in self.step_time:
            return None
        self.measure(bucket, 1)  # warm-up
        return time.perf_counter() + MEASURE_SECONDS

    @staticmethod
    def _class(grid: list, rows: float) -> int:
        """The class of a step with ``rows`` draft rows per sequence: the smallest budget of ``grid`` (the step's
        candidates) >= rows. The step is modelled at that budget's forward time and shares its observed /
        modelled factor: a forward's cost grows in steps with its rows, not linearly (BLAS panels on a CPU,
        tiles on a GPU). On this project's CPU 31 decodes + one 16-node tree (47 rows) took 252 ms, as long as
        32 two-token rows (64 rows, 249 ms), against 162 ms for 32 decodes, where interpolating between the
        two would promise 205."""
        return grid[bisect.bisect_left(grid, rows)]

    def _factors(self, bucket: int, grid: list) -> dict:
        """Each candidate budget's observed / modelled time factor at ``bucket`` (see the module doc): its own
        EMA; for a budget not yet observed, the nearest observed budget d > 0's (the larger on a tie), or
        d = 0's before any tree step at this batch size was observed."""
        base = self.overhead.get((bucket, 0), 1.0)
        trees = [(c, f) for (b, c), f in self.overhead.items() if b == bucket and c]
        out = {}
        for d in grid:
            own = self.overhead.get((bucket, d))
            if own is None and d and trees:
                own = min(trees, key=lambda cf: (abs(math.log2((1 + cf[0]) / (1 + d))), -cf[0]))[1]
            out[d] = base if own is None else own
        return out

    def choose(self, num_decodes: int, keys: list, cap: int, boosts: Optional[list] = None) -> list:
        """This step's draft budget for each speculating decode (0: a plain decode); ``keys`` = their
        evidence keys, ``boosts`` their requests' acceptance relative to their key's (default 1: see
        :meth:`boost`), ``cap`` the largest ``num_draft_tokens`` among them.

        One budget d for the step, drafted by the m requests expected to accept the most at d: every
        (d, m) is scored, so a batch where only a few requests have a matched continuation lets those few
        draft instead of buying every request's tree or none."""
        self.current = None
        self.predicted = [0.0] * len(keys)
        if not keys:
            return []
        if self.measure is None:
            return [cap] * len(keys)
        self._steps += 1
        self._measured = False
        bucket = _bucket(max(num_decodes, len(keys)))
        deadline = self._deadline(bucket)
        grid = self.candidates(cap)
        factors = self._factors(bucket, grid)
        boosts = boosts or [1.0] * len(keys)
        realism = self.realism

        def seconds(d: int, m: int) -> float:
            cls = self._class(grid, d * m / num_decodes)
            return self._time(bucket, cls, deadline) * factors[cls]

        rate0 = num_decodes / seconds(0, 0)
        best, best_rate, top_rate, order, raw = (0, 0), rate0, 0.0, {}, {}
        for d in grid[1:]:
            exp = {k: self.expected(k, d) for k in set(keys)}
            raw[d] = [exp[k] * b for k, b in zip(keys, boosts)]  # what the statistics say, before realism
            gains = [min(r * realism, d) for r in raw[d]]  # no tree accepts more than d
            order[d] = sorted(range(len(keys)), key=gains.__getitem__, reverse=True)
            gain = 0.0
            for m, i in enumerate(order[d], 1):
                gain += gains[i]
                rate = (num_decodes + gain) / seconds(d, m)
                top_rate = max(top_rate, rate)
                if rate > best_rate:
                    best, best_rate = (d, m), rate
        # unmodelled costs and noise: a marginal gain is not worth the risk
        margin = self.margin.get(bucket, MARGIN)
        if best_rate <= rate0 * (1 + margin):
            best = (0, 0)
        d, m = best
        budgets = [0] * len(keys)
        if d > 0 and ((bucket, 0) not in self.overhead or self._steps % PLAIN_EVERY == 0):
            d = 0  # observe the plain step's real cost
        elif d > 0:
            for i in order[d][:m]:
                budgets[i], self.predicted[i] = d, min(raw[d][i], d)
        clearly_plain = d == 0 and top_rate <= rate0 * (1 + margin / 2)
        self._coast = (bucket, self._steps + COAST_STEPS) if clearly_plain else None
        if not self._measured:  # a step that also timed forwards for the model is no sample of its cost
            cls = self._class(grid, sum(budgets) / num_decodes)
            self.current, self._modelled = (bucket, cls), self._time(bucket, cls, None)
        return budgets

    def coast(self, num_decodes: int, num_speculating: int) -> bool:
        """Whether this step is plain without scoring it (then :meth:`choose` is not called): a scored step at
        this batch size fewer than ``COAST_STEPS`` steps ago modelled every budget at most half the margin in
        force above the plain step's rate (none came close to being chosen). Scoring
        every (d, m) costs ~0.5 ms a step at 32 streams on CPU, and where speculation clearly does not pay,
        a few steps' drift in the statistics does not change the answer; a scored step renews or ends the
        coast."""
        bucket = _bucket(max(num_decodes, num_speculating))
        if self._coast is None or self._coast[0] != bucket or self._steps >= self._coast[1]:
            return False
        self._steps += 1
        self.predicted = [0.0] * num_speculating
        self.current, self._modelled = (bucket, 0), self._time(bucket, 0, None)
        return True

    @property
    def coasting(self) -> bool:
        """The latest scored step found no budget close to paying (:meth:`coast`): this step is plain."""
        return self._coast is not None

    def observe(self, seconds: Optional[float], tokens: int = 0) -> None:
        """Wall time of the decode-only step run under the last :meth:`choose` (see the module doc) and the
        tokens it emitted (0: not counted); None: the step was no sample (it also ran prefill work)."""
        if seconds is None or self.current is None:
            self.current = None
            return
        ratio = seconds / self._modelled
        old = self.overhead.get(self.current)
        self.overhead[self.current] = ratio if old is None else (1 - EMA) * old + EMA * ratio
        if tokens:
            self._check_payoff(*self.current, tokens, seconds)
        self.current = None

    def _check_payoff(self, bucket: int, rows_class: int, tokens: int, seconds: float) -> None:
        """The payoff check: what drafting steps delivered, against plain steps of the same batch size.

        The cost model and the acceptance statistics each carry their own correction, but the rule's
        promise is about their product: that the steps it drafts in emit tokens at least as fast as plain
        steps. So each batch size keeps the plain steps' running token rate, and a window of
        the drafting steps since the last verdict: their tokens and seconds, so the time they lost against
        the plain rate (seconds minus what their tokens would have taken plainly; a step that gained counts
        negative). The verdict comes after ``PAYOFF_STEPS`` drafting steps, or at once when the window has
        lost more than ``PAYOFF_LOSS`` plain steps: where the window lost time, the margin a budget must
        promise doubles (up to ``MAX_MARGIN``), so only the surest trees are still bought; where its rate beat
        plain steps by the margin in force, the margin halves back toward ``MARGIN``. Summing time rather than
        averaging rates lets a tree that accepted 3 tokens pay for the trees around it that accepted none (at
        one stream on CPU a fruitless tree costs ~30% of a plain step), and the early verdict answers a couple
        of clearly losing steps (at 32 streams a losing tree step cost ~60% of a plain step) without waiting
        out the window; a window's credit ends with its verdict, so an early win does not excuse later
        losses."""
        pay = self._payoff.setdefault(bucket, _Payoff())
        if not rows_class:
            pay.plain_rate = tokens / seconds if pay.plain_rate is None else (
                (1 - EMA) * pay.plain_rate + EMA * tokens / seconds)
            return
        if pay.plain_rate is None:
            return
        pay.tokens, pay.seconds, pay.steps = pay.tokens + tokens, pay.seconds + seconds, pay.steps + 1
        lost = pay.seconds - pay.tokens / pay.plain_rate
        plain_step = self.step_time[bucket, 0] * self.overhead[bucket, 0]  # its observed seconds (EMA)
        if pay.steps < PAYOFF_STEPS and lost <= PAYOFF_LOSS * plain_step:
            return
        margin = self.margin.get(bucket, MARGIN)
        if lost > 0:
            self.margin[bucket] = min(2 * margin, MAX_MARGIN)
        elif pay.tokens / pay.seconds > pay.plain_rate * (1 + margin):
            self.margin[bucket] = max(margin / 2, MARGIN)
        pay.tokens, pay.seconds, pay.steps = 0, 0.0, 0

    @property
    def realism(self) -> float:
        """Accepted drafts per tree over what the statistics predicted for it, over recent trees: the rule
        picks the requests and budgets whose statistics look best, so the looks are biased high (a key's
        mean is made mostly by the requests that draft most; a request's boost by its luckiest trees).
        Scaling every prediction by the measured ratio keeps the rule from buying trees on that bias. It is
        at most 1: trees that beat their predictions raise their own statistics already, and a ratio above 1
        (up to 2 before 2026-12-07) let the first lucky trees double every request's prediction: at 32
        HumanEval streams on CPU the first trees chosen at realism 2.0 accepted 48 drafts of 68 predicted."""
        if not self._trees:
            return 1.0
        return min(max(self._real_mean / max(self._pred_mean, 1e-6), 0.05), 1.0)

    def realized(self, predicted: float, accepted: int) -> None:
        """One verified tree (or a shadow tree counted toward realism, see ``Speculator._score_shadow``): what
        the statistics predicted it would accept, and what it did."""
        if predicted <= 0:
            return
        self._trees += 1
        w = max(REALISM_EMA, 1.0 / self._trees)
        self._pred_mean = (1 - w) * self._pred_mean + w * predicted
        self._real_mean = (1 - w) * self._real_mean + w * accepted

    def boost(self, old: float, key: str, d: int, accepted: int) -> float:
        """A request's acceptance relative to its evidence key's at budget d, as a running mean: how much more
        (repetitive code) or less (free prose) than the average this request's drafts are accepted."""
        ratio = accepted / max(self.expected(key, d), 0.25)
        return min((1 - BOOST_EMA) * old + BOOST_EMA * ratio, 8.0)

    def record(self, key: str, d: int, accepted: int) -> None:
        n = self.samples[key, d] = self.samples.get((key, d), 0) + 1
        w = max(EMA, 1.0 / n)  # the first sample replaces the prior
        self.accepted[key, d] = (1 - w) * self.accepted.get((key, d), self.prior(d)) + w * accepted
