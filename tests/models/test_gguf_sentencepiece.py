"""SentencePiece GGUF files (``tokenizer.ggml.model == "llama"``: Llama 2, Mistral <= v0.3).

The fixture is written as llama.cpp's converter writes one: a real SentencePiece BPE model (byte
fallback, trained here on a few sentences) exported as tokens / scores / token types, and a tiny random
transformers Llama whose q/k rows are permuted into llama.cpp's rotary order. SentencePiece itself is
the tokenizer oracle; transformers' forward is the logits oracle.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from sift.models.loader import load_model

spm = pytest.importorskip("sentencepiece")

CORPUS = ["The year was 1987, and the rain in Spain fell mainly on the plain.",
          "Hello world! How are you today? I am fine, thank you.",
          "Sift serves large language models with a paged KV cache and continuous batching.",
          "SentencePiece splits words into pieces; byte fallback spells what it has never seen."] * 20
TEXTS = ["Hello Spain, 1987 \u00fc!", "  two leading spaces\nand a newline", "The plain rain.", "\u65e5\u672c\u8a9e",
         "tabs\tand   runs of spaces "]
TEMPLATE = "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py q/k permutation: rotary pairs become adjacent rows."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, sp, model) -> None:
    import gguf

    cfg = model.config
    n = sp.vocab_size()
    types = [UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i) else NORMAL
             for i in range(n)]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-spm-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(TEMPLATE)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        for gguf_name, hf_name in names.items():
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", sd[p + hf_name + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    """(path of the GGUF, the SentencePiece processor, the transformers model)."""
    import transformers

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=proto, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=sp.vocab_size(), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.8, 1.2) if "norm" in name else p.normal_(0.0, 0.05)
    path = tmp_path_factory.mktemp("spm") / "tiny-spm-llama.F32.gguf"
    _write_gguf(path, sp, model)
    return path, sp, model


@pytest.fixture(scope="module")
def loaded(spm_gguf):
    return load_model(str(spm_gguf[0]), torch.float32, "cpu")


def test_tokens_equal_sentencepiece_and_round_trip(spm_gguf, loaded):
    sp, tok = spm_gguf[1], loaded.tokenizer
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == [sp.bos_id()] + sp.encode(text), text
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(ids[1:]) == sp.decode(ids[1:])
    assert tok.bos_token_id == sp.bos_id() and sp.eos_id() in tok.eos_token_ids
    # control tokens written in text stay whole, as in a chat template (SentencePiece alone spells them out)
    assert tok.encode("a</s>", add_special_tokens=False) == sp.encode("a") + [sp.eos_id()]
    assert tok.vocab_size == sp.vocab_size()


def test_chat_template_from_the_file(loaded):
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<s>[user] hi\n"
    assert loaded.tokenizer.encode(text, add_special_tokens=False)[0] == 1  # <s> stays one special token


def test_forward_matches_transformers(spm_gguf, loaded, one_sequence):
    model = spm_gguf[2]
    ids = loaded.tokenizer.encode(TEXTS[0] + " " + TEXTS[2])
    seq = one_sequence(loaded.model, len(ids) + 2)
    mine = [seq.step(ids[:-2], all_logits=True)] + [seq.step([t]) for t in ids[-2:]]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    assert (torch.cat(mine) - ref).abs().max() < 1e-4


def test_other_tokenizer_models_are_refused_by_name():
    from sift.models.registry import ModelLoadError
    from sift.models.tokenizer import Tokenizer

    with pytest.raises(ModelLoadError, match="GGUF tokenizer model 'bert' is not supported"):
        Tokenizer.from_gguf("unused.gguf", {"tokenizer.ggml.model": "bert"})
