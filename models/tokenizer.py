"""Tokenizer and chat template, always from the same source as the weights.

An HF directory brings its own tokenizer files. A GGUF file carries its vocabulary, merges, special
token ids and chat template as metadata (``tokenizer.ggml.*``); from those we build a byte-level
BPE ``tokenizers.Tokenizer`` directly, which takes well under a second. A SentencePiece vocabulary
(``tokenizer.ggml.model == "llama"``: Llama 2, Mistral <= v0.3) goes through transformers' own GGUF
tokenizer conversion, with SentencePiece's whitespace handling restored (see :func:`_sentencepiece`).
"""
from __future__ import annotations

import logging
from functools import lru_cache
from typing import Optional

from sift.models.registry import ModelLoadError

logger = logging.getLogger(__name__)

# Tokens that end a turn or a document in the common chat vocabularies.
_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<|end|>",
                "<end_of_turn>", "</s>")

# How text is split before BPE, by llama.cpp's `tokenizer.ggml.pre` name.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx")}
_SPLITS.update({name: _QWEN2_SPLIT for name in ("qwen2", "deepseek-r1-qwen")})
# GPT-2's own split, after isolating every digit (the vocabulary has no multi-digit tokens)
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_GPT2 = ("gpt-2", "default")

# Arguments of transformers' apply_chat_template that a request's chat_template_kwargs may not override
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs"})
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_SPACE = "\u2581"  # SentencePiece's spelling of a space


class Tokenizer:
    """A thin wrapper over an HF fast tokenizer (``self.hf``) with the few calls the server makes."""

    def __init__(self, hf, extra_eos_ids=()):
        self.hf = hf
        vocab = hf.get_vocab()
        special = set(hf.all_special_tokens) | {t.content for t in hf.added_tokens_decoder.values() if t.special}
        ids = [hf.eos_token_id] + list(extra_eos_ids) + [vocab[t] for t in _END_MARKERS if t in special]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in ids if i is not None))
        self.bos_token_id = hf.bos_token_id
        self.vocab_size = len(hf)

    @classmethod
    def from_hf_dir(cls, path: str) -> "Tokenizer":
        import json
        import os

        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load the tokenizer of {path}: {str(e).splitlines()[0]}") from None
        extra = []
        gen_config = os.path.join(path, "generation_config.json")
        if os.path.isfile(gen_config):
            with open(gen_config) as f:
                eos = json.load(f).get("eos_token_id")
            extra = eos if isinstance(eos, list) else [eos]
        return cls(hf, extra)

    @classmethod
    def from_gguf(cls, path: str, md: dict) -> "Tokenizer":
        """The tokenizer of the GGUF file ``path`` whose metadata is ``md``."""
        kind = md.get("tokenizer.ggml.model")
        if kind == "llama":
            return cls(_sentencepiece(path, md))
        if kind != "gpt2":
            raise ModelLoadError(f"GGUF tokenizer model {kind!r} is not supported "
                                 "(byte-level BPE 'gpt2' and SentencePiece 'llama' are)")
        return cls.from_gguf_metadata(md)

    @classmethod
    def from_gguf_metadata(cls, md: dict) -> "Tokenizer":
        from transformers import PreTrainedTokenizerFast

        kind = md.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ModelLoadError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
        tokens = md["tokenizer.ggml.tokens"]
        backend = _byte_level_bpe(tokens, md.get("tokenizer.ggml.merges", []), md.get("tokenizer.ggml.pre"),
                                  md.get("tokenizer.ggml.token_type") or [], md.get("tokenizer.ggml.add_bos_token"),
                                  md.get("tokenizer.ggml.bos_token_id"))

        def token(key):
            i = md.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[i] if i is not None and i < len(tokens) else None

        hf = PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token=token("bos"), eos_token=token("eos"), unk_token=token("unknown"),
            pad_token=token("padding"), chat_template=md.get("tokenizer.chat_template"),
            clean_up_tokenization_spaces=False)
        return cls(hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids):
        return self.hf.convert_ids_to_tokens(ids)

    def set_chat_template(self, template: str) -> None:
        self.hf.chat_template = template

    @property
    def template_renders_tools(self) -> bool:
        """Whether the chat template has a tools section (else tools are described in a system message)."""
        return bool(self.hf.chat_template) and "tools" in self.hf.chat_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            template_kwargs: Optional[dict] = None, tools: Optional[list] = None) -> str:
        """The prompt text; ``template_kwargs`` (e.g. Qwen3's ``enable_thinking``) are variables of the
        template. ValueError when there is no template or a kwarg would override one the call sets."""
        if not self.hf.chat_template:
            raise ValueError("this model has no chat template; use the completions endpoint")
        template_kwargs = template_kwargs or {}
        reserved = sorted(set(template_kwargs) & RESERVED_TEMPLATE_KWARGS)
        if reserved:
            raise ValueError(f"chat_template_kwargs: {reserved[0]!r} is set by the server, not the request")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           tools=tools, **template_kwargs)


def read_chat_template(path: str) -> str:
    """The text of a Jinja chat template file, checked to parse (ModelLoadError naming the line if not)."""
    import jinja2

    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ModelLoadError(f"cannot read the chat template {path}: {e.strerror}") from None
    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ModelLoadError(f"chat template {path}, line {e.lineno}: {e.message}") from None
    return text


def _sentencepiece(path: str, md: dict):
    """A SentencePiece BPE vocabulary with byte fallback, built by transformers from the GGUF file.

    transformers spells the space prefix with a ``Metaspace`` pre-tokenizer, which adds no ``▁`` to text
    that already starts with a space ("  hi" -> "▁▁hi"); SentencePiece (``add_dummy_prefix``), llama.cpp
    and the models' own tokenizer.json prepend one always ("▁▁▁hi"). So the prefix comes from a
    normalizer, as in Llama 2's tokenizer.json, and the decoder removes exactly that one space.
    """
    import os

    from tokenizers import decoders, normalizers
    from transformers import PreTrainedTokenizerFast

    folder, name = os.path.split(os.path.abspath(path))
    try:
        hf = PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot build the SentencePiece tokenizer of {path}: {str(e).splitlines()[0]}") from None
    prefix = md.get("tokenizer.ggml.add_space_prefix", True)
    backend = hf.backend_tokenizer
    replace = normalizers.Replace(" ", _SPACE)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), replace]) if prefix else replace
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return hf


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable bytes stay themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}


def _byte_level_bpe(tokens, merges, pre, token_types, add_bos, bos_id):
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend

    byte_map = _byte_alphabet()
    alphabet = set(byte_map.values())
    # a token written with characters outside the byte alphabet is spelled through it, as the merges are
    vocab = {t if set(t) <= alphabet else "".join(byte_map[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False))
    if pre in _SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _DIGITS_THEN_GPT2:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        if pre not in _GPT2:
            logger.warning("unknown GGUF pre-tokenizer %r; splitting text as GPT-2 does", pre)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # control tokens stay whole and are special; user-defined ones (e.g. <think>) stay whole but are text
    byte_level_spelled = [set(t) <= alphabet for t in tokens]
    backend.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True)
                                for i, kind in enumerate(token_types) if kind == _CONTROL and byte_level_spelled[i]])
    backend.add_tokens([AddedToken(tokens[i], normalized=False, special=False)
                        for i, kind in enumerate(token_types) if kind == _USER_DEFINED and byte_level_spelled[i]])
    if add_bos and bos_id is not None:
        bos = tokens[bos_id]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    return backend
