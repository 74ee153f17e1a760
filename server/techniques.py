"""The one lifecycle every token-saving technique implements (speculation, eviction, sparsity, skipping).

A technique is a strategy object, built once per engine, with hooks at the points of a request's life and
of each step, and answers to the few questions the scheduler asks about a request. The base class gives
the neutral answer to each, so a technique overrides only what it uses. Per request, a technique keeps a
typed state (a :class:`TechniqueState` subclass) in ``Request.technique_state``, read through
``Request.state_of``, which restarts it once after every preemption: that is the only epoch check.

The step, as :class:`sift.server.engine.llm_engine.LLMEngine` runs it::

    scheduler.schedule()     begin_step(running); per decode draft(), draft_depth(); window(), peak_tokens() ...
    techniques.plan(step)    before the forward (ask for attention scores, ...)
    runner.execute(step)
    scheduler.update()       window(), exact_kv(), rewind()
    techniques.after_step()  once the step's tokens are final (evict, time the step)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

ALL_TOKENS = 1 << 62  # exact_kv: no limit


@dataclass
class TechniqueState:
    """A technique's per-request state. ``epoch``: the request's preemption count the state was last
    (re)started at (see ``Request.state_of``)."""

    epoch: int = field(default=0, kw_only=True)
    # whether the technique reads the request's KV on its own terms (draft trees, eviction scores, sparse
    # reads): then tokens a skipping prefill pruned must stay readable (see reads_every_token)
    reads_own_kv: ClassVar[bool] = True

    def restart(self, req) -> None:
        """The request was preempted: its recompute starts from an empty cache."""


def reads_every_token(req) -> bool:
    """Whether some technique of the request reads its KV on its own terms (see TechniqueState.reads_own_kv)."""
    return any(state.reads_own_kv for state in req.technique_state.values())


class Technique:
    """The neutral technique: every hook does nothing, every query gives the answer of a plain request."""

    name = "none"

    # -- hooks ---------------------------------------------------------------------------------
    def on_admit(self, req) -> None:
        """Resolve the request's options once and attach its state (``req.technique_state``)."""

    def begin_step(self, running: list) -> None:
        """The scheduler is about to spend a step's budget on ``running`` (then on admissions)."""

    def plan(self, step, requests: dict) -> None:
        """Before the forward: what the technique needs from it, set on the step (scores to emit, ...)."""

    def after_step(self, step, outputs, requests: dict) -> list:
        """After the step, its tokens final (stops applied, drafts verified). Returns KV compactions the
        KV manager applied to its tables, which the runner carries out before the next forward."""
        return []

    def stats(self, running: list) -> dict:
        return {}

    # -- scheduler queries ---------------------------------------------------------------------
    def window(self, req) -> tuple:
        """(window, sinks) of the request's attention masks; window 0 = unbounded."""
        return 0, 0

    def exact_kv(self, req) -> int:
        """Leading tokens whose KV equals a dense computation: only those may enter the prefix cache, and a
        request with none never reads it."""
        return ALL_TOKENS

    def peak_tokens(self, req) -> Optional[int]:
        """Most KV entries the request holds at once under this technique (None: no bound but its length)."""
        return None

    def extra_tokens(self, req) -> int:
        """KV slots a step may take beyond the request's tokens (a draft tree)."""
        return 0

    def draft(self, req, max_nodes: int):
        """A draft tree of at most ``max_nodes`` to verify after the request's last token, or None."""
        return None

    def draft_depth(self, req) -> Optional[int]:
        """Deepest draft the request may verify this step (None: any)."""
        return None

    def rewind(self, req) -> int:
        """After a step: how many of the latest computed tokens to recompute in the next one (0: none)."""
        return 0


class Techniques:
    """The engine's techniques, by name, in the order their hooks run; answers the scheduler's queries
    by combining theirs. Each query asks only the techniques that answer it."""

    def __init__(self, *techniques: Technique):
        self.by_name = {t.name: t for t in techniques}
        self.all = list(techniques)
        self._asks = {m: [t for t in techniques if getattr(type(t), m) is not getattr(Technique, m)]
                      for m in ("window", "exact_kv", "peak_tokens", "extra_tokens", "draft", "draft_depth", "rewind")}

    def __getitem__(self, name: str) -> Technique:
        return self.by_name[name]

    def on_admit(self, req) -> None:
        for t in self.all:
            t.on_admit(req)

    def begin_step(self, running: list) -> None:
        for t in self.all:
            t.begin_step(running)

    def plan(self, step, requests: dict) -> None:
        for t in self.all:
            t.plan(step, requests)

    def after_step(self, step, outputs, requests: dict) -> list:
        return [c for t in self.all for c in t.after_step(step, outputs, requests)]

    def stats(self, running: list) -> dict:
        return {k: v for t in self.all for k, v in t.stats(running).items()}

    def window(self, req) -> tuple:
        for t in self._asks["window"]:
            window = t.window(req)
            if window[0]:
                return window
        return 0, 0

    def exact_kv(self, req) -> int:
        return min((t.exact_kv(req) for t in self._asks["exact_kv"]), default=ALL_TOKENS)

    def peak_tokens(self, req) -> int:
        """Most KV slots the request holds at once: its length or the tightest bound, plus a step's extras."""
        bounds = [b for t in self._asks["peak_tokens"] if (b := t.peak_tokens(req)) is not None]
        peak = min(bounds) if bounds else req.num_prompt_tokens + req.params.max_tokens
        return peak + sum(t.extra_tokens(req) for t in self._asks["extra_tokens"])

    def draft(self, req, max_nodes: int):
        for t in self._asks["draft"]:
            tree = t.draft(req, max_nodes)
            if tree is not None:
                return tree
        return None

    def draft_depth(self, req) -> Optional[int]:
        depths = [d for t in self._asks["draft_depth"] if (d := t.draft_depth(req)) is not None]
        return min(depths) if depths else None

    def rewind(self, req) -> int:
        return max((t.rewind(req) for t in self._asks["rewind"]), default=0)
