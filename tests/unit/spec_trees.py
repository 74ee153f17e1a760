"""Random draft trees shared by the speculation tests."""
import random


def random_parents(rng: random.Random, n: int) -> list:
    """A random breadth-first tree: each node's parent is at or after the previous node's parent."""
    parents, lo = [], -1
    for i in range(n):
        p = rng.randint(lo, i - 1)
        parents.append(p)
        lo = p
    return parents
