"""Verification of a batch of draft trees: greedy, lossless speculative sampling, LANTERN relaxation.

For deterministic drafters the draft distribution q is one-hot, so lossless speculative sampling
accepts draft x with probability p(x); on rejection x is zeroed in the residual and the next
sibling is tried; when every child is rejected the bonus token is drawn from the residual, and
when a leaf is accepted it is drawn from the leaf's own distribution. Greedy accepts a child iff
it is its parent's argmax. LANTERN (opt-in, ``relaxed_k > 0``) first moves the probability of x's
nearest neighbours (input-embedding cosine similarity) onto x while the moved mass stays <= delta
(LANTERN) or <= (lambda - 1) p(x) (LANTERN++). The walk itself is :func:`sift.kernels.reference_spec.spec_verify`
on CPU and the Triton kernel :mod:`sift.kernels.spec_verify` on CUDA.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from sift.kernels import reference_spec
from sift.server.runner.sampler import draw, filter_logits, token_logprobs
from sift.server.spec.tree import children, depths

Tensor = torch.Tensor
logger = logging.getLogger("sift.spec")

MAX_NEIGHBOURS = 64  # neighbours kept per token; larger requested k is clipped to this


@dataclass
class Verdict:
    """One tree's outcome: flat node indices of the accepted path (root excluded), the emitted tokens
    (accepted drafts + bonus), their logprobs when asked, and how many accepts needed relaxation."""

    nodes: list
    tokens: list
    logprobs: list
    relaxed: int


@dataclass
class TreeInput:
    """One request's tree in the step's logits: rows ``row .. row + len(tokens)`` (root first)."""

    row: int
    tokens: list  # [root] + drafts
    parents: list  # per draft: draft index of the parent, -1 = root
    params: object  # SamplingParams
    generator: Optional[torch.Generator]
    relax_k: int = 0
    delta: float = 0.0
    lam: float = 0.0


def relaxed_distribution(p: Tensor, x: int, nearest: Tensor, k: int, delta: float, lam: float = 0.0) -> Tensor:
    """LANTERN's p~ for draft x (a copy): x's j nearest neighbours' mass moved onto x, j the largest
    with that mass <= delta (or <= (lam - 1) p(x) when lam > 0). Its TV distance to p is the moved mass."""
    out = p.clone()
    if k <= 0:
        return out
    nb = nearest[x, :k].long()
    cum = torch.cumsum(p[nb], 0)
    limit = (lam - 1.0) * float(p[x]) if lam > 0 else delta
    take = nb[cum <= limit]
    if take.numel():
        out[x] += cum[take.numel() - 1]
        out[take] = 0.0
    return out


def target_probs(logits: Tensor, params) -> Tensor:
    """The distribution a non-speculative step would sample from (temperature, top-k/p, min-p);
    softmax of the raw logits for greedy requests (what LANTERN's greedy rule compares)."""
    if params.greedy:
        return torch.softmax(logits, dim=-1)
    x = logits / params.temperature
    if params.top_k > 0 or params.top_p < 1 or params.min_p > 0:
        n = x.shape[0]
        x = filter_logits(x, torch.full((n,), params.top_k, device=x.device),
                    torch.full((n,), params.top_p, device=x.device, dtype=x.dtype),
                    torch.full((n,), params.min_p, device=x.device, dtype=x.dtype))
    return torch.softmax(x, dim=-1)


def verify_trees(logits: Tensor, trees: list, nearest: Optional[Tensor] = None) -> list:
    """logits: float32 [R, V] (rows of every tree node); one :class:`Verdict` per tree."""
    dev = logits.device
    n_total = sum(len(t.tokens) for t in trees)
    draft, first, count, roots, max_depth = [], [], [], [], 1
    for t in trees:
        base = len(draft)
        roots.append(base)
        draft.extend(t.tokens)
        fc, nc = children(t.parents)
        first.extend(base + f for f in fc)
        count.extend(nc)
        if t.parents:
            max_depth = max(max_depth, max(depths(t.parents)))
    rows = torch.tensor([t.row + j for t in trees for j in range(len(t.tokens))], dtype=torch.long, device=dev)
    node_logits = logits[rows]
    target = node_logits.argmax(dim=-1)
    need_probs = [t.relax_k > 0 or not t.params.greedy for t in trees]
    probs = None
    if any(need_probs) or dev.type == "cuda":
        probs = torch.zeros(n_total, logits.shape[1], dtype=torch.float32, device=dev)
        for t, r, need in zip(trees, roots, need_probs):
            if need:
                probs[r:r + len(t.tokens)] = target_probs(node_logits[r:r + len(t.tokens)], t.params)
    uniforms = torch.zeros(n_total, dtype=torch.float32)
    for t, r, need in zip(trees, roots, need_probs):
        if not t.params.greedy:
            uniforms[r:r + len(t.tokens)] = torch.rand(len(t.tokens), generator=t.generator)
    per_tree = dict(
        roots=torch.tensor(roots, dtype=torch.int32),
        greedy=torch.tensor([int(t.params.greedy) for t in trees], dtype=torch.int32),
        relax_k=torch.tensor([min(t.relax_k, MAX_NEIGHBOURS) for t in trees], dtype=torch.int32),
        delta=torch.tensor([t.delta for t in trees], dtype=torch.float32),
        lam=torch.tensor([t.lam for t in trees], dtype=torch.float32))
    args = (torch.tensor(draft), torch.tensor(first), torch.tensor(count), uniforms)
    if dev.type == "cuda":
        from sift.kernels.spec_verify import spec_verify as kernel
        out = kernel(probs, target, *(a.to(dev) for a in args), **{k: v.to(dev) for k, v in per_tree.items()},
                     nearest=nearest, max_depth=max_depth)
    else:
        out = reference_spec.spec_verify(probs, target.cpu(), *args, **per_tree, nearest=nearest, max_depth=max_depth)
    path, num_acc, last, relaxed = (o.tolist() for o in out)
    target_l = target.tolist()
    raw_lp = None
    if any(t.params.logprobs is not None for t in trees):
        raw_lp = torch.log_softmax(node_logits, dim=-1)
    verdicts = []
    for b, t in enumerate(trees):
        r = roots[b]
        nodes = path[b][1:1 + num_acc[b]]
        tokens = [draft[n] for n in nodes]
        leaf = last[b]
        if t.params.greedy:
            tokens.append(target_l[leaf])
        else:
            residual = probs[leaf]
            total = float(residual.sum())
            tokens.append(draw(residual / total, t.generator) if total > 0 else target_l[leaf])
        lps = []
        if t.params.logprobs is not None:
            parents = [r] + nodes  # the node whose row predicts each emitted token
            lps = [token_logprobs(raw_lp[n], tok, t.params.logprobs) for n, tok in zip(parents, tokens)]
        verdicts.append(Verdict([n - r for n in nodes], tokens, lps, relaxed[b]))
    return verdicts


# ----------------------------------------------------------------------------- neighbour table
def _cache_dir() -> Path:
    return Path(os.environ.get("SIFT_CACHE_DIR", Path.home() / ".cache" / "sift"))


def nearest_neighbours(embedding: Tensor, model_name: str, k: int = MAX_NEIGHBOURS) -> Tensor:
    """[V, k] int32: each token's k most cosine-similar other tokens by input embedding, most similar
    first. Computed once per model and cached on disk, keyed by the model name and a hash of the
    embedding matrix."""
    emb = embedding.detach().float()
    digest = hashlib.sha1(emb.cpu().numpy().tobytes()).hexdigest()[:16]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model_name)
    path = _cache_dir() / f"lantern-{safe}-{digest}-k{k}.pt"
    if path.exists():
        return torch.load(path)
    logger.info("computing the LANTERN neighbour table (%d tokens, k=%d) -> %s", emb.shape[0], k, path)
    unit = torch.nn.functional.normalize(emb, dim=-1)
    out = torch.empty(emb.shape[0], k, dtype=torch.int32)
    chunk = 1024
    for s in range(0, emb.shape[0], chunk):
        sim = unit[s:s + chunk] @ unit.T
        sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])] = float("-inf")  # not itself
        out[s:s + chunk] = sim.topk(k, dim=-1).indices.to(torch.int32).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(out, tmp)
    tmp.replace(path)
    return out
