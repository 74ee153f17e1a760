"""Probe-and-Skip on a tiny random Llama: the staged schedule, the probes' guarantees, bit-identical
pass-through of skipped tokens, and ratio 0 == no skipping."""
from dataclasses import replace

import pytest
import torch

from sift.kernels import reference as ref
from sift.kernels.backend import TorchBackend
from sift.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from sift.models.registry import ArchConfig
from sift.server.engine.outputs import ScheduledRequest, SchedulerOutput
from sift.server.engine.request import Request, SamplingParams
from sift.server.options import SkipOptions
from sift.server.policies import skipping
from sift.server.runner.model_runner import ModelRunner

ARCH = ArchConfig("LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=6,
                  num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=512, tie_word_embeddings=True)


def test_staged_ratios_rise_with_depth():
    opts = SkipOptions(method="spts", start_layer=2, ratio=0.6, stages=3)
    ratios = skipping.layer_ratios(opts, 8)
    assert ratios[:2] == [0.0, 0.0] and ratios == sorted(ratios) and ratios[-1] == pytest.approx(0.6)
    assert len(set(ratios[2:])) == 3 and skipping.stage_ends(opts, 8) == {3, 5}


def test_geometric_schedule_keeps_the_same_share_per_stage():
    opts = SkipOptions(method="spts", start_layer=2, ratio=0.875, stages=3, schedule="geometric")
    kept = [1 - r for r in skipping.layer_ratios(opts, 8)]
    assert kept == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125])  # each stage keeps half of the last
    assert skipping.stage_ends(opts, 8) == {3, 5}
    per_layer = skipping.layer_ratios(replace(opts, stages=0), 8)
    assert per_layer[-1] == pytest.approx(0.875) and per_layer == sorted(per_layer)
    # front-loaded: past the first stage it skips more than the linear ramp to the same ratio
    linear = skipping.layer_ratios(replace(opts, stages=0, schedule="linear"), 8)
    assert all(g > lin for g, lin in zip(per_layer[2:-1], linear[2:-1]))
    with pytest.raises(ValueError, match="schedule"):
        SkipOptions(method="spts", schedule="cosine")


@pytest.fixture(scope="module")
def runner():
    g = torch.Generator().manual_seed(0)
    model = LlamaForCausalLM(ARCH)
    h, i, d = ARCH.hidden_size, ARCH.intermediate_size, ARCH.head_dim
    w = {"model.embed_tokens.weight": torch.randn(ARCH.vocab_size, h, generator=g), "model.norm.weight": torch.ones(h)}
    for n in range(ARCH.num_layers):
        p = f"model.layers.{n}."
        w |= {p + "self_attn.q_proj.weight": torch.randn(4 * d, h, generator=g) / h ** 0.5,
              p + "self_attn.k_proj.weight": torch.randn(2 * d, h, generator=g) / h ** 0.5,
              p + "self_attn.v_proj.weight": torch.randn(2 * d, h, generator=g) / h ** 0.5,
              p + "self_attn.o_proj.weight": torch.randn(h, 4 * d, generator=g) / h ** 0.5,
              p + "mlp.gate_proj.weight": torch.randn(i, h, generator=g) / h ** 0.5,
              p + "mlp.up_proj.weight": torch.randn(i, h, generator=g) / h ** 0.5,
              p + "mlp.down_proj.weight": torch.randn(h, i, generator=g) / i ** 0.5,
              p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h)}
    model.load_weights(w)
    return ModelRunner(model, ARCH.num_layers, TorchBackend(), torch.device("cpu"), torch.float32, 16, 16)


def _prefill(runner, opts, n=100, req=None):
    req = req or Request("r", list(torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(1)).tolist()),
                         SamplingParams(max_tokens=4))
    if opts is not None:
        req.technique_state[skipping.SkipState] = skipping.SkipState(opts)
    sched = SchedulerOutput(requests=[ScheduledRequest("r", req.prompt_token_ids, list(range(n)), list(range(n)),
                                                       list(range(-(-n // 16))), n, True)])
    batch = runner.build_batch(sched, {"r": req})
    return batch, runner.model(batch)


def _decode(runner, req, token=5):
    """One decode step of ``req`` (prefilled into slots [0, n)): returns (batch, hidden)."""
    n = req.num_prompt_tokens
    sched = SchedulerOutput(requests=[ScheduledRequest("r", [token], [n], [n], list(range(-(-(n + 1) // 16))),
                                                       n + 1, True)])
    batch = runner.build_batch(sched, {"r": req})
    return batch, runner.model(batch)


def _spy_layers(monkeypatch) -> list:
    """Records (layer, hidden before, hidden after) of every layer that runs on the plan's row subsets."""
    seen = []
    real_layer = LlamaDecoderLayer.forward_subsets

    def spy(self, h, cos, sin, batch, plan):
        before = h.clone()
        after = real_layer(self, h, cos, sin, batch, plan)
        seen.append((self.self_attn.layer, before, after.clone()))
        return after

    monkeypatch.setattr(LlamaDecoderLayer, "forward_subsets", spy)
    return seen


def test_ratio_zero_is_identical_to_no_skipping(runner):
    _, dense = _prefill(runner, None)
    batch, skipped = _prefill(runner, SkipOptions(method="spts", min_prompt_len=10, start_layer=1, ratio=0.0))
    assert isinstance(batch.row_subsets, skipping.SkipPlan)
    assert torch.equal(dense, skipped)


def test_skipped_tokens_pass_through_and_probes_stay_active(runner, monkeypatch):
    opts = SkipOptions(method="spts", min_prompt_len=10, start_layer=1, ratio=0.7, stages=2, probe_tokens=8,
                       blocks="both")
    seen = _spy_layers(monkeypatch)
    record = skipping._Segment.end_layer
    decisions = {}

    def spy_end(self, layer, attn_active, mlp_active):
        decisions[layer] = (attn_active.clone(), mlp_active.clone(), self.pruned.clone())
        record(self, layer, attn_active, mlp_active)

    monkeypatch.setattr(skipping._Segment, "end_layer", spy_end)
    _prefill(runner, opts)
    assert [i for i, _, _ in seen] == list(range(1, ARCH.num_layers))
    for i, before, after in seen:
        attn_active, mlp_active, pruned = decisions[i]
        both_skipped = torch.ones(100, dtype=torch.bool)
        both_skipped[attn_active] = False
        both_skipped[mlp_active] = False
        assert both_skipped.any()
        assert torch.equal(after[both_skipped], before[both_skipped])  # bit-identical pass-through
        assert not torch.equal(after[~both_skipped], before[~both_skipped])
        last = torch.arange(92, 100)
        assert torch.isin(last, attn_active).all() and torch.isin(last, mlp_active).all()
        assert not torch.isin(torch.nonzero(pruned).flatten(), torch.cat([attn_active, mlp_active])).any()
    # delayed pruning: after stage 0 (layers 1-3), up to the stage's ratio of the tokens skipped in at least half
    # of its 6 block decisions are pruned, the most skipped first
    skips = torch.zeros(100, dtype=torch.int32)
    for i in (1, 2, 3):
        for active in decisions[i][:2]:
            skips += ~torch.isin(torch.arange(100), active)
    pruned = decisions[4][2]
    assert pruned.any() and int(pruned.sum()) <= int(0.35 * 92) and (skips[pruned] >= 3).all()
    assert skips[~pruned].max() <= skips[pruned].min()


def test_recent_window_stays_active(runner, monkeypatch):
    """``recent`` keeps a chunk's last tokens active beyond the probes; the skip budget is a share of the rest."""
    opts = SkipOptions(method="spts", min_prompt_len=10, start_layer=1, ratio=0.8, probe_tokens=4, recent=30)
    decisions = {}
    record = skipping._Segment.end_layer

    def spy_end(self, layer, attn_active, mlp_active):
        decisions[layer] = attn_active.clone()
        record(self, layer, attn_active, mlp_active)

    monkeypatch.setattr(skipping._Segment, "end_layer", spy_end)
    _prefill(runner, opts)
    ratios = skipping.layer_ratios(opts, ARCH.num_layers)
    for i, active in decisions.items():
        assert torch.isin(torch.arange(70, 100), active).all()
        assert 100 - len(active) == int(ratios[i] * 70)


def test_attention_probe_is_the_mean_causal_attention_of_the_probes():
    """Against a brute-force loop: probe i (at n - r + i), query head h (kv head h // group) attends causally
    over the keys not hidden; a key's importance is its probability averaged over heads and probes."""
    g = torch.Generator().manual_seed(2)
    r, n, hq, hkv, d, scale = 5, 20, 6, 2, 8, 0.35
    q, k = torch.randn(r, hq, d, generator=g), torch.randn(n, hkv, d, generator=g)
    hidden = torch.zeros(n, dtype=torch.bool)
    hidden[[1, 7]] = True
    for hid in (None, hidden):
        want = torch.zeros(n)
        for i in range(r):
            for h in range(hq):
                logits = k[:, h // (hq // hkv)] @ q[i, h] * scale
                unseen = torch.arange(n) > n - r + i
                if hid is not None:
                    unseen |= hid
                want += torch.softmax(logits.masked_fill(unseen, float("-inf")), -1) / (r * hq)
        got = skipping.probe_attention(q, k, scale, hid)
        torch.testing.assert_close(got, want)
        assert torch.isclose(got.sum(), torch.tensor(1.0))
        assert hid is None or (got[hidden] == 0).all()


def test_mlp_probe_is_the_mlp_on_its_heaviest_neurons():
    from sift.models.layers import GatedMLP
    g = torch.Generator().manual_seed(3)
    mlp = GatedMLP(8, 12).to_empty(device="cpu")
    for p in mlp.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g))
    mlp.down_proj.weight.data[:, [2, 7, 9]] *= 100  # the three heaviest neurons
    gate_up, down = mlp.heavy_neurons(3)
    torch.testing.assert_close(down, mlp.down_proj.weight[:, [2, 7, 9]])
    torch.testing.assert_close(gate_up, mlp.gate_up_proj.weight[[2, 7, 9, 14, 19, 21]])
    x, h = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    full = mlp.relative_update(x, h, 12)  # every neuron: the true relative update
    torch.testing.assert_close(full, mlp(x).norm(dim=-1) / h.norm(dim=-1))


PRUNING = SkipOptions(method="spts", min_prompt_len=10, start_layer=1, ratio=0.7, stages=2, probe_tokens=8)


def _masked_attention(q, k_cache, v_cache, visible, q_pos, scale):
    """Reference: softmax attention of queries at kv indices q_pos over the visible keys at or before them."""
    idx = torch.nonzero(visible).flatten()
    k = k_cache[idx].repeat_interleave(q.shape[1] // k_cache.shape[1], dim=1)  # [L, Hq, D]
    v = v_cache[idx].repeat_interleave(q.shape[1] // k_cache.shape[1], dim=1)
    logits = torch.einsum("qhd,khd->hqk", q, k) * scale
    logits = logits.masked_fill(idx[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(logits, dim=-1), v)


@pytest.mark.parametrize("masked_cost", [0.0, 1e9], ids=["tiled", "placed"])
def test_pruned_tokens_leave_later_layers_kv_reads(runner, monkeypatch, masked_cost):
    """Delayed pruning drops a pruned token from what later layers read: in the rest of the prefill (active
    queries' attention == masked softmax over the unpruned keys, both ways of computing it) and in decode
    (the step reads a slot list without the pruned tokens from the pruning layer on)."""
    calls = []
    real = skipping._Segment.attention

    def spy(self, layer, q, k_cache, v_cache, local, scale):
        out = real(self, layer, q, k_cache, v_cache, local, scale)
        calls.append((layer, self.prune_layer.clone(), q.clone(), k_cache[:self.kv_len].clone(),
                      v_cache[:self.kv_len].clone(), self.q_pos[local].clone(), scale, out))
        return out

    monkeypatch.setattr(skipping, "QUERY_TILE", 16)  # several query tiles
    monkeypatch.setattr(skipping, "MASKED_COST", masked_cost)
    monkeypatch.setattr(skipping._Segment, "attention", spy)
    req = Request("r", list(torch.randint(0, 64, (100,), generator=torch.Generator().manual_seed(4)).tolist()),
                  SamplingParams(max_tokens=4))
    _prefill(runner, PRUNING, req=req)
    prune = req.state_of(skipping.SkipState).prune_layer
    stage_end = min(skipping.stage_ends(PRUNING, ARCH.num_layers))
    assert set(prune.unique().tolist()) == {stage_end + 1, ARCH.num_layers}  # pruned after stage 0, else never
    assert (prune[-PRUNING.probe_tokens:] == ARCH.num_layers).all()
    for layer, pl, q, k, v, q_pos, scale, out in calls:
        visible = pl > layer
        assert visible[q_pos].all()  # an active query is never a pruned token
        torch.testing.assert_close(out, _masked_attention(q, k, v, visible, q_pos, scale))
    assert any(not (pl > layer).all() for layer, pl, *_ in calls)  # some prefill layer read fewer keys

    seen = {}
    real_decode = ref.sparse_decode

    def spy_decode(q, k_cache, v_cache, slots, scale):
        seen.setdefault("slots", []).append(slots.clone())
        return real_decode(q, k_cache, v_cache, slots, scale)

    monkeypatch.setattr(ref, "sparse_decode", spy_decode)
    batch, _ = _decode(runner, req)
    reads = batch.attn.sparse
    assert reads is not None and reads.policies[0].name == "pruned"
    assert len(seen["slots"]) == ARCH.num_layers - (stage_end + 1)  # the pruned layers read slot lists
    want = torch.cat([torch.nonzero(prune == ARCH.num_layers).flatten(), torch.tensor([100])])
    for slots in seen["slots"]:
        assert torch.equal(slots[0, 0][slots[0, 0] >= 0], want) and torch.equal(slots[0, 0], slots[0, 1])


def test_tokens_pruned_by_attention_skip_that_layers_mlp(runner, monkeypatch):
    """Skipping attention only, a token pruned at a layer's end passes the whole layer through: nothing reads
    its MLP update (its later K/V is never computed); the tokens still in play get theirs."""
    opts = SkipOptions(method="spts", min_prompt_len=10, start_layer=1, ratio=0.8, probe_tokens=8)
    seen = _spy_layers(monkeypatch)
    req = Request("r", [i * 7 % 64 for i in range(100)], SamplingParams(max_tokens=4))
    _prefill(runner, opts, req=req)
    # num_layers: never pruned (the last layer prunes nothing)
    prune = req.state_of(skipping.SkipState).prune_layer.long()
    for i, before, after in seen[:-1]:
        gone = prune <= i + 1  # pruned here or before
        assert (prune == i + 1).any() and torch.equal(after[gone], before[gone])
        assert (after[~gone] != before[~gone]).any(dim=-1).all()


def test_pruned_reads_only_for_requests_that_read_plainly(runner):
    from sift.server.options import EvictionOptions
    from sift.server.policies.eviction import Eviction
    req = Request("r", [i % 64 for i in range(100)], SamplingParams(max_tokens=4))
    _prefill(runner, PRUNING, req=req)
    assert req.state_of(skipping.SkipState).pruned_reads(req, ARCH.num_layers) is not None
    req = Request("e", [i % 64 for i in range(100)], SamplingParams(max_tokens=4))
    _prefill(runner, PRUNING, req=req)
    evicting = Eviction(EvictionOptions(method="h2o"), ARCH.num_layers, ARCH.num_kv_heads, kv=None)
    evicting.on_admit(req)  # an eviction policy scores (and compacts) the full KV
    assert req.state_of(skipping.SkipState).pruned_reads(req, ARCH.num_layers) is None


def test_each_architecture_runs_skipping_or_refuses_it():
    """Llama, Qwen3, Phi-3 run skipping; a windowed or soft-capped model (Gemma) refuses it, and a mixture of
    experts refuses MLP skipping (no low-rank probe): the engine turns the reason into a 400 at admission."""
    from sift.models.registry import model_class

    for name in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM"):
        arch = replace(ARCH, architecture=name)
        model = model_class(arch)(arch)
        assert model.token_skipping_unsupported("both") is None
    gemma = replace(ARCH, architecture="Gemma2ForCausalLM", layer_windows=(16, 0) * 3, attn_softcap=50.0)
    assert "sliding-window" in model_class(gemma)(gemma).token_skipping_unsupported("attention")
    moe = replace(ARCH, architecture="Qwen3MoeForCausalLM", num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=16, moe_layers=(1, 3))
    model = model_class(moe)(moe)
    assert model.token_skipping_unsupported("attention") is None
    assert "gated MLP" in model.token_skipping_unsupported("mlp")
