"""KV eviction policies: none | streaming | h2o | snapkv | lazy (LazyEviction), one object per request.

Every policy keeps, per (layer, kv head), the same number C of resident KV entries (the budget), so
one request's kv indices stay aligned across layers while each layer/head keeps its own tokens (a slot
is not a token: keys carry their rotary position). A policy decides *which* entries to keep; the KV
manager's ``compact`` moves them and frees the tail blocks.

Time. ``t`` is the request's logical length after a step (tokens whose K/V were computed); the entry
born in a step at time t is token t-1. Decisions are taken between steps, after the step's accepted
tokens are final (never inside a speculative tree).

Cadence (shared by lazy, h2o and streaming, so all three hold C..C+W entries): a policy may evict when
its t crosses a multiple of the window W since its previous update (for one-token steps: t mod W == 0)
and it holds more than C entries; it then keeps the C-W best older entries plus the last W. SnapKV
evicts once, when the prompt is complete.

Scores. The attention backends emit, per request and kv head, the attention probabilities of the
request's last query, aggregated over the kv head's query group: (sum, max). H2O accumulates the sum;
LazyEviction counts a recurrence when the max over the group reaches alpha (any query head of the
group attended); SnapKV sums the last w prompt queries (``score_queries``) and max-pools.

Budget: ``budget > 1`` is C in tokens; ``budget <= 1`` is a ratio of the request's maximum length
(prompt + max_tokens), fixed when the request is added. So a request never holds more than C + W
entries once its prompt is processed, and ``budget >= prompt + max_tokens`` never evicts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from sift.server.options import EvictionOptions
from sift.server.techniques import Technique, TechniqueState

Tensor = torch.Tensor
SNAPKV_POOL = 7  # SnapKV's 1-D pooling kernel over the observation-window scores


def resolve_capacity(budget: float, max_len: int) -> int:
    """C: entries kept per layer/kv head (see the module docstring)."""
    return int(budget) if budget > 1 else max(1, math.ceil(budget * max_len))


class EvictionPolicy:
    """One request's eviction state, as per-(layer, kv head, entry) statistics in [L, Hkv, N] tensors. The
    Eviction technique calls, per step of the request: ``score_queries`` before the forward, ``observe``
    after it, then ``select``; when the KV manager could compact with the returned ``keep``,
    ``compacted(keep)``. Subclasses give the statistics (``_new_stats``, ``_update``) and the ranking
    (``_scores``, ``_ties``); the cadence and the keep rule (top C-W older entries plus the last W) are here."""

    name = "base"
    needs_scores = True  # whether it reads attention scores at all
    periodic = True  # decides at every crossing of a multiple of W (SnapKV: once, at the end of the prompt)
    evicts_generated = True  # whether generated tokens may be evicted (SnapKV keeps every one)

    def __init__(self, options: EvictionOptions, capacity: int, num_layers: int, num_kv_heads: int):
        self.options = options
        self.capacity = capacity  # C
        self.window = options.window  # W
        self.shape = (num_layers, num_kv_heads)
        self.num_entries = 0  # resident entries the policy accounts for
        self.t = 0
        self._crossed = False  # t crossed a multiple of W in the latest update
        self.stats: dict[str, Tensor] = {}
        self.device = torch.device("cpu")  # follows the scores (the model's device)

    # -- hooks for subclasses --------------------------------------------------------------
    def _new_stats(self, n: int, t: int) -> dict:
        return {}

    def _update(self, t: int, prob_sum: Tensor, prob_max: Tensor) -> None:
        pass

    def _scores(self) -> Tensor:
        """[L, Hkv, N]: higher = keep."""
        raise NotImplementedError

    def _ties(self) -> Optional[Tensor]:
        """[L, Hkv, N] that breaks ties among equal scores (higher = keep), or None: the more recent entry."""
        return None

    # -- the technique's calls ----------------------------------------------------------------
    def score_queries(self, completes_prompt: bool, num_new: int) -> int:
        """Trailing queries of this step whose attention the policy needs (0: no scores)."""
        return 1 if self.needs_scores else 0

    def observe(self, t: int, num_resident: int, scores: Optional[tuple]) -> None:
        """Account for the step's new entries and fold in its scores ((sum, max) [L, Hkv, >= N] or None)."""
        if scores is not None and scores[0].device != self.device:
            self.device = scores[0].device
            self.stats = {k: v.to(self.device) for k, v in self.stats.items()}
        n_new = num_resident - self.num_entries
        if n_new > 0:
            for key, value in self._new_stats(n_new, t).items():
                old = self.stats.get(key)
                self.stats[key] = value if old is None else torch.cat([old, value], dim=2)
        self.num_entries = num_resident
        if scores is not None:
            n = num_resident
            self._update(t, scores[0][:, :, :n].float(), scores[1][:, :, :n].float())
        self._crossed = t // self.window > self.t // self.window
        self.t = t

    def select(self, completes_prompt: bool) -> Optional[Tensor]:
        """Entries to keep, int64 [L, Hkv, C] rows strictly increasing, or None (no eviction now)."""
        if not self._crossed or self.num_entries <= self.capacity:
            return None
        return self._keep(self._scores(), self._ties())

    def compacted(self, keep: Tensor) -> None:
        """The KV manager applied ``keep``: reorder the per-entry statistics the same way."""
        self.stats = {k: torch.gather(v, 2, keep.to(self.device)) for k, v in self.stats.items()}
        self.num_entries = keep.shape[2]

    def restarted(self) -> "EvictionPolicy":
        """The same policy with no entries (a recompute after preemption starts from an empty cache)."""
        return type(self)(self.options, self.capacity, *self.shape)

    # -- helpers ---------------------------------------------------------------------------
    def _keep(self, scores: Tensor, tie: Optional[Tensor] = None) -> Tensor:
        """Top (C - W) of the entries older than the last W by score, ties broken by ``tie`` (higher kept; by
        default, and among equal ``tie``, the more recent entry), plus the last W; sorted ascending per row.
        W is capped at C."""
        n, c = scores.shape[2], self.capacity
        recent = min(self.window, c)
        older = n - recent
        if tie is None:
            tie = torch.arange(older, device=scores.device, dtype=torch.float32).expand(*self.shape, older)
        # rank by tie (recent first among equals), then a stable sort by score keeps that order within ties
        first = torch.sort(torch.flip(tie[:, :, :older].float(), dims=[2]), dim=2, descending=True,
                           stable=True).indices
        first = older - 1 - first
        by_score = torch.sort(torch.gather(scores[:, :, :older].float(), 2, first), dim=2, descending=True,
                              stable=True).indices
        top = torch.sort(torch.gather(first, 2, by_score)[:, :, :c - recent], dim=2).values
        tail = torch.arange(older, n, device=top.device).expand(*self.shape, recent)
        return torch.cat([top, tail], dim=2).to(torch.int64)

    def _zeros(self, n: int) -> Tensor:
        return torch.zeros(*self.shape, n, device=self.device)


class StreamingLLM(EvictionPolicy):
    """Attention sinks (the first ``sinks`` entries) plus the most recent entries; needs no scores."""

    name = "streaming"
    needs_scores = False

    def _scores(self) -> Tensor:
        n = self.num_entries
        s = torch.arange(n, dtype=torch.float32).expand(*self.shape, n).clone()  # recency
        s[:, :, :self.options.sinks] = float("inf")
        return s


class H2O(EvictionPolicy):
    """Heavy hitters: attention accumulated by each entry (summed over the query group) since it was
    written; the lowest are evicted. Prompt entries start from the last W prompt queries' attention."""

    name = "h2o"

    def score_queries(self, completes_prompt: bool, num_new: int) -> int:
        return min(self.window, num_new) if num_new > 1 else 1

    def _new_stats(self, n: int, t: int) -> dict:
        return {"acc": self._zeros(n)}

    def _update(self, t: int, prob_sum: Tensor, prob_max: Tensor) -> None:
        self.stats["acc"] += prob_sum

    def _scores(self) -> Tensor:
        return self.stats["acc"]


class SnapKV(EvictionPolicy):
    """Prompt compression once, at the end of prefill: the last w = W prompt queries vote (summed over
    queries and group, max-pooled with kernel 7); keep the top C - w plus the window. A prompt that
    fits is not compressed; the generated tokens are never evicted."""

    name = "snapkv"
    periodic = False
    evicts_generated = False

    def score_queries(self, completes_prompt: bool, num_new: int) -> int:
        return self.window if completes_prompt else 0

    def _update(self, t: int, prob_sum: Tensor, prob_max: Tensor) -> None:
        self._votes = F.max_pool1d(prob_sum, SNAPKV_POOL, stride=1, padding=SNAPKV_POOL // 2)

    def observe(self, t: int, num_resident: int, scores: Optional[tuple]) -> None:
        self._votes = None
        super().observe(t, num_resident, scores)

    def select(self, completes_prompt: bool) -> Optional[Tensor]:
        if not completes_prompt or self._votes is None or self.num_entries <= self.capacity:
            return None
        return self._keep(self._votes)


class LazyEviction(EvictionPolicy):
    """LazyEviction (2506.15969): per entry ``last`` (step of its latest recurrence, i.e. attention
    probability >= alpha) and ``mri`` (maximum recurrence interval). An entry born at step t starts with
    last = t - 1, mri = 0. Entries likely to recur again soon, relative to their own rhythm, score high:
    2/(1+exp(1+(t-last)/(mri+1e-5))) + (0 if mri == 0 else 2/(1+exp(mri-1))).

    Ties. Every entry that recurs at every step scores the same (last = t, mri = 1), and at short
    contexts or small alpha that is most of the cache — attention sinks included. The paper leaves ties
    open; here they go to the entry with more recent attention (an EMA of its probability, decay
    ``TIE_DECAY``), so a sink outranks a token that merely clears alpha. The score order is unchanged."""

    name = "lazy"
    TIE_DECAY = 0.9

    def _new_stats(self, n: int, t: int) -> dict:
        return {"last": torch.full((*self.shape, n), float(t - 1), device=self.device), "mri": self._zeros(n),
                "attn": self._zeros(n)}

    def _update(self, t: int, prob_sum: Tensor, prob_max: Tensor) -> None:
        last, mri = self.stats["last"], self.stats["mri"]
        hit = prob_max >= self.options.alpha
        self.stats["mri"] = torch.where(hit, torch.maximum(mri, t - last), mri)
        self.stats["last"] = torch.where(hit, torch.full_like(last, float(t)), last)
        self.stats["attn"].mul_(self.TIE_DECAY).add_(prob_max, alpha=1 - self.TIE_DECAY)

    def _scores(self) -> Tensor:
        return lazy_scores(self.t, self.stats["last"], self.stats["mri"])

    def _ties(self) -> Tensor:
        return self.stats["attn"]


def lazy_scores(t: int, last: Tensor, mri: Tensor) -> Tensor:
    """LazyEviction's importance score of every entry at step t."""
    recency = 2.0 / (1.0 + torch.exp(1.0 + (t - last) / (mri + 1e-5)))
    rhythm = torch.where(mri == 0, torch.zeros_like(mri), 2.0 / (1.0 + torch.exp(mri - 1.0)))
    return recency + rhythm


POLICIES = {"none": None, **{cls.name: cls for cls in (StreamingLLM, H2O, SnapKV, LazyEviction)}}


def make_policy(options: EvictionOptions, capacity: int, num_layers: int,
                num_kv_heads: int) -> Optional[EvictionPolicy]:
    """The policy ``options`` name (None: no eviction)."""
    cls = POLICIES[options.method]
    return cls(options, capacity, num_layers, num_kv_heads) if cls is not None else None


def evicting_depth(depth: int, num_entries: int, capacity: int, window: int) -> int:
    """The first decision point at ``depth + k * window`` (k >= 0) that evicts, i.e. where the entries then held,
    ``num_entries + depth + k * window + 1``, exceed ``capacity``. Closed form, O(1) whatever the budget: a
    loop over the decision points would take capacity / window iterations, which a request controls."""
    spare = capacity - num_entries - depth - 1  # entries that still fit at the nearest point
    return depth if spare < 0 else depth + (spare // window + 1) * window


@dataclass
class EvictionState(TechniqueState):
    """An evicting request's policy (rebuilt after a preemption)."""

    policy: EvictionPolicy

    def restart(self, req) -> None:
        self.policy = self.policy.restarted()


class Eviction(Technique):
    """Per request: resolve its options once (``on_admit``); before a step, ask the backends for every layer's
    scores when a scheduled request's policy needs them (``plan``); after the step, once its tokens are final,
    feed the scores to the policy and compact through the KV manager (``after_step``, which returns the plans
    for the next SchedulerOutput)."""

    name = "eviction"

    def __init__(self, default: EvictionOptions, num_layers: int, num_kv_heads: int, kv):
        self.default = default
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.kv = kv  # sift.server.cache.kv_manager.KVManager
        self.all_layers = frozenset(range(num_layers))
        self.counters = {"kv_evicted_tokens": 0, "kv_compactions": 0}

    def on_admit(self, req) -> None:
        options = req.params.eviction or self.default
        capacity = resolve_capacity(options.budget, req.num_prompt_tokens + req.params.max_tokens)
        policy = make_policy(options, capacity, self.num_layers, self.num_kv_heads)
        if policy is not None:
            req.technique_state[EvictionState] = EvictionState(policy)

    @staticmethod
    def _completes_prompt(req, s) -> bool:
        start = s.positions[0]
        return start < req.num_prompt_tokens <= start + len(s.token_ids)

    def peak_tokens(self, req) -> Optional[int]:
        """Most entries the request holds at once under its policy (None: no eviction): the whole prompt until
        its first decision, then C + W for the policies that evict generated tokens, C plus every generated
        token for SnapKV."""
        state = req.state_of(EvictionState)
        if state is None:
            return None
        full = req.num_prompt_tokens + req.params.max_tokens
        policy = state.policy
        steady = policy.capacity + (policy.window if policy.evicts_generated else req.params.max_tokens)
        return min(full, max(req.num_prompt_tokens, steady))

    def draft_depth(self, req) -> Optional[int]:
        """Deepest draft tree the request may verify this step, or None (no limit). A periodic policy decides
        after the step whose t is a multiple of W; a tree whose accepted path crossed that point would let the
        tokens after it attend to a cache that, decoded one token at a time, would have been compacted already.
        So the tree stops at the first decision point that will evict (one where the entries exceed C)."""
        state = req.state_of(EvictionState)
        if state is None or not state.policy.periodic:
            return None
        policy = state.policy
        p = req.num_computed_tokens  # the root's position: decoding it alone would be step t = p + 1
        return evicting_depth(-(p + 1) % policy.window, policy.num_entries, policy.capacity, policy.window)

    def plan(self, step, requests: dict) -> None:
        needs = False
        for s in step.requests:
            req = requests[s.request_id]
            state = req.state_of(EvictionState)
            if state is None:
                continue
            if s.draft_parents is not None:  # per-query tree scores (sift.kernels.reference.tree_scores)
                needs |= state.policy.needs_scores
                continue
            q = state.policy.score_queries(self._completes_prompt(req, s), len(s.token_ids))
            if q:
                needs, s.score_queries = True, q
        if needs:
            step.score_layers = step.score_layers | self.all_layers

    def after_step(self, step, outputs, requests: dict) -> list:
        """Plans of the compactions done (already applied to the KV manager's tables)."""
        sums = maxs = None
        if outputs.scores:
            sums = torch.stack([outputs.scores[layer][0] for layer in range(self.num_layers)], dim=1)
            maxs = torch.stack([outputs.scores[layer][1] for layer in range(self.num_layers)], dim=1)
        plans, kv = [], self.kv
        for b, s in enumerate(step.requests):
            req = requests.get(s.request_id)
            if req is None or req.status.finished or not kv.has(s.request_id):
                continue  # finished, aborted or preempted
            state = req.state_of(EvictionState)
            if state is None:
                continue
            policy = state.policy
            if s.draft_parents is not None:
                self._observe_tree(policy, req, s, b, outputs)
            else:
                policy.observe(req.num_computed_tokens, kv.num_resident(s.request_id),
                               None if sums is None else (sums[b], maxs[b]))
            keep = policy.select(self._completes_prompt(req, s))
            if keep is None:
                continue
            plan = kv.compact(s.request_id, keep.cpu().numpy())
            if plan is None:
                continue  # no block free for copy-on-write: retry at the next crossing
            self.counters["kv_evicted_tokens"] += policy.num_entries - keep.shape[2]
            self.counters["kv_compactions"] += 1
            policy.compacted(keep)
            plans.append(plan)
        return plans

    def _observe_tree(self, policy: EvictionPolicy, req, s, b: int, outputs) -> None:
        """Feed a verification step to the policy as the one-token steps it replaces: the root and each accepted
        draft, in order, each seeing the context plus the path before it (columns re-indexed to the compacted
        layout). ``draft_depth`` kept decision points out of the middle of the path."""
        path = [0, *outputs.accepted_nodes.get(s.request_id, [])]
        ctx = s.kv_len - len(s.token_ids)
        t0 = req.num_computed_tokens - len(path)
        layers = [outputs.tree_scores[layer][b] for layer in range(self.num_layers)] if outputs.tree_scores else None
        for j, node in enumerate(path):
            scores = None
            if layers is not None:
                cols = torch.tensor([*range(ctx), *(ctx + i for i in path[:j + 1])], device=layers[0][0].device)
                scores = tuple(torch.stack([lay[k][node][:, cols] for lay in layers]) for k in (0, 1))
            policy.observe(t0 + j + 1, ctx + j + 1, scores)

    def stats(self, running: list) -> dict:
        kv = self.kv
        return {**self.counters,
                "kv_resident_tokens": sum(kv.num_resident(r.request_id) for r in running if kv.has(r.request_id)),
                "kv_logical_tokens": sum(r.num_computed_tokens for r in running)}
