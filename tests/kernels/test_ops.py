"""The compiled path's custom ops (kernels/ops.py) against the references, and torch.library's own checks of
their registration (schema, fake implementation, mutation) so that torch.compile can trace them."""
import pytest
import torch

from sift.kernels import ops  # noqa: F401  (registers torch.ops.sift.*)
from sift.kernels import reference as ref

BLOCK, HQ, HKV, D = 4, 4, 2, 8


def _pool(g):
    k = torch.randn(10 * BLOCK, HKV, D, generator=g)
    return k, torch.randn(10 * BLOCK, HKV, D, generator=g)


@pytest.mark.parametrize("window,softcap", [(0, 0.0), (3, 0.0), (0, 2.0)])
def test_paged_decode_op_is_the_reference(window, softcap):
    g = torch.Generator().manual_seed(window)
    k_cache, v_cache = _pool(g)
    tables = torch.tensor([[3, 5, 0], [1, 2, 7], [9, 0, 0]], dtype=torch.int32)
    kv_lens = torch.tensor([6, 11, 1], dtype=torch.int32)
    q = torch.randn(3, HQ, D, generator=g)
    got = torch.ops.sift.paged_decode(q, k_cache, v_cache, tables, kv_lens, BLOCK, 0.3, window, softcap)
    want = ref.paged_decode(q, k_cache, v_cache, tables, kv_lens, BLOCK, 0.3,
                            torch.full_like(kv_lens, window) if window else None, None, softcap=softcap)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.library.opcheck(torch.ops.sift.paged_decode.default,
                          (q, k_cache, v_cache, tables, kv_lens, BLOCK, 0.3, window, softcap),
                          test_utils=("test_schema", "test_faketensor"))


def test_store_kv_op_writes_only_its_slots():
    g = torch.Generator().manual_seed(1)
    k_cache, v_cache = _pool(g)
    k, v = torch.randn(3, HKV, D, generator=g), torch.randn(3, HKV, D, generator=g)
    slots = torch.tensor([5, 17, 0])
    want_k, want_v = k_cache.clone(), v_cache.clone()
    ref.store_kv(k, v, want_k, want_v, slots)
    torch.ops.sift.store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    torch.library.opcheck(torch.ops.sift.store_kv.default, (k, v, k_cache, v_cache, slots),
                          test_utils=("test_schema", "test_faketensor"))
