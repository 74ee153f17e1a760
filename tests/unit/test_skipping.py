"""Probe-and-Skip on a tiny random Llama: the staged schedule, the probes' guarantees, bit-identical
pass-through of skipped tokens, and ratio 0 == no skipping."""
import pytest
import torch

from kernels.backend import TorchBackend
from models.llama import LlamaForCausalLM
from models.registry import ArchConfig
from server.engine.outputs import ScheduledRequest, SchedulerOutput
from server.engine.request import Request, SamplingParams, SkipOptions
from server.policies import skipping
from server.runner.model_runner import ModelRunner

ARCH = ArchConfig("LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=6,
                  num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=512, tie_word_embeddings=True)


def test_staged_ratios_rise_with_depth():
    opts = SkipOptions(method="spts", start_layer=2, ratio=0.6, stages=3)
    ratios = skipping.layer_ratios(opts, 8)
    assert ratios[:2] == [0.0, 0.0] and ratios == sorted(ratios) and ratios[-1] == pytest.approx(0.6)
    assert len(set(ratios[2:])) == 3 and skipping.stage_ends(opts, 8) == {3, 5}


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


def _prefill(runner, opts, n=100):
    req = Request("r", list(torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(1)).tolist()),
                  SamplingParams(max_tokens=1))
    if opts is not None:
        req.state["skipping"] = opts
    sched = SchedulerOutput(requests=[ScheduledRequest("r", req.prompt_token_ids, list(range(n)), list(range(n)),
                                                       list(range(-(-n // 16))), n, True)])
    batch = runner.build_batch(sched, {"r": req})
    return batch, runner.model(batch)


def test_ratio_zero_is_identical_to_no_skipping(runner):
    _, dense = _prefill(runner, None)
    batch, skipped = _prefill(runner, SkipOptions(method="spts", min_prompt_len=10, start_layer=1, ratio=0.0))
    assert "skip" in batch.extras
    assert torch.equal(dense, skipped)


def test_skipped_tokens_pass_through_and_probes_stay_active(runner, monkeypatch):
    opts = SkipOptions(method="spts", min_prompt_len=10, start_layer=1, ratio=0.7, stages=2, probe_tokens=8)
    seen = []
    real_layer = skipping.SkipPlan._layer

    def spy(self, i, layer, h, cos, sin, batch, ops):
        before = h.clone()
        after = real_layer(self, i, layer, h, cos, sin, batch, ops)
        seen.append((i, before, after.clone()))
        return after

    record = skipping._Segment.end_layer
    decisions = {}

    def spy_end(self, layer, attn_active, mlp_active):
        decisions[layer] = (attn_active.clone(), mlp_active.clone(), self.pruned.clone())
        record(self, layer, attn_active, mlp_active)

    monkeypatch.setattr(skipping.SkipPlan, "_layer", spy)
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
    # delayed pruning: after stage 0 (layers 1-3) exactly the tokens skipped by both blocks in all of it are pruned
    stage0 = torch.ones(100, dtype=torch.bool)
    for i in (1, 2, 3):
        stage0[decisions[i][0]] = False
        stage0[decisions[i][1]] = False
    assert torch.equal(decisions[4][2], stage0)


def test_attention_probe_is_a_distribution():
    g = torch.Generator().manual_seed(2)
    imp = skipping.probe_attention(torch.randn(4, 6, 8, generator=g), torch.randn(20, 2, 8, generator=g), 0.35)
    assert imp.shape == (20,) and torch.isclose(imp.sum(), torch.tensor(1.0))


def test_low_rank_is_the_truncated_svd():
    g = torch.Generator().manual_seed(3)
    for shape in ((40, 12), (12, 40)):
        w = torch.randn(*shape, generator=g)
        a, b = skipping.low_rank(w, 5)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        torch.testing.assert_close(a @ b, (u[:, :5] * s[:5]) @ vh[:5])
