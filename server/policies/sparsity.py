"""SparsityPolicy: which KV entries a request's attention reads. dense | window | quest | tidal.

* ``window`` (StreamingLLM-style): every query sees the first ``sinks`` tokens and the last ``window``;
  prefill and decode alike, through the attention kernels' window/sinks masks. Blocks wholly outside
  sinks + window go back to the pool after each step, so a long generation holds bounded memory.
* ``tidal`` (TidalDecode, 2410.05076): decode layers below the selection layer attend densely; the
  selection layer (default 2) attends densely, and its attention of the current query, summed over
  each kv head's query group, picks the top-(budget - 1) earlier tokens per (request, kv head); the
  current token is always added. Later layers attend over that set only, except the re-selection
  layer (default num_layers // 2), which attends densely and refreshes it. KV correction (optional,
  ``correction_interval`` T): the K/V of generated tokens come out of sparse layers; every T of them
  the scheduler rewinds the request by those T tokens and re-feeds them as one dense chunk, which
  overwrites their K/V with exact values (a T-token prefill every T steps).
* ``quest`` (Quest): per block and layer the elementwise min/max of its keys (kept by
  :class:`QuestIndex`, updated at every KV write once a quest request exists); in every layer but
  the first two, each kv head reads the budget // block_size pages of highest bound
  sum_i max(q_i min_i, q_i max_i), the current page always included.

* pruned reads (:class:`PrunedReads`, not a method a request names): a request whose Probe-and-Skip
  prefill pruned prompt tokens (server/policies/skipping.py) reads, in each layer, every kv index but
  the ones pruned before that layer.

Sparse attention reads, never deletes: prefill stays dense and the full KV stays resident. Only
decode steps (one query) of tidal/quest/pruned requests are sparse, also inside a mixed batch.
Lossy requests never feed the prefix cache beyond their exact KV (:meth:`SparsityPolicy.exact_kv_tokens`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kernels import reference as ref
from kernels.backend import AttentionBackend, AttentionMetadata
from kernels.selection import pages_to_slots, quest_page_bounds, top_pages, topk_token_slots
from server.config import SparsityConfig
from server.engine.request import Request, SparsityOptions

Tensor = torch.Tensor
DENSE, SELECT, TOKENS, PAGES, KEEP = range(5)  # a request's role in one decode layer
ALL_TOKENS = 1 << 62
QUEST_DENSE_LAYERS = 2  # Quest leaves the first two layers dense


class SparsityPolicy:
    """The dense policy; subclasses change the window, the per-layer decode roles, or both."""

    name = "dense"
    sparse_decode = False  # whether decode steps need a SparsePlan

    def __init__(self, opts: SparsityOptions, num_layers: int):
        self.opts = opts
        self.roles = (DENSE,) * num_layers

    @property
    def budget(self) -> int:
        return self.opts.budget

    def window(self) -> tuple[int, int]:
        """(window, sinks) of the attention masks; window 0 = unbounded."""
        return 0, 0

    def exact_kv_tokens(self, req: Request) -> int:
        """Leading tokens whose KV equals a dense computation (what the prefix cache may share)."""
        return ALL_TOKENS

    def rewind(self, req: Request) -> int:
        """After a step: how many of the latest computed tokens to re-encode densely now (0: none)."""
        return 0


class WindowPolicy(SparsityPolicy):
    name = "window"

    def window(self) -> tuple[int, int]:
        return self.opts.window, self.opts.sinks

    def exact_kv_tokens(self, req: Request) -> int:
        return 0  # even prompt KV past layer 0 comes from windowed attention


class TidalPolicy(SparsityPolicy):
    name = "tidal"
    sparse_decode = True

    def __init__(self, opts: SparsityOptions, num_layers: int):
        super().__init__(opts, num_layers)
        sel = opts.selection_layer
        resel = opts.reselection_layer if opts.reselection_layer is not None else num_layers // 2
        if not 0 <= sel < num_layers:
            raise ValueError(f"sparsity.selection_layer must be in [0, {num_layers})")
        self.roles = tuple(DENSE if i < sel else SELECT if i in (sel, resel) else TOKENS for i in range(num_layers))
        self.dense_upto = 0  # tokens [0, dense_upto) have dense K/V (prefill, or corrected)

    def exact_kv_tokens(self, req: Request) -> int:
        return req.num_prompt_tokens  # generated tokens' KV comes out of sparse layers

    def rewind(self, req: Request) -> int:
        t = self.opts.correction_interval
        done = max(self.dense_upto, req.num_prompt_tokens)
        if not t or req.num_computed_tokens - done < t:
            return 0
        self.dense_upto = req.num_tokens  # the re-fed chunk ends with the newest token: all of it dense
        return req.num_computed_tokens - done


class QuestPolicy(SparsityPolicy):
    name = "quest"
    sparse_decode = True

    def __init__(self, opts: SparsityOptions, num_layers: int):
        super().__init__(opts, num_layers)
        self.roles = tuple(DENSE if i < QUEST_DENSE_LAYERS else PAGES for i in range(num_layers))

    def exact_kv_tokens(self, req: Request) -> int:
        return req.num_prompt_tokens


POLICIES = {p.name: p for p in (SparsityPolicy, WindowPolicy, TidalPolicy, QuestPolicy)}


class PrunedReads:
    """Decode reads of a request whose token-skipping prefill pruned prompt tokens: layer i reads every kv
    index except those with ``prune_layer <= i`` (``prune_layer`` [prefilled tokens], int16, num_layers =
    never pruned), as a slot list through the sparse decode kernel. Same interface as a sparse-decode
    :class:`SparsityPolicy` (roles, budget) plus :meth:`read_slots`."""

    name = "pruned"
    sparse_decode = True
    budget = 0

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


def reads_every_token(req: Request) -> bool:
    """Whether the request's options read the KV on their own terms (speculative trees, eviction scores, a
    sparse method): then tokens its prefill pruned stay visible, and their KV must stay written."""
    policy = req.state.get("sparsity")
    return "spec" in req.state or "eviction_options" in req.state or (policy is not None and policy.name != "dense")


def pruned_reads(req: Request, num_layers: int) -> Optional[PrunedReads]:
    """The decode reads of a request whose prefill pruned tokens, or None. Requests whose other options
    read the KV on their own terms (speculative trees, eviction scores, a sparse method) keep every token."""
    reads = req.state.get("pruned_reads")
    if reads is None:
        prune = req.state.get("prune_layer")
        if prune is None or int(prune.min()) >= num_layers or reads_every_token(req):
            return None
        reads = req.state["pruned_reads"] = PrunedReads(prune, num_layers)
    return reads


def resolve_options(opts: Optional[SparsityOptions], default: SparsityConfig) -> SparsityOptions:
    """The request's own options, else the server default."""
    if opts is not None:
        return opts
    return SparsityOptions(method=default.method, budget=default.budget, window=default.window, sinks=default.sinks)


def make_policy(opts: SparsityOptions, num_layers: int) -> SparsityPolicy:
    return POLICIES[opts.method](opts, num_layers)


def window_of(req: Request) -> tuple[int, int]:
    policy = req.state.get("sparsity")
    return policy.window() if policy is not None else (0, 0)


def rewind_of(req: Request) -> int:
    policy = req.state.get("sparsity")
    return policy.rewind(req) if policy is not None else 0


def exact_kv_of(req: Request) -> int:
    policy = req.state.get("sparsity")
    return policy.exact_kv_tokens(req) if policy is not None else ALL_TOKENS


class QuestIndex:
    """Per (layer, block, kv head) elementwise min and max of the block's keys.

    Allocated when the first quest request is scheduled; from then on every KV write of a step with
    sparse decode rows updates it (a block's first slot resets it), so blocks a quest request later
    adopts from the prefix cache are mostly indexed already. Blocks written before it existed, in steps
    without sparse rows (those run no sparse plan at all), or rewritten outside store_kv (block copies,
    compaction) are marked stale and recomputed from the pool before a quest request reads them.
    """

    def __init__(self, kv_caches: list, block_size: int):
        k0 = kv_caches[0][0]
        num_blocks = k0.shape[0] // block_size
        shape = (num_blocks, k0.shape[1], k0.shape[2])
        self.block_size = block_size
        self.key_min = [torch.full(shape, float("inf"), dtype=k0.dtype, device=k0.device) for _ in kv_caches]
        self.key_max = [torch.full(shape, float("-inf"), dtype=k0.dtype, device=k0.device) for _ in kv_caches]
        self.fresh = [False] * num_blocks  # host-side: metadata describes the block's content

    def note_writes(self, slot_mapping: list, rewritten_blocks: list) -> None:
        """Host bookkeeping before a step: blocks written from their first slot become fresh."""
        for b in rewritten_blocks:
            self.fresh[b] = False
        bs = self.block_size
        for s in slot_mapping:
            if s >= 0 and s % bs == 0:
                self.fresh[s // bs] = True

    def refresh(self, blocks: list, kv_caches: list) -> None:
        """Recompute stale blocks among ``blocks`` from the pool (every layer)."""
        stale = sorted({b for b in blocks if not self.fresh[b]})
        if not stale:
            return
        dev = self.key_min[0].device
        slots = (torch.tensor(stale, device=dev)[:, None] * self.block_size
                 + torch.arange(self.block_size, device=dev)).reshape(-1)
        for layer, (k, _) in enumerate(kv_caches):
            keys = k[slots].view(len(stale), self.block_size, *k.shape[1:])
            self.key_min[layer][stale] = keys.amin(1)
            self.key_max[layer][stale] = keys.amax(1)
        for b in stale:
            self.fresh[b] = True

    def record(self, layer: int, k_cache: Tensor, slot_mapping: Tensor) -> None:
        """Fold this step's keys of one layer into their blocks' extrema."""
        slots = slot_mapping[slot_mapping >= 0]
        if slots.numel() == 0:
            return
        blocks = slots // self.block_size
        first = blocks[slots % self.block_size == 0]
        lo, hi = self.key_min[layer], self.key_max[layer]
        lo[first] = float("inf")
        hi[first] = float("-inf")
        keys = k_cache[slots]
        idx = blocks[:, None, None].expand_as(keys)
        lo.scatter_reduce_(0, idx, keys, "amin")
        hi.scatter_reduce_(0, idx, keys, "amax")


class SparsePlanner:
    """Engine-level: owns the Quest index and turns each step into a :class:`SparsePlan` (or None)."""

    def __init__(self, kv_caches: list, block_size: int):
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.index: Optional[QuestIndex] = None
        # decode tokens that attended sparsely (quest, tidal, pruned reads)
        self.counters = {"sparse_decode_tokens": 0}

    def plan(self, sched, requests: dict, meta: AttentionMetadata) -> Optional["SparsePlan"]:
        rows, picked, offset = [], [], 0
        for b, s in enumerate(sched.requests):
            req = requests[s.request_id]
            policy = req.state.get("sparsity")
            if policy is None or not policy.sparse_decode:
                policy = pruned_reads(req, len(self.kv_caches))
            if policy is not None and policy.sparse_decode:
                if policy.name == "quest" and self.index is None:
                    self.index = QuestIndex(self.kv_caches, self.block_size)
                # a decode step, not a one-token prefill chunk (prefill stays dense)
                if len(s.token_ids) == 1 and s.draft_parents is None and s.positions[0] >= req.num_prompt_tokens:
                    rows.append(offset)
                    picked.append((b, s, policy))
            offset += len(s.token_ids)
        self.counters["sparse_decode_tokens"] += len(rows)
        if self.index is not None:  # once Quest is in use, every step's writes concern the index
            self._note_writes(sched, recorded=bool(rows))
        if not rows:  # no plan: the step runs the backend's dense path as if no sparse request existed
            return None
        if self.index is not None:
            self.index.refresh([blk for _, s, p in picked if p.name == "quest" for blk in s.block_table],
                               self.kv_caches)
        return SparsePlan(rows, picked, meta, self.index, self.block_size)

    def _note_writes(self, sched, recorded: bool) -> None:
        """Tell the Quest index what this step rewrites. ``recorded``: a plan folds the step's keys into the
        index as they are stored; otherwise the written blocks go stale (refreshed when a quest request reads)."""
        writes = [x for s in sched.requests for x in s.slot_mapping]
        rewritten = [d for _, d in sched.block_copies]
        for compaction in sched.compactions:
            rewritten.extend(d for _, d in compaction.copies)
            rewritten.extend({int(x) // self.block_size for x in compaction.dst_slots})
        if not recorded:
            rewritten.extend({x // self.block_size for x in writes if x >= 0})
            writes = []
        self.index.note_writes(writes, rewritten)


class SparsePlan:
    """One step: which rows attend how in each layer. Rows of non-sparse requests (and sparse requests in
    a dense layer) go through the backend's dense path; when every row is sparse in a layer, that dense
    call is skipped altogether. Selected tidal slots live here for the rest of the step."""

    def __init__(self, rows: list, picked: list, meta: AttentionMetadata, index: Optional[QuestIndex],
                 block_size: int):
        self.index = index
        self.block_size = block_size
        n = len(rows)
        if n == 0:
            self.layers = None
            return
        dev = meta.cu_seqlens_q.device
        b_idx = torch.tensor([b for b, _, _ in picked], device=dev)
        self.rows = torch.tensor(rows, device=dev)
        self.sub = AttentionMetadata(
            cu_seqlens_q=torch.arange(n + 1, dtype=torch.int32, device=dev), kv_lens=meta.kv_lens[b_idx],
            block_tables=meta.block_tables[b_idx], slot_mapping=meta.slot_mapping[self.rows],
            block_size=block_size, q_lens=[1] * n, kv_lens_host=[s.kv_len for _, s, _ in picked])
        self.sub._cache["slots"] = ref.padded_slots(self.sub.block_tables, self.sub.kv_lens, self.sub.max_kv_len,
                                                    block_size)
        self.policies = [p for _, _, p in picked]
        self.budgets = torch.tensor([p.budget for p in self.policies], device=dev)
        self.max_selected = min(int(max(p.budget for p in self.policies)), self.sub.max_kv_len)
        self.tidal_slots: Optional[Tensor] = None  # [n, Hkv, max_selected], filled by the selection layers
        all_rows_sparse = n == meta.num_seqs
        self.layers, cache = [], {}
        for layer in range(len(picked[0][2].roles)):
            roles = tuple(p.roles[layer] for _, _, p in picked)
            need_dense = not all_rows_sparse or DENSE in roles or layer in meta.score_layers
            key = (roles, need_dense)
            if key not in cache:
                groups = [torch.tensor([i for i, r in enumerate(roles) if r == role], device=dev)
                          for role in (SELECT, TOKENS, PAGES, KEEP)]
                cache[key] = None if all(g.numel() == 0 for g in groups) else (need_dense, *groups)
            self.layers.append(cache[key])

    def attend(self, backend: AttentionBackend, layer: int, q: Tensor, k_cache: Tensor, v_cache: Tensor,
               meta: AttentionMetadata, scale: float) -> Tensor:
        if self.index is not None:
            self.index.record(layer, k_cache, meta.slot_mapping)
        groups = self.layers[layer] if self.layers is not None else None
        if groups is None:
            return backend.dense_forward(layer, q, k_cache, v_cache, meta, scale)
        need_dense, select, tokens, pages, keep = groups
        out = backend.dense_forward(layer, q, k_cache, v_cache, meta, scale) if need_dense else torch.empty_like(q)
        if select.numel():
            out[self.rows[select]] = self._select(backend, layer, q, select, k_cache, v_cache, scale)
        lists = []
        if tokens.numel():
            lists.append(self.tidal_slots[tokens])
        if pages.numel():
            lists.append(self._quest_slots(layer, q[self.rows[pages]], pages))
        if keep.numel():
            lists.append(self._kept_slots(layer, keep, k_cache.shape[1]))
        if lists:
            width = max(x.shape[2] for x in lists)
            slots = torch.cat([F.pad(x, (0, width - x.shape[2]), value=-1) for x in lists])
            sparse_rows = self.rows[torch.cat([g for g in (tokens, pages, keep) if g.numel()])]
            out[sparse_rows] = backend.sparse_decode(q[sparse_rows], k_cache, v_cache, slots, scale)
        return out

    def _select(self, backend, layer, q, select, k_cache, v_cache, scale) -> Tensor:
        """Dense decode of the selecting rows, then their new slot sets from its scores."""
        sub = self._subset(select)
        out, (score_sum, _) = backend.decode(q[self.rows[select]], k_cache, v_cache, sub, scale, emit=True)
        slots, _ = topk_token_slots(score_sum, sub._cache["slots"], sub.kv_lens, self.budgets[select])
        if self.tidal_slots is None:
            self.tidal_slots = slots.new_full((self.rows.numel(), slots.shape[1], self.max_selected), -1)
        self.tidal_slots[select] = F.pad(slots, (0, self.max_selected - slots.shape[2]), value=-1)
        return out

    def _quest_slots(self, layer: int, q: Tensor, pages: Tensor) -> Tensor:
        bs = self.block_size
        tables, lens = self.sub.block_tables[pages], self.sub.kv_lens[pages]
        num_pages = (lens + bs - 1) // bs
        bounds = quest_page_bounds(q, self.index.key_min[layer], self.index.key_max[layer], tables, num_pages)
        chosen = top_pages(bounds, num_pages, self.budgets[pages], bs)
        return pages_to_slots(chosen, tables, lens, bs)

    def _kept_slots(self, layer: int, keep: Tensor, num_kv_heads: int) -> Tensor:
        """Slot lists [len(keep), Hkv, N] of pruned-reads rows (every kv head reads the same tokens)."""
        lists = [self.policies[i].read_slots(layer, self.sub._cache["slots"][i], self.sub.kv_lens_host[i])
                 for i in keep.tolist()]
        width = max(x.numel() for x in lists)
        slots = torch.stack([F.pad(x, (0, width - x.numel()), value=-1) for x in lists])
        return slots[:, None, :].expand(-1, num_kv_heads, -1)

    def _subset(self, idx: Tensor) -> AttentionMetadata:
        """Decode-only metadata of some sparse rows (all of them when idx covers every row)."""
        if idx.numel() == self.rows.numel():
            return self.sub
        host = idx.tolist()
        sub = AttentionMetadata(
            cu_seqlens_q=self.sub.cu_seqlens_q[:len(host) + 1], kv_lens=self.sub.kv_lens[idx],
            block_tables=self.sub.block_tables[idx], slot_mapping=self.sub.slot_mapping[idx],
            block_size=self.block_size, q_lens=[1] * len(host),
            kv_lens_host=[self.sub.kv_lens_host[i] for i in host])
        sub._cache["slots"] = self.sub._cache["slots"][idx][:, :sub.max_kv_len]
        return sub
