"""Load a model, its tokenizer and its shape from a Hugging Face directory or a GGUF file.

GGUF files are dequantized at load (``gguf.quants.dequantize``) into the target dtype, except the
tensors ``quantization`` keeps quantized (models/gguf_quant.py, models/quant.py), which reach the model
as :class:`sift.models.quant.GroupQuant` in HF layout. The GGUF container itself is parsed here with
``struct`` over an ``mmap`` rather than with ``gguf.GGUFReader``, which builds a numpy view per
vocabulary string and spends ~4 s on the embedded model's metadata alone.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import mmap
import os
import struct
import time
from dataclasses import dataclass
from math import prod
from typing import Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from sift.models.checkpoint import CheckpointWeights, find_weight_files
from sift.models.embedded import EMBEDDED_NAME, embedded_model_path
from sift.models.layers import Linear, calibrate_linear
from sift.models.quant import METHODS, GroupQuant, install_quantized, is_quantizable, quantize_linears, quantize_tensor
from sift.models.registry import ArchConfig, ModelLoadError, model_class
from sift.models.tokenizer import Tokenizer, read_chat_template

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer
    arch: ArchConfig
    name: str


def load_model(path: Optional[str], dtype: Optional[torch.dtype], device, load_format: str = "auto",
               tokenizer: Optional[str] = None, chat_template: Optional[str] = None,
               quantization: str = "auto", group_size: int = 32) -> LoadedModel:
    """``path``: a GGUF file, an HF model directory, or None for the embedded model.
    ``dtype`` None: float32 on CPU, bfloat16 (float16 where unsupported) on CUDA.
    ``load_format`` "dummy": only the shape is read (an HF directory needs just its config.json) and the
    weights are random (vLLM's ``--load-format dummy``): for timing a model whose weights are not here.
    ``tokenizer``: a GGUF file or HF directory to take the tokenizer from instead of ``path``.
    ``chat_template``: a Jinja file that replaces the tokenizer's own chat template.
    ``quantization``: auto keeps a GGUF's quantized tensors quantized and an HF checkpoint as stored; none
    dequantizes everything; int8 / int4 (groups of ``group_size``) quantize the linear weights at load."""
    start = time.perf_counter()
    device = torch.device(device)
    dtype = dtype or _default_dtype(device)
    name = EMBEDDED_NAME if path is None else os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    path = embedded_model_path() if path is None else path
    if quantization not in METHODS:
        raise ModelLoadError(f"quantization {quantization!r} is not one of {', '.join(METHODS)}")
    if load_format not in ("auto", "dummy"):
        raise ModelLoadError(f"load format {load_format!r} is not one of auto, dummy")
    if not os.path.exists(path):
        raise ModelLoadError(f"model path not found: {path}")
    template = read_chat_template(chat_template) if chat_template is not None else None  # before the weights
    gguf_file = None if os.path.isdir(path) else read_gguf(path)
    if load_format == "dummy":
        arch = _read_arch(path, gguf_file)
        model = model_class(arch)(arch)
        _random_weights(model, dtype, device)
        if quantization in ("int8", "int4"):
            quantize_linears(model, quantization, group_size, dtype, device)
    else:
        if gguf_file is None:
            arch, weights = _read_hf_dir(path, dtype, device, _hf_quantizer(quantization, group_size))
        else:
            arch, weights = gguf_weights(gguf_file, dtype, device, quantization, group_size)
        model = model_class(arch)(arch)  # weightless until load_weights
        model.load_weights(weights)
        install_quantized(model, dtype, device)
    model.eval()
    _calibrate_products(model)
    tok = _read_tokenizer(tokenizer) if tokenizer else _read_tokenizer(path, gguf_file)
    if template is not None:
        tok.set_chat_template(template)
    params = list(model.parameters())
    mib = sum(t.numel() * t.element_size() for t in params + list(model.buffers())) / 2**20
    logger.info("loaded %s (%s, %.0f MiB of weights, %s activations on %s, quantization %s%s) in %.1f s", name,
                arch.architecture, mib, str(dtype).removeprefix("torch."), device, quantization,
                ", random weights" if load_format == "dummy" else "", time.perf_counter() - start)
    return LoadedModel(model=model, tokenizer=tok, arch=arch, name=name)


def _read_arch(path: str, gguf_file: Optional["GGUFFile"]) -> ArchConfig:
    """The shape alone: an HF directory's config.json or a GGUF file's metadata."""
    if gguf_file is None:
        return ArchConfig.from_hf_config(_read_json(os.path.join(path, "config.json"), path))
    return gguf_arch(gguf_file)


def _read_tokenizer(path: str, gguf_file: Optional["GGUFFile"] = None) -> Tokenizer:
    if not os.path.exists(path):
        raise ModelLoadError(f"tokenizer path not found: {path}")
    if os.path.isdir(path):
        return Tokenizer.from_hf_dir(path)
    return Tokenizer.from_gguf(path, (gguf_file or read_gguf(path)).metadata)


def _calibrate_products(model: nn.Module) -> None:
    """On CPU in float32, measure which product form each few-row linear runs faster in on this host
    (:func:`sift.models.layers.calibrate_linear`), over the weights a decode step reads: every linear layer in
    forward order, then the logits head (the embedding, when tied); the model is given the choice."""
    weights = [m.weight for m in model.modules() if isinstance(m, Linear)]
    if getattr(model, "lm_head", True) is None:
        weights.append(model.embed_tokens.weight)
    t = time.perf_counter()
    chosen = calibrate_linear(weights)
    model.set_linear_products(chosen)
    if chosen:
        rows = [n for n, yes in chosen.items() if yes]
        logger.info("CPU linear products calibrated in %.1f s: %s", time.perf_counter() - t,
                    f"weight @ x.T at {rows} rows" if rows else "F.linear at every row count")


def _random_weights(model: nn.Module, dtype: torch.dtype, device: torch.device, std: float = 0.02) -> None:
    """Replace every (meta) parameter with random values of a trained model's scale: matrices N(0, std),
    norm weights 1, biases 0. Seeded by the caller's torch seed."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            t = torch.empty(p.shape, dtype=dtype, device=device)
            if p.dim() > 1:
                t.normal_(0.0, std)
            else:
                t.fill_(1.0 if name == "weight" else 0.0)
            setattr(module, name, nn.Parameter(t, requires_grad=False))
    model.to(device)  # buffers too: every rotary cache (Gemma 3 has two)


def _default_dtype(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ---------------------------------------------------------------- Hugging Face directories

def _hf_quantizer(method: str, group_size: int):
    """Per-tensor transform of an HF checkpoint at load: int8/int4 quantize each linear weight as it is
    read, so the float copy of only one tensor is alive at a time."""
    if method not in ("int8", "int4"):
        return lambda name, t: t
    return lambda name, t: quantize_tensor(t, method, group_size) if is_quantizable(name, t.shape) else t


def _read_hf_dir(path: str, dtype, device, transform=None):
    """The shape and a lazy mapping of the weights: each tensor is read (and transformed) when the model takes it."""
    arch = ArchConfig.from_hf_config(_read_json(os.path.join(path, "config.json"), path))
    return arch, CheckpointWeights(find_weight_files(path), dtype, device, transform)


def _read_json(file: str, folder: str) -> dict:
    if not os.path.isfile(file):
        raise ModelLoadError(f"{folder} has no {os.path.basename(file)}")
    with open(file) as f:
        return json.load(f)


# ---------------------------------------------------------------- GGUF files

_MAGIC = b"GGUF"
# metadata value types: scalar ids -> struct format; 8 = string, 9 = array
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_DEFAULT_ALIGNMENT = 32

# llama.cpp tensor names -> HF names (per block, then top level)
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
# llama.cpp interleaves the q/k rows of these architectures for its rotary kernel; HF does not
_PERMUTED_QK = {"llama"}


@dataclass(frozen=True)
class GGUFTensorInfo:
    shape: tuple  # torch order (slowest dimension first)
    ggml_type: int
    offset: int  # absolute, in the file


@dataclass
class GGUFFile:
    path: str
    metadata: dict
    tensors: dict  # GGUF name -> GGUFTensorInfo
    buffer: mmap.mmap


def read_gguf(path: str) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor table; tensor data stays in the mmap."""
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:  # ValueError: empty file
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    if buf[:4] != _MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic bytes)")
    try:
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ModelLoadError(f"{path}: unsupported GGUF version {version}")
        pos, metadata = 24, {}
        for _ in range(n_kv):
            key, pos = _read_str(buf, pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            metadata[key], pos = _read_value(buf, pos + 4, vtype)
        infos = []
        for _ in range(n_tensors):
            name, pos = _read_str(buf, pos)
            (ndim,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{ndim}Q", buf, pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * ndim)
            pos += 16 + 8 * ndim
            infos.append((name, tuple(reversed(dims)), ggml_type, offset))
    except ModelLoadError:
        raise
    except (struct.error, ValueError, OverflowError, MemoryError) as e:  # ValueError: bad UTF-8, short array
        raise ModelLoadError(f"{path} is a corrupt GGUF file ({type(e).__name__} in its header)") from None
    align = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    data_start = (pos + align - 1) // align * align
    tensors = {n: GGUFTensorInfo(s, t, data_start + o) for n, s, t, o in infos}
    for name, info in tensors.items():
        if info.offset + _nbytes(info) > len(buf):
            raise ModelLoadError(f"{path} is a corrupt GGUF file (tensor {name!r} runs past its end)")
    return GGUFFile(path, metadata, tensors, buf)


def _nbytes(info: GGUFTensorInfo) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block_elems, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)]
    except ValueError:
        raise ModelLoadError(f"unknown ggml tensor type {info.ggml_type}") from None
    return prod(info.shape) // block_elems * block_bytes


def _read_str(buf, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    end = pos + 8 + n
    if end > len(buf):
        raise struct.error("string runs past the end of the file")
    return buf[pos + 8:end].decode("utf-8"), end


def _read_value(buf, pos: int, vtype: int):
    if vtype in _SCALAR:
        return struct.unpack_from(_SCALAR[vtype], buf, pos)[0], pos + struct.calcsize(_SCALAR[vtype])
    if vtype == 8:
        return _read_str(buf, pos)
    if vtype == 9:
        etype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype in _SCALAR:
            dt = np.dtype(_SCALAR[etype])
            return np.frombuffer(buf, dt, count, pos).tolist(), pos + count * dt.itemsize
        values = []
        for _ in range(count):
            v, pos = _read_value(buf, pos, etype)
            values.append(v)
        return values, pos
    raise struct.error(f"unknown metadata value type {vtype}")


def dequantize_tensor(buf, info: GGUFTensorInfo) -> torch.Tensor:
    """One tensor as float32 (or its own float type for F16/BF16), in torch order."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(info.ggml_type)  # validated by read_gguf
    n = prod(info.shape)
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        np_type = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}.get(qtype, np.int16)
        t = torch.from_numpy(np.frombuffer(buf, np_type, n, info.offset).copy())
        t = t.view(torch.bfloat16) if qtype == GGMLQuantizationType.BF16 else t
        return t.reshape(info.shape)
    raw = np.frombuffer(buf, np.uint8, _nbytes(info), info.offset)
    try:
        values = dequantize(raw.reshape(n // info.shape[-1], -1), qtype)
    except NotImplementedError:
        raise ModelLoadError(f"ggml tensor type {qtype.name} cannot be dequantized") from None
    return torch.from_numpy(values).reshape(info.shape)


def _unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleaving of q/k (its rotary pairs adjacent dims, HF's pairs halves)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_name(name: str) -> Optional[str]:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    return None


def gguf_arch(gf: GGUFFile) -> ArchConfig:
    """The model's shape from a GGUF file's metadata (and its rope frequency tensor, if any)."""
    try:
        arch = ArchConfig.from_gguf_metadata(gf.metadata, tied="output.weight" not in gf.tensors)
    except KeyError as e:
        raise ModelLoadError(f"{gf.path}: GGUF metadata lacks {e.args[0]!r}") from None
    if "rope_freqs.weight" in gf.tensors:  # Llama 3.1 rope scaling, stored as per-frequency divisors
        factors = dequantize_tensor(gf.buffer, gf.tensors["rope_freqs.weight"]).float().tolist()
        arch = dataclasses.replace(arch, rope_freq_factors=tuple(factors))
    return arch


def gguf_weights(gf: GGUFFile, dtype, device, quantization: str = "none",
                 group_size: int = 32) -> tuple[ArchConfig, dict]:
    """The model's shape and its tensors dequantized to ``dtype`` (or kept quantized as ``quantization`` says:
    :class:`GroupQuant`), under HF names and in HF layout."""
    from gguf import GGMLQuantizationType

    from sift.models.gguf_quant import gguf_quantized

    path, md, tensors = gf.path, gf.metadata, dict(gf.tensors)
    arch = gguf_arch(gf)
    tensors.pop("rope_freqs.weight", None)
    names = {}
    for gguf_name in tensors:
        names[gguf_name] = _hf_name(gguf_name)
        if names[gguf_name] is None:
            raise ModelLoadError(f"{path}: unexpected tensor {gguf_name!r} for architecture {arch.architecture}")
    permuted = md["general.architecture"] in _PERMUTED_QK
    heads = {"attn_q": arch.num_heads, "attn_k": arch.num_kv_heads}

    def convert(gguf_name: str):
        info = tensors[gguf_name]
        raw = np.frombuffer(gf.buffer, np.uint8, _nbytes(info), info.offset)
        t = gguf_quantized(raw, GGMLQuantizationType(info.ggml_type), info.shape, gguf_name, names[gguf_name],
                           quantization, group_size, lambda: dequantize_tensor(gf.buffer, info))
        t = dequantize_tensor(gf.buffer, info) if t is None else t
        kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
        if permuted and kind in heads:
            h = heads[kind]
            t = t.map_rows(lambda x: _unpermute_qk(x, h)) if isinstance(t, GroupQuant) else _unpermute_qk(t, h)
        return t.map_rows(lambda x: x.to(device)) if isinstance(t, GroupQuant) else t.to(device=device, dtype=dtype)

    weights = {}
    for gguf_name in tqdm(tensors, desc="dequantizing", unit="tensor", leave=False):
        weights[names[gguf_name]] = convert(gguf_name)
    return arch, weights
