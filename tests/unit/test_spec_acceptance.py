"""Tree verification on synthetic target distributions: greedy walk, lossless sampling (chi-square),
LANTERN relaxation, and Token Recycling's table refresh (no model)."""
import random

import numpy as np
import pytest
import torch

from spec_trees import random_parents
from sift.server.engine.outputs import ScheduledRequest
from sift.server.engine.request import Request, SamplingParams
from sift.server.options import SpecConfig, SpecOptions
from sift.server.spec import Speculator
from sift.server.spec.verify import TreeInput, relaxed_distribution, verify_trees

GREEDY = SamplingParams(temperature=0.0)
SAMPLE = SamplingParams(temperature=1.0)
CHI2_999 = {2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}  # chi-square critical values at p = 0.001


def _tree_input(logits_row, tokens, parents, params, seed=0, **relax):
    gen = torch.Generator().manual_seed(seed)
    return TreeInput(logits_row, tokens, parents, params, gen, **relax)


def test_greedy_accepts_the_argmax_path():
    torch.manual_seed(0)
    v = 12
    tokens = [0, 3, 4, 5, 6, 7]  # root, then drafts
    parents = [-1, -1, 1, 1, 2]
    logits = torch.randn(len(tokens), v)
    logits[0, 4] = 9.0  # root -> draft 1 (token 4) is the argmax
    logits[2, 6] = 9.0  # node of token 4 -> draft 3 (token 6)
    logits[4, 1] = 9.0  # node of token 6 -> bonus 1
    (v_,) = verify_trees(logits, [_tree_input(0, tokens, parents, GREEDY)])
    assert v_.nodes == [2, 4] and v_.tokens == [4, 6, 1] and v_.relaxed == 0


def _first_two(logits, trials, tree_tokens, parents, params, nearest=None, **relax):
    """Emitted tokens of ``trials`` independent verifications of one tree (every tree reads the same rows)."""
    trees = [_tree_input(0, tree_tokens, parents, params, seed=s, **relax) for s in range(trials)]
    out = verify_trees(logits, trees, nearest)
    return [v.tokens for v in out]


def _chi2(counts, probs):
    n = counts.sum()
    keep = probs > 0
    exp = probs[keep] * n
    return float(((counts[keep] - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


def test_lossless_sampling_chi_square():
    torch.manual_seed(1)
    v = 5
    logits = torch.randn(4, v) * 1.5
    tokens = [0, 1, 2, 3]  # root; children 1 and 2; node(1) has child 3
    parents = [-1, -1, 0]
    emitted = _first_two(logits, 4000, tokens, parents, SAMPLE)
    p = torch.softmax(logits, -1)
    first = np.bincount([e[0] for e in emitted], minlength=v)
    stat, df = _chi2(first, p[0].numpy())
    assert stat < CHI2_999[df]
    after_1 = np.bincount([e[1] for e in emitted if e[0] == 1], minlength=v)  # row 1 = node of token 1
    stat, df = _chi2(after_1, p[1].numpy())
    assert stat < CHI2_999[df]


def test_lossless_sampling_with_top_k_and_temperature():
    torch.manual_seed(2)
    v = 6
    logits = torch.randn(3, v)
    params = SamplingParams(temperature=0.7, top_k=3)
    emitted = _first_two(logits, 3000, [0, 4, 5], [-1, -1], params)
    from sift.server.spec.verify import target_probs
    p = target_probs(logits, params)[0].numpy()
    first = np.bincount([e[0] for e in emitted], minlength=v)
    assert first[p == 0].sum() == 0
    stat, df = _chi2(first, p)
    assert stat < CHI2_999[df]


def _neighbours(v, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.stack([torch.randperm(v, generator=g) for _ in range(v)])
    out = []
    for x in range(v):
        row = [int(t) for t in table[x] if t != x][:k]
        out.append(row)
    return torch.tensor(out, dtype=torch.int32)


@pytest.mark.parametrize("lam", [0.0, 3.0])
def test_relaxed_distribution_moves_bounded_mass(lam):
    torch.manual_seed(3)
    v, k = 30, 8
    nearest = _neighbours(v, k)
    for trial in range(50):
        p = torch.softmax(torch.randn(v) * 2, -1)
        x = trial % v
        prev = None
        for delta in (0.0, 0.01, 0.05, 0.1, 0.3, 1.0):
            pt = relaxed_distribution(p, x, nearest, k, delta, lam)
            tvd = 0.5 * float((pt - p).abs().sum())
            assert abs(float(pt.sum()) - 1) < 1e-5
            if lam > 0:
                assert float(pt[x]) <= lam * float(p[x]) + 1e-6
            else:
                assert tvd <= delta + 1e-6
                assert prev is None or float(pt[x]) >= prev - 1e-7  # acceptance non-decreasing in delta
                prev = float(pt[x])
        assert torch.equal(relaxed_distribution(p, x, nearest, 0, 0.5), p)


@pytest.mark.parametrize("greedy", [True, False])
def test_lantern_zero_delta_or_k_equals_strict(greedy):
    rng = random.Random(4)
    v = 16
    nearest = _neighbours(v, 8)
    params = GREEDY if greedy else SAMPLE
    for trial in range(30):
        n = rng.randint(1, 10)
        parents = random_parents(rng, n)
        tokens = [rng.randrange(v) for _ in range(n + 1)]
        logits = torch.randn(n + 1, v, generator=torch.Generator().manual_seed(trial)) * 2
        strict = verify_trees(logits, [_tree_input(0, tokens, parents, params, seed=trial)])
        zero_d = verify_trees(logits, [_tree_input(0, tokens, parents, params, seed=trial, relax_k=8, delta=0.0)],
                              nearest)
        zero_k = verify_trees(logits, [_tree_input(0, tokens, parents, params, seed=trial, relax_k=0, delta=0.5)],
                              nearest)
        assert strict[0].tokens == zero_d[0].tokens == zero_k[0].tokens
        assert zero_d[0].relaxed == 0


def test_lantern_acceptance_non_decreasing_in_delta():
    rng = random.Random(5)
    v = 20
    nearest = _neighbours(v, 10)
    trees = []
    for trial in range(200):
        n = rng.randint(1, 8)
        trees.append((random_parents(rng, n), [rng.randrange(v) for _ in range(n + 1)],
                      torch.randn(n + 1, v, generator=torch.Generator().manual_seed(trial))))
    prev_first, prev_mean = None, None
    for delta in (0.0, 0.05, 0.1, 0.2, 0.5):
        verdicts = [verify_trees(lg, [_tree_input(0, tk, pa, GREEDY, relax_k=10, delta=delta)], nearest)[0]
                    for pa, tk, lg in trees]
        first = [bool(v_.nodes) for v_ in verdicts]  # one decision at the root: monotone tree by tree
        mean = float(np.mean([len(v_.nodes) for v_ in verdicts]))
        if prev_first is not None:
            assert all(a >= b for a, b in zip(first, prev_first))
            assert mean >= prev_mean
        prev_first, prev_mean = first, mean
    assert prev_mean > 0


def test_lantern_sampling_output_within_delta():
    torch.manual_seed(6)
    v, k, delta = 6, 5, 0.15
    nearest = _neighbours(v, k)
    logits = torch.randn(2, v)
    tokens, parents = [0, 2], [-1]
    emitted = _first_two(logits, 4000, tokens, parents, SAMPLE, nearest, relax_k=k, delta=delta)
    p = torch.softmax(logits, -1)[0]
    pt = relaxed_distribution(p, 2, nearest, k, delta).numpy()
    first = np.bincount([e[0] for e in emitted], minlength=v)
    stat, df = _chi2(first, pt)  # the output follows the relaxed distribution ...
    assert stat < CHI2_999[df]
    measured_tvd = 0.5 * np.abs(first / first.sum() - p.numpy()).sum()
    assert measured_tvd <= delta + 0.04  # ... which is within delta of the target


def test_recycling_table_rows_are_topk_of_every_tree_input():
    v = 50
    spec = Speculator(SpecConfig(), v)
    reqs, items, row = {}, [], 0
    torch.manual_seed(7)
    trees = [([10, 11, 12, 13], [-1, -1, 0]), ([20, 21, 22], [-1, 0])]
    for i, (tokens, parents) in enumerate(trees):
        req = Request(f"r{i}", [1, 2, tokens[0]], SamplingParams(temperature=0.0,
                                                                  speculative=SpecOptions("recycling")))
        spec.on_admit(req)
        reqs[req.request_id] = req
        s = ScheduledRequest(req.request_id, tokens, list(range(len(tokens))), list(range(len(tokens))), [0],
                             len(tokens), True, draft_parents=parents)
        items.append((s, row))
        row += len(tokens)
    logits = torch.randn(row, v)
    spec.verify(logits, items, reqs)
    flat = [t for tokens, _ in trees for t in tokens]
    for r, t in enumerate(flat):
        assert spec.shared_table.candidates(t) == logits[r].topk(8).indices.tolist()
    assert spec.stats([])["spec_num_drafts"] == 2 and spec.stats([])["spec_num_draft_tokens"] == 5


def test_recycling_table_learns_from_plain_decode_rows():
    """A step where a speculating request drafts nothing (budget 0) still writes its input token's row of M;
    a request that does not speculate, and a prefill chunk, write nothing."""
    v = 50
    spec = Speculator(SpecConfig(), v)
    reqs, items = {}, []
    cases = [("r0", [30], "recycling"), ("r1", [31], "none"), ("r2", [32, 33], "recycling")]  # r2: a chunk
    for row, (rid, tokens, method) in enumerate(cases):
        req = Request(rid, [1, 2, *tokens], SamplingParams(temperature=0.0, speculative=SpecOptions(method)))
        spec.on_admit(req)
        reqs[rid] = req
        s = ScheduledRequest(rid, tokens, list(range(len(tokens))), list(range(len(tokens))), [0], len(tokens), True)
        items.append((s, row))
    logits = torch.randn(len(cases), v)
    spec.learn_plain(logits, items, reqs)
    assert spec.shared_table.candidates(30) == logits[0].topk(8).indices.tolist()
    assert not spec.shared_table.candidates(31) and not spec.shared_table.candidates(33)


def test_plain_learning_rows_take_turns():
    """Past PLAIN_LEARN_ROWS speculating decodes, a step teaches the table that many rows, in turn (one while
    the budget rule coasts)."""
    from sift.server.spec import PLAIN_LEARN_ROWS

    v, n = 200, PLAIN_LEARN_ROWS + 3
    spec = Speculator(SpecConfig(), v)
    reqs, items = {}, []
    for row in range(n):
        req = Request(f"r{row}", [1, 100 + row], SamplingParams(temperature=0.0, speculative=SpecOptions("recycling")))
        spec.on_admit(req)
        reqs[req.request_id] = req
        items.append((ScheduledRequest(req.request_id, [100 + row], [1], [1], [0], 2, True), row))
    logits = torch.randn(n, v)
    spec.learn_plain(logits, items, reqs)
    assert [bool(spec.shared_table.candidates(100 + r)) for r in range(n)] == [r < PLAIN_LEARN_ROWS for r in range(n)]
    spec.learn_plain(logits, items, reqs)  # the next step starts where this one stopped
    assert all(spec.shared_table.candidates(100 + r) == logits[r].topk(8).indices.tolist() for r in range(n))
    spec.shared_table.m[:] = -1
    spec.controller.budget._coast = (16, 1 << 30)  # speculation clearly off (DraftBudget.coast): one row a step
    spec.learn_plain(logits, items, reqs)
    assert sum(bool(spec.shared_table.candidates(100 + r)) for r in range(n)) == 1


@pytest.mark.parametrize("seed", range(20))
def test_shadow_scoring_equals_greedy_verification(seed):
    """A shadow tree scored against the tokens the target emits (its PathWalk) accepts exactly the path
    greedy verification of the same tree accepts: random trees over a 6-token vocabulary, peaked logits so
    that paths go deep."""
    from sift.server.spec.tree import DraftTree, PathWalk

    def realized_path(tree, tokens):  # the walk's path once the tokens decide it, else None
        walk = PathWalk(tree)
        return walk.path if walk.feed(tokens) else None

    rng = random.Random(seed)
    n = rng.randint(0, 12)
    parents = random_parents(rng, n)
    tokens = [rng.randrange(6) for _ in range(n + 1)]
    logits = torch.randn(n + 1, 6) + 4 * torch.nn.functional.one_hot(torch.randint(0, 6, (n + 1,)), 6)
    (verdict,) = verify_trees(logits, [_tree_input(0, tokens, parents, GREEDY)])
    tree = DraftTree(tuple(tokens[1:]), tuple(parents))
    emitted = verdict.tokens  # the accepted drafts and the bonus token: what a plain decode emits too
    assert realized_path(tree, emitted) == [node - 1 for node in verdict.nodes]
    # fewer tokens than decide it: undecided while the path's end still has children
    path = realized_path(tree, emitted[:-1])
    assert path is None or path == [node - 1 for node in verdict.nodes]
