"""The Llama family: Llama 2/3, Mistral, Qwen2 (q/k/v bias), SmolLM.

One flat, unpadded batch per step: every tensor is [T, ...] over the step's new tokens, and
attention goes through ``batch.backend`` over the paged KV pool in ``batch.kv_caches``. The layer
loop does no per-token Python work: cos/sin are looked up once per forward, q and k are rotated
together in one op, and q/k/v and gate/up are single fused matmuls.
"""
from __future__ import annotations

import torch
from torch import nn

from sift.models.layers import GatedMLP, RMSNorm, RotaryEmbedding, apply_rotary, empty_linear, linear
from sift.models.quant import GroupQuant, hold_quantized
from sift.models.registry import ArchConfig, ModelLoadError
from sift.server.runner.forward_batch import ForwardBatch

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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, batch: ForwardBatch) -> Tensor:
        t = x.shape[0]
        q, k, v = self.project(x, cos, sin)
        k_cache, v_cache = batch.kv_caches[self.layer]
        batch.backend.store_kv(k, v, k_cache, v_cache, batch.attn)
        out = batch.backend.forward(self.layer, q, k_cache, v_cache, batch.attn, self.scale,
                                    window=self.window, softcap=self.softcap)
        return self.o_proj(out.reshape(t, self.q_size))


class LlamaDecoderLayer(nn.Module):
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

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, batch: ForwardBatch) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, batch)
        return h + self.mlp(self.post_attention_layernorm(h))


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

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> Tensor:
        """Final-normed hidden states [N, hidden] of the rows ``batch.logits_indices``."""
        h = self.embed_tokens(batch.input_ids)
        cos, sin = self.rotary.cos_sin(batch.positions, h.dtype)
        skip = batch.extras.get("skip")  # token skipping for long prefills (server/policies/skipping.py)
        if skip is not None:
            h = skip.run(self.layers, h, cos, sin, batch)
        else:
            for layer in self.layers:
                h = layer(h, cos, sin, batch)
        return self.norm(h[batch.logits_indices])

    @torch.inference_mode()
    def compute_logits(self, hidden: Tensor) -> Tensor:
        """float32 logits [N, vocab]."""
        if self.lm_head is None:
            return linear(hidden, self.embed_tokens.weight).float()
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
