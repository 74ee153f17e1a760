"""Real long text and what a model does with it, for the long-context benches: a haystack of prose no one
here wrote (CPython's ``pydoc_data.topics``), needle retrieval at a depth of it, teacher-forced perplexity
of a continuation, and hooks on the attention backend (the per-layer top-k bound, score capture).
:mod:`sift.bench.long_context` compares methods with them; :mod:`sift.bench.tidal_layers` measures layer choice.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch

NEEDLE = " The secret passphrase is {code}. Remember it."
QUESTION = "\n\nQuestion: What is the secret passphrase? Answer: The secret passphrase is"


def haystack(tokenizer, length: int) -> list:
    from pydoc_data.topics import topics

    ids = []
    for key in sorted(topics):
        ids.extend(tokenizer.encode(topics[key], add_special_tokens=False))
        if len(ids) >= length:
            return ids[:length]
    raise ValueError("pydoc topics are shorter than the requested haystack")


def needle_prompt(tokenizer, hay: list, depth: float, code: str) -> list:
    needle = tokenizer.encode(NEEDLE.format(code=code), add_special_tokens=False)
    cut = int(len(hay) * depth)
    return hay[:cut] + needle + hay[cut:] + tokenizer.encode(QUESTION, add_special_tokens=False)


def needle_hits(llm, hay: list, depths: list, sparsity, skipping) -> list:
    from sift.server.engine.request import SamplingParams

    hits = []
    for i, depth in enumerate(depths):
        code = f"{7391 + 1117 * i}"
        prompt = needle_prompt(llm.tokenizer, hay, depth, code)
        out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, sparsity=sparsity,
                                                     skipping=skipping))[0]
        hits.append(code in out.text)
    return hits


def forced_perplexity(llm, context: list, continuation: list, sparsity, skipping) -> float:
    """Perplexity of ``continuation`` decoded token by token after ``context`` (teacher forcing: each step's
    sampled token is replaced by the true one), so sparse decode layers are what is measured."""
    from sift.server.engine.request import SamplingParams

    eng = llm.engine
    nll, logits_rows = [], []
    model_logits, execute = eng.model.compute_logits, eng.runner.execute

    def capture(hidden):
        out = model_logits(hidden)
        logits_rows.append(out[-1])
        return out

    def forced(sched, requests):
        out = execute(sched, requests)
        if "p" in out.sampled:
            target = continuation[len(nll)]
            nll.append(-float(torch.log_softmax(logits_rows[-1].float(), -1)[target]))
            out.sampled["p"] = [target]
        return out

    eng.model.compute_logits, eng.runner.execute = capture, forced
    try:
        eng.add_request("p", context, SamplingParams(max_tokens=len(continuation), temperature=0.0,
                                                     ignore_eos=True, sparsity=sparsity, skipping=skipping))
        while eng.has_unfinished_requests():
            eng.step()
    finally:
        del eng.model.compute_logits, eng.runner.execute
    return math.exp(sum(nll) / len(nll))


@contextmanager
def attention_override(llm, forward):
    """While active, the backend's attention of every layer calls ``forward(dense, layer, q, k_cache, v_cache,
    meta, scale)`` instead, ``dense`` being the call it replaces."""
    backend = llm.engine.runner.backend
    dense = backend.dense_forward
    backend.dense_forward = lambda *args: forward(dense, *args)
    try:
        yield
    finally:
        del backend.dense_forward


@contextmanager
def oracle_topk(llm, budget: int, first: int = 2):
    """While active, every decode layer from ``first`` on makes TidalDecode's selection for itself: its own
    exact attention (per kv head, the group's summed probabilities) picks its top-(budget - 1) keys plus
    the current token, and it attends over those only. No selection that gives each layer ``budget`` keys
    of its own does better at keeping the attention mass, so this is the fidelity a per-layer token
    selection could reach at that budget; TidalDecode's loss beyond it comes from sharing one layer's
    selection with the layers after it. Every layer runs dense attention to select: a diagnostic, not a
    fast path."""
    from sift.kernels import reference as ref
    from sift.kernels.selection import topk_token_slots

    backend = llm.engine.runner.backend

    def forward(dense, layer, q, k_cache, v_cache, meta, scale):
        if layer < first or not meta.is_decode or meta.max_kv_len <= budget:
            return dense(layer, q, k_cache, v_cache, meta, scale)
        _, (scores, _) = backend.decode(q, k_cache, v_cache, meta, scale, emit=True)
        slots = ref.padded_slots(meta.block_tables, meta.kv_lens, meta.max_kv_len, meta.block_size)
        selected, _ = topk_token_slots(scores, slots, meta.kv_lens, torch.full_like(meta.kv_lens, budget))
        return backend.sparse_decode(q, k_cache, v_cache, selected, scale)

    with attention_override(llm, forward):
        yield
