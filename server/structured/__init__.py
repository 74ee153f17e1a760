"""Structured outputs and tool calling.

``spec.py``      what a request asks for (:class:`StructuredSpec`), validated at the API edge
``compiler.py``  the xgrammar adapter: tokenizer info, an LRU cache of compiled grammars keyed by spec
``masks.py``     per-request matchers and the batched bitmask step the sampler calls
``tools.py``     tool definitions -> forced-call schemas, prompts for templates without a tools section
``tool_parsers.py``  model output -> OpenAI ``tool_calls`` (Hermes ``<tool_call>`` and plain JSON), streaming too

xgrammar is imported lazily (``compiler.py``/``masks.py``), so a server that never sees a
constrained request pays nothing for it.
"""
