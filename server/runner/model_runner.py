"""SchedulerOutput -> ForwardBatch -> model -> logits -> sampler -> StepOutput.

Tensors live here (and in the model and kernels); the scheduler never sees them.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from sift.kernels.backend import AttentionBackend, build_metadata
from sift.models.batch import ForwardBatch
from sift.server.engine.outputs import SchedulerOutput, StepOutput
from sift.server.engine.request import Request
from sift.server.policies.skipping import SkipPlanner
from sift.server.policies.sparse_plan import SparsePlanner
from sift.server.runner.compiled import CompiledDecode, compile_decode
from sift.server.runner.sampler import sample, token_logprobs
from sift.server.spec.tree import ancestor_mask

Tensor = torch.Tensor


class ModelRunner:
    def __init__(self, model, num_layers: int, backend: AttentionBackend,
                 device: torch.device, dtype: torch.dtype, num_blocks: int, block_size: int, speculator=None):
        self.model = model
        self.speculator = speculator  # sift.server.spec.Speculator: verifies draft trees
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_layers = num_layers
        self.kv_caches = model.make_kv_caches(num_blocks, block_size, dtype, device)
        self.sparse_planner = SparsePlanner(self.kv_caches, block_size)
        self.skip_planner = SkipPlanner(num_layers)
        self.structured_counters = {"structured_mask_seconds": 0.0}  # grammar bitmask fill + apply time
        self.compiled: Optional[CompiledDecode] = None  # plain decode steps, once compile() has run

    def compile(self, max_model_len: int, max_num_seqs: int) -> None:
        """Compile plain decode steps now (start-up; see server/runner/compiled.py)."""
        self.compiled = compile_decode(self.model, self.kv_caches, self.block_size, max_model_len, max_num_seqs,
                                       self.device)

    @staticmethod
    def kv_bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                           dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * block_size * torch.empty((), dtype=dtype).element_size()

    # -- cache maintenance ----------------------------------------------------------
    def apply_cache_ops(self, sched: SchedulerOutput) -> None:
        """Compactions (eviction) in issue order, each its own block copies then its per-head gather; then
        the step's block copies (copy-on-write). Compactions go first because their sources may lie in tail
        blocks they freed, which a copy scheduled after them may take as its destination."""
        for plan in sched.compactions:
            self._copy_blocks(plan.copies)
            src_t = torch.as_tensor(plan.src_slots, device=self.device)
            dst_t = torch.as_tensor(plan.dst_slots, device=self.device)
            for layer, (k, v) in enumerate(self.kv_caches):
                self.backend.gather_compact(k, v, src_t[layer], dst_t)
        self._copy_blocks(sched.block_copies)

    def _copy_blocks(self, copies: list) -> None:
        if copies:
            src = torch.tensor([s for s, _ in copies], device=self.device)
            dst = torch.tensor([d for _, d in copies], device=self.device)
            for k, v in self.kv_caches:
                self.backend.copy_blocks(k, v, src, dst, self.block_size)

    # -- the step -------------------------------------------------------------------
    def build_batch(self, sched: SchedulerOutput, requests: dict) -> ForwardBatch:
        """Flatten the scheduled requests. ``extras['prompt_rows']`` maps a request that asked for
        prompt logprobs to the range of logits rows covering its prompt chunk."""
        ids, pos, slots, kv_lens, q_lens = [], [], [], [], []
        logits_rows, prompt_rows = [], {}
        windows, sinks = [], []
        for s in sched.requests:
            n, start = len(s.token_ids), len(ids)
            ids.extend(s.token_ids)
            pos.extend(s.positions)
            slots.extend(s.slot_mapping)
            q_lens.append(n)
            kv_lens.append(s.kv_len)
            windows.append(s.window)
            sinks.append(s.sinks)
            req = requests[s.request_id]
            if req.params.prompt_logprobs is not None and s.positions[0] < req.num_prompt_tokens:
                prompt_rows[s.request_id] = (len(logits_rows), n)
                logits_rows.extend(range(start, start + n))
            elif s.draft_parents is not None:  # every tree node's logits are verified
                logits_rows.extend(range(start, start + n))
            elif s.sample:
                logits_rows.append(start + n - 1)
        dev = self.device
        use_window = any(windows)
        meta = build_metadata(
            q_lens, kv_lens, [s.block_table for s in sched.requests], slots, self.block_size, dev,
            window=windows if use_window else None, sinks=sinks if use_window else None,
            tree_mask=self._tree_mask(sched, q_lens), score_layers=sched.score_layers,
            score_queries=[s.score_queries for s in sched.requests]
            if sched.score_layers and any(s.score_queries > 1 for s in sched.requests) else None,
            score_trees=[b for b, s in enumerate(sched.requests) if s.draft_parents is not None]
            if sched.score_layers else None)
        meta.sparse = self.sparse_planner.plan(sched, requests, meta)
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(pos, dtype=torch.long, device=dev),
            attn=meta,
            backend=self.backend,
            kv_caches=self.kv_caches,
            logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=dev),
            row_subsets=self.skip_planner.plan(sched, requests, meta),
            extras={"prompt_rows": prompt_rows},
        )

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, requests: dict) -> StepOutput:
        self.apply_cache_ops(sched)
        out = StepOutput()
        if not sched.requests:
            return out
        batch = self.build_batch(sched, requests)
        if self.compiled is not None and self.compiled.accepts(batch):
            logits = self.compiled.logits(batch)
        else:
            hidden = self.model(batch)
            if batch.logits_indices.numel() == 0:
                out.scores = batch.attn.scores
                return out
            logits = self.model.compute_logits(hidden)
        prompt_rows = batch.extras["prompt_rows"]
        sample_rows, sampling, trees = [], [], []
        row = 0
        for s in sched.requests:
            if s.request_id in prompt_rows:
                start, n = prompt_rows[s.request_id]
                req = requests[s.request_id]
                out.prompt_logprobs[s.request_id] = (s.positions[0], self._prompt_logprobs(
                    logits[start:start + n], req, s.positions[0], req.params.prompt_logprobs))
                row = start + n
                if s.sample:
                    sample_rows.append(row - 1)
                    sampling.append(s)
            elif s.draft_parents is not None:
                trees.append((s, row))
                row += len(s.token_ids)
            elif s.sample:
                sample_rows.append(row)
                sampling.append(s)
                row += 1
        if sampling:
            if self.speculator is not None:
                self.speculator.learn_plain(logits, list(zip(sampling, sample_rows)), requests)
            reqs: list[Request] = [requests[s.request_id] for s in sampling]
            res = sample(logits[sample_rows], reqs)
            self.structured_counters["structured_mask_seconds"] += res.mask_seconds
            for i, s in enumerate(sampling):
                out.sampled[s.request_id] = [res.token_ids[i]]
                if res.logprobs is not None and res.logprobs[i] is not None:
                    out.logprobs[s.request_id] = [res.logprobs[i]]
        if trees:
            self._verify(logits, trees, requests, out)
        out.scores = batch.attn.scores
        out.tree_scores = batch.attn.tree_scores
        return out

    def _tree_mask(self, sched: SchedulerOutput, q_lens: list) -> Optional[Tensor]:
        """[T, max_q_len] bool: ancestors-only among a draft tree's nodes, all True (plain causal) elsewhere."""
        if not any(s.draft_parents is not None for s in sched.requests):
            return None
        mask = np.ones((sum(q_lens), max(q_lens)), dtype=bool)
        row = 0
        for s, n in zip(sched.requests, q_lens):
            if s.draft_parents is not None:
                mask[row:row + n, :n] = ancestor_mask(s.draft_parents)
            row += n
        return torch.from_numpy(mask).to(self.device)

    def _verify(self, logits: Tensor, trees: list, requests: dict, out: StepOutput) -> None:
        """Verify the trees, then move each accepted path's KV (all layers and kv heads together) to the
        kv indices right after its root; the scheduler releases the rejected tail in the same step."""
        verdicts = self.speculator.verify(logits, trees, requests)
        src, dst = [], []
        for s, _ in trees:
            v = verdicts[s.request_id]
            out.sampled[s.request_id] = v.tokens
            if v.logprobs:
                out.logprobs[s.request_id] = v.logprobs
            out.accepted_nodes[s.request_id] = v.nodes
            for j, node in enumerate(v.nodes, start=1):
                if node != j:
                    src.append(s.slot_mapping[node])
                    dst.append(s.slot_mapping[j])
        if src:
            src_t = torch.tensor(src, dtype=torch.int64, device=self.device)
            dst_t = torch.tensor(dst, dtype=torch.int64, device=self.device)
            heads = src_t.expand(self.kv_caches[0][0].shape[1], -1)
            for k, v in self.kv_caches:
                self.backend.gather_compact(k, v, heads, dst_t)

    @staticmethod
    def _prompt_logprobs(logits: Tensor, req: Request, start: int, top: int) -> list:
        """Row j predicts the token at position start + j + 1; only prompt targets are reported."""
        lp = torch.log_softmax(logits.float(), dim=-1)
        targets = req.prompt_token_ids
        res = []
        for j in range(lp.shape[0]):
            t = start + j + 1
            if t >= len(targets):
                break
            res.append(token_logprobs(lp[j], targets[t], top))
        return res
