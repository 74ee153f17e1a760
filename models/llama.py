"""The Llama family: Llama 2/3, Mistral, Qwen2 (q/k/v bias), SmolLM.

One flat, unpadded batch per step: every tensor is [T, ...] over the step's new tokens, and
attention goes through ``batch.backend`` over the paged KV pool in ``batch.kv_caches``. The layer
loop does no per-token Python work: cos/sin are looked up once per forward, q and k are rotated
together in one op, and q/k/v and gate/up are single fused matmuls.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import nn

from sift.kernels import reference as ref
from sift.models.batch import ForwardBatch, RowSubsets
from sift.models.layers import GatedMLP, Linear, RMSNorm, RotaryEmbedding, apply_rotary, empty_linear, linear
from sift.models.quant import GroupQuant, hold_quantized
from sift.models.registry import ArchConfig, ModelLoadError

Tensor = torch.Tensor


class LlamaAttention(nn.Module):
    """Fused-qkv attention with rotary; the layer's own sliding window, logit soft-cap and query scale come
    from the :class:`ArchConfig` (families differ there, not in this code)."""

    def __init__(self, arch: ArchConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.q_size = arch.num_heads * arch.head_dim
        self.kv_size = arch.num_kv_heads * arch.head_dim
        self.scale = arch.attn_scale or arch.head_dim ** -0.5
        self.window = arch.window_of(layer)
        self.softcap = arch.attn_softcap
        self.qkv_proj = empty_linear(arch.hidden_size, self.q_size + 2 * self.kv_size, bias=arch.attention_bias)
        self.o_proj = empty_linear(self.q_size, arch.hidden_size)

    def norm_qk(self, qk: Tensor) -> Tensor:
        """Hook for per-head q/k norms (Qwen3, Gemma 3) on [T, Hq + Hkv, D] before rotary; none here."""
        return qk

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated q [T, Hq, D], k [T, Hkv, D] and v [T, Hkv, D] of the normed input x."""
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        qk_size = self.q_size + self.kv_size
        # q and k sit side by side in qkv: rotate them as one [T, Hq + Hkv, D] tensor
        qk = self.norm_qk(qkv[:, :qk_size].view(t, self.num_heads + self.num_kv_heads, self.head_dim))
        q, k = apply_rotary(qk, cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
        return q, k, qkv[:, qk_size:].view(t, self.num_kv_heads, self.head_dim)

    def store_qkv(self, x: Tensor, cos: Tensor, sin: Tensor, batch: ForwardBatch,
                  rows: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Project the normed input and store the new K/V in the pool; returns q [T, Hq, D] and k [T, Hkv, D].
        With ``rows``, x, cos and sin hold only those rows of the batch: only they are projected and stored,
        and the other rows of q and k are zero."""
        q, k, v = self.project(x, cos, sin)
        k_cache, v_cache = batch.kv_caches[self.layer]
        if rows is None:
            batch.backend.store_kv(k, v, k_cache, v_cache, batch.attn)
            return q, k
        batch.backend.store_kv(k, v, k_cache, v_cache, replace(batch.attn, slot_mapping=batch.attn.slot_mapping[rows]))
        t = batch.num_tokens
        return (q.new_zeros((t,) + q.shape[1:]).index_copy_(0, rows, q),
                k.new_zeros((t,) + k.shape[1:]).index_copy_(0, rows, k))

    def attend(self, q: Tensor, batch: ForwardBatch) -> Tensor:
        """Attention [T, Hq, D] of every row's query over the pool, through the batch's backend."""
        k_cache, v_cache = batch.kv_caches[self.layer]
        return batch.backend.forward(self.layer, q, k_cache, v_cache, batch.attn, self.scale,
                                     window=self.window, softcap=self.softcap)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, batch: ForwardBatch) -> Tensor:
        q, _ = self.store_qkv(x, cos, sin, batch)
        return self.o_proj(self.attend(q, batch).reshape(x.shape[0], self.q_size))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks, each added to the residual stream. The two residual updates are
    hooks (:meth:`attn_residual`, :meth:`mlp_residual`) so that families with extra norms change only them,
    and so that the same math runs over row subsets (:meth:`forward_subsets`)."""

    attention_class = LlamaAttention
    norm_class = RMSNorm

    def __init__(self, arch: ArchConfig, layer: int):
        super().__init__()
        self.input_layernorm = self.norm_class(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = self.attention_class(arch, layer)
        self.post_attention_layernorm = self.norm_class(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = self.make_mlp(arch, layer)

    def make_mlp(self, arch: ArchConfig, layer: int) -> nn.Module:
        return GatedMLP(arch.hidden_size, arch.intermediate_size, arch.hidden_act)

    def attn_residual(self, a: Tensor) -> Tensor:
        """What the attention block adds to the residual, from its output projection."""
        return a

    def mlp_residual(self, h: Tensor) -> Tensor:
        """What the MLP block adds to the residual ``h``."""
        return self.mlp(self.post_attention_layernorm(h))

    def mlp_probe(self, h: Tensor, rank: int) -> Tensor:
        """Each row's predicted relative MLP update ||MLP(x)|| / ||h|| from the MLP's ``rank`` heaviest neurons."""
        return self.mlp.relative_update(self.post_attention_layernorm(h), h, rank)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, batch: ForwardBatch,
                subsets: Optional[RowSubsets] = None) -> Tensor:
        if subsets is not None and subsets.runs(self.self_attn.layer):
            return self.forward_subsets(h, cos, sin, batch, subsets)
        h = h + self.attn_residual(self.self_attn(self.input_layernorm(h), cos, sin, batch))
        return h + self.mlp_residual(h)

    def forward_subsets(self, h: Tensor, cos: Tensor, sin: Tensor, batch: ForwardBatch, plan: RowSubsets) -> Tensor:
        """The layer with each block computed only for the rows ``plan`` picks (see :class:`RowSubsets`);
        every other row passes through bit-identically. ``h`` is updated in place."""
        ops = ref
        if h.is_cuda:
            from sift.kernels import token_skip as ops  # Triton: imported only where it runs
        attn, i = self.self_attn, self.self_attn.layer
        live = plan.kv_rows(i)
        if live is None:
            q, k = attn.store_qkv(self.input_layernorm(h), cos, sin, batch)
        else:
            q, k = attn.store_qkv(self.input_layernorm(h[live]), cos[live], sin[live], batch, rows=live)
        k_cache, v_cache = batch.kv_caches[i]
        out, rows = plan.attend(i, q, k, k_cache, v_cache, attn.scale, lambda: attn.attend(q, batch))
        flat = ops.gather_rows(out.reshape(out.shape[0], -1), rows)
        h = ops.scatter_add_rows_(h, rows, self.attn_residual(attn.o_proj(flat)))
        rows = plan.mlp_rows(i, h, lambda r, rank: self.mlp_probe(h[r], rank))
        return ops.scatter_add_rows_(h, rows, self.mlp_residual(ops.gather_rows(h, rows)))


class LlamaForCausalLM(nn.Module):
    """Built without weights (meta tensors); :meth:`load_weights` fills them from HF-named tensors.

    The other families subclass it and override what differs: ``layer_class``, the norm class, and the
    ``load_*`` hooks for their checkpoint names."""

    layer_class = LlamaDecoderLayer
    norm_class = RMSNorm

    def __init__(self, arch: ArchConfig):
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size,
                                     _weight=torch.empty(arch.vocab_size, arch.hidden_size, device="meta"))
        self.rotary = RotaryEmbedding(arch.head_dim, arch.max_position_embeddings, arch.rope_theta,
                                      arch.rope_scaling_dict, arch.rope_freq_factors,
                                      rotary_dim=int(arch.head_dim * arch.partial_rotary_factor))
        self.layers = nn.ModuleList(self.layer_class(arch, i) for i in range(arch.num_layers))
        self.norm = self.norm_class(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = None if arch.tie_word_embeddings else empty_linear(arch.hidden_size, arch.vocab_size)
        self.weight_first: Optional[dict] = None  # the CPU product form of every linear (set_linear_products)

    def set_linear_products(self, weight_first: Optional[dict]) -> None:
        """The few-row CPU float32 product form ({rows: weight @ x.T}, from
        :func:`sift.models.layers.calibrate_linear`) of every :class:`Linear` and of the tied logits head."""
        self.weight_first = weight_first
        for module in self.modules():
            if isinstance(module, Linear):
                module.weight_first = weight_first

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> Tensor:
        """Final-normed hidden states [N, hidden] of the rows ``batch.logits_indices``."""
        h = self.embed_tokens(batch.input_ids)
        cos, sin = self.rotary.cos_sin(batch.positions, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, batch, batch.row_subsets)
        return self.norm(h[batch.logits_indices])

    def token_skipping_unsupported(self, blocks: str) -> Optional[str]:
        """Why token skipping (:class:`RowSubsets`) cannot run on this model, or None. The skipped rows'
        attention is exact causal attention over the kept keys: a model window or a logit soft-cap has no
        place there; MLP skipping needs every MLP's low-rank probe (a gated MLP's, not a mixture of experts)."""
        arch = self.arch
        if arch.attn_softcap or any(arch.window_of(i) for i in range(arch.num_layers)):
            return "token skipping does not support models with sliding-window layers or attention soft-capping"
        if blocks != "attention" and not all(isinstance(layer.mlp, GatedMLP) for layer in self.layers):
            return "token skipping of MLP blocks needs a gated MLP in every layer (use blocks='attention')"
        return None

    @torch.inference_mode()
    def compute_logits(self, hidden: Tensor) -> Tensor:
        """float32 logits [N, vocab]."""
        if self.lm_head is None:
            return linear(hidden, self.embed_tokens.weight, weight_first=self.weight_first).float()
        return self.lm_head(hidden).float()  # a Linear or a quantized product (models/quant.py)

    def make_kv_caches(self, num_blocks: int, block_size: int, dtype: torch.dtype, device) -> list:
        """The paged KV pool: per layer a (k, v) pair of zeroed [num_blocks * block_size, Hkv, D] tensors.

        Zeroed, not empty: padded reads of unused slots are multiplied by a zero probability, and
        0 * NaN from uninitialized memory would still be NaN.
        """
        shape = (num_blocks * block_size, self.arch.num_kv_heads, self.arch.head_dim)
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in range(self.arch.num_layers)]

    def load_weights(self, weights: dict) -> None:
        """Fill every parameter from HF-named tensors (already in the target dtype and device).

        ``weights`` is consumed, so each checkpoint tensor is released once it is fused or placed.
        """
        take = _Taker(weights)
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            self.load_attention(take, p + "self_attn.", layer.self_attn)
            self.load_mlp(take, p + "mlp.", layer.mlp)
            for name, module in layer.named_children():
                if isinstance(module, RMSNorm):
                    _place(module, "weight", take(p + name + ".weight"))
        _place(self.embed_tokens, "weight", take("model.embed_tokens.weight"))
        _place(self.norm, "weight", take("model.norm.weight"))
        if self.lm_head is not None:
            _place(self.lm_head, "weight", take("lm_head.weight"))
        else:
            weights.pop("lm_head.weight", None)  # some tied checkpoints still carry a copy
        leftover = [k for k in weights if not k.endswith("rotary_emb.inv_freq")]
        if leftover:
            raise ModelLoadError(f"checkpoint has {len(leftover)} unexpected tensors, e.g. {leftover[0]!r}")
        for module in self.modules():  # every rotary cache follows the weights
            if isinstance(module, RotaryEmbedding):
                module.to(self.embed_tokens.weight.device)

    def load_attention(self, take: "_Taker", p: str, attn: LlamaAttention) -> None:
        """q/k/v (fused here) and o projections, plus the q/k norms of families that have them."""
        _place(attn.qkv_proj, "weight", torch.cat([take(p + f"{n}_proj.weight") for n in "qkv"]))
        if self.arch.attention_bias:
            _place(attn.qkv_proj, "bias", torch.cat([take(p + f"{n}_proj.bias") for n in "qkv"]))
        _place(attn.o_proj, "weight", take(p + "o_proj.weight"))
        for name in ("q_norm", "k_norm"):
            if hasattr(attn, name):
                _place(getattr(attn, name), "weight", take(p + name + ".weight"))

    def load_mlp(self, take: "_Taker", p: str, mlp: nn.Module) -> None:
        _place(mlp.gate_up_proj, "weight", torch.cat([take(p + "gate_proj.weight"), take(p + "up_proj.weight")]))
        _place(mlp.down_proj, "weight", take(p + "down_proj.weight"))


class _Taker:
    def __init__(self, weights: dict):
        self.weights = weights

    def __call__(self, name: str) -> Tensor:
        try:
            return self.weights.pop(name)
        except KeyError:
            raise ModelLoadError(f"checkpoint is missing tensor {name!r}") from None


def _place(module: nn.Module, name: str, tensor: Tensor) -> None:
    expected = getattr(module, name).shape
    if tensor.shape != expected:
        raise ModelLoadError(f"tensor for {type(module).__name__}.{name} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(expected)}")
    if isinstance(tensor, GroupQuant):  # kept quantized: the loader swaps the module (sift.models.quant)
        hold_quantized(module, name, tensor)
        return
    setattr(module, name, nn.Parameter(tensor, requires_grad=False))
