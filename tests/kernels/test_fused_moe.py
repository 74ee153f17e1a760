"""The Triton MoE kernels against the torch reference (grouped experts) and the per-expert loop."""
import pytest
import torch
import torch.nn.functional as F

from sift.kernels.fused_moe import fused_experts
from sift.kernels.moe import grouped_experts, looped_experts, route

ACT = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter", [(5, 4, 2, 48, 40), (32, 8, 2, 64, 32), (1, 6, 3, 32, 16)])
def test_fused_experts_match_reference(device, poison, act, tokens, experts, top_k, hidden, inter):
    g = torch.Generator().manual_seed(tokens + experts)
    x = torch.randn(tokens, hidden, generator=g).to(device)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) * 0.2).to(device)
    w2 = (torch.randn(experts, hidden, inter, generator=g) * 0.2).to(device)
    logits = torch.randn(tokens, experts, generator=g).to(device)
    logits[:, 0] = -1e4  # expert 0 gets no token: an empty run among the tiles
    weights, ids = route(logits, top_k, renormalize=True)
    out = fused_experts(x, w13, w2, weights, ids, act)
    expect = looped_experts(x, w13, w2, weights, ids, ACT[act])
    torch.testing.assert_close(out, expect, atol=1e-4, rtol=1e-4)
    if device.type == "cpu":
        torch.testing.assert_close(grouped_experts(x, w13, w2, weights, ids, ACT[act]), expect, atol=1e-5, rtol=1e-5)
