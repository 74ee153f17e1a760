"""torch.compile (inductor) of plain decode steps: the step costs what its math costs, not ~2,400 dispatches.

A *plain* decode step is one query per request, no draft tree, no request window, no sparse plan, no token
skipping, no attention scores wanted and no prompt logprobs: exactly what the dense model computes. Every
other step runs eagerly, so the compiled path carries no technique branch. The batch is padded to the next
size bucket (1, 2, 4, 8, 16, 24, 32, then every 16 up to ``max_num_seqs``; static shapes, one graph per
bucket, compiled at start-up, never on live traffic); block tables are padded to the model's longest
context, so their width never changes either. Padded rows read and write only the scratch slot (slot 0 of
the null block 0, which no request ever owns) and are dropped before sampling. KV writes and paged attention
are custom ops (:mod:`sift.kernels.ops`), so the graph runs unbroken from the embedding to the logits.
Why buckets rather than dynamic shapes, and the measured cost, in docs/compiled.md.
"""
from __future__ import annotations

import logging
import shutil
import time
from typing import Optional

import torch
import torch.nn.functional as F

from sift.kernels import ops  # noqa: F401  (registers torch.ops.sift.*)
from sift.kernels.backend import AttentionBackend, build_metadata
from sift.models.batch import ForwardBatch

Tensor = torch.Tensor
logger = logging.getLogger("sift.runner")
SCRATCH_SLOT = 0  # slot 0 of the null block: what padded rows write and read


def decode_buckets(max_num_seqs: int) -> tuple:
    """1, 2, 4, 8, 16, 24, 32, then every 16, up to and including ``max_num_seqs``."""
    sizes = [1, 2, 4, 8, 16, 24, 32]
    while sizes[-1] < max_num_seqs:
        sizes.append(sizes[-1] + 16)
    return tuple(sorted({min(n, max_num_seqs) for n in sizes}))


def cxx_compiler() -> Optional[str]:
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


class GraphBackend(AttentionBackend):
    """The compiled path's attention: decode only, through the registered custom ops."""

    name = "compiled"

    def store_kv(self, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, meta) -> None:
        torch.ops.sift.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)

    def forward(self, layer: int, q: Tensor, k_cache: Tensor, v_cache: Tensor, meta, scale: float,
                window: int = 0, softcap: float = 0.0) -> Tensor:
        return torch.ops.sift.paged_decode(q, k_cache, v_cache, meta.block_tables, meta.kv_lens, meta.block_size,
                                           scale, window, softcap)


class CompiledDecode:
    """The compiled decode forward of one model and KV pool: :meth:`warm_up` once, then :meth:`logits` for
    every step :meth:`accepts`."""

    def __init__(self, model, kv_caches: list, block_size: int, max_model_len: int, max_num_seqs: int,
                 device: torch.device):
        self.model, self.kv_caches, self.block_size, self.device = model, kv_caches, block_size, device
        self.buckets = decode_buckets(max_num_seqs)
        self.max_blocks = -(-max_model_len // block_size)
        self.backend = GraphBackend()
        self._rows = {n: torch.arange(n, device=device) for n in self.buckets}
        # one graph per bucket, all of one code object, whose graphs dynamo counts against one limit (8) across
        # every engine of the process: each engine raises it by its own buckets, so that neither the larger
        # buckets nor a second engine in the same process (tests, benches) falls back to eager
        torch._dynamo.config.recompile_limit += len(self.buckets)
        self._fn = torch.compile(self._forward, backend="inductor", fullgraph=True, dynamic=False)
        self.steps = 0  # live steps run compiled (warm-up excluded)

    def _forward(self, batch: ForwardBatch) -> Tensor:
        return self.model.compute_logits(self.model(batch))

    def accepts(self, batch: ForwardBatch) -> bool:
        """Whether the step is plain (see the module doc) and fits the largest bucket."""
        meta = batch.attn
        return (meta.is_decode and meta.num_seqs <= self.buckets[-1] and meta.window is None
                and meta.sparse is None and not meta.score_layers and batch.row_subsets is None
                and not batch.extras.get("prompt_rows") and batch.logits_indices.numel() == meta.num_seqs)

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    @torch.inference_mode()
    def logits(self, batch: ForwardBatch) -> Tensor:
        """float32 logits [B, vocab] of a plain decode step's B requests (padded rows dropped)."""
        meta = batch.attn
        n = meta.num_seqs
        size = self.bucket(n)
        pad = size - n
        tables = F.pad(meta.block_tables, (0, self.max_blocks - meta.block_tables.shape[1], 0, pad))
        padded = build_metadata([1] * size, meta.kv_lens_host + [1] * pad, tables,
                                F.pad(meta.slot_mapping, (0, pad), value=SCRATCH_SLOT), self.block_size, self.device)
        step = ForwardBatch(input_ids=F.pad(batch.input_ids, (0, pad)), positions=F.pad(batch.positions, (0, pad)),
                            attn=padded, backend=self.backend, kv_caches=self.kv_caches,
                            logits_indices=self._rows[size])
        self.steps += 1
        return self._fn(step)[:n]

    def warm_up(self) -> float:
        """Compile every bucket now (a step of padded rows only: they touch the scratch slot alone); seconds."""
        start = time.perf_counter()
        for i, size in enumerate(self.buckets):
            t = time.perf_counter()
            meta = build_metadata([1] * size, [1] * size, torch.zeros(size, 1, dtype=torch.int32),
                                  [SCRATCH_SLOT] * size, self.block_size, self.device)
            self.logits(ForwardBatch(input_ids=torch.zeros(size, dtype=torch.long, device=self.device),
                                     positions=torch.zeros(size, dtype=torch.long, device=self.device), attn=meta,
                                     backend=self.backend, kv_caches=self.kv_caches, logits_indices=self._rows[size]))
            logger.info("compiled decode bucket %d/%d (batch %d) in %.1f s", i + 1, len(self.buckets), size,
                        time.perf_counter() - t)
        took = time.perf_counter() - start
        self.steps = 0
        logger.info("compiled decode forward ready in %.1f s: buckets %s", took, list(self.buckets))
        return took


def compile_decode(model, kv_caches: list, block_size: int, max_model_len: int, max_num_seqs: int,
                   device: torch.device) -> Optional[CompiledDecode]:
    """A warmed-up :class:`CompiledDecode`, or None (eager) with one warning where it cannot be built."""
    if device.type == "cpu" and cxx_compiler() is None:
        logger.warning("no C++ compiler found: torch.compile needs one on CPU; running eagerly")
        return None
    compiled = CompiledDecode(model, kv_caches, block_size, max_model_len, max_num_seqs, device)
    try:
        compiled.warm_up()
    except Exception as e:  # a model part dynamo cannot trace whole (fullgraph): serve eagerly rather than not at all
        logger.warning("torch.compile of the decode forward failed (%s: %s); running eagerly", type(e).__name__, e)
        return None
    return compiled
