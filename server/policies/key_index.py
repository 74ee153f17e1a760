"""Indexes over the KV pool's keys that sparse decode ranks tokens by: Quest's per-block key extrema (one
index for the pool) and Loki's low-rank key sketches (one per request)."""
from __future__ import annotations

import torch

from sift.kernels.selection import key_basis, sketch_scores

Tensor = torch.Tensor


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


class KeySketch:
    """One request's Loki sketches: per layer, a basis [Hkv, D, rank] of its keys' principal directions and
    every kv index's key projected on it ([capacity, Hkv, rank], rows [0, done) valid).

    The basis is fitted on the request's own context at its first sparse decode step (Loki fits it offline
    on a calibration set; fitting per request needs no data beyond the prompt, and a request's selection
    then depends on nothing else in the batch). Each sparse step projects the kv indices written since the
    last one straight from the pool, so tokens of prefill chunks and verified draft trees are covered
    too. :meth:`invalidate` (preemption, eviction compaction: keys rewritten in place) re-projects
    everything at the next step; the basis stays.
    """

    def __init__(self, num_layers: int, rank: int):
        self.rank = rank
        self.basis: list = [None] * num_layers
        self.rows: list = [None] * num_layers
        self.done = [0] * num_layers

    def invalidate(self) -> None:
        self.done = [0] * len(self.done)

    def scores(self, layer: int, q: Tensor, k_cache: Tensor, slots: Tensor, kv_len: int, scale: float) -> Tensor:
        """Approximate attention [Hkv, kv_len] of the request's query q [Hq, D] in ``layer``; ``slots``
        [>= kv_len] maps its kv indices to physical slots of ``k_cache`` [num_slots, Hkv, D]."""
        done = self.done[layer]
        if self.basis[layer] is None:
            self.basis[layer] = key_basis(k_cache[slots[:kv_len]], min(self.rank, k_cache.shape[-1]))
        basis, rows = self.basis[layer], self.rows[layer]
        if rows is None or rows.shape[0] < kv_len:
            # stored in the cache's dtype (half the memory under bfloat16), scored in float32
            grown = torch.empty(max(2 * kv_len, 256), *basis.shape[::2], device=basis.device, dtype=k_cache.dtype)
            if rows is not None:
                grown[:done] = rows[:done]
            rows = self.rows[layer] = grown
        if done < kv_len:
            rows[done:kv_len] = torch.einsum("lhd,hdr->lhr", k_cache[slots[done:kv_len]].float(), basis)
            self.done[layer] = kv_len
        return sketch_scores(q, rows[:kv_len], basis, scale)
