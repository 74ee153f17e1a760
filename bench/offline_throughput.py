"""Offline output throughput: Sift's LLM vs HF transformers ``generate`` on the same model, same run.

Prompt 128 tokens (real prose from CPython's ``pydoc_data.topics``), output 128 tokens, greedy,
at 1, 8 and 32 concurrent requests. The systems are interleaved round by round and the
median of the rounds is reported, because this machine's speed drifts over minutes.

    python -m sift.bench.offline_throughput [--rounds 3] [--batches 1,8,32] [--systems sift:float32,sift:bfloat16,hf:float32]

Any other model: ``--model DIR`` (an HF directory; HF transformers then loads the same directory). With
``--load-format dummy`` only DIR/config.json is read and the weights are random (bench/shapes/ has the configs
of models whose weights are not here), the tokenizer comes from ``--tokenizer`` (default: the embedded model's)
and only Sift systems run; ``--num-layers N`` keeps the first N layers of the shape, for hosts whose memory
cannot hold them all (per-layer shapes stay real; report it with the figures).
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

from sift.bench.provenance import write_result
from sift.models.embedded import embedded_model_path

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
    from sift.server.engine.request import SamplingParams

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


def _shape_dir(model: str, num_layers) -> str:
    """``model`` itself, or with ``num_layers`` a temporary copy of its config.json cut to that many layers."""
    if not num_layers:
        return model
    import tempfile

    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    for key in ("layer_types",):
        if cfg.get(key):
            cfg[key] = cfg[key][:num_layers]
    cfg["num_hidden_layers"] = num_layers
    out = tempfile.mkdtemp(prefix="sift-shape-")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--systems", default="sift:float32,sift:bfloat16,hf:float32",
                    help="comma-separated system:dtype pairs; the first hf entry is the baseline")
    ap.add_argument("--model", default=None, help="HF model directory (default: the embedded model)")
    ap.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    ap.add_argument("--tokenizer", default=None, help="GGUF file or HF directory (default: --model's, or the "
                    "embedded model's under --load-format dummy)")
    ap.add_argument("--num-layers", type=int, default=None, help="dummy only: keep the first N layers")
    ap.add_argument("--num-blocks", type=int, default=None, help="KV pool size in blocks (default: by memory)")
    ap.add_argument("--out", default="offline_throughput.json", help="file name under bench/results/")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    systems = [tuple(x.split(":")) for x in args.systems.split(",")]
    model, tokenizer = args.model, args.tokenizer
    if args.load_format == "dummy":
        model = _shape_dir(args.model, args.num_layers)
        tokenizer = tokenizer or embedded_model_path()
        systems = [s for s in systems if s[0] == "sift"]

    from sift.server.engine.llm import LLM

    runners, prompts, pad = {}, None, None
    for kind, dtype in systems:
        name = f"{kind}-{dtype}"
        if kind == "sift":
            llm = LLM(model=model, load_format=args.load_format, tokenizer=tokenizer, dtype=dtype,
                      max_num_seqs=max(batches), max_num_batched_tokens=4096,
                      max_model_len=args.prompt_len + args.output_len + 16, num_blocks=args.num_blocks)
            prompts = prompts or real_prompts(llm.tokenizer, max(batches), args.prompt_len)
            pad = llm.engine.eos_token_ids[0]
            run_sift(llm, prompts[:2], 4)  # warm-up
            runners[name] = lambda ps, llm=llm: run_sift(llm, ps, args.output_len)
        elif kind == "hf":
            from transformers import AutoModelForCausalLM

            if model is not None:
                hf = AutoModelForCausalLM.from_pretrained(model, torch_dtype=getattr(torch, dtype)).eval()
            else:
                path = embedded_model_path()
                hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                          torch_dtype=getattr(torch, dtype)).eval()
            runners[name] = lambda ps, hf=hf: run_hf(hf, ps, args.output_len, pad)
        else:
            raise SystemExit(f"unknown system {kind!r}")
    if prompts is None:
        raise SystemExit("at least one sift system is needed (it supplies the tokenizer and prompts)")
    results = {b: {name: [] for name in runners} for b in batches}
    for r in range(args.rounds):  # interleaved: every system once per round and batch
        for b in batches:
            for name, fn in runners.items():
                results[b][name].append(fn(prompts[:b]))
            print(f"round {r + 1} batch {b}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in results[b].items()),
                  flush=True)

    base = next((n for n in runners if n.startswith("hf")), None)
    rows = []
    for b in batches:
        row = {"batch": b}
        for name in runners:
            row[name] = round(statistics.median(results[b][name]), 1)
            row[name + "_runs"] = [round(x, 1) for x in results[b][name]]
        if base:
            for name in runners:
                if name != base:
                    row[f"{name}_vs_{base}"] = round(row[name] / row[base], 2)
        rows.append(row)
    names = list(runners)
    print("\nmedian output tok/s\n" + " | ".join(["batch"] + names + ([f"x {base}" for _ in names[:0]] if base else [])))
    for row in rows:
        cells = [str(row["batch"])] + [f"{row[n]}" + (f" ({row[n + '_vs_' + base]}x)" if base and n != base else "")
                                       for n in names]
        print(" | ".join(cells))
    os.makedirs(RESULTS, exist_ok=True)
    doc = {
        "bench": "offline_throughput",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "model": args.model or "embedded", "load_format": args.load_format, "num_layers": args.num_layers,
        "prompt_len": args.prompt_len, "output_len": args.output_len,
        "rounds": args.rounds, "baseline": base, "median_of_rounds": rows,
    }
    write_result(os.path.join(RESULTS, args.out), doc)


if __name__ == "__main__":
    main()
