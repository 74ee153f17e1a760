"""Where TidalDecode should select: how much of each layer's attention one layer's selection keeps.

TidalDecode (2410.05076) shares the token set that a selection layer's attention picks with the sparse
layers after it, and refreshes it once at a re-selection layer that the paper chooses per model from how
well one layer's top tokens cover another's attention. This bench measures that for the served model on
real long text (CPython's ``pydoc_data.topics``): in dense decode steps after a long context, for every
pair of layers (s, l), the share of layer l's attention mass (per kv head, its query group's summed
probabilities) that falls on the tokens a selection at layer s keeps (the ``sinks`` first, the ``recent``
latest and the top rest of the budget, as :func:`sift.kernels.selection.topk_token_slots` keeps them).

From that matrix it scores schedules: the layers before the first selection layer and every selection
layer run dense, every other layer reads the latest selection before it, and a schedule's score is the
mean kept mass over its sparse layers. For each count of dense layers it finds the best set of selection
layers (the paper's schedule is one selection and one re-selection layer; ``sparsity.reselection_layer``
takes a list for more). The diagonal (each layer over its own top tokens) is the bound of per-layer
selection (:func:`sift.bench.long_text.oracle_topk`). Writes the matrix and the schedules as JSON.

    python -m sift.bench.tidal_layers --context 8000 --docs 4 --steps 8
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import datetime, timezone

import torch

from sift.bench.long_text import attention_override, haystack
from sift.bench.provenance import write_result

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def selection_masks(scores: torch.Tensor, budget: int, sinks: int, recent: int) -> torch.Tensor:
    """[layers, Hkv, L] decode scores of one step -> [layers, Hkv, L] bool: the kv indices a selection at each
    layer keeps (the current token included)."""
    from sift.kernels.selection import topk_token_slots

    layers, hkv, width = scores.shape
    lens = torch.full((layers,), width, dtype=torch.int32)
    slots = torch.arange(width).expand(layers, width)
    _, idx = topk_token_slots(scores, slots, lens, torch.full_like(lens, budget),
                              torch.full_like(lens, sinks), torch.full_like(lens, recent))
    mask = torch.zeros(layers, hkv, width + 1, dtype=torch.bool)
    mask.scatter_(2, torch.where(idx < 0, width, idx), True)  # padding lands in the spare last column
    return mask[..., :width]


def kept_mass(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[s, l]: the share of layer l's attention (mean over kv heads) on the tokens layer s's selection keeps."""
    probs = scores / scores.sum(-1, keepdim=True)
    return torch.einsum("shk,lhk->slh", masks.float(), probs).mean(-1)


def reranked_mass(scores: torch.Tensor, candidates: int, budget: int, sinks: int, recent: int) -> torch.Tensor:
    """[s, l] as :func:`kept_mass` for re-ranking (``sparsity.candidates``): a selection at layer s keeps
    ``candidates`` tokens, and layer l attends over its own top-``budget`` of them."""
    probs = scores / scores.sum(-1, keepdim=True)
    cands = selection_masks(scores, candidates, sinks, recent)
    out = torch.empty(scores.shape[0], scores.shape[0])
    for s in range(scores.shape[0]):
        own = selection_masks(scores.masked_fill(~cands[s], float("-inf")), budget, sinks, recent)
        out[s] = (own.float() * probs).sum(-1).mean(-1)
    return out


def capture_scores(llm, context: list, steps: int) -> list:
    """Dense greedy decode of ``steps`` tokens after ``context``; per step the [layers, Hkv, L] attention scores
    of the step's query (each kv head's query group summed)."""
    from sift.server.engine.request import SamplingParams

    backend = llm.engine.runner.backend
    num_layers = llm.engine.arch.num_layers
    current, out = [], []

    def forward(dense, layer, q, k_cache, v_cache, meta, scale):
        if not meta.is_decode:
            return dense(layer, q, k_cache, v_cache, meta, scale)
        o, (scores, _) = backend.decode(q, k_cache, v_cache, meta, scale, emit=True)
        current.append(scores[0].float().cpu())
        if layer == num_layers - 1:
            out.append(torch.stack(current))
            current.clear()
        return o

    with attention_override(llm, forward):
        llm.generate([context], SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True))
    return out


def schedule_mass(mass: torch.Tensor, points: list) -> float:
    """Mean kept mass over the sparse layers when the layers before ``points[0]`` run dense and every layer
    in ``points`` selects (dense), the others reading the latest selection before them."""
    reads = [(max(p for p in points if p < layer), layer) for layer in range(points[0] + 1, mass.shape[0])
             if layer not in points]
    return sum(float(mass[a, b]) for a, b in reads) / max(len(reads), 1)


def best_schedule(mass: torch.Tensor, dense: int, first: int = 1) -> list:
    """The selection layers (the first >= ``first``) that keep the most attention mass over the sparse layers
    with ``dense`` dense layers in all (the layers before the first selection, and the selecting layers):
    exhaustive by dynamic programming over (latest selection layer, dense layers used)."""
    n = mass.shape[0]
    run = [[0.0] * (n + 1) for _ in range(n)]  # run[p][q]: mass kept in layers p+1 .. q-1 reading p's selection
    for p in range(n):
        for q in range(p + 1, n + 1):
            run[p][q] = run[p][q - 1] + (float(mass[p, q - 1]) if q - 1 > p else 0.0)
    memo = {}

    def tail(p: int, used: int) -> tuple:
        """(kept mass of layers after selection layer p, later selection layers) with ``used`` dense so far."""
        if (p, used) not in memo:
            best = (run[p][n], []) if used == dense else (float("-inf"), [])
            if used < dense:
                for q in range(p + 1, n):
                    kept, rest = tail(q, used + 1)
                    if run[p][q] + kept > best[0]:
                        best = (run[p][q] + kept, [q] + rest)
            memo[p, used] = best
        return memo[p, used]

    choices = [(tail(p, p + 1), p) for p in range(first, min(dense, n))]
    (_, rest), p = max(choices, key=lambda c: c[0][0])
    return [p] + rest


def measure_mass(args) -> tuple:
    """(mean kept-mass matrix, decode steps measured, model name) over ``args.docs`` pydoc windows."""
    from sift.server.engine.llm import LLM

    longest = args.context + args.steps + 16
    llm = LLM(max_model_len=longest, num_blocks=longest // 16 + 64, max_num_batched_tokens=8192,
              enable_prefix_caching=False)
    hay = haystack(llm.tokenizer, args.docs * args.context)
    total, count = None, 0
    for i in range(args.docs):
        for scores in capture_scores(llm, hay[i * args.context:(i + 1) * args.context], args.steps):
            m = (reranked_mass(scores, args.candidates, args.budget, args.sinks, args.recent) if args.candidates
                 else kept_mass(scores, selection_masks(scores, args.budget, args.sinks, args.recent)))
            total = m if total is None else total + m
            count += 1
    return total / count, count, llm.engine.model_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=8000)
    ap.add_argument("--docs", type=int, default=4, help="pydoc windows decoded after")
    ap.add_argument("--steps", type=int, default=8, help="decode steps measured per document")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--recent", type=int, default=32)
    ap.add_argument("--candidates", type=int, default=0, help="score re-ranking: each selection keeps this many "
                    "candidates, each sparse layer its own top-budget of them (0: off)")
    ap.add_argument("--max-dense", type=int, default=10, help="best schedules for up to this many dense layers")
    ap.add_argument("--mass", default=None, help="reuse the kept-mass matrix of this earlier JSON output")
    ap.add_argument("--out", default=os.path.join(RESULTS, "tidal_layers.json"))
    args = ap.parse_args()

    if args.mass:
        with open(args.mass) as f:
            saved = json.load(f)
        mass, count, model = torch.tensor(saved["kept_mass"]), saved["steps"], saved["model"]
    else:
        mass, count, model = measure_mass(args)
    default = [2, mass.shape[0] // 2]

    print(f"kept attention mass at {args.context} tokens, budget {args.budget}"
          + (f", re-ranking {args.candidates} candidates" if args.candidates else "") + f" ({count} decode steps)")
    print(f"each layer over its own selection (the per-layer bound): {mass.diagonal()[1:].mean():.4f}")
    print(f"the default schedule (select at 2, re-select at {default[1]}): {schedule_mass(mass, default):.4f}")
    print(f"{'dense layers':>12} {'kept mass':>10}  selection layers")
    best = {}
    for dense in range(2, args.max_dense + 1):
        points = best_schedule(mass, dense)
        best[dense] = {"selection_layers": points, "kept_mass": schedule_mass(mass, points)}
        print(f"{dense:>12} {best[dense]['kept_mass']:>10.4f}  {','.join(map(str, points))}")
    write_result(args.out, {"model": model, "platform": platform.platform(),
                            "time": datetime.now(timezone.utc).isoformat(), "args": vars(args), "steps": count,
                            "kept_mass": mass.tolist(),
                            "default": {"selection_layers": default, "kept_mass": schedule_mass(mass, default)},
                            "best_by_dense_layers": best}, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
