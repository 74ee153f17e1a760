"""The adaptive speculation controller (``--speculative-controller adaptive``): :class:`DraftBudget`'s measured
step-cost model and per-evidence acceptance statistics, with shadow trees teaching them while nothing drafts.

It chooses each speculating decode's draft budget every step (:meth:`DraftBudget.choose`), scores the shadow
trees the last steps decided, and drafts a shadow tree for a request that runs plain.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from sift.server.engine.request import Request
from sift.server.spec.budget import DraftBudget
from sift.server.spec.drafters import SpecState
from sift.server.spec.tree import DraftTree, PathWalk

# shadow trees drafted per step (plan): ~0.15 ms each for a 32-node GOOSE tree on CPU; they resolve within a
# few steps (most at the first token), so one a step keeps every evidence key's statistics fresh
SHADOWS_PER_STEP = 1
# one scored shadow in this many also counts toward the budget rule's realism (see _score_shadow)
SHADOW_REALISM_EVERY = 32


@dataclass
class Shadow:
    """A draft tree proposed and not verified (:meth:`AdaptiveController.plan`): the tokens the request emits
    after ``start`` walk it (:class:`sift.server.spec.tree.PathWalk`, each token once), and once they decide its
    path it is scored as if it had been verified."""

    tree: DraftTree
    start: int  # the request's length when it was drafted: the target's tokens for it begin here
    evidence: str
    budget: int
    predicted: float  # what the budget rule's statistics expected it to accept
    walk: PathWalk = field(init=False)
    seen: int = field(init=False)  # the request's length up to which its tokens were fed to the walk

    def __post_init__(self):
        self.walk = PathWalk(self.tree)
        self.seen = self.start


@dataclass
class AdaptiveState:
    """The adaptive controller's per-request state (``SpecState.control``)."""

    predicted: float = 0.0  # the accepted drafts the budget rule expected of this step's tree
    evidence: str = ""  # the drafter's evidence class this step (Drafter.evidence): the key of its statistics
    boost: float = 1.0  # this request's acceptance relative to its evidence key's (DraftBudget.boost)
    shadow: Optional[Shadow] = None  # a tree drafted but not run, waiting for the tokens that score it


class AdaptiveController:
    def __init__(self, measure: Optional[Callable[[int, int], float]], max_batch: int):
        self.budget = DraftBudget(measure)
        self.max_batch = max_batch
        self._shadow_turn = 0  # plan: who drafts the next shadow tree
        self._shadows_scored = 0

    def calibrate(self, cap: int) -> None:
        self.budget.calibrate(self.max_batch, cap)

    @property
    def off(self) -> bool:
        return self.budget.coasting

    @staticmethod
    def _state(req: Request) -> AdaptiveState:
        spec = req.state_of(SpecState)
        if spec.control is None:
            spec.control = AdaptiveState()
        return spec.control

    def plan(self, running: list) -> None:
        decodes = [r for r in running if r.num_tokens - r.num_computed_tokens == 1]
        for r in running:
            state = r.state_of(SpecState)
            if state is not None:
                state.step_budget = 0  # a prefill chunk (or one cut to a single token) drafts nothing
                if self._state(r).shadow is not None:
                    self._score_shadow(r, state)
        speculating = [r for r in decodes if r.state_of(SpecState) is not None]
        if not self.budget.coast(len(decodes), len(speculating)):
            states = [r.state_of(SpecState) for r in speculating]
            for r, s in zip(speculating, states):
                s.control.evidence = s.drafter.evidence(r.token_ids)
            cap = max((s.options.num_draft_tokens for s in states), default=0)
            budgets = self.budget.choose(len(decodes), [s.control.evidence for s in states], cap,
                                         [s.control.boost for s in states])
            for s, d, predicted in zip(states, budgets, self.budget.predicted):
                s.step_budget, s.control.predicted = d, predicted
        self._draft_shadows(speculating)

    def _draft_shadows(self, speculating: list) -> None:
        """Shadow trees: while a request runs plain, the statistics of the budget it would draft still learn.
        Its drafter proposes the tree of its full ``num_draft_tokens`` (which holds the tree of every smaller
        budget: :mod:`sift.server.spec.tree`), nothing is run, and the tokens the request emits next score it
        (:meth:`_score_shadow`)."""
        idle = [r for r in speculating
                if r.state_of(SpecState).step_budget == 0 and r.state_of(SpecState).control.shadow is None]
        for j in range(min(SHADOWS_PER_STEP, len(idle))):  # the idle requests in turn
            r = idle[(self._shadow_turn + j) % len(idle)]
            s = r.state_of(SpecState)
            d = s.options.num_draft_tokens
            key = s.drafter.evidence(r.token_ids)
            tree = s.drafter.propose(r.token_ids, d)
            s.control.shadow = Shadow(tree, r.num_tokens, key, d,
                                      min(self.budget.expected(key, d) * s.control.boost, d))
        self._shadow_turn += SHADOWS_PER_STEP

    def _score_shadow(self, req: Request, state) -> None:
        """Once decided, the request's shadow tree counts as a verified tree of its evidence key. One in
        ``SHADOW_REALISM_EVERY`` also counts toward realism (:attr:`DraftBudget.realism`), which measures the
        trees the rule *chose*, so realism recovers while nothing is drafted."""
        ctl = state.control
        shadow = ctl.shadow
        new = req.output_token_ids[shadow.seen - req.num_prompt_tokens:]
        shadow.seen = req.num_tokens
        if not shadow.walk.feed(new):
            return
        ctl.shadow = None
        ranks = shadow.tree.ranks()
        self._shadows_scored += 1
        predicted = shadow.predicted if self._shadows_scored % SHADOW_REALISM_EVERY == 0 else 0.0
        self._tally(ctl, shadow.evidence, shadow.budget, predicted, [ranks[i] for i in shadow.walk.path], True)

    def verified(self, state, path_ranks: list, depth: int, greedy: bool) -> None:
        """One verified tree (``path_ranks``: the drafter's ranks of the accepted path's nodes). Under greedy
        verification the tree a smaller candidate budget c would have drafted accepts the path's nodes of
        rank < c, so each smaller budget gets that sample too."""
        ctl = state.control or AdaptiveState()
        state.control = ctl
        self._tally(ctl, ctl.evidence, state.step_budget, ctl.predicted, path_ranks, greedy)

    def _tally(self, ctl: AdaptiveState, key: str, d: int, predicted: float, path_ranks: list,
               every_budget: bool) -> None:
        self.budget.realized(predicted, len(path_ranks))
        ctl.boost = self.budget.boost(ctl.boost, key, d, len(path_ranks))
        self.budget.record(key, d, len(path_ranks))
        if every_budget:
            for c in self.budget.candidates(d)[1:-1]:  # 0 < c < d
                self.budget.record(key, c, sum(r < c for r in path_ranks))

    def samples_step(self, sched, requests: dict) -> bool:
        """Whether the step about to run teaches the cost model: decode-only (every row one new token or a
        draft tree). Ask before the step: finished requests leave ``requests`` during it."""
        return self.budget.current is not None and all(
            s.draft_parents is not None or (len(s.token_ids) == 1 and s.positions[0] >=
                                            requests[s.request_id].num_prompt_tokens) for s in sched.requests)

    def observe_step(self, seconds: float, sample: bool, tokens: int = 0) -> None:
        self.budget.observe(seconds if sample else None, tokens)
