"""Reading the family-specific parts of a Hugging Face ``config.json`` into :class:`sift.models.registry.ArchConfig`
fields: rope scaling in either the transformers 4 (``rope_theta`` + ``rope_scaling``) or 5 (``rope_parameters``,
per layer type for Gemma 3) layout, per-layer sliding windows, q/k norms, soft-capping, MoE shape.

Kept apart from the registry so that adding a family touches this table, not the registry's contract.
"""
from __future__ import annotations

from typing import Optional

# HF rope type aliases (Phi-3's first releases said "su", transformers 4 said "type")
_ROPE_ALIASES = {"su": "longrope", "mrope": "default"}


def rope_fields(cfg: dict) -> dict:
    """rope_theta, rope_scaling (sorted items), partial_rotary_factor and the local (sliding-layer) rope base,
    plus the context length, which dynamic NTK scaling extends past the configured one."""
    params = cfg.get("rope_parameters") or {}
    local = None
    if "full_attention" in params:  # transformers 5, per layer type (Gemma 3)
        local, params = params.get("sliding_attention"), params["full_attention"]
    scaling = dict(cfg.get("rope_scaling") or params)
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    partial = scaling.pop("partial_rotary_factor", None) or cfg.get("partial_rotary_factor") or 1.0
    scaling.pop("rope_theta", None)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    rope_type = _ROPE_ALIASES.get(scaling.get("rope_type", "default"), scaling.get("rope_type", "default"))
    scaling["rope_type"] = rope_type
    max_pos = cfg.get("max_position_embeddings", 4096)
    if rope_type == "longrope":
        scaling.setdefault("original_max_position_embeddings", cfg.get("original_max_position_embeddings", max_pos))
    if rope_type == "dynamic":
        # HF scales past config.max_position_embeddings; the model then serves factor times that
        scaling["original_max_position_embeddings"] = max_pos
        max_pos = int(max_pos * scaling["factor"])
    if rope_type == "default":
        scaling = {}
    local_theta = cfg.get("rope_local_base_freq")
    if local is not None:
        local_theta = local.get("rope_theta", local_theta)
    return dict(rope_theta=theta, rope_scaling=_frozen(scaling), partial_rotary_factor=float(partial),
                local_rope_theta=local_theta, max_position_embeddings=max_pos)


def _frozen(scaling: dict) -> Optional[tuple]:
    """The scaling dict as sorted (key, value) pairs, lists as tuples (the config stays hashable)."""
    items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in scaling.items()))
    return items or None


def layer_windows(cfg: dict, arch: str, num_layers: int) -> Optional[tuple]:
    """Each layer's own sliding window (0 = full attention), or None when no layer has one.

    ``layer_types`` (transformers 5 writes it) is authoritative; older Gemma configs imply it (Gemma 2:
    even layers slide; Gemma 3: all but every ``sliding_window_pattern``-th); Mistral-style configs apply
    ``sliding_window`` to every layer unless ``use_sliding_window`` is false (Qwen2: only from
    ``max_window_layers`` on)."""
    window = cfg.get("sliding_window") or 0
    if not window or window >= cfg.get("max_position_embeddings", window + 1):
        return None  # no window, or one no sequence can outgrow (Phi-4-mini's 262144)
    types = cfg.get("layer_types")
    if types is None:
        if arch == "Gemma2ForCausalLM":
            types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
        elif arch in ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"):
            pattern = cfg.get("sliding_window_pattern", 6)
            types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]
        elif cfg.get("use_sliding_window", True) is False:
            return None
        else:
            first = cfg.get("max_window_layers", 0) if arch.startswith("Qwen") else 0
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    windows = tuple(window if t == "sliding_attention" else 0 for t in types[:num_layers])
    return windows if any(windows) else None


def family_fields(cfg: dict, arch: str, num_layers: int) -> dict:
    """The fields past the Llama shape that ``arch``'s config sets."""
    fields: dict = dict(layer_windows=layer_windows(cfg, arch, num_layers),
                        hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu")
    if arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM"):
        fields["qk_norm"] = True
    if arch.startswith("Gemma"):
        fields["attn_softcap"] = float(cfg.get("attn_logit_softcapping") or 0.0)
        fields["final_softcap"] = float(cfg.get("final_logit_softcapping") or 0.0)
        if cfg.get("query_pre_attn_scalar"):
            fields["attn_scale"] = float(cfg["query_pre_attn_scalar"]) ** -0.5
    if arch == "Qwen3MoeForCausalLM":
        step, dense = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or ())
        experts = cfg.get("num_experts", cfg.get("num_local_experts", 0))  # transformers 5 says num_local_experts
        fields.update(num_experts=experts, num_experts_per_tok=cfg["num_experts_per_tok"],
                      moe_intermediate_size=cfg["moe_intermediate_size"],
                      norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                      moe_layers=tuple(i for i in range(num_layers)
                                       if i not in dense and experts > 0 and (i + 1) % step == 0))
    return fields
