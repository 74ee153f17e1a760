"""The contracts between the engine's parts.

Scheduler -> runner: :class:`SchedulerOutput`.  Runner -> scheduler: :class:`StepOutput`.
Engine -> callers (async engine, offline LLM): :class:`RequestOutput` deltas.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ScheduledRequest:
    """One request's share of a step: compute ``num_new_tokens`` tokens starting at
    ``num_computed_tokens`` (logical), writing K/V at kv indices starting at ``kv_start``."""

    request_id: str
    token_ids: list  # the tokens to feed this step (prompt chunk, last output token, or root + draft tree)
    positions: list  # rotary position of each fed token
    slot_mapping: list  # physical slot of each fed token's K/V
    block_table: list
    kv_len: int  # resident entries after this step's writes
    sample: bool  # whether this step produces a token for the request
    draft_parents: Optional[list] = None  # speculative tree: parent index of each draft node (-1 = root)
    draft_ranks: Optional[list] = None  # each draft node's rank in its drafter's order (DraftTree.rank)
    window: int = 0
    sinks: int = 0
    score_queries: int = 1  # trailing queries aggregated into this request's emitted scores (SnapKV: w at prompt end)


@dataclass
class SchedulerOutput:
    requests: list = field(default_factory=list)  # [ScheduledRequest], decodes first then prefills
    block_copies: list = field(default_factory=list)  # [(src_block, dst_block)] to apply before the forward
    compactions: list = field(default_factory=list)  # [CompactPlan] (eviction), applied in order before block_copies
    score_layers: frozenset = frozenset()

    @property
    def num_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.requests)


@dataclass
class StepOutput:
    """Per scheduled request that sampled: the accepted tokens (1 without speculation)
    and their logprobs; plus per-request technique feedback (scores for eviction)."""

    sampled: dict = field(default_factory=dict)  # request_id -> [token ids]
    logprobs: dict = field(default_factory=dict)  # request_id -> [(logprob, [(id, logprob), ...])]
    prompt_logprobs: dict = field(default_factory=dict)  # request_id -> (chunk start, [(logprob, top)] for targets start+1..)
    scores: dict = field(default_factory=dict)  # layer -> (sum, max) tensors, rows in scheduled order
    accepted_nodes: dict = field(default_factory=dict)  # request_id -> flat tree indices of the accepted drafts
    tree_scores: dict = field(default_factory=dict)  # layer -> {batch row: (sum, max) [n, Hkv, kv_len]} of trees


@dataclass
class RequestOutput:
    """A delta for one request since its previous output."""

    request_id: str
    new_token_ids: list
    new_text: str
    new_logprobs: list  # per new token: (logprob, [(token_id, logprob), ...]) or empty when not asked
    finished: bool
    finish_reason: Optional[str]  # stop | length | abort | error
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0
    prompt_logprobs: Optional[list] = None  # first delta only, when asked
    stop_reason: object = None  # the stop string or token id that ended it
    error: Optional[str] = None
