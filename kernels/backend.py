"""Attention backends: one is chosen at start-up; the model code never changes with it.

A backend receives tensors only: per-layer KV pools, the query/key/value of the
step's new tokens, and an :class:`AttentionMetadata` built once per step by the
runner. ``torch`` runs :mod:`sift.kernels.reference` (the CPU path and test oracle);
``triton`` runs the Triton kernels on CUDA.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch

from sift.kernels import reference as ref

Tensor = torch.Tensor


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step, as tensors on the model's device.

    Flat varlen layout: the step's T new tokens of B requests, request b owning
    rows cu_seqlens_q[b]:cu_seqlens_q[b+1].
    """

    cu_seqlens_q: Tensor  # int32 [B+1]
    kv_lens: Tensor  # int32 [B] resident KV entries per request, including this step's new tokens
    block_tables: Tensor  # int32 [B, max_blocks]
    slot_mapping: Tensor  # int64 [T] physical slot of each new token's K/V
    block_size: int
    q_lens: list[int]  # host copies (no device sync in the hot path)
    kv_lens_host: list[int]
    window: Optional[Tensor] = None  # int32 [B]; 0 = no window (StreamingLLM-style sinks + window)
    sinks: Optional[Tensor] = None  # int32 [B]
    tree_mask: Optional[Tensor] = None  # bool [T, max_q_len]; see sift.kernels.reference
    score_layers: frozenset = frozenset()  # layers that emit per-kv-head scores of each request's last query
    sparse: Optional["SparsePlan"] = None  # per-step sparse decode plan (TidalDecode, Quest); None = dense
    scores: dict = field(default_factory=dict)  # layer -> (sum, max) [B, Hkv, max_kv_len], filled by the backend
    # per request: how many trailing queries of its chunk the emitted scores aggregate (None = 1 each);
    # > 1 only at the end of a prefill, for SnapKV's observation window (see sift.kernels.reference.window_scores)
    score_queries: Optional[list] = None
    # requests (batch indices) whose draft tree's per-query scores score layers also emit into ``tree_scores``:
    # layer -> {b: (sum, max) [n, Hkv, kv_len]} (see sift.kernels.reference.tree_scores)
    score_trees: Optional[list] = None
    tree_scores: dict = field(default_factory=dict)
    softcap: float = 0.0  # > 0: attention logits soft-capped as cap * tanh(x / cap) (Gemma 2); set per layer
    _cache: dict = field(default_factory=dict)  # per-step derived tensors shared across layers

    def for_layer(self, window: int, softcap: float) -> "AttentionMetadata":
        """This step's metadata as a layer with the model's own sliding ``window`` (0 = none) and logit
        ``softcap`` sees it; built once per step for each distinct (window, softcap) and shared by the layers
        that have it (so are their per-step caches).

        A model window is exact attention over the last ``window`` kv indices, no sinks. A request that also
        asked for a (lossy) ``sparsity: window`` keeps its own sinks + window where that window is the narrower
        one; otherwise the model's window applies alone."""
        key = ("layer", window, softcap)
        view = self._cache.get(key)
        if view is None:
            win, sinks = self.window, self.sinks
            if window > 0:
                model = torch.full_like(self.kv_lens, window)
                if win is None:
                    win, sinks = model, torch.zeros_like(model)
                else:
                    narrower = (win > 0) & (win < window)
                    win = torch.where(narrower, win, model)
                    sinks = torch.where(narrower, sinks, torch.zeros_like(sinks))
            view = dataclasses.replace(self, window=win, sinks=sinks, softcap=softcap, _cache={})
            self._cache[key] = view
        return view

    @property
    def num_seqs(self) -> int:
        return len(self.q_lens)

    @property
    def max_kv_len(self) -> int:
        return max(self.kv_lens_host) if self.kv_lens_host else 0

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.q_lens) and self.tree_mask is None

    def decode_subset(self, batch_idx: list, rows: Tensor) -> "AttentionMetadata":
        """Decode-only metadata of requests ``batch_idx`` (host list), one query each: the flat rows ``rows``."""
        idx = torch.tensor(batch_idx, dtype=torch.long, device=self.kv_lens.device)
        return build_metadata([1] * len(batch_idx), [self.kv_lens_host[b] for b in batch_idx], self.block_tables[idx],
                              self.slot_mapping[rows], self.block_size, self.kv_lens.device)


def build_metadata(q_lens: list, kv_lens: list, block_tables, slot_mapping, block_size: int, device,
                   window: Optional[list] = None, sinks: Optional[list] = None, tree_mask: Optional[Tensor] = None,
                   score_layers: frozenset = frozenset(), score_queries: Optional[list] = None,
                   score_trees: Optional[list] = None) -> AttentionMetadata:
    """The one way an :class:`AttentionMetadata` is made: from the host lengths of the step's requests
    (``q_lens``, ``kv_lens``), their block tables (rows of block ids, padded here to the longest, or an
    int32 tensor), the new tokens' slots, and the optional per-request window + sinks (None: no request
    has one) and draft-tree mask. Device tensors are built once here; every layer reads them."""
    if not isinstance(block_tables, Tensor):
        width = max((len(t) for t in block_tables), default=0)
        block_tables = [list(t) + [0] * (width - len(t)) for t in block_tables]
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    return AttentionMetadata(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
        kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=device),
        block_tables=torch.as_tensor(block_tables, dtype=torch.int32, device=device),
        slot_mapping=torch.as_tensor(slot_mapping, dtype=torch.int64, device=device),
        block_size=block_size, q_lens=list(q_lens), kv_lens_host=list(kv_lens),
        window=None if window is None else torch.as_tensor(window, dtype=torch.int32, device=device),
        sinks=None if sinks is None else torch.as_tensor(sinks, dtype=torch.int32, device=device),
        tree_mask=tree_mask, score_layers=score_layers, score_queries=score_queries, score_trees=score_trees)


class SparsePlan(Protocol):
    """A step's sparse decode plan (see server/policies/sparse_plan.py): it decides, per layer, which rows
    attend densely and which over selected slots, calling back into the backend for both."""

    def attend(self, backend: "AttentionBackend", layer: int, q: Tensor, k_cache: Tensor, v_cache: Tensor,
               meta: "AttentionMetadata", scale: float) -> Tensor: ...


class AttentionBackend:
    """Base class. Subclasses implement ``_prefill`` and ``_decode``; the split into
    a batched decode part and a varlen part is shared."""

    name = "base"

    def store_kv(self, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata) -> None:
        ref.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)

    def copy_blocks(self, k_cache: Tensor, v_cache: Tensor, src: Tensor, dst: Tensor, block_size: int) -> None:
        ref.copy_blocks(k_cache, v_cache, src, dst, block_size)

    def gather_compact(self, k_cache: Tensor, v_cache: Tensor, src_slots: Tensor, dst_slots: Tensor) -> None:
        ref.gather_compact(k_cache, v_cache, src_slots, dst_slots)

    def forward(self, layer: int, q: Tensor, k_cache: Tensor, v_cache: Tensor,
                meta: AttentionMetadata, scale: float, window: int = 0, softcap: float = 0.0) -> Tensor:
        """q: [T, Hq, D] -> out [T, Hq, D]; K/V of the new tokens are already stored. ``window``: the layer's
        own sliding window (0 = full attention); ``softcap``: its attention logit soft-cap (0 = none)."""
        if window or softcap:
            meta = meta.for_layer(window, softcap)
        if meta.sparse is not None:
            return meta.sparse.attend(self, layer, q, k_cache, v_cache, meta, scale)
        return self.dense_forward(layer, q, k_cache, v_cache, meta, scale)

    def dense_forward(self, layer: int, q: Tensor, k_cache: Tensor, v_cache: Tensor,
                      meta: AttentionMetadata, scale: float) -> Tensor:
        """Exact attention of every row (the path without a sparse plan)."""
        emit = layer in meta.score_layers
        if meta.is_decode:
            out, scores = self._decode(q, k_cache, v_cache, meta, scale, emit)
            if emit:
                meta.scores[layer] = scores
            return out
        out = self._prefill(q, k_cache, v_cache, meta, scale)
        if emit:
            # scores of each request's last query (the token whose logits are sampled)
            last = meta.cu_seqlens_q[1:].long() - 1
            _, scores = self._decode(q[last], k_cache, v_cache, meta, scale, True)
            if meta.score_queries is not None:
                ref.window_scores(q, k_cache, meta.block_tables, meta.cu_seqlens_q, meta.kv_lens, meta.block_size,
                                  scale, meta.score_queries, scores, meta.window, meta.sinks)
            meta.scores[layer] = scores
            if meta.score_trees:
                cu = meta.cu_seqlens_q.tolist()
                meta.tree_scores[layer] = {
                    b: ref.tree_scores(q[cu[b]:cu[b + 1]], k_cache, meta.block_tables[b], meta.kv_lens_host[b],
                                       meta.block_size, scale, meta.tree_mask[cu[b]:cu[b + 1], :meta.q_lens[b]])
                    for b in meta.score_trees}
        return out

    def decode(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float,
               emit: bool = False):
        """Dense decode of a decode-only ``meta``: (out [B, Hq, D], (sum, max) scores or None)."""
        return self._decode(q, k_cache, v_cache, meta, scale, emit)

    def sparse_decode(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, scale: float) -> Tensor:
        """Decode attention of each (request, kv head) over its slot list ``slots`` [B, Hkv, N] (-1 = padding)."""
        return ref.sparse_decode(q, k_cache, v_cache, slots, scale)

    def _decode(self, q, k_cache, v_cache, meta, scale, emit):
        raise NotImplementedError

    def _prefill(self, q, k_cache, v_cache, meta, scale):
        raise NotImplementedError


# the torch path batches requests of at most this many new tokens (draft trees, short chunks) into one pass
SHORT_QUERY = 64
SHORT_PAD = 4


class TorchBackend(AttentionBackend):
    """The reference path: CPU runtime and oracle."""

    name = "torch"

    def _decode(self, q, k_cache, v_cache, meta, scale, emit):
        slots = meta._cache.get("slots")
        if slots is None:
            slots = ref.padded_slots(meta.block_tables, meta.kv_lens, meta.max_kv_len, meta.block_size)
            meta._cache["slots"] = slots
        return ref.paged_decode(q, k_cache, v_cache, meta.block_tables, meta.kv_lens, meta.block_size, scale,
                                meta.window, meta.sinks, return_scores=emit, slots=slots, softcap=meta.softcap)

    def _prefill(self, q, k_cache, v_cache, meta, scale):
        split = meta._cache.get("split")
        if split is None:
            split = meta._cache["split"] = self._split(meta)
        dec, short, rest = split
        out = torch.empty_like(q)
        if dec:
            rows, sub, tables, window, sinks, slots = meta._cache["dec"]
            out[rows] = ref.paged_decode(q[rows], k_cache, v_cache, tables, sub, meta.block_size, scale, window,
                                         sinks, slots=slots, softcap=meta.softcap)[0]
        if short:
            ref.paged_attention_short(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.kv_lens,
                                      meta.block_size, scale, short, out, meta.window, meta.sinks, meta.tree_mask,
                                      meta.softcap)
        if rest:
            ref.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.kv_lens,
                                meta.block_size, scale, meta.window, meta.sinks, meta.tree_mask, only=rest, out=out,
                                softcap=meta.softcap)
        return out

    @staticmethod
    def _split(meta):
        """The step's requests as (one-token rows, short query runs, the rest): the first two batched when
        there are several of them (decodes, and draft trees with no drafts, whose ancestor mask is the root
        alone, as in a pure decode step; draft trees and short chunks padded to the longest, while the padding
        costs at most ``SHORT_PAD`` times the real work), the rest one request at a time."""
        q_lens, kv_lens = meta.q_lens, meta.kv_lens_host
        dec = [b for b, n in enumerate(q_lens) if n == 1]
        short = [b for b, n in enumerate(q_lens) if 1 < n <= SHORT_QUERY]
        if len(dec) < 2:
            dec = []
        if len(short) > 1:
            padded = len(short) * max(q_lens[b] for b in short) * max(kv_lens[b] for b in short)
            if padded > SHORT_PAD * sum(q_lens[b] * kv_lens[b] for b in short):
                short = []
        else:
            short = []
        if dec:
            rows = meta.cu_seqlens_q[dec].long()
            sub = meta.kv_lens[dec]
            meta._cache["dec"] = (rows, sub, meta.block_tables[dec],
                                  meta.window[dec] if meta.window is not None else None,
                                  meta.sinks[dec] if meta.sinks is not None else None,
                                  ref.padded_slots(meta.block_tables[dec], sub, max(kv_lens[b] for b in dec),
                                                   meta.block_size))
        batched = set(dec) | set(short)
        return dec, short, [b for b in range(len(q_lens)) if b not in batched]


def select_backend(name: str, device: torch.device) -> AttentionBackend:
    """Pick the attention backend once at start-up. ``auto``: triton on CUDA, torch on CPU."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchBackend()
    if name in ("triton", "flash-attn"):
        try:
            from sift.kernels.triton_backend import TritonBackend
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ValueError(f"attention backend {name!r} is unavailable: {e}") from e
        return TritonBackend(use_flash_attn=(name == "flash-attn"))
    raise ValueError(f"attention_backend: unknown value {name!r}")
