"""Gemma 2 and Gemma 3 (text): the Llama block with

* the embedding scaled by sqrt(hidden_size), ``(1 + weight)`` RMSNorms, and a norm after attention and after
  the MLP as well as before each (four per layer);
* a GeGLU MLP (tanh-approximated GELU gate);
* alternating local (sliding-window) and global layers, each attending with its own window, and the query
  scaled by ``query_pre_attn_scalar ** -0.5``;
* Gemma 2: attention logit soft-capping in the attention kernels and final logit soft-capping;
* Gemma 3: q/k norms, and a rope base of its own for the local layers.

Which of these a checkpoint has comes from its config (:mod:`sift.models.hf_config`), not from the class.
"""
from __future__ import annotations

import torch

from sift.kernels.reference import soft_cap
from sift.models.batch import ForwardBatch
from sift.models.layers import GemmaRMSNorm, RotaryEmbedding
from sift.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from sift.models.qwen3 import QKNormAttention
from sift.models.registry import ArchConfig

Tensor = torch.Tensor


class GemmaAttention(QKNormAttention):
    norm_class = GemmaRMSNorm

    def __init__(self, arch: ArchConfig, layer: int):
        super().__init__(arch, layer)
        if not arch.qk_norm:  # Gemma 2
            del self.q_norm, self.k_norm

    def norm_qk(self, qk: Tensor) -> Tensor:
        return super().norm_qk(qk) if hasattr(self, "q_norm") else qk


class GemmaDecoderLayer(LlamaDecoderLayer):
    attention_class = GemmaAttention
    norm_class = GemmaRMSNorm

    def __init__(self, arch: ArchConfig, layer: int):
        super().__init__(arch, layer)
        self.pre_feedforward_layernorm = GemmaRMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def attn_residual(self, a: Tensor) -> Tensor:
        return self.post_attention_layernorm(a)

    def mlp_residual(self, h: Tensor) -> Tensor:
        return self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class GemmaForCausalLM(LlamaForCausalLM):
    layer_class = GemmaDecoderLayer
    norm_class = GemmaRMSNorm

    def __init__(self, arch: ArchConfig):
        super().__init__(arch)
        self.local_rotary = None
        if arch.local_rope_theta is not None:  # Gemma 3: local layers turn at their own base, unscaled
            self.local_rotary = RotaryEmbedding(arch.head_dim, arch.max_position_embeddings, arch.local_rope_theta, {})

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> Tensor:
        h = self.embed_tokens(batch.input_ids)
        h = h * torch.tensor(self.arch.hidden_size ** 0.5, dtype=h.dtype)  # rounded to the dtype, as HF does
        rope = self.rotary.cos_sin(batch.positions, h.dtype)
        local = self.local_rotary.cos_sin(batch.positions, h.dtype) if self.local_rotary is not None else rope
        assert batch.row_subsets is None, "Gemma runs no token skipping (see token_skipping_unsupported)"
        for layer in self.layers:
            h = layer(h, *(local if layer.self_attn.window else rope), batch)
        return self.norm(h[batch.logits_indices])

    @torch.inference_mode()
    def compute_logits(self, hidden: Tensor) -> Tensor:
        logits = super().compute_logits(hidden)
        return soft_cap(logits, self.arch.final_softcap) if self.arch.final_softcap else logits
