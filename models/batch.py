"""ForwardBatch: the explicit argument of every model forward (no hidden globals), and the one hook a
technique may hand the decoder layers: :class:`RowSubsets` (token skipping chooses rows; the layers keep
the math). Lives beside the models so that they depend on kernels/ only, never on server/."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch

from sift.kernels.backend import AttentionBackend, AttentionMetadata

Tensor = torch.Tensor


class RowSubsets(Protocol):
    """Which rows of the flat batch a decoder layer computes (token skipping, server/policies/skipping.py).

    The layer asks three questions, in this order, and does all the math itself (norms, projections,
    residual adds, the MLP); rows it is not told to update pass through bit-identically."""

    def runs(self, layer: int) -> bool:
        """Whether ``layer`` runs on subsets at all (False: the plain layer)."""

    def kv_rows(self, layer: int) -> Optional[Tensor]:
        """Rows [M] whose q/k/v the layer computes and stores (None: every row); the others' q/k are zero."""

    def attend(self, layer: int, q: Tensor, k: Tensor, k_cache: Tensor, v_cache: Tensor, scale: float,
               dense: Callable[[], Tensor]) -> tuple[Tensor, Tensor]:
        """(attention output [T, Hq, D], rows [R] whose attention update is applied). ``dense()`` is the
        layer's own attention of every row through the backend, for the rows the plan does not serve."""

    def mlp_rows(self, layer: int, h: Tensor, probe: Callable[[Tensor, int], Tensor]) -> Tensor:
        """Rows [R] the MLP updates, given the hidden state after attention. ``probe(rows, rank)``: each of
        those rows' predicted relative MLP update (||MLP(x)|| / ||h||) from the MLP's ``rank`` heaviest neurons."""


@dataclass
class ForwardBatch:
    """One step's flat, unpadded batch.

    input_ids/positions: [T]; attn: per-step attention metadata (cu_seqlens, block tables, slot mapping,
    window/tree masks, score sinks); kv_caches: the paged pool, one (k, v) pair of [num_slots, Hkv, D] per
    layer; logits_indices: the rows of the flat batch whose logits are wanted (last token of each request
    that samples, or every tree node under speculation); row_subsets: token skipping's plan, or None.
    """

    input_ids: Tensor
    positions: Tensor
    attn: AttentionMetadata
    backend: AttentionBackend
    kv_caches: list
    logits_indices: Tensor
    row_subsets: Optional[RowSubsets] = None
    extras: dict = field(default_factory=dict)  # runner bookkeeping the model never reads (prompt_rows)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
