"""Weight-only quantized layers (models/quant.py): each packed kernel against its plain-torch float reference
on random weights of SmolLM2-135M's shapes, the quantizers' error bounds, and the exact int8 -> two int4
planes split. CUDA cases run the same checks on the GPU and skip without one."""
import pytest
import torch
import torch.nn.functional as F

from sift.models.quant import (GroupQuant, Int4Linear, Int8BlockLinear, Int8Linear, QuantizedEmbedding,
                          int4_group_size, quantize_int4, quantize_int8, quantized_linear, split_int8_blocks)

# (out, in) of SmolLM2-135M's products: fused qkv, fused gate/up, down, and the LM head's input width
SHAPES = [(960, 576), (3072, 576), (576, 1536)]
CPU = torch.device("cpu")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05 + torch.randn(n, 1, generator=g) * 0.01  # rows offset: asymmetry


def _check_product(layer, q: GroupQuant, dtype, device, rows: int, tol: float):
    x = torch.randn(rows, q.shape[1], generator=torch.Generator().manual_seed(rows)).to(device=device, dtype=dtype)
    ref = F.linear(x.float(), q.dequantize().to(device))
    out = layer(x)
    assert out.dtype == dtype and out.shape == (rows, q.shape[0])
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("shape", SHAPES)
def test_int4_kernel_matches_its_float_reference(shape, group, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    w = _weight(*shape, seed=group)
    q = quantize_int4(w, int4_group_size(group, shape[1]))
    layer = quantized_linear(q, dtype, torch.device(device))
    assert isinstance(layer, Int4Linear)
    for rows in (1, 7, 32):
        _check_product(layer, q, dtype, device, rows, tol=1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_kernel_matches_its_float_reference(shape, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = quantize_int8(_weight(*shape, seed=8))
    layer = quantized_linear(q, dtype, torch.device(device))
    assert isinstance(layer, Int8Linear)
    for rows in (1, 7, 32):
        _check_product(layer, q, dtype, device, rows, tol=1e-5 if dtype == torch.float32 else 2e-2)


def test_bfloat16_activations_on_cpu():
    q4, q8 = quantize_int4(_weight(576, 1536, 1), 128), quantize_int8(_weight(576, 1536, 2))
    for q in (q4, q8):
        _check_product(quantized_linear(q, torch.bfloat16, torch.device("cpu")), q, torch.bfloat16, "cpu", 5, 2e-2)


def test_lm_head_shape():
    q = quantize_int4(_weight(49152, 576, 3), 32)
    _check_product(quantized_linear(q, torch.float32, torch.device("cpu")), q, torch.float32, "cpu", 2, 1e-5)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_quantizer_error_is_half_a_step(group):
    w = _weight(576, 1536, group)
    q = quantize_int4(w, group)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 15
    step = q.scale.repeat_interleave(group, dim=1)
    assert bool(((q.dequantize() - w).abs() <= step / 2 + 1e-6).all())


def test_int8_quantizer_error_is_half_a_step():
    w = _weight(1536, 576, 4)
    q = quantize_int8(w)
    assert bool(((q.dequantize() - w).abs() <= q.scale / 2 + 1e-7).all())


def test_group_size_falls_back_to_a_divisor():
    assert [int4_group_size(g, 576) for g in (32, 64, 128)] == [32, 64, 64]
    assert int4_group_size(128, 1536) == 128
    with pytest.raises(ValueError):
        int4_group_size(32, 48)


def test_cat_fuses_rows_like_tensors():
    a, b = quantize_int4(_weight(576, 576, 5), 32), quantize_int4(_weight(192, 576, 6), 32)
    fused = torch.cat([a, b])
    assert isinstance(fused, GroupQuant) and fused.shape == (768, 576)
    assert torch.equal(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    mixed = torch.cat([a, quantize_int4(_weight(192, 576, 6), 64), _weight(64, 576, 7)])  # Q4_K_M's attn_v
    assert mixed.bits == 8 and mixed.group_size == 32 and mixed.shape == (832, 576)
    step = mixed.scale.repeat_interleave(32, dim=1)
    exact = torch.cat([a.dequantize(), quantize_int4(_weight(192, 576, 6), 64).dequantize(), _weight(64, 576, 7)])
    assert bool(((mixed.dequantize() - exact).abs() <= step * (0.5 + 1e-5)).all())


def _q8_blocks(n: int, k: int, seed: int) -> GroupQuant:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)  # -128 too: the full range
    scale = (torch.rand(n, k // 32, generator=g) * 0.01 + 1e-4).half().float()  # float16 scales, as Q8_0's
    return GroupQuant(codes, scale, None, 32, 8)


def test_int8_blocks_split_into_two_exact_int4_planes():
    q = _q8_blocks(192, 576, 7)
    high, low = split_int8_blocks(q)
    assert torch.equal(high.dequantize() + low.dequantize(), q.dequantize())
    layer = quantized_linear(q, torch.float32, torch.device("cpu"))
    assert isinstance(layer, Int8BlockLinear)
    assert torch.equal(layer.weight, q.dequantize())
    _check_product(layer, q, torch.float32, "cpu", 3, 1e-5)


@pytest.mark.parametrize("group", [32, 64])
def test_int4_kernel_dequantizes_as_the_reference(group):
    """The kernel read back through the identity: fma(q - 8, scale, zero), value for value."""
    q = quantize_int4(_weight(192, 576, group), group)
    assert torch.equal(quantized_linear(q, torch.float32, torch.device("cpu")).weight, q.dequantize())


def test_bias_and_leading_dims():
    q = quantize_int4(_weight(192, 576, 9), 32)
    bias = torch.randn(192)
    layer = quantized_linear(q, torch.float32, torch.device("cpu"), bias)
    x = torch.randn(2, 3, 576)
    torch.testing.assert_close(layer(x), F.linear(x, q.dequantize(), bias), rtol=1e-5, atol=1e-4)
    assert torch.equal(layer.weight, q.dequantize())  # the bias is not folded into the read-back


def test_shapes_without_a_kernel_fall_back_to_dequantized():
    q = quantize_int4(_weight(100, 576, 10), 32)  # the CPU kernel needs N % 16 == 0
    layer = quantized_linear(q, torch.float32, torch.device("cpu"))
    assert not isinstance(layer, Int4Linear)
    assert torch.equal(layer.weight, q.dequantize())


@pytest.mark.parametrize("q", [_q8_blocks(300, 64, 11), quantize_int4(_weight(300, 64, 12), 32)])
def test_embedding_rows_dequantize_exactly(q):
    emb = QuantizedEmbedding(q, torch.float32, torch.device("cpu"))
    ids = torch.tensor([[0, 299, 5], [5, 17, 2]])
    assert torch.equal(emb(ids), q.dequantize()[ids])
    assert torch.equal(emb.weight, q.dequantize())


def test_dummy_weights_quantize_in_place():
    """``--load-format dummy --quantization int4``: random float linears swapped for quantized ones."""
    from sift.models.llama import LlamaForCausalLM
    from sift.models.loader import _random_weights
    from sift.models.quant import quantize_linears
    from sift.models.registry import ArchConfig

    arch = ArchConfig("LlamaForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(arch)
    _random_weights(model, torch.float32, CPU)
    x = torch.randn(3, 64)
    ref = model.layers[0].mlp(x)
    assert quantize_linears(model, "int4", 32, torch.float32, CPU) == 2 * 4 + 1
    assert isinstance(model.layers[0].mlp.gate_up_proj, Int4Linear) and isinstance(model.lm_head, Int4Linear)
    torch.testing.assert_close(model.layers[0].mlp(x), ref, rtol=0.1, atol=0.05)
