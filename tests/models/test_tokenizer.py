"""Our GGUF-built tokenizer against transformers' own GGUF tokenizer for the same file."""
from __future__ import annotations

import os

import pytest

from sift.models.loader import read_gguf
from sift.models.tokenizer import Tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 1969, 3 astronauts flew 384,400 km; it cost $25.4 billion (about 2.2% of GDP).",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🎉🚀 and  double   spaces\t\ttabs\n\n\nnewlines",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "It's what they'd've said: don't, won't, I'm, you'll, we've.",
    "   leading spaces and trailing ones   ",
]


@pytest.fixture(scope="module")
def ours(gguf_path):
    return Tokenizer.from_gguf_metadata(read_gguf(gguf_path).metadata)


@pytest.fixture(scope="module")
def theirs(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(ours, theirs, text):
    ids = ours.encode(text)
    assert ids == theirs.encode(text)
    assert ours.decode(ids) == theirs.decode(ids) == text


def test_special_tokens_stay_whole_and_can_be_skipped(ours):
    ids = ours.encode("<|im_start|>user\nhello<|im_end|>")
    assert ours.convert_ids_to_tokens([ids[0], ids[-1]]) == ["<|im_start|>", "<|im_end|>"]
    assert ours.decode(ids, skip_special_tokens=True) == "user\nhello"


def test_chat_template_and_special_ids(ours, theirs):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages).endswith("<|im_start|>assistant\n")
    assert not ours.apply_chat_template(messages, add_generation_prompt=False).endswith("assistant\n")
    assert ours.bos_token_id == theirs.bos_token_id == 1
    assert set(ours.eos_token_ids) == {theirs.convert_tokens_to_ids("<|im_end|>"),
                                       theirs.convert_tokens_to_ids("<|endoftext|>")}
    assert ours.eos_token_ids[0] == theirs.eos_token_id
    assert ours.vocab_size == len(theirs) == 49152
    assert ours.encode("hi", add_special_tokens=True) == ours.encode("hi", add_special_tokens=False)  # no BOS


def test_hf_directory_round_trip(ours, tmp_path):
    """A tokenizer saved as an HF directory loads back through the HF-directory path unchanged."""
    ours.hf.save_pretrained(tmp_path)
    again = Tokenizer.from_hf_dir(str(tmp_path))
    for text in TEXTS:
        assert again.encode(text) == ours.encode(text)
    assert again.eos_token_ids[0] == ours.eos_token_ids[0] and again.hf.chat_template == ours.hf.chat_template
