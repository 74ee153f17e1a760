"""Sparse decode selections against brute-force oracles on the embedded model, at budgets well below the
context (48-64 of a 330-token context), so a wrong ranking cannot hide behind "every token kept".

The backend is wrapped at its kernel boundary: every decode layer's query and key cache (what attention
sees) and every sparse read's slot list. From those the test recomputes, in float64 and without the
policies' code, what each method must read:

* tidal: the selection layer's dense attention of the current query (softmax per query head, summed over
  each kv head's group) ranks the earlier tokens; every later layer up to the next selection reads the
  current token, the kept first/latest tokens and the top of the rest, budget in all;
* quest: per kv head the pages of highest bound max over the group of sum_i max(q_i min_i, q_i max_i)
  (key extrema of the page's written keys), the current page always read, budget // block_size pages;
* loki: each sparse layer's own top-budget by the low-rank sketch scores (the query and keys projected on
  the rank principal directions of the request's keys at its first sparse step; rank = head dim gives
  the exact scores).

"Top" is checked as an order, not a tie-break: every ranked pick scores at least every token (page) left
out, up to float noise.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from pydoc_data.topics import topics

from sift.server.engine.llm import LLM
from sift.server.engine.request import SamplingParams
from sift.server.options import SparsityOptions

CONTEXT = 330
MAX_TOKENS = 4
TOL = 1e-6  # float32 kernels against the float64 oracle, on probabilities summed over a group


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", num_blocks=600, max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def doc(llm):
    text = topics["assignment"] + topics["for"]
    ids = llm.tokenizer.encode(text, add_special_tokens=False)[:CONTEXT]
    assert len(ids) == CONTEXT
    return ids


class Recorder:
    """Wraps a backend's ``forward`` and ``sparse_decode``: per decode step of a lone request, per layer,
    the query [Hq, D], the request's keys [L, Hkv, D] (float64 copies) and the slot lists it read
    sparsely, mapped back to kv indices (None: the layer attended densely)."""

    def __init__(self, backend, monkeypatch):
        self.steps: list = []
        self._layer = None
        forward, sparse_decode = backend.forward, backend.sparse_decode

        def recording_forward(layer, q, k_cache, v_cache, meta, scale, **layer_kwargs):
            if q.shape[0] == 1 and meta.num_seqs == 1:  # one decode token of one request
                if layer == 0:
                    self.steps.append({})
                bs, kv_len = meta.block_size, meta.kv_lens_host[0]
                table = meta.block_tables[0].long()
                slots = table[torch.arange(kv_len) // bs] * bs + torch.arange(kv_len) % bs
                self.steps[-1][layer] = {"q": q[0].double(), "k": k_cache[slots].double(), "scale": scale,
                                         "slot_to_idx": {int(s): i for i, s in enumerate(slots.tolist())},
                                         "read": None}
                self._layer = layer
            try:
                return forward(layer, q, k_cache, v_cache, meta, scale, **layer_kwargs)
            finally:
                self._layer = None

        def recording_sparse_decode(q, k_cache, v_cache, slots, scale):
            if self._layer is not None:
                rec = self.steps[-1][self._layer]
                rec["read"] = [{rec["slot_to_idx"][s] for s in head.tolist() if s >= 0} for head in slots[0]]
            return sparse_decode(q, k_cache, v_cache, slots, scale)

        monkeypatch.setattr(backend, "forward", recording_forward)
        monkeypatch.setattr(backend, "sparse_decode", recording_sparse_decode)


def _generate(llm, doc, opts, monkeypatch) -> list:
    rec = Recorder(llm.engine.backend, monkeypatch)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, sparsity=opts)
    out = llm.generate([doc], params)[0]
    assert len(out.token_ids) == MAX_TOKENS
    num_layers = len(llm.engine.runner.kv_caches)
    steps = [s for s in rec.steps if len(s) == num_layers]
    assert len(steps) == MAX_TOKENS - 1, "every decode step after the first token must be recorded"
    return steps


def _probs(rec) -> torch.Tensor:
    """Dense decode attention [Hkv, L]: softmax per query head, summed over each kv head's group."""
    q, k = rec["q"], rec["k"]
    hkv, d = k.shape[1], k.shape[2]
    logits = torch.einsum("hgd,lhd->hgl", q.view(hkv, -1, d), k) * rec["scale"]
    return torch.softmax(logits, dim=-1).sum(1)


def _sketch_probs(rec, basis: torch.Tensor) -> torch.Tensor:
    """Loki's approximate attention [Hkv, L]: query and keys projected on ``basis`` [Hkv, D, r]."""
    q, k = rec["q"], rec["k"]
    hkv, d = k.shape[1], k.shape[2]
    qs = torch.einsum("hgd,hdr->hgr", q.view(hkv, -1, d), basis)
    ks = torch.einsum("lhd,hdr->lhr", k, basis)
    return torch.softmax(torch.einsum("hgr,lhr->hgl", qs, ks) * rec["scale"], dim=-1).sum(1)


def _basis(k: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` principal directions of keys [L, Hkv, D] per kv head (uncentred)."""
    _, vectors = torch.linalg.eigh(torch.einsum("lhd,lhe->hde", k, k))
    return vectors.flip(-1)[..., :rank]


def check_token_topk(read: set, scores: torch.Tensor, budget: int, sinks: int, recent: int, tol: float = TOL):
    """``read`` (kv indices) is the current token, the kept first ``sinks`` and latest ``recent`` earlier
    tokens, and the highest ``scores`` [L] of the rest, ``budget`` tokens in all."""
    length = scores.numel()
    cur = length - 1
    kept = {i for i in range(cur) if i < sinks or i >= cur - recent}
    assert len(kept) < budget - 1, "the test needs ranked picks"
    assert len(read) == min(budget, length), f"read {len(read)} tokens, budget {budget}"
    assert cur in read and kept <= read, "the current token and the kept tokens are always read"
    ranked = sorted(read - kept - {cur})
    left_out = sorted(set(range(cur)) - read)
    assert ranked and left_out
    lowest_in, highest_out = scores[ranked].min().item(), scores[left_out].max().item()
    assert lowest_in >= highest_out - tol, (
        f"not the top-{budget}: a read token scores {lowest_in:.6g}, a skipped one {highest_out:.6g}")


def check_top_pages(read: set, bounds: torch.Tensor, length: int, budget: int, block_size: int):
    """``read`` is every written token of the budget // block_size pages of highest ``bounds`` [P], the
    current token's page always among them."""
    pages = {i // block_size for i in read}
    num_pages = bounds.numel()
    assert read == {i for p in pages for i in range(p * block_size, min((p + 1) * block_size, length))}
    assert len(pages) == min(max(budget // block_size, 1), num_pages)
    assert num_pages - 1 in pages, "the current page is always read"
    ranked = sorted(pages - {num_pages - 1})
    left_out = sorted(set(range(num_pages)) - pages)
    assert ranked and left_out
    lowest_in, highest_out = bounds[ranked].min().item(), bounds[left_out].max().item()
    assert lowest_in >= highest_out - 1e-4, (
        f"not the top pages: a read page bounds {lowest_in:.6g}, a skipped one {highest_out:.6g}")


@pytest.mark.parametrize("budget,sinks,recent", [(48, 0, 0), (64, 4, 32)])
def test_tidal_reads_the_top_k_of_the_selection_layer(llm, doc, monkeypatch, budget, sinks, recent):
    sel, resel = 2, 15
    opts = SparsityOptions(method="tidal", budget=budget, sinks=sinks, recent=recent, selection_layer=sel,
                           reselection_layer=resel)
    for step in _generate(llm, doc, opts, monkeypatch):
        for layer, rec in step.items():
            if layer <= sel or layer == resel:
                assert rec["read"] is None, f"layer {layer} attends densely"
                continue
            source = step[sel if layer < resel else resel]  # the selection this layer reads
            scores = _probs(source)
            for head, read in enumerate(rec["read"]):
                check_token_topk(read, scores[head], budget, sinks, recent)


@pytest.mark.parametrize("budget", [48, 64])
def test_quest_reads_the_pages_of_highest_bound(llm, doc, monkeypatch, budget):
    bs = llm.engine.kv.block_size
    steps = _generate(llm, doc, SparsityOptions(method="quest", budget=budget), monkeypatch)
    for step in steps:
        for layer, rec in step.items():
            if layer < 2:
                assert rec["read"] is None, f"layer {layer} attends densely"
                continue
            q, k = rec["q"], rec["k"]
            length, hkv, d = k.shape
            pages = [k[p:p + bs] for p in range(0, length, bs)]
            lo = torch.stack([x.amin(0) for x in pages])  # [P, Hkv, D]
            hi = torch.stack([x.amax(0) for x in pages])
            qg = q.view(1, hkv, -1, d)
            bounds = torch.maximum(qg * lo[:, :, None], qg * hi[:, :, None]).sum(-1).amax(-1)  # [P, Hkv]
            for head, read in enumerate(rec["read"]):
                check_top_pages(read, bounds[:, head], length, budget, bs)


@pytest.mark.parametrize("budget,sinks,recent,rank", [(48, 0, 0, 64), (64, 4, 32, 8)])
def test_loki_reads_the_sketch_top_k(llm, doc, monkeypatch, budget, sinks, recent, rank):
    opts = SparsityOptions(method="loki", budget=budget, sinks=sinks, recent=recent, rank=rank)
    steps = _generate(llm, doc, opts, monkeypatch)
    bases = {}  # layer -> basis fitted on the keys at the request's first sparse step
    for step in steps:
        for layer, rec in step.items():
            if layer < 2:
                assert rec["read"] is None, f"layer {layer} attends densely"
                continue
            if layer not in bases:
                bases[layer] = _basis(rec["k"], rank)
            scores = _sketch_probs(rec, bases[layer])
            tol = 2.0 ** -19  # the sketch scores are ranked rounded to 2^-20 (batch-invariant ties)
            for head, read in enumerate(rec["read"]):
                check_token_topk(read, scores[head], budget, sinks, recent, tol)


def test_tidal_rerank_reads_each_layers_top_of_the_selection(llm, doc, monkeypatch):
    """With ``candidates`` C > budget the selection layer keeps C tokens (kept ones included) and every
    sparse layer reads the budget of them its own query attends to most (softmax over the candidates,
    summed over the group), the current and kept tokens always among them."""
    sel, resel, budget, cands, sinks, recent = 2, 15, 32, 96, 4, 8
    opts = SparsityOptions(method="tidal", budget=budget, candidates=cands, sinks=sinks, recent=recent,
                           selection_layer=sel, reselection_layer=resel)
    for step in _generate(llm, doc, opts, monkeypatch):
        for layer, rec in step.items():
            if layer <= sel or layer == resel:
                assert rec["read"] is None, f"layer {layer} attends densely"
                continue
            source = _probs(step[sel if layer < resel else resel])  # [Hkv, L]
            length = source.shape[1]
            cur = length - 1
            kept = {i for i in range(cur) if i < sinks or i >= cur - recent} | {cur}
            q, k = rec["q"], rec["k"]
            hkv, d = k.shape[1], k.shape[2]
            for head, read in enumerate(rec["read"]):
                rest = sorted(set(range(cur)) - kept, key=lambda i: (-source[head, i].item(), i))
                candidates = sorted(kept | set(rest[:cands - len(kept)]))
                logits = torch.einsum("gd,cd->gc", q.view(hkv, -1, d)[head], k[candidates, head]) * rec["scale"]
                own = torch.zeros(length, dtype=torch.float64)
                own[candidates] = torch.softmax(logits, dim=-1).sum(0)
                assert read <= set(candidates), f"layer {layer} read tokens outside the selection's candidates"
                assert len(read) == budget and kept <= read
                ranked, left_out = sorted(read - kept), sorted(set(candidates) - read)
                lowest_in, highest_out = own[ranked].min().item(), own[left_out].max().item()
                assert lowest_in >= highest_out - 2.0 ** -19, (
                    f"layer {layer}: not its own top-{budget} of the candidates ({lowest_in:.6g} < {highest_out:.6g})")
