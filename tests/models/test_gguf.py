"""GGUF loading: our dequantized tensors against transformers' GGUF loader, every supported tensor
type through a real file, and the failure modes."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from sift.models.loader import dequantize_tensor, gguf_weights, load_model, read_gguf
from sift.models.registry import ModelLoadError

COLS = 256  # one K-quant super-block, eight Q4/Q8 blocks per row


def test_tensors_equal_transformers(gguf_path, hf_model):
    """Every tensor (q/k included, so llama.cpp's rotary permutation is undone) equals transformers' own load."""
    arch, ours = gguf_weights(read_gguf(gguf_path), torch.float32, "cpu")
    theirs = hf_model.state_dict()
    assert arch.tie_word_embeddings and "lm_head.weight" not in ours
    theirs.pop("lm_head.weight")  # tied: transformers lists the embedding twice
    assert ours.keys() == theirs.keys()
    for name, t in ours.items():
        assert torch.equal(t, theirs[name]), name


def test_arch_matches_transformers_config(gguf_path, hf_model):
    arch, _ = gguf_weights(read_gguf(gguf_path), torch.float32, "cpu")
    cfg = hf_model.config
    assert (arch.num_layers, arch.hidden_size, arch.intermediate_size, arch.vocab_size) == (
        cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size)
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim) == (
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    assert arch.rope_theta == cfg.rope_parameters["rope_theta"]
    assert arch.rms_norm_eps == pytest.approx(cfg.rms_norm_eps)


def _write_one_tensor(path, data: np.ndarray, raw_dtype=None) -> None:
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tensor("t", data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _read_one_tensor(path) -> torch.Tensor:
    gf = read_gguf(str(path))
    return dequantize_tensor(gf.buffer, gf.tensors["t"])


@pytest.mark.parametrize("qtype, rel_err", [(Q.Q8_0, 1 / 127), (Q.Q4_0, 1 / 7), (Q.Q4_1, 1 / 15)])
def test_block_quant_round_trip(tmp_path, qtype, rel_err):
    x = torch.randn(3, COLS, generator=torch.Generator().manual_seed(0)).numpy()
    _write_one_tensor(tmp_path / "q.gguf", gguf.quants.quantize(x, qtype), qtype)
    y = _read_one_tensor(tmp_path / "q.gguf")
    assert y.shape == (3, COLS) and y.dtype == torch.float32
    # each 32-value block is within one quantization step of the input
    err = (y - torch.from_numpy(x)).abs().view(-1, 32).amax(1)
    scale = torch.from_numpy(x).view(-1, 32)
    assert (err <= rel_err * (scale.amax(1) - scale.amin(1)) + 1e-6).all()


@pytest.mark.parametrize("qtype, torch_dtype", [(Q.F32, torch.float32), (Q.F16, torch.float16),
                                                (Q.BF16, torch.bfloat16)])
def test_float_tensors_round_trip(tmp_path, qtype, torch_dtype):
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1)).to(torch_dtype)
    raw = x.view(torch.int16).numpy().view(np.uint8) if torch_dtype == torch.bfloat16 else x.numpy()
    _write_one_tensor(tmp_path / "f.gguf", raw, Q.BF16 if torch_dtype == torch.bfloat16 else None)
    y = _read_one_tensor(tmp_path / "f.gguf")
    assert y.dtype == torch_dtype and torch.equal(y, x)


def _f16_bytes(v: float) -> list[int]:
    return list(np.array([v], np.float16).view(np.uint8))


def test_q6_k_hand_built_blocks(tmp_path):
    """Q6_K: value j of a super-block = d * scales[j // 16] * (q - 32), q a 6-bit code split 4 + 2 bits."""
    rows, q, d = [], 45, 0.125
    scales = np.arange(-8, 8, dtype=np.int8)
    for r in range(2):
        ql = [(q & 0xF) * 0x11] * 128
        qh = [((q >> 4) & 3) * 0x55] * 64
        rows.append(ql + qh + list((scales + r).view(np.uint8)) + _f16_bytes(d * (r + 1)))
    _write_one_tensor(tmp_path / "q6k.gguf", np.array(rows, np.uint8), Q.Q6_K)
    y = _read_one_tensor(tmp_path / "q6k.gguf")
    expected = torch.stack([d * (r + 1) * torch.from_numpy(scales + r).float().repeat_interleave(16) * (q - 32)
                            for r in range(2)])
    assert y.shape == (2, COLS) and torch.equal(y, expected)


def test_q4_k_hand_built_blocks(tmp_path):
    """Q4_K: value j = d * sc[j // 32] * q - dmin * m[j // 32], with 6-bit scales/mins packed in 12 bytes."""
    sc, m, q, d, dmin = np.arange(1, 9), np.arange(15, 7, -1), 11, 0.5, 0.25
    packed = [*sc[:4], *m[:4], *(sc[4:] | (m[4:] << 4))]  # every scale and min < 16: no high bits to spread
    row = _f16_bytes(d) + _f16_bytes(dmin) + packed + [q * 0x11] * 128
    _write_one_tensor(tmp_path / "q4k.gguf", np.array([row], np.uint8), Q.Q4_K)
    y = _read_one_tensor(tmp_path / "q4k.gguf")
    expected = torch.from_numpy(d * sc * q - dmin * m).float().repeat_interleave(32)[None]
    assert y.shape == (1, COLS) and torch.equal(y, expected)


def _assert_one_line_error(path, match):
    with pytest.raises(ModelLoadError, match=match) as e:
        load_model(str(path), torch.float32, "cpu")
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    _assert_one_line_error(tmp_path / "nope.gguf", "not found")


def test_garbage_file(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not a model at all " * 100)
    _assert_one_line_error(tmp_path / "junk.gguf", "not a GGUF file")


def test_truncated_file(tmp_path, gguf_path):
    with open(gguf_path, "rb") as src, open(tmp_path / "cut.gguf", "wb") as dst:
        dst.write(src.read(1 << 17))  # the header alone is larger
    _assert_one_line_error(tmp_path / "cut.gguf", "corrupt")


def test_unknown_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), arch="gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _assert_one_line_error(tmp_path / "gpt2.gguf", "unknown GGUF architecture 'gpt2'")
