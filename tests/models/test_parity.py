"""Our model against HF transformers on the embedded SmolLM2 GGUF: logits of a prompt, and greedy
generation with incremental decode steps through our paged KV cache."""
from __future__ import annotations

import pytest
import torch

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the factorial of n.",
    "Explain in two sentences why the sky is blue.",
    "List three fruits that are red.",
    "Translate to French: The weather is nice today, so we will walk to the park.",
]


def chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]),
                            add_special_tokens=False)


def test_prompt_logits_match_hf(ours, hf_model, one_sequence):
    ids = chat_ids(ours.tokenizer, PROMPTS[1])
    mine = one_sequence(ours.model, len(ids)).step(ids, all_logits=True)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].float()
    assert mine.shape == ref.shape == (len(ids), ours.arch.vocab_size)
    assert (mine - ref).abs().max() < 1e-3
    assert (mine.log_softmax(-1) - ref.log_softmax(-1)).abs().max() < 1e-3


def test_chunked_prefill_matches_one_shot(ours, one_sequence):
    """Prefill in three chunks (the second crossing a block boundary) == one forward over the prompt."""
    ids = chat_ids(ours.tokenizer, PROMPTS[4])
    whole = one_sequence(ours.model, len(ids)).step(ids, all_logits=True)
    seq = one_sequence(ours.model, len(ids))
    parts = [seq.step(ids[:10], all_logits=True), seq.step(ids[10:21], all_logits=True),
             seq.step(ids[21:], all_logits=True)]
    assert (torch.cat(parts) - whole).abs().max() < 1e-3


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_generation_matches_hf(ours, hf_model, one_sequence, prompt):
    tok = ours.tokenizer
    ids = chat_ids(tok, prompt)
    n_new = 64
    mine = one_sequence(ours.model, len(ids) + n_new).greedy(ids, n_new, tok.eos_token_ids)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=n_new, do_sample=False, eos_token_id=list(tok.eos_token_ids),
                                pad_token_id=tok.eos_token_ids[0])[0, len(ids):].tolist()
    assert mine == ref, (tok.decode(mine), tok.decode(ref))
