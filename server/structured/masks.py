"""Per-request grammar matchers and the batched bitmask step of the sampler.

Each constrained request owns one :class:`GrammarState` (``Request.grammar``). Per
sampling step the sampler calls :func:`apply_masks` on the rows that carry one: each matcher
fills its row of one int32 bitmask (a bit per token, CPU), the bitmask goes to the logits'
device once, and ``xgrammar.apply_token_bitmask_inplace`` sets the disallowed logits to -inf for
those rows only (its C++ kernel on CPU, its Triton kernel on CUDA). Unconstrained rows are
untouched, so their tokens do not depend on their batch mates.
"""
from __future__ import annotations

import logging
import time

import torch

logger = logging.getLogger("sift.structured")


class GrammarState:
    """One request's position in its grammar."""

    def __init__(self, compiled) -> None:
        """``compiled``: a ``sift.server.structured.compiler.Compiled``."""
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled.grammar)
        self.token_filter = compiled.token_filter
        self.rejected = 0

    def accept(self, token_id: int) -> None:
        if self.matcher.is_terminated():
            return
        if not self.matcher.accept_token(token_id):
            # only possible if the mask was bypassed; keep generating rather than fail the request
            self.rejected += 1
            logger.warning("grammar rejected token %d", token_id)

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()


def apply_masks(logits: torch.Tensor, rows: list, states: list) -> float:
    """Mask ``logits[rows[i]]`` with ``states[i]``'s allowed tokens, in place. Returns seconds spent."""
    import xgrammar as xgr

    t0 = time.perf_counter()
    vocab = logits.shape[-1]
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], vocab)
    for row, state in zip(rows, states):
        if not state.terminated:
            state.matcher.fill_next_token_bitmask(bitmask, row)
            if state.token_filter is not None:
                bitmask[row] &= state.token_filter
    if logits.device.type != "cpu":
        bitmask = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=list(rows))
    return time.perf_counter() - t0
