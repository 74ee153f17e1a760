"""SparsityPolicy: which KV entries a request's attention reads. dense | window | quest | tidal | loki.

* ``window`` (StreamingLLM-style): every query sees the first ``sinks`` tokens and the last ``window``;
  prefill and decode alike, through the attention kernels' window/sinks masks. Blocks wholly outside
  sinks + window go back to the pool after each step, so a long generation holds bounded memory.
* ``tidal`` (TidalDecode, 2410.05076): decode layers below the selection layer attend densely; the
  selection layer (default 2) attends densely, and its attention of the current query, summed over
  each kv head's query group, picks the top-(budget - 1) earlier tokens per (request, kv head); the
  current token is always added. Later layers attend over that set only, except the re-selection
  layer (default num_layers // 2; a list gives several), which attends densely and refreshes it. Two additions to the paper,
  both options: each selection first keeps the ``sinks`` first and ``recent`` latest tokens (inside the
  budget; 4 and 32 by default), and ``reselect_every`` N > 0 re-selects every N layers from the selection
  layer (more dense layers, closer to dense). On SmolLM2, budget 256 (bench/long_context.py: 2,000
  tokens, 4 pydoc documents, decode speed at 8K): forced perplexity vs dense +34% without the kept
  tokens, +24% with them at the same speed (3.3x dense); every 4 layers +11% and the needle kept, at
  1.9x. The loss is the sharing, not the budget: each layer over its own exact top-256 is +0.96% with
  the needle kept (the bench's ``oracle_topk`` bound). Re-ranking (optional, ``candidates`` C > budget, an
  addition of ours toward that bound): a selection keeps C candidates and every sparse layer attends over
  its own top-budget of them by its own query's attention (:func:`sift.kernels.selection.rerank_slots`: it reads
  the C candidates' keys, the budget's values). KV correction (optional, ``correction_interval``
  T): the K/V of generated tokens come out of sparse layers; every T of them the scheduler rewinds the
  request by those T tokens and re-feeds them as one dense chunk, which overwrites their K/V with exact
  values (a T-token prefill every T steps).
* ``quest`` (Quest): per block and layer the elementwise min/max of its keys (kept by
  :class:`sift.server.policies.key_index.QuestIndex`, updated at every KV write once a quest request
  exists); in every layer but the first two, each kv head reads the budget // block_size pages of
  highest bound sum_i max(q_i min_i, q_i max_i), the current page always included.
* ``loki`` (Loki, 2406.02542, with TidalDecode's token granularity): in every layer but the first two each
  request ranks its whole context by approximate scores from low-rank key sketches (``rank`` principal
  directions of its own keys, :class:`sift.server.policies.key_index.KeySketch`) and attends exactly over its
  own top-budget tokens (kept first/latest tokens included, as tidal keeps them); with ``candidates`` C >
  budget the sketch picks C and the exact scores of those pick the budget (:func:`rerank_slots`). Every
  layer selects for itself, so nothing hinges on one layer's choice carrying to others (what TidalDecode
  loses on SmolLM2); the sketch reads rank/D of the keys.

* pruned reads (:class:`PrunedReads`, not a method a request names): a request whose Probe-and-Skip
  prefill pruned prompt tokens (server/policies/skipping.py) reads, in each layer, every kv index but
  the ones pruned before that layer.

Sparse attention reads, never deletes: prefill stays dense and the full KV stays resident. Only
decode steps (one query) of tidal/quest/pruned requests are sparse, also inside a mixed batch.
Lossy requests never feed the prefix cache beyond their exact KV (:meth:`SparsityPolicy.exact_kv_tokens`).
Executing the policies' decisions step by step (the Quest index, the per-step plan) lives in
:mod:`sift.server.policies.sparse_plan`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sift.server.engine.request import Request
from sift.server.options import SparsityOptions
from sift.server.policies.key_index import KeySketch
from sift.server.techniques import ALL_TOKENS, Technique, TechniqueState

Tensor = torch.Tensor
DENSE, SELECT, TOKENS, PAGES, KEEP, SKETCH = range(6)  # a request's role in one decode layer
QUEST_DENSE_LAYERS = 2  # Quest leaves the first two layers dense


class SparsityPolicy:
    """The dense policy; subclasses change the window, the per-layer decode roles, or both."""

    name = "dense"
    sparse_decode = False  # whether decode steps need a SparsePlan
    reads_own_kv = False  # whether the request's attention reads other than every token (see TechniqueState)
    uses_page_index = False  # whether its decode ranks pages by the pool's QuestIndex
    shares_selection = False  # whether later layers read a selection layer's tokens (re-ranked when selected > budget)

    def __init__(self, opts: SparsityOptions, num_layers: int):
        self.opts = opts
        self.roles = (DENSE,) * num_layers

    @property
    def budget(self) -> int:
        return self.opts.budget

    @property
    def selected(self) -> int:
        return self.opts.budget

    def window(self) -> tuple[int, int]:
        """(window, sinks) of the attention masks; window 0 = unbounded."""
        return 0, 0

    def reserved(self) -> tuple[int, int]:
        """(first, latest) tokens a token selection always keeps."""
        return 0, 0

    def exact_kv_tokens(self, req: Request) -> int:
        """Leading tokens whose KV equals a dense computation (what the prefix cache may share)."""
        return ALL_TOKENS

    def rewind(self, req: Request) -> int:
        """After a step: how many of the latest computed tokens to re-encode densely now (0: none)."""
        return 0

    def restart(self) -> None:
        """The request was preempted: its keys are recomputed."""

    def keys_rewritten(self) -> None:
        """Some of the request's keys were rewritten in place (an eviction compaction into its blocks)."""


class WindowPolicy(SparsityPolicy):
    name = "window"
    reads_own_kv = True

    def window(self) -> tuple[int, int]:
        return self.opts.window, self.opts.sinks

    def exact_kv_tokens(self, req: Request) -> int:
        return 0  # even prompt KV past layer 0 comes from windowed attention


class _SparseDecode(SparsityPolicy):
    """A policy whose decode steps read a selection of the KV (a SparsePlan runs them)."""

    sparse_decode = True
    reads_own_kv = True

    def exact_kv_tokens(self, req: Request) -> int:
        return req.num_prompt_tokens  # generated tokens' KV comes out of sparse layers


class _TokenSelection(_SparseDecode):
    """A policy that selects tokens per (request, kv head): the first ``sinks`` and latest ``recent`` kept,
    ``candidates`` > budget re-ranked by each layer's exact scores."""

    def reserved(self) -> tuple[int, int]:
        return self.opts.sinks, self.opts.recent

    @property
    def selected(self) -> int:
        """Tokens a selection keeps: the budget, or the candidates each sparse layer re-ranks."""
        return max(self.opts.budget, self.opts.candidates)


class TidalPolicy(_TokenSelection):
    name = "tidal"
    shares_selection = True

    def __init__(self, opts: SparsityOptions, num_layers: int):
        super().__init__(opts, num_layers)
        sel, resel = opts.selection_layer, opts.reselection_layer
        if not 0 <= sel < num_layers:
            raise ValueError(f"sparsity.selection_layer must be in [0, {num_layers})")
        if resel is None:
            resel = {num_layers // 2}
        else:
            resel = {resel} if isinstance(resel, int) else set(resel)
            if not all(sel < r < num_layers for r in resel):
                raise ValueError(f"sparsity.reselection_layer: layers must be in ({sel}, {num_layers})")
        every = opts.reselect_every
        self.roles = tuple(DENSE if i < sel else
                           SELECT if i == sel or i in resel or (every and (i - sel) % every == 0) else TOKENS
                           for i in range(num_layers))
        self.dense_upto = 0  # tokens [0, dense_upto) have dense K/V (prefill, or corrected)

    def rewind(self, req: Request) -> int:
        t = self.opts.correction_interval
        done = max(self.dense_upto, req.num_prompt_tokens)
        if not t or req.num_computed_tokens - done < t:
            return 0
        self.dense_upto = req.num_tokens  # the re-fed chunk ends with the newest token: all of it dense
        return req.num_computed_tokens - done


class QuestPolicy(_SparseDecode):
    name = "quest"
    uses_page_index = True

    def __init__(self, opts: SparsityOptions, num_layers: int):
        super().__init__(opts, num_layers)
        self.roles = tuple(DENSE if i < QUEST_DENSE_LAYERS else PAGES for i in range(num_layers))


class LokiPolicy(_TokenSelection):
    name = "loki"

    def __init__(self, opts: SparsityOptions, num_layers: int):
        super().__init__(opts, num_layers)
        self.roles = tuple(DENSE if i < QUEST_DENSE_LAYERS else SKETCH for i in range(num_layers))
        self.sketch = KeySketch(num_layers, opts.rank)

    def restart(self) -> None:
        self.sketch.invalidate()

    def keys_rewritten(self) -> None:
        self.sketch.invalidate()


POLICIES = {p.name: p for p in (SparsityPolicy, WindowPolicy, TidalPolicy, QuestPolicy, LokiPolicy)}


class PrunedReads:
    """Decode reads of a request whose token-skipping prefill pruned prompt tokens: layer i reads every kv
    index except those with ``prune_layer <= i`` (``prune_layer`` [prefilled tokens], int16, num_layers =
    never pruned), as a slot list through the sparse decode kernel. Same interface as a sparse-decode
    :class:`SparsityPolicy` (roles, budget) plus :meth:`read_slots`."""

    name = "pruned"
    sparse_decode = True
    uses_page_index = shares_selection = False
    budget = selected = 0

    @staticmethod
    def reserved() -> tuple[int, int]:
        return 0, 0

    def __init__(self, prune_layer: Tensor, num_layers: int):
        self.prune_layer = prune_layer
        self.thresholds = sorted({int(x) for x in prune_layer.unique().tolist()} - {num_layers})
        self.roles = tuple(DENSE if i < self.thresholds[0] else KEEP for i in range(num_layers))
        self._kept: dict = {}  # number of thresholds passed -> kept kv indices among the prefilled ones

    def read_slots(self, layer: int, slots: Tensor, kv_len: int) -> Tensor:
        """The physical slots layer reads: ``slots`` [>= kv_len] maps kv index -> slot."""
        key = sum(t <= layer for t in self.thresholds)
        if key not in self._kept:
            self._kept[key] = torch.nonzero(self.prune_layer > layer).flatten()
        n = self.prune_layer.numel()
        idx = torch.cat([self._kept[key], torch.arange(n, kv_len, device=slots.device)])
        return slots[idx]


def resolve_options(opts: Optional[SparsityOptions], default: SparsityOptions) -> SparsityOptions:
    """The request's own options, else the server default."""
    return opts if opts is not None else default


def make_policy(opts: SparsityOptions, num_layers: int) -> SparsityPolicy:
    return POLICIES[opts.method](opts, num_layers)


@dataclass
class SparsityState(TechniqueState):
    policy: SparsityPolicy

    @property
    def reads_own_kv(self) -> bool:
        return self.policy.reads_own_kv

    def restart(self, req) -> None:
        self.policy.restart()


class Sparsity(Technique):
    """Every request's sparsity policy (its own options, else the server default)."""

    name = "sparsity"

    def __init__(self, default: SparsityOptions, num_layers: int, block_size: int):
        self.default = default
        self.num_layers = num_layers
        self.block_size = block_size

    def on_admit(self, req: Request) -> None:
        policy = make_policy(resolve_options(req.params.sparsity, self.default), self.num_layers)
        req.technique_state[SparsityState] = SparsityState(policy)

    def plan(self, step, requests: dict) -> None:
        # a loki request's key sketches go stale when an eviction compaction moves keys into its blocks
        moved = {int(x) // self.block_size for c in step.compactions for x in c.dst_slots}
        for s in step.requests if moved else ():
            state = requests[s.request_id].state_of(SparsityState)
            if state is not None and not moved.isdisjoint(s.block_table):
                state.policy.keys_rewritten()

    def window(self, req: Request) -> tuple:
        state = req.state_of(SparsityState)
        return state.policy.window() if state is not None else (0, 0)

    def exact_kv(self, req: Request) -> int:
        state = req.state_of(SparsityState)
        return state.policy.exact_kv_tokens(req) if state is not None else ALL_TOKENS

    def rewind(self, req: Request) -> int:
        state = req.state_of(SparsityState)
        return state.policy.rewind(req) if state is not None else 0
