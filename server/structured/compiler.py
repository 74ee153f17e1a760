"""The xgrammar adapter: compile a :class:`StructuredSpec` into a token-level grammar, cached.

Why xgrammar: it is the default structured-output backend of both vLLM and SGLang, installs from
PyPI as a wheel (no Rust toolchain), compiles JSON schemas, regexes, EBNF and Lark, and ships
CPU (C++) and CUDA (Triton) kernels for applying token bitmasks. See docs/structured_outputs.md.

Compilation costs milliseconds (a JSON schema: ~5-10 ms for the 49k-token SmolLM2 vocabulary);
it runs in the API process before the request enters the engine's queue (``AsyncEngine
.compile_grammar`` uses a worker thread), so the engine thread never waits on it. The LRU cache
is keyed by the spec's canonical text; a hit costs a dictionary lookup.
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from sift.server.structured.spec import StructuredSpec

# xgrammar's C++ errors read "[hh:mm:ss] /project/cpp/file.cc:123: message"
_LOCATION = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


@dataclass(frozen=True)
class Compiled:
    """A compiled grammar, plus a token filter ANDed into its bitmask every step (or None)."""

    grammar: object  # xgrammar.CompiledGrammar
    token_filter: Optional[torch.Tensor] = None  # int32 [ceil(V / 32)], a set bit allows the token


def _no_control_filter(decoded_vocab: list, vocab_size: int) -> torch.Tensor:
    """Bitmask of the tokens without raw control bytes (0x00-0x1f). xgrammar's JSON string rule admits
    them, but JSON forbids them unescaped (``json.loads`` rejects them); compact JSON needs none."""
    allowed = np.ones(-(-vocab_size // 32) * 32, dtype=bool)
    for i, token in enumerate(decoded_vocab[:vocab_size]):
        if any(b < 0x20 for b in token):
            allowed[i] = False
    allowed[len(decoded_vocab):] = False
    # special tokens (EOS) decode to their text form, so they stay allowed
    words = (allowed.reshape(-1, 32).astype(np.int64) << np.arange(32, dtype=np.int64)).sum(axis=1)
    return torch.from_numpy(words.astype(np.uint32).view(np.int32).copy())


class GrammarError(ValueError):
    """The constraint cannot be compiled; the message says why (shown to the client as a 400)."""


def _ebnf_string(text: str) -> str:
    escaped = (text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               .replace("\r", "\\r").replace("\t", "\\t"))
    return f'"{escaped}"'


def _reason(exc: Exception) -> str:
    lines = [_LOCATION.sub("", line).strip() for line in str(exc).strip().splitlines()]
    return " ".join(line for line in lines if line) or type(exc).__name__


class GrammarCompiler:
    """Compiles specs for one tokenizer; thread-safe. ``last_compile_s`` and ``last_hit`` describe the
    latest :meth:`compile` call (read by the caller that made it, for metrics)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids, cache_size: int = 256,
                 max_threads: int = 1) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        # the model's vocabulary may be padded past the tokenizer's: masks must cover every logit
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer.hf, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        self.vocab_size = vocab_size
        # our own LRU in front (xgrammar's cache would hash the schema again under its own lock)
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache_size
        self._json_filter: Optional[torch.Tensor] = None
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def compile(self, spec: StructuredSpec) -> StructuredSpec:
        """A copy of ``spec`` carrying its compiled grammar. Raises :class:`GrammarError`."""
        return StructuredSpec(spec.kind, spec.value, compiled=self.get(spec)[0])

    def cached(self, spec: StructuredSpec):
        """The compiled grammar if it is in the cache (counted as a hit), else None."""
        with self._lock:
            compiled = self._cache.get(spec.key)
            if compiled is not None:
                self._cache.move_to_end(spec.key)
                self.hits += 1
            return compiled

    def get(self, spec: StructuredSpec) -> tuple:
        """``(Compiled, seconds spent compiling or 0.0 on a cache hit)``."""
        compiled = self.cached(spec)
        if compiled is not None:
            return compiled, 0.0
        t0 = time.perf_counter()
        compiled = Compiled(self._compile(spec), self._json_token_filter() if spec.kind.startswith("json") else None)
        seconds = time.perf_counter() - t0
        with self._lock:
            self.misses += 1
            self._cache[spec.key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled, seconds

    def _json_token_filter(self) -> torch.Tensor:
        if self._json_filter is None:
            self._json_filter = _no_control_filter(self.tokenizer_info.decoded_vocab, self.vocab_size)
        return self._json_filter

    def _compile(self, spec: StructuredSpec):
        c = self._compiler
        try:
            if spec.kind == "json_schema":
                # compact JSON: no free whitespace, which small models otherwise emit until max_tokens
                return c.compile_json_schema(spec.value, any_whitespace=False, strict_mode=True)
            if spec.kind == "json_object":
                return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if spec.kind == "regex":
                return c.compile_regex(spec.value)
            if spec.kind == "choice":
                alternatives = " | ".join(_ebnf_string(s) for s in json.loads(spec.value))
                return c.compile_grammar(f"root ::= {alternatives}")
            if "::=" in spec.value:  # EBNF (GBNF), else Lark, as vLLM tells them apart
                return c.compile_grammar(spec.value)
            return c.compile_grammar(self._xgr.Grammar.from_lark(spec.value))
        except (RuntimeError, ValueError, TypeError) as e:
            raise GrammarError(f"cannot compile the {spec.kind.replace('_', ' ')}: {_reason(e)}") from None
