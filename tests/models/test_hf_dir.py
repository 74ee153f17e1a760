"""Loading Hugging Face directories: tiny random Llama / Qwen2 / Mistral checkpoints saved by
transformers, loaded by us, compared with transformers' forward (prefill and decode steps)."""
from __future__ import annotations

import json

import pytest
import torch

from sift.models.loader import load_model, read_gguf
from sift.models.registry import ModelLoadError
from sift.models.tokenizer import Tokenizer

SMALL = dict(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
CONFIGS = {
    "llama3-rope-untied": ("LlamaConfig", dict(SMALL, tie_word_embeddings=False, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "qwen2-bias-tied": ("Qwen2Config", dict(SMALL, tie_word_embeddings=True)),
    "mistral-linear-rope": ("MistralConfig", dict(SMALL, tie_word_embeddings=False, head_dim=32, sliding_window=None,
                                                  rope_parameters=dict(rope_type="linear", rope_theta=10000.0,
                                                                       factor=2.0))),
}


def _save_random_model(kind: str, cfg: dict, path, tokenizer) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, kind)(**cfg)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # random everything, biases and norms included, so no term can hide
        for name, p in model.named_parameters():
            p.uniform_(0.8, 1.2) if "norm" in name else p.normal_(0.0, 0.05)
    model.save_pretrained(path)
    tokenizer.hf.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def gguf_tokenizer(gguf_path):
    return Tokenizer.from_gguf_metadata(read_gguf(gguf_path).metadata)


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_directory_matches_transformers(name, tmp_path, gguf_tokenizer, one_sequence):
    kind, cfg = CONFIGS[name]
    ref_model = _save_random_model(kind, cfg, tmp_path, gguf_tokenizer)
    loaded = load_model(str(tmp_path), torch.float32, "cpu")
    assert loaded.arch.tie_word_embeddings == cfg["tie_word_embeddings"]
    ids = loaded.tokenizer.encode("The year was 1987, and the rain in Spain fell mainly on the plain.")
    ids = (ids * 4)[:70]  # past original_max_position_embeddings, where llama3 scaling bends
    seq = one_sequence(loaded.model, len(ids) + 3)
    mine = [seq.step(ids[:-3], all_logits=True)] + [seq.step([t]) for t in ids[-3:]]
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0]
    assert (torch.cat(mine) - ref).abs().max() < 1e-4


def test_unknown_architecture_in_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_layer": 2}))
    with pytest.raises(ModelLoadError, match="unknown architecture 'GPT2LMHeadModel'"):
        load_model(str(tmp_path), None, "cpu")


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **SMALL}))
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(str(tmp_path), None, "cpu")


def test_dummy_load_format_needs_only_the_shape(tmp_path, gguf_path, gguf_tokenizer):
    """--load-format dummy: a config.json alone gives a runnable model of that shape with random weights of a
    trained model's scale, the tokenizer taken from --tokenizer; two loads under one seed agree."""
    from sift.server.engine.llm import LLM
    from sift.server.engine.request import SamplingParams

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **SMALL}))
    torch.manual_seed(3)
    loaded = load_model(str(tmp_path), torch.float32, "cpu", load_format="dummy", tokenizer=gguf_path)
    params = dict(loaded.model.named_parameters())
    assert not any(p.is_meta for p in params.values())
    qkv = params["layers.0.self_attn.qkv_proj.weight"]
    assert qkv.shape == (64 + 2 * 32, 64) and 0.015 < qkv.std() < 0.025
    assert torch.equal(params["layers.1.input_layernorm.weight"], torch.ones(64))
    assert loaded.tokenizer.encode("hello world") == gguf_tokenizer.encode("hello world")
    torch.manual_seed(3)
    again = load_model(str(tmp_path), torch.float32, "cpu", load_format="dummy", tokenizer=gguf_path)
    assert torch.equal(dict(again.model.named_parameters())["layers.0.self_attn.qkv_proj.weight"], qkv)

    llm = LLM(model=str(tmp_path), load_format="dummy", tokenizer=gguf_path, num_blocks=64)
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and all(0 <= t < SMALL["vocab_size"] for t in out.token_ids)
    with pytest.raises(ModelLoadError, match="has no \\*.safetensors"):  # the default format still wants weights
        load_model(str(tmp_path), None, "cpu", tokenizer=gguf_path)
    with pytest.raises(ModelLoadError, match="tokenizer path not found"):
        load_model(str(tmp_path), None, "cpu", load_format="dummy", tokenizer=str(tmp_path / "nope"))
