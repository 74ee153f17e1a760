"""Drafters' bookkeeping without a model: prompt lookup, the Token Recycling table, GOOSE trees."""
import random

import numpy as np

from spec_trees import check_bfs
from sift.server.spec.drafters import GooseDrafter, NgramDrafter, NgramIndex, RecyclingDrafter, RecyclingTable
from sift.server.spec.tree import depths


def _brute_continuation(tokens, budget):
    for n in (3, 2, 1):
        if len(tokens) < n:
            continue
        key = tokens[-n:]
        for end in range(len(tokens) - 2, n - 2, -1):
            if tokens[end - n + 1:end + 1] == key:
                return tokens[end + 1:end + 1 + budget]
    return []


def test_ngram_index_matches_brute_force_incrementally():
    rng = random.Random(0)
    tokens = [rng.randrange(6) for _ in range(5)]
    index = NgramIndex()
    for _ in range(200):
        assert index.continuation(list(tokens), 5) == _brute_continuation(tokens, 5)
        tokens.extend(rng.randrange(6) for _ in range(rng.randint(1, 3)))


def test_ngram_drafter_is_a_chain():
    tree = NgramDrafter().propose([1, 2, 3, 4, 1, 2, 3], 3)
    assert tree.tokens == (4, 1, 2) and tree.parents == (-1, 0, 1)


def test_recycling_table_update_and_candidates():
    table = RecyclingTable(10, 3)
    assert all(table.candidates(t) == [] for t in range(10))  # a new table knows no token
    table.update([4, 5], np.array([[1, 2, 3], [7, 8, 9]]))
    assert table.candidates(4) == [1, 2, 3] and table.candidates(5) == [7, 8, 9]
    tree = RecyclingDrafter(table).propose([0, 4], 12)
    check_bfs(tree.parents)
    assert tree.tokens[:3] == (1, 2, 3) and len(tree) == 3  # rows 1, 2, 3 are empty: no deeper nodes


def _full_table(vocab=40, seed=0):
    rng = np.random.default_rng(seed)
    table = RecyclingTable(vocab)
    for t in range(vocab):
        table.update([t], rng.permutation(vocab)[None, :8])
    return table


def test_goose_spine_with_branches_under_budget():
    table = _full_table()
    tokens = [1, 2, 3, 9, 8, 7, 6, 5, 1, 2, 3]
    drafter = GooseDrafter(table)
    tree = drafter.propose(tokens, 24)
    check_bfs(tree.parents)
    assert len(tree) == 24
    d = depths(tree.parents)
    # the spine (the prompt-lookup continuation) is a chain from the root, first child at each level
    cont = _brute_continuation(tokens, 24)
    node, spine_nodes = -1, []
    for want in cont:
        kids = [i for i, p in enumerate(tree.parents) if p == node]
        if not kids or tree.tokens[kids[0]] != want:
            break
        node = kids[0]
        spine_nodes.append(node)
    assert len(spine_nodes) >= 5
    assert max(d) >= 5 and sum(1 for p in tree.parents if p == -1) > 1  # deep and branched
    flat = [tokens[-1], *tree.tokens]
    for i, p in enumerate(tree.parents):  # every other node is a TR candidate of its parent
        if i not in spine_nodes:
            assert tree.tokens[i] in table.candidates(flat[p + 1])


def test_goose_falls_back_to_pure_sources():
    table = _full_table()
    no_match = GooseDrafter(table).propose([11, 12, 13], 10)
    flat = [13, *no_match.tokens]
    assert len(no_match) == 10
    assert all(t in table.candidates(flat[p + 1]) for t, p in zip(no_match.tokens, no_match.parents))
    chain = GooseDrafter(RecyclingTable(40)).propose([1, 2, 3, 4, 1, 2], 5)
    assert chain.tokens == (3, 4, 1, 2) and chain.parents == (-1, 0, 1, 2)


def _taken_before(tree, c):
    """The nodes of ``tree`` with rank < c, re-indexed (breadth-first order kept)."""
    keep = [i for i, r in enumerate(tree.ranks()) if r < c]
    index = {i: j for j, i in enumerate(keep)}
    return [tree.tokens[i] for i in keep], [-1 if tree.parents[i] < 0 else index[tree.parents[i]] for i in keep]


def test_a_smaller_budget_drafts_the_nodes_ranked_below_it():
    """Every drafter takes nodes in a budget-independent order: the tree of budget c is the nodes of rank < c
    of any larger budget's tree (what lets one verified tree teach the budget rule about smaller budgets)."""
    table = _full_table()
    tokens = [1, 2, 3, 9, 8, 7, 6, 5, 1, 2, 3]
    for drafter in (NgramDrafter(), RecyclingDrafter(table), GooseDrafter(table)):
        big = drafter.propose(tokens, 63)
        assert sorted(big.ranks()) == list(range(len(big)))
        for c in (1, 3, 7, 15, 31):
            small = drafter.propose(tokens, c)
            assert (list(small.tokens), list(small.parents)) == _taken_before(big, c)
            flat = [-1, *big.ranks()]
            assert all(flat[p + 1] < r for p, r in zip(big.parents, big.ranks()))  # a parent ranks first
