"""Fixed-size KV blocks: reference counts, a free list, and an LRU of cached-but-free blocks.

Block 0 is the *null block*: never handed out, it marks a hole in a block table
(e.g. blocks released outside a sliding window). Usable blocks are 1..num_blocks-1.

A block whose content is registered under a prefix hash keeps that hash when its
last reference goes away: it waits in an LRU so a later request with the same
prefix can revive it. Allocation prefers blocks that hold nothing reusable, and
only then evicts the least recently freed cached block (forgetting its hash).
Every operation is O(1) per block touched.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Optional

NULL_BLOCK = 0


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError("num_blocks must be >= 2 (block 0 is reserved)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._hash_of: list[Optional[int]] = [None] * num_blocks
        self._block_of_hash: dict[int, int] = {}
        # Popped from the end, so blocks come out in ascending order on a fresh pool.
        self._free = list(range(num_blocks - 1, 0, -1))
        # Cached blocks with ref count 0, oldest release first (evicted first).
        self._cached_free: OrderedDict[int, None] = OrderedDict()
        self.num_evicted = 0

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: truly free plus cached-but-free."""
        return len(self._free) + len(self._cached_free)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks referenced by at least one request."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def block_hash(self, block: int) -> Optional[int]:
        return self._hash_of[block]

    def allocate(self, n: int) -> Optional[list[int]]:
        """``n`` fresh blocks with ref count 1 and no hash, or None (nothing changed) if too few."""
        if n > self.num_free_blocks:
            return None
        blocks = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._cached_free.popitem(last=False)
                self._forget_hash(block)
                self.num_evicted += 1
            self._ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def share(self, blocks: Iterable[int]) -> None:
        """Add one reference to each (non-null) block, reviving cached-but-free ones."""
        for block in blocks:
            if block == NULL_BLOCK:
                continue
            if self._ref_counts[block] == 0:
                del self._cached_free[block]
            self._ref_counts[block] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """Drop one reference from each (non-null) block; blocks reaching 0 become free in the given order."""
        for block in blocks:
            if block == NULL_BLOCK:
                continue
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if self._hash_of[block] is not None:
                    self._cached_free[block] = None
                else:
                    self._free.append(block)

    def lookup(self, block_hash: int) -> Optional[int]:
        """The block registered under ``block_hash`` (referenced or cached-but-free), if any."""
        return self._block_of_hash.get(block_hash)

    def cache(self, block: int, block_hash: int) -> None:
        """Register a full, referenced block's content hash. A hash already owned by another
        block keeps its owner (two requests computed the same prefix); a hashed block keeps its hash."""
        if not self.enable_prefix_caching or block == NULL_BLOCK:
            return
        if self._hash_of[block] is not None or block_hash in self._block_of_hash:
            return
        self._hash_of[block] = block_hash
        self._block_of_hash[block_hash] = block

    def uncache(self, block: int) -> None:
        """Forget a referenced block's hash because its content is about to change."""
        if self._hash_of[block] is not None:
            self._forget_hash(block)

    def _forget_hash(self, block: int) -> None:
        del self._block_of_hash[self._hash_of[block]]
        self._hash_of[block] = None
