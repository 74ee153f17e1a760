"""Structured-output overhead: decode tokens/s with and without a JSON-Schema constraint, and grammar
compile time cold vs cached.

Both arms generate exactly ``--out-len`` tokens per request: the plain arm ignores EOS; the
constrained arm's schema asks for an array longer than ``--out-len`` tokens (64 integers), so
it always ends by length, mid-array, with every token masked by the grammar. Arms alternate
round by round at each stream count and medians are reported, because this machine's speed
drifts over minutes. Compile time: each of a few distinct schemas compiled on a fresh cache
(cold), then looked up again (cached: what a repeated schema costs a request).

    python -m sift.bench.structured [--streams 1,32] [--rounds 3] [--out-len 64]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time

import torch

from sift.bench.provenance import write_result

RESULTS = os.path.join(os.path.dirname(__file__), "results")

LONG_ARRAY = {"type": "object", "properties": {"values": {
    "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 64, "maxItems": 64}},
    "required": ["values"], "additionalProperties": False}
COMPILE_SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 32},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 5, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                                         "qty": {"type": "integer", "minimum": 1}}, "required": ["sku", "qty"]}}},
     "required": ["items"]},
    {"anyOf": [{"type": "object", "properties": {"kind": {"enum": ["point"]}, "x": {"type": "number"}}},
               {"type": "object", "properties": {"kind": {"enum": ["circle"]},
                                                 "r": {"type": "number", "minimum": 0}}}]},
    LONG_ARRAY,
]


def run(llm, prompts, params) -> float:
    """Generated tokens per second of one batch."""
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    return sum(len(o.token_ids) for o in outs) / elapsed


def compile_times(llm) -> dict:
    from sift.server.structured.compiler import GrammarCompiler
    from sift.server.structured.spec import StructuredSpec

    eng = llm.engine
    compiler = GrammarCompiler(eng.tokenizer, eng.vocab_size, eng.eos_token_ids)
    specs = [StructuredSpec.json_schema(s) for s in COMPILE_SCHEMAS]
    cold = [compiler.get(s)[1] for s in specs]
    cached = []
    for s in specs:
        for _ in range(20):
            t0 = time.perf_counter()
            assert compiler.cached(StructuredSpec.json_schema(json.loads(s.value))) is not None
            cached.append(time.perf_counter() - t0)  # includes canonicalising the request's schema
    return {"cold_ms": [round(c * 1e3, 2) for c in cold], "cold_median_ms": round(statistics.median(cold) * 1e3, 2),
            "cached_median_ms": round(statistics.median(cached) * 1e3, 4),
            "cached_max_ms": round(max(cached) * 1e3, 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", default="1,32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out-len", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--out", default=None, help="JSON result path (default: bench/results/structured-<host>.json)")
    args = ap.parse_args()

    from sift.bench.offline_throughput import real_prompts
    from sift.server.engine.llm import LLM
    from sift.server.engine.request import SamplingParams
    from sift.server.structured.spec import StructuredSpec

    streams = [int(s) for s in args.streams.split(",")]
    max_len = 512
    llm = LLM(max_model_len=max_len,
              num_blocks=max(streams) * ((args.prompt_len + args.out_len) // 16 + 2) + max_len // 16 + 2)
    compiles = compile_times(llm)
    spec = StructuredSpec.json_schema(LONG_ARRAY)
    plain = SamplingParams(max_tokens=args.out_len, temperature=0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=args.out_len, temperature=0, structured=spec)
    prompts_all = real_prompts(llm.tokenizer, max(streams), args.prompt_len)
    llm.generate(prompts_all[:2], [plain, constrained])  # warm-up: compile buckets, grammar cache
    rates: dict = {n: {"plain": [], "json_schema": []} for n in streams}
    mask_s = llm.engine.runner.structured_counters
    for r in range(args.rounds):
        for n in streams:
            arms = [("plain", plain), ("json_schema", constrained)]
            for name, params in (arms if r % 2 == 0 else arms[::-1]):  # alternate which arm goes first
                rates[n][name].append(run(llm, prompts_all[:n], params))
    rows = []
    for n in streams:
        p, c = statistics.median(rates[n]["plain"]), statistics.median(rates[n]["json_schema"])
        rows.append({"streams": n, "plain_tok_s": round(p, 1), "json_schema_tok_s": round(c, 1),
                     "cost_pct": round(100 * (1 - c / p), 1),
                     "rounds": {k: [round(x, 1) for x in v] for k, v in rates[n].items()}})
    doc = {"bench": "structured",
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                      f"torch {torch.__version__}, device {llm.engine.device}",
           "out_len": args.out_len, "prompt_len": args.prompt_len, "rounds": args.rounds,
           "throughput": rows, "compile": compiles,
           "mask_seconds_total": round(mask_s["structured_mask_seconds"], 3)}
    path = args.out or os.path.join(RESULTS, f"structured-{socket.gethostname()}.json")
    write_result(path, doc, device=str(llm.engine.device))
    print(f"{'streams':>8} {'plain tok/s':>12} {'json tok/s':>11} {'cost':>7}")
    for row in rows:
        print(f"{row['streams']:>8} {row['plain_tok_s']:>12} {row['json_schema_tok_s']:>11} {row['cost_pct']:>6}%")
    print(f"compile: cold median {compiles['cold_median_ms']} ms {compiles['cold_ms']}, "
          f"cached median {compiles['cached_median_ms']} ms (max {compiles['cached_max_ms']} ms)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
