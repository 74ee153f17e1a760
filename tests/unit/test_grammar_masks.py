"""The xgrammar adapter without a model: compile cache, errors, batched masks that touch only the
constrained rows, and sampling that always satisfies the grammar (CPU path)."""
import json
import re

import pytest
import torch

from sift.models.embedded import embedded_model_path
from sift.models.loader import _read_tokenizer
from sift.server.engine.request import Request, SamplingParams
from sift.server.runner.sampler import sample
from sift.server.structured.compiler import GrammarCompiler, GrammarError
from sift.server.structured.masks import GrammarState, apply_masks
from sift.server.structured.spec import StructuredSpec


@pytest.fixture(scope="module")
def tok():
    return _read_tokenizer(embedded_model_path())


@pytest.fixture(scope="module")
def compiler(tok):
    return GrammarCompiler(tok, tok.vocab_size, tok.eos_token_ids)


def test_cache_is_keyed_by_canonical_spec(compiler):
    a = StructuredSpec.json_schema({"type": "object", "properties": {"x": {"type": "integer"}}})
    b = StructuredSpec.json_schema('{"type": "object",\n "properties": {"x": {"type": "integer"}}}')
    assert a == b and hash(a) == hash(b)
    first, cold = compiler.get(a)
    again, warm = compiler.get(b)
    assert again is first and cold > 0 and warm == 0.0


@pytest.mark.parametrize("spec,needle", [
    (StructuredSpec("regex", "((("), "parenthesis"),
    (StructuredSpec("grammar", "root ::= "), "EBNF"),
    (StructuredSpec.json_schema({"$ref": "#/definitions/none"}), "cannot compile the json schema"),
])
def test_uncompilable_specs_raise_with_the_reason(compiler, spec, needle):
    with pytest.raises(GrammarError, match=needle):
        compiler.get(spec)


def test_masks_touch_only_constrained_rows(compiler, tok):
    torch.manual_seed(0)
    logits = torch.randn(3, tok.vocab_size)
    original = logits.clone()
    state = GrammarState(compiler.get(StructuredSpec("regex", "[0-9]{3}"))[0])
    seconds = apply_masks(logits, [1], [state])
    assert seconds > 0
    assert torch.equal(logits[0], original[0]) and torch.equal(logits[2], original[2])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(re.fullmatch(r"[0-9]+", tok.decode([t])) for t in allowed)


def _request(i: int, params: SamplingParams, compiled=None) -> Request:
    req = Request(f"r{i}", [1, 2, 3], params, eos_token_ids=(0, 2), generator=torch.Generator().manual_seed(i))
    if compiled is not None:
        req.grammar = GrammarState(compiled)
    return req


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampling_follows_the_grammar(compiler, tok, temperature):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "s": {"type": "string", "maxLength": 4}},
              "required": ["n", "s"], "additionalProperties": False}
    specs = [StructuredSpec("regex", "[a-z]{2}-[0-9]{2}"), StructuredSpec.json_schema(schema),
             StructuredSpec.choice(["left", "right"])]
    params = SamplingParams(max_tokens=64, temperature=temperature)
    reqs = [_request(i, params, compiler.get(s)[0]) for i, s in enumerate(specs)] + [_request(9, params)]
    torch.manual_seed(1)
    outputs = [[] for _ in reqs]
    for _ in range(40):
        res = sample(torch.randn(len(reqs), tok.vocab_size) * 4, reqs)
        for i, t in enumerate(res.token_ids):
            if not reqs[i].grammar or not reqs[i].grammar.terminated:
                outputs[i].append(t)
    texts = [tok.decode([t for t in out if t not in (0, 2)]) for out in outputs[:3]]
    assert all(r.grammar.terminated for r in reqs[:3])
    assert re.fullmatch("[a-z]{2}-[0-9]{2}", texts[0])
    assert json.loads(texts[1])["n"] in range(10)
    assert texts[2] in ("left", "right")


def test_json_never_emits_raw_control_characters(compiler, tok):
    compiled = compiler.get(StructuredSpec("json_object"))[0]
    controls = [i for i in range(tok.vocab_size) if any(ord(ch) < 0x20 for ch in tok.decode([i]))]
    state = GrammarState(compiled)
    for text in ('{"', 'a'):  # inside a string, where xgrammar itself would admit them
        for t in tok.encode(text, add_special_tokens=False):
            state.accept(t)
    logits = torch.zeros(1, tok.vocab_size)
    apply_masks(logits, [0], [state])
    assert controls and torch.isinf(logits[0, controls]).all()
