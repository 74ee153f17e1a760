"""Qwen3-MoE: the Qwen3 block with a sparse mixture of experts in place of the MLP (in the layers the
config names): a linear router, top-k experts per token renormalised as ``norm_topk_prob`` says, experts run
grouped: on CUDA through the fused Triton kernels (:mod:`sift.kernels.fused_moe`), elsewhere through the torch
grouped matmul (:mod:`sift.kernels.moe`), which is also their test oracle."""
from __future__ import annotations

import torch
from torch import nn

from sift.kernels.moe import grouped_experts, route
from sift.models.layers import ACTIVATIONS, GatedMLP, empty_linear
from sift.models.llama import _place
from sift.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM
from sift.models.registry import ArchConfig

Tensor = torch.Tensor


class SparseMoE(nn.Module):
    def __init__(self, arch: ArchConfig):
        super().__init__()
        e, h, i = arch.num_experts, arch.hidden_size, arch.moe_intermediate_size
        self.top_k, self.renormalize = arch.num_experts_per_tok, arch.norm_topk_prob
        self.act = ACTIVATIONS[arch.hidden_act]
        self.act_name = "silu" if self.act is ACTIVATIONS["silu"] else "gelu_tanh"  # the Triton kernel's names
        self.gate = empty_linear(h, e)  # the router
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h, device="meta"), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, h, i, device="meta"), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        if x.is_cuda:
            from sift.kernels.fused_moe import fused_experts  # Triton: imported only where it runs

            return fused_experts(x, self.w13, self.w2, weights, ids, self.act_name)
        return grouped_experts(x, self.w13, self.w2, weights, ids, self.act)


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    def make_mlp(self, arch: ArchConfig, layer: int) -> nn.Module:
        if layer in (arch.moe_layers or ()):
            return SparseMoE(arch)
        return GatedMLP(arch.hidden_size, arch.intermediate_size, arch.hidden_act)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    layer_class = Qwen3MoeDecoderLayer

    def load_mlp(self, take, p: str, mlp: nn.Module) -> None:
        if not isinstance(mlp, SparseMoE):
            return super().load_mlp(take, p, mlp)
        _place(mlp.gate, "weight", take(p + "gate.weight"))
        if p + "experts.gate_up_proj" in take.weights:  # transformers 5 writes the experts fused, 3-D
            w13, w2 = take(p + "experts.gate_up_proj"), take(p + "experts.down_proj")
        else:  # per expert, as the published checkpoints are
            n = self.arch.num_experts
            w13 = torch.stack([torch.cat([take(f"{p}experts.{e}.gate_proj.weight"),
                                          take(f"{p}experts.{e}.up_proj.weight")]) for e in range(n)])
            w2 = torch.stack([take(f"{p}experts.{e}.down_proj.weight") for e in range(n)])
        _place(mlp, "w13", w13)
        _place(mlp, "w2", w2)
