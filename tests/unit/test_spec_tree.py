"""Draft-tree shapes and masks, checked against brute force (no model)."""
import random

import numpy as np
import pytest

from spec_trees import check_bfs, random_parents
from sift.server.spec.tree import (RANK_PRIOR, ancestor_mask, best_first, children, depths, expand,
                              template)


def _ancestors(parents, i):
    out = {i}
    while i > 0:
        i = parents[i - 1] + 1
        out.add(i)
    return out


@pytest.mark.parametrize("seed", range(20))
def test_ancestor_mask_equals_brute_force(seed):
    rng = random.Random(seed)
    parents = random_parents(rng, rng.randint(0, 30))
    check_bfs(parents)
    mask = ancestor_mask(parents)
    n = len(parents) + 1
    brute = np.array([[j in _ancestors(parents, i) for j in range(n)] for i in range(n)])
    assert (mask == brute).all()
    d = depths(parents)
    assert all(d[i] == len(_ancestors(parents, i + 1)) - 1 for i in range(len(parents)))


def test_children_are_contiguous_ranges():
    parents = [-1, -1, -1, 0, 0, 2, 3, 3]
    first, count = children(parents)
    for node in range(len(parents) + 1):
        kids = [i + 1 for i, p in enumerate(parents) if p + 1 == node]
        assert kids == list(range(first[node], first[node] + count[node]))


@pytest.mark.parametrize("n", [1, 4, 16, 80])
def test_template_is_the_heaviest_prefix_closed_tree(n):
    paths = [p for p, _ in template(n)]
    assert len(paths) == n and len(set(paths)) == n
    assert all(p[:-1] in paths or len(p) == 1 for p in paths)
    weight = lambda p: float(np.prod([RANK_PRIOR[r] for r in p]))
    lightest_in = min(weight(p) for p in paths)
    frontier = [p + (r,) for p in list(paths) + [()] for r in range(len(RANK_PRIOR)) if p + (r,) not in paths]
    assert max(weight(p) for p in frontier) <= lightest_in + 1e-12
    assert [len(p) for p in paths] == sorted(len(p) for p in paths)  # breadth-first


def test_template_profile_wide_then_narrow():
    per_depth = np.bincount([len(p) for p, _ in template(80)])[1:]
    assert per_depth[0] >= 4 and per_depth[-1] < per_depth.max() and len(per_depth) >= 5


def test_expand_fills_from_candidates_and_drops_missing_subtrees():
    table = {5: [7, 8], 7: [9], 8: [], 9: [5, 6]}
    tree = expand(5, template(12), lambda t: table.get(t, []))
    check_bfs(tree.parents)
    flat = [5, *tree.tokens]
    for i, (tok, p) in enumerate(zip(tree.tokens, tree.parents)):
        assert tok in table[flat[p + 1]]
    assert set(tree.tokens) <= {7, 8, 9, 5, 6}
    assert tree.tokens[:2] == (7, 8)


def _heaviest_by_brute_force(factors, budget: int, width: int) -> tuple:
    """The ``budget`` heaviest nodes (label paths) of the infinite ``width``-ary tree whose edge factors
    (in (0, 1]) are ``factors(path)``: every node of weight >= a threshold, enumerated exhaustively (a
    node lighter than the threshold has no heavier descendant), the threshold halved until there are at
    least ``budget`` of them. Returns (paths heaviest first, weight of each enumerated path)."""
    threshold = 1.0
    while True:
        weight, stack = {}, [((), 1.0)]
        while stack:
            path, w = stack.pop()
            for r in range(width):
                child = path + (r,)
                cw = w * factors(child)
                if cw >= threshold:
                    weight[child] = cw
                    stack.append((child, cw))
        if len(weight) >= budget:
            return sorted(weight, key=weight.get, reverse=True)[:budget], weight
        threshold /= 2


@pytest.mark.parametrize("seed,budget", [(3, 10), (4, 1), (5, 25), (6, 40)])
def test_best_first_keeps_the_heaviest_nodes_breadth_first(seed, budget):
    rng = random.Random(seed)
    factors, width = {}, 3

    def factor(path):
        return factors.setdefault(path, rng.uniform(0.05, 0.9))

    def grow(path, token):
        for r in range(width):
            yield r, token * width + r, factor(path + (r,))

    tree = best_first(1, budget, grow)
    check_bfs(tree.parents)
    assert len(tree) == budget
    # each node's label path, from its token (token = parent token * width + label, the root is 1)
    paths = []
    for tok, parent in zip(tree.tokens, tree.parents):
        paths.append((paths[parent] if parent >= 0 else ()) + (tok % width,))
        assert tok // width == (tree.tokens[parent] if parent >= 0 else 1)
    heaviest, weight = _heaviest_by_brute_force(factor, budget, width)
    assert set(paths) == set(heaviest)  # the budget heaviest nodes, no other
    assert [len(p) for p in paths] == sorted(len(p) for p in paths)  # breadth-first
    first, count = children(list(tree.parents))
    for node in range(len(tree) + 1):  # siblings heaviest first
        kids = [weight[paths[i - 1]] for i in range(first[node], first[node] + count[node])]
        assert kids == sorted(kids, reverse=True)
    # each node's rank is its place in the heaviest-first order
    assert [heaviest.index(p) for p in paths] == list(tree.ranks())


def test_limit_depth_keeps_the_shallow_subtree():
    from sift.server.spec.tree import DraftTree, depths, limit_depth

    tree = DraftTree((10, 11, 12, 13, 14, 15), (-1, -1, 0, 0, 2, 4))  # depths 1 1 2 2 3 4
    cut = limit_depth(tree, 2)
    assert cut.tokens == (10, 11, 12, 13) and cut.parents == (-1, -1, 0, 0)
    cut3 = limit_depth(tree, 3)
    assert cut3.tokens == (10, 11, 12, 13, 14) and cut3.parents == (-1, -1, 0, 0, 2)
    assert max(depths(cut3.parents)) == 3
    assert limit_depth(tree, 4) is tree and len(limit_depth(tree, 0)) == 0
