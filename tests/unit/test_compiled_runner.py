"""The compiled decode path's model-free parts: size buckets, the plain-step test, the no-compiler fallback.
Compiled == eager on the embedded model is tests/e2e/test_compiled.py (slow; bench/step.py times it)."""
import logging

import torch

from sift.kernels.backend import build_metadata
from sift.models.batch import ForwardBatch
from sift.server.runner import compiled


def test_buckets_double_to_32_then_step_by_16_up_to_max_num_seqs():
    assert compiled.decode_buckets(1) == (1,)
    assert compiled.decode_buckets(6) == (1, 2, 4, 6)
    assert compiled.decode_buckets(32) == (1, 2, 4, 8, 16, 24, 32)
    assert compiled.decode_buckets(70) == (1, 2, 4, 8, 16, 24, 32, 48, 64, 70)


def _batch(q_lens, **meta):
    n = sum(q_lens)
    attn = build_metadata(q_lens, [5] * len(q_lens), [[1]] * len(q_lens), list(range(n)), 16, "cpu", **meta)
    return ForwardBatch(input_ids=torch.zeros(n, dtype=torch.long), positions=torch.zeros(n, dtype=torch.long),
                        attn=attn, backend=None, kv_caches=[], logits_indices=torch.arange(len(q_lens)),
                        extras={"prompt_rows": {}})


def test_only_plain_decode_steps_take_the_compiled_path():
    c = compiled.CompiledDecode.__new__(compiled.CompiledDecode)
    c.buckets = (1, 2, 4)
    assert c.accepts(_batch([1, 1, 1]))
    assert not c.accepts(_batch([1] * 5))  # past the largest bucket
    assert not c.accepts(_batch([1, 3]))  # a prefill chunk
    assert not c.accepts(_batch([1, 1], window=[4, 0], sinks=[1, 0]))  # a request window (sparsity)
    assert not c.accepts(_batch([1, 1], score_layers=frozenset({2})))  # eviction scores
    assert not c.accepts(_batch([1, 1], tree_mask=torch.ones(2, 1, dtype=torch.bool)))  # a draft tree
    skipping = _batch([1, 1])
    skipping.row_subsets = object()
    assert not c.accepts(skipping)
    logprobs = _batch([1, 1])
    logprobs.extras["prompt_rows"] = {"r": (0, 1)}
    assert not c.accepts(logprobs)


def test_without_a_cxx_compiler_the_cpu_runs_eagerly_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="sift.runner"):
        assert compiled.compile_decode(None, [], 16, 512, 4, torch.device("cpu")) is None
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "C++ compiler" in caplog.text


def test_a_model_that_does_not_compile_whole_runs_eagerly_with_one_warning(caplog):
    class Breaks(torch.nn.Module):
        def forward(self, batch):
            torch._dynamo.graph_break()  # fullgraph=True refuses it
            return batch.input_ids.float()[:, None]

        def compute_logits(self, hidden):
            return hidden

    with caplog.at_level(logging.WARNING, logger="sift.runner"):
        assert compiled.compile_decode(Breaks(), [], 16, 64, 2, torch.device("cpu")) is None
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "running eagerly" in caplog.text
