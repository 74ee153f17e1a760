"""Speculative decoding: the engine-facing :class:`Speculator`.

It resolves each request's options once (``attach``), picks the step's draft budget and proposes
trees for the scheduler (``plan`` / ``propose``), and verifies the trees' logits for the runner
(``verify``), refreshing the Token Recycling table and the statistics. Drafters live in
:mod:`server.spec.drafters`, tree shapes in :mod:`server.spec.tree`, acceptance in
:mod:`server.spec.verify`, the budget rule in :mod:`server.spec.budget`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from server.config import SpecConfig
from server.engine.request import Request, SpecOptions
from server.spec.budget import DraftBudget
from server.spec.drafters import TOPK, Drafter, RecyclingTable, make_drafter
from server.spec.tree import DraftTree, PathWalk
from server.spec.verify import TreeInput, Verdict, nearest_neighbours, verify_trees

Tensor = torch.Tensor


@dataclass
class SpecState:
    """Per-request speculation state, kept in ``Request.state['spec']``."""

    options: SpecOptions
    drafter: Drafter
    step_budget: int = 0  # the candidate budget chosen for this request this step (0: a plain decode)
    budget: int = 0  # the budget the current tree was built under (step_budget, capped by room)
    predicted: float = 0.0  # the accepted drafts the budget rule expected of this step's tree
    evidence: str = ""  # the drafter's evidence class this step (Drafter.evidence): the key of its statistics
    boost: float = 1.0  # this request's acceptance relative to its evidence key's (DraftBudget.boost)
    shadow: Optional["Shadow"] = None  # a tree drafted but not run, waiting for the tokens that score it


@dataclass
class Shadow:
    """A draft tree proposed and not verified (:meth:`Speculator.plan`): the tokens the request emits after
    ``start`` walk it (:class:`server.spec.tree.PathWalk`, each token once), and once they decide its path
    it is scored as if it had been verified."""

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


def can_speculate(params) -> bool:
    """Speculation keeps exactness only where the next-token distribution does not depend on the
    tokens drafted before it in the same step: no penalties, no logit bias, no min_tokens."""
    return (params.repetition_penalty == 1.0 and not params.presence_penalty and not params.frequency_penalty
            and not params.logit_bias and params.min_tokens == 0)


# plain decode rows that teach Token Recycling's table per step (learn_plain): a top-k over the vocabulary
# costs 60-150 us a row on CPU (8 rows: 0.9% of a 32-stream chat run); the table is shared, so requests
# taking turns still refresh it every few steps. While the budget rule coasts (speculation clearly does
# not pay: DraftBudget.coast) one row a step keeps the table warm for the shadow trees
PLAIN_LEARN_ROWS = 8
# shadow trees drafted per step (plan): ~0.15 ms each for a 32-node GOOSE tree on CPU; they resolve within a
# few steps (most at the first token), so one a step keeps every evidence key's statistics fresh
SHADOWS_PER_STEP = 1
# one scored shadow in this many also counts toward the budget rule's realism (see _score_shadow)
SHADOW_REALISM_EVERY = 32


class Speculator:
    def __init__(self, config: SpecConfig, vocab_size: int, embedding: Optional[Union[Tensor, Callable[[], Tensor]]] = None,
                 model_name: str = "model", measure: Optional[Callable[[int, int], float]] = None):
        self.default = SpecOptions(method=config.method, num_draft_tokens=config.num_draft_tokens)
        self.vocab_size = vocab_size
        self.embedding = embedding
        self.model_name = model_name
        self.budget = DraftBudget(measure)
        self._shared: Optional[RecyclingTable] = None
        self._nearest: Optional[Tensor] = None
        self.counters = {"spec_num_drafts": 0, "spec_num_draft_tokens": 0, "spec_num_accepted_tokens": 0,
                         "spec_relaxed_accepts": 0}
        self.accepted_per_pos: list = []
        self._learn_turn = 0  # learn_plain: whose rows teach the table next
        self._shadow_turn = 0  # plan: who drafts the next shadow tree
        self._shadows_scored = 0

    # -- requests ------------------------------------------------------------------------------
    def attach(self, req: Request) -> None:
        """Resolve the request's options (its own, else the server default) once, at admission."""
        opts = req.params.speculative or self.default
        if opts.method == "none" or not can_speculate(req.params):
            return
        table = None
        if opts.method != "ngram":
            table = RecyclingTable(self.vocab_size) if opts.private_table else self.shared_table
        req.state["spec"] = SpecState(opts, make_drafter(opts.method, table))

    @property
    def shared_table(self) -> RecyclingTable:
        if self._shared is None:
            self._shared = RecyclingTable(self.vocab_size, TOPK)
        return self._shared

    # -- scheduling ----------------------------------------------------------------------------
    def plan(self, running: list) -> None:
        """Choose each speculating decode's draft budget for this step (:meth:`DraftBudget.choose`), score the
        shadow trees the last steps decided, and draft a shadow tree for a request that runs plain."""
        decodes = [r for r in running if r.num_tokens - r.num_computed_tokens == 1]
        for r in running:
            state = r.state.get("spec")
            if state is not None:
                state.step_budget = 0  # a prefill chunk (or one cut to a single token) drafts nothing
                if state.shadow is not None:
                    self._score_shadow(r, state)
        speculating = [r for r in decodes if "spec" in r.state]
        if not self.budget.coast(len(decodes), len(speculating)):
            states = [r.state["spec"] for r in speculating]
            for r, s in zip(speculating, states):
                s.evidence = s.drafter.evidence(r.token_ids)
            cap = max((s.options.num_draft_tokens for s in states), default=0)
            budgets = self.budget.choose(len(decodes), [s.evidence for s in states], cap, [s.boost for s in states])
            for s, d, predicted in zip(states, budgets, self.budget.predicted):
                s.step_budget, s.predicted = d, predicted
        self._draft_shadows(speculating)

    def _draft_shadows(self, speculating: list) -> None:
        """Shadow trees: while a request runs plain, the statistics of the budget it would draft still learn.
        Its drafter proposes the tree of its full ``num_draft_tokens`` (which holds the tree of every smaller
        budget: :mod:`server.spec.tree`), nothing is run, and the tokens the request emits next score it
        (:meth:`_score_shadow`). No forward pays for that knowledge; a probe tree verified for it would (at
        32 streams on CPU a step with any tree in it runs 25% longer)."""
        idle = [r for r in speculating if r.state["spec"].step_budget == 0 and r.state["spec"].shadow is None]
        for j in range(min(SHADOWS_PER_STEP, len(idle))):  # the idle requests in turn
            r = idle[(self._shadow_turn + j) % len(idle)]
            s = r.state["spec"]
            d = s.options.num_draft_tokens
            key = s.drafter.evidence(r.token_ids)
            tree = s.drafter.propose(r.token_ids, d)
            s.shadow = Shadow(tree, r.num_tokens, key, d, min(self.budget.expected(key, d) * s.boost, d))
        self._shadow_turn += SHADOWS_PER_STEP

    def _score_shadow(self, req: Request, state: SpecState) -> None:
        """Once decided, the request's shadow tree counts as a verified tree of its evidence key: every
        candidate budget up to its own learns what its part of the tree accepted (the tokens that decide
        it do not depend on the tree, so this holds for sampled requests too).

        Realism (:attr:`DraftBudget.realism`) measures how far the trees the rule *chose* fall short of
        their predictions (the selection bias of picking the best-looking statistics); shadows are not
        chosen, and every one counting would make it measure the statistics' accuracy on unselected trees
        instead. One in ``SHADOW_REALISM_EVERY`` still counts (about the rate of the probe trees shadows
        replaced), so realism recovers while nothing is drafted."""
        shadow = state.shadow
        # a shadow is drafted at a decode, so its tokens are output tokens; only the new ones are fed
        new = req.output_token_ids[shadow.seen - req.num_prompt_tokens:]
        shadow.seen = req.num_tokens
        if not shadow.walk.feed(new):
            return
        state.shadow = None
        ranks = shadow.tree.ranks()
        self._shadows_scored += 1
        predicted = shadow.predicted if self._shadows_scored % SHADOW_REALISM_EVERY == 0 else 0.0
        self._tally(state, shadow.evidence, shadow.budget, predicted, [ranks[i] for i in shadow.walk.path], True)

    def samples_step(self, sched, requests: dict) -> bool:
        """Whether the step about to run teaches the cost model: it awaits a sample and the step is
        decode-only (every row one new token or a draft tree). Ask before the step: finished requests
        leave ``requests`` during it."""
        return self.budget.current is not None and all(
            s.draft_parents is not None or (len(s.token_ids) == 1 and s.positions[0] >=
                                            requests[s.request_id].num_prompt_tokens) for s in sched.requests)

    def observe_step(self, seconds: float, sample: bool, tokens: int = 0) -> None:
        """The engine's wall time for the step just run and the tokens it emitted (``sample``: from
        :meth:`samples_step`)."""
        self.budget.observe(seconds if sample else None, tokens)

    def propose(self, req: Request, max_nodes: int) -> Optional[DraftTree]:
        """A draft tree for a decoding request, or None when it does not speculate this step.
        An empty tree still goes through verification, so Token Recycling learns from the root."""
        state = req.state.get("spec")
        if state is None or state.step_budget == 0:
            return None
        state.budget = min(state.step_budget, state.options.num_draft_tokens, max_nodes)
        tree = state.drafter.propose(req.token_ids, state.budget)
        if not len(tree) and state.drafter.table is None:
            # nothing to verify and nothing to learn: a plain decode is cheaper. The budget rule still
            # counts it: its gain is per speculating request, found drafts or not
            self._record_acceptance(state, [], req.params.greedy)
            return None
        return tree

    # -- verification --------------------------------------------------------------------------
    def verify(self, logits: Tensor, items: list, requests: dict) -> dict:
        """``items``: [(ScheduledRequest, first logits row)] of the step's trees -> {request id: Verdict}."""
        trees = []
        for s, row in items:
            req = requests[s.request_id]
            opts = req.state["spec"].options
            trees.append(TreeInput(row, list(s.token_ids), list(s.draft_parents), req.params, req.generator,
                                   opts.relaxed_k, opts.relaxed_delta, opts.relaxed_lambda))
        nearest = self.nearest(logits.device) if any(t.relax_k > 0 for t in trees) else None
        verdicts = verify_trees(logits, trees, nearest)
        self._learn(logits, self._learners(items, requests), requests)
        out = {}
        for (s, _), v in zip(items, verdicts):
            out[s.request_id] = v
            req = requests[s.request_id]
            self._record(req.state["spec"], len(s.token_ids) - 1, v, [s.draft_ranks[i - 1] for i in v.nodes],
                         req.params.greedy)
        return out

    def learn_plain(self, logits: Tensor, items: list, requests: dict) -> None:
        """Token Recycling from a plain step's decode rows (``items``: [(ScheduledRequest, logits row)]): each
        speculating request's input token gets the top-k of its logits, as a verified tree's root does.
        Without this the table learns only while trees are verified, so once the budget rule turns
        speculation off its rows go stale, the shadow trees it scores are guesses from an old table, and
        their low acceptance keeps speculation off (on chat prompts at one stream, table-only trees accepted
        0.07 drafts at d = 1)."""
        items = [(s, row) for s, row in self._learners(items, requests) if len(s.token_ids) == 1]
        rows = 1 if self.budget.coasting else PLAIN_LEARN_ROWS
        if len(items) > rows:  # the requests take turns
            start = self._learn_turn % len(items)
            self._learn_turn += rows
            items = (items[start:] + items[:start])[:rows]
        self._learn(logits, items, requests)

    @staticmethod
    def _learners(items: list, requests: dict) -> list:
        """The ``items`` of requests whose drafter keeps a Token Recycling table (speculating, not n-gram)."""
        out = []
        for s, row in items:
            state = requests[s.request_id].state.get("spec")
            if state is not None and state.drafter.table is not None:
                out.append((s, row))
        return out

    def _learn(self, logits: Tensor, learners: list, requests: dict) -> None:
        """Token Recycling: the rows of ALL inputs of ``learners`` (:meth:`_learners`) get the top-k of their
        logits."""
        if not learners:
            return
        rows = torch.tensor([row + j for s, row in learners for j in range(len(s.token_ids))], device=logits.device)
        topk = logits[rows].topk(TOPK, dim=-1).indices.cpu().numpy()
        at = 0
        for s, _ in learners:
            n = len(s.token_ids)
            requests[s.request_id].state["spec"].drafter.table.update(s.token_ids, topk[at:at + n])
            at += n

    def _record(self, state: SpecState, num_draft: int, v: Verdict, path_ranks: list, greedy: bool) -> None:
        accepted = len(v.nodes)
        self._record_acceptance(state, path_ranks, greedy)  # an empty tree gains nothing
        if num_draft:
            self.counters["spec_num_drafts"] += 1
            self.counters["spec_num_draft_tokens"] += num_draft
            self.counters["spec_num_accepted_tokens"] += accepted
            self.counters["spec_relaxed_accepts"] += v.relaxed
            if len(self.accepted_per_pos) < accepted:
                self.accepted_per_pos.extend([0] * (accepted - len(self.accepted_per_pos)))
            for i in range(accepted):
                self.accepted_per_pos[i] += 1

    def _record_acceptance(self, state: SpecState, path_ranks: list, greedy: bool) -> None:
        """Statistics of one verified tree: ``path_ranks`` = the drafter's ranks of the accepted path's nodes.
        Under greedy verification the tree a smaller candidate budget c would have drafted accepts the path's
        nodes of rank < c (:mod:`server.spec.tree`), so each smaller budget gets that sample too; sampled
        acceptance depends on the siblings tried, and only the budget drafted learns."""
        self._tally(state, state.evidence, state.step_budget, state.predicted, path_ranks, greedy)

    def _tally(self, state: SpecState, key: str, d: int, predicted: float, path_ranks: list,
               every_budget: bool) -> None:
        """One tree of evidence ``key`` at budget ``d`` (verified or shadow) into the statistics."""
        self.budget.realized(predicted, len(path_ranks))
        state.boost = self.budget.boost(state.boost, key, d, len(path_ranks))
        self.budget.record(key, d, len(path_ranks))
        if every_budget:
            for c in self.budget.candidates(d)[1:-1]:  # 0 < c < d
                self.budget.record(key, c, sum(r < c for r in path_ranks))

    def nearest(self, device: torch.device) -> Tensor:
        if self._nearest is None:
            # a callable: a quantized embedding dequantizes its table only when LANTERN first needs it
            embedding = self.embedding() if callable(self.embedding) else self.embedding
            self._nearest = nearest_neighbours(embedding, self.model_name).to(device)
        return self._nearest

    @property
    def stats(self) -> dict:
        return {**self.counters, "spec_accepted_per_pos": list(self.accepted_per_pos)}
