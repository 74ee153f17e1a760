"""Hardening without a model: request bounds, O(1) draft depth, per-request sampling checks, failed-step
isolation in the scheduler, config limits (issue #27)."""
from __future__ import annotations

import math
import random
import time
import typing

import pytest
from pydantic import BaseModel

from sift.server.api.bounds import Limits, check_request, leaves, request_bounds
from sift.server.api.errors import APIError
from sift.server.api.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from sift.server.cache.kv_manager import KVManager
from sift.server.config import CacheConfig, SchedulerConfig, ServerConfig
from sift.server.engine.request import Request, RequestStatus, SamplingParams
from sift.server.engine.scheduler import Scheduler
from sift.server.options import EvictionOptions
from sift.server.policies.eviction import Eviction, evicting_depth
from sift.server.runner.sampler import check_sampling_row

LIMITS = Limits(max_model_len=512, vocab_size=1000, num_layers=30)
REQUEST_MODELS = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)


def numeric_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted paths of every field of ``model`` (recursively) whose type admits an int or a float."""
    paths = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{info.alias or name}"
        todo, seen_numeric = [info.annotation], False
        while todo:
            t = todo.pop()
            if t in (int, float):
                seen_numeric = True
            elif isinstance(t, type) and issubclass(t, BaseModel):
                paths += numeric_fields(t, path + ".")
            else:
                todo += [a for a in typing.get_args(t) if a is not type(None)]
        if seen_numeric:
            paths.append(path)
    return paths


@pytest.mark.parametrize("model", REQUEST_MODELS, ids=lambda m: m.__name__)
def test_every_numeric_request_field_has_a_bound(model):
    table = request_bounds(LIMITS)
    missing = [p for p in numeric_fields(model) if p not in table]
    assert not missing, f"numeric fields without a bound in server/api/bounds.py: {missing}"


def _reject(body: BaseModel) -> APIError:
    with pytest.raises(APIError) as info:
        check_request(body, LIMITS)
    assert info.value.status == 400
    return info.value


@pytest.mark.parametrize("fields,param", [
    ({"temperature": math.nan}, "temperature"),
    ({"presence_penalty": math.inf}, "presence_penalty"),
    ({"top_k": 2**63}, "top_k"),
    ({"seed": 2**64}, "seed"),
    ({"max_tokens": 10**6}, "max_tokens"),
    ({"priority": -(2**40)}, "priority"),
    ({"logit_bias": {"5": math.nan}}, "logit_bias"),
    ({"logit_bias": {"123456": 1.0}}, "logit_bias"),
    ({"stop_token_ids": [1, 5000]}, "stop_token_ids.1"),
    ({"kv_eviction": {"method": "h2o", "budget": 1e300}}, "kv_eviction.budget"),
    ({"sparsity": {"method": "window", "window": 2**70}}, "sparsity.window"),
    ({"sparsity": {"method": "tidal", "reselection_layer": [3, 99]}}, "sparsity.reselection_layer.1"),
    ({"speculative": {"method": "ngram", "relaxed": {"k": 1, "lambda": math.inf}}}, "speculative.relaxed.lambda"),
    ({"token_skipping": {"method": "spts", "ratio": 1.0}}, "token_skipping.ratio"),
    ({"prompt": "x \ud800"}, "prompt"),
    ({"prompt": [1, 2, 1000]}, "prompt.2"),
    ({"prompt": [1] * 2000}, "prompt"),  # more items than max(context, 1024): refused before it is walked
])
def test_out_of_range_values_are_400_naming_the_field(fields, param):
    error = _reject(CompletionRequest(**{"prompt": "hi", **fields}))
    assert error.param == param and error.message.startswith(param)


def test_lone_surrogate_in_a_message_is_named():
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "ok"},
                                           {"role": "user", "content": [{"type": "text", "text": "\udfff"}]}])
    assert _reject(body).param == "messages.1.content.0.text"


def test_legal_edges_pass():
    check_request(CompletionRequest(prompt="hi", temperature=0.0, top_p=1.0, top_k=-1, seed=2**63 - 1, n=16,
                                    max_tokens=512, priority=-5, presence_penalty=-2, logit_bias={"999": -100},
                                    kv_eviction={"method": "h2o", "budget": 512},
                                    sparsity={"method": "tidal", "selection_layer": 29}), LIMITS)


def test_closed_form_depth_matches_the_decision_point_walk():
    def walk(depth, entries, capacity, window):
        while entries + depth + 1 <= capacity:
            depth += window
        return depth
    rng = random.Random(0)
    for _ in range(2000):
        window = rng.randint(1, 64)
        case = (rng.randint(0, window - 1), rng.randint(0, 500), rng.randint(1, 2000), window)
        assert evicting_depth(*case) == walk(*case), case


def test_draft_depth_is_constant_time_whatever_the_budget():
    driver = Eviction(EvictionOptions(method="none"), num_layers=1, num_kv_heads=1, kv=None)
    req = Request("r", list(range(8)), SamplingParams(max_tokens=4,
                                                      eviction=EvictionOptions("h2o", budget=1e300, window=1)))
    driver.on_admit(req)
    start = time.perf_counter()
    depth = driver.draft_depth(req)
    assert time.perf_counter() - start < 0.5  # the loop it replaces took budget / window iterations: forever
    assert depth >= 10**299


def test_sampling_row_checked_alone():
    check_sampling_row(SamplingParams(top_k=50, logit_bias={3: 1.0}), vocab_size=10)
    with pytest.raises(ValueError, match="logit_bias"):
        check_sampling_row(SamplingParams(logit_bias={12: 1.0}), vocab_size=10)


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": math.nan}, "temperature"), ({"repetition_penalty": math.inf}, "repetition_penalty"),
    ({"top_k": 2**63}, "top_k"), ({"eviction": "nan-budget"}, "kv_eviction.budget"),
])
def test_sampling_params_refuse_non_finite_and_overflowing_values(kwargs, field):
    if kwargs.get("eviction") == "nan-budget":
        with pytest.raises(ValueError, match=field):
            EvictionOptions("h2o", budget=math.nan)
        return
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_tiny_temperature_is_greedy():
    assert SamplingParams(temperature=1e-9).greedy and not SamplingParams(temperature=0.5).greedy


def test_config_limits():
    with pytest.raises(ValueError, match="max_queued_requests"):
        SchedulerConfig(max_queued_requests=0)
    with pytest.raises(ValueError, match="max_request_body_bytes"):
        ServerConfig(max_request_body_bytes=10)
    with pytest.raises(ValueError, match="default_max_tokens"):
        ServerConfig(default_max_tokens=0)
    assert CacheConfig().kv_cache_memory is None  # fixed-size default, not a share of host RAM


def test_cpu_kv_pool_default_is_fixed_and_capped_by_full_contexts():
    import torch

    from sift.server.engine.llm_engine import kv_cache_bytes
    cpu, per_block = torch.device("cpu"), 1 << 20
    assert kv_cache_bytes(CacheConfig(), cpu, 4, 160, per_block) == 4 * (160 // 16 + 1) * per_block
    assert kv_cache_bytes(CacheConfig(), cpu, 1024, 8192, per_block) == CacheConfig.CPU_KV_CACHE_BYTES
    assert kv_cache_bytes(CacheConfig(kv_cache_memory=123456.0), cpu, 4, 160, per_block) == 123456.0


# ---- a failed step with no known culprit: its requests run alone until each succeeds ----------------------

def _req(rid: str, t: float) -> Request:
    base = 100 * (ord(rid) - ord("a") + 1)
    return Request(rid, list(range(base, base + 6)), SamplingParams(max_tokens=8), arrival_time=t)


def test_suspects_run_alone_then_rejoin_the_batch():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), KVManager(64, 4), max_model_len=256)
    for i, rid in enumerate("abc"):
        s.add_request(_req(rid, float(i)))
    out = s.schedule()
    assert [r.request_id for r in out.requests] == ["a", "b", "c"]
    # the step failed: every request it ran is a suspect, and all running KV is recomputed
    s.suspects.update(r.request_id for r in out.requests)
    s.preempt_all()
    assert not s.running and s.kv.num_free_blocks == 63 and s.num_waiting == 3
    seen = []
    for _ in range(3):
        out = s.schedule()
        assert len(out.requests) == 1  # a suspect alone: if this step fails, it names its culprit
        rid = out.requests[0].request_id
        assert out.requests[0].positions == list(range(6))  # recomputed from scratch
        s.update(out, {rid: [7]})
        s.suspects.discard(rid)  # its own step succeeded
        seen.append(rid)
    assert seen == ["a", "b", "c"]
    assert sorted(r.request_id for r in s.schedule().requests) == ["a", "b", "c"]  # one batch again


def test_a_suspect_that_cannot_fit_lets_the_others_run():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), KVManager(4, 4), max_model_len=256)
    s.add_request(_req("a", 0.0))  # 6 tokens: 2 of the 3 usable blocks
    out = s.schedule()
    s.update(out, {"a": [7]})
    s.add_request(_req("b", 1.0))
    s.suspects.add("b")  # b needs 2 blocks, 1 is free: it cannot run alone now
    out = s.schedule()
    assert [r.request_id for r in out.requests] == ["a"]
    assert s.requests["b"].status == RequestStatus.WAITING
