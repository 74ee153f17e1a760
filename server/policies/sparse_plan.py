"""Sparse decode, step by step: the planner that turns the scheduled requests' sparsity policies
(:mod:`sift.server.policies.sparsity`) into one step's plan, and the plan the attention backend runs layer by
layer (dense rows batched, selection layers, token, page and sketch-ranked reads). The key indexes the
plans rank by live in :mod:`sift.server.policies.key_index`."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from sift.kernels import reference as ref
from sift.kernels.backend import AttentionBackend, AttentionMetadata
from sift.kernels.selection import (kept_tokens, pages_to_slots, quest_page_bounds, rerank_slots, sketch_topk,
                               top_pages, topk_token_slots)
from sift.server.policies.key_index import QuestIndex
from sift.server.policies.skipping import SkipState
from sift.server.policies.sparsity import DENSE, KEEP, PAGES, SELECT, SKETCH, TOKENS, SparsityState

Tensor = torch.Tensor


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
            policy = self._policy(req)
            if policy is not None:
                if policy.uses_page_index and self.index is None:
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
            self.index.refresh([blk for _, s, p in picked if p.uses_page_index for blk in s.block_table],
                               self.kv_caches)
        return SparsePlan(rows, picked, meta, self.index, self.block_size)

    def _policy(self, req):
        """The request's sparse-decode policy: its sparsity method's, else the reads its skipping prefill left
        (:class:`PrunedReads`); None when it decodes densely."""
        state = req.state_of(SparsityState)
        if state is not None and state.policy.sparse_decode:
            return state.policy
        skip = req.state_of(SkipState)
        return skip.pruned_reads(req, len(self.kv_caches)) if skip is not None else None

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
        self.rows = torch.tensor(rows, device=dev)
        self.sub = meta.decode_subset([b for b, _, _ in picked], self.rows)
        self.sub._cache["slots"] = ref.padded_slots(self.sub.block_tables, self.sub.kv_lens, self.sub.max_kv_len,
                                                    block_size)
        self.policies = [p for _, _, p in picked]
        self.budgets = torch.tensor([p.budget for p in self.policies], device=dev)
        self.reserved = torch.tensor([p.reserved() for p in self.policies], device=dev)  # [n, 2]
        self.max_budget = int(max(p.budget for p in self.policies))
        self.selected = torch.tensor([p.selected for p in self.policies], device=dev)
        self.max_selected = min(int(max(p.selected for p in self.policies)), self.sub.max_kv_len)
        # some tidal rows keep more candidates than their budget: their sparse layers re-rank them
        self.rerank = any(p.shares_selection and p.selected > p.budget for p in self.policies)
        self.forced: Optional[Tensor] = None  # [n, Hkv, max_selected]: candidates every layer keeps
        # the rows are the whole batch in order: a layer where all of them read their tidal selection is
        # one sparse decode call, without gathering rows or slot lists
        self.whole_batch = rows == list(range(meta.num_seqs))
        self.tidal_slots: Optional[Tensor] = None  # [n, Hkv, max_selected], filled by the selection layers
        all_rows_sparse = n == meta.num_seqs
        self.layers, cache = [], {}
        for layer in range(len(picked[0][2].roles)):
            roles = tuple(p.roles[layer] for _, _, p in picked)
            need_dense = not all_rows_sparse or DENSE in roles or layer in meta.score_layers
            key = (roles, need_dense)
            if key not in cache:
                groups = [torch.tensor([i for i, r in enumerate(roles) if r == role], device=dev)
                          for role in (SELECT, TOKENS, PAGES, KEEP, SKETCH)]
                cache[key] = None if all(g.numel() == 0 for g in groups) else (need_dense, *groups)
            self.layers.append(cache[key])

    def attend(self, backend: AttentionBackend, layer: int, q: Tensor, k_cache: Tensor, v_cache: Tensor,
               meta: AttentionMetadata, scale: float) -> Tensor:
        if self.index is not None:
            self.index.record(layer, k_cache, meta.slot_mapping)
        groups = self.layers[layer] if self.layers is not None else None
        if groups is None:
            return backend.dense_forward(layer, q, k_cache, v_cache, meta, scale)
        need_dense, select, tokens, pages, keep, sketch = groups
        if self.whole_batch and not need_dense and tokens.numel() == self.rows.numel():
            return backend.sparse_decode(q, k_cache, v_cache, self._token_slots(q, k_cache, None, scale), scale)
        out = backend.dense_forward(layer, q, k_cache, v_cache, meta, scale) if need_dense else torch.empty_like(q)
        if select.numel():
            out[self.rows[select]] = self._select(backend, layer, q, select, k_cache, v_cache, scale)
        lists = []
        if tokens.numel():
            lists.append(self._token_slots(q[self.rows[tokens]], k_cache, tokens, scale))
        if pages.numel():
            lists.append(self._quest_slots(layer, q[self.rows[pages]], pages))
        if keep.numel():
            lists.append(self._kept_slots(layer, keep, k_cache.shape[1]))
        if sketch.numel():
            lists.append(self._sketch_slots(layer, q, sketch, k_cache, scale))
        if lists:
            width = max(x.shape[2] for x in lists)
            slots = torch.cat([F.pad(x, (0, width - x.shape[2]), value=-1) for x in lists])
            sparse_rows = self.rows[torch.cat([g for g in (tokens, pages, keep, sketch) if g.numel()])]
            out[sparse_rows] = backend.sparse_decode(q[sparse_rows], k_cache, v_cache, slots, scale)
        return out

    def _select(self, backend, layer, q, select, k_cache, v_cache, scale) -> Tensor:
        """Dense decode of the selecting rows, then their new slot sets from its scores."""
        sub = self._subset(select)
        out, (score_sum, _) = backend.decode(q[self.rows[select]], k_cache, v_cache, sub, scale, emit=True)
        first, latest = self.reserved[select].unbind(1)
        slots, kv_idx = topk_token_slots(score_sum, sub._cache["slots"], sub.kv_lens, self.selected[select], first,
                                         latest, self.max_selected)
        if self.tidal_slots is None:
            self.tidal_slots = slots.new_full((self.rows.numel(), slots.shape[1], self.max_selected), -1)
        pad = self.max_selected - slots.shape[2]
        self.tidal_slots[select] = F.pad(slots, (0, pad), value=-1)
        if self.rerank:  # what every layer keeps: the current token and the kept first/latest tokens
            forced = self._forced(kv_idx, sub.kv_lens, self.reserved[select])
            if self.forced is None:
                self.forced = torch.zeros(self.tidal_slots.shape, dtype=torch.bool, device=slots.device)
            self.forced[select] = F.pad(forced, (0, pad), value=False)
        return out

    def _token_slots(self, q: Tensor, k_cache: Tensor, tokens: Optional[Tensor], scale: float) -> Tensor:
        """Slot lists of the tidal rows ``tokens`` (None = every row) in a sparse layer: their selection, or
        this layer's own top-budget of its candidates (:func:`rerank_slots`)."""
        slots = self.tidal_slots if tokens is None else self.tidal_slots[tokens]
        if not self.rerank:
            return slots
        forced = self.forced if tokens is None else self.forced[tokens]
        budgets = self.budgets if tokens is None else self.budgets[tokens]
        return rerank_slots(q, k_cache, slots, forced, budgets, scale, self.max_budget)

    def _quest_slots(self, layer: int, q: Tensor, pages: Tensor) -> Tensor:
        bs = self.block_size
        tables, lens = self.sub.block_tables[pages], self.sub.kv_lens[pages]
        num_pages = (lens + bs - 1) // bs
        bounds = quest_page_bounds(q, self.index.key_min[layer], self.index.key_max[layer], tables, num_pages)
        chosen = top_pages(bounds, num_pages, self.budgets[pages], bs)
        return pages_to_slots(chosen, tables, lens, bs)

    def _sketch_slots(self, layer: int, q: Tensor, sketch: Tensor, k_cache: Tensor, scale: float) -> Tensor:
        """Slot lists [len(sketch), Hkv, K] of the loki rows ``sketch``: each request's top-budget tokens by its
        key sketches' scores (:func:`sketch_topk`), or its top candidates by them re-ranked by exact scores."""
        rows, qs = sketch.tolist(), q[self.rows[sketch]]
        lists, indices = [], []
        for j, i in enumerate(rows):
            policy, kv_len = self.policies[i], self.sub.kv_lens_host[i]
            slots = self.sub._cache["slots"][i]
            scores = policy.sketch.scores(layer, qs[j], k_cache, slots, kv_len, scale)
            picked, kv_idx = sketch_topk(scores, slots, policy.selected, *policy.reserved())
            lists.append(picked)
            indices.append(kv_idx)
        width = max(x.shape[1] for x in lists)
        picked = torch.stack([F.pad(x, (0, width - x.shape[1]), value=-1) for x in lists])
        if not any(self.policies[i].selected > self.policies[i].budget for i in rows):
            return picked
        kv_idx = torch.stack([F.pad(x, (0, width - x.shape[1]), value=-1) for x in indices])
        forced = self._forced(kv_idx, self.sub.kv_lens[sketch], self.reserved[sketch])
        return rerank_slots(qs, k_cache, picked, forced, self.budgets[sketch], scale, self.max_budget)

    @staticmethod
    def _forced(kv_idx: Tensor, kv_lens: Tensor, reserved: Tensor) -> Tensor:
        """Which selected kv indices ``kv_idx`` [n, Hkv, K] (-1 = padding) every layer keeps when it re-ranks:
        the current token and the kept first/latest ones (``reserved`` [n, 2])."""
        first, latest = (x.long()[:, None, None] for x in reserved.unbind(1))
        last = (kv_lens.long() - 1)[:, None, None]
        return (kv_idx >= 0) & kept_tokens(kv_idx, last, first, latest)

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
        sub = self.sub.decode_subset(idx.tolist(), idx)
        sub._cache["slots"] = self.sub._cache["slots"][idx][:, :sub.max_kv_len]
        return sub
