"""Frozen configuration, one dataclass per concern, validated at construction.

Nothing here is mutated after start-up: a component that needs a derived value
computes it from the config, it never writes it back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from sift.server.options import EvictionOptions, SkipOptions, SparsityOptions, SpecConfig


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class ModelConfig:
    """Where the weights come from and how they are held in memory.

    ``model`` is a path to a GGUF file, a Hugging Face model directory, or
    ``None`` for the embedded default (SmolLM2-135M-Instruct GGUF).
    """

    model: Optional[str] = None
    served_model_name: Optional[str] = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: Optional[int] = None  # default: the model's own context length
    seed: int = 0
    load_format: str = "auto"  # auto | dummy (random weights of the model's shape, for timing)
    tokenizer: Optional[str] = None  # GGUF file or HF directory of the tokenizer (default: the model's own)
    chat_template: Optional[str] = None  # Jinja file that replaces the tokenizer's chat template
    # auto: a GGUF's quantized tensors stay quantized, an HF checkpoint as stored; none: all dequantized;
    # int8 / int4: linear weights quantized at load (int4 in groups of quantization_group_size inputs)
    # default none until bench/quant_quality.py has measured the int4 path's perplexity and greedy agreement
    # against the float path (issue #33's must-show); then auto
    quantization: str = "none"
    quantization_group_size: int = 32
    # run every step eagerly: no torch.compile of plain decode steps (server/runner/compiled.py). On by default
    # on CPU, where the compiled path does not pay yet (docs/compiled.md)
    enforce_eager: bool = True

    def __post_init__(self) -> None:
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16"), f"dtype: unknown value {self.dtype!r}")
        _check(self.device in ("auto", "cpu", "cuda"), f"device: unknown value {self.device!r}")
        _check(self.load_format in ("auto", "dummy"), f"load_format: unknown value {self.load_format!r}")
        _check(self.quantization in ("auto", "none", "int8", "int4"),
               f"quantization: unknown value {self.quantization!r}")
        _check(self.quantization_group_size in (32, 64, 128, 256), "quantization_group_size must be one of "
               "32, 64, 128, 256")
        _check(self.max_model_len is None or self.max_model_len > 0, "max_model_len must be > 0")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache. ``kv_cache_memory`` is bytes (> 1) or a fraction of free memory (<= 1); None (the
    default): on a GPU a quarter of its free memory, on the CPU a fixed pool of ``CPU_KV_CACHE_BYTES`` or
    what ``max_num_seqs`` full contexts need, whichever is smaller (never a share of host RAM)."""

    CPU_KV_CACHE_BYTES = 4 * 2**30
    GPU_KV_CACHE_FRACTION = 0.25

    block_size: int = 16
    kv_cache_memory: Optional[float] = None
    num_blocks: Optional[int] = None  # overrides kv_cache_memory (tests, benchmarks)
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _check(self.block_size in (8, 16, 32, 64, 128), "block_size must be one of 8, 16, 32, 64, 128")
        _check(self.kv_cache_memory is None or self.kv_cache_memory > 0, "kv_cache_memory must be > 0")
        _check(self.num_blocks is None or self.num_blocks >= 2, "num_blocks must be >= 2")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_queued_requests: int = 1024
    long_prefill_token_threshold: int = 0  # 0 = no per-request chunk cap beyond the budget
    # optimistic: admit while this step's blocks are free, preempt when the pool runs dry (vLLM's rule);
    # reserve: admit only while every running request's peak KV fits the pool at once, so nothing is ever
    # preempted; an evicting request's peak is its resident bound (C + W + drafts), not its length
    admission: str = "optimistic"

    def __post_init__(self) -> None:
        _check(self.admission in ("optimistic", "reserve"), f"admission: unknown value {self.admission!r}")
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1")
        _check(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
        _check(self.max_queued_requests >= 1, "max_queued_requests must be >= 1 (0 would reject every request)")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    max_request_body_bytes: int = 4 * 2**20  # larger bodies get 413 before they are read
    default_max_tokens: int = 4096  # chat requests without max_tokens: at most this (and what the context leaves)
    # the engine made no progress for this long while requests were pending: /ready and /health turn 503
    engine_stall_timeout: float = 120.0
    tool_call_parser: str = "hermes"  # how chat output is read for tool calls: hermes | json

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, "port must be in [0, 65535]")
        _check(self.tool_call_parser in ("hermes", "json"), "tool_call_parser must be hermes or json")
        _check(self.shutdown_timeout >= 0, "shutdown_timeout must be >= 0")
        _check(self.max_request_body_bytes >= 1024, "max_request_body_bytes must be >= 1024")
        _check(self.default_max_tokens >= 1, "default_max_tokens must be >= 1")
        _check(self.engine_stall_timeout > 0, "engine_stall_timeout must be > 0")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # the server-wide technique defaults (server/options.py); requests may override each
    spec: SpecConfig = field(default_factory=SpecConfig)
    sparsity: SparsityOptions = field(default_factory=SparsityOptions)
    eviction: EvictionOptions = field(default_factory=EvictionOptions)
    skipping: SkipOptions = field(default_factory=SkipOptions)
    server: ServerConfig = field(default_factory=ServerConfig)
    attention_backend: str = "auto"  # auto | torch | triton | flash-attn

    def __post_init__(self) -> None:
        _check(self.attention_backend in ("auto", "torch", "triton", "flash-attn"),
               f"attention_backend: unknown value {self.attention_backend!r}")
