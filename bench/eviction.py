"""KV eviction: fidelity against the full cache, and capacity in a fixed KV pool (same run, same engine path).

1. Documents (CPython ``pydoc_data.topics``, text no one here wrote): the first half is the prompt, the
   second half is teacher-forced one token at a time. Per policy and budget (25/50/75% of the document):
   perplexity of the forced half vs the full cache, next-token (argmax) agreement with the full cache,
   and the mean resident fraction of the KV (resident / logical entries).
2. Generations: the full cache's greedy continuation of real prompts is forced through every policy
   (teacher forcing with the full-cache output): argmax agreement.
3. Needle: a sentence with a number hidden in real text; does a greedy answer still recall it?
4. Capacity: one fixed KV pool and reserved admission (a request starts only while every running
   request's peak KV fits, so nothing is preempted): how many 1,000-token generations run at once with
   and without eviction, and the output throughput while the pool is the limit (requests still queued).

Every configuration of a section runs as concurrent requests of one engine (each request carries its
own ``kv_eviction`` options), so the numbers share one path and one run.

    python -m sift.bench.eviction            # full: ~2k-token documents, 1,000-token generations
    python -m sift.bench.eviction --quick    # minutes on a CPU: validates the script
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from datetime import datetime, timezone

import torch
from pydoc_data.topics import topics

from sift.bench.provenance import write_result
from sift.server.engine.request import SamplingParams
from sift.server.options import EvictionOptions

RESULTS = os.path.join(os.path.dirname(__file__), "results")
NEEDLE = " The secret code of the archive is {code}. "
QUESTION = "\nQuestion: What is the secret code of the archive?\nAnswer: The secret code of the archive is"


def long_documents(tok, n: int, length: int) -> list:
    """The n longest pydoc topics, each cut to ``length`` tokens."""
    keys = sorted(topics, key=lambda k: -len(topics[k]))[:n]
    return [tok.encode(topics[k], add_special_tokens=False)[:length] for k in keys]


class ForcedDecoding:
    """Teacher forcing through the engine: every sampled row's logits are recorded (NLL of the forced
    token, argmax) and replaced so greedy sampling picks the forced token. Bench instrumentation only."""

    def __init__(self, engine):
        self.engine, self.targets, self.records, self.resident = engine, {}, {}, {}
        runner, model = engine.runner, engine.runner.model
        execute, logits_fn = runner.execute, model.compute_logits

        def traced_execute(sched, requests):
            self._rows = [s.request_id for s in sched.requests if s.sample]
            for s in sched.requests:  # the step's slots are allocated: resident vs logical incl. its tokens
                req = requests[s.request_id]
                if s.request_id in self.targets and req.num_computed_tokens >= req.num_prompt_tokens:
                    logical = req.num_computed_tokens + len(s.token_ids)
                    self.resident[s.request_id].append(engine.kv.num_resident(s.request_id) / logical)
            return execute(sched, requests)

        def forced_logits(hidden):
            logits = logits_fn(hidden)
            for i, rid in enumerate(self._rows):
                if rid not in self.targets:
                    continue
                k = engine.scheduler.requests[rid].num_output_tokens
                target = self.targets[rid][k]
                lp = torch.log_softmax(logits[i].float(), dim=-1)
                self.records[rid].append((-lp[target].item(), int(lp.argmax())))
                logits[i] = float("-inf")
                logits[i, target] = 0.0
            return logits

        runner.execute, model.compute_logits = traced_execute, forced_logits

    def run(self, prompts: list, continuations: list, configs: dict) -> dict:
        """configs: name -> EvictionOptions or None. Returns name -> per prompt (nlls, argmaxes, resident)."""
        ids = []
        for name, opts in configs.items():
            for j, (p, c) in enumerate(zip(prompts, continuations)):
                rid = f"{name}#{j}"
                self.targets[rid], self.records[rid], self.resident[rid] = c, [], []
                self.engine.add_request(rid, p, SamplingParams(max_tokens=len(c), temperature=0.0, ignore_eos=True,
                                                               eviction=opts))
                ids.append(rid)
        while self.engine.has_unfinished_requests():
            self.engine.step()
        out = {name: [] for name in configs}
        for rid in ids:
            name = rid.split("#")[0]
            nll, top = zip(*self.records.pop(rid))
            res = self.resident.pop(rid)
            out[name].append((list(nll), list(top), sum(res) / len(res) if res else 1.0))
            del self.targets[rid]
        return out


def eviction_configs(policies, budgets, window, alphas) -> dict:
    """name -> options; with several LazyEviction thresholds, each gets its own config ``lazy(a=..)@B%``."""
    configs = {"full": None}
    for m in policies:
        for a in (alphas if m == "lazy" else alphas[:1]):
            label = f"lazy(a={a:g})" if m == "lazy" and len(alphas) > 1 else m
            for b in budgets:
                configs[f"{label}@{int(b * 100)}%"] = EvictionOptions(method=m, budget=b, window=window, alpha=a)
    return configs


def fidelity(runs: dict) -> dict:
    """Per config: perplexity, its change vs full (%), argmax agreement with full, mean resident fraction."""
    full = runs["full"]
    ppl_full = math.exp(sum(sum(n) for n, _, _ in full) / sum(len(n) for n, _, _ in full))
    rows = {}
    for name, per_prompt in runs.items():
        nll = sum(sum(n) for n, _, _ in per_prompt) / sum(len(n) for n, _, _ in per_prompt)
        agree = sum(sum(a == b for a, b in zip(t, ft)) for (_, t, _), (_, ft, _) in zip(per_prompt, full))
        total = sum(len(t) for _, t, _ in per_prompt)
        rows[name] = {"ppl": round(math.exp(nll), 3), "ppl_change_pct": round(100 * (math.exp(nll) / ppl_full - 1), 2),
                      "agreement": round(agree / total, 4),
                      "resident_frac": round(sum(r for _, _, r in per_prompt) / len(per_prompt), 3)}
    return rows


def needle(llm, configs: dict, length: int, depths=(0.25, 0.5, 0.75)) -> dict:
    tok = llm.tokenizer
    hay = long_documents(tok, 3, length)
    prompts, codes = [], []
    for i, depth in enumerate(depths):
        code = str(4000 + 1371 * (i + 1))
        doc = hay[i % len(hay)]
        cut = int(len(doc) * depth)
        prompts.append(doc[:cut] + tok.encode(NEEDLE.format(code=code), add_special_tokens=False) + doc[cut:]
                       + tok.encode(QUESTION, add_special_tokens=False))
        codes.append(code)
    names, params, all_prompts = [], [], []
    for name, opts in configs.items():
        for p in prompts:
            names.append(name)
            all_prompts.append(p)
            params.append(SamplingParams(max_tokens=8, temperature=0.0, eviction=opts))
    outs = llm.generate(all_prompts, params)
    found = {name: 0 for name in configs}
    for i, (name, o) in enumerate(zip(names, outs)):
        found[name] += codes[i % len(codes)] in o.text
    return {name: f"{k}/{len(codes)}" for name, k in found.items()}


def capacity(args, policy: str, budget: float) -> dict:
    """Fixed pool, reserved admission (a request is admitted only while every running request's peak KV fits):
    how many generations run at once with and without eviction, and the throughput while the pool is the
    limit. More requests are queued than fit; throughput counts the steps while some still wait for KV (the
    saturated phase: the batch is as large as the pool allows), so a lone straggler after the last full wave
    does not decide it. Once none waits, the rest are aborted."""
    from sift.server.engine.llm import LLM

    prompt_len, gen = args.capacity_prompt, args.capacity_gen
    bs = 16
    full_blocks = -(-(prompt_len + gen) // bs)
    pool = args.pool_requests * full_blocks + 1
    alpha = float(args.alpha.split(",")[0])
    opts = {"none": None, policy: EvictionOptions(method=policy, budget=budget, window=args.window, alpha=alpha)}
    result = {"pool_blocks": pool, "block_size": bs, "prompt_tokens": prompt_len, "gen_tokens": gen,
              "requests": args.capacity_requests, "admission": "reserve", "throughput": "saturated phase"}
    llm = LLM(num_blocks=pool, block_size=bs, max_model_len=prompt_len + gen + 16, max_num_seqs=256,
              max_num_batched_tokens=4096, enable_prefix_caching=False, dtype=args.dtype, admission="reserve")
    src = long_documents(llm.tokenizer, 64, prompt_len)
    prompts = [src[i % len(src)] for i in range(args.capacity_requests)]
    engine = llm.engine
    for name, o in opts.items():
        ids = [f"{name}-{i}" for i in range(len(prompts))]
        for rid, p in zip(ids, prompts):
            engine.add_request(rid, p, SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True, eviction=o))
        pre0, ntok, busy, peak_running, peak_blocks = engine.stats()["num_preemptions"], 0, 0.0, 0, 0
        while engine.scheduler.num_waiting:
            t0 = time.perf_counter()
            ntok += sum(len(out.new_token_ids) for out in engine.step())
            busy += time.perf_counter() - t0
            peak_running = max(peak_running, engine.scheduler.num_running)
            peak_blocks = max(peak_blocks, pool - 1 - engine.kv.num_free_blocks)
        for rid in ids:
            engine.abort_request(rid)
        while engine.has_unfinished_requests():
            engine.step()
        result[f"{name}_concurrent"] = peak_running
        result[f"{name}_peak_blocks_used"] = peak_blocks
        result[f"{name}_tok_s"] = round(ntok / busy, 1)
        result[f"{name}_preemptions"] = engine.stats()["num_preemptions"] - pre0
    result["fit_ratio"] = round(result[f"{policy}_concurrent"] / max(1, result["none_concurrent"]), 2)
    result["throughput_ratio"] = round(result[f"{policy}_tok_s"] / result["none_tok_s"], 2)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes to validate the script")
    ap.add_argument("--policies", default="streaming,h2o,snapkv,lazy")
    ap.add_argument("--budgets", default="0.25,0.5,0.75")
    ap.add_argument("--window", type=int, default=32, help="W: LazyEviction window / recent window")
    ap.add_argument("--alpha", default="1e-4", help="LazyEviction threshold(s), comma-separated: one config each")
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--doc-tokens", type=int, default=2048)
    ap.add_argument("--gen-prompts", type=int, default=4)
    ap.add_argument("--gen-tokens", type=int, default=1000)
    ap.add_argument("--needle-tokens", type=int, default=1500)
    ap.add_argument("--capacity-prompt", type=int, default=64)
    ap.add_argument("--capacity-gen", type=int, default=1000, help="tokens each capacity-run generation produces")
    ap.add_argument("--capacity-requests", type=int, default=24,
                    help="requests queued for the capacity run (more than fit), 0: no capacity run")
    ap.add_argument("--pool-requests", type=int, default=8, help="pool size in full-cache generations")
    ap.add_argument("--capacity-policy", default="lazy")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.docs, args.doc_tokens, args.gen_prompts, args.gen_tokens = 1, 160, 1, 32
        args.needle_tokens, args.pool_requests, args.window = 120, 2, 8
        args.capacity_gen, args.capacity_requests = 48, 4
    policies, budgets = args.policies.split(","), [float(b) for b in args.budgets.split(",")]
    alphas = [float(a) for a in args.alpha.split(",")]
    configs = eviction_configs(policies, budgets, args.window, alphas)

    from sift.server.engine.llm import LLM

    t0 = time.perf_counter()
    per_seq = max(args.doc_tokens, 128 + args.gen_tokens, args.needle_tokens + 64) + 64
    llm = LLM(num_blocks=len(configs) * max(args.docs, args.gen_prompts, 3) * (per_seq // 16 + 2),
              max_model_len=per_seq, max_num_seqs=256, max_num_batched_tokens=4096, dtype=args.dtype)
    forced = ForcedDecoding(llm.engine)
    docs = long_documents(llm.tokenizer, args.docs, args.doc_tokens)
    print(f"documents ({time.perf_counter() - t0:.0f}s)", flush=True)
    doc_rows = fidelity(forced.run([d[:len(d) // 2] for d in docs], [d[len(d) // 2:] for d in docs], configs))
    prompts = long_documents(llm.tokenizer, args.gen_prompts + args.docs, 128)[args.docs:]
    print(f"generations ({time.perf_counter() - t0:.0f}s)", flush=True)
    greedy = llm.generate(prompts, SamplingParams(max_tokens=args.gen_tokens, temperature=0.0, ignore_eos=True))
    gen_rows = fidelity(forced.run(prompts, [o.token_ids for o in greedy], configs))
    print(f"needle ({time.perf_counter() - t0:.0f}s)", flush=True)
    needle_rows = needle(llm, configs, args.needle_tokens)
    print(f"capacity ({time.perf_counter() - t0:.0f}s)", flush=True)
    cap = capacity(args, args.capacity_policy, 0.5 if 0.5 in budgets else budgets[0]) if args.capacity_requests else None

    print(f"\n{'config':>22} | {'doc ppl':>8} | {'Δppl %':>7} | {'doc agree':>9} | {'resident':>8} | "
          f"{'gen agree':>9} | {'needle':>6}")
    for name in configs:
        d, g = doc_rows[name], gen_rows[name]
        print(f"{name:>22} | {d['ppl']:>8} | {d['ppl_change_pct']:>7} | {d['agreement']:>9} | "
              f"{d['resident_frac']:>8} | {g['agreement']:>9} | {needle_rows[name]:>6}")
    print("\ncapacity:", json.dumps(cap))
    os.makedirs(RESULTS, exist_ok=True)
    out = args.out or os.path.join(RESULTS, "eviction_quick.json" if args.quick else "eviction.json")
    doc = {
        "bench": "eviction", "quick": args.quick,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "device": str(llm.engine.device), "args": vars(args), "seconds": round(time.perf_counter() - t0, 1),
        "documents": doc_rows, "generations": gen_rows, "needle": needle_rows, "capacity": cap,
    }
    write_result(out, doc, device=str(llm.engine.device))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
