"""The synchronous engine core: model + KV cache + scheduler + runner, one ``step()`` at a time.

Not thread-safe: the async engine drives it from a single thread and funnels
add/abort calls into that thread.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

import torch

from sift.kernels.backend import select_backend
from sift.server.cache.kv_manager import KVManager
from sift.server.config import EngineConfig
from sift.server.engine.detokenizer import IncrementalDetokenizer
from sift.server.engine.outputs import RequestOutput
from sift.server.engine.request import Request, RequestStatus, SamplingParams
from sift.server.engine.scheduler import QueueFullError, Scheduler
from sift.server.policies.eviction import Eviction
from sift.server.policies.skipping import Skipping
from sift.server.policies.sparsity import Sparsity
from sift.server.runner.model_runner import ModelRunner
from sift.server.runner.sampler import check_sampling_row
from sift.server.runner.timing import measure_forward
from sift.server.spec import Speculator
from sift.server.techniques import Techniques

logger = logging.getLogger("sift.engine")

__all__ = ["LLMEngine", "QueueFullError"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _model_window(arch) -> int:
    """The widest per-layer sliding window when every layer has one, else 0 (see Scheduler.model_window)."""
    windows = [arch.window_of(layer) for layer in range(arch.num_layers)]
    return max(windows) if all(windows) else 0


def kv_cache_bytes(cc, device: torch.device, max_num_seqs: int, max_model_len: int, per_block: int) -> float:
    """The KV pool's size in bytes (see ``CacheConfig``): given bytes, a given fraction of free memory, or the
    default: a fixed-size pool on the CPU (host RAM is shared with everything else), a fraction on a GPU."""
    if cc.kv_cache_memory is not None:
        return cc.kv_cache_memory if cc.kv_cache_memory > 1 else cc.kv_cache_memory * available_memory(device)
    if device.type == "cuda":
        return cc.GPU_KV_CACHE_FRACTION * available_memory(device)
    full_contexts = max_num_seqs * (-(-max_model_len // cc.block_size) + 1) * per_block
    return min(cc.CPU_KV_CACHE_BYTES, full_contexts)


class LLMEngine:
    def __init__(self, config: Optional[EngineConfig] = None):
        from sift.models.loader import load_model

        self.config = config = config or EngineConfig()
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        torch.manual_seed(config.model.seed)
        t0 = time.perf_counter()
        loaded = load_model(config.model.model, dtype=self.dtype, device=self.device,
                            load_format=config.model.load_format, tokenizer=config.model.tokenizer,
                            chat_template=config.model.chat_template,
                            quantization=config.model.quantization, group_size=config.model.quantization_group_size)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.arch = arch = loaded.arch
        self.model_name = config.model.served_model_name or loaded.name
        self.max_model_len = min(config.model.max_model_len or arch.max_position_embeddings,
                                 arch.max_position_embeddings)
        self.vocab_size = arch.vocab_size
        self.eos_token_ids = tuple(self.tokenizer.eos_token_ids)

        cc = config.cache
        per_block = ModelRunner.kv_bytes_per_block(arch.num_layers, arch.num_kv_heads, arch.head_dim,
                                                   cc.block_size, self.dtype)
        if cc.num_blocks is not None:
            num_blocks = cc.num_blocks
        else:
            num_blocks = int(kv_cache_bytes(cc, self.device, config.scheduler.max_num_seqs, self.max_model_len,
                                            per_block) // per_block)
        min_blocks = -(-self.max_model_len // cc.block_size) + 1
        if num_blocks < min_blocks:
            raise ValueError(f"KV cache too small: {num_blocks} blocks of {cc.block_size} tokens cannot hold one "
                             f"request of max_model_len {self.max_model_len} (need {min_blocks})")
        self.backend = select_backend(config.attention_backend, self.device)
        self.kv = KVManager(num_blocks, cc.block_size, cc.enable_prefix_caching)
        speculator = Speculator(config.spec, self.vocab_size, lambda: self.model.embed_tokens.weight,
                                self.model_name,
                                measure=lambda num_seqs, q_len: measure_forward(self.runner, num_seqs, q_len),
                                max_batch=config.scheduler.max_num_seqs)
        eviction = Eviction(config.eviction, arch.num_layers, arch.num_kv_heads, self.kv)
        # hooks run in this order: speculation last, so that the step time it observes includes the others
        self.techniques = Techniques(Sparsity(config.sparsity, arch.num_layers, cc.block_size),
                                     Skipping(config.skipping, self.model.token_skipping_unsupported),
                                     eviction, speculator)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len, self.techniques,
                                   model_window=_model_window(arch))
        self.runner = ModelRunner(self.model, arch.num_layers, self.backend,
                                  self.device, self.dtype, num_blocks, cc.block_size, speculator=speculator)
        if not config.model.enforce_eager:
            self.runner.compile(self.max_model_len, config.scheduler.max_num_seqs)
        if config.spec.method != "none":  # every request speculates by default: time the forwards now, so
            speculator.controller.calibrate(config.spec.num_draft_tokens)  # that no serving step pauses to measure
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._pending: list[RequestOutput] = []
        self.current_step_ids: tuple = ()  # request ids of the step being run (the watchdog names them)
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "structured_requests": 0,
                         "structured_spec_disabled": 0}
        self._grammars = None  # GrammarCompiler for offline callers, built on first use
        logger.info("engine ready in %.1fs: %s on %s/%s, backend=%s, KV pool %d blocks x %d tokens (%.1f MiB)",
                    time.perf_counter() - t0, self.model_name, self.device, str(self.dtype).replace("torch.", ""),
                    self.backend.name, num_blocks, cc.block_size, num_blocks * per_block / 2**20)

    # -- requests -------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list, params: SamplingParams,
                    priority: int = 0) -> None:
        """Validate and queue. Raises ValueError for bad input, QueueFullError when the queue is full."""
        if request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty")
        if any((not isinstance(t, int)) or t < 0 or t >= self.vocab_size for t in prompt_token_ids):
            raise ValueError(f"prompt: token ids must be integers in [0, {self.vocab_size})")
        params.validate_for_model(self.vocab_size, len(prompt_token_ids), self.max_model_len)
        check_sampling_row(params, self.vocab_size)
        gen = torch.Generator(device="cpu")
        # any integer seed (n > 1 adds the choice index) maps onto the generator's 63-bit range
        gen.manual_seed(params.seed % 2**63 if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        req = Request(request_id, list(prompt_token_ids), params, priority=priority,
                      eos_token_ids=self.eos_token_ids, generator=gen)
        if params.structured is not None:
            self._attach_grammar(req)
        self.techniques.on_admit(req)
        self.scheduler.add_request(req)
        self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, params.stop,
                                                         params.skip_special_tokens)

    def _attach_grammar(self, req: Request) -> None:
        """A matcher for the request's grammar. The API compiles grammars before admission (off this thread);
        offline callers (``LLM.generate``) hand in an uncompiled spec, compiled here once and cached."""
        from sift.server.structured.masks import GrammarState

        spec = req.params.structured
        compiled = spec.compiled
        if compiled is None:
            if self._grammars is None:
                from sift.server.structured.compiler import GrammarCompiler
                self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
            compiled = self._grammars.get(spec)[0]
        req.grammar = GrammarState(compiled)
        self.counters["structured_requests"] += 1
        if (req.params.speculative or self.techniques["speculation"].default).method != "none":
            self.counters["structured_spec_disabled"] += 1  # see can_speculate: constrained requests run plain

    def abort_request(self, request_id: str) -> None:
        for req in self.scheduler.abort([request_id]):
            self._pending.append(self._output(req, [], "", []))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step. An exception inside it fails only the request it came from when that is known: the
        step's only request, or the one suspect a suspect-only step ran (see ``_recover``); the engine serves on."""
        outputs, self._pending = self._pending, []
        self.current_step_ids = ()
        try:
            self._step(outputs)
        except Exception as e:  # noqa: BLE001 - a step's failure is contained here, not raised to the core loop
            outputs.extend(self._recover(e))
        self.current_step_ids = ()
        return outputs

    def _recover(self, exc: Exception) -> list[RequestOutput]:
        """After a failed step: blame its request if it ran alone, else make every request it ran a suspect (each
        then runs alone until a step of its own succeeds); recompute everything running, whose KV is now unknown."""
        involved = list(self.current_step_ids)
        if not involved:
            raise exc  # outside any request's step (scheduling itself): the core loop fails what is live
        failed = []
        if len(involved) == 1:
            req = self.scheduler.requests.get(involved[0])
            if req is not None and not req.status.finished:
                logger.error("engine step failed for request %s alone: %s; failing it", involved[0], exc,
                             exc_info=exc)
                self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)
                out = self._output(req, [], "", [])
                out.error = f"engine error: {exc}"
                failed.append(out)
                self.scheduler.suspects.discard(involved[0])
        else:
            logger.error("engine step over %d request(s) failed: %s; retrying each alone to find the culprit (%s)",
                         len(involved), exc, ", ".join(involved), exc_info=exc)
            self.scheduler.suspects.update(involved)
        self.scheduler.preempt_all()
        return failed

    def _step(self, outputs: list) -> None:
        """Schedule -> the techniques plan -> run -> tokens and outputs -> the techniques update (once the step's
        tokens are final: stops applied, drafts verified)."""
        sched = self.scheduler.schedule()
        self.current_step_ids = tuple(s.request_id for s in sched.requests)
        if not sched.requests:
            return
        requests = self.scheduler.requests
        self.techniques.plan(sched, requests)
        step_out = self.runner.execute(sched, requests)
        for rid, (start, lps) in step_out.prompt_logprobs.items():
            # keyed by target position, so a recompute after preemption overwrites instead of duplicating
            table = requests[rid].prompt_logprob_table = requests[rid].prompt_logprob_table or {0: None}
            table.update((start + j + 1, lp) for j, lp in enumerate(lps))
        for req in self.scheduler.update(sched, step_out.sampled):
            outputs.append(self._process_tokens(req, step_out.sampled[req.request_id],
                                                step_out.logprobs.get(req.request_id, [])))
        for plan in self.techniques.after_step(sched, step_out, requests):
            self.scheduler.queue_compaction(plan)
        self.scheduler.suspects.difference_update(self.current_step_ids)  # a step of their own succeeded

    def _process_tokens(self, req: Request, new_tokens: list, new_logprobs: list) -> RequestOutput:
        """Check stop conditions token by token; truncate anything sampled past a stop."""
        p = req.params
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
            self.counters["prompt_tokens"] += req.num_prompt_tokens
        n_before = req.num_output_tokens - len(new_tokens)
        accepted, status = [], None
        for i, t in enumerate(new_tokens):
            accepted.append(t)
            n_out = n_before + i + 1
            if t in p.stop_token_ids:
                status, req.stop_reason = RequestStatus.FINISHED_STOPPED, t
            elif not p.ignore_eos and t in req.eos_token_ids and n_out >= p.min_tokens:
                status = RequestStatus.FINISHED_STOPPED
            elif n_out >= p.max_tokens or req.num_prompt_tokens + n_out >= self.max_model_len:
                status = RequestStatus.FINISHED_LENGTH
            if status is not None:
                break
        if len(accepted) < len(new_tokens):
            del req.output_token_ids[n_before + len(accepted):]
        detok = self._detok[req.request_id]
        text_tokens = accepted
        if status == RequestStatus.FINISHED_STOPPED and req.stop_reason is None and not p.ignore_eos:
            text_tokens = accepted[:-1]  # the EOS token carries no text
        num_fed = len(detok.tokens)
        text = detok.add(text_tokens, finished=status is not None)
        used = len(detok.tokens) - num_fed
        if detok.stop_hit is not None and used < len(accepted):
            # several tokens per step (speculation): the output ends at the token that completed the stop string
            del accepted[used:]
            del req.output_token_ids[n_before + used:]
        if detok.stop_hit is not None and status != RequestStatus.FINISHED_STOPPED:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, detok.stop_hit
        elif detok.stop_hit is not None:
            req.stop_reason = detok.stop_hit
        self.counters["generation_tokens"] += len(accepted)
        logprobs = new_logprobs[: len(accepted)] if p.logprobs is not None else []
        req.output_logprobs.extend(logprobs)
        if status is not None:
            self.scheduler.finish(req, status)
        return self._output(req, accepted, text, logprobs)

    def _output(self, req: Request, tokens: list, text: str, logprobs: list) -> RequestOutput:
        finished = req.status.finished
        out = RequestOutput(
            request_id=req.request_id,
            new_token_ids=tokens,
            new_text=text,
            new_logprobs=logprobs,
            finished=finished,
            finish_reason=req.finish_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=req.num_output_tokens,
            num_cached_tokens=req.num_cached_tokens,
            stop_reason=req.stop_reason,
        )
        table = req.prompt_logprob_table
        if table is not None and not req.prompt_logprobs_sent and len(table) >= req.num_prompt_tokens:
            out.prompt_logprobs = [table[i] for i in range(req.num_prompt_tokens)]
            req.prompt_logprobs_sent = True
        if finished:
            self._detok.pop(req.request_id, None)
        return out

    # -- introspection --------------------------------------------------------------
    def stats(self) -> dict:
        kv = self.kv.stats
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_usage": self.kv.usage,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": kv.get("prefix_cache_queries", 0),
            "prefix_cache_hits": kv.get("prefix_cache_hits", 0),
            **self.techniques.stats(self.scheduler.running),
            **self.runner.sparse_planner.counters,
            **self.runner.skip_planner.counters,
            **self.runner.structured_counters,
            **self.counters,
        }
