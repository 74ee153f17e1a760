"""Serving benchmark: drive a running OpenAI-compatible server with ``sift.clients.loadgen``.

    sift bench serve --base-url http://127.0.0.1:8000 --dataset random --concurrency 1,8,32 \\
        --num-requests 64 --input-len 128 --output-len 128 --slo ttft=1000,tpot=100
    python -m sift.bench.serve --request-rate 4 --burstiness 0.5 --ramp-up 10 --duration 60

One run per ``--concurrency`` value (or one Poisson run with ``--request-rate``). Prints a
table, writes ``bench/results/serve-<label>.json`` (summaries plus per-request timings) and
PNG plots: output throughput vs concurrency, and CDFs of TTFT and end-to-end latency.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from datetime import datetime, timezone
from typing import Optional

from sift.bench.provenance import write_result
from sift.clients import loadgen

RESULTS = os.path.join(os.path.dirname(__file__), "results")
DATASETS = ("random", "humaneval", "shared-prefix", "long-generation")


def load_tokenizer(path: Optional[str]):
    """A transformers tokenizer from a GGUF file or HF directory (default: the embedded model)."""
    from transformers import AutoTokenizer

    if path is None:
        from sift.models.embedded import embedded_model_path

        path = embedded_model_path()
    if path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return AutoTokenizer.from_pretrained(path)


def build_dataset(tokenizer, args: argparse.Namespace, num_requests: int) -> list:
    if args.dataset == "random":
        return loadgen.random_dataset(tokenizer, num_requests, args.input_len, args.output_len, args.range_ratio,
                                      args.seed)
    if args.dataset == "humaneval":
        return loadgen.humaneval_dataset(tokenizer, num_requests, args.output_len, args.seed)
    if args.dataset == "shared-prefix":
        return loadgen.shared_prefix_dataset(tokenizer, num_requests, args.num_prefixes, args.prefix_len,
                                             args.input_len, args.output_len, args.seed)
    return loadgen.long_generation_dataset(tokenizer, num_requests, args.input_len, args.output_len, args.seed)


def add_workload_args(ap: argparse.ArgumentParser) -> None:
    """Dataset flags, shared with ``sift.bench.compare``."""
    ap.add_argument("--dataset", choices=DATASETS, default="random")
    ap.add_argument("--tokenizer", default=None, help="GGUF file or HF dir (default: the embedded model)")
    ap.add_argument("--input-len", type=int, default=128, help="prompt tokens (suffix for shared-prefix)")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--range-ratio", type=float, default=0.0, help="random lengths in len*(1±ratio)")
    ap.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: distinct system prompts")
    ap.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: system prompt tokens")
    ap.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                    help="let requests stop at EOS (default: always generate --output-len tokens)")
    ap.add_argument("--slo", default=None, help="goodput SLO in ms, e.g. ttft=1000,tpot=100")
    ap.add_argument("--seed", type=int, default=0)


# ---- reporting (also used by sift.bench.compare) ---------------------------------------------

def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def summary_row(label: str, s: dict) -> list:
    c = s.get("server_counters") or {}
    return [label, f"{s['completed']}/{s['failed']}", fmt(s["request_throughput"], 2), fmt(s["output_throughput"]),
            fmt(s["total_token_throughput"]), fmt(s["goodput"], 2), fmt(s["ttft_ms"]["median"], 0),
            fmt(s["ttft_ms"]["p99"], 0), fmt(s["tpot_ms"]["median"]), fmt(s["itl_ms"]["median"]),
            fmt(s["e2e_ms"]["median"], 0), fmt(s["e2e_ms"]["p99"], 0), fmt(c.get("spec_acceptance_rate"), 2),
            fmt(c.get("prefix_cache_hit_rate"), 2), fmt(c.get("num_preemptions_total"), 0)]


SUMMARY_HEADER = ["run", "ok/fail", "req/s", "out tok/s", "total tok/s", "goodput req/s", "TTFT p50 ms",
                  "TTFT p99 ms", "TPOT p50 ms", "ITL p50 ms", "E2E p50 ms", "E2E p99 ms", "spec accept",
                  "prefix hit", "preempt"]


def markdown_table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:  # the last-level cache: hosts with the same CPU name differ in it, and CPU timings with them
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            cpu = f"{cpu}, L3 {f.read().strip()}"
    except OSError:
        pass
    mem = ""
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        mem = f", {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM"
    return f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}, Python " \
           f"{platform.python_version()}"


def device_description(device) -> str:
    """The GPU's name for a CUDA device, else :func:`machine_description`."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else machine_description()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def plot_throughput(series: dict, path: str, ylabel: str = "output tokens/s") -> None:
    """``series``: name -> [(concurrency, value), ...]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in series.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({x for points in series.values() for x, _ in points}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cdfs(curves: dict, path: str) -> None:
    """``curves``: metric title -> {run name: [seconds, ...]}; one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
    for ax, (title, runs) in zip(axes[0], curves.items()):
        for name, values in runs.items():
            if values:
                xs = np.sort(np.asarray(values) * 1000)
                ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=name)
        ax.set_xscale("log")
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def timings(result: loadgen.RunResult) -> dict:
    ok = [r for r in result.records if r.ok]
    return {"ttft_s": [r.ttft for r in ok], "e2e_s": [r.e2e for r in ok],
            "output_tokens": [r.output_tokens for r in ok]}


# ---- CLI ---------------------------------------------------------------------------------

def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="sift bench serve", description=__doc__.splitlines()[0])
    if argv and argv[0] == "serve":  # `sift bench serve ...` passes "serve" through
        argv = argv[1:]
    ap.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, without /v1")
    ap.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    ap.add_argument("--api-key", default=os.environ.get("SIFT_API_KEY"))
    add_workload_args(ap)
    ap.add_argument("--num-requests", type=int, default=None, help="requests per run (default 64 w/o --duration)")
    ap.add_argument("--duration", type=float, default=None, help="stop sending new requests after this many s")
    ap.add_argument("--concurrency", default="8", help="comma list: one fixed-concurrency run per value")
    ap.add_argument("--request-rate", type=float, default=None, help="Poisson run at this mean req/s instead")
    ap.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 Poisson, <1 bursty")
    ap.add_argument("--ramp-up", type=float, default=0.0, help="s of linear rate ramp-up")
    ap.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    ap.add_argument("--extra-body", default="{}", help='JSON merged into every request, e.g. \'{"speculative": '
                                                       '{"method": "ngram"}}\'')
    ap.add_argument("--label", default=None, help="result file name part (default: dataset + date)")
    ap.add_argument("--result-dir", default=RESULTS)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.num_requests is None and args.duration is None:
        args.num_requests = 64
    try:
        slo = loadgen.parse_slo(args.slo)
    except ValueError as e:
        ap.error(str(e))

    tokenizer = load_tokenizer(args.tokenizer)
    specs = build_dataset(tokenizer, args, args.num_requests or 1024)
    common = dict(base_url=args.base_url.rstrip("/"), endpoint=args.endpoint, model=args.model,
                  num_requests=args.num_requests, duration_s=args.duration, temperature=args.temperature,
                  ignore_eos=args.ignore_eos, extra_body=json.loads(args.extra_body), api_key=args.api_key,
                  seed=args.seed, burstiness=args.burstiness, ramp_up_s=args.ramp_up,
                  max_concurrency=args.max_concurrency)
    if args.request_rate is not None:
        configs = {f"rate={args.request_rate:g}": loadgen.LoadConfig(rate=args.request_rate, **common)}
    else:
        configs = {f"c={c}": loadgen.LoadConfig(concurrency=int(c), **common) for c in args.concurrency.split(",")}

    runs = {}
    for name, cfg in configs.items():
        print(f"{name}: {args.dataset} x {args.num_requests or 'unbounded'} requests -> {cfg.base_url}",
              file=sys.stderr, flush=True)
        result = loadgen.run(cfg, specs, progress=not args.no_progress)
        runs[name] = {"summary": loadgen.summarize(result, slo), "timings": timings(result)}
    print(markdown_table(SUMMARY_HEADER, [summary_row(n, r["summary"]) for n, r in runs.items()]))

    label = args.label or f"{args.dataset}-{datetime.now():%Y%m%d-%H%M%S}"
    os.makedirs(args.result_dir, exist_ok=True)
    base = os.path.join(args.result_dir, f"serve-{label}")
    write_result(base + ".json", {"bench": "serve", "date": utc_now(), "machine": machine_description(),
                                  "argv": sys.argv, "runs": runs}, device=args.base_url, indent=1)
    if not args.no_plots:
        points = [(cfg.concurrency, runs[n]["summary"]["output_throughput"]) for n, cfg in configs.items()
                  if math.isinf(cfg.rate)]
        if len(points) > 1:
            plot_throughput({args.base_url: points}, base + "-throughput.png")
        plot_cdfs({k: {n: r["timings"][k + "_s"] for n, r in runs.items()} for k in ("ttft", "e2e")},
                  base + "-latency-cdf.png")
    print(f"wrote {base}.json", file=sys.stderr)
    return 0 if all(r["summary"]["completed"] for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
