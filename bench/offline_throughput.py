"""Offline output throughput: Sift's LLM vs HF transformers ``generate`` on the same model, same run.

Prompt 128 tokens (real prose from CPython's ``pydoc_data.topics``), output 128 tokens, greedy,
at 1, 8 and 32 concurrent requests. The systems are interleaved round by round and the
median of the rounds is reported, because this machine's speed drifts over minutes.

    python -m bench.offline_throughput [--rounds 3] [--batches 1,8,32] [--dtype float32]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

from models.embedded import embedded_model_path

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def real_prompts(tokenizer, n: int, length: int) -> list:
    """n prompts of exactly ``length`` tokens cut from pydoc topics (text no one here wrote)."""
    from pydoc_data.topics import topics

    ids = []
    for key in sorted(topics):
        ids.extend(tokenizer.encode(topics[key], add_special_tokens=False))
        if len(ids) >= n * length:
            break
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def run_sift(llm, prompts, out_len):
    from server.engine.request import SamplingParams

    sp = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    dt = time.perf_counter() - t0
    return sum(len(o.token_ids) for o in outs) / dt


def run_hf(model, prompts, out_len, pad_id):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=out_len, min_new_tokens=out_len,
                             do_sample=False, pad_token_id=pad_id)
    dt = time.perf_counter() - t0
    return (out.shape[1] - width) * len(prompts) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-hf", action="store_true", help="skip the HF baseline")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    from server.engine.llm import LLM

    llm = LLM(dtype=args.dtype, max_num_seqs=max(batches), max_num_batched_tokens=4096)
    prompts = real_prompts(llm.tokenizer, max(batches), args.prompt_len)
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        path = embedded_model_path()
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  torch_dtype=getattr(torch, args.dtype)).eval()
    pad = llm.engine.eos_token_ids[0]
    run_sift(llm, prompts[:2], 4)  # warm-up
    results = {b: {"sift": [], "hf": []} for b in batches}
    for r in range(args.rounds):
        for b in batches:
            results[b]["sift"].append(run_sift(llm, prompts[:b], args.output_len))
            if hf is not None:
                results[b]["hf"].append(run_hf(hf, prompts[:b], args.output_len, pad))
            print(f"round {r + 1} batch {b}: sift {results[b]['sift'][-1]:.1f} tok/s"
                  + (f", hf {results[b]['hf'][-1]:.1f} tok/s" if hf is not None else ""), flush=True)

    rows = []
    for b in batches:
        s = statistics.median(results[b]["sift"])
        h = statistics.median(results[b]["hf"]) if results[b]["hf"] else None
        rows.append({"batch": b, "sift_tok_s": round(s, 1), "hf_tok_s": round(h, 1) if h else None,
                     "speedup": round(s / h, 2) if h else None,
                     "sift_runs": [round(x, 1) for x in results[b]["sift"]],
                     "hf_runs": [round(x, 1) for x in results[b]["hf"]]})
    print(f"\n{'batch':>5} | {'sift tok/s':>10} | {'hf tok/s':>9} | speedup")
    for row in rows:
        print(f"{row['batch']:>5} | {row['sift_tok_s']:>10} | {str(row['hf_tok_s']):>9} | {row['speedup']}")
    os.makedirs(RESULTS, exist_ok=True)
    doc = {
        "bench": "offline_throughput",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "dtype": args.dtype, "prompt_len": args.prompt_len, "output_len": args.output_len,
        "rounds": args.rounds, "median_of_rounds": rows,
    }
    with open(os.path.join(RESULTS, "offline_throughput.json"), "w") as f:
        json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
