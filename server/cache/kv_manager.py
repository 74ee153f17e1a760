"""Per-request block tables over a BlockPool: prefix-cache hits, append, fork, truncate, compact.

A request's *kv indices* 0..num_resident-1 are its resident KV entries in order; kv index
``i`` lives at physical slot ``block_table[i // block_size] * block_size + i % block_size``.
Without eviction kv index == token position; after ``compact`` it is not (keys carry their
rotary position), which is why ``num_resident`` is tracked apart from computed tokens.

Invariants kept by every operation:
  * ``len(block_table) == ceil(num_resident / block_size)``;
  * the block that the next appended entry lands in (the partial tail block) is private to
    the request, unhashed and never the null block, so appends never need copy-on-write;
  * a block's prefix hash always describes its content: blocks about to be rewritten lose it,
    and a request whose KV was rewritten (``compact``) never registers hashes again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Optional, Sequence

import numpy as np

from sift.server.cache.block_pool import NULL_BLOCK, BlockPool

BlockCopy = tuple[int, int]  # (src_block, dst_block): copy every slot of src into dst


def hash_block(parent_hash: Optional[int], token_ids: Sequence[int]) -> int:
    """Chained hash of a full block: it identifies the block's tokens *and* everything before them."""
    return hash((parent_hash, tuple(token_ids)))


@dataclass(frozen=True)
class CompactPlan:
    """KV movement the runner applies for one compaction, in this order:
    1. ``copies`` (whole blocks, src -> dst);
    2. for every layer l and kv head h: gather ``pool[src_slots[l, h]]`` then write it to ``pool[dst_slots]``
       (gather fully before writing: source and destination slots overlap)."""

    src_slots: np.ndarray  # [L, Hkv, N] int64, physical slots in the post-copy block table
    dst_slots: np.ndarray  # [N] int64
    copies: list[BlockCopy]


@dataclass
class _RequestKV:
    block_table: list[int]
    num_resident: int
    block_hashes: list[int] = field(default_factory=list)  # chain of the leading full blocks already hashed
    rewritten: bool = False
    window_released_upto: int = 0  # table entries below this index were already handled by the window


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self._requests: dict[Hashable, _RequestKV] = {}
        self._counters = dict(prefix_cache_queries=0, prefix_cache_hits=0, cow_copies=0,
                              compactions=0, compaction_freed_blocks=0, window_freed_blocks=0)

    # ---- views -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    @property
    def stats(self) -> dict[str, int]:
        return {**self._counters, "evicted_cached_blocks": self.pool.num_evicted}

    def has(self, req_id: Hashable) -> bool:
        return req_id in self._requests

    def block_table(self, req_id: Hashable) -> list[int]:
        return list(self._requests[req_id].block_table)

    def num_resident(self, req_id: Hashable) -> int:
        return self._requests[req_id].num_resident

    def slots(self, req_id: Hashable, start: int, n: int) -> list[int]:
        """Physical slots of kv indices [start, start + n)."""
        table, bs = self._requests[req_id].block_table, self.block_size
        return [table[i // bs] * bs + i % bs for i in range(start, start + n)]

    # ---- admission ---------------------------------------------------------------------------
    def blocks_needed(self, req_id: Hashable, num_new_tokens: int, num_computed_tokens: int = 0) -> int:
        """New blocks ``allocate_slots`` would take (for a new request, beyond its computed blocks)."""
        req = self._requests.get(req_id)
        if req is None:
            return _cdiv(num_computed_tokens + num_new_tokens, self.block_size) - num_computed_tokens // self.block_size
        return _cdiv(req.num_resident + num_new_tokens, self.block_size) - len(req.block_table)

    # ---- prefix cache ------------------------------------------------------------------------
    def get_computed_blocks(self, token_ids: Sequence[int]) -> tuple[list[int], int]:
        """Longest run of cached full blocks matching the prompt's prefix, and the tokens they cover.
        Stops one token short of the prompt so the last token is always computed (it yields the logits).
        A pure lookup: no reference changes."""
        self._counters["prefix_cache_queries"] += len(token_ids)
        if not self.enable_prefix_caching:
            return [], 0
        bs, blocks, parent = self.block_size, [], None
        for i in range((len(token_ids) - 1) // bs):
            parent = hash_block(parent, token_ids[i * bs:(i + 1) * bs])
            block = self.pool.lookup(parent)
            if block is None:
                break
            blocks.append(block)
        self._counters["prefix_cache_hits"] += len(blocks) * bs
        return blocks, len(blocks) * bs

    def cache_blocks(self, req_id: Hashable, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Register the hashes of the request's full blocks within its first ``num_computed_tokens`` tokens."""
        req = self._requests[req_id]
        if req.rewritten or not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(num_computed_tokens, req.num_resident) // bs
        parent = req.block_hashes[-1] if req.block_hashes else None
        for i in range(len(req.block_hashes), num_full):
            parent = hash_block(parent, token_ids[i * bs:(i + 1) * bs])
            req.block_hashes.append(parent)
            self.pool.cache(req.block_table[i], parent)  # the pool skips null blocks (window holes)

    # ---- growth and release ------------------------------------------------------------------
    def allocate_slots(self, req_id: Hashable, num_new_tokens: int, computed_blocks: Sequence[int] = (),
                       num_computed_tokens: int = 0) -> Optional[list[int]]:
        """Reserve kv indices [num_resident, num_resident + num_new_tokens) and return their slots.

        On a request's first call it adopts ``computed_blocks`` (prefix-cache hits covering exactly
        ``num_computed_tokens`` tokens); later calls ignore both. All-or-nothing: None, with nothing
        changed, if the pool is short of blocks."""
        req = self._requests.get(req_id)
        bs = self.block_size
        adopted: list[int] = []
        if req is None:
            if num_computed_tokens != len(computed_blocks) * bs:
                raise ValueError("num_computed_tokens must equal len(computed_blocks) * block_size")
            adopted = list(computed_blocks)
            table_len, resident = len(adopted), num_computed_tokens
        else:
            table_len, resident = len(req.block_table), req.num_resident
        need = _cdiv(resident + num_new_tokens, bs) - table_len
        revived = sum(1 for b in adopted if self.pool.ref_count(b) == 0)  # leave the free LRU
        if need + revived > self.pool.num_free_blocks:
            return None
        if req is None:
            self.pool.share(adopted)  # before allocating, so the hits cannot be evicted for our own blocks
            req = self._requests[req_id] = _RequestKV(adopted, num_computed_tokens)
        if need > 0:
            req.block_table.extend(self.pool.allocate(need))
        start = req.num_resident
        req.num_resident += num_new_tokens
        return self.slots(req_id, start, num_new_tokens)

    def free(self, req_id: Hashable) -> None:
        req = self._requests.pop(req_id)
        # Tail first: the LRU then evicts a prefix's last blocks before its first ones.
        self.pool.release(reversed(req.block_table))

    def truncate(self, req_id: Hashable, num_resident: int) -> Optional[list[BlockCopy]]:
        """Drop resident entries beyond ``num_resident`` (e.g. rejected draft tokens) and free tail blocks.

        Returns block copies the runner must apply before the next write: non-empty only when the cut
        lands inside a block shared with another request (that block is copied, not overwritten).
        None (nothing changed) in the rare case that copy finds no free block."""
        req = self._requests[req_id]
        if not 0 <= num_resident <= req.num_resident:
            raise ValueError(f"cannot truncate {req.num_resident} resident entries to {num_resident}")
        bs = self.block_size
        keep_blocks = _cdiv(num_resident, bs)
        cut = req.block_table[keep_blocks:]
        tail = req.block_table[num_resident // bs] if num_resident % bs else NULL_BLOCK
        unshare = num_resident % bs != 0 and (tail == NULL_BLOCK or self.pool.ref_count(tail) > 1)
        freed_by_cut = sum(1 for b in cut if b != NULL_BLOCK and self.pool.ref_count(b) == 1)
        if unshare and self.pool.num_free_blocks + freed_by_cut == 0:
            return None
        self.pool.release(reversed(cut))
        del req.block_table[keep_blocks:]
        del req.block_hashes[num_resident // bs:]
        req.num_resident = num_resident
        req.window_released_upto = min(req.window_released_upto, keep_blocks)
        if not unshare:
            if num_resident % bs:
                self.pool.uncache(tail)  # private, and its content is about to change
            return []
        (fresh,) = self.pool.allocate(1)
        req.block_table[-1] = fresh
        if tail == NULL_BLOCK:
            return []  # its other entries were already outside the window
        self.pool.release([tail])
        self._counters["cow_copies"] += 1
        return [(tail, fresh)]

    def is_pristine(self, req_id: Hashable) -> bool:
        """True if the request's KV holds exactly its tokens in order: never compacted, no window holes."""
        req = self._requests[req_id]
        return not req.rewritten and NULL_BLOCK not in req.block_table

    def fork(self, parent_id: Hashable, child_id: Hashable) -> Optional[list[BlockCopy]]:
        """Give ``child_id`` the parent's KV: full blocks shared, the partial tail block copied.
        Returns the copies to apply, or None (nothing changed) if no block is free for the copy."""
        if child_id in self._requests:
            raise ValueError(f"request {child_id!r} already has KV")
        parent = self._requests[parent_id]
        num_full = parent.num_resident // self.block_size
        copies: list[BlockCopy] = []
        table = parent.block_table[:num_full]
        if num_full < len(parent.block_table):
            fresh = self.pool.allocate(1)
            if fresh is None:
                return None
            copies.append((parent.block_table[num_full], fresh[0]))
            table.append(fresh[0])
        self.pool.share(parent.block_table[:num_full])
        self._requests[child_id] = _RequestKV(table, parent.num_resident, list(parent.block_hashes),
                                              parent.rewritten, parent.window_released_upto)
        self._counters["cow_copies"] += len(copies)
        return copies

    # ---- lossy techniques --------------------------------------------------------------------
    def compact(self, req_id: Hashable, keep) -> Optional[CompactPlan]:
        """Move the kv indices ``keep`` ([L, Hkv, N], rows strictly increasing) of every layer/kv head
        to kv indices [0, N), free the tail blocks, and mark the request rewritten.

        A destination block is rewritten unless every layer/head keeps exactly its own entries there;
        a trailing partial block always counts as rewritten since later appends change it. Rewritten
        blocks lose their prefix hash, and those shared with other requests (or window holes) are
        first replaced by private blocks. None (nothing changed) if the pool lacks those blocks."""
        req = self._requests[req_id]
        keep = np.asarray(keep, dtype=np.int64)
        if keep.ndim != 3:
            raise ValueError("keep must be [num_layers, num_kv_heads, N]")
        n, bs = keep.shape[2], self.block_size
        table = np.asarray(req.block_table, dtype=np.int64)
        if keep.size:
            if keep.min() < 0 or keep.max() >= req.num_resident or np.any(np.diff(keep, axis=2) <= 0):
                raise ValueError("keep rows must be strictly increasing kv indices below num_resident")
            if np.any(table[keep // bs] == NULL_BLOCK):
                raise ValueError("keep refers to entries released by the sliding window")
        num_keep_blocks = _cdiv(n, bs)
        unchanged = np.zeros(num_keep_blocks * bs, dtype=bool)
        unchanged[:n] = np.all(keep == np.arange(n), axis=(0, 1))
        rewritten = np.flatnonzero(~unchanged.reshape(num_keep_blocks, bs).all(axis=1)).tolist()
        unshare = [b for b in rewritten
                   if req.block_table[b] == NULL_BLOCK or self.pool.ref_count(req.block_table[b]) > 1]
        fresh = self.pool.allocate(len(unshare))  # before the tail is freed: the gather still reads it
        if fresh is None:
            return None
        copies: list[BlockCopy] = []
        for b, new in zip(unshare, fresh):
            old = req.block_table[b]
            req.block_table[b] = new
            if old != NULL_BLOCK:
                copies.append((old, new))
                self.pool.release([old])
        for b in rewritten:
            self.pool.uncache(req.block_table[b])
        table = np.asarray(req.block_table, dtype=np.int64)
        src_slots = table[keep // bs] * bs + keep % bs
        dst = np.arange(n, dtype=np.int64)
        dst_slots = table[dst // bs] * bs + dst % bs

        tail = req.block_table[num_keep_blocks:]
        del req.block_table[num_keep_blocks:]
        self.pool.release(reversed(tail))
        req.num_resident, req.rewritten, req.block_hashes, req.window_released_upto = n, True, [], 0
        self._counters["compactions"] += 1
        self._counters["compaction_freed_blocks"] += len(tail)
        self._counters["cow_copies"] += len(copies)
        return CompactPlan(src_slots, dst_slots, copies)

    def release_outside_window(self, req_id: Hashable, sinks: int, window: int) -> int:
        """Free blocks wholly outside kv indices [0, sinks) and [num_resident - window, num_resident),
        leaving null-block holes in the table. Returns how many blocks were released."""
        req = self._requests[req_id]
        bs = self.block_size
        lo = max(_cdiv(sinks, bs), req.window_released_upto)
        hi = (req.num_resident - window) // bs  # never reaches the partial tail block
        released = 0
        for i in range(lo, hi):
            block = req.block_table[i]
            if block != NULL_BLOCK:
                self.pool.release([block])
                req.block_table[i] = NULL_BLOCK
                released += 1
        req.window_released_upto = max(lo, hi)
        self._counters["window_freed_blocks"] += released
        return released
