"""OpenAI request/response schemas (pydantic v2), with Sift's extensions at top level.

Extensions follow vLLM (``top_k``, ``min_p``, ``repetition_penalty``, ``priority``,
``ignore_eos``, ``min_tokens``) plus one object per token-efficiency technique
(``speculative``, ``kv_eviction``, ``sparsity``, ``token_skipping``). Each technique
object is built from its option dataclass in ``sift.server.options``; the defaults live there,
so only the fields a client sets are passed on.

Unknown fields are rejected everywhere (400 naming the field), so nothing a client asks for is
silently dropped; OpenAI fields Sift does not implement are rejected with the reason, and a few
harmless ones are accepted and ignored (``protocol_structured.IGNORED``). Structured outputs and
tool-calling schemas live in ``protocol_structured.py``.
"""
from __future__ import annotations

import keyword
import time
import typing
from dataclasses import fields
from typing import Any, ClassVar, Iterator, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from sift.server.api.protocol_structured import (MessageToolCall, ResponseFormat, ScreenedFields, StructuredOutputs, Tool,
                                            ToolChoice, check_tools, constraint_of)
from sift.server.engine.request import SamplingParams
from sift.server.options import EvictionOptions, SkipOptions, SparsityOptions, SpecOptions, api_path, meta
from sift.server.structured.tools import forced_call_spec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---- technique extensions --------------------------------------------------------------

class _TechniqueBody(_Strict):
    """A request's technique object, built by :func:`technique_model` from its option dataclass."""

    options: ClassVar[type]

    def to_options(self):
        """The option dataclass of the fields the client set (the rest keep the dataclass defaults)."""
        names = {api_path(f): f.name for f in fields(self.options) if api_path(f) is not None}
        values = _flat(self.model_dump(exclude_unset=True, by_alias=True))
        return self.options(**{names[path]: value for path, value in values if path in names})


def _flat(values: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in values.items():
        yield from _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [(prefix + key, value)]


def _json_type(t):
    """An option's type as JSON carries it: a tuple arrives as a list."""
    if typing.get_origin(t) is tuple:
        return list[typing.get_args(t)[0]]
    return Union[tuple(map(_json_type, typing.get_args(t)))] if typing.get_args(t) else t


def technique_model(name: str, options: type) -> type[_TechniqueBody]:
    """The request object of one technique: a field per option the API exposes (nested objects for dotted
    paths such as ``relaxed.k``), optional unless ``required``, typed and documented as in the dataclass."""
    hints, groups = typing.get_type_hints(options), {}
    for f in fields(options):
        if (path := api_path(f)) is None:
            continue
        *parents, leaf = path.split(".")
        m, kind = meta(f), _json_type(hints[f.name])
        doc = m.help + (f" ({' | '.join(m.choices)})" if m.choices else "")
        alias = leaf if keyword.iskeyword(leaf) else None  # "lambda": a Python name with the JSON name as alias
        groups.setdefault(".".join(parents), {})[leaf + "_" * bool(alias)] = (
            (kind, Field(..., alias=alias, description=doc)) if m.required
            else (Optional[kind], Field(None, alias=alias, description=doc)))
    nested = {group: (Optional[create_model(name + group.title(), __base__=_Strict, **specs)], None)
              for group, specs in groups.items() if group}
    model = create_model(name, __base__=_TechniqueBody, __doc__=options.__doc__, **groups[""], **nested)
    model.options = options
    return model


Speculative = technique_model("Speculative", SpecOptions)
KVEviction = technique_model("KVEviction", EvictionOptions)
Sparsity = technique_model("Sparsity", SparsityOptions)
TokenSkipping = technique_model("TokenSkipping", SkipOptions)


# ---- requests ----------------------------------------------------------------------------

class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: Optional[bool] = None  # accepted and ignored: Sift adds no obfuscation padding


class _SamplingRequest(ScreenedFields):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

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
    # structured outputs: OpenAI's response_format, or vLLM's structured_outputs object
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputs] = None

    def constraint(self) -> tuple:
        """``(StructuredSpec or None, the field it came from)``; ValueError naming the field."""
        return constraint_of(self.response_format, self.structured_outputs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _sampling_params(self, max_tokens: int, logprobs: Optional[int], prompt_logprobs: Optional[int] = None,
                         structured=None) -> SamplingParams:
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
            structured=structured,
        )


class CompletionRequest(_SamplingRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None  # accepted only equal to n (bounds: server/api/bounds.py)

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        max_tokens = default_max_tokens if self.max_tokens is None else self.max_tokens
        prompt_logprobs = self.logprobs if (self.echo and self.logprobs is not None) else None
        return self._sampling_params(max_tokens, self.logprobs, prompt_logprobs, self.constraint()[0])


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[MessageToolCall]] = None  # assistant turns that called tools
    tool_call_id: Optional[str] = None  # tool turns: the call they answer
    refusal: Optional[str] = None  # echoed back by clients that resend our messages; ignored

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
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[ToolChoice] = None
    parallel_tool_calls: bool = True

    def effective_tool_choice(self):
        """``none`` | ``auto`` | ``required`` | a NamedToolChoice; ValueError naming the field."""
        return check_tools(self.tools, self.tool_choice,
                           constraint_of(self.response_format, self.structured_outputs)[0] is not None)

    def forced_tool_spec(self):
        choice = self.effective_tool_choice()
        if choice in ("none", "auto"):
            return None
        return forced_call_spec(self.tool_dicts(), choice if choice == "required" else choice.model_dump(),
                                self.parallel_tool_calls)

    def tool_dicts(self) -> list[dict]:
        return [t.model_dump(exclude_none=True) for t in self.tools or ()]

    def constraint(self) -> tuple:
        spec, field = super().constraint()
        if spec is None:
            forced = self.forced_tool_spec()
            if forced is not None:
                return forced, "tools"
        return spec, field

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(default_max_tokens if max_tokens is None else max_tokens, logprobs,
                                     structured=self.constraint()[0])

    def chat_messages(self) -> list[dict]:
        # "developer" is OpenAI's newer name for the system role
        out = []
        for m in self.messages:
            msg = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.tool_calls:
                msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            if m.name is not None and m.role == "tool":
                msg["name"] = m.name
            out.append(msg)
        return out


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
