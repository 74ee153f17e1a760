"""Phi-3 / Phi-4 (mini): the Llama block as checkpoints store it already fused (``qkv_proj``,
``gate_up_proj``), with LongRoPE scaling and, in Phi-4-mini, rotary over part of each head
(``partial_rotary_factor``); both handled by :mod:`sift.models.layers`."""
from __future__ import annotations

from torch import nn

from sift.models.llama import LlamaAttention, LlamaForCausalLM, _place


class Phi3ForCausalLM(LlamaForCausalLM):
    def load_attention(self, take, p: str, attn: LlamaAttention) -> None:
        _place(attn.qkv_proj, "weight", take(p + "qkv_proj.weight"))
        _place(attn.o_proj, "weight", take(p + "o_proj.weight"))

    def load_mlp(self, take, p: str, mlp: nn.Module) -> None:
        _place(mlp.gate_up_proj, "weight", take(p + "gate_up_proj.weight"))  # gate rows first, as GatedMLP
        _place(mlp.down_proj, "weight", take(p + "down_proj.weight"))
