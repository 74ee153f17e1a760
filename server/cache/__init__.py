"""KV memory bookkeeping: a pool of fixed-size blocks and per-request block tables (pure Python)."""
from sift.server.cache.block_pool import NULL_BLOCK, BlockPool
from sift.server.cache.kv_manager import BlockCopy, CompactPlan, KVManager, hash_block

__all__ = ["NULL_BLOCK", "BlockCopy", "BlockPool", "CompactPlan", "KVManager", "hash_block"]
