"""Decode speed and memory of quantized weights on the embedded model (this host's CPU or a GPU).

Configurations, all on the embedded SmolLM2-135M Q4_1 GGUF:
  float32   ``--quantization none``: every tensor dequantized to float32 (the path before quantization)
  int8      ``--quantization int8``: linear weights requantized to int8 per channel (``_weight_int8pack_mm``)
  int4      ``--quantization auto``: Q4_1 repacked exactly to int4 group 32, Q8_0 head as two int4 planes
  int4-bf16 the same weights with bfloat16 activations (and KV)

Decode tokens/s at 1, 8 and 32 streams (128-token prompts, then ``--decode-tokens`` greedy tokens each; only
steps after every stream's prefill are timed), the configurations interleaved round by round, medians over
``--rounds``; resident memory (VmRSS) after load, each configuration in a fresh process. Prints a table and
writes JSON with the git commit, host, date and command. ``python -m sift.bench.quant``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

from sift.bench.provenance import write_result

CONFIGS = {"float32": ("none", "float32"), "int8": ("int8", "float32"), "int4": ("auto", "float32"),
           "int4-bf16": ("auto", "bfloat16")}


def make_llm(name: str, num_blocks: int):
    from sift.server.engine.llm import LLM

    quantization, dtype = CONFIGS[name]
    return LLM(quantization=quantization, dtype=dtype, num_blocks=num_blocks, max_num_seqs=64, max_model_len=512)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def prompts(tok, n: int, length: int) -> list:
    from pydoc_data.topics import topics

    ids = tok.encode("\n\n".join(topics[k] for k in sorted(topics)), add_special_tokens=False)
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def decode_rate(llm, batch: list, tokens: int) -> float:
    """Decode tokens/s of ``batch`` run together: steps after every prefill finished, to the end."""
    from sift.server.engine.request import SamplingParams

    eng = llm.engine
    params = SamplingParams(max_tokens=tokens + 1, temperature=0.0, ignore_eos=True)
    ids = [f"r{time.monotonic_ns()}-{i}" for i in range(len(batch))]
    for rid, p in zip(ids, batch):
        eng.add_request(rid, p, params)
    produced = {rid: 0 for rid in ids}

    def step() -> None:
        for out in eng.step():
            produced[out.request_id] += len(out.new_token_ids)

    while min(produced.values()) < 1:
        step()
    start_tokens, t = sum(produced.values()), time.perf_counter()
    while eng.has_unfinished_requests():
        step()
    return (sum(produced.values()) - start_tokens) / (time.perf_counter() - t)


def measure_rss(names: list) -> dict:
    """VmRSS after load of each configuration, each in a fresh process (run side by side)."""
    procs = {}
    for name in names:
        code = f"from sift.bench.quant import make_llm, rss_mib; llm = make_llm({name!r}, 64); print('RSS', rss_mib())"
        procs[name] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, cwd=os.getcwd(), env=dict(os.environ, TQDM_DISABLE="1"))
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate()
        line = next((ln for ln in stdout.splitlines() if ln.startswith("RSS")), None)
        if line is None:
            raise RuntimeError(f"{name}: {stderr[-2000:]}")
        out[name] = float(line.split()[1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--streams", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench/results/quant.json")
    args = ap.parse_args()
    import torch

    rss = measure_rss(args.configs)
    llms = {name: make_llm(name, num_blocks=max(args.streams) * (args.prompt_len + args.decode_tokens) // 16 + 64)
            for name in args.configs}
    batch = prompts(next(iter(llms.values())).tokenizer, max(args.streams), args.prompt_len)
    rates = {name: {s: [] for s in args.streams} for name in args.configs}
    for _ in range(args.rounds):
        for s in args.streams:
            for name in args.configs:  # interleaved: every configuration sees the same host load in turn
                rates[name][s].append(decode_rate(llms[name], batch[:s], args.decode_tokens))
    report = {"host": platform.node(), "cpu_threads": torch.get_num_threads(), "decode_tokens": args.decode_tokens, "prompt_len": args.prompt_len, "rounds": args.rounds,
              "rss_mib_after_load": rss,
              "decode_tok_s_median": {n: {s: statistics.median(v) for s, v in r.items()} for n, r in rates.items()},
              "decode_tok_s_all": rates}
    print(f"decode tokens/s (median of {args.rounds}), RSS after load; {report['host']}, "
          f"{report['cpu_threads']} threads")
    print(f"{'config':<11}" + "".join(f"{f'{s} stream':>12}" for s in args.streams) + f"{'RSS MiB':>10}")
    for name in args.configs:
        med = report["decode_tok_s_median"][name]
        print(f"{name:<11}" + "".join(f"{med[s]:>12.1f}" for s in args.streams) + f"{rss[name]:>10.0f}")
    write_result(args.out, report, device="cpu", indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
