"""Tiny random checkpoints of each architecture, written by transformers, and the parity checks run on them:
Sift against transformers in float32, greedy over 32 steps on 4 prompts of real text (CPython's pydoc topics),
one request at a time through the paged cache and all together through the engine."""
from __future__ import annotations

import torch

STEPS = 32
PROMPT_TOKENS = 320  # past every window the configs set (64-96 tokens)
LOGPROB_TOL = 1e-4
TOPICS = ("assignment", "exceptions", "import", "typesseq")

# shared by every family: 2-4 layers, GQA (4 query heads over 2 kv heads), the embedded model's vocabulary
SMALL = dict(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, rms_norm_eps=1e-5)


def save_random_model(kind: str, cfg: dict, path, tokenizer, init=None) -> torch.nn.Module:
    """A transformers model of config class ``kind``, every parameter random (norms near 1, so no term
    hides), saved with ``tokenizer`` as safetensors in ``path``. Returns the float32 model in eval mode.
    ``init(name, param)``: a family's own initialisation of a parameter; returns whether it did one."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, kind)(**cfg)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if init is not None and init(name, p):
                continue
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            elif "embed" in name or "lm_head" in name:
                p.normal_(0.0, 0.5)  # peaked next-token distributions: greedy ties would test nothing
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    tokenizer.hf.save_pretrained(path)
    return model


def prompts(tokenizer, n: int = 4, length: int = PROMPT_TOKENS) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens of real English and code: CPython's pydoc topic texts."""
    from pydoc_data.topics import topics

    return [tokenizer.encode(topics[name])[:length] for name in TOPICS[:n]]


@torch.no_grad()
def hf_greedy(model, prompt: list[int], steps: int = STEPS) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy continuation through its own KV cache: tokens and the log-softmax of each step."""
    out = model(torch.tensor([prompt]), use_cache=True)
    cache, tokens, logprobs = out.past_key_values, [], []
    for _ in range(steps):
        lp = torch.log_softmax(out.logits[0, -1].float(), -1)
        logprobs.append(lp)
        tokens.append(int(lp.argmax()))
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
    return tokens, logprobs


def sift_greedy(seq, prompt: list[int], steps: int = STEPS) -> tuple[list[int], list[torch.Tensor]]:
    """The same through Sift's model and paged cache (``seq``: a tests.models.conftest.OneSequence); the
    prompt goes in as two chunks, the second one starting mid-window."""
    cut = len(prompt) // 2 + 5
    seq.step(prompt[:cut])
    logits = seq.step(prompt[cut:])[0]
    tokens, logprobs = [], []
    for _ in range(steps):
        lp = torch.log_softmax(logits.float(), -1)
        logprobs.append(lp)
        tokens.append(int(lp.argmax()))
        logits = seq.step([tokens[-1]])[0]
    return tokens, logprobs


def assert_parity(ours: tuple, ref: tuple) -> float:
    """Greedy tokens identical at every step and max |logprob difference| <= LOGPROB_TOL at every step
    (over the whole vocabulary). Returns the largest difference seen."""
    assert ours[0] == ref[0], f"greedy tokens differ: {ours[0]} vs {ref[0]}"
    worst = max(float((a - b).abs().max()) for a, b in zip(ours[1], ref[1]))
    assert worst <= LOGPROB_TOL, f"logprob difference {worst:.2e}"
    return worst


def engine_matches(path: str, prompt_ids: list, refs: list, **engine_kwargs):
    """All prompts at once through the offline engine (batched, chunked prefill of 64-token chunks, prefix
    cache on and hit by a second pass over the same prompts): each request's greedy tokens equal
    transformers', and each chosen token's logprob within LOGPROB_TOL. Returns the LLM."""
    from sift.server.engine.llm import LLM
    from sift.server.engine.request import SamplingParams

    llm = LLM(model=path, num_blocks=256, block_size=16, max_num_batched_tokens=64, enable_prefix_caching=True,
              **engine_kwargs)
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True, logprobs=0)
    for attempt in range(2):
        outs = llm.generate(prompt_ids, params)
        for out, (tokens, logprobs) in zip(outs, refs):
            assert out.token_ids == tokens, f"engine pass {attempt}: {out.token_ids} vs {tokens}"
            got = torch.tensor([lp for lp, _ in out.logprobs])
            want = torch.stack([lp[t] for lp, t in zip(logprobs, tokens)])
            assert float((got - want).abs().max()) <= LOGPROB_TOL
        if attempt == 1:
            assert all(out.num_cached_tokens > 0 for out in outs), "the second pass hits the prefix cache"
    return llm
