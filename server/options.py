"""Each token-saving technique's options, defined once: one frozen dataclass per technique, each field declared
with :func:`option`, whose :class:`Meta` says where else it appears. Derived from these classes, so adding a field
is one edit here: the request's technique objects (pydantic models, sift.server.api.protocol) and their bounds
(sift.server.api.bounds), the server-wide defaults (``EngineConfig.spec / eviction / sparsity / skipping`` are
instances of these classes) and the ``sift serve`` flags with their ``SIFT_*`` twins (sift.server.cli).
A violated rule is a ValueError starting with the field's request path (``sparsity.recent must be >= 0``), which
the API turns into a 400 naming that field.
"""
from __future__ import annotations

import math
import typing
from dataclasses import Field, dataclass, field, fields
from typing import ClassVar, Optional, Union

# the method names each technique accepts, in one place
SPEC_METHODS = ("none", "ngram", "recycling", "goose")
SPEC_CONTROLLERS = ("simple", "adaptive")
EVICTION_METHODS = ("none", "streaming", "h2o", "snapkv", "lazy")
SPARSITY_METHODS = ("dense", "window", "quest", "tidal", "loki")
SKIP_METHODS = ("none", "spts")

MAX_RANK = 4096  # loki sketch rank and spts probe rank: clipped to the head / MLP size inside


@dataclass(frozen=True)
class Range:
    """A numeric option's legal values, lo to hi (ends excluded where open). ``model`` names a limit of the served
    model that also caps hi (context, layers or vocab): the API resolves it, the dataclass checks the fixed ends."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    model: Optional[str] = None

    def admits(self, x) -> bool:
        above = x > self.lo if self.lo_open else x >= self.lo
        below = x < self.hi if self.hi_open else x <= self.hi
        return above and below

    def describe(self) -> str:
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {_fmt(self.lo)}"
        return f"in {'(' if self.lo_open else '['}{_fmt(self.lo)}, {_fmt(self.hi)}{')' if self.hi_open else ']'}"


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


CONTEXT_TOKENS = Range(1, model="context")
CONTEXT_COUNT = Range(0, model="context")
LAYER_INDEX = Range(0, model="layers", hi_open=True)
LAYER_COUNT = Range(0, model="layers")


@dataclass(frozen=True)
class Meta:
    """Where an option appears besides its dataclass."""

    help: str
    api: Union[bool, str] = True  # in the request's technique object: True under its own name, or a dotted path
    required: bool = False  # a request's technique object must give it
    flag: Optional[str] = None  # the `sift serve` flag setting the server default (env twin SIFT_<FLAG>)
    choices: Optional[tuple] = None
    range: Optional[Range] = None  # numeric options; a tuple-valued option: each item
    off: Optional[float] = None  # a value outside ``range`` that switches the option off (not accepted at the API)


def option(default, help: str, **meta) -> Field:
    return field(default=default, metadata={"sift": Meta(help, **meta)})


def meta(f: Field) -> Meta:
    return f.metadata["sift"]


def api_path(f: Field) -> Optional[str]:
    """The field's dotted path inside the request's technique object, or None if requests cannot set it."""
    return (f.name if meta(f).api is True else meta(f).api) or None


def scalar_type(options: type, f: Field) -> type:
    """int, float, str or bool: the field's type without Optional (a tuple option: its item type)."""
    t = typing.get_type_hints(options)[f.name]
    while typing.get_origin(t) in (Union, tuple):
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


class Options:
    """Base of the option dataclasses: each field checked against its :class:`Meta` at construction."""

    SECTION: ClassVar[str]  # the request field holding these options, and the prefix of every error message

    def __post_init__(self) -> None:
        for f in fields(self):
            m, value = meta(f), getattr(self, f.name)
            name = f"{self.SECTION}.{api_path(f) or f.name}"
            if m.choices is not None and value not in m.choices:
                raise ValueError(f"{name}: unknown value {value!r}")
            if m.range is None or (value is None and f.default is None) or (m.off is not None and value == m.off):
                continue
            if isinstance(value, (list, tuple)):  # a list from JSON: stored as a tuple, hashable like the rest
                object.__setattr__(self, f.name, tuple(value))
                for i, item in enumerate(value):
                    _check_number(f"{name}.{i}", item, m)
            else:
                _check_number(name, value, m)


def _check_number(name: str, value, m: Meta) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number")
    if not m.range.admits(value):
        raise ValueError(f"{name} must be {m.range.describe()}" + (f" (or {m.off}: off)" if m.off is not None else ""))


@dataclass(frozen=True)
class SpecOptions(Options):
    """Speculative decoding (training-free drafters), optionally with LANTERN relaxed acceptance."""

    SECTION = "speculative"

    method: str = option("none", "speculative decoding method", required=True, flag="speculative", choices=SPEC_METHODS)
    num_draft_tokens: int = option(8, "draft tokens per speculative step", flag="num-draft-tokens", range=Range(1, 128))
    relaxed_k: int = option(0, "LANTERN: neighbours a draft may stand for (0: strict)", api="relaxed.k", required=True,
                            range=Range(1, 1024, model="vocab"), off=0)
    relaxed_delta: float = option(0.0, "LANTERN: mass the neighbours may move", api="relaxed.delta", range=Range(0, 1))
    relaxed_lambda: float = option(0.0, "LANTERN++: relaxed p(x) <= lambda * p(x) (0: off)", api="relaxed.lambda",
                                   range=Range(0, 1e6))
    private_table: bool = option(False, "Token Recycling: a table of the request's own", api=False)


@dataclass(frozen=True)
class SpecConfig(SpecOptions):
    """The server-wide speculation default, and how the server chooses draft budgets each step."""

    # adaptive until the ablation in docs/speculation.md runs
    controller: str = option("adaptive", "how draft budgets are chosen each step", api=False,
                             flag="speculative-controller", choices=SPEC_CONTROLLERS)
    disable_by_batch_size: Optional[int] = option(None, "draft only while at most this many requests decode "
                                                  "(default: measured at start-up)", api=False,
                                                  flag="speculative-disable-by-batch-size", range=Range(0))


@dataclass(frozen=True)
class EvictionOptions(Options):
    """KV eviction: each request keeps a budget of KV entries, chosen by the method's score."""

    SECTION = "kv_eviction"

    method: str = option("none", "KV eviction policy", required=True, flag="kv-eviction", choices=EVICTION_METHODS)
    budget: float = option(0.5, "KV entries kept per request: tokens (> 1) or ratio (<= 1) of prompt + max_tokens",
                           flag="kv-budget", range=Range(0, lo_open=True, model="context"))
    window: int = option(32, "recent window protected from eviction", flag="kv-window", range=CONTEXT_TOKENS)
    alpha: float = option(1e-4, "LazyEviction recurrence threshold (attention probability)", flag="kv-alpha",
                          range=Range(0, 1, lo_open=True, hi_open=True))
    sinks: int = option(4, "streaming: first tokens always kept", range=CONTEXT_COUNT)


@dataclass(frozen=True)
class SparsityOptions(Options):
    """Decode attention sparsity: each decode step attends over a subset of the context."""

    SECTION = "sparsity"

    method: str = option("dense", "decode attention sparsity", required=True, flag="sparsity", choices=SPARSITY_METHODS)
    budget: int = option(256, "tokens attended per step by quest/tidal/loki", flag="sparsity-budget",
                         range=CONTEXT_TOKENS)
    window: int = option(1024, "recent-token window of windowed sparsity", flag="window", range=CONTEXT_TOKENS)
    sinks: int = option(4, "first tokens always attended (window) or selected (tidal, loki)", flag="sinks",
                        range=CONTEXT_COUNT)
    recent: int = option(32, "tidal, loki: latest tokens every selection keeps", range=CONTEXT_COUNT)
    selection_layer: int = option(2, "tidal: the layer that selects", range=LAYER_INDEX)
    reselection_layer: Union[int, tuple[int, ...], None] = option(None, "tidal: the layer or layers that re-select "
                                                                  "(default num_layers // 2)", range=LAYER_INDEX)
    reselect_every: int = option(0, "tidal: also re-select every N layers (0: off)", range=LAYER_COUNT)
    correction_interval: int = option(0, "tidal: re-encode every N generated tokens densely (0: off)",
                                      range=CONTEXT_COUNT)
    candidates: int = option(0, "tidal, loki: candidates a selection keeps, each sparse layer attending over its own "
                             "top-budget of them (0: off)", range=CONTEXT_COUNT)
    rank: int = option(24, "loki: dimensions of the key sketches (clipped to the head dim)", range=Range(1, MAX_RANK))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.candidates and self.candidates <= self.budget:
            raise ValueError("sparsity.candidates must be 0 (off) or larger than the budget")


@dataclass(frozen=True)
class SkipOptions(Options):
    """Probe-and-Skip token skipping for long prefills: deeper layers compute only the tokens that matter."""

    SECTION = "token_skipping"

    method: str = option("none", "token skipping of long prefills", required=True, flag="token-skipping",
                         choices=SKIP_METHODS)
    min_prompt_len: int = option(1024, "shorter prompts are never skipped", flag="skip-min-prompt-len",
                                 range=CONTEXT_TOKENS)
    start_layer: int = option(8, "first layer that skips tokens", flag="skip-start-layer", range=LAYER_COUNT)
    ratio: float = option(0.5, "final fraction of prompt tokens skipped per block", flag="skip-ratio",
                          range=Range(0, 1, hi_open=True))
    probe_tokens: int = option(32, "last prompt tokens whose attention picks the kept tokens",
                               flag="skip-probe-tokens", range=CONTEXT_TOKENS)
    recent: int = option(0, "last prompt tokens never skipped", flag="skip-recent", range=CONTEXT_COUNT)
    stages: int = option(0, "stages the skip ratio rises over (0: one per layer)", range=LAYER_COUNT)
    probe_rank: int = option(128, "MLP neurons the MLP probe keeps", range=Range(1, MAX_RANK))
    blocks: str = option("attention", "blocks that skip tokens", choices=("attention", "mlp", "both"))
    # linear: ratio * (s + 1) / stages; geometric: every stage prunes the same share of the tokens still in play
    schedule: str = option("linear", "how the skip ratio rises over the stages", flag="skip-schedule",
                           choices=("linear", "geometric"))


TECHNIQUES = (SpecOptions, EvictionOptions, SparsityOptions, SkipOptions)
