"""Random draft trees and the breadth-first check shared by the speculation tests."""
import random


def random_parents(rng: random.Random, n: int) -> list:
    """A random breadth-first tree: each node's parent is at or after the previous node's parent."""
    parents, lo = [], -1
    for i in range(n):
        p = rng.randint(lo, i - 1)
        parents.append(p)
        lo = p
    return parents


def check_bfs(parents) -> None:
    """Raise ValueError unless the tree is in breadth-first order with contiguous siblings,
    i.e. every parent precedes its child and the parent indices never decrease."""
    for i, p in enumerate(parents):
        if not -1 <= p < i or (i and p < parents[i - 1]):
            raise ValueError("draft tree must be breadth-first with contiguous siblings")
