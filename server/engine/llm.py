"""Offline generation: ``LLM(model=...).generate(prompts, sampling_params)``."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Union

from sift.server.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from sift.server.engine.llm_engine import LLMEngine
from sift.server.engine.request import SamplingParams


@dataclass
class CompletionOutput:
    """One finished generation."""

    prompt_token_ids: list
    text: str
    token_ids: list
    finish_reason: str
    logprobs: list = field(default_factory=list)  # per token: (logprob, [(id, logprob), ...])
    prompt_logprobs: Optional[list] = None
    num_cached_tokens: int = 0
    stop_reason: object = None


class LLM:
    """Batch generation for scripts and tests. Keyword arguments map onto the config dataclasses:
    ``LLM(model=None, dtype="auto", num_blocks=..., block_size=16, max_num_batched_tokens=...)``."""

    def __init__(self, model: Optional[str] = None, config: Optional[EngineConfig] = None, **kwargs):
        if config is None:
            config = EngineConfig()
        sections = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig}
        updates = {}
        for name, cls in sections.items():
            fields = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.__dataclass_fields__}
            if name == "model" and model is not None:
                fields["model"] = model
            if fields:
                updates[name] = replace(getattr(config, name), **fields)
        if "attention_backend" in kwargs:
            updates["attention_backend"] = kwargs.pop("attention_backend")
        if kwargs:
            raise TypeError(f"unknown LLM arguments: {sorted(kwargs)}")
        self.engine = LLMEngine(replace(config, **updates))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Union[str, Sequence], sampling_params: Union[SamplingParams, Sequence, None] = None,
                 priorities: Optional[Sequence[int]] = None) -> list[CompletionOutput]:
        """``prompts``: a string, a list of strings, or a list of token-id lists.
        Every request is validated before any is queued (ValueError names the field)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts must not be empty")
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("sampling_params: one per prompt, or a single one")
        encoded = []
        for p, sp in zip(prompts, params):
            ids = self.tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p)
            sp.validate_for_model(self.engine.vocab_size, len(ids), self.engine.max_model_len)
            encoded.append(ids)
        rids = []
        for i, (ids, sp) in enumerate(zip(encoded, params)):
            rid = f"offline-{next(self._ids)}"
            self.engine.add_request(rid, ids, sp, priority=priorities[i] if priorities else 0)
            rids.append(rid)
        results = {rid: CompletionOutput(ids, "", [], "") for rid, ids in zip(rids, encoded)}
        pending = set(rids)
        while pending:
            for out in self.engine.step():
                if out.request_id not in results:
                    continue
                r = results[out.request_id]
                r.text += out.new_text
                r.token_ids.extend(out.new_token_ids)
                r.logprobs.extend(out.new_logprobs)
                if out.prompt_logprobs is not None:
                    r.prompt_logprobs = out.prompt_logprobs
                if out.finished:
                    r.finish_reason = out.finish_reason
                    r.num_cached_tokens = out.num_cached_tokens
                    r.stop_reason = out.stop_reason
                    pending.discard(out.request_id)
        return [results[rid] for rid in rids]
