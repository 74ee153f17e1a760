"""``sift serve | generate | bench`` (also ``python -m sift.server ...``).

Every engine/server flag maps onto one field of the frozen config dataclasses (technique flags: read off
server/options.py) and has an environment twin ``SIFT_<FLAG>`` (``--max-model-len`` <-> ``SIFT_MAX_MODEL_LEN``);
the flag wins over the environment, which wins over the dataclass default.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import typing
from dataclasses import dataclass, fields, replace
from typing import Callable, Optional

from sift.server.config import EngineConfig
from sift.server.options import Options, meta, scalar_type


@dataclass(frozen=True)
class _Flag:
    name: str  # without the leading dashes
    target: str  # "section.field" in EngineConfig, or a top-level field
    type: Callable
    help: str
    choices: Optional[tuple] = None
    invert: bool = False  # a --no-X switch that sets the field to False

    @property
    def env(self) -> str:
        return "SIFT_" + self.name.upper().replace("-", "_")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def technique_flags() -> tuple:
    """The flags of the technique options that declare one (server/options.py): each sets that field of the
    server-wide default in EngineConfig."""
    hints, flags = typing.get_type_hints(EngineConfig), []
    for section in fields(EngineConfig):
        options = hints[section.name]
        if isinstance(options, type) and issubclass(options, Options):
            flags += [_Flag(meta(f).flag, f"{section.name}.{f.name}", scalar_type(options, f),
                            meta(f).help.replace("%", "%%"), meta(f).choices) for f in fields(options) if meta(f).flag]
    return tuple(flags)


ENGINE_FLAGS = (
    _Flag("model", "model.model", str, "GGUF file or Hugging Face model directory (default: the embedded "
          "SmolLM2-135M-Instruct)"),
    _Flag("served-model-name", "model.served_model_name", str, "model name clients must send and /v1/models lists"),
    _Flag("dtype", "model.dtype", str, "weight and KV dtype (auto: bfloat16 on GPU, float32 on CPU)",
          ("auto", "float32", "bfloat16", "float16")),
    _Flag("device", "model.device", str, "device to run on (auto: cuda when available)", ("auto", "cpu", "cuda")),
    _Flag("max-model-len", "model.max_model_len", int, "context length limit (default: the model's own)"),
    _Flag("load-format", "model.load_format", str, "auto: the checkpoint's weights; dummy: random weights of its "
          "shape (a directory needs only config.json), for timing", ("auto", "dummy")),
    _Flag("tokenizer", "model.tokenizer", str, "GGUF file or Hugging Face directory to take the tokenizer from "
          "(default: the model's own)"),
    _Flag("chat-template", "model.chat_template", str, "Jinja chat template file used instead of the model's own"),
    _Flag("quantization", "model.quantization", str, "weight quantization: auto keeps a GGUF's quantized "
          "tensors quantized and an HF checkpoint as stored; none dequantizes; int8 / int4 quantize the linear "
          "weights at load", ("auto", "none", "int8", "int4")),
    _Flag("quantization-group-size", "model.quantization_group_size", int,
          "inputs per int4 scale when quantizing at load (a smaller divisor where a layer's width needs it)",
          (32, 64, 128, 256)),
    _Flag("compile", "model.enforce_eager", _bool, "compile plain decode steps with torch.compile (warm-up at "
          "start-up; docs/compiled.md)", invert=True),
    _Flag("enforce-eager", "model.enforce_eager", _bool, "run every step eagerly (no torch.compile)"),
    _Flag("seed", "model.seed", int, "global random seed (requests without a seed draw their own)"),
    _Flag("block-size", "cache.block_size", int, "tokens per KV cache block", (8, 16, 32, 64, 128)),
    _Flag("kv-cache-memory", "cache.kv_cache_memory", float,
          "KV cache size: bytes (> 1) or fraction of free device memory (<= 1); default: 25%% of free GPU "
          "memory, on CPU 4 GiB or what --max-num-seqs full contexts need if less"),
    _Flag("num-kv-blocks", "cache.num_blocks", int, "exact number of KV blocks (overrides --kv-cache-memory)"),
    _Flag("no-prefix-caching", "cache.enable_prefix_caching", _bool, "disable automatic prefix caching",
          invert=True),
    _Flag("max-num-batched-tokens", "scheduler.max_num_batched_tokens", int, "token budget of one engine step"),
    _Flag("max-num-seqs", "scheduler.max_num_seqs", int, "most requests running at once"),
    _Flag("max-queued-requests", "scheduler.max_queued_requests", int,
          "most requests waiting for admission (>= 1); beyond it requests get 429"),
    _Flag("long-prefill-token-threshold", "scheduler.long_prefill_token_threshold", int,
          "cap on one request's prefill chunk per step (0: no cap beyond the step budget)"),
    _Flag("admission", "scheduler.admission", str, "admit requests while this step's KV fits (optimistic, "
          "preempting when the pool runs dry) or while every running request's peak KV fits (reserve)",
          ("optimistic", "reserve")),
    *technique_flags(),
    _Flag("attention-backend", "attention_backend", str, "attention kernels (auto: best for the device)",
          ("auto", "torch", "triton", "flash-attn")),
)

SERVER_FLAGS = (
    _Flag("host", "server.host", str, "address to listen on"),
    _Flag("port", "server.port", int, "port to listen on"),
    _Flag("api-key", "server.api_key", str, "require 'Authorization: Bearer <key>' on /v1, /tokenize, /detokenize"),
    _Flag("shutdown-timeout", "server.shutdown_timeout", float,
          "seconds in-flight requests may run after SIGTERM before they are aborted"),
    _Flag("max-request-body-bytes", "server.max_request_body_bytes", int,
          "largest request body accepted; larger ones get 413 before they are read (default 4 MiB)"),
    _Flag("default-max-tokens", "server.default_max_tokens", int,
          "max_tokens of chat requests that give none, further capped by the context left (default 4096)"),
    _Flag("engine-stall-timeout", "server.engine_stall_timeout", float,
          "seconds without engine progress while requests are pending before /ready and /health report the "
          "engine stalled (default 120)"),
    _Flag("tool-call-parser", "server.tool_call_parser", str, "how chat output is read for tool calls: hermes "
          "(<tool_call>{...}</tool_call> blocks) or json (the whole reply is a call object)", ("hermes", "json")),
)
LOG_FLAGS = (
    _Flag("log-level", "server.log_level", str, "log verbosity", ("critical", "error", "warning", "info", "debug")),
)


def _add_flags(parser: argparse.ArgumentParser, flags: tuple) -> None:
    for flag in flags:
        dest = flag.name.replace("-", "_")
        env = os.environ.get(flag.env)
        help_text = f"{flag.help} [env {flag.env}]"
        if flag.type is _bool:
            default = _bool(env) if env is not None else None
            parser.add_argument(f"--{flag.name}", dest=dest, action="store_const", const=True, default=default,
                                help=help_text)
            continue
        default = flag.type(env) if env is not None else None
        if flag.choices and default is not None and default not in flag.choices:
            parser.error(f"{flag.env}: {env!r} is not one of {flag.choices}")
        parser.add_argument(f"--{flag.name}", dest=dest, type=flag.type, choices=flag.choices, default=default,
                            metavar=flag.name.upper().replace("-", "_") if not flag.choices else None,
                            help=help_text)


def config_from_args(args: argparse.Namespace, flags: tuple) -> EngineConfig:
    """Flags that were given (or set through the environment) override the defaults."""
    sections: dict = {}
    top: dict = {}
    for flag in flags:
        value = getattr(args, flag.name.replace("-", "_"), None)
        if value is None:
            continue
        if flag.invert:
            value = not value
        if "." in flag.target:
            section, name = flag.target.split(".")
            sections.setdefault(section, {})[name] = value
        else:
            top[flag.target] = value
    base = EngineConfig()
    updates = {section: replace(getattr(base, section), **fields) for section, fields in sections.items()}
    return replace(base, **updates, **top)


def _cmd_serve(args: argparse.Namespace) -> int:
    from sift.server.api.app import run_server
    return run_server(config_from_args(args, ENGINE_FLAGS + SERVER_FLAGS + LOG_FLAGS))


def _cmd_generate(args: argparse.Namespace) -> int:
    from sift.server.engine.llm import LLM
    from sift.server.engine.request import SamplingParams

    llm = LLM(config=config_from_args(args, ENGINE_FLAGS))
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        prompt = llm.tokenizer.encode(prompt, add_special_tokens=False)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.sample_seed)
    print(llm.generate(prompt, params)[0].text)
    return 0


def _cmd_bench(rest: list) -> int:
    try:
        bench = importlib.import_module("sift.bench.serve")
    except ModuleNotFoundError as e:
        if e.name not in ("bench", "sift.bench.serve"):
            raise
        print("sift bench: the serving benchmark (bench/serve.py) is not installed in this build", file=sys.stderr)
        return 2
    return bench.main(rest) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sift", description="Sift: an LLM inference server.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                           description="Serve the OpenAI-compatible HTTP API (default: the embedded model "
                                       "on 127.0.0.1:8000). Technique flags set the server-wide defaults; a "
                                       "request's own options override them.")
    _add_flags(serve, ENGINE_FLAGS + SERVER_FLAGS + LOG_FLAGS)
    gen = sub.add_parser("generate", help="run one prompt offline and print the completion")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    gen.add_argument("--sample-seed", type=int, default=None, help="seed of this request's sampling")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_flags(gen, ENGINE_FLAGS + LOG_FLAGS)
    sub.add_parser("bench", help="serving benchmark (bench/serve.py); arguments are passed through",
                   add_help=False)
    return parser


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return _cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    level = (getattr(args, "log_level", None) or "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            return _cmd_serve(args)
        return _cmd_generate(args)
    except ValueError as e:  # a config value rejected by its dataclass
        print(f"sift: {e}", file=sys.stderr)
        return 2
