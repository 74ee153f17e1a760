"""Incremental detokenization with stop strings.

Decoding one token at a time is wrong for byte-level BPE (a character may span
tokens) and for tokenizers that merge spaces, so each step decodes a short
window of recent tokens and emits only the text that became stable. Text that
could still turn into a stop string is held back until it cannot.
"""
from __future__ import annotations

from typing import Optional


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list, stop: tuple = (), skip_special_tokens: bool = True,
                 include_stop_str: bool = False):
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special = skip_special_tokens
        self.include_stop = include_stop_str
        self.tokens: list = list(prompt_token_ids[-6:])  # context so the first output token decodes right
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.text = ""  # all stable output text
        self.emitted = 0  # chars of self.text already returned
        self.stop_hit: Optional[str] = None
        self._hold = max((len(s) for s in stop), default=1) - 1

    def _decode(self, ids: list) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add(self, token_ids: list, finished: bool = False) -> str:
        """Feed new tokens; returns the new text to emit (possibly empty)."""
        for t in token_ids:
            if self.stop_hit is not None:
                break
            self.tokens.append(t)
            prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
            full = self._decode(self.tokens[self.prefix_offset:])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                self.text += full[len(prefix):]
                self.prefix_offset = self.read_offset
                self.read_offset = len(self.tokens)
            if self.stop:
                self._check_stop()
        if self.stop_hit is not None or finished:
            end = len(self.text)
        else:
            end = max(self.emitted, len(self.text) - self._hold)
        new = self.text[self.emitted:end]
        self.emitted = end
        return new

    def _check_stop(self) -> None:
        # only the tail can newly contain a stop string
        window_start = max(0, self.emitted - self._hold - 1)
        best = None
        for s in self.stop:
            i = self.text.find(s, window_start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self.text = self.text[: i + len(s) if self.include_stop else i]
            self.stop_hit = s
