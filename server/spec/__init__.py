"""Speculative decoding: the engine-facing :class:`Speculator`, the speculation technique.

It resolves each request's options once (``on_admit``), asks the controller for the step's draft budgets
and proposes trees for the scheduler (``begin_step`` / ``draft``), verifies the trees' logits for the
runner (``verify``), refreshing the Token Recycling table and the controller's statistics, and reports
each step's time to the controller (``plan`` / ``after_step``). Drafters live
in :mod:`sift.server.spec.drafters`, tree shapes in :mod:`sift.server.spec.tree`, acceptance in
:mod:`sift.server.spec.verify`, the default controller in :mod:`sift.server.spec.controller` (the adaptive one in
:mod:`sift.server.spec.adaptive`).
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Union

import torch

from sift.server.engine.request import Request
from sift.server.options import SpecConfig, SpecOptions
from sift.server.spec.controller import SimpleController
from sift.server.spec.drafters import DRAFTERS, TOPK, RecyclingTable, SpecState, make_drafter
from sift.server.spec.tree import DraftTree, depths
from sift.server.spec.verify import TreeInput, Verdict, nearest_neighbours, verify_trees
from sift.server.techniques import Technique

Tensor = torch.Tensor


def can_speculate(params) -> bool:
    """Speculation keeps exactness only where the next-token distribution does not depend on the
    tokens drafted before it in the same step: no penalties, no logit bias, no min_tokens. A grammar-constrained
    request does not speculate either (its drafts are not checked against the grammar)."""
    return (params.repetition_penalty == 1.0 and not params.presence_penalty and not params.frequency_penalty
            and not params.logit_bias and params.min_tokens == 0 and params.structured is None)


# plain decode rows that teach Token Recycling's table per step (learn_plain): a top-k over the vocabulary
# costs 60-150 us a row on CPU (8 rows: 0.9% of a 32-stream chat run); the table is shared, so requests
# taking turns still refresh it every few steps. While the controller lets nobody draft (``off``), one row
# a step keeps the table warm for when the batch shrinks
PLAIN_LEARN_ROWS = 8


class Speculator(Technique):
    name = "speculation"

    def __init__(self, config: SpecConfig, vocab_size: int,
                 embedding: Optional[Union[Tensor, Callable[[], Tensor]]] = None, model_name: str = "model",
                 measure: Optional[Callable[[int, int], float]] = None, max_batch: int = 64):
        self.default = SpecOptions(method=config.method, num_draft_tokens=config.num_draft_tokens)
        self.vocab_size = vocab_size
        self.embedding = embedding
        self.model_name = model_name
        self.controller = make_controller(config.controller, measure, max_batch, config.disable_by_batch_size)
        self._shared: Optional[RecyclingTable] = None
        self._nearest: Optional[Tensor] = None
        self.counters = {"spec_num_drafts": 0, "spec_num_draft_tokens": 0, "spec_num_accepted_tokens": 0,
                         "spec_relaxed_accepts": 0}
        self.accepted_per_pos: list = []
        self._learn_turn = 0  # learn_plain: whose rows teach the table next
        self._step_start = 0.0  # when the step being run began to be scheduled
        self._sample = False  # whether that step is a sample of step cost for the controller

    # -- requests ------------------------------------------------------------------------------
    def on_admit(self, req: Request) -> None:
        """Resolve the request's options (its own, else the server default) once, at admission."""
        opts = req.params.speculative or self.default
        drafter = DRAFTERS[opts.method]
        if drafter is None or not can_speculate(req.params):
            return
        table = None
        if drafter.uses_table:
            table = RecyclingTable(self.vocab_size) if opts.private_table else self.shared_table
        req.technique_state[SpecState] = SpecState(opts, make_drafter(opts.method, table))

    def extra_tokens(self, req: Request) -> int:
        state = req.state_of(SpecState)
        return state.options.num_draft_tokens if state is not None else 0

    @property
    def shared_table(self) -> RecyclingTable:
        if self._shared is None:
            self._shared = RecyclingTable(self.vocab_size, TOPK)
        return self._shared

    # -- scheduling ----------------------------------------------------------------------------
    def begin_step(self, running: list) -> None:
        """Each speculating decode's draft budget for this step (``SpecState.step_budget``)."""
        self._step_start = time.perf_counter()
        self.controller.plan(running)

    def plan(self, step, requests: dict) -> None:
        """Whether the step about to run is a sample of step cost for the controller (asked before the step:
        finished requests leave ``requests`` during it)."""
        sample = getattr(self.controller, "samples_step", None)
        self._sample = sample is not None and sample(step, requests)

    def after_step(self, step, outputs, requests: dict) -> list:
        """The step's wall time (from scheduling to its techniques' updates) and the tokens it emitted."""
        observe = getattr(self.controller, "observe_step", None)
        if observe is not None:
            observe(time.perf_counter() - self._step_start, self._sample, sum(map(len, outputs.sampled.values())))
        return []

    def draft(self, req: Request, max_nodes: int) -> Optional[DraftTree]:
        """A draft tree for a decoding request, or None when it does not speculate this step.
        An empty tree still goes through verification, so Token Recycling learns from the root."""
        state = req.state_of(SpecState)
        if state is None or state.step_budget == 0:
            return None
        state.budget = min(state.step_budget, state.options.num_draft_tokens, max_nodes)
        tree = state.drafter.propose(req.token_ids, state.budget)
        if not len(tree) and state.drafter.table is None:
            # nothing to verify and nothing to learn: a plain decode is cheaper. The controller still
            # hears of it (the adaptive one counts the gain per speculating request, found drafts or not)
            self.controller.verified(state, [], 0, req.params.greedy)
            return None
        return tree

    # -- verification --------------------------------------------------------------------------
    def verify(self, logits: Tensor, items: list, requests: dict) -> dict:
        """``items``: [(ScheduledRequest, first logits row)] of the step's trees -> {request id: Verdict}."""
        trees = []
        for s, row in items:
            req = requests[s.request_id]
            opts = req.state_of(SpecState).options
            trees.append(TreeInput(row, list(s.token_ids), list(s.draft_parents), req.params, req.generator,
                                   opts.relaxed_k, opts.relaxed_delta, opts.relaxed_lambda))
        nearest = self.nearest(logits.device) if any(t.relax_k > 0 for t in trees) else None
        verdicts = verify_trees(logits, trees, nearest)
        self._learn(logits, self._learners(items, requests), requests)
        out = {}
        for (s, _), v in zip(items, verdicts):
            out[s.request_id] = v
            req = requests[s.request_id]
            self._record(req.state_of(SpecState), s, v, req.params.greedy)
        return out

    def learn_plain(self, logits: Tensor, items: list, requests: dict) -> None:
        """Token Recycling from a plain step's decode rows (``items``: [(ScheduledRequest, logits row)]): each
        speculating request's input token gets the top-k of its logits, as a verified tree's root does.
        Without this the table learns only while trees are verified, so once the controller turns
        speculation off its rows go stale and the first trees after it are guesses from an old table (on chat
        prompts at one stream, table-only trees accepted 0.07 drafts at d = 1)."""
        items = [(s, row) for s, row in self._learners(items, requests) if len(s.token_ids) == 1]
        rows = 1 if self.controller.off else PLAIN_LEARN_ROWS
        if len(items) > rows:  # the requests take turns
            start = self._learn_turn % len(items)
            self._learn_turn += rows
            items = (items[start:] + items[:start])[:rows]
        self._learn(logits, items, requests)

    @staticmethod
    def _learners(items: list, requests: dict) -> list:
        """The ``items`` of requests whose drafter keeps a Token Recycling table (speculating, not n-gram)."""
        return [(s, row) for s, row in items
                if (state := requests[s.request_id].state_of(SpecState)) is not None and state.drafter.table is not None]

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
            requests[s.request_id].state_of(SpecState).drafter.table.update(s.token_ids, topk[at:at + n])
            at += n

    def _record(self, state: SpecState, s, v: Verdict, greedy: bool) -> None:
        """Counters and the controller's statistics for one verified tree (``s``: its ScheduledRequest)."""
        accepted = len(v.nodes)
        num_draft = len(s.token_ids) - 1
        self.controller.verified(state, [s.draft_ranks[i - 1] for i in v.nodes],
                                 max(depths(s.draft_parents), default=0), greedy)  # an empty tree gains nothing
        if num_draft:
            self.counters["spec_num_drafts"] += 1
            self.counters["spec_num_draft_tokens"] += num_draft
            self.counters["spec_num_accepted_tokens"] += accepted
            self.counters["spec_relaxed_accepts"] += v.relaxed
            if len(self.accepted_per_pos) < accepted:
                self.accepted_per_pos.extend([0] * (accepted - len(self.accepted_per_pos)))
            for i in range(accepted):
                self.accepted_per_pos[i] += 1

    def nearest(self, device: torch.device) -> Tensor:
        if self._nearest is None:
            # a callable: a quantized embedding dequantizes its table only when LANTERN first needs it
            embedding = self.embedding() if callable(self.embedding) else self.embedding
            self._nearest = nearest_neighbours(embedding, self.model_name).to(device)
        return self._nearest

    def stats(self, running: list) -> dict:
        return {**self.counters, "spec_accepted_per_pos": list(self.accepted_per_pos)}


def _adaptive(measure: Optional[Callable[[int, int], float]], max_batch: int, disable_by_batch_size=None):
    from sift.server.spec.adaptive import AdaptiveController  # its cost model loads only when chosen
    return AdaptiveController(measure, max_batch)


CONTROLLERS = {"simple": SimpleController, "adaptive": _adaptive}


def make_controller(name: str, measure: Optional[Callable[[int, int], float]], max_batch: int,
                    disable_by_batch_size: Optional[int] = None):
    """The draft-budget controller named ``name`` (:data:`CONTROLLERS`)."""
    if name not in CONTROLLERS:
        raise ValueError(f"speculative: unknown controller {name!r}")
    return CONTROLLERS[name](measure, max_batch, disable_by_batch_size)
