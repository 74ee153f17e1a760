"""Request schemas for structured outputs and tool calling, and the fields Sift does not implement.

Structured outputs: OpenAI's ``response_format`` (``text`` | ``json_object`` | ``json_schema``)
and vLLM's current extension object ``structured_outputs`` (``json``, ``regex``, ``choice``,
``grammar``, ``json_object``; vLLM >= 0.12 names: the ``guided_*`` fields it replaced are
rejected with a pointer to the new name).

No silent drops: every request model forbids unknown fields; the OpenAI fields Sift knows but
does not implement are declared here and rejected with a 400 naming them (:data:`UNSUPPORTED`),
and the few that change nothing about the output are accepted and ignored (:data:`IGNORED`).
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from sift.server.structured.spec import StructuredSpec

# accepted and ignored: they do not change what is generated
IGNORED = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier")

_VLLM_MOVED = "removed in vLLM 0.12; use structured_outputs.{}"
UNSUPPORTED = {
    "audio": "audio output is not supported",
    "modalities": "only the text modality is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "this server has no reasoning models",
    "verbosity": "not supported",
    "web_search_options": "web search is not supported",
    "functions": "the deprecated functions API is not supported; use tools",
    "function_call": "the deprecated functions API is not supported; use tool_choice",
    "suffix": "suffix (insertion) is not supported",
    "best_of": "best_of is not supported; use n",
    "guided_json": _VLLM_MOVED.format("json"),
    "guided_regex": _VLLM_MOVED.format("regex"),
    "guided_choice": _VLLM_MOVED.format("choice"),
    "guided_grammar": _VLLM_MOVED.format("grammar"),
    "guided_whitespace_pattern": "not supported",
    "guided_decoding_backend": "not supported; the backend is xgrammar",
    "structural_tag": "not supported",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ScreenedFields(BaseModel):
    """Mixed into every generation request: the ignored fields, and the unsupported ones as fields that
    reject any value but null (so the 400 names them, with the reason)."""

    metadata: Optional[dict] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None
    suffix: Any = None
    best_of: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_whitespace_pattern: Any = None
    guided_decoding_backend: Any = None
    structural_tag: Any = None

    @field_validator(*UNSUPPORTED, mode="before")
    @classmethod
    def _unsupported(cls, value, info: ValidationInfo):
        harmless = value is None or (info.field_name == "modalities" and value == ["text"]) \
            or (info.field_name == "best_of" and value == 1)
        if not harmless:
            raise ValueError(UNSUPPORTED[info.field_name])
        return None


# ---- structured outputs -------------------------------------------------------------------

class JsonSchemaFormat(_Strict):
    name: str = Field(max_length=64)
    description: Optional[str] = None
    schema_: Union[dict, bool, None] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs`` object (exactly one constraint)."""

    json_: Union[dict, bool, str, None] = Field(None, alias="json")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None


def constraint_of(response_format: Optional[ResponseFormat],
                  structured: Optional[StructuredOutputs]) -> tuple:
    """``(StructuredSpec or None, the request field it came from)``. Raises ValueError naming the field."""
    if response_format is not None and response_format.type != "text" and structured is not None:
        raise ValueError("structured_outputs: give either response_format or structured_outputs, not both")
    if structured is not None:
        given = {k: v for k, v in structured.model_dump(by_alias=True).items() if v not in (None, False)}
        if len(given) != 1:
            raise ValueError("structured_outputs: give exactly one of json, regex, choice, grammar, json_object")
        (kind, value), = given.items()
        field = f"structured_outputs.{kind}"
        try:
            if kind == "json":
                return StructuredSpec.json_schema(value), field
            if kind == "choice":
                return StructuredSpec.choice(value), field
            if kind == "json_object":
                return StructuredSpec("json_object"), field
            if not value:
                raise ValueError("must not be empty")
            return StructuredSpec(kind, value), field
        except ValueError as e:
            raise ValueError(f"{field}: {e}") from None
    if response_format is None or response_format.type == "text":
        return None, None
    if response_format.type == "json_object":
        return StructuredSpec("json_object"), "response_format"
    if response_format.json_schema is None or response_format.json_schema.schema_ is None:
        raise ValueError("response_format.json_schema.schema: required for type json_schema")
    return StructuredSpec.json_schema(response_format.json_schema.schema_), "response_format.json_schema.schema"


# ---- tools ---------------------------------------------------------------------------------

class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict] = None
    strict: Optional[bool] = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(_Strict):
    name: str
    arguments: str


class MessageToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


def check_tools(tools: Optional[list], tool_choice, has_constraint: bool) -> str:
    """The effective tool choice (``none`` without tools). Raises ValueError naming the field."""
    names = [t.function.name for t in tools or ()]
    if len(set(names)) != len(names):
        raise ValueError("tools: function names must be unique")
    if tool_choice is None:
        return "auto" if names else "none"
    if not names and tool_choice != "none":
        raise ValueError("tool_choice: requires tools")
    if isinstance(tool_choice, NamedToolChoice):
        if tool_choice.function.name not in names:
            raise ValueError(f"tool_choice: no tool named {tool_choice.function.name!r}")
    if has_constraint and (tool_choice == "required" or isinstance(tool_choice, NamedToolChoice)):
        raise ValueError("tool_choice: a forced tool call cannot be combined with response_format or "
                         "structured_outputs")
    return tool_choice
