"""The default speculation controller: draft while the batch is small, trees sized by one acceptance rate.

Two numbers decide a step.

* ``N``: requests draft only while the running batch has at most ``N`` decodes. A batched forward grows
  compute-bound with its rows, and past some batch size a draft row costs about what a plain row does, so
  no tree pays. ``N`` is measured once (:meth:`SimpleController.calibrate`, at start-up when speculation
  is the server default, else at the first speculating step): one forward of b sequences of 1 + d tokens
  for each power-of-two batch size b and candidate d, and ``N`` is the largest b at which some d > 0 is
  modelled to gain ``MIN_GAIN`` at the fixed ``PRIOR_ACCEPT``. ``--speculative-disable-by-batch-size``
  sets it instead.
* ``d``: a request's tree size. Each drafting method keeps one running acceptance rate ``alpha``: of the
  tree levels its verified trees tried, the fraction that accepted a draft (a tree that accepted a drafts
  tried a + 1 levels, or a where its path reached the tree's deepest node), as sums decayed by ``DECAY``
  per tree. If each next level is accepted with probability alpha, a tree of d nodes is expected to accept
  ``alpha + alpha**2 + ... + alpha**d`` drafts (the tree is modelled as a chain; what its width adds shows
  in alpha itself). d is the candidate maximising ``(1 + expected(d)) / time(b, d)`` at the step's batch
  size b, kept only where it beats the plain step by ``MIN_GAIN``, and capped by the request's
  ``num_draft_tokens``.

A request that does not draft runs a plain decode (Token Recycling still learns from it:
:meth:`sift.server.spec.Speculator.learn_plain`).
"""
from __future__ import annotations

from typing import Callable, Optional

from sift.server.spec.drafters import SpecState

CANDIDATES = (0, 1, 2, 3, 7, 15, 31, 63, 127)  # 1 + d a power of two (whole tiles), and the cheap short chains
PRIOR_ACCEPT = 0.5  # per-level acceptance assumed for N and before a method's first trees
PRIOR_LEVELS = 4.0  # the prior weighs as much as this many tried levels
DECAY = 0.9  # per verified tree: the rate follows roughly the last ten trees
MIN_GAIN = 1.1  # a tree must promise 10% more tokens per second than the plain step (timing noise)
MAX_SLOWDOWN = 5.0  # timing stops at a d whose forward takes this many plain forwards (extrapolated past it)


def expected_accepted(alpha: float, d: int) -> float:
    """Drafts a tree of d nodes accepts when each next level is accepted with probability ``alpha``."""
    return float(d) if alpha >= 1.0 else alpha * (1.0 - alpha ** d) / (1.0 - alpha)


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class SimpleController:
    """``measure(num_seqs, q_len) -> seconds`` times one forward; None: no timing (every speculating request
    drafts its full ``num_draft_tokens`` every step, as tests that exercise the tree path want)."""

    def __init__(self, measure: Optional[Callable[[int, int], float]], max_batch: int,
                 disable_by_batch_size: Optional[int] = None):
        self.measure = measure
        self.max_batch = max_batch
        self.limit = disable_by_batch_size  # N; None until calibrated
        self.times: dict = {}  # batch bucket -> {d: seconds of one forward of bucket x (1 + d) tokens}
        self.levels: dict = {}  # drafting method -> [accepted levels, tried levels], decayed sums
        self.off = False  # the last plan let no request draft

    # -- start-up ------------------------------------------------------------------------------
    def calibrate(self, cap: int) -> None:
        """Time the forwards (every bucket up to ``max_batch``, or up to N where it was set) and find N."""
        if self.measure is None or self.times:
            return
        grid = [d for d in CANDIDATES if d < cap] + [cap]
        top = _bucket(min(self.max_batch, self.limit if self.limit is not None else self.max_batch))
        b, n = 1, 0
        while b <= top and (self.limit is None or self.limit > 0):
            self.measure(b, 1)  # warm-up
            row = self.times[b] = {0: self._forward(b, 0)}
            for d in grid[1:]:
                row[d] = self._forward(b, d)
                if row[d] > MAX_SLOWDOWN * row[0]:
                    break
            if self._tree_size(b, PRIOR_ACCEPT, grid[-1]) > 0:
                n = b
            elif self.limit is None:
                break  # larger batches are more compute-bound still: they do not draft
            b *= 2
        if self.limit is None:
            self.limit = n

    def _forward(self, b: int, d: int) -> float:
        return min(self.measure(b, 1 + d), self.measure(b, 1 + d))  # the faster of two: damps noise

    def time(self, b: int, d: int) -> float:
        """Forward seconds at bucket b and d drafts a row: measured, else linear between the measured d around
        it (or from the two largest past them)."""
        row = self.times[b]
        if d in row:
            return row[d]
        ds = sorted(row)
        hi = next((i for i, x in enumerate(ds) if x > d), len(ds) - 1)
        lo = max(hi - 1, 0)
        if ds[hi] == ds[lo]:
            return row[ds[hi]] * (1 + d) / (1 + ds[hi])
        slope = (row[ds[hi]] - row[ds[lo]]) / (ds[hi] - ds[lo])
        return row[ds[lo]] + slope * (d - ds[lo])

    # -- each step -----------------------------------------------------------------------------
    def alpha(self, method: str) -> float:
        acc, tried = self.levels.get(method, (PRIOR_ACCEPT * PRIOR_LEVELS, PRIOR_LEVELS))
        return acc / tried

    def _tree_size(self, b: int, alpha: float, cap: int) -> int:
        plain = 1.0 / self.time(b, 0)
        best, best_rate = 0, plain * MIN_GAIN
        for d in [c for c in CANDIDATES[1:] if c < cap] + [cap]:
            rate = (1.0 + expected_accepted(alpha, d)) / self.time(b, d)
            if rate > best_rate:
                best, best_rate = d, rate
        return best

    def plan(self, running: list) -> None:
        """Set ``step_budget`` of every speculating request in ``running`` (0: a plain step)."""
        decodes = [r for r in running if r.num_tokens - r.num_computed_tokens == 1]
        states = [s for r in running if (s := r.state_of(SpecState)) is not None]
        for s in states:
            s.step_budget = 0  # a prefill chunk (or one cut to a single token) drafts nothing
        drafting = [s for r in decodes if (s := r.state_of(SpecState)) is not None]
        if drafting and not self.times:
            self.calibrate(max(s.options.num_draft_tokens for s in drafting))
        self.off = not drafting or (self.limit is not None and len(decodes) > self.limit)
        if self.off:
            return
        b, sizes = _bucket(len(decodes)), {}
        for s in drafting:
            cap = s.options.num_draft_tokens
            if self.measure is None:
                s.step_budget = cap
                continue
            key = (s.options.method, cap)
            if key not in sizes:
                sizes[key] = self._tree_size(b, self.alpha(s.options.method), cap)
            s.step_budget = sizes[key]

    def verified(self, state, path_ranks: list, depth: int, greedy: bool) -> None:
        """A request's verified tree (``state``: its SpecState; ``path_ranks``: its accepted nodes' ranks)."""
        if depth:  # an empty tree (an n-gram drafter without a match) cost nothing and says nothing
            self.record(state.options.method, len(path_ranks), depth)

    def record(self, method: str, accepted: int, depth: int) -> None:
        """One verified tree of ``method``: ``accepted`` drafts on a tree ``depth`` levels deep."""
        acc, tried = self.levels.get(method, (PRIOR_ACCEPT * PRIOR_LEVELS, PRIOR_LEVELS))
        self.levels[method] = [DECAY * acc + accepted, DECAY * tried + accepted + (accepted < depth)]
