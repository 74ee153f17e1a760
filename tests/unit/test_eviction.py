"""Eviction policies without a model: LazyEviction bookkeeping on hand-written attention traces, the keep
rules of the baselines, and compaction through the KV manager (attention over the compacted cache equals
attention over the kept tokens of the original cache, reference and Triton)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: set before import

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from sift.kernels import reference as ref  # noqa: E402
from sift.server.cache.kv_manager import KVManager  # noqa: E402
from sift.server.options import EvictionOptions  # noqa: E402
from sift.server.policies.eviction import (H2O, LazyEviction, SnapKV, StreamingLLM, lazy_scores,  # noqa: E402
                                      make_policy, resolve_capacity)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _scores(*heads):
    """(sum, max) [L=1, H, N] from per-head probability rows; sum = max (one query head per group)."""
    p = torch.tensor([heads], dtype=torch.float32)
    return p, p


# Hand trace, 1 layer x 2 kv heads, alpha = 0.1, W = 2, C = 3. Entry i is born at step i + 1.
TRACE = [  # (t, probabilities per head over the entries resident at t)
    (1, [1.0], [1.0]),
    (2, [0.05, 0.95], [0.95, 0.05]),
    (3, [0.2, 0.05, 0.75], [0.05, 0.05, 0.9]),
    (4, [0.05, 0.05, 0.05, 0.85], [0.6, 0.05, 0.05, 0.3]),
]


def _lazy(capacity=3, window=2, alpha=0.1, layers=1, heads=2):
    return LazyEviction(EvictionOptions(method="lazy", window=window, alpha=alpha), capacity, layers, heads)


def test_lazy_last_and_mri_follow_the_trace():
    pol = _lazy()
    for t, h0, h1 in TRACE:
        pol.observe(t, len(h0), _scores(h0, h1))
        if t == 2:
            # entry 1 born at t=2 with last=1; head 0 sees it (mri 1), head 1 does not (still last=1, mri=0)
            assert pol.stats["last"][0].tolist() == [[1, 2], [2, 1]]
            assert pol.stats["mri"][0].tolist() == [[1, 1], [1, 0]]
            assert pol.select(False) is None  # crossed t mod W == 0 but holds 2 <= C entries
        if t == 3:
            assert pol.select(False) is None  # holds 3 entries, but 3 is not a multiple of W
    assert pol.stats["last"][0].tolist() == [[3, 2, 3, 4], [4, 1, 3, 4]]
    assert pol.stats["mri"][0].tolist() == [[2, 1, 1, 1], [2, 0, 1, 1]]


def test_lazy_scores_and_kept_set_on_the_trace():
    pol = _lazy()
    for t, h0, h1 in TRACE:
        pol.observe(t, len(h0), _scores(h0, h1))
    s = lazy_scores(4, pol.stats["last"], pol.stats["mri"])[0]
    # head 0: e0 last=3 mri=2 -> 2/(1+e^1.5) + 2/(1+e); e1 last=2 mri=1 -> 2/(1+e^3) + 1
    assert s[0, 0].item() == pytest.approx(0.364850 + 0.537883, abs=1e-5)
    assert s[0, 1].item() == pytest.approx(0.094852 + 1.0, abs=1e-5)
    # head 1: e0 last=4 mri=2 -> 2/(1+e) twice; e1 never recurred (mri 0) -> 0
    assert s[1, 0].item() == pytest.approx(2 * 0.537883, abs=1e-5)
    assert s[1, 1].item() == pytest.approx(0.0, abs=1e-6)
    keep = pol.select(False)  # t = 4: multiple of W, 4 entries > C = 3
    assert keep.tolist() == [[[1, 2, 3], [0, 2, 3]]]  # top C - W = 1 older entry per head + the last W = 2
    pol.compacted(keep)
    assert pol.num_entries == 3
    assert pol.stats["last"][0].tolist() == [[2, 3, 4], [4, 3, 4]]
    assert pol.stats["mri"][0].tolist() == [[1, 1, 1], [2, 1, 1]]
    pol.observe(5, 4, _scores([0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 0.0, 0.5]))  # the next entry joins after them
    assert pol.stats["last"][0].tolist() == [[2, 3, 5, 5], [5, 3, 4, 5]]


def test_lazy_fires_only_on_multiples_of_w_and_keeps_exactly_c_plus_last_w():
    g = torch.Generator().manual_seed(0)
    layers, heads, c, w = 3, 2, 10, 4
    pol = _lazy(capacity=c, window=w, alpha=0.05, layers=layers, heads=heads)
    n, fired = 0, []
    for t in range(1, 60):
        n += 1
        p = torch.softmax(torch.randn(layers, heads, n, generator=g) * 3, dim=-1)
        pol.observe(t, n, (p, p))
        keep = pol.select(False)
        assert (keep is not None) == (t % w == 0 and n > c)
        if keep is None:
            continue
        fired.append(t)
        assert keep.shape == (layers, heads, c)
        assert torch.all(keep[:, :, 1:] > keep[:, :, :-1])
        assert torch.equal(keep[:, :, -w:], torch.arange(n - w, n).expand(layers, heads, w))  # last W intact
        pol.compacted(keep)
        n = c
        assert pol.num_entries == c
    assert fired == [t for t in range(12, 60, 4)]  # C + W bounds the cache between evictions


def test_lazy_ties_go_to_the_entries_with_more_recent_attention():
    """Entries that recur at every step all score the same; a sink (most of the mass) outranks the others,
    which go by recent attention, whatever their age; the score order itself is unchanged."""
    pol = _lazy(capacity=4, window=2, alpha=0.01, layers=1, heads=1)
    probs = [0.6, 0.02, 0.1, 0.02, 0.04, 0.2, 0.02]  # every entry clears alpha at every step
    for t in range(1, 9):
        n = min(t, len(probs))
        p = torch.tensor(probs[:n]) / sum(probs[:n])
        pol.observe(t, n, _scores(p.tolist()))
    s = lazy_scores(pol.t, pol.stats["last"], pol.stats["mri"])[0, 0]
    assert torch.all(s[:5] == s[0])  # a tie among the older five (entry 6 joined at the last step)
    assert pol.select(False).tolist() == [[[0, 2, 5, 6]]]  # sink and the 0.1 entry, then the last W = 2


def test_streaming_keeps_sinks_and_the_most_recent():
    pol = StreamingLLM(EvictionOptions(method="streaming", window=4, sinks=2), 8, 2, 3)
    pol.observe(12, 12, None)
    assert pol.select(False)[1, 2].tolist() == [0, 1, 6, 7, 8, 9, 10, 11]


def test_h2o_keeps_heavy_hitters_plus_recent_window():
    pol = H2O(EvictionOptions(method="h2o", window=2), 4, 1, 1)
    pol.observe(6, 6, _scores([0.1, 0.5, 0.0, 0.3, 0.05, 0.05]))
    pol.observe(8, 7, _scores([0.0, 0.1, 0.0, 0.0, 0.6, 0.2, 0.1]))
    assert pol.stats["acc"][0, 0].tolist() == pytest.approx([0.1, 0.6, 0.0, 0.3, 0.65, 0.25, 0.1])
    assert pol.select(False).tolist() == [[[1, 4, 5, 6]]]  # the two heaviest of the older five, then the window


def test_snapkv_compresses_once_at_prompt_end_with_pooled_votes():
    pol = SnapKV(EvictionOptions(method="snapkv", window=2), 4, 1, 1)
    assert pol.score_queries(completes_prompt=False, num_new=100) == 0
    assert pol.score_queries(completes_prompt=True, num_new=100) == 2
    votes = [0.0] * 20 + [0.0, 0.0]
    votes[3], votes[15] = 1.0, 0.5
    pol.observe(22, 22, _scores(votes))
    assert pol.select(completes_prompt=False) is None
    # max-pool (kernel 7) spreads each vote over +-3 neighbours: 0..6 tie at 1.0, ties go to the recent entry
    assert pol.select(completes_prompt=True).tolist() == [[[5, 6, 20, 21]]]
    pol.observe(23, 23, None)
    assert pol.select(completes_prompt=False) is None  # generated tokens are never evicted


def test_budget_definition():
    assert resolve_capacity(512, 100) == 512
    assert resolve_capacity(0.25, 1000) == 250
    assert resolve_capacity(1.0, 333) == 333


@pytest.mark.parametrize("method", ["streaming", "h2o", "snapkv", "lazy"])
def test_budget_at_least_length_never_evicts(method):
    pol = make_policy(EvictionOptions(method=method, window=4), 40, 2, 2)
    for t in range(1, 41):
        p = torch.full((2, 2, t), 1.0 / t)
        pol.observe(t, t, (p, p))
        assert pol.select(completes_prompt=t == 20) is None


def test_window_scores_match_dense_softmax():
    g = torch.Generator().manual_seed(1)
    hkv, group, d, bs, kv_len, nq = 2, 3, 16, 4, 11, 5
    k_cache = torch.randn(32, hkv, d, generator=g)
    table = torch.tensor([[5, 1, 7]], dtype=torch.int32)
    q = torch.randn(nq + 2, hkv * group, d, generator=g)  # the request's chunk: 7 new tokens
    scores = (torch.full((1, hkv, 12), 9.0), torch.full((1, hkv, 12), 9.0))
    ref.window_scores(q, k_cache, table, torch.tensor([0, 7]), torch.tensor([kv_len]), bs, 0.25, [nq], scores)
    k = k_cache[ref.slots_for(table[0], kv_len, bs)]  # [L, Hkv, D]
    want_sum, want_max = torch.zeros(hkv, kv_len), torch.zeros(hkv, kv_len)
    for j in range(nq):
        qi = kv_len - nq + j
        for h in range(hkv * group):
            p = torch.softmax(k[: qi + 1, h // group] @ q[7 - nq + j, h] * 0.25, dim=0)
            want_sum[h // group, : qi + 1] += p
            want_max[h // group, : qi + 1] = torch.maximum(want_max[h // group, : qi + 1], p)
    assert torch.allclose(scores[0][0, :, :kv_len], want_sum, atol=1e-5)
    assert torch.allclose(scores[1][0, :, :kv_len], want_max, atol=1e-6)
    assert torch.all(scores[0][0, :, kv_len:] == 0)


# ---------------------------------------------------------------------------------- compaction
def _kept_attention(q, k_cache, v_cache, slots, scale):
    """Decode attention of q [Hq, D] over explicit per-kv-head slot lists [Hkv, N] (the kept tokens)."""
    hkv = k_cache.shape[1]
    group = q.shape[0] // hkv
    out = torch.empty_like(q, dtype=torch.float32)
    for h in range(q.shape[0]):
        k = k_cache[slots[h // group], h // group].float()
        v = v_cache[slots[h // group], h // group].float()
        out[h] = torch.softmax(k @ q[h].float() * scale, dim=0) @ v
    return out


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_compaction_preserves_attention_over_kept_tokens(impl, shared_prefix):
    g = torch.Generator().manual_seed(2)
    layers, hkv, group, d, bs, n, c = 2, 2, 2, 16, 4, 23, 9
    mgr = KVManager(num_blocks=24, block_size=bs)
    prompt = list(range(100, 100 + n))
    if shared_prefix:  # another request holds the same leading blocks: compact must copy them first
        mgr.allocate_slots("other", 12)
        mgr.cache_blocks("other", prompt, 12)
        blocks, hit = mgr.get_computed_blocks(prompt)
        mgr.allocate_slots("r", n - hit, blocks, hit)
    else:
        mgr.allocate_slots("r", n)
    table_before = mgr.block_table("r")
    pools = [(torch.randn(24 * bs, hkv, d, generator=g), torch.randn(24 * bs, hkv, d, generator=g))
             for _ in range(layers)]
    originals = [(k.clone(), v.clone()) for k, v in pools]
    keep = np.sort(np.stack([np.stack([np.random.default_rng(10 * li + h).choice(n, c, replace=False)
                                       for h in range(hkv)]) for li in range(layers)]), axis=2)
    free_before = mgr.num_free_blocks
    plan = mgr.compact("r", keep)
    assert mgr.num_resident("r") == c and len(mgr.block_table("r")) == -(-c // bs)
    if shared_prefix:
        assert plan.copies and all(src in table_before for src, _ in plan.copies)
    else:
        assert mgr.num_free_blocks == free_before + len(table_before) - len(mgr.block_table("r"))

    if impl == "reference":
        copy_blocks, gather, decode = ref.copy_blocks, ref.gather_compact, ref.paged_decode
    else:
        from sift.kernels import kv_ops, paged_attention
        copy_blocks, gather, decode = kv_ops.copy_blocks, kv_ops.gather_compact, paged_attention.paged_decode
    src, dst = torch.tensor([s for s, _ in plan.copies], dtype=torch.long), torch.tensor(
        [t for _, t in plan.copies], dtype=torch.long)
    table = torch.tensor([mgr.block_table("r")], dtype=torch.int32, device=DEVICE)
    for li, (k, v) in enumerate(pools):
        k, v = k.to(DEVICE), v.to(DEVICE)
        copy_blocks(k, v, src.to(DEVICE), dst.to(DEVICE), bs)
        gather(k, v, torch.as_tensor(plan.src_slots[li], device=DEVICE), torch.as_tensor(plan.dst_slots, device=DEVICE))
        q = torch.randn(1, hkv * group, d, generator=g)
        got, _ = decode(q.to(DEVICE), k, v, table, torch.tensor([c], dtype=torch.int32, device=DEVICE), bs, 0.3)
        k0, v0 = originals[li]
        kept_slots = torch.tensor([[table_before[i // bs] * bs + i % bs for i in keep[li, h]] for h in range(hkv)])
        want = _kept_attention(q[0], k0, v0, kept_slots, 0.3)
        assert torch.allclose(got[0].float().cpu(), want, atol=1e-4)
        if shared_prefix:  # the other request's blocks are untouched
            other = torch.tensor(mgr.slots("other", 0, 12))
            assert torch.equal(k.cpu()[other], k0[other])


def test_compacted_blocks_return_to_the_pool_and_abort_leaks_nothing():
    mgr = KVManager(num_blocks=16, block_size=4)
    prompt = list(range(30))
    mgr.allocate_slots("r", 30)
    mgr.cache_blocks("r", prompt, 30)
    mgr.compact("r", np.tile(np.arange(20, 30), (2, 3, 1)))
    assert len(mgr.block_table("r")) == 3 and mgr.num_free_blocks == 16 - 3 - 1  # the null block
    blocks, hit = mgr.get_computed_blocks(prompt)
    assert hit == 0  # every leading block was rewritten: none may serve a prefix hit
    mgr.allocate_slots("r", 5)
    mgr.free("r")
    assert mgr.num_free_blocks == 15 and mgr.num_requests == 0


def test_driver_peak_tokens_and_draft_depth():
    from sift.server.engine.request import Request, SamplingParams
    from sift.server.policies.eviction import Eviction, EvictionState

    driver = Eviction(EvictionOptions(method="none"), num_layers=1, num_kv_heads=1, kv=None)
    plain = Request("p", list(range(40)), SamplingParams(max_tokens=200))
    driver.on_admit(plain)
    assert driver.peak_tokens(plain) is None and driver.draft_depth(plain) is None
    lazy = Request("l", list(range(40)), SamplingParams(max_tokens=200,
                                                           eviction=EvictionOptions("lazy", budget=64, window=8)))
    snap = Request("s", list(range(40)), SamplingParams(max_tokens=200,
                                                           eviction=EvictionOptions("snapkv", budget=16, window=8)))
    for r in (lazy, snap):
        driver.on_admit(r)
    assert driver.peak_tokens(lazy) == 64 + 8  # C + W
    assert driver.peak_tokens(snap) == 16 + 200  # C, then every generated token (SnapKV never evicts them)
    policy = lazy.state_of(EvictionState).policy
    policy.num_entries, lazy.num_computed_tokens = 70, 101  # root at 101: decision points at t = 104, 112, ...
    assert driver.draft_depth(lazy) == 2
    policy.num_entries = 50  # t=104 keeps everything (53 <= 64); t=112 holds 61 <= 64; t=120 holds 69 > 64
    assert driver.draft_depth(lazy) == 18
    assert driver.draft_depth(snap) is None
