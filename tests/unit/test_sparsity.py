"""Sparsity policies as pure bookkeeping: per-layer roles, option resolution, window release and the prefix
cache with the real scheduler and KV manager (no model); the Quest index against block extrema."""
import pytest
import torch

from sift.server.cache.kv_manager import KVManager
from sift.server.config import SchedulerConfig
from sift.server.engine.outputs import ScheduledRequest, SchedulerOutput
from sift.server.engine.request import Request, SamplingParams
from sift.server.engine.scheduler import Scheduler
from sift.server.options import SparsityOptions
from sift.server.policies import sparsity
from sift.server.policies.key_index import KeySketch, QuestIndex
from sift.server.policies.sparse_plan import SparsePlanner
from sift.server.policies.sparsity import DENSE, PAGES, SELECT, SKETCH, TOKENS
from sift.server.techniques import Techniques


def test_tidal_and_quest_roles():
    tidal = sparsity.make_policy(SparsityOptions(method="tidal"), 8)
    assert tidal.roles == (DENSE, DENSE, SELECT, TOKENS, SELECT, TOKENS, TOKENS, TOKENS)
    custom = sparsity.make_policy(SparsityOptions(method="tidal", selection_layer=1, reselection_layer=6), 8)
    assert custom.roles == (DENSE, SELECT, TOKENS, TOKENS, TOKENS, TOKENS, SELECT, TOKENS)
    every = sparsity.make_policy(SparsityOptions(method="tidal", reselect_every=2), 8)
    assert every.roles == (DENSE, DENSE, SELECT, TOKENS, SELECT, TOKENS, SELECT, TOKENS)
    assert tidal.reserved() == (4, 32) and sparsity.make_policy(SparsityOptions(method="quest"), 4).reserved() == (0, 0)
    assert sparsity.make_policy(SparsityOptions(method="quest"), 4).roles == (DENSE, DENSE, PAGES, PAGES)
    loki = sparsity.make_policy(SparsityOptions(method="loki", candidates=512), 4)
    assert loki.roles == (DENSE, DENSE, SKETCH, SKETCH) and loki.reserved() == (4, 32) and loki.selected == 512
    several = sparsity.make_policy(SparsityOptions(method="tidal", selection_layer=1, reselection_layer=[2, 5]), 8)
    assert several.roles == (DENSE, SELECT, SELECT, TOKENS, TOKENS, SELECT, TOKENS, TOKENS)
    with pytest.raises(ValueError):
        sparsity.make_policy(SparsityOptions(method="tidal", selection_layer=8), 8)
    for bad in (1, [3, 8]):  # a re-selection layer not after the selection layer, or past the last layer
        with pytest.raises(ValueError):
            sparsity.make_policy(SparsityOptions(method="tidal", selection_layer=1, reselection_layer=bad), 8)


def test_request_options_override_the_server_default():
    default = SparsityOptions(method="window", window=64, sinks=2)
    assert sparsity.resolve_options(None, default).method == "window"
    assert sparsity.resolve_options(None, default).window == 64
    assert sparsity.resolve_options(SparsityOptions(method="quest"), default).method == "quest"


def _engine_sched(num_blocks=64, block_size=4, **kw):
    return Scheduler(SchedulerConfig(**kw), KVManager(num_blocks, block_size), max_model_len=4096,
                     techniques=Techniques(sparsity.Sparsity(SparsityOptions(), 4, block_size)))


def _req(rid, prompt, opts=None, max_tokens=8):
    req = Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    policy = sparsity.make_policy(sparsity.resolve_options(opts, SparsityOptions()), 4)
    req.technique_state[sparsity.SparsityState] = sparsity.SparsityState(policy)
    return req


def _run(s, steps):
    for _ in range(steps):
        out = s.schedule()
        s.update(out, {r.request_id: [7] for r in out.requests if r.sample})


def test_window_keeps_blocks_bounded_over_a_long_generation():
    s = _engine_sched(num_blocks=16)  # 15 usable blocks of 4 tokens: 60 tokens without the window
    s.add_request(_req("w", range(1, 11), SparsityOptions(method="window", window=8, sinks=2), max_tokens=2000))
    peak = 0
    for _ in range(2000):
        _run(s, 1)
        peak = max(peak, s.kv.pool.num_blocks - 1 - s.kv.num_free_blocks)
    assert s.requests["w"].num_computed_tokens == 2009 and s.num_preemptions == 0
    assert peak <= 1 + 8 // 4 + 2  # the sink block, the window's blocks, the partial tail and one in flight


def test_lossy_requests_never_feed_the_prefix_cache():
    prompt = list(range(1, 41))
    s = _engine_sched()
    s.add_request(_req("w", prompt, SparsityOptions(method="window", window=8)))
    _run(s, 3)
    assert s.kv.get_computed_blocks(prompt + [0])[1] == 0  # windowed prompt KV is not dense KV
    s.add_request(_req("t", prompt, SparsityOptions(method="tidal")))
    _run(s, 8)
    # the prompt's full blocks are exact (dense prefill); blocks holding generated tokens are not
    assert s.kv.get_computed_blocks(prompt + [7] * 8 + [0])[1] == 40


def test_quest_index_tracks_block_extrema():
    bs, hkv, d = 4, 2, 8
    k_cache = torch.randn(6 * bs, hkv, d)
    index = QuestIndex([(k_cache, k_cache)], bs)
    writes = torch.tensor([4, 5, 6, 12, 13])  # block 1 from its first slot, block 3 from its first slot
    index.note_writes(writes.tolist(), [])
    index.record(0, k_cache, writes)
    assert index.fresh[1] and index.fresh[3] and not index.fresh[2]
    torch.testing.assert_close(index.key_min[0][1], k_cache[4:7].amin(0))
    torch.testing.assert_close(index.key_max[0][3], k_cache[12:14].amax(0))
    index.record(0, k_cache, torch.tensor([7]))  # an append folds into the running extrema
    torch.testing.assert_close(index.key_max[0][1], k_cache[4:8].amax(0))
    index.refresh([2], [(k_cache, k_cache)])  # a stale block is recomputed from the pool
    torch.testing.assert_close(index.key_min[0][2], k_cache[8:12].amin(0))


def test_key_sketch_projects_new_keys_and_restarts_when_invalidated():
    """A request's sketches cover every kv index up to the current one, projecting only what was written
    since the last step; after invalidate() (keys rewritten in place) they are projected anew."""
    hkv, d, rank = 2, 8, 3
    k_cache = torch.randn(600, hkv, d)
    slots = torch.randperm(600)
    sk = KeySketch(num_layers=1, rank=rank)
    q = torch.randn(2 * hkv, d)
    first = sk.scores(0, q, k_cache, slots, 10, 0.5)
    basis = sk.basis[0]
    assert first.shape == (hkv, 10) and sk.done == [10]
    k_cache[slots[:10]] += 1.0  # rewritten in place: sketches stale until invalidated
    sk.scores(0, q, k_cache, slots, 12, 0.5)
    torch.testing.assert_close(sk.rows[0][:10], torch.einsum("lhd,hdr->lhr", k_cache[slots[:10]] - 1.0, basis))
    torch.testing.assert_close(sk.rows[0][10:12], torch.einsum("lhd,hdr->lhr", k_cache[slots[10:12]], basis))
    sk.invalidate()
    sk.scores(0, q, k_cache, slots, 400, 0.5)  # past the first allocation's rows: grown
    torch.testing.assert_close(sk.rows[0][:400], torch.einsum("lhd,hdr->lhr", k_cache[slots[:400]], basis))
    assert sk.basis[0] is basis  # the basis stays


def test_a_step_without_sparse_rows_has_no_plan_and_stales_what_it_writes():
    """Once Quest is in use, a step with no sparse decode row still runs the plain dense path (no plan, so
    no per-layer sparse bookkeeping); the blocks it writes go stale and are recomputed when a quest request
    reads them."""
    bs = 4
    k_cache = torch.randn(6 * bs, 2, 8)
    planner = SparsePlanner([(k_cache, k_cache)], bs)
    planner.index = QuestIndex([(k_cache, k_cache)], bs)
    planner.index.fresh = [True] * 6
    req = Request("p", list(range(6)), SamplingParams(max_tokens=2))
    s = ScheduledRequest("p", list(range(6)), list(range(6)), [8, 9, 10, 11, 12, 13], [2, 3], 6, True)
    assert planner.plan(SchedulerOutput(requests=[s]), {"p": req}, None) is None
    assert planner.index.fresh == [True, True, False, False, True, True]
