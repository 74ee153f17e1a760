"""Models served with quantized weights against the float path (the full measurement: bench/quant_quality.py).

The embedded Q4_1 GGUF kept quantized (``auto``) and dequantized (``none``) hold the same weights, so only the
kernels' arithmetic differs: perplexity on real text within 0.5%, and the same greedy tokens. A tiny random
HF checkpoint quantized at load: int8 within 1% perplexity, int4 close.
"""
from __future__ import annotations

import math

import pytest
import torch

from sift.bench.quant_quality import gpl_text, humaneval_prompts, pydoc_text
from sift.models.loader import load_model
from sift.models.quant import Int4Linear, Int8BlockLinear, Int8Linear, QuantizedEmbedding


def _perplexity(model, ids: list, one_sequence) -> float:
    logits = one_sequence(model, len(ids)).step(ids, all_logits=True)
    nll = -logits[:-1].log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])
    return math.exp(nll.mean().item())


@pytest.fixture(scope="module")
def quantized(gguf_path):
    return load_model(gguf_path, torch.float32, "cpu", quantization="auto")


@pytest.fixture(scope="module")
def texts(ours):
    tok = ours.tokenizer
    return {"pydoc": tok.encode(pydoc_text(), add_special_tokens=False)[:384],
            "gpl3": tok.encode(gpl_text(), add_special_tokens=False)[:384]}


def test_auto_keeps_the_gguf_quantized(quantized, ours):
    model = quantized.model
    assert isinstance(model.embed_tokens, QuantizedEmbedding)  # Q8_0
    assert isinstance(model.lm_head, Int8BlockLinear)  # the tied head, from the same Q8_0 blocks
    assert all(isinstance(m, Int4Linear) for layer in model.layers
               for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                         layer.mlp.down_proj))
    weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
                       if t.dim() > 1 and t is not model.rotary.cos_sin_cache)
    float_bytes = sum(p.numel() * p.element_size() for p in ours.model.parameters())
    assert weight_bytes < 0.3 * float_bytes


@pytest.mark.slow  # ~80 s each on 2 cores; bench/quant_quality.py measures the same
@pytest.mark.parametrize("text", ["pydoc", "gpl3"])
def test_gguf_int4_perplexity_within_half_a_percent(quantized, ours, texts, text, one_sequence):
    ppl_q = _perplexity(quantized.model, texts[text], one_sequence)
    ppl_f = _perplexity(ours.model, texts[text], one_sequence)
    assert abs(ppl_q / ppl_f - 1) < 0.005, (ppl_q, ppl_f)


@pytest.mark.slow  # 2 x 3 x 32 one-token steps; the 20-prompt measurement is bench/quant_quality.py
def test_gguf_int4_greedy_matches_float(quantized, ours, one_sequence):
    prompts = humaneval_prompts(ours.tokenizer, 3)
    same = [one_sequence(quantized.model, len(p) + 32).greedy(p, 32, ()) ==
            one_sequence(ours.model, len(p) + 32).greedy(p, 32, ()) for p in prompts]
    assert sum(same) >= 2, same


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, ours):
    import transformers

    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.8, 1.2) if "norm" in name else p.normal_(0.0, 0.05)
    model.save_pretrained(path)
    ours.tokenizer.hf.save_pretrained(path)
    return str(path)


@pytest.mark.slow  # writes and loads a checkpoint three times; bench/quant_quality.py measures the same
def test_hf_checkpoint_quantized_at_load(tiny_hf, texts, one_sequence):
    ids = texts["pydoc"][:256]
    ppl = {}
    for method in ("none", "int8", "int4"):
        loaded = load_model(tiny_hf, torch.float32, "cpu", quantization=method, group_size=32)
        layer = loaded.model.layers[0].mlp.gate_up_proj
        assert isinstance(layer, {"none": torch.nn.Linear, "int8": Int8Linear, "int4": Int4Linear}[method])
        assert isinstance(loaded.model.embed_tokens, torch.nn.Embedding)  # embeddings stay as stored
        ppl[method] = _perplexity(loaded.model, ids, one_sequence)
    assert abs(ppl["int8"] / ppl["none"] - 1) < 0.01, ppl
    assert abs(ppl["int4"] / ppl["none"] - 1) < 0.05, ppl
