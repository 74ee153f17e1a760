"""Draft trees: the static Token Recycling template, breadth-first expansion, ancestor masks, depths.

A draft tree is fed as ``[root] + tokens``: the root is the request's last accepted token (flat
index 0) and draft node ``i`` is flat index ``i + 1``; ``parents[i]`` is the *draft* index of node
i's parent, -1 for the root. Nodes are in breadth-first order (a parent always precedes its
children, and the children of one parent are contiguous and ordered by priority), which is what
the verifier and the KV compaction rely on.

Every drafter builds its tree by taking nodes in a fixed order of priority until the budget is spent,
and that order does not depend on the budget. ``DraftTree.rank`` keeps each node's place in it, so the
tree a smaller budget d would have built is the nodes of rank < d, and, under greedy verification, the
accepted path of that tree is the part of this tree's accepted path with rank < d (a node's rank exceeds
its parent's). One verified tree thus tells the draft budget what every smaller budget would have
accepted (:meth:`sift.server.spec.Speculator.verify`).

Template shape (the paper's 80-node template is not reproduced): each edge is labelled with the
rank r of the child among its parent's top-k candidates, and a path's prior weight is the product
of ``RANK_PRIOR[r]`` along it (a rank-r candidate of Token Recycling is accepted about that often).
The template of n nodes holds the n heaviest paths; a prefix weighs more than its extensions, so
they form a tree. This reproduces the paper's profile (wide near the root, thinning with depth).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Rough acceptance of a Token Recycling candidate by its rank in M[token] (8 ranks).
RANK_PRIOR = (0.55, 0.14, 0.07, 0.045, 0.03, 0.022, 0.017, 0.014)


@dataclass(frozen=True)
class DraftTree:
    """Draft tokens in breadth-first order, the draft index of each one's parent (-1 = root), and each
    node's rank in the order the drafter took it (see the module doc; empty = the breadth-first index)."""

    tokens: tuple
    parents: tuple
    rank: tuple = ()

    def ranks(self) -> tuple:
        return self.rank or tuple(range(len(self.tokens)))

    def __len__(self) -> int:
        return len(self.tokens)


EMPTY = DraftTree((), ())


class PathWalk:
    """The draft nodes (indices) a verification of ``tree`` accepts when the target's next tokens are the
    ones fed (:meth:`feed`, in order, over any number of calls): the path from the root whose tokens they
    are, to the first one no child of the path's end matches. Under greedy verification that is exactly the
    accepted path; under lossless sampling with siblings tried in turn, it has the accepted path's
    distribution (each level accepts a child with the summed probability of the children, the probability
    that the sampled token is one of them). Fed a few tokens a step, it does a step's work only."""

    def __init__(self, tree: DraftTree):
        self.tokens = tree.tokens
        self.first, self.count = children(tree.parents)
        self.path: list = []
        self.node = 0  # flat index of the path's end (0 = the root)
        self.done = not self.count[0]

    def feed(self, tokens) -> bool:
        """Follow ``tokens``; whether the path is decided (a token no child matches, or a leaf reached)."""
        for t in tokens:
            if self.done:
                break
            first = self.first[self.node]
            # siblings are contiguous and in priority order: the first match is the one tried first
            nxt = next((i for i in range(first, first + self.count[self.node]) if self.tokens[i - 1] == t), None)
            if nxt is None:
                self.done = True
            else:
                self.path.append(nxt - 1)
                self.node = nxt
                self.done = not self.count[nxt]
        return self.done


@lru_cache(maxsize=64)
def template(num_nodes: int, width: int = len(RANK_PRIOR)) -> tuple:
    """The ``num_nodes`` heaviest rank paths (tuples of child ranks) with the order they were taken in,
    ``(path, taken)`` pairs in breadth-first order of the paths."""
    heap = [(-RANK_PRIOR[r], (r,)) for r in range(width)]
    heapq.heapify(heap)
    chosen = []
    while heap and len(chosen) < num_nodes:
        neg_w, path = heapq.heappop(heap)
        chosen.append((path, len(chosen)))
        for r in range(width):
            heapq.heappush(heap, (neg_w * RANK_PRIOR[r], path + (r,)))
    return tuple(sorted(chosen, key=lambda p: (len(p[0]), p[0])))


def expand(root: int, paths: tuple, candidates) -> DraftTree:
    """Fill the ``(path, taken)`` pairs of :func:`template` breadth-first: a node's token is
    ``candidates(parent_token)[rank]``, its rank in the tree the order it was taken in.

    ``candidates(t)`` returns t's ranked next-token list (may be shorter than the rank, or empty);
    a node whose candidate is missing is dropped together with its subtree."""
    index = {(): -1}
    token_of = {(): root}
    tokens, parents, ranks = [], [], []
    for path, taken in paths:
        parent = path[:-1]
        if parent not in index:
            continue
        cand = candidates(token_of[parent])
        if path[-1] >= len(cand):
            continue
        index[path] = len(tokens)
        token_of[path] = cand[path[-1]]
        tokens.append(cand[path[-1]])
        parents.append(index[parent])
        ranks.append(taken)
    return DraftTree(tuple(tokens), tuple(parents), tuple(ranks))


def depths(parents) -> list:
    """Depth of each draft node (children of the root have depth 1)."""
    out = []
    for p in parents:
        out.append(1 if p < 0 else out[p] + 1)
    return out


def limit_depth(tree: DraftTree, max_depth: int) -> DraftTree:
    """The nodes of ``tree`` at depth <= ``max_depth``, re-indexed (breadth-first order is kept)."""
    if max_depth <= 0:
        return EMPTY
    d = depths(tree.parents)
    if max(d, default=0) <= max_depth:
        return tree
    index, tokens, parents, ranks = {}, [], [], []
    for i, (tok, par, rank) in enumerate(zip(tree.tokens, tree.parents, tree.ranks())):
        if d[i] <= max_depth:
            index[i] = len(tokens)
            tokens.append(tok)
            parents.append(-1 if par < 0 else index[par])
            ranks.append(rank)
    return DraftTree(tuple(tokens), tuple(parents), tuple(ranks))


def ancestor_mask(parents) -> np.ndarray:
    """Bool [n + 1, n + 1] over the flat tree (root first): row i sees column j iff j is i or an ancestor."""
    n = len(parents) + 1
    mask = np.zeros((n, n), dtype=bool)
    mask[:, 0] = True
    for i, p in enumerate(parents, start=1):
        mask[i] = mask[p + 1]
        mask[i, i] = True
    return mask


def children(parents) -> tuple:
    """(first_child, num_children) per flat node (root = 0), using the contiguity of siblings."""
    n = len(parents) + 1
    first = [0] * n
    count = [0] * n
    for i, p in enumerate(parents, start=1):
        if count[p + 1] == 0:
            first[p + 1] = i
        count[p + 1] += 1
    return first, count


def best_first(root: int, budget: int, grow) -> DraftTree:
    """The ``budget`` heaviest nodes of a weighted tree grown lazily, in breadth-first order.

    ``grow(path, token)`` yields ``(label, child_token, factor)`` for a node (``path`` = labels
    from the root, ``()`` for the root); a node weighs the product of the factors along its path,
    all in (0, 1], so every chosen node's parent is chosen too. Siblings are ordered heaviest first."""
    tie = 0
    heap = []

    def push(path, token, weight):
        nonlocal tie
        for label, child, factor in grow(path, token):
            tie += 1
            heapq.heappush(heap, (-weight * factor, tie, path + (label,), child))

    push((), root, 1.0)
    kids: dict = {}
    taken = 0
    while heap and taken < budget:
        neg_w, _, path, token = heapq.heappop(heap)
        kids.setdefault(path[:-1], []).append((path, token, taken))  # popped heaviest first
        taken += 1
        push(path, token, -neg_w)
    tokens, parents, ranks = [], [], []
    level = [((), -1)]
    while level:
        nxt = []
        for path, index in level:
            for child_path, token, rank in kids.get(path, ()):
                tokens.append(token)
                parents.append(index)
                ranks.append(rank)
                nxt.append((child_path, len(tokens) - 1))
        level = nxt
    return DraftTree(tuple(tokens), tuple(parents), tuple(ranks))
