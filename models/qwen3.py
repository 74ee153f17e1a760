"""Qwen3: the Llama block with an RMSNorm over each head's q and k before rotary (and no q/k/v bias)."""
from __future__ import annotations

import torch

from sift.models.layers import RMSNorm
from sift.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from sift.models.registry import ArchConfig

Tensor = torch.Tensor


class QKNormAttention(LlamaAttention):
    """Attention whose q and k heads are RMS-normed (weights of size head_dim, shared across heads)."""

    norm_class = RMSNorm

    def __init__(self, arch: ArchConfig, layer: int):
        super().__init__(arch, layer)
        self.q_norm = self.norm_class(arch.head_dim, arch.rms_norm_eps)
        self.k_norm = self.norm_class(arch.head_dim, arch.rms_norm_eps)

    def norm_qk(self, qk: Tensor) -> Tensor:
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        return torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_class = QKNormAttention


class Qwen3ForCausalLM(LlamaForCausalLM):
    layer_class = Qwen3DecoderLayer
