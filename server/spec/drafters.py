"""Training-free drafters behind one protocol: ``ngram`` (prompt lookup), ``recycling`` (Token
Recycling) and ``goose`` (anisotropic spine trees).

Pure Python + numpy bookkeeping: no model, no tensors of the model. A drafter belongs to one
request (its n-gram index is per request); the Token Recycling table it reads may be shared.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np

from sift.server.options import SpecOptions
from sift.server.spec.tree import EMPTY, RANK_PRIOR, DraftTree, best_first, expand, template
from sift.server.techniques import TechniqueState

TOPK = 8  # Token Recycling keeps the top-8 next tokens of every token


class RecyclingTable:
    """Token Recycling's adjacency matrix ``M[vocab, 8]``: for each token, the top-8 next tokens
    the target model predicted the last time that token was a tree input. -1 = never seen."""

    def __init__(self, vocab_size: int, k: int = TOPK):
        self.m = np.full((vocab_size, k), -1, dtype=np.int64)

    @property
    def k(self) -> int:
        return self.m.shape[1]

    def candidates(self, token: int) -> list:
        row = self.m[token]
        return [] if row[0] < 0 else row.tolist()

    def update(self, tokens, topk: np.ndarray) -> None:
        """Overwrite the rows of ``tokens`` (every tree input, accepted or not) with their top-k."""
        self.m[np.asarray(tokens, dtype=np.int64)] = topk[:, : self.k]


class NgramIndex:
    """Prompt lookup: where did the last n-gram (n = 3, then 2, then 1) occur before, most recently?

    Incremental: each call indexes only the tokens appended since the previous one (the sequence of
    a request only grows). The final n-gram itself is not indexed, so it never matches itself."""

    def __init__(self, max_n: int = 3):
        self.max_n = max_n
        self._last_end: list[dict] = [{} for _ in range(max_n + 1)]
        self._indexed = 0  # n-grams ending before this position are indexed
        self._last: tuple = (-1, 0, -1)  # (sequence length, n, end) of the latest match

    def match(self, tokens: list) -> tuple[int, int]:
        """(n, end): the longest n whose last n-gram occurred before, ending at ``end``; (0, -1) if none.
        A step asks twice (the budget's evidence, then the draft): the sequence only grows, so its length
        identifies the answer already found."""
        if self._last[0] == len(tokens):
            return self._last[1:]
        stop = len(tokens) - 1
        for end in range(self._indexed, stop):
            for n in range(1, min(self.max_n, end + 1) + 1):
                self._last_end[n][tuple(tokens[end - n + 1:end + 1])] = end
        self._indexed = max(self._indexed, stop)
        for n in range(min(self.max_n, len(tokens)), 0, -1):
            end = self._last_end[n].get(tuple(tokens[-n:]))
            if end is not None:
                break
        else:
            n, end = 0, -1
        self._last = (len(tokens), n, end)
        return n, end

    def continuation(self, tokens: list, budget: int) -> list:
        n, end = self.match(tokens)
        return tokens[end + 1:end + 1 + budget] if n else []


class Drafter(Protocol):
    """Proposes a draft tree rooted at the request's last token; ``table`` (or None) is the Token
    Recycling matrix whose rows the verifier refreshes after every pass over this drafter's trees."""

    table: Optional[RecyclingTable]
    uses_table: bool  # whether the drafter is built over a Token Recycling table

    def propose(self, tokens: list, budget: int) -> DraftTree:
        """At most ``budget`` draft nodes, breadth-first; ``tokens`` = prompt + output so far."""
        ...

    def evidence(self, tokens: list) -> str:
        """The class of the next tree's evidence (for prompt lookup: the order of the n-gram that matched,
        0 for none), under which the draft budget keeps acceptance statistics: a 3-gram match is accepted
        far more often than a tree grown from the table alone, and the budget should know which it is
        about to buy before the step."""
        ...


class NgramDrafter:
    """Prompt lookup: the continuation of the last matching n-gram, as a chain."""

    table = None
    uses_table = False

    def __init__(self):
        self.index = NgramIndex()

    def propose(self, tokens: list, budget: int) -> DraftTree:
        cont = self.index.continuation(tokens, budget)
        return DraftTree(tuple(cont), tuple(range(-1, len(cont) - 1)))

    def evidence(self, tokens: list) -> str:
        return f"ngram/{self.index.match(tokens)[0]}"


class RecyclingDrafter:
    """Token Recycling: the static template (scaled to the budget) filled breadth-first from M."""

    uses_table = True

    def __init__(self, table: RecyclingTable):
        self.table = table

    def propose(self, tokens: list, budget: int) -> DraftTree:
        if budget <= 0:
            return EMPTY
        return expand(tokens[-1], template(budget, self.table.k), self.table.candidates)

    def evidence(self, tokens: list) -> str:
        return "recycling"


class GooseDrafter:
    """GOOSE-style anisotropic tree: the reliable source deep, the unreliable source wide.

    The paper's construction is not public; the choices made here:
      * spine = the prompt-lookup continuation (up to the budget), a chain from the root;
      * at every spine node (root included) the Token Recycling candidates of that node's token,
        minus the spine's own next token, hang as branches, and grow further down by TR;
      * one best-first selection over all of it under the node budget, with a node's weight = the
        product along its path of ``SPINE_ACCEPT`` per spine step, ``(1 - SPINE_ACCEPT) * RANK_PRIOR[r]``
        for leaving the spine onto a rank-r candidate, and ``RANK_PRIOR[r]`` per TR step below it.
        The fixed ``SPINE_ACCEPT`` (0.8, about 6x TR's median rank acceptance as the paper reports)
        makes the spine go deep before branches widen, and a long match still yields TR branches
        at the shallow spine nodes where a mismatch is most likely to be recovered;
      * no match -> the best-first TR tree; empty M -> the plain spine chain.
    ``bench/spec.py`` measures its mean accepted length against both pure sources.
    """

    SPINE_ACCEPT = 0.8
    SPINE_LOOKAHEAD = 64  # the spine is read this far (at least) whatever the budget: see DraftTree.rank

    uses_table = True

    def __init__(self, table: RecyclingTable):
        self.table = table
        self.index = NgramIndex()

    def propose(self, tokens: list, budget: int) -> DraftTree:
        if budget <= 0:
            return EMPTY
        spine = self.index.continuation(tokens, max(budget, self.SPINE_LOOKAHEAD))
        cands = self.table.candidates
        a = self.SPINE_ACCEPT

        def grow(path, token):
            on_spine = all(label == "s" for label in path)
            nxt = spine[len(path)] if on_spine and len(path) < len(spine) else None
            if nxt is not None:
                yield "s", nxt, a
            leave = (1.0 - a) if nxt is not None else 1.0
            for r, t in enumerate(cands(token)):
                if t != nxt:
                    yield r, t, leave * RANK_PRIOR[r]

        return best_first(tokens[-1], budget, grow)

    def evidence(self, tokens: list) -> str:
        return f"goose/{self.index.match(tokens)[0]}"


DRAFTERS = {"none": None, "ngram": NgramDrafter, "recycling": RecyclingDrafter, "goose": GooseDrafter}


def make_drafter(method: str, table: Optional[RecyclingTable]) -> Drafter:
    """A fresh per-request drafter; ``table`` is required by the drafters that read one (``uses_table``)."""
    cls = DRAFTERS[method]
    return cls(table) if cls.uses_table else cls()


@dataclass
class SpecState(TechniqueState):
    """A speculating request's options, drafter and draft budgets."""

    options: SpecOptions
    drafter: Drafter
    step_budget: int = 0  # the draft budget the controller chose for this request this step (0: a plain decode)
    budget: int = 0  # the budget the current tree was built under (step_budget, capped by room)
    control: object = None  # the controller's own per-request state, if it keeps any
