"""OpenAI request/response schemas (pydantic v2), with Sift's extensions at top level.

Extensions follow vLLM (``top_k``, ``min_p``, ``repetition_penalty``, ``priority``,
``ignore_eos``, ``min_tokens``) plus one object per token-efficiency technique
(``speculative``, ``kv_eviction``, ``sparsity``, ``token_skipping``). Each technique
object maps field-for-field onto its option dataclass in ``server.engine.request``; the
defaults live there, so only the fields a client sets are passed on.

Unknown top-level fields are ignored (OpenAI clients send some we do not use); unknown
fields inside our own extension objects are rejected, so a typo is never silent.
"""
from __future__ import annotations

import time
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from server.engine.request import EvictionOptions, SamplingParams, SkipOptions, SparsityOptions, SpecOptions


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---- technique extensions --------------------------------------------------------------

class RelaxedAcceptance(_Strict):
    """LANTERN (``delta``: moved probability mass bound) or LANTERN++ (``lambda``: ratio bound)."""

    k: int = Field(ge=1)
    delta: Optional[float] = None
    lambda_: Optional[float] = Field(None, alias="lambda")


class Speculative(_Strict):
    method: str
    num_draft_tokens: Optional[int] = None
    relaxed: Optional[RelaxedAcceptance] = None

    def to_options(self) -> SpecOptions:
        kwargs = self.model_dump(exclude_unset=True, exclude={"relaxed"})
        if self.relaxed is not None:
            kwargs["relaxed_k"] = self.relaxed.k
            if self.relaxed.delta is not None:
                kwargs["relaxed_delta"] = self.relaxed.delta
            if self.relaxed.lambda_ is not None:
                kwargs["relaxed_lambda"] = self.relaxed.lambda_
        return SpecOptions(**kwargs)


class KVEviction(_Strict):
    method: str
    budget: Optional[float] = None
    window: Optional[int] = None
    alpha: Optional[float] = None
    sinks: Optional[int] = None

    def to_options(self) -> EvictionOptions:
        return EvictionOptions(**self.model_dump(exclude_unset=True))


class Sparsity(_Strict):
    method: str
    budget: Optional[int] = None
    window: Optional[int] = None
    sinks: Optional[int] = None
    recent: Optional[int] = None
    selection_layer: Optional[int] = None
    reselection_layer: Union[int, list[int], None] = None
    reselect_every: Optional[int] = None
    correction_interval: Optional[int] = None
    candidates: Optional[int] = None
    rank: Optional[int] = None

    def to_options(self) -> SparsityOptions:
        return SparsityOptions(**self.model_dump(exclude_unset=True))


class TokenSkipping(_Strict):
    method: str
    ratio: Optional[float] = None
    start_layer: Optional[int] = None
    min_prompt_len: Optional[int] = None
    probe_tokens: Optional[int] = None
    recent: Optional[int] = None
    stages: Optional[int] = None
    probe_rank: Optional[int] = None
    blocks: Optional[str] = None
    schedule: Optional[str] = None

    def to_options(self) -> SkipOptions:
        return SkipOptions(**self.model_dump(exclude_unset=True))


# ---- requests ----------------------------------------------------------------------------

class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingRequest(_Lenient):
    """Fields shared by completions and chat completions."""

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # vLLM-style extensions
    top_k: Optional[int] = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    priority: int = 0
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    # Sift technique extensions (None = the server's default)
    speculative: Union[Literal["none"], Speculative, None] = None
    kv_eviction: Optional[KVEviction] = None
    sparsity: Optional[Sparsity] = None
    token_skipping: Optional[TokenSkipping] = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _sampling_params(self, max_tokens: int, logprobs: Optional[int], prompt_logprobs: Optional[int] = None
                         ) -> SamplingParams:
        """Raises ValueError naming the offending field."""
        if self.speculative == "none":
            spec = SpecOptions(method="none")
        else:
            spec = self.speculative.to_options() if self.speculative is not None else None
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k in (None, 0) else self.top_k,
            min_p=self.min_p, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            logit_bias=self.logit_bias, seed=self.seed, stop=self.stop or (),
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs, n=self.n,
            skip_special_tokens=self.skip_special_tokens, speculative=spec,
            eviction=self.kv_eviction.to_options() if self.kv_eviction else None,
            sparsity=self.sparsity.to_options() if self.sparsity else None,
            skipping=self.token_skipping.to_options() if self.token_skipping else None,
        )


class CompletionRequest(_SamplingRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None  # accepted only equal to n (bounds: server/api/bounds.py)

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        max_tokens = default_max_tokens if self.max_tokens is None else self.max_tokens
        prompt_logprobs = self.logprobs if (self.echo and self.logprobs is not None) else None
        return self._sampling_params(max_tokens, self.logprobs, prompt_logprobs)


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    # variables of the chat template, e.g. {"enable_thinking": false} for Qwen3 (vLLM's extension)
    chat_template_kwargs: Optional[dict[str, Any]] = None

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(default_max_tokens if max_tokens is None else max_tokens, logprobs)

    def chat_messages(self) -> list[dict]:
        # "developer" is OpenAI's newer name for the system role
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


class TokenizeRequest(_Lenient):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None


class DetokenizeRequest(_Lenient):
    model: Optional[str] = None
    tokens: list[int]


# ---- responses ---------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[Optional[float]] = []
    top_logprobs: list[Optional[dict[str, float]]] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] = []


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "sift"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
