"""Architecture registry: what a checkpoint says it is -> the class that runs it, plus its shape.

:class:`ArchConfig` is the one description of a model's shape the rest of the code reads; it is
built from a Hugging Face ``config.json`` or from GGUF metadata and never mutated afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


class ModelLoadError(ValueError):
    """A model could not be loaded; the message is one line that says why."""


# HF architecture name -> (module, class). Imported lazily so the registry is cheap to import.
_ARCHITECTURES = {
    "LlamaForCausalLM": ("models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("models.llama", "LlamaForCausalLM"),
}

# llama.cpp's architecture name -> the HF one (SmolLM and Mistral files say "llama").
_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ArchConfig:
    architecture: str  # HF architecture name, a key of the registry
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # bias on the q/k/v projections (Qwen2)
    rope_scaling: Optional[tuple] = None  # sorted (key, value) pairs of the HF rope_scaling dict
    rope_freq_factors: Optional[tuple] = None  # llama.cpp's rope_freqs: per-frequency divisors of inv_freq
    sliding_window: Optional[int] = None  # the model's own attention window, applied by the runner

    def __post_init__(self) -> None:
        if self.architecture not in _ARCHITECTURES:
            raise ModelLoadError(
                f"unknown architecture {self.architecture!r}; supported: {', '.join(sorted(_ARCHITECTURES))}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        rope_type = self.rope_scaling_dict.get("rope_type", "default")
        if rope_type not in _ROPE_TYPES:
            raise ModelLoadError(f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(_ROPE_TYPES)}")

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling or ())

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ArchConfig":
        archs = cfg.get("architectures") or []
        if not archs:
            raise ModelLoadError("config.json names no architecture")
        arch = archs[0]
        if arch not in _ARCHITECTURES:  # before reading keys an unknown model may not have
            raise ModelLoadError(f"unknown architecture {arch!r}; supported: {', '.join(sorted(_ARCHITECTURES))}")
        # transformers >= 5 folds rope_theta and rope_scaling into rope_parameters
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or rope
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        if scaling.get("rope_type", "default") == "default":
            scaling = {}
        heads = cfg["num_attention_heads"]
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", arch == "Qwen2ForCausalLM"),
            rope_scaling=tuple(sorted(scaling.items())) or None,
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
        )

    @classmethod
    def from_gguf_metadata(cls, md: dict, tied: bool) -> "ArchConfig":
        """``md``: the GGUF key/value metadata; ``tied``: the file has no separate output matrix."""
        gguf_arch = md.get("general.architecture")
        if gguf_arch not in _GGUF_ARCHITECTURES:
            raise ModelLoadError(
                f"unknown GGUF architecture {gguf_arch!r}; supported: {', '.join(sorted(_GGUF_ARCHITECTURES))}")
        p = gguf_arch + "."
        hidden, heads = md[p + "embedding_length"], md[p + "attention.head_count"]
        scaling = {}
        if md.get(p + "rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": md[p + "rope.scaling.factor"]}
        return cls(
            architecture=_GGUF_ARCHITECTURES[gguf_arch],
            vocab_size=md.get(p + "vocab_size") or len(md["tokenizer.ggml.tokens"]),
            hidden_size=hidden,
            intermediate_size=md[p + "feed_forward_length"],
            num_layers=md[p + "block_count"],
            num_heads=heads,
            num_kv_heads=md.get(p + "attention.head_count_kv") or heads,
            head_dim=md.get(p + "attention.key_length") or hidden // heads,
            rms_norm_eps=md.get(p + "attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=md.get(p + "rope.freq_base", 10000.0),
            max_position_embeddings=md.get(p + "context_length", 4096),
            tie_word_embeddings=tied,
            attention_bias=gguf_arch == "qwen2",
            rope_scaling=tuple(sorted(scaling.items())) or None,
            sliding_window=md.get(p + "attention.sliding_window"),
        )


def model_class(arch: ArchConfig):
    """The nn.Module class that runs ``arch``."""
    import importlib

    module, name = _ARCHITECTURES[arch.architecture]
    return getattr(importlib.import_module(module), name)


def supported_architectures() -> tuple[str, ...]:
    return tuple(sorted(_ARCHITECTURES))
