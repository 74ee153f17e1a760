"""Triton KV pool writes (store, copy-on-write, per-head compaction) against sift.kernels.reference."""
import pytest
import torch

from sift.kernels import kv_ops
from sift.kernels import reference as ref


def _pools(device, dtype, num_slots=96, hkv=3, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_slots, hkv, dim, generator=g).to(device, dtype)
    v = torch.randn(num_slots, hkv, dim, generator=g).to(device, dtype)
    return (k, v), (k.clone(), v.clone())


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_store_kv_skips_negative_slots_and_reads_strided_input(device, cache_dtype):
    (kc, vc), (rk, rv) = _pools(device, cache_dtype)
    qkv = torch.randn(6, 3 * 2, 64, device=device)  # k and v as strided views of a fused projection
    k, v = qkv[:, 0:3], qkv[:, 3:6]
    slots = torch.tensor([7, -1, 40, 2, -1, 95], device=device)
    kv_ops.store_kv(k, v, kc, vc, slots)
    ref.store_kv(k, v, rk, rv, slots)
    # float32 -> bfloat16 may round differently by one ulp (the CPU interpreter truncates); else exact
    torch.testing.assert_close(kc, rk, atol=0, rtol=0 if cache_dtype == torch.float32 else 8e-3)
    torch.testing.assert_close(vc, rv, atol=0, rtol=0 if cache_dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("block_size", [16, 32])
def test_copy_blocks(device, block_size):
    (kc, vc), (rk, rv) = _pools(device, torch.bfloat16, num_slots=4 * block_size)
    src, dst = torch.tensor([0, 2], device=device), torch.tensor([3, 1], device=device)
    kv_ops.copy_blocks(kc, vc, src, dst, block_size)
    ref.copy_blocks(rk, rv, src, dst, block_size)
    assert torch.equal(kc, rk) and torch.equal(vc, rv)
    assert torch.equal(kc[3 * block_size:], kc[:block_size])


def test_gather_compact_overlapping_per_head(device):
    """Each head keeps a different subset of a request's 40 slots; the kept entries move to its first 25."""
    (kc, vc), (rk, rv) = _pools(device, torch.float32)
    g = torch.Generator().manual_seed(1)
    request_slots = torch.cat([torch.arange(32, 48), torch.arange(8, 32)])  # two blocks out of order, 40 slots
    keep = torch.stack([torch.randperm(40, generator=g)[:25].sort().values for _ in range(3)])
    src, dst = request_slots[keep].to(device), request_slots[:25].to(device)
    assert set(src.flatten().tolist()) & set(dst.tolist())  # the case that needs a temporary
    kv_ops.gather_compact(kc, vc, src, dst)
    ref.gather_compact(rk, rv, src, dst)
    assert torch.equal(kc, rk) and torch.equal(vc, rv)
