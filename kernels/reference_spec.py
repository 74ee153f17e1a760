"""Plain-torch reference of speculative tree verification: the test oracle of :mod:`sift.kernels.spec_verify`
and, on CPU, the runtime path (the attention and KV-pool references are in :mod:`sift.kernels.reference`)."""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def spec_verify(probs: Optional[Tensor], target: Tensor, draft: Tensor, first_child: Tensor, num_children: Tensor,
                uniforms: Tensor, roots: Tensor, greedy: Tensor, relax_k: Tensor, delta: Tensor, lam: Tensor,
                nearest: Optional[Tensor], max_depth: int):
    """Speculative tree verification over a batch of trees (the oracle of ``sift.kernels.spec_verify``).

    Flat nodes of all trees: probs [N, V] float32 (each node's next-token distribution; only read for
    sampling or relaxed trees, may be None when there are none; sampling trees' rows become their
    residuals, in place), target [N] (argmax of each node's logits), draft [N] (each node's token),
    first_child/num_children [N] (global indices; siblings contiguous, tried in order), uniforms [N]
    (the accept draw of each node). Per tree: roots [B], greedy [B] (1 = accept iff child == argmax),
    relax_k [B] (LANTERN neighbours, 0 = strict), delta [B] (moved-mass bound) and lam [B] (> 0:
    LANTERN++, moved mass <= (lam - 1) * p(x) instead). nearest [V, >= max k] neighbour ids.

    Relaxation of draft x under distribution r: the cumulative r-mass c_j of x's j nearest neighbours,
    the largest j with c_j <= limit, p~(x) = r(x) + c_j. Greedy accepts iff x is the argmax or p~(x) >=
    r(argmax); sampling accepts iff u * R < p~(x) with R the residual mass, and on rejection zeroes x
    and the moved neighbours (the delta budget shrinks by what was moved, so a node's output stays
    within total variation delta of r).

    Returns path [B, max_depth + 1] int32 (accepted nodes from the root, -1 after), num_accepted [B],
    last [B] (the node whose row yields the bonus token: target[last] when greedy, else a draw from
    the residual probs[last]) and relaxed [B] (accepts that strict verification would have refused).
    """
    bsz = roots.numel()
    path = torch.full((bsz, max_depth + 1), -1, dtype=torch.int32)
    path[:, 0] = roots.cpu()
    num_acc = torch.zeros(bsz, dtype=torch.int32)
    last = roots.cpu().to(torch.int32).clone()
    relaxed = torch.zeros(bsz, dtype=torch.int32)
    tgt, drf, u = target.tolist(), draft.tolist(), uniforms.tolist()
    fc, nc = first_child.tolist(), num_children.tolist()
    for b in range(bsz):
        cur, depth, k = int(roots[b]), 0, int(relax_k[b])
        is_greedy, lim_lam, dl = bool(greedy[b]), float(lam[b]), float(delta[b])
        while depth < max_depth:
            row = probs[cur] if probs is not None and (k > 0 or not is_greedy) else None
            mass, budget, accepted = 1.0, dl, -1
            for c in range(fc[cur], fc[cur] + nc[cur]):
                x = drf[c]
                if is_greedy and x == tgt[cur]:
                    accepted = c
                    break
                moved, take = 0.0, None
                if k > 0:
                    px = float(row[x])
                    nb = nearest[x, :k].long()
                    cum = torch.cumsum(row[nb], 0)
                    take = nb[cum <= ((lim_lam - 1.0) * px if lim_lam > 0 else budget)]
                    moved = float(cum[take.numel() - 1]) if take.numel() else 0.0
                if is_greedy:
                    if moved > 0 and float(row[x]) + moved >= float(row[tgt[cur]]):
                        accepted, relaxed[b] = c, relaxed[b] + 1
                        break
                    continue
                px = float(row[x])
                if u[c] * mass < px + moved:
                    accepted = c
                    relaxed[b] += int(u[c] * mass >= px)
                    break
                row[x] = 0.0
                if take is not None:
                    row[take] = 0.0
                mass -= px + moved
                budget -= moved
            if accepted < 0:
                break
            depth += 1
            path[b, depth] = accepted
            cur = accepted
        num_acc[b], last[b] = depth, cur
    return path, num_acc, last, relaxed
