"""Forward timing at start-up: what the speculation controller's tree-size choice and ``N`` are made from."""
from __future__ import annotations

import time

import torch

from sift.kernels.backend import build_metadata
from sift.models.batch import ForwardBatch


def measure_forward(runner, num_seqs: int, q_len: int, ctx_len: int = 256) -> float:
    """Seconds for one forward (+ logits of every token) of ``num_seqs`` sequences of ``q_len`` new
    tokens over ``ctx_len`` of context. Nothing is written to the KV pool (slot -1) and the reads
    point at block 0, whose content does not matter for timing."""
    dev, bs = runner.device, runner.block_size
    kv_len = ctx_len + q_len
    n = num_seqs * q_len
    meta = build_metadata([q_len] * num_seqs, [kv_len] * num_seqs, [[0] * -(-kv_len // bs)] * num_seqs, [-1] * n,
                          bs, dev, tree_mask=torch.ones(n, q_len, dtype=torch.bool, device=dev) if q_len > 1 else None)
    batch = ForwardBatch(input_ids=torch.zeros(n, dtype=torch.long, device=dev),
                         positions=torch.arange(n, device=dev) % q_len + ctx_len, attn=meta, backend=runner.backend,
                         kv_caches=runner.kv_caches, logits_indices=torch.arange(n, device=dev))
    with torch.inference_mode():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        runner.model.compute_logits(runner.model(batch)).argmax(dim=-1)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    return time.perf_counter() - start
