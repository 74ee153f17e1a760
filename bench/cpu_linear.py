"""CPU float32 decode: which product form the few-row linears run in, measured end to end.

:func:`sift.models.layers.calibrate_linear` picks ``F.linear`` or ``weight @ x.T`` per row count at load time,
because which one is faster differs between hosts. This bench shows what the choice is worth: the
median decode step of ``batch`` requests (a short chat prompt, greedy) with every few-row product forced
to each form, and with the calibrated choice, interleaved over rounds in one run.

    python -m sift.bench.cpu_linear                 # batches 1,2,4,8,32; writes bench/results/cpu_linear.json
"""
from __future__ import annotations

import argparse
import os
import statistics

from sift.bench.long_context import decode_time
from sift.bench.provenance import write_result
from sift.bench.serve import device_description, utc_now

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,2,4,8,32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12, help="decode steps timed per measurement (median)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "cpu_linear.json"))
    args = ap.parse_args()

    import sift.models.layers as layers
    from sift.server.engine.llm import LLM

    llm = LLM(device="cpu", dtype="float32", enable_prefix_caching=False)
    model = llm.engine.model
    calibrated = dict(model.weight_first or {})
    forms = {"F.linear": {n: False for n in layers.CALIBRATED_ROWS},
             "weight @ x.T": {n: True for n in layers.CALIBRATED_ROWS}, "calibrated": calibrated}
    prompt = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Explain what a hash table is and when to use one."}]))
    batches = [int(b) for b in args.batches.split(",")]
    times: dict = {}
    for _ in range(args.rounds):
        for b in batches:
            for name, choice in forms.items():
                model.set_linear_products(choice)
                times.setdefault(f"{name}|{b}", []).append(decode_time(llm, prompt, None, args.steps, b))
    model.set_linear_products(calibrated)
    rows = []
    print(f"calibrated: weight @ x.T at {[n for n, yes in calibrated.items() if yes]} rows")
    print(f"{'batch':>5} " + " ".join(f"{n:>14}" for n in forms) + "  (ms per decode step, median)")
    for b in batches:
        med = {name: statistics.median(times[f"{name}|{b}"]) * 1e3 for name in forms}
        rows.append({"batch": b, **{f"{name}_ms": round(v, 2) for name, v in med.items()}})
        print(f"{b:>5} " + " ".join(f"{v:>14.1f}" for v in med.values()))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    device = device_description(llm.engine.device)
    write_result(args.out, {"bench": "cpu_linear", "date": utc_now(), "device": device, "rounds": args.rounds,
                            "steps": args.steps, "calibrated_weight_first": calibrated, "rows": rows},
                 device=device, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
