"""Sparse decode attention, TidalDecode/Quest/Loki selection and token-skip row ops against torch oracles."""
import pytest
import torch

from sift.kernels import reference as ref
from sift.kernels.selection import (key_basis, pages_to_slots, quest_page_bounds, rerank_slots, sketch_scores, sketch_topk,
                               top_pages, topk_token_slots)
from sift.kernels.sparse_attention import sparse_decode
from sift.kernels.token_skip import gather_rows, scatter_add_rows_

TOL = {torch.float32: dict(atol=1e-4, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
NUM_KV_HEADS = {1: 2, 3: 2, 8: 1}  # group size -> kv heads


def _random_slot_lists(kv_lens, block_tables, block_size, hkv, n, gen):
    """Per (request, kv head) n distinct kv indices (fewer for short requests, -1 padded), as physical slots."""
    out = torch.full((len(kv_lens), hkv, n), -1, dtype=torch.long)
    for b, kv_len in enumerate(kv_lens):
        slots = ref.slots_for(block_tables[b].cpu(), kv_len, block_size)
        for h in range(hkv):
            pick = torch.randperm(kv_len, generator=gen)[:n]
            out[b, h, :len(pick)] = slots[pick]
    return out


def _masked_softmax_oracle(q, k_cache, v_cache, block_tables, kv_lens, block_size, slots, scale):
    """Dense attention over each request's whole KV with logits outside the selected slots set to -inf."""
    bsz, hq, d = q.shape
    hkv = k_cache.shape[1]
    out = torch.empty(bsz, hq, d)
    for b, kv_len in enumerate(kv_lens):
        all_slots = ref.slots_for(block_tables[b].cpu(), kv_len, block_size)
        for h in range(hq):
            kvh = h // (hq // hkv)
            logits = (k_cache[all_slots, kvh].float() @ q[b, h].float()) * scale
            chosen = torch.isin(all_slots, slots[b, kvh][slots[b, kvh] >= 0].cpu())
            p = torch.softmax(logits.masked_fill(~chosen, float("-inf")), dim=0)
            out[b, h] = p @ v_cache[all_slots, kvh].float()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_sparse_decode_matches_references(paged_pool, device, poison, group, block_size, dtype):
    kv_lens, hkv = [1, 33, 90], NUM_KV_HEADS[group]
    k_cache, v_cache, tables, _ = paged_pool(kv_lens, hkv, 64, block_size, dtype)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(len(kv_lens), hkv * group, 64, generator=gen).to(device, dtype)
    slots = _random_slot_lists(kv_lens, tables, block_size, hkv, 40, gen).to(device)
    out = sparse_decode(q, k_cache, v_cache, slots, 0.125)
    expect = ref.sparse_decode(q, k_cache, v_cache, slots, 0.125)
    torch.testing.assert_close(out, expect, **TOL[dtype])
    oracle = _masked_softmax_oracle(q.cpu(), k_cache.cpu(), v_cache.cpu(), tables, kv_lens, block_size,
                                    slots.cpu(), 0.125)
    torch.testing.assert_close(expect.float().cpu(), oracle, **TOL[dtype])


@pytest.mark.parametrize("group", [1, 3])
def test_tidal_selection_is_topk_of_dense_scores(paged_pool, device, group):
    kv_lens, hkv, block_size, budget = [5, 70, 130], NUM_KV_HEADS[group], 16, 24
    k_cache, v_cache, tables, kv = paged_pool(kv_lens, hkv, 64, block_size, torch.float32)
    q = torch.randn(len(kv_lens), hkv * group, 64, generator=torch.Generator().manual_seed(2)).to(device)
    _, (score_sum, _) = ref.paged_decode(q, k_cache, v_cache, tables, kv, block_size, 0.125, return_scores=True)
    padded = ref.padded_slots(tables, kv, max(kv_lens), block_size)
    budgets = torch.full((3,), budget, device=device)
    slots, kv_idx = topk_token_slots(score_sum, padded, kv, budgets)
    for b, kv_len in enumerate(kv_lens):
        for h in range(hkv):
            k = min(budget - 1, kv_len - 1)
            expect = set(torch.topk(score_sum[b, h, :kv_len - 1], k).indices.tolist()) | {kv_len - 1}
            chosen = kv_idx[b, h][kv_idx[b, h] >= 0].tolist()
            assert set(chosen) == expect and len(chosen) == len(expect)
            assert slots[b, h][kv_idx[b, h] >= 0].tolist() == padded[b, chosen].tolist()


def test_selection_ties_do_not_depend_on_the_batch(device):
    """Equal scores (kept tokens beyond the budget, underflowed zeros) are cut by position, so a request's
    selection is the same alone and beside any batch mates (torch.topk's choice among ties was not:
    two identical requests in one batch got different TidalDecode selections)."""
    g = torch.Generator().manual_seed(11)
    hkv, width, budget = 3, 300, 32
    scores = torch.rand(2, hkv, width, generator=g).to(device)
    scores[:, :, 100:] = 0.0  # underflowed probabilities: ties at zero
    scores[1] = scores[0]
    slots = torch.arange(width, device=device).expand(2, -1)
    kv = torch.tensor([width, 250], device=device)
    n = torch.ones(2, dtype=torch.long, device=device)
    both, _ = topk_token_slots(scores, slots, kv, n * 400, n * 4, n * 200)  # past the nonzero scores: zeros tie
    alone, _ = topk_token_slots(scores[1:], slots[1:], kv[1:], n[1:] * 400, n[1:] * 4, n[1:] * 200)
    assert torch.equal(both[1], alone[0])
    both, _ = topk_token_slots(scores, slots, kv, n * budget, n * 4, n * 64)
    alone, _ = topk_token_slots(scores[1:], slots[1:], kv[1:], n[1:] * budget, n[1:] * 4, n[1:] * 64)
    assert torch.equal(both[1], alone[0])
    kept = set(range(4)) | set(range(249 - 64, 249))
    assert set(both[1, 0, :-1].tolist()) == set(sorted(kept)[:budget - 1])  # the earliest kept ones, then current
    assert both[1, 0, -1].item() == 249


def test_top_is_a_stable_descending_sort_cut_at_k(device):
    """The selections' top-k (an integer-keyed torch.topk) picks what a stable descending sort keeps: the
    same scores and positions in the same order, ties (+inf, 0.0 and -0.0, repeated values) by position."""
    from sift.kernels.selection import _top

    g = torch.Generator().manual_seed(5)
    for width in (1, 7, 64, 300):
        s = torch.randn(2, 3, width, generator=g)
        s[s > 1] = float("inf")
        s[s < -1] = float("-inf")
        s[(s > 0.2) & (s < 0.5)] = 0.0
        s[(s > -0.5) & (s < -0.2)] = -0.0
        s[:, :, ::3] = torch.round(s[:, :, ::3] * 4) / 4
        s = s.to(device)
        val, idx = torch.sort(s, dim=-1, descending=True, stable=True)
        for k in {1, width // 2 or 1, width}:
            top_val, top_idx = _top(s, k)
            assert torch.equal(top_idx, idx[..., :k]) and torch.equal(top_val, val[..., :k])


def test_rerank_is_topk_of_each_layers_own_scores(paged_pool, device):
    """A sparse layer's re-ranking keeps the forced candidates and, of the rest, the top of its own query's
    attention (group-summed softmax over the candidates); with every earlier token a candidate and no
    forced one but the current, it is the exact per-layer top-budget selection."""
    kv_lens, hkv, group, block_size, budget = [5, 70, 130], 3, 3, 16, 24
    k_cache, v_cache, tables, kv = paged_pool(kv_lens, hkv, 64, block_size, torch.float32)
    q = torch.randn(len(kv_lens), hkv * group, 64, generator=torch.Generator().manual_seed(7)).to(device)
    padded = ref.padded_slots(tables, kv, max(kv_lens), block_size)
    n = torch.full((3,), 1, device=device)
    # candidates: every token, the current one forced (what a selection of budget >= context gives)
    kv_idx = torch.arange(max(kv_lens), device=device).expand(3, hkv, -1)
    kv_idx = torch.where(kv_idx < kv[:, None, None], kv_idx, -1)
    cand = torch.where(kv_idx >= 0, torch.gather(padded.long()[:, None, :].expand(-1, hkv, -1), 2,
                                                 kv_idx.clamp(min=0)), -1)
    forced = kv_idx == (kv[:, None, None] - 1)
    slots = rerank_slots(q, k_cache, cand, forced, n * budget, 0.125, budget)
    _, (score_sum, _) = ref.paged_decode(q, k_cache, v_cache, tables, kv, block_size, 0.125, return_scores=True)
    for b, kv_len in enumerate(kv_lens):
        for h in range(hkv):
            k = min(budget - 1, kv_len - 1)
            expect = set(torch.topk(score_sum[b, h, :kv_len - 1], k).indices.tolist()) | {kv_len - 1}
            chosen = slots[b, h][slots[b, h] >= 0].tolist()
            assert sorted(chosen) == sorted(padded[b, sorted(expect)].tolist())
    # a forced candidate survives however low it scores; padding never comes back
    forced = torch.zeros_like(forced)
    low = torch.argmin(score_sum[2, 0, :kv_lens[2] - 1]).item()
    forced[2, 0, low] = True
    slots = rerank_slots(q, k_cache, cand, forced, n * 4, 0.125, 4)
    assert int(padded[2, low]) in slots[2, 0].tolist() and (slots[0] >= 0).sum(-1).tolist() == [4] * hkv


@pytest.mark.parametrize("group", [1, 3])
def test_key_sketch_scores(paged_pool, device, group):
    """Loki: the basis is orthonormal and spans the keys' top principal directions; at full rank the sketch
    scores are the dense decode's group-summed probabilities (to the 2^-20 they are rounded to); at low rank
    they are the same softmax over the projected q·k."""
    kv_len, hkv, d = 90, NUM_KV_HEADS[group], 64
    k_cache, v_cache, tables, kv = paged_pool([kv_len], hkv, d, 16, torch.float32)
    q = torch.randn(1, hkv * group, d, generator=torch.Generator().manual_seed(3)).to(device)
    slots = ref.slots_for(tables[0], kv_len, 16).to(device)
    keys = k_cache[slots]
    for rank in (d, 8):
        basis = key_basis(keys, rank)
        assert basis.shape == (hkv, d, rank)
        torch.testing.assert_close(basis.transpose(1, 2) @ basis, torch.eye(rank, device=device).expand(hkv, -1, -1),
                                   atol=1e-4, rtol=0)
        sketch = torch.einsum("lhd,hdr->lhr", keys, basis)
        got = sketch_scores(q[0], sketch, basis, 0.125) / 2.0 ** 20
        proj = torch.einsum("hdr,her->hde", basis, basis)  # the projector on the sketch space
        logits = torch.einsum("hgd,hde,lhe->hgl", q[0].view(hkv, group, d), proj, keys) * 0.125
        torch.testing.assert_close(got, torch.softmax(logits, -1).sum(1), atol=2e-6, rtol=0)
        if rank == d:
            _, (score_sum, _) = ref.paged_decode(q, k_cache, v_cache, tables, kv, 16, 0.125, return_scores=True)
            torch.testing.assert_close(got, score_sum[0, :, :kv_len], atol=2e-6, rtol=0)
    # the first principal direction captures at least as much key energy as any other unit vector tried
    top = key_basis(keys, 1)[:, :, 0]
    energy = torch.einsum("lhd,hd->hl", keys, top).pow(2).sum(-1)
    for other in torch.nn.functional.normalize(torch.randn(5, hkv, d, device=device), dim=-1):
        assert (torch.einsum("lhd,hd->hl", keys, other).pow(2).sum(-1) <= energy + 1e-3).all()


@pytest.mark.parametrize("width,k,first,latest", [(300, 40, 4, 8), (300, 10, 6, 8), (30, 64, 2, 3), (50, 20, 0, 0)])
def test_sketch_topk_equals_the_general_selection(device, width, k, first, latest):
    """Loki's per-layer fast path picks what topk_token_slots picks, ties (many: the
    scores are coarse integers) included, and when the kept tokens alone exceed the budget."""
    gen = torch.Generator().manual_seed(width + k)
    scores = torch.randint(0, 6, (2, width), generator=gen).float().to(device)
    slots = torch.randperm(width + 17, generator=gen)[:width].to(device)
    got_slots, got_idx = sketch_topk(scores, slots, k, first, latest)
    one = torch.ones(1, dtype=torch.long, device=device)
    want_slots, want_idx = topk_token_slots(scores[None], slots[None], one * width, one * k, one * first, one * latest)
    want = [[x for x in row if x >= 0] for row in want_idx[0].tolist()]
    assert [sorted(r) for r in got_idx.tolist()] == [sorted(r) for r in want]
    assert sorted(got_slots.flatten().tolist()) == sorted(x for x in want_slots[0].flatten().tolist() if x >= 0)


def test_tidal_selection_keeps_first_and_latest_tokens(paged_pool, device):
    """With reserved first/latest tokens, the rest of the budget is the top-k of the remaining scores."""
    kv_lens, hkv, block_size, budget, first, latest = [5, 70, 130], 3, 16, 24, 4, 8
    k_cache, v_cache, tables, kv = paged_pool(kv_lens, hkv, 64, block_size, torch.float32)
    q = torch.randn(len(kv_lens), hkv * 3, 64, generator=torch.Generator().manual_seed(5)).to(device)
    _, (score_sum, _) = ref.paged_decode(q, k_cache, v_cache, tables, kv, block_size, 0.125, return_scores=True)
    padded = ref.padded_slots(tables, kv, max(kv_lens), block_size)
    n = torch.full((3,), 1, device=device)
    _, kv_idx = topk_token_slots(score_sum, padded, kv, n * budget, n * first, n * latest)
    for b, kv_len in enumerate(kv_lens):
        reserved = set(range(min(first, kv_len - 1))) | set(range(max(0, kv_len - 1 - latest), kv_len - 1))
        rest = [i for i in range(kv_len - 1) if i not in reserved]
        for h in range(hkv):
            k = min(budget - 1 - len(reserved), len(rest))
            top = torch.topk(score_sum[b, h, rest], k).indices.tolist()
            expect = reserved | {rest[i] for i in top} | {kv_len - 1}
            assert set(kv_idx[b, h][kv_idx[b, h] >= 0].tolist()) == expect


@pytest.mark.parametrize("group", [1, 3])
def test_quest_bound_covers_every_page(paged_pool, device, group):
    kv_lens, hkv, bs = [3, 50, 100], NUM_KV_HEADS[group], 16
    k_cache, _, tables, kv = paged_pool(kv_lens, hkv, 64, bs, torch.float32)
    q = torch.randn(len(kv_lens), hkv * group, 64, generator=torch.Generator().manual_seed(3)).to(device)
    blocks = k_cache.view(-1, bs, hkv, 64)
    kmin, kmax = blocks.amin(1), blocks.amax(1)  # full blocks: stale slots past kv_len only loosen the bound
    num_pages = (kv + bs - 1) // bs
    bounds = quest_page_bounds(q, kmin, kmax, tables, num_pages)
    for b, kv_len in enumerate(kv_lens):
        slots = ref.slots_for(tables[b], kv_len, bs)
        for h in range(hkv):
            logits = q[b, h * group:(h + 1) * group].float() @ k_cache[slots, h].float().T  # [G, kv_len]
            for p in range(int(num_pages[b])):
                true_max = logits[:, p * bs:(p + 1) * bs].max()
                assert bounds[b, h, p] >= true_max - 1e-4
    pages = top_pages(bounds, num_pages, torch.tensor([32, 32, 32], device=device), bs)
    assert (pages[:, :, 0] >= 0).all() and all((pages[b] == int(num_pages[b]) - 1).any(-1).all() for b in range(3))
    slots = pages_to_slots(pages, tables, kv, bs)
    assert slots.shape == (3, hkv, 2 * bs) and (slots[0] >= 0).sum() == hkv * 3  # a 3-token request: 3 slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_skip_gather_scatter(device, poison, dtype):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(37, 300, generator=gen).to(device, dtype)
    rows = torch.tensor([0, 5, 6, 20, 36], device=device)
    upd = torch.randn(5, 300, generator=gen).to(device, dtype)
    torch.testing.assert_close(gather_rows(x, rows), ref.gather_rows(x, rows), atol=0, rtol=0)
    got, expect = scatter_add_rows_(x.clone(), rows, upd), ref.scatter_add_rows_(x.clone(), rows, upd)
    # float32: exact; bfloat16: the CPU interpreter rounds float32 -> bfloat16 differently (one ulp)
    torch.testing.assert_close(got, expect, **(TOL[dtype] if dtype == torch.bfloat16 else dict(atol=0, rtol=0)))
    untouched = torch.ones(37, dtype=torch.bool)
    untouched[rows.cpu()] = False
    assert torch.equal(got[untouched.to(device)], x[untouched.to(device)])
