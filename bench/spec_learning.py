"""Token Recycling's table learning on plain steps, on vs off: an ablation of
:meth:`sift.server.spec.Speculator.learn_plain`.

When the speculation controller turns speculation off for a step, the speculating requests' input tokens can still
write their rows of the adjacency table from the step's logits (on), or the table learns only from
verified trees (off, as before 2026-11-25). Each setting runs as its own server would (its own table and
controller statistics, kept across runs), interleaved round by round with the plain path (ABBA), on
the same prompts as ``sift.bench.spec``. Speedups are medians over rounds of each run's rate / its round's
plain rate.

    python -m sift.bench.spec_learning          # writes bench/results/spec_learning.json
"""
from __future__ import annotations

import argparse
import os
import statistics

from sift.bench.provenance import write_result
from sift.bench.serve import device_description, utc_now
from sift.bench.spec import chat_prompts, humaneval_prompts, mean_accepted_length, run

RESULTS = os.path.join(os.path.dirname(__file__), "results")
CELLS = (("chat", 1, "goose"), ("chat", 1, "recycling"), ("humaneval", 1, "goose"), ("chat", 8, "goose"),
         ("humaneval", 8, "goose"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default=os.path.join(RESULTS, "spec_learning.json"))
    args = ap.parse_args()

    from sift.server.engine.llm import LLM
    from sift.server.engine.request import SamplingParams
    from sift.server.options import SpecOptions
    from sift.server.runner.timing import measure_forward
    from sift.server.spec import Speculator, make_controller

    max_c = max(c for _, c, _ in CELLS)
    llm = LLM(num_blocks=4096, max_num_seqs=max_c)
    spec = llm.engine.techniques["speculation"]
    learn = Speculator.learn_plain
    servers = {}  # setting -> [its speculation controller, its shared Token Recycling table]
    for name in ("on", "off"):
        controller = make_controller("simple", lambda b, q: measure_forward(llm.engine.runner, b, q), max_c)
        controller.calibrate(32)
        servers[name] = [controller, None]
    n = 2 * max_c
    workloads = {"chat": chat_prompts(llm.tokenizer, n), "humaneval": humaneval_prompts(llm.tokenizer, n)}
    plain = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)

    def run_as(name, prompts, c, params):
        Speculator.learn_plain = learn if name == "on" else lambda self, *a: None
        spec.controller, spec._shared = servers[name]
        try:
            return run(llm, prompts, c, params)
        finally:
            servers[name][1] = spec._shared
            Speculator.learn_plain = learn

    rows = []
    for wname, c, method in CELLS:
        prompts = workloads[wname][:max(4, 2 * c)]
        drafting = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                                  speculative=SpecOptions(method, num_draft_tokens=32))
        for name in servers:  # warm-up: code paths
            run_as(name, prompts[:c], c, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                                        speculative=SpecOptions(method, num_draft_tokens=32)))
        rates = {"plain": [], "on": [], "off": []}
        accepted = {"on": [], "off": []}
        for r in range(args.rounds):
            for name in (("plain", "off", "on") if r % 2 == 0 else ("on", "off", "plain")):
                if name == "plain":
                    secs, outs, _, _ = run(llm, prompts, c, plain)
                else:
                    secs, outs, delta, _ = run_as(name, prompts, c, drafting)
                    accepted[name].append(mean_accepted_length(delta))
                rates[name].append(sum(map(len, outs)) / secs)
        row = dict(workload=wname, concurrency=c, method=method,
                   plain_tokens_per_s=statistics.median(rates["plain"]))
        for name in ("off", "on"):
            row[f"speedup_{name}"] = statistics.median(a / b for a, b in zip(rates[name], rates["plain"]))
            row[f"accepted_per_step_{name}"] = statistics.mean(accepted[name])
        rows.append(row)
        print(f"{wname:9s} c={c:<2d} {method:9s} learning off {row['speedup_off']:.2f}x "
              f"({row['accepted_per_step_off']:.2f}/step)  on {row['speedup_on']:.2f}x "
              f"({row['accepted_per_step_on']:.2f}/step)", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    device = device_description(llm.engine.device)
    write_result(args.out, {"bench": "spec_learning", "date": utc_now(), "device": device, "rounds": args.rounds,
                            "max_tokens": args.max_tokens, "rows": rows}, device=device, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
