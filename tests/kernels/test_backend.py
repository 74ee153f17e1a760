"""The Triton backend equals the torch backend on a step's store + attention + score emission."""
import sys
import types

import pytest
import torch

from sift.kernels import reference as ref
from sift.kernels.backend import build_metadata, select_backend

HQ, HKV, DIM, BLOCK = 6, 2, 64, 16


def _step(device, q_lens, kv_lens, windowed, seed=0):
    """Pools with each request's context already stored, the new tokens' q/k/v, and the step's metadata."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-n // BLOCK) for n in kv_lens]
    perm = torch.randperm(sum(blocks) + 1, generator=g)
    block_tables = torch.zeros(len(kv_lens), max(blocks), dtype=torch.int32)
    slot_mapping, used = [], 0
    for b, (n_q, n_kv) in enumerate(zip(q_lens, kv_lens)):
        block_tables[b, :blocks[b]] = perm[used:used + blocks[b]]
        used += blocks[b]
        slot_mapping += ref.slots_for(block_tables[b], n_kv, BLOCK)[n_kv - n_q:].tolist()
    num_slots = (sum(blocks) + 1) * BLOCK
    k_cache = torch.randn(num_slots, HKV, DIM, generator=g).to(device)
    v_cache = torch.randn(num_slots, HKV, DIM, generator=g).to(device)
    t = sum(q_lens)
    q, k, v = (torch.randn(t, h, DIM, generator=g).to(device) for h in (HQ, HKV, HKV))
    meta = build_metadata(q_lens, kv_lens, block_tables.to(device), slot_mapping, BLOCK, device,
                          score_layers=frozenset({0}))
    if windowed:
        meta.window = torch.tensor([6, 0, 9][:len(q_lens)], dtype=torch.int32, device=device)
        meta.sinks = torch.tensor([2, 0, 0][:len(q_lens)], dtype=torch.int32, device=device)
    return q, k, v, k_cache, v_cache, meta


def _run(backend, step):
    q, k, v, k_cache, v_cache, meta = step
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    backend.store_kv(k, v, k_cache, v_cache, meta)
    outs = [backend.forward(layer, q, k_cache, v_cache, meta, DIM ** -0.5) for layer in (0, 1)]
    return outs, meta.scores.pop(0), k_cache


@pytest.mark.parametrize("q_lens,kv_lens", [([1, 1, 7], [20, 33, 7]), ([1, 1], [16, 45])])  # mixed; pure decode
@pytest.mark.parametrize("windowed", [False, True])
def test_triton_backend_equals_torch_backend(device, poison, q_lens, kv_lens, windowed):
    step = _step(device, q_lens, kv_lens, windowed)
    triton_backend = select_backend("triton", device)
    assert triton_backend.name == "triton"
    outs, scores, k_cache = _run(triton_backend, step)
    ref_outs, ref_scores, ref_k_cache = _run(select_backend("torch", device), step)
    assert torch.equal(k_cache, ref_k_cache)
    for out, ref_out in zip(outs, ref_outs):
        torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=2e-5)
    for s, ref_s in zip(scores, ref_scores):
        torch.testing.assert_close(s, ref_s, atol=1e-5, rtol=1e-4)


def test_flash_attn_prefill_gets_the_paged_pool(device, monkeypatch):
    """The flash-attn path hands flash_attn_varlen_func a [blocks, block_size, Hkv, D] view of the pool.
    A stand-in computes the reference from exactly what it is given."""
    monkeypatch.setattr(sys.modules[__name__], "BLOCK", 256)

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, block_table):
        assert causal and max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
        return ref.paged_attention(q, k.flatten(0, 1), v.flatten(0, 1), block_table, cu_q, cu_k[1:] - cu_k[:-1],
                                   k.shape[1], softmax_scale)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=varlen))
    q, k, v, k_cache, v_cache, meta = _step(device, [3, 260], [300, 260], windowed=False)
    q, k_cache, v_cache = q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16()
    out = select_backend("flash-attn", device)._prefill(q, k_cache, v_cache, meta, 0.125)
    expected = ref.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.kv_lens, 256,
                                   0.125)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("windowed", [False, True])
@pytest.mark.parametrize("q_lens,kv_lens,batched", [
    ([1, 4, 1, 7, 3, 1], [20, 33, 7, 40, 3, 18], [1, 3, 4]),  # decodes and draft trees: the trees batched
    ([2, 60, 5], [500, 60, 41], [])])  # padding to the longest would cost > SHORT_PAD x: one at a time
def test_torch_backend_batches_short_query_runs_exactly(device, poison, q_lens, kv_lens, batched, windowed):
    """The torch backend runs several short query runs (draft trees) padded into one batched pass; each row
    equals the per-request reference's, under tree masks, windows and sinks."""
    from test_paged_attention import _ancestor_mask

    q, k, v, k_cache, v_cache, meta = _step(device, q_lens, kv_lens, windowed, seed=4)
    gen = torch.Generator().manual_seed(5)
    tree = torch.zeros(sum(q_lens), max(q_lens), dtype=torch.bool)
    for b, n in enumerate(q_lens):
        start = sum(q_lens[:b])
        tree[start:start + n, :n] = _ancestor_mask(n, gen) if b % 2 else torch.ones(n, n, dtype=torch.bool).tril()
    meta.tree_mask = tree.to(device)
    if windowed:
        meta.window = torch.tensor([0, 8, 0, 5, 2, 0][:len(q_lens)], dtype=torch.int32, device=device)
        meta.sinks = torch.tensor([0, 2, 0, 1, 0, 0][:len(q_lens)], dtype=torch.int32, device=device)
    backend = select_backend("torch", torch.device("cpu"))
    backend.store_kv(k, v, k_cache, v_cache, meta)
    out = backend.forward(3, q, k_cache, v_cache, meta, DIM ** -0.5)
    assert meta._cache["split"][1] == batched
    expected = ref.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.kv_lens, BLOCK,
                                   DIM ** -0.5, meta.window, meta.sinks, meta.tree_mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_lens,kv_lens", [([1, 1, 7], [20, 33, 7]), ([1, 1], [16, 45])])
@pytest.mark.parametrize("windowed", [False, True])
def test_layer_window_and_softcap_triton_equals_torch(device, poison, q_lens, kv_lens, windowed):
    """A layer's own window (5) and logit soft-cap (1.5) through backend.forward: Triton equals torch, and both
    equal the reference run with the per-request (window, sinks) that for_layer promises: the model's window
    without sinks, except where a request's own (sparsity) window is narrower, which keeps its sinks."""
    q, k, v, k_cache, v_cache, meta = _step(device, q_lens, kv_lens, windowed, seed=1)
    q = q * 4  # logits large enough for the cap to bend them
    outs = {}
    for name in ("triton", "torch"):
        backend = select_backend(name, device)
        kc, vc = k_cache.clone(), v_cache.clone()
        backend.store_kv(k, v, kc, vc, meta)
        outs[name] = backend.forward(2, q, kc, vc, meta, DIM ** -0.5, window=5, softcap=1.5)
        plain = backend.forward(2, q, kc, vc, meta, DIM ** -0.5)
    torch.testing.assert_close(outs["triton"], outs["torch"], atol=1e-4, rtol=2e-5)
    assert (outs["torch"] - plain).abs().max() > 1e-2
    window = torch.full((len(q_lens),), 5, dtype=torch.int32, device=device)
    sinks = torch.zeros_like(window)
    if windowed:  # requests' own windows 6 (wider: the model's applies, no sinks), 0 (none), 9 (wider)
        assert meta.window.tolist()[:2] == [6, 0]
    view = meta.for_layer(5, 1.5)
    assert view.window.tolist() == window.tolist() and view.sinks.tolist() == sinks.tolist()
    assert meta.for_layer(5, 1.5) is view and view.scores is meta.scores  # built once per step, scores shared
    if windowed:
        narrower = meta.for_layer(7, 0.0)  # request 0's own window 6 < 7 keeps its 2 sinks; the rest get 7
        assert narrower.window.tolist() == [6, 7, 7][:len(q_lens)] and narrower.sinks.tolist()[:2] == [2, 0]
    kc, vc = k_cache.clone(), v_cache.clone()
    ref.store_kv(k, v, kc, vc, meta.slot_mapping)
    expect = ref.paged_attention(q, kc, vc, meta.block_tables, meta.cu_seqlens_q, meta.kv_lens, BLOCK, DIM ** -0.5,
                                 window, sinks, softcap=1.5)
    torch.testing.assert_close(outs["torch"], expect, atol=1e-5, rtol=1e-5)
