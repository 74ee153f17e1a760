"""The Triton attention backend: KV stores, decode and prefill through this package's Triton kernels.

With ``use_flash_attn`` and flash-attn installed, plain causal prefills (no tree mask, no window,
fp16/bf16, pool blocks a multiple of 256 tokens as flash-attn's paged KV requires) go to
``flash_attn_varlen_func`` over the same paged pool; everything else stays on the Triton kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sift.kernels import kv_ops, sparse_attention
from sift.kernels.backend import AttentionBackend, AttentionMetadata
from sift.kernels.paged_attention import paged_attention, paged_decode

Tensor = torch.Tensor
FLASH_PAGE_MULTIPLE = 256


def _flash_varlen():
    """flash_attn_varlen_func, or None when flash-attn is not installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self, use_flash_attn: bool = False):
        self._flash = _flash_varlen() if use_flash_attn else None

    def store_kv(self, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata) -> None:
        kv_ops.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)

    def _decode(self, q, k_cache, v_cache, meta, scale, emit):
        return paged_decode(q, k_cache, v_cache, meta.block_tables, meta.kv_lens, meta.block_size, scale,
                            meta.window, meta.sinks, return_scores=emit, max_kv_len=meta.max_kv_len,
                            softcap=meta.softcap)

    def sparse_decode(self, q, k_cache, v_cache, slots, scale):
        return sparse_attention.sparse_decode(q, k_cache, v_cache, slots, scale)

    def _prefill(self, q, k_cache, v_cache, meta, scale):
        if self._flash_fits(q, meta):
            return self._flash_prefill(q, k_cache, v_cache, meta, scale)
        return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.kv_lens,
                               meta.block_size, scale, meta.window, meta.sinks, meta.tree_mask,
                               max_q_len=max(meta.q_lens), softcap=meta.softcap)

    def _flash_fits(self, q: Tensor, meta: AttentionMetadata) -> bool:
        return (self._flash is not None and meta.tree_mask is None and meta.window is None and not meta.softcap
                and q.dtype in (torch.float16, torch.bfloat16) and meta.block_size % FLASH_PAGE_MULTIPLE == 0)

    def _flash_prefill(self, q, k_cache, v_cache, meta, scale):
        cu_k = meta._cache.get("cu_seqlens_k")
        if cu_k is None:
            cu_k = F.pad(meta.kv_lens.cumsum(0, dtype=torch.int32), (1, 0))
            meta._cache["cu_seqlens_k"] = cu_k
        paged = (k_cache.shape[0] // meta.block_size, meta.block_size, k_cache.shape[1], k_cache.shape[2])
        # flash-attn aligns the causal diagonal bottom-right when q is shorter than k, as our masking does
        return self._flash(q, k_cache.view(paged), v_cache.view(paged), meta.cu_seqlens_q, cu_k,
                           max(meta.q_lens), meta.max_kv_len, softmax_scale=scale, causal=True,
                           block_table=meta.block_tables)
