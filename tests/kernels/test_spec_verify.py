"""The Triton tree-verification kernel against its torch reference (greedy, sampling, LANTERN delta/lambda)."""
import random

import pytest
import torch

from sift.kernels import reference_spec
from sift.kernels.spec_verify import spec_verify


def _batch(seed, num_trees, vocab, k_max, greedy_mix, relax):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    draft, first, count, roots, max_depth = [], [], [], [], 1
    for _ in range(num_trees):
        n = rng.randint(0, 12)
        parents, lo = [], -1
        for i in range(n):
            lo = rng.randint(lo, i - 1)
            parents.append(lo)
        base = len(draft)
        roots.append(base)
        fc, nc = [0] * (n + 1), [0] * (n + 1)
        for i, p in enumerate(parents, start=1):
            if nc[p + 1] == 0:
                fc[p + 1] = i
            nc[p + 1] += 1
        first.extend(base + f for f in fc)
        count.extend(nc)
        # few distinct tokens so that drafts often hit the argmax
        draft.extend(rng.randrange(6) for _ in range(n + 1))
        depth, d = 0, {-1: 0}
        for i, p in enumerate(parents):
            d[i] = d[p] + 1
            depth = max(depth, d[i])
        max_depth = max(max_depth, depth)
    n_total = len(draft)
    logits = torch.randn(n_total, vocab, generator=g) * 2
    for node in range(n_total):  # make some child the argmax often, so that paths get deep
        if count[node] and rng.random() < 0.7:
            logits[node, draft[first[node] + rng.randrange(count[node])]] += 6.0
    probs = torch.softmax(logits, -1)
    nearest = torch.stack([torch.randperm(vocab, generator=g)[:k_max] for _ in range(vocab)]).to(torch.int32)
    per_tree = dict(
        roots=torch.tensor(roots, dtype=torch.int32),
        greedy=torch.tensor([int(rng.random() < greedy_mix) for _ in roots], dtype=torch.int32),
        relax_k=torch.tensor([rng.randint(0, k_max) if relax else 0 for _ in roots], dtype=torch.int32),
        delta=torch.tensor([rng.choice([0.0, 0.05, 0.2]) for _ in roots], dtype=torch.float32),
        lam=torch.tensor([rng.choice([0.0, 0.0, 4.0]) if relax else 0.0 for _ in roots], dtype=torch.float32))
    args = (probs, logits.argmax(-1), torch.tensor(draft), torch.tensor(first), torch.tensor(count),
            torch.rand(n_total, generator=g))
    return args, per_tree, nearest, max_depth


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("greedy_mix,relax", [(1.0, False), (0.0, False), (0.5, True)])
def test_spec_verify_matches_reference(device, seed, greedy_mix, relax):
    args, per_tree, nearest, max_depth = _batch(seed, 9, 40, 8, greedy_mix, relax)
    probs_ref = args[0].clone()
    expect = reference_spec.spec_verify(probs_ref, *args[1:], **per_tree, nearest=nearest, max_depth=max_depth)
    probs_dev = args[0].to(device)
    got = spec_verify(probs_dev, *(a.to(device) for a in args[1:]), **{k: v.to(device) for k, v in per_tree.items()},
                      nearest=nearest.to(device), max_depth=max_depth)
    for name, e, g in zip(("path", "num_accepted", "last", "relaxed"), expect, got):
        assert torch.equal(e, g.cpu()), name
    torch.testing.assert_close(probs_dev.cpu(), probs_ref)  # residuals written in place alike
    assert int(expect[1].sum()) > 0
