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
    "LlamaForCausalLM": ("sift.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("sift.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("sift.models.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("sift.models.qwen3", "Qwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("sift.models.moe", "Qwen3MoeForCausalLM"),
    "Gemma2ForCausalLM": ("sift.models.gemma", "GemmaForCausalLM"),
    "Gemma3ForCausalLM": ("sift.models.gemma", "GemmaForCausalLM"),
    "Phi3ForCausalLM": ("sift.models.phi3", "Phi3ForCausalLM"),
}

# llama.cpp's architecture name -> the HF one (SmolLM and Mistral files say "llama").
_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")  # sift.models.layers.rope_cos_sin


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
    sliding_window: Optional[int] = None  # the model's own attention window (every layer, unless layer_windows)
    layer_windows: Optional[tuple] = None  # per layer: its own sliding window, 0 = full attention
    hidden_act: str = "silu"  # the gated MLP's activation (Gemma: gelu_pytorch_tanh)
    qk_norm: bool = False  # RMSNorm of each head's q and k before rotary (Qwen3, Gemma 3)
    attn_softcap: float = 0.0  # attention logit soft-cap (Gemma 2); 0 = none
    final_softcap: float = 0.0  # final logit soft-cap (Gemma 2); 0 = none
    attn_scale: Optional[float] = None  # query scale when not head_dim ** -0.5 (Gemma's query_pre_attn_scalar)
    local_rope_theta: Optional[float] = None  # rope base of the sliding-window layers (Gemma 3)
    partial_rotary_factor: float = 1.0  # the fraction of head_dim that rotary turns (Phi-4-mini: 0.75)
    num_experts: int = 0  # mixture of experts: routed experts per MoE layer
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to 1
    moe_layers: Optional[tuple] = None  # layers whose MLP is the MoE block

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

    def window_of(self, layer: int) -> int:
        """The layer's own sliding window, 0 = full attention."""
        if self.layer_windows is not None:
            return self.layer_windows[layer]
        window = self.sliding_window or 0
        return window if window < self.max_position_embeddings else 0

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ArchConfig":
        archs = cfg.get("architectures") or []
        if not archs:
            raise ModelLoadError("config.json names no architecture")
        arch = archs[0]
        if arch not in _ARCHITECTURES:  # before reading keys an unknown model may not have
            raise ModelLoadError(f"unknown architecture {arch!r}; supported: {', '.join(sorted(_ARCHITECTURES))}")
        from sift.models import hf_config

        heads = cfg["num_attention_heads"]
        rope = hf_config.rope_fields(cfg)
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
            tie_word_embeddings=cfg.get("tie_word_embeddings", arch.startswith("Gemma")),
            attention_bias=cfg.get("attention_bias", arch == "Qwen2ForCausalLM"),
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
            **rope,
            **hf_config.family_fields(cfg, arch, cfg["num_hidden_layers"]),
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
            qk_norm=gguf_arch == "qwen3",
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
