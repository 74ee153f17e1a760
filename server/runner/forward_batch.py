"""ForwardBatch: the explicit argument of every model forward (no hidden globals)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sift.kernels.backend import AttentionBackend, AttentionMetadata

Tensor = torch.Tensor


@dataclass
class ForwardBatch:
    """One step's flat, unpadded batch.

    input_ids/positions: [T]; attn: per-step attention metadata (cu_seqlens,
    block tables, slot mapping, window/tree masks, score sinks); kv_caches: the
    paged pool, one (k, v) pair of [num_slots, Hkv, D] per layer; logits_indices:
    the rows of the flat batch whose logits are wanted (last token of each
    request that samples, or every tree node under speculation).
    """

    input_ids: Tensor
    positions: Tensor
    attn: AttentionMetadata
    backend: AttentionBackend
    kv_caches: list
    logits_indices: Tensor
    extras: dict = field(default_factory=dict)  # technique state keyed by name (sparse index sets, skip plans)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
