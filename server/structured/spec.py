"""What a constrained request asks for, independent of the grammar engine.

A :class:`StructuredSpec` is hashable and canonical (JSON schemas are re-serialised compactly,
keeping their key order, which decides the order of the generated properties), so it is the
compile cache's key. The compiled grammar rides along in
``compiled`` once the API layer compiled it off the engine thread; equality and hashing ignore it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredSpec:
    """``kind`` is one of :data:`KINDS`; ``value`` is the canonical text of the constraint:
    a JSON schema (sorted keys), a regex, a JSON list of choices, or an EBNF/Lark grammar."""

    kind: str
    value: str = ""
    compiled: Any = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind must be one of {KINDS}, not {self.kind!r}")

    @classmethod
    def json_schema(cls, schema) -> "StructuredSpec":
        """``schema``: a dict, or a JSON string (ValueError when it does not parse to an object)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("the JSON schema must be a JSON object")
        # key order is kept: xgrammar generates properties in the order the schema lists them
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))

    @classmethod
    def choice(cls, choices: list) -> "StructuredSpec":
        if not choices or not all(isinstance(c, str) for c in choices):
            raise ValueError("choice must be a non-empty list of strings")
        return cls("choice", json.dumps(list(choices)))

    @property
    def key(self) -> tuple:
        return self.kind, self.value
