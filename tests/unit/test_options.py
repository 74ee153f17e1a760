"""Options defined once (server/options.py): the request schema, the `sift serve` flags, the server defaults and
the API bounds are derived from the option dataclasses. These tests fail when one of them drifts from the
dataclass: a field missing from the schema or the CLI, a flag or request field with no dataclass field behind it,
a request value that does not reach the options, a rule the dataclass does not enforce."""
from __future__ import annotations

import math
import typing
from dataclasses import fields

import pytest

from sift.server.api.bounds import Limits, check_request, request_bounds
from sift.server.api.protocol import CompletionRequest
from sift.server.cli import ENGINE_FLAGS, build_parser, config_from_args
from sift.server.config import EngineConfig
from sift.server.options import (TECHNIQUES, EvictionOptions, Options, SkipOptions, SparsityOptions, SpecConfig,
                                 SpecOptions, api_path, meta)

LIMITS = Limits(max_model_len=512, vocab_size=1000, num_layers=30)
# every request field of every technique, each set to a legal value that is not its default
FULL_BODIES = {
    "speculative": {"method": "goose", "num_draft_tokens": 12, "relaxed": {"k": 5, "delta": 0.1, "lambda": 2.0}},
    "kv_eviction": {"method": "lazy", "budget": 64.0, "window": 8, "alpha": 0.001, "sinks": 2},
    "sparsity": {"method": "tidal", "budget": 64, "window": 128, "sinks": 2, "recent": 8, "selection_layer": 3,
                 "reselection_layer": [5, 9], "reselect_every": 2, "correction_interval": 16, "candidates": 128,
                 "rank": 8},
    "token_skipping": {"method": "spts", "ratio": 0.7, "start_layer": 2, "min_prompt_len": 64, "probe_tokens": 8,
                       "recent": 16, "stages": 3, "probe_rank": 32, "blocks": "both", "schedule": "geometric"},
}


def api_paths(options: type) -> set[str]:
    return {api_path(f) for f in fields(options) if api_path(f) is not None}


def flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def documented(schema: dict, defs: dict) -> set[str]:
    """Leaf paths of a JSON schema object, nested objects followed through their $ref; each must be described."""
    paths = set()
    for key, prop in schema["properties"].items():
        ref = next((s["$ref"] for s in prop.get("anyOf", [prop]) if "$ref" in s), None)
        if ref is not None:
            paths |= {f"{key}.{p}" for p in documented(defs[ref.rsplit("/", 1)[1]], defs)}
        else:
            assert prop.get("description"), f"{key} is not documented"
            paths.add(key)
    return paths


@pytest.mark.parametrize("options", TECHNIQUES, ids=lambda o: o.SECTION)
def test_request_schema_documents_exactly_the_dataclass_fields(options):
    schema = CompletionRequest.model_json_schema()
    ref = next(s["$ref"] for s in schema["properties"][options.SECTION]["anyOf"] if "$ref" in s)
    assert documented(schema["$defs"][ref.rsplit("/", 1)[1]], schema["$defs"]) == api_paths(options)
    assert schema["$defs"][ref.rsplit("/", 1)[1]]["required"] == ["method"]


@pytest.mark.parametrize("options", TECHNIQUES, ids=lambda o: o.SECTION)
def test_every_request_field_reaches_the_options(options):
    body = FULL_BODIES[options.SECTION]
    assert set(flat(body)) == api_paths(options), "FULL_BODIES must set every request field"
    request = CompletionRequest(prompt="hi", **{options.SECTION: body})
    check_request(request, LIMITS)
    opts = getattr(request, options.SECTION).to_options()
    names = {api_path(f): f.name for f in fields(options) if api_path(f) is not None}
    for path, value in flat(body).items():
        got = getattr(opts, names[path])
        assert got == (tuple(value) if isinstance(value, list) else value), path
        assert got != next(f.default for f in fields(options) if f.name == names[path]), path


@pytest.mark.parametrize("options", TECHNIQUES, ids=lambda o: o.SECTION)
def test_every_numeric_request_field_is_bounded_and_checked_by_the_dataclass(options):
    table = request_bounds(LIMITS)
    for f in fields(options):
        rule, path = meta(f).range, api_path(f)
        if rule is None:
            continue
        name = f"{options.SECTION}.{path or f.name}"
        if path is not None:
            assert name in table
        below = rule.lo if rule.lo_open else rule.lo - 1
        below -= below == meta(f).off  # the value that switches the option off is legal in the dataclass
        for bad in (below, math.nan):
            with pytest.raises(ValueError, match=f"^{name} "):
                options(**{f.name: bad})
    with pytest.raises(ValueError, match=f"^{options.SECTION}.method: unknown value"):
        options(method="magic")


def test_off_values_and_cross_field_rules():
    assert SpecOptions(method="ngram").relaxed_k == 0  # 0: strict verification, below relaxed.k's range
    with pytest.raises(ValueError, match="speculative.relaxed.k"):
        SpecOptions(relaxed_k=-1)
    with pytest.raises(ValueError, match="sparsity.candidates"):
        SparsityOptions(budget=64, candidates=64)
    with pytest.raises(ValueError, match=r"sparsity.reselection_layer.1 "):
        SparsityOptions(reselection_layer=[3, -1])
    assert SparsityOptions(reselection_layer=[3, 5]).reselection_layer == (3, 5)


def test_server_defaults_are_the_dataclass_defaults():
    config = EngineConfig()
    assert (config.eviction, config.sparsity, config.skipping) == (EvictionOptions(), SparsityOptions(),
                                                                    SkipOptions())
    assert all(getattr(config.spec, f.name) == f.default for f in fields(SpecOptions))
    assert isinstance(config.spec, SpecConfig)


def test_cli_flags_are_exactly_the_flagged_fields_and_reach_the_config(monkeypatch):
    hints = typing.get_type_hints(EngineConfig)
    sections = {s.name: hints[s.name] for s in fields(EngineConfig)
                if isinstance(hints[s.name], type) and issubclass(hints[s.name], Options)}
    assert set(sections) == {"spec", "eviction", "sparsity", "skipping"}
    declared = {(meta(f).flag, f"{name}.{f.name}") for name, options in sections.items() for f in fields(options)
                if meta(f).flag}
    technique = {(flag.name, flag.target) for flag in ENGINE_FLAGS if flag.target.split(".")[0] in sections}
    assert technique == declared
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    argv, expected = ["serve"], {}
    for flag, target in sorted(declared):
        assert f"--{flag}" in help_text and "SIFT_" + flag.upper().replace("-", "_") in help_text
        section, name = target.split(".")
        f = next(f for f in fields(sections[section]) if f.name == name)
        if meta(f).choices:
            value = next(c for c in meta(f).choices if c != f.default)
        elif f.default is None:
            value = 3
        else:
            value = f.default / 2 if isinstance(f.default, float) else f.default + 1
        expected[target] = value
        if flag == "kv-budget":  # through the environment twin
            monkeypatch.setenv("SIFT_KV_BUDGET", str(value))
        else:
            argv += [f"--{flag}", str(value)]
    config = config_from_args(build_parser().parse_args(argv), ENGINE_FLAGS)
    for target, value in expected.items():
        section, name = target.split(".")
        assert getattr(getattr(config, section), name) == value, target
