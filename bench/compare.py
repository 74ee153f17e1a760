"""Side-by-side serving comparison: Sift vs the llama.cpp server vs an HF ``generate`` server.

    python -m sift.bench.compare [--rounds 3] [--servers sift,sift-tech,llama.cpp,hf]

Every server is started on 127.0.0.1 with the same GGUF and driven by ``sift.clients.loadgen``
with the same workloads (random prose prompts, greedy, fixed output length): fixed
concurrency 1, 8 and 32, and one Poisson-rate run. The servers take turns inside each
round (order reversed every other round) and the median over rounds is reported, because
this machine's speed drifts by ±20% over minutes. A server that is not installed or fails
to start is skipped with a line saying why. Writes ``bench/results/compare.json``,
``compare.md`` (the table the README includes) and two PNG plots.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import httpx

from sift.bench import serve
from sift.bench.provenance import write_result
from sift.clients import loadgen

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class ServerSpec:
    name: str
    argv: tuple  # "{port}" is replaced by the port
    ready_path: str  # 200 once the model is loaded
    missing: Optional[str] = None  # why it cannot run here; None when it can
    extra_body: dict = field(default_factory=dict)  # merged into every request


def server_specs(model: str, threads: int, tech_args: str, eos_id: int) -> dict:
    py = sys.executable
    sift = (py, "-m", "sift.server", "serve", "--host", "127.0.0.1", "--port", "{port}", "--model", model,
            "--log-level", "warning")
    has_llamacpp = importlib.util.find_spec("llama_cpp") is not None
    return {s.name: s for s in (
        ServerSpec("sift", sift, "/ready"),
        ServerSpec("sift-tech", sift + tuple(shlex.split(tech_args)), "/ready"),
        # its default is one thread: give it the machine's cores, as a user tuning it would; and by default a
        # waiting request cuts the running stream short ("interrupt_requests"): serve every request in full
        ServerSpec("llama.cpp", (py, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1", "--port",
                                 "{port}", "--n_threads", str(threads), "--n_ctx", "4096",
                                 "--interrupt_requests", "False"), "/v1/models",
                   None if has_llamacpp else "llama-cpp-python[server] is not installed "
                                             "(pip install 'sift[llamacpp]'; it compiles llama.cpp, ~6 min)",
                   # it has no ignore_eos: mask EOS instead, so every server generates the same lengths
                   {"logit_bias": {str(eos_id): -100.0}}),
        ServerSpec("hf", (py, "-m", "sift.bench.hf_server", "--model", model, "--port", "{port}"), "/health"),
    )}


class StartFailed(RuntimeError):
    pass


@contextmanager
def launched(spec: ServerSpec, port: int, log_path: str, timeout_s: float) -> Iterator[str]:
    """Start ``spec``, wait until its ready path answers 200, yield its base URL, stop it."""
    base_url = f"http://127.0.0.1:{port}"
    argv = [a.replace("{port}", str(port)) for a in spec.argv]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise StartFailed(f"exited with status {proc.returncode}: {_tail(log_path)}")
            if time.monotonic() > deadline:
                raise StartFailed(f"not ready after {timeout_s:.0f} s: {_tail(log_path)}")
            try:
                if httpx.get(base_url + spec.ready_path, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(path: str, lines: int = 3) -> str:
    with open(path, errors="replace") as f:
        return " | ".join(line.strip()[-200:] for line in f.read().splitlines()[-lines:])


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- workloads and medians ----------------------------------------------------------------

def workloads(args: argparse.Namespace) -> dict:
    """name -> LoadConfig keyword arguments (base_url added per server)."""
    common = dict(endpoint=args.endpoint, ignore_eos=True, temperature=0.0, seed=args.seed)
    runs = {f"c={c}": dict(concurrency=c, num_requests=max(args.min_requests, args.requests_per_stream * c),
                           **common)
            for c in (int(x) for x in args.concurrency.split(","))}
    if args.rate > 0:
        runs[f"poisson {args.rate:g}/s"] = dict(rate=args.rate, num_requests=args.rate_requests, **common)
    return runs


MEDIAN_KEYS = {
    "out tok/s": lambda s: s["output_throughput"], "req/s": lambda s: s["request_throughput"],
    "TTFT p50 ms": lambda s: s["ttft_ms"]["median"], "TTFT p99 ms": lambda s: s["ttft_ms"]["p99"],
    "TPOT p50 ms": lambda s: s["tpot_ms"]["median"], "ITL p50 ms": lambda s: s["itl_ms"]["median"],
    "E2E p50 ms": lambda s: s["e2e_ms"]["median"], "E2E p99 ms": lambda s: s["e2e_ms"]["p99"],
    "spec accept": lambda s: (s["server_counters"] or {}).get("spec_acceptance_rate"),
}


def medians(summaries: list) -> dict:
    out = {}
    for key, get in MEDIAN_KEYS.items():
        values = [get(s) for s in summaries if s["completed"] and get(s) is not None]
        out[key] = statistics.median(values) if values else None
    out["ok/fail"] = f"{sum(s['completed'] for s in summaries)}/{sum(s['failed'] for s in summaries)}"
    return out


def ratio_lines(table: dict, names: list) -> list:
    """Sift's throughput and TTFT relative to each peer, per workload (medians)."""
    lines = []
    for sift in (n for n in ("sift", "sift-tech") if n in table):
        for peer in (n for n in ("llama.cpp", "hf") if n in table):
            for w in names:
                a, b = table[sift].get(w), table[peer].get(w)
                if not a or not b or not a["out tok/s"] or not b["out tok/s"]:
                    continue
                ttft = (f", p50 TTFT {b['TTFT p50 ms'] / a['TTFT p50 ms']:.1f}x lower"
                        if a["TTFT p50 ms"] and b["TTFT p50 ms"] else "")
                lines.append(f"- {w}: {sift} / {peer} output throughput {a['out tok/s'] / b['out tok/s']:.2f}x{ttft}")
    return lines


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ---- main ---------------------------------------------------------------------------------

def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", default="sift,sift-tech,llama.cpp,hf")
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--sift-tech-args", default="--speculative ngram", help="flags of the 'sift-tech' server")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp --n_threads")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests-per-stream", type=int, default=2, help="requests per run = this x concurrency")
    ap.add_argument("--min-requests", type=int, default=4)
    ap.add_argument("--rate", type=float, default=2.0, help="Poisson run's req/s (0: no Poisson run)")
    ap.add_argument("--rate-requests", type=int, default=32)
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--result-dir", default=serve.RESULTS)
    serve.add_workload_args(ap)
    args = ap.parse_args(argv)
    if args.dataset != "random":
        ap.error("the comparison runs the random workload only (fixed lengths make servers comparable)")
    if args.model is None:
        from sift.models.embedded import embedded_model_path

        args.model = embedded_model_path()

    tokenizer = serve.load_tokenizer(args.model)
    specs = server_specs(args.model, args.threads, args.sift_tech_args, tokenizer.eos_token_id)
    names = args.servers.split(",")
    unknown = [n for n in names if n not in specs]
    if unknown:
        ap.error(f"unknown servers {unknown}; choose from {list(specs)}")
    skipped = {n: specs[n].missing for n in names if specs[n].missing}
    for n, why in skipped.items():
        print(f"SKIP {n}: {why}", file=sys.stderr, flush=True)
    runs = workloads(args)
    dataset = serve.build_dataset(tokenizer, args, max(r["num_requests"] for r in runs.values()))
    warmup = [loadgen.RequestSpec(s.prompt, 8, s.prompt_len) for s in dataset[:2]]
    slo = loadgen.parse_slo(args.slo)
    summaries = {n: {w: [] for w in runs} for n in names}
    timings = {n: {} for n in names}
    logs = tempfile.mkdtemp(prefix="sift-compare-")

    for r in range(args.rounds):
        order = [n for n in names if n not in skipped]
        for name in (order if r % 2 == 0 else order[::-1]):
            log = os.path.join(logs, f"{name}-round{r + 1}.log")
            try:
                with launched(specs[name], free_port(), log, args.start_timeout) as url:
                    extra = specs[name].extra_body
                    loadgen.run(loadgen.LoadConfig(url, endpoint=args.endpoint, concurrency=2, num_requests=2,
                                                   extra_body=extra), warmup, progress=False)
                    for w, kwargs in runs.items():
                        result = loadgen.run(loadgen.LoadConfig(url, extra_body=extra, **kwargs), dataset,
                                             progress=False)
                        s = loadgen.summarize(result, slo)
                        summaries[name][w].append(s)
                        timings[name][w] = serve.timings(result)
                        print(f"round {r + 1} {name:>9} {w:>14}: {s['completed']}/{s['failed']} ok/fail, "
                              f"{s['output_throughput']:.1f} out tok/s, TTFT p50 "
                              f"{s['ttft_ms']['median'] or 0:.0f} ms", file=sys.stderr, flush=True)
            except StartFailed as e:
                skipped[name] = f"failed to start: {e} (log: {log})"
                print(f"SKIP {name}: {skipped[name]}", file=sys.stderr, flush=True)
    served = [n for n in names if n not in skipped]

    table = {n: {w: medians(summaries[n][w]) for w in runs} for n in served}
    header = ["server", "workload", "ok/fail"] + list(MEDIAN_KEYS)
    digits = {"req/s": 2, "spec accept": 2}
    rows = [[n, w, m["ok/fail"]] + [serve.fmt(m[k], digits.get(k, 1)) for k in MEDIAN_KEYS]
            for w in runs for n, t in table.items() for m in [t[w]]]
    command = "python -m sift.bench.compare " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    machine, date = serve.machine_description(), serve.utc_now()
    versions = {d: _version(d) for d in ("sift", "torch", "transformers", "llama_cpp_python")}
    md = [f"Measured {date} on {machine}; " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
          f"Model: `{os.path.basename(args.model)}`; random prose prompts of {args.input_len} tokens, "
          f"{args.output_len} output tokens (EOS ignored), greedy, streaming `/v1/{args.endpoint}`; "
          f"median of {args.rounds} interleaved rounds. Command: `{command}`", "",
          serve.markdown_table(header, rows), ""]
    md += ratio_lines(table, list(runs))
    md += [f"- {n} skipped: {why}" for n, why in skipped.items()]
    print("\n".join(md))

    os.makedirs(args.result_dir, exist_ok=True)
    out = os.path.join(args.result_dir, "compare")
    with open(out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    write_result(out + ".json", {"bench": "compare", "date": date, "machine": machine, "versions": versions,
                                 "command": command, "model": os.path.basename(args.model), "workloads": runs,
                                 "skipped": skipped, "medians": table, "rounds": summaries},
                 argv=None if argv is None else [sys.argv[0], *argv], indent=1, default=str)
    if served:
        points = {n: [(runs[w]["concurrency"], table[n][w]["out tok/s"]) for w in runs
                      if "concurrency" in runs[w] and table[n][w]["out tok/s"] is not None] for n in served}
        serve.plot_throughput({n: p for n, p in points.items() if p}, out + "-throughput.png")
        top = max((w for w in runs if "concurrency" in runs[w]), key=lambda w: runs[w]["concurrency"])
        serve.plot_cdfs({f"TTFT at {top}": {n: timings[n].get(top, {}).get("ttft_s", []) for n in served},
                         f"E2E at {top}": {n: timings[n].get(top, {}).get("e2e_s", []) for n in served}},
                        out + "-latency-cdf.png")
    print(f"wrote {out}.md, {out}.json (server logs in {logs})", file=sys.stderr)
    return 0 if served else 1


if __name__ == "__main__":
    sys.exit(main())
