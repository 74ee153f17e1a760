"""Bounds at the edge: every number a request carries is checked here before it reaches the engine.

pydantic checks types; this module checks ranges, derived from the served model where that makes
sense (token counts against ``max_model_len``, token ids against the vocabulary, layer indices
against the model's depth). A value outside its range is a 400 naming the field, never clamped:
a client that asks for a window of 10**9 tokens on a 8k-context model learns that at once instead
of getting a silently different request (see docs/hardening.md).

Rules applied to *every* leaf of a validated request, whatever its field:
  * floats must be finite (Python's JSON parser accepts ``NaN`` and ``Infinity``);
  * integers must fit in int64 (torch tensors and ``torch.Generator.manual_seed`` take no more);
  * strings must be valid Unicode (JSON's ``"\\ud800"`` decodes to a lone surrogate that no
    tokenizer can encode).
Then each numeric field listed in :func:`request_bounds` must lie in its range. A unit test checks
that every numeric field of every request model (nested technique options included) is listed, so
a new field cannot slip in unbounded.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Iterator, Optional

from pydantic import BaseModel

from sift.server.api.errors import APIError
from sift.server.options import TECHNIQUES, Range, api_path, meta

INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
MAX_N = 16  # SamplingParams' own cap on n
MAX_LOGPROBS = 20
MAX_PRIORITY = INT32_MAX
MAX_TEMPERATURE = 100.0  # beyond it every distribution is uniform to float32 precision
MIN_LIST_CAP = 1024  # lists may always hold this many items, even on a short-context model
_INDEX = re.compile(r"\.\d+(?=\.|$)")  # list indices in a dotted path ("stop_token_ids.3")


@dataclass(frozen=True)
class Limits:
    """What the served model allows; bounds are derived from these."""

    max_model_len: int
    vocab_size: int
    num_layers: int


@dataclass(frozen=True)
class Bound(Range):
    """A range resolved for the served model, saying where a model-derived end comes from."""

    why: str = ""  # where the range comes from, when it is the model's

    def describe(self) -> str:
        return super().describe() + (f" ({self.why})" if self.why else "")


def request_bounds(limits: Limits) -> dict[str, Bound]:
    """Dotted field path (list indices dropped, dict entries under the dict's name) -> range."""
    ctx, context = limits.max_model_len, "the model's context length"
    tokens = Bound(1, ctx, why=context)
    token_id = Bound(0, limits.vocab_size, hi_open=True, why="the model's vocabulary")
    return {
        # sampling
        "max_tokens": tokens, "max_completion_tokens": tokens, "min_tokens": Bound(0, ctx, why=context),
        "temperature": Bound(0, MAX_TEMPERATURE),
        "top_p": Bound(0, 1, lo_open=True),
        "top_k": Bound(-1, INT32_MAX),  # -1 and 0: off; above the vocabulary: the vocabulary
        "min_p": Bound(0, 1),
        "presence_penalty": Bound(-2, 2), "frequency_penalty": Bound(-2, 2),
        "repetition_penalty": Bound(0, 10, lo_open=True),
        "logit_bias": Bound(-100, 100),  # values; the keys are token ids, checked against the vocabulary
        "seed": Bound(-(2**63), INT64_MAX),
        "n": Bound(1, MAX_N), "best_of": Bound(1, MAX_N),
        "priority": Bound(-MAX_PRIORITY - 1, MAX_PRIORITY),
        "logprobs": Bound(0, MAX_LOGPROBS), "top_logprobs": Bound(0, MAX_LOGPROBS),
        "stop_token_ids": token_id, "prompt": token_id, "tokens": token_id,
        **technique_bounds(limits),
    }


def technique_bounds(limits: Limits) -> dict[str, Bound]:
    """The ranges of the technique options a request may set (server/options.py), model limits resolved."""
    ends = {"context": (limits.max_model_len, "the model's context length"),
            "layers": (max(limits.num_layers, 1), "the model's layers"),
            "vocab": (limits.vocab_size, "the model's vocabulary")}
    table = {}
    for options in TECHNIQUES:
        for f in fields(options):
            if (rule := meta(f).range) is None or api_path(f) is None:
                continue
            hi, why = rule.hi, ""
            if rule.model is not None and ends[rule.model][0] <= hi:
                hi, why = ends[rule.model]
            table[f"{options.SECTION}.{api_path(f)}"] = Bound(rule.lo, hi, rule.lo_open, rule.hi_open, why=why)
    return table


def leaves(value, path: str = "", max_items: Optional[int] = None) -> Iterator[tuple[str, object]]:
    """(dotted path, scalar) for every scalar in a validated request; models by alias, lists by index,
    dict keys and values under the dict's own path. A list or dict longer than ``max_items`` is a 400
    before it is walked (no field may usefully hold more items than the context has tokens)."""
    if isinstance(value, BaseModel):
        for name, info in type(value).model_fields.items():
            child = getattr(value, name)
            if child is not None:
                name = info.alias or name
                yield from leaves(child, f"{path}.{name}" if path else name, max_items)
        return
    if isinstance(value, (list, tuple, dict)) and max_items is not None and len(value) > max_items:
        raise _reject(path, f"at most {max_items} items (the model's context length), got {len(value)}")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from leaves(item, f"{path}.{i}", max_items)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(key, path, max_items)
            yield from leaves(item, path, max_items)
    else:
        yield path, value


def _reject(path: str, message: str) -> APIError:
    return APIError(400, f"{path}: {message}", param=path, code="invalid_value")


def check_scalar(path: str, value, bound: Optional[Bound]) -> None:
    """Raise :class:`APIError` (400 naming ``path``) if ``value`` is not acceptable there."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _reject(path, "contains a lone surrogate (invalid Unicode)") from None
        if bound is None:
            return
        try:  # logit_bias keys are token ids written as strings
            value = int(value)
        except ValueError:
            raise _reject(path, "must be a token id (an integer)") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise _reject(path, "must be a finite number")
    if isinstance(value, int) and not -(2**63) <= value <= INT64_MAX:
        raise _reject(path, "must fit in a signed 64-bit integer")
    if bound is not None and not bound.admits(value):
        raise _reject(path, f"must be {bound.describe()}")


def check_request(body: BaseModel, limits: Limits) -> None:
    """Every leaf of ``body`` against the generic rules and its field's range (400 on the first failure)."""
    table = request_bounds(limits)
    for path, value in leaves(body, max_items=max(limits.max_model_len, MIN_LIST_CAP)):
        key = _INDEX.sub("", path)
        bound = table.get(key)
        if key == "logit_bias" and isinstance(value, str):
            bound = table["prompt"]  # a key: a token id
        elif isinstance(value, str) and key != "logit_bias":
            bound = None  # text fields: only the Unicode rule
        check_scalar(path, value, bound)
