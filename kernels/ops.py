"""The KV write and decode attention of the compiled forward as registered torch custom ops.

``torch.compile`` would break its graph at the data-dependent parts of the reference kernels (the longest
kv length of the step sizes the padded gather); as custom ops with fake implementations they are single
opaque nodes, and the graph runs from the embedding to the logits. Each op runs the same reference code
as the eager torch backend (:mod:`sift.kernels.reference`), so compiled and eager attention agree.
"""
from __future__ import annotations

import torch

from sift.kernels import reference as ref

Tensor = torch.Tensor


@torch.library.custom_op("sift::store_kv", mutates_args=("k_cache", "v_cache"))
def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """k_cache[slot_mapping] = k, v_cache[slot_mapping] = v (every slot valid: padded rows name a scratch slot)."""
    k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


@store_kv.register_fake
def _(k, v, k_cache, v_cache, slot_mapping) -> None:
    return None


@torch.library.custom_op("sift::paged_decode", mutates_args=())
def paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, kv_lens: Tensor,
                 block_size: int, scale: float, window: int, softcap: float) -> Tensor:
    """Dense decode attention [B, Hq, D] of one query per request (:func:`sift.kernels.reference.paged_decode`);
    ``window`` > 0: the layer's own sliding window (no sinks)."""
    win = torch.full_like(kv_lens, window) if window else None
    max_kv = int(kv_lens.max())
    slots = ref.padded_slots(block_tables, kv_lens, max_kv, block_size)
    return ref.paged_decode(q, k_cache, v_cache, block_tables, kv_lens, block_size, scale, win, None,
                            slots=slots, softcap=softcap)[0]


@paged_decode.register_fake
def _(q, k_cache, v_cache, block_tables, kv_lens, block_size, scale, window, softcap) -> Tensor:
    return torch.empty_like(q)
