"""Request lifecycle objects: SamplingParams (validated at the edge) and Request."""
from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from sift.server.options import EvictionOptions, SkipOptions, SparsityOptions, SpecOptions
from sift.server.structured.spec import StructuredSpec

# Below this temperature sampling is greedy: dividing logits by a tinier one overflows float32 (vLLM's rule).
SAMPLING_EPS = 1e-5


def _finite(owner: str, **values) -> None:
    """ValueError naming the first value that is not a finite number (NaN and infinities compare false)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{owner}{name} must be a finite number")


@dataclass(frozen=True)
class SamplingParams:
    """How to turn logits into tokens, and when to stop. Validated here; ValueError names the field."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Optional[dict] = None  # token id -> bias
    seed: Optional[int] = None
    stop: tuple = ()  # stop strings
    stop_token_ids: tuple = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: Optional[int] = None  # number of top alternatives (0 = only the chosen token's logprob)
    prompt_logprobs: Optional[int] = None
    n: int = 1
    skip_special_tokens: bool = True
    speculative: Optional[SpecOptions] = None  # None = server default
    eviction: Optional[EvictionOptions] = None
    sparsity: Optional[SparsityOptions] = None
    skipping: Optional[SkipOptions] = None
    structured: Optional[StructuredSpec] = None  # a grammar constraint (JSON schema, regex, choice, grammar)

    def __post_init__(self) -> None:
        _finite("", temperature=self.temperature, top_p=self.top_p, min_p=self.min_p,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty)
        if self.structured is not None and (self.ignore_eos or self.min_tokens):
            # the grammar ends by allowing only EOS; both would force tokens past its end
            raise ValueError(f"{'ignore_eos' if self.ignore_eos else 'min_tokens'}: not supported with "
                             "structured outputs")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError("max_tokens must be an integer >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1 or self.top_k == 0 or self.top_k >= 2**31:
            raise ValueError("top_k must be -1 (disabled) or in [1, 2**31)")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError("seed must be an integer")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if not -2 <= self.presence_penalty <= 2:
            raise ValueError("presence_penalty must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise ValueError("frequency_penalty must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must be in [0, max_tokens]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs must be in [0, 20]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise ValueError("prompt_logprobs must be in [0, 20]")
        if not isinstance(self.n, int) or not 1 <= self.n <= 16:
            raise ValueError("n must be in [1, 16]")
        stop = self.stop
        if isinstance(stop, str):
            object.__setattr__(self, "stop", (stop,) if stop else ())
        elif isinstance(stop, (list, tuple)):
            if not all(isinstance(s, str) for s in stop):
                raise ValueError("stop must be a string or a list of strings")
            object.__setattr__(self, "stop", tuple(s for s in stop if s))
        elif stop is None:
            object.__setattr__(self, "stop", ())
        else:
            raise ValueError("stop must be a string or a list of strings")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative integers")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.logit_bias is not None:
            try:
                bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, AttributeError):
                raise ValueError("logit_bias must map token ids to numbers") from None
            if any(not -100 <= v <= 100 for v in bias.values()):  # NaN fails the comparison too
                raise ValueError("logit_bias values must be in [-100, 100]")
            object.__setattr__(self, "logit_bias", bias)

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    def validate_for_model(self, vocab_size: int, prompt_len: int, max_model_len: int) -> None:
        """Checks that need the model: context length and vocabulary."""
        if prompt_len < 1:
            raise ValueError("prompt must not be empty")
        if prompt_len + self.max_tokens > max_model_len:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_tokens ({self.max_tokens}) exceeds the model's "
                f"context length ({max_model_len})")
        if self.logit_bias and any(not 0 <= t < vocab_size for t in self.logit_bias):
            raise ValueError(f"logit_bias: token id out of vocabulary (size {vocab_size})")
        if any(t >= vocab_size for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids: token id out of vocabulary (size {vocab_size})")


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")


@dataclass
class Request:
    """One sequence being generated. ``token_ids`` = prompt + output so far.

    ``num_computed_tokens`` counts tokens whose K/V were computed (logical);
    the KV manager separately tracks how many entries are *resident* (they differ
    once a policy evicts).
    """

    request_id: str
    prompt_token_ids: list
    params: SamplingParams
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    eos_token_ids: tuple = ()
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list = field(default_factory=list)
    output_logprobs: list = field(default_factory=list)  # per output token: (logprob, [(id, logprob), ...])
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prefix-cache hits at admission
    num_preemptions: int = 0
    stop_reason: Union[int, str, None] = None
    first_token_time: Optional[float] = None
    first_scheduled_time: Optional[float] = None
    generator: Any = None  # torch.Generator for seeded sampling
    grammar: Any = None  # sift.server.structured.masks.GrammarState of a grammar-constrained request
    prompt_logprob_table: Optional[dict] = None  # target position -> (logprob, top), filled chunk by chunk
    prompt_logprobs_sent: bool = False
    # the techniques' typed states (sift.server.techniques.TechniqueState), keyed by their class: read them
    # through state_of
    technique_state: dict = field(default_factory=dict)

    def state_of(self, kind):
        """This request's state of type ``kind`` (None: no technique keeps one), restarted once after every
        preemption, since its recompute starts from an empty cache."""
        state = self.technique_state.get(kind)
        if state is not None and state.epoch != self.num_preemptions:
            state.epoch = self.num_preemptions
            state.restart(self)
        return state

    @property
    def token_ids(self) -> list:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finish_reason(self) -> Optional[str]:
        if not self.status.finished:
            return None
        return self.status.value
