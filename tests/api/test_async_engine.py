"""AsyncEngine, metrics and CLI plumbing without a model.

The fake engine exists to inject what the real one cannot do on demand: a step that raises.
"""
from __future__ import annotations

import asyncio
import time

import pytest

from sift.server.cli import ENGINE_FLAGS, LOG_FLAGS, SERVER_FLAGS, build_parser, config_from_args
from sift.server.config import EngineConfig
from sift.server.engine.async_engine import AsyncEngine, EngineDrainingError
from sift.server.engine.metrics import EngineMetrics
from sift.server.engine.outputs import RequestOutput
from sift.server.engine.request import SamplingParams


class FakeEngine:
    """Emits token ``k`` at the k-th step of each request; step number ``fail_at`` raises."""

    tokenizer = None
    model_name = "fake"
    max_model_len = 64
    vocab_size = 100

    def __init__(self, fail_at: int = 0, step_time: float = 0.0) -> None:
        self.fail_at = fail_at
        self.step_time = step_time
        self.steps = 0
        self.generated = 0
        self.requests: dict = {}

    def add_request(self, request_id, prompt_token_ids, params, priority=0) -> None:
        params.validate_for_model(self.vocab_size, len(prompt_token_ids), self.max_model_len)
        self.requests[request_id] = [params.max_tokens, 0, len(prompt_token_ids)]

    def abort_request(self, request_id) -> None:
        self.requests.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list:
        self.steps += 1
        time.sleep(self.step_time)
        if self.steps == self.fail_at:
            raise RuntimeError("injected failure")
        outputs = []
        for request_id, state in list(self.requests.items()):
            state[1] += 1
            self.generated += 1
            finished = state[1] >= state[0]
            if finished:
                del self.requests[request_id]
            outputs.append(RequestOutput(request_id, [state[1]], f"t{state[1]} ", [], finished,
                                         "length" if finished else None, state[2], state[1]))
        return outputs

    def stats(self) -> dict:
        return {"num_running": len(self.requests), "num_waiting": 0, "kv_usage": 0.1 * len(self.requests),
                "generation_tokens": self.generated, "spec_accepted_per_pos": [self.generated, 1]}


def run_with(fake: FakeEngine, scenario):
    async def main():
        engine = AsyncEngine(EngineConfig(), engine_factory=lambda: fake)
        engine.start()
        await engine.wait_loaded()
        try:
            return await scenario(engine)
        finally:
            await engine.shutdown()
    return asyncio.run(main())


def sample(engine: AsyncEngine, name: str, **labels) -> float:
    return engine.registry.get_sample_value(name, {"model_name": "fake", **labels}) or 0.0


async def collect(engine: AsyncEngine, request_id: str, max_tokens: int) -> list:
    return [out async for out in engine.generate(request_id, [1, 2, 3], SamplingParams(max_tokens=max_tokens))]


def test_generate_streams_deltas_and_records_metrics():
    async def scenario(engine):
        outs = await collect(engine, "a", 4)
        assert [o.new_token_ids for o in outs] == [[1], [2], [3], [4]]
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert sample(engine, "sift:time_to_first_token_seconds_count") == 1
        assert sample(engine, "sift:inter_token_latency_seconds_count") == 3
        assert sample(engine, "sift:e2e_request_latency_seconds_count") == 1
        assert sample(engine, "sift:request_success_total", finished_reason="length") == 1
        assert sample(engine, "sift:generation_tokens_total") == 4
        assert sample(engine, "sift:num_requests_running") == 0

    run_with(FakeEngine(), scenario)


def test_failing_step_fails_in_flight_requests_and_keeps_serving():
    async def scenario(engine):
        failed = await asyncio.gather(collect(engine, "a", 10), collect(engine, "b", 10))
        for outs in failed:
            assert outs[-1].finish_reason == "error" and outs[-1].error
        assert not engine.dead
        ok = await collect(engine, "c", 2)
        assert ok[-1].finish_reason == "length"
        assert sample(engine, "sift:request_success_total", finished_reason="error") == 2

    fake = FakeEngine(fail_at=2)
    run_with(fake, scenario)
    assert fake.requests == {}


def test_consumer_leaving_aborts_the_request():
    fake = FakeEngine()

    async def scenario(engine):
        async for out in engine.generate("a", [1], SamplingParams(max_tokens=50)):
            break
        for _ in range(200):
            if not fake.requests:
                break
            await asyncio.sleep(0.01)
        assert not fake.requests
        assert sample(engine, "sift:request_success_total", finished_reason="abort") == 1

    run_with(fake, scenario)


def test_admission_errors_reach_the_caller_and_drain_stops_admission():
    async def scenario(engine):
        with pytest.raises(ValueError, match="context length"):
            await engine.add_request("big", [1] * 60, SamplingParams(max_tokens=10))
        stream = await engine.add_request("a", [1], SamplingParams(max_tokens=40))
        assert await engine.drain(timeout=0.05) is False  # "a" cannot finish in time: aborted
        assert [o.finish_reason async for o in stream][-1] == "abort"
        with pytest.raises(EngineDrainingError):
            await engine.add_request("b", [1], SamplingParams(max_tokens=1))
        assert not engine.ready

    run_with(FakeEngine(step_time=0.01), scenario)


def test_metrics_turn_cumulative_stats_into_counter_increments():
    metrics = EngineMetrics("m")
    metrics.observe_engine_stats({"prompt_tokens": 5, "spec_accepted_per_pos": [3, 1], "kv_usage": 0.5})
    metrics.observe_engine_stats({"prompt_tokens": 12, "spec_accepted_per_pos": [4, 1, 2], "kv_usage": 0.25})
    value = metrics.registry.get_sample_value
    assert value("sift:prompt_tokens_total", {"model_name": "m"}) == 12
    assert value("sift:kv_cache_usage_perc", {"model_name": "m"}) == 0.25
    per_pos = [value("sift:spec_decode_num_accepted_tokens_per_pos_total", {"model_name": "m", "position": str(p)})
               for p in range(3)]
    assert per_pos == [4, 1, 2]


def test_cli_flags_env_twins_and_precedence(monkeypatch):
    monkeypatch.setenv("SIFT_MAX_MODEL_LEN", "300")
    monkeypatch.setenv("SIFT_API_KEY", "from-env")
    monkeypatch.setenv("SIFT_NO_PREFIX_CACHING", "1")
    args = build_parser().parse_args(["serve", "--max-model-len", "256", "--kv-eviction", "lazy", "--port", "9"])
    config = config_from_args(args, ENGINE_FLAGS + SERVER_FLAGS)
    assert config.model.max_model_len == 256  # flag beats env
    assert config.server.api_key == "from-env" and config.server.port == 9
    assert config.cache.enable_prefix_caching is False
    assert config.eviction.method == "lazy"
    skip = config_from_args(build_parser().parse_args(["serve", "--token-skipping", "spts", "--skip-schedule", "geometric",
                                                       "--skip-recent", "512", "--skip-probe-tokens", "128"]),
                            ENGINE_FLAGS).skipping
    assert (skip.method, skip.schedule, skip.recent, skip.probe_tokens) == ("spts", "geometric", 512, 128)
    assert config_from_args(build_parser().parse_args(["serve"]), ENGINE_FLAGS + SERVER_FLAGS).model.max_model_len == 300
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for flag in ENGINE_FLAGS + SERVER_FLAGS + LOG_FLAGS:
        assert f"--{flag.name}" in help_text and flag.env in help_text
