"""Mixture-of-experts layer: experts run grouped (sift.kernels.moe.grouped_experts: sort the (token, expert) pairs
once, one grouped matmul per projection) against a Python loop over the experts hit (transformers' way), same
run, same weights and routing, interleaved, best of ``--reps``.

    python -m sift.bench.moe [--tokens 1,8,32] [--reps 5] [--shapes ...]

Shapes: ``qwen3-30b-a3b`` is one layer of Qwen3-30B-A3B's experts (128 experts, top-8, hidden 2048,
expert width 768: 2.4 GB in float32, which both forms must read once most experts are hit); ``small`` keeps
its expert count and top-k at 1/8 the width, where the per-expert work is small and the loop's per-expert
overhead shows.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from sift.bench.provenance import write_result
from sift.kernels.moe import grouped_experts, looped_experts, route

RESULTS = os.path.join(os.path.dirname(__file__), "results")
SHAPES = {  # name -> (experts, top_k, hidden, expert intermediate)
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "small": (128, 8, 256, 96),
}


def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,8,32")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--shapes", default="small,qwen3-30b-a3b")
    args = ap.parse_args()
    rows = []
    print("shape | tokens | experts hit | grouped ms | loop ms | loop / grouped")
    for name in args.shapes.split(","):
        e, k, h, i = SHAPES[name]
        g = torch.Generator().manual_seed(0)
        w13 = torch.randn(e, 2 * i, h, generator=g) * 0.02
        w2 = torch.randn(e, h, i, generator=g) * 0.02
        router = torch.randn(e, h, generator=g)
        for n in [int(x) for x in args.tokens.split(",")]:
            x = torch.randn(n, h, generator=g)
            weights, ids = route(x @ router.t(), k, renormalize=True)
            grouped = lambda: grouped_experts(x, w13, w2, weights, ids)  # noqa: E731
            looped = lambda: looped_experts(x, w13, w2, weights, ids)  # noqa: E731
            err = float((grouped() - looped()).abs().max())
            t_g = t_l = float("inf")
            for _ in range(2):  # interleaved rounds
                t_g = min(t_g, _best(grouped, args.reps))
                t_l = min(t_l, _best(looped, args.reps))
            row = dict(shape=name, experts=e, top_k=k, hidden=h, intermediate=i, tokens=n,
                       experts_hit=int(ids.unique().numel()), grouped_ms=round(t_g * 1e3, 3),
                       loop_ms=round(t_l * 1e3, 3), speedup=round(t_l / t_g, 2), max_abs_diff=err)
            rows.append(row)
            print(f"{name} | {n} | {row['experts_hit']} | {row['grouped_ms']} | {row['loop_ms']} | {row['speedup']}x",
                  flush=True)
    write_result(os.path.join(RESULTS, "moe.json"),
                 {"bench": "moe", "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                             f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                  "dtype": "float32", "rows": rows}, device="cpu")


if __name__ == "__main__":
    main()
