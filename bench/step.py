"""Eager vs compiled decode step (server/runner/compiled.py), interleaved rounds, medians.

Per dtype and stream count: the median decode step, tokens/s (streams / step), aten ops dispatched in one
decode step (torch profiler: every ``aten::`` event, nested ones included, the same count for both arms),
and the engine's start-up time: eager, compiled with an empty inductor cache (cold), compiled again over the
cache the cold start filled (warm). Writes JSON through bench/provenance and prints a table.

    python -m sift.bench.step            # float32 + bfloat16, 1/8/32 streams (long: compiles every bucket)
    python -m sift.bench.step --quick    # float32, one stream, a few steps: shows it works (< 3 min)
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from sift.bench.long_context import decode_time
from sift.bench.provenance import write_result
from sift.bench.serve import device_description, utc_now

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build(dtype: str, eager: bool, max_num_seqs: int, max_model_len: int):
    """(LLM, seconds to start it)."""
    from sift.server.engine.llm import LLM

    t = time.perf_counter()
    llm = LLM(dtype=dtype, enforce_eager=eager, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
              enable_prefix_caching=False)
    return llm, time.perf_counter() - t


def start_in_subprocess(dtype: str, max_num_seqs: int, max_model_len: int) -> float:
    """Seconds a fresh process takes to build a compiled engine (over this process's inductor cache dir)."""
    code = ("from sift.bench.step import build; "
            f"print('STARTUP', build({dtype!r}, False, {max_num_seqs}, {max_model_len})[1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.split("STARTUP")[-1])


def ops_per_decode_step(llm, prompt: list, streams: int) -> int:
    """aten ops dispatched by one decode step of ``streams`` requests (after their prefills)."""
    from torch.profiler import ProfilerActivity, profile

    from sift.server.engine.request import SamplingParams

    eng = llm.engine
    for i in range(streams):
        eng.add_request(f"ops{i}", prompt, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    while any(eng.scheduler.requests[f"ops{i}"].num_output_tokens == 0 for i in range(streams)):
        eng.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        eng.step()
    while eng.has_unfinished_requests():
        eng.step()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--streams", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per measurement (median)")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="float32, one stream, 2 rounds of 6 steps")
    ap.add_argument("--out", default=os.path.join(RESULTS, "step.json"))
    args = ap.parse_args()
    if args.quick:
        args.dtypes, args.streams, args.rounds, args.steps = "float32", "1", 2, 6
    dtypes = args.dtypes.split(",")
    streams = [int(s) for s in args.streams.split(",")]
    rows, startup = [], {}
    for dtype in dtypes:
        # a fresh inductor cache for the cold start; the warm start reuses what it wrote
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sift-inductor-")
        eager, t_eager = build(dtype, True, max(streams), args.max_model_len)
        device = device_description(eager.engine.device)
        # cold and warm starts each in a fresh process (in this one dynamo would reuse its in-memory graphs)
        t_cold, t_warm = (start_in_subprocess(dtype, max(streams), args.max_model_len) for _ in range(2))
        compiled, _ = build(dtype, False, max(streams), args.max_model_len)
        startup[dtype] = {"eager_s": round(t_eager, 1), "compiled_cold_s": round(t_cold, 1),
                          "compiled_warm_s": round(t_warm, 1)}
        prompt = eager.tokenizer.encode(eager.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Explain what a hash table is and when to use one."}]))
        arms = {"eager": eager, "compiled": compiled}
        times: dict = {}
        for _ in range(args.rounds):
            for n in streams:
                for name, llm in arms.items():
                    times.setdefault((name, n), []).append(decode_time(llm, prompt, None, args.steps, n))
        for n in streams:
            row = {"dtype": dtype, "streams": n}
            for name, llm in arms.items():
                step = statistics.median(times[(name, n)])
                row |= {f"{name}_step_ms": round(step * 1e3, 2), f"{name}_tokens_per_s": round(n / step, 1),
                        f"{name}_ops_per_step": ops_per_decode_step(llm, prompt, n)}
            rows.append(row)
        del eager, compiled, arms
    print(f"{'dtype':>9} {'streams':>7} {'eager ms':>9} {'comp ms':>8} {'eager tok/s':>11} {'comp tok/s':>10} "
          f"{'eager ops':>9} {'comp ops':>8}")
    for r in rows:
        print(f"{r['dtype']:>9} {r['streams']:>7} {r['eager_step_ms']:>9.1f} {r['compiled_step_ms']:>8.1f} "
              f"{r['eager_tokens_per_s']:>11.1f} {r['compiled_tokens_per_s']:>10.1f} {r['eager_ops_per_step']:>9} "
              f"{r['compiled_ops_per_step']:>8}")
    for dtype, s in startup.items():
        print(f"start-up {dtype}: eager {s['eager_s']} s, compiled cold {s['compiled_cold_s']} s, "
              f"warm {s['compiled_warm_s']} s")
    write_result(args.out, {"bench": "step", "date": utc_now(), "device": device, "rounds": args.rounds,
                            "steps": args.steps, "max_model_len": args.max_model_len, "startup": startup,
                            "rows": rows}, device=device, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
