"""Long context: sparse decode (TidalDecode, Quest, Loki), windowed attention and Probe-and-Skip prefill,
each against the exact (dense) path in the same run, on the embedded SmolLM2-135M.

* decode: time per generated token vs context length (end to end), and one layer's decode attention
  alone (dense paged decode vs a sparse read of the budget's slots, and vs Loki's sketch scoring,
  selection and sparse read over the same pool);
* prefill: time at each length with and without token skipping (one chunk, no prefix cache);
* fidelity on real text no one here wrote (CPython's ``pydoc_data.topics``): needle retrieval at several
  depths of a prose haystack, and teacher-forced perplexity of a document's continuation after a long
  context, for every method and budget, and for the bound of per-layer token selection (``oracle-256``:
  each decode layer over its own exact top-256 keys, :func:`sift.bench.long_text.oracle_topk`);
* window: peak KV blocks in use over a long windowed generation (memory stays bounded).

    python -m sift.bench.long_context                # full run (1K..8K), writes bench/results/long_context.json
    python -m sift.bench.long_context --quick        # a reduced run that checks the script end to end
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Optional

import torch

from sift.bench.long_text import forced_perplexity, haystack, needle_hits, oracle_topk
from sift.bench.provenance import write_result
from sift.bench.serve import device_description

RESULTS = os.path.join(os.path.dirname(__file__), "results")
def skip_configs(spec: str) -> list:
    """(name, SkipOptions) of Probe-and-Skip settings "start:ratio[:geo][:field=value...],..." (e.g. 8:0.5 =
    skipping from layer 8, rising linearly to half the tokens; 2:0.9:geo = from layer 2 to 90%, every layer
    pruning the same share of the tokens still in play, the ``geometric`` schedule; 1:0.95:recent=512 = the
    last 512 tokens always active; any integer field of SkipOptions may follow)."""
    from sift.server.options import SkipOptions

    out = []
    for item in (x for x in spec.split(",") if x):
        start, ratio, *rest = item.split(":")
        fields, suffix = _extra_fields(item, rest, "--skip: start:ratio[:geo][:field=value...]",
                                       {"geo": ("schedule", "geometric")})
        out.append((f"spts-L{start}-{ratio}{suffix}",
                    SkipOptions(method="spts", start_layer=int(start), ratio=float(ratio), **fields)))
    return out


def _extra_fields(item: str, extras: list, usage: str, words: Optional[dict] = None) -> tuple:
    """({field: value}, name suffix) of a setting's trailing ``field=value`` (integer) parts, or of the bare
    words in ``words`` ({word: (field, value)}); ``usage`` names the flag's format in the error."""
    fields, suffix, words = {}, "", words or {}
    for extra in extras:
        if extra in words:
            key, value = words[extra]
            fields[key], suffix = value, f"{suffix}-{extra}"
        elif "=" in extra:
            key, value = extra.split("=")
            fields[key], suffix = int(value), f"{suffix}-{key}{value}"
        else:
            raise ValueError(f"{item!r} is not {usage}")
    return fields, suffix


def timed_methods(budgets: list) -> list:
    """(name, sparsity, None) of the methods whose decode speed is timed: dense, TidalDecode, Quest and Loki
    (24-dimensional key sketches) at each budget, and at the largest TidalDecode re-selecting every 4
    layers (``-r4``), re-ranking 4x the budget in candidates in every sparse layer (``-c``), and both."""
    from sift.server.options import SparsityOptions

    out = [("dense", None, None)]
    for b in budgets:
        out += [(f"tidal-{b}", SparsityOptions(method="tidal", budget=b), None),
                (f"quest-{b}", SparsityOptions(method="quest", budget=b), None),
                (f"loki-{b}", SparsityOptions(method="loki", budget=b), None)]
    top = max(budgets)
    cand = 4 * top
    return out + [(f"tidal-{top}-r4", SparsityOptions(method="tidal", budget=top, reselect_every=4), None),
                  (f"tidal-{top}-c{cand}", SparsityOptions(method="tidal", budget=top, candidates=cand), None),
                  (f"tidal-{top}-c{cand}-r4", SparsityOptions(method="tidal", budget=top, candidates=cand,
                                                             reselect_every=4), None)]


def tidal_configs(spec: str, budget: int) -> list:
    """(name, SparsityOptions) of TidalDecode settings "layers[:field=value...],..." at ``budget``: layers =
    the selection layer, then any re-selection layers, joined by "/" (12 = select at 12, re-select at the
    default; 1/3/15 = select at 1, re-select at 3 and 15); any integer field of SparsityOptions may follow
    (e.g. 1/2/3/7/15/23:candidates=2048)."""
    from sift.server.options import SparsityOptions

    out = []
    for item in (x for x in spec.split(",") if x):
        layers, *rest = item.split(":")
        sel, *resel = (int(x) for x in layers.split("/"))
        fields, suffix = _extra_fields(item, rest, "--tidal: layers[:field=value...]")
        out.append((f"tidal-{budget}-L{layers}{suffix}", SparsityOptions(
            method="tidal", budget=budget, selection_layer=sel, reselection_layer=tuple(resel) or None, **fields)))
    return out


def loki_configs(spec: str, budget: int) -> list:
    """(name, SparsityOptions) of Loki settings "rank[:field=value...],..." at ``budget`` (16 = key sketches of
    16 dimensions; 8:candidates=1024 = 8 dimensions pick 1,024 candidates, exact scores the budget)."""
    from sift.server.options import SparsityOptions

    out = []
    for item in (x for x in spec.split(",") if x):
        rank, *rest = item.split(":")
        fields, suffix = _extra_fields(item, rest, "--loki: rank[:field=value...]")
        out.append((f"loki-{budget}-k{rank}{suffix}", SparsityOptions(method="loki", budget=budget, rank=int(rank),
                                                                      **fields)))
    return out


def methods(budgets: list, tidal: str = "", skips: str = "", loki: str = "") -> list:
    """(name, sparsity, skipping) of every method whose fidelity is compared: the timed ones, TidalDecode
    as the paper has it (no kept first/latest tokens), the optional KV correction (every 32 generated
    tokens), the TidalDecode settings ``tidal`` (:func:`tidal_configs`), the Loki settings ``loki``
    (:func:`loki_configs`), a window, and the Probe-and-Skip settings ``skips``."""
    from sift.server.options import SparsityOptions

    top = max(budgets)
    out = timed_methods(budgets)
    out += [(f"tidal-{top}-paper", SparsityOptions(method="tidal", budget=top, sinks=0, recent=0), None)]
    out += [(name, opts, None) for name, opts in tidal_configs(tidal, top) + loki_configs(loki, top)]
    out += [(f"tidal-{top}-kvc32", SparsityOptions(method="tidal", budget=top, correction_interval=32), None),
            ("window-1024", SparsityOptions(method="window", window=1024, sinks=4), None)]
    return out + [(name, None, opts) for name, opts in skip_configs(skips)]


def decode_time(llm, prompt: list, sparsity, n: int, batch: int = 1) -> float:
    """Seconds per decode step of ``batch`` requests with ``prompt``'s context (each its own copy: no prefix
    caching) after their prefills (median over the steps)."""
    from sift.server.engine.request import SamplingParams

    eng = llm.engine
    for i in range(batch):
        eng.add_request(f"d{i}", prompt, SamplingParams(max_tokens=n + 1, temperature=0.0, ignore_eos=True,
                                                        sparsity=sparsity))
    while any(eng.scheduler.requests[f"d{i}"].num_output_tokens == 0 for i in range(batch)):
        eng.step()
    times = []
    while eng.has_unfinished_requests():
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def attention_time(arch, dtype, context: int, budget: int, reps: int, rank: int = 24) -> dict:
    """One layer's decode attention with the model's head shapes, batch 1, on the device's backend: dense
    vs TidalDecode's sparse layer (sparse decode over budget slots) vs Loki's layer (score the context's
    ``rank``-dimensional key sketches, select, sparse decode; the sketches are in place, as after the
    first step). On a GPU timed with device events
    (``triton.testing.do_bench``); the H100 figures of 2026-11-24 in bench/results were taken before,
    with a host clock over 20 queued calls, which at these sizes times the Python launch path as much
    as the kernels."""
    from sift.kernels import reference as ref
    from sift.kernels.backend import select_backend
    from sift.kernels.selection import sketch_topk
    from sift.server.policies.key_index import KeySketch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = select_backend("auto", dev)
    bs, hkv, dim = 16, arch.num_kv_heads, arch.head_dim
    scale = dim ** -0.5
    k = torch.randn(context + bs, hkv, dim, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    table = torch.arange(context // bs + 1, device=dev, dtype=torch.int32)[None]
    kv = torch.tensor([context], device=dev, dtype=torch.int32)
    q = torch.randn(1, arch.num_heads, dim, device=dev, dtype=dtype)
    slots = torch.randperm(context, device=dev)[:budget].reshape(1, 1, -1).expand(1, hkv, -1).contiguous()

    def clock(fn):
        if dev.type == "cuda":  # device events around each call, L2 flushed between calls (median, ms)
            import triton.testing
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps * 1e3

    if backend.name == "torch":
        dense = clock(lambda: ref.paged_decode(q, k, v, table, kv, bs, scale))
    else:
        from sift.kernels.paged_attention import paged_decode
        dense = clock(lambda: paged_decode(q, k, v, table, kv, bs, scale))
    sparse = clock(lambda: backend.sparse_decode(q, k, v, slots, scale))
    sketch, every = KeySketch(1, rank), torch.arange(context, device=dev)  # slot i holds kv index i
    sketch.scores(0, q[0], k, every, context, scale)

    def loki():
        picked, _ = sketch_topk(sketch.scores(0, q[0], k, every, context, scale), every, budget, 4, 32)
        return backend.sparse_decode(q, k, v, picked[None], scale)

    loki_ms = clock(loki)
    return {"dense_ms": dense, "sparse_ms": sparse, "speedup": dense / sparse, "loki_rank": rank,
            "loki_ms": loki_ms, "loki_speedup": dense / loki_ms}


def prefill_time(llm, prompt: list, skipping) -> float:
    from sift.server.engine.request import SamplingParams

    t = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, skipping=skipping))
    return time.perf_counter() - t


def window_peak_blocks(llm, n: int, window: int) -> int:
    from sift.server.engine.request import SamplingParams
    from sift.server.options import SparsityOptions

    eng = llm.engine
    eng.add_request("w", list(range(100, 140)), SamplingParams(
        max_tokens=n, temperature=0.0, ignore_eos=True, sparsity=SparsityOptions(method="window", window=window)))
    peak = 0
    while eng.has_unfinished_requests():
        eng.step()
        peak = max(peak, eng.kv.pool.num_blocks - 1 - eng.kv.num_free_blocks)
    return peak


def fidelity(llm, hay: list, args, compared: list, depths: list, results: dict, table: dict) -> None:
    """Needle retrieval and forced perplexity at ``args.fidelity_context`` tokens for every method, and the
    window's peak KV blocks; fills ``results`` and ``table`` and prints the table."""
    fid = hay[:args.fidelity_context]
    width = args.fidelity_context + args.ppl_tokens
    docs = [hay[len(hay) - (i + 1) * width:len(hay) - i * width] for i in range(args.ppl_docs)]
    results["perplexity_docs"] = {}

    def measure(name, sparsity, skip):
        if skip is not None:
            skip = replace(skip, min_prompt_len=min(skip.min_prompt_len, len(fid) // 2))
        hits = needle_hits(llm, fid, depths, sparsity, skip)
        ppls = [forced_perplexity(llm, doc[:-args.ppl_tokens], doc[-args.ppl_tokens:], sparsity, skip) for doc in docs]
        ppl = math.exp(sum(map(math.log, ppls)) / len(ppls))  # = over all forced tokens (same count per document)
        results["needle"][name] = dict(zip(map(str, depths), hits))
        results["perplexity"][name] = ppl
        results["perplexity_docs"][name] = ppls
        table[name] = {"needle": f"{sum(hits)}/{len(hits)}", "ppl": ppl}

    for name, sparsity, skip in compared:
        measure(name, sparsity, skip)
    for budget in args.oracle:
        with oracle_topk(llm, budget):
            measure(f"oracle-{budget}", None, None)
    dense_ppl = results["perplexity"]["dense"]
    results["window_kv_blocks"] = {"tokens": args.window_tokens, "window": 64,
                                   "peak_blocks": window_peak_blocks(llm, args.window_tokens, 64)}

    print(f"\nfidelity at {args.fidelity_context} tokens (needle depths {depths}; ppl over {args.ppl_tokens} "
          f"forced tokens in each of {args.ppl_docs} documents)")
    w = max(map(len, table)) + 2
    print(f"{'method':<{w}}{'needle':>8}{'ppl':>10}{'vs dense':>10}")
    for name, r in table.items():
        print(f"{name:<{w}}{r['needle']:>8}{r['ppl']:>10.3f}{(r['ppl'] / dense_ppl - 1) * 100:>+9.2f}%")
    print(f"window 64: peak {results['window_kv_blocks']['peak_blocks']} KV blocks over {args.window_tokens} tokens")


def _only(methods: list, names: str, flag: str, ap) -> list:
    """The (name, ...) rows of ``methods`` named in the comma-separated ``names`` (all when empty), dense
    always kept as the baseline; an unknown name is a usage error of ``flag``."""
    if not names:
        return methods
    wanted = {"dense", *names.split(",")}
    unknown = wanted - {m[0] for m in methods}
    if unknown:
        ap.error(f"{flag}: unknown {sorted(unknown)}")
    return [m for m in methods if m[0] in wanted]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small contexts and counts: checks the script runs")
    ap.add_argument("--contexts", default="1024,2048,4096,8000")
    ap.add_argument("--prefill", default="2048,4096,8000")
    ap.add_argument("--budgets", default="128,256")
    ap.add_argument("--prefill-rounds", type=int, default=2, help="interleaved rounds of the prefill timings")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--decode-rounds", type=int, default=1, help="interleaved rounds of the decode timings")
    ap.add_argument("--timed", default="", help="only these methods in the decode timings, by name (dense is "
                    "always kept as the baseline); default every timed method")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--fidelity-context", type=int, default=4000)
    ap.add_argument("--ppl-tokens", type=int, default=64)
    ap.add_argument("--ppl-docs", type=int, default=4, help="pydoc windows the forced perplexity is measured on")
    ap.add_argument("--window-tokens", type=int, default=2000)
    ap.add_argument("--no-speed", action="store_true", help="fidelity and window only (skip the timing sections)")
    ap.add_argument("--no-fidelity", action="store_true", help="timing sections only")
    ap.add_argument("--tidal", default="", help="extra TidalDecode settings to time and compare at the largest "
                    "budget, layers[:field=value...] each (tidal_configs), e.g. 12/21,1/3/15:candidates=2048")
    ap.add_argument("--loki", default="", help="extra Loki settings to time and compare at the largest budget, "
                    "rank[:field=value...] each (loki_configs), e.g. 8,16:candidates=1024")
    ap.add_argument("--fidelity-methods", default="", help="only these methods in the fidelity section, by name "
                    "(e.g. dense,spts-L2-0.9; dense is always kept as the baseline); default every method")
    ap.add_argument("--oracle", type=int, nargs="*", default=[256],
                    help="budgets of the per-layer exact top-k bound to compare for fidelity (oracle_topk)")
    ap.add_argument("--skip", default="8:0.5,8:0.7,4:0.8",
                    help="Probe-and-Skip settings start_layer:ratio[:geo][:field=value...],... (skip_configs; "
                    "the first is the server default)")
    ap.add_argument("--decode-batch", type=int, default=1, help="requests decoding together in the speed section")
    ap.add_argument("--model", default=None, help="GGUF file or HF directory (default: the embedded SmolLM2)")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                    help="dummy: random weights of the model's shape (timing only: the fidelity sections are "
                    "skipped), e.g. --model bench/shapes/llama-3.1-8b --load-format dummy on a GPU")
    ap.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's; the embedded "
                    "model's when --load-format dummy names a directory without one)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "long_context.json"))
    args = ap.parse_args()
    if args.load_format == "dummy":
        args.no_fidelity = True
    if args.quick:
        args.contexts, args.prefill, args.budgets = "512,1024", "512,1024", "64"
        args.decode_steps, args.depths, args.fidelity_context, args.ppl_tokens = 4, "0.5", 700, 8
        args.window_tokens, args.prefill_rounds, args.ppl_docs = 200, 1, 2
    contexts = [int(x) for x in args.contexts.split(",") if x]
    prefills = [int(x) for x in args.prefill.split(",") if x]
    budgets = [int(x) for x in args.budgets.split(",")]
    depths = [float(x) for x in args.depths.split(",")]

    from sift.models.embedded import embedded_model_path
    from sift.server.engine.llm import LLM

    longest = max(contexts + prefills + [args.fidelity_context]) + max(args.decode_steps, args.ppl_tokens) + 16
    tokenizer = args.tokenizer
    if tokenizer is None and args.load_format == "dummy" and os.path.isdir(args.model or "") and not any(
            os.path.exists(os.path.join(args.model, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = embedded_model_path()
    llm = LLM(model=args.model, load_format=args.load_format, tokenizer=tokenizer,
              max_model_len=None if args.model is None else longest,
              num_blocks=max(1100, args.decode_batch * (longest // 16 + 2) + 64), max_num_batched_tokens=8192,
              enable_prefix_caching=False)
    # the speed sections and the needle read from the start, the perplexity documents are the last windows
    hay = haystack(llm.tokenizer, max(contexts + prefills + [args.fidelity_context])
                   + args.ppl_docs * (args.fidelity_context + args.ppl_tokens))
    compared = methods(budgets, args.tidal, args.skip, args.loki)
    compared = _only(compared, args.fidelity_methods, "--fidelity-methods", ap)
    table = {m: {} for m, _, _ in compared}
    results = {"device": str(llm.engine.device), "device_name": device_description(llm.engine.device),
               "model": llm.engine.model_name,
               "load_format": args.load_format, "dtype": str(llm.engine.dtype), "backend": llm.engine.backend.name,
               "platform": platform.platform(),
               "time": datetime.now(timezone.utc).isoformat(), "args": vars(args), "decode": [], "attention": [],
               "prefill": [], "needle": {}, "perplexity": {}}

    timed = timed_methods(budgets) + [(name, opts, None) for name, opts in
                                      tidal_configs(args.tidal, max(budgets)) + loki_configs(args.loki, max(budgets))]
    timed = _only(timed, args.timed, "--timed", ap)
    for ctx in ([] if args.no_speed else contexts):
        times = {name: [] for name, _, _ in timed}
        for _ in range(args.decode_rounds):  # interleaved rounds, medians
            for name, sparsity, _ in timed:
                times[name].append(decode_time(llm, hay[:ctx], sparsity, args.decode_steps, args.decode_batch) * 1e3)
        row = {"context": ctx, **{name: statistics.median(t) for name, t in times.items()}}
        results["decode"].append(row)
        for b in budgets:
            results["attention"].append({"context": ctx, "budget": b, **attention_time(
                llm.engine.arch, llm.engine.dtype, ctx, b, 20)})
        print(f"decode ms/token @ {ctx}: " + ", ".join(f"{k}={v:.1f}" for k, v in row.items() if k != "context"))

    if prefills and not args.no_speed:
        prefill_time(llm, hay[:min(prefills)], None)  # warm-up: the first forward of a process is slower
    for n in ([] if args.no_speed else prefills):
        configs = [("dense", None)] + [(name, replace(skip, min_prompt_len=min(1024, n)))
                                       for name, skip in skip_configs(args.skip)]
        times = {name: [] for name, _ in configs}
        for _ in range(args.prefill_rounds):  # interleaved rounds, medians
            for name, skip in configs:
                times[name].append(prefill_time(llm, hay[:n], skip))
        base = statistics.median(times["dense"])
        row = {"length": n, "rounds": args.prefill_rounds, "dense_s": base}
        for name, _ in configs[1:]:
            row[f"{name}_s"] = statistics.median(times[name])
            row[f"{name}_speedup"] = base / row[f"{name}_s"]
        results["prefill"].append(row)
        print(f"prefill @ {n}: " + ", ".join(f"{k}={v:.2f}" for k, v in row.items() if k not in ("length", "rounds")))

    if not args.no_fidelity:
        fidelity(llm, hay, args, compared, depths, results, table)
    print("\nattention (one layer, ms): " + "; ".join(
        f"{a['context']}/{a['budget']}: dense {a['dense_ms']:.3f} sparse {a['sparse_ms']:.3f} ({a['speedup']:.1f}x) "
        f"loki-k{a['loki_rank']} {a['loki_ms']:.3f} ({a['loki_speedup']:.1f}x)"
        for a in results["attention"]))
    write_result(args.out, results, device=results["device_name"], indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
