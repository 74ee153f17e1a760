"""A step that raises fails only the request it came from; the others finish exactly as without it (#27).

The real ``LLMEngine.step`` (scheduler, KV manager, eviction driver, detokenizer, stop checks) over a stub
runner: the model is replaced by a deterministic next-token rule, and one request is poisoned so that any
forward containing it raises.
"""
from __future__ import annotations

from types import SimpleNamespace

from sift.server.cache.kv_manager import KVManager
from sift.server.config import EngineConfig, SchedulerConfig
from sift.server.engine.llm_engine import LLMEngine
from sift.server.engine.outputs import StepOutput
from sift.server.engine.request import SamplingParams
from sift.server.engine.scheduler import Scheduler
from sift.server.options import EvictionOptions
from sift.server.policies.eviction import Eviction
from sift.server.techniques import Techniques

VOCAB = 100
POISON_SEED = 666


class WordTokenizer:
    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(f" w{i}" for i in ids)


class StubRunner:
    """Next token = (last token + 1) mod VOCAB, from the scheduled tokens only (so a recompute after a
    preemption yields the same continuation); any batch holding the poisoned request raises."""

    def __init__(self) -> None:
        self.batches: list = []

    def execute(self, sched, requests) -> StepOutput:
        ids = [s.request_id for s in sched.requests]
        self.batches.append(ids)
        if any(requests[rid].params.seed == POISON_SEED for rid in ids):
            raise RuntimeError("poisoned forward")
        return StepOutput(sampled={s.request_id: [(s.token_ids[-1] + 1) % VOCAB]
                                   for s in sched.requests if s.sample})


def make_engine() -> LLMEngine:
    engine = LLMEngine.__new__(LLMEngine)  # everything but the model
    engine.config = EngineConfig()
    engine.max_model_len, engine.vocab_size, engine.eos_token_ids = 128, VOCAB, ()
    engine.arch = SimpleNamespace(num_layers=2)
    engine.tokenizer = WordTokenizer()
    engine.kv = KVManager(64, 4)
    engine.techniques = Techniques(Eviction(EvictionOptions(), 2, 1, engine.kv))
    engine.scheduler = Scheduler(SchedulerConfig(), engine.kv, engine.max_model_len, engine.techniques)
    engine.runner = StubRunner()
    engine._detok, engine._pending, engine.current_step_ids = {}, [], ()
    engine.counters = {"prompt_tokens": 0, "generation_tokens": 0}
    return engine


def run(engine: LLMEngine, requests: dict) -> tuple[dict, dict]:
    """(final output, all tokens) per request."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    finished, tokens = {}, {rid: [] for rid in requests}
    for _ in range(200):
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                finished[out.request_id] = out
        if not engine.has_unfinished_requests():
            break
    return finished, tokens


def victims() -> dict:
    return {f"v{i}": ([10 * i + 1, 10 * i + 2, 10 * i + 3], SamplingParams(max_tokens=6, temperature=0))
            for i in range(3)}


def test_a_raising_request_fails_alone_and_its_batch_mates_finish_unchanged():
    _, expected = run(make_engine(), victims())
    engine = make_engine()
    finished, tokens = run(engine, {"p": ([50, 51], SamplingParams(max_tokens=6, seed=POISON_SEED)), **victims()})
    assert finished["p"].finish_reason == "error" and "poisoned forward" in finished["p"].error
    for rid, (prompt, _) in victims().items():
        assert finished[rid].finish_reason == "length"
        # the same tokens as without the poison: the survivors were recomputed, not corrupted
        assert tokens[rid] == expected[rid] == [(prompt[-1] + k) % VOCAB for k in range(1, 7)]
    # the failed batch, then the first suspect alone (the culprit: named and failed), then the others again
    assert engine.runner.batches[:2] == [["p", "v0", "v1", "v2"], ["p"]]
    assert engine.kv.num_free_blocks == 63 and not engine.scheduler.requests  # nothing leaked
    assert not engine.scheduler.suspects


def test_a_request_that_fails_alone_is_named_at_once():
    engine = make_engine()
    finished, _ = run(engine, {"p": ([5], SamplingParams(max_tokens=3, seed=POISON_SEED))})
    assert finished["p"].finish_reason == "error"
    assert engine.runner.batches == [["p"]]
