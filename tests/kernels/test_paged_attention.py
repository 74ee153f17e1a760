"""Triton paged attention (prefill/extend and split-K decode with scores) against sift.kernels.reference."""
import pytest
import torch

from sift.kernels import reference as ref
from sift.kernels.paged_attention import num_splits, paged_attention, paged_decode

TOL = {torch.float32: dict(atol=1e-4, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
NUM_KV_HEADS = {1: 2, 3: 2, 8: 1}  # group size -> kv heads (Hq = 2, 6, 8)


def _cu(q_lens, device):
    return torch.tensor([0] + q_lens, device=device).cumsum(0).to(torch.int32)


def _ancestor_mask(n, gen):
    """A random draft tree over n new tokens: each row sees its ancestors and itself."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    for t in range(n):
        if t:
            mask[t] = mask[int(torch.randint(0, t, (1,), generator=gen))]
        mask[t, t] = True
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size,windowed", [(16, False), (32, True)])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_prefill_matches_reference(paged_pool, device, poison, group, block_size, windowed, dtype):
    kv_lens, q_lens = [1, 32, 70], [1, 16, 40]  # length 1; extend onto a 16-token context up to a boundary
    k_cache, v_cache, block_tables, kv = paged_pool(kv_lens, NUM_KV_HEADS[group], 64, block_size, dtype)
    q = torch.randn(sum(q_lens), NUM_KV_HEADS[group] * group, 64).to(device, dtype)
    window = sinks = None
    if windowed:  # per request: none, window without sinks, window with sinks
        window = torch.tensor([0, 8, 20], dtype=torch.int32, device=device)
        sinks = torch.tensor([0, 0, 3], dtype=torch.int32, device=device)
    args = (q, k_cache, v_cache, block_tables, _cu(q_lens, device), kv, block_size, 0.125, window, sinks)
    out = paged_attention(*args)
    torch.testing.assert_close(out, ref.paged_attention(*args), **TOL[dtype])


def test_prefill_head_dim_128_fp16(paged_pool, device, poison):
    kv_lens, q_lens = [23, 40], [23, 9]
    k_cache, v_cache, block_tables, kv = paged_pool(kv_lens, 2, 128, 16, torch.float16, seed=1)
    q = torch.randn(sum(q_lens), 4, 128).to(device, torch.float16)
    args = (q, k_cache, v_cache, block_tables, _cu(q_lens, device), kv, 16, 128 ** -0.5)
    torch.testing.assert_close(paged_attention(*args), ref.paged_attention(*args), atol=2e-3, rtol=2e-3)


def test_prefill_tree_mask(paged_pool, device, poison):
    kv_lens, q_lens = [17, 5], [7, 5]  # a draft tree after a 10-token context; a plain new request
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache, block_tables, kv = paged_pool(kv_lens, 2, 64, 16, torch.float32, seed=2)
    q = torch.randn(sum(q_lens), 6, 64).to(device)
    tree = torch.zeros(sum(q_lens), max(q_lens), dtype=torch.bool)
    tree[:7, :7] = _ancestor_mask(7, gen)
    tree[7:, :5] = torch.ones(5, 5, dtype=torch.bool).tril()
    args = (q, k_cache, v_cache, block_tables, _cu(q_lens, device), kv, 16, 0.125, None, None, tree.to(device))
    out = paged_attention(*args)
    torch.testing.assert_close(out, ref.paged_attention(*args), **TOL[torch.float32])
    plain = paged_attention(*args[:-1])  # the tree really masks something
    assert (out[:7] - plain[:7]).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("windowed", [False, True])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("block_size,splits", [(16, 1), (32, 4)])  # 4 splits of 70 entries: one stays empty
def test_decode_and_scores_match_reference(paged_pool, device, poison, splits, group, block_size, windowed, dtype):
    kv_lens = [1, 16, 32, 70]
    hkv = NUM_KV_HEADS[group]
    k_cache, v_cache, block_tables, kv = paged_pool(kv_lens, hkv, 64, block_size, dtype, seed=4)
    q = torch.randn(len(kv_lens), hkv * group, 64).to(device, dtype)
    window = sinks = None
    if windowed:
        window = torch.tensor([4, 0, 7, 20], dtype=torch.int32, device=device)
        sinks = torch.tensor([1, 0, 0, 3], dtype=torch.int32, device=device)
    args = (q, k_cache, v_cache, block_tables, kv, block_size, 0.125, window, sinks, True)
    out, (s_sum, s_max) = paged_decode(*args, splits=splits)
    ref_out, (ref_sum, ref_max) = ref.paged_decode(*args)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(s_sum, ref_sum, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s_max, ref_max, atol=1e-5, rtol=1e-4)
    total = (s_sum / group).sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
    assert bool((s_max <= s_sum + 1e-6).all())
    past = torch.arange(max(kv_lens), device=device)[None, None, :] >= kv[:, None, None]
    assert bool((s_sum[past.expand_as(s_sum)] == 0).all())


def test_decode_head_dim_128_default_splits_without_scores(paged_pool, device, poison):
    k_cache, v_cache, block_tables, kv = paged_pool([9, 64], 1, 128, 32, torch.float32, seed=5)
    q = torch.randn(2, 3, 128, device=device)
    args = (q, k_cache, v_cache, block_tables, kv, 32, 128 ** -0.5)
    out, scores = paged_decode(*args)
    assert scores is None
    torch.testing.assert_close(out, ref.paged_decode(*args)[0], **TOL[torch.float32])


def test_num_splits_fills_the_gpu_without_tiny_splits():
    assert num_splits(batch=1, kv_heads=8, max_kv_len=32768, num_sms=132) == 33  # 2 waves of 132 SMs
    assert num_splits(batch=64, kv_heads=8, max_kv_len=32768, num_sms=132) == 1  # the batch fills the GPU
    assert num_splits(batch=1, kv_heads=8, max_kv_len=300, num_sms=132) == 2  # no split under 256 entries
    assert num_splits(batch=1, kv_heads=1, max_kv_len=1 << 20, num_sms=132) == 64  # capped


@pytest.mark.parametrize("windowed", [False, True])
def test_softcap_prefill_and_decode_match_reference(paged_pool, device, poison, windowed):
    """Gemma 2's attention logit soft-capping (cap 2, small enough to bend these logits) in both kernels, with
    and without a per-request window; the reference itself against the formula written out densely."""
    kv_lens, q_lens = [5, 40], [5, 24]
    k_cache, v_cache, block_tables, kv = paged_pool(kv_lens, 2, 32, 16, torch.float32, seed=6)
    q = (3 * torch.randn(sum(q_lens), 4, 32)).to(device)
    window = torch.tensor([0, 9], dtype=torch.int32, device=device) if windowed else None
    sinks = torch.zeros(2, dtype=torch.int32, device=device) if windowed else None
    args = (q, k_cache, v_cache, block_tables, _cu(q_lens, device), kv, 16, 0.3, window, sinks)
    expect = ref.paged_attention(*args, softcap=2.0)
    torch.testing.assert_close(paged_attention(*args, softcap=2.0), expect, **TOL[torch.float32])
    assert (expect - ref.paged_attention(*args)).abs().max() > 1e-2  # the cap changes the result
    # written out: request 1's rows over its keys, in kv-head groups of 2 query heads
    slots = ref.slots_for(block_tables[1], 40, 16)
    k, v = k_cache[slots].repeat_interleave(2, 1), v_cache[slots].repeat_interleave(2, 1)
    logits = 2.0 * torch.tanh(torch.einsum("thd,lhd->htl", q[5:].float(), k.float()) * 0.3 / 2.0)
    mask = ref.attention_mask(torch.arange(16, 40, device=device), 40, 9 if windowed else 0)
    dense = torch.einsum("htl,lhd->thd", torch.softmax(logits.masked_fill(~mask, float("-inf")), -1), v.float())
    torch.testing.assert_close(expect[5:], dense, atol=1e-5, rtol=1e-5)
    dq = q[[4, 28]]
    dargs = (dq, k_cache, v_cache, block_tables, kv, 16, 0.3, window, sinks)
    torch.testing.assert_close(paged_decode(*dargs, softcap=2.0, splits=2)[0], ref.paged_decode(*dargs, softcap=2.0)[0],
                               **TOL[torch.float32])
    torch.testing.assert_close(ref.paged_decode(*dargs, softcap=2.0)[0][1], dense[-1], atol=1e-5, rtol=1e-5)
