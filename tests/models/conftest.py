"""Shared fixtures for the model tests: the embedded GGUF loaded once by us and once by transformers
(the oracle), and a driver that runs one request through the paged KV cache as the runner would."""
from __future__ import annotations

import os

import pytest
import torch

from sift.kernels.backend import TorchBackend, build_metadata
from sift.models.embedded import embedded_model_path
from sift.models.loader import load_model
from sift.models.batch import ForwardBatch


@pytest.fixture(scope="session")
def gguf_path() -> str:
    return embedded_model_path()


@pytest.fixture(scope="session")
def ours(gguf_path):
    return load_model(gguf_path, torch.float32, "cpu", quantization="none")  # the float path HF is compared with


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    """transformers' own GGUF loader: the oracle for weights and logits (slow: ~20 s)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                                 dtype=torch.float32, attn_implementation="eager")
    return model.eval()


class OneSequence:
    """One request in a paged KV pool: block 0 stays unused, the request owns blocks 1..n."""

    def __init__(self, model, max_tokens: int, block_size: int = 16):
        num_blocks = -(-max_tokens // block_size)
        self.model, self.block_size = model, block_size
        self.kv_caches = model.make_kv_caches(num_blocks + 1, block_size, torch.float32, "cpu")
        self.block_table = torch.arange(1, num_blocks + 1, dtype=torch.int32)[None]
        self.backend = TorchBackend()
        self.kv_len = 0

    def step(self, token_ids: list[int], all_logits: bool = False) -> torch.Tensor:
        """Append ``token_ids`` to the request; float32 logits of every new token or of the last one."""
        n = len(token_ids)
        positions = torch.arange(self.kv_len, self.kv_len + n)
        self.kv_len += n
        slots = self.block_table[0, positions // self.block_size].long() * self.block_size + positions % self.block_size
        meta = build_metadata([n], [self.kv_len], self.block_table, slots, self.block_size, "cpu")
        rows = torch.arange(n) if all_logits else torch.tensor([n - 1])
        batch = ForwardBatch(input_ids=torch.tensor(token_ids), positions=positions, attn=meta, backend=self.backend,
                             kv_caches=self.kv_caches, logits_indices=rows)
        return self.model.compute_logits(self.model(batch))

    def greedy(self, prompt: list[int], max_new_tokens: int, eos: tuple) -> list[int]:
        out = [int(self.step(prompt).argmax(-1))]
        while len(out) < max_new_tokens and out[-1] not in eos:
            out.append(int(self.step([out[-1]]).argmax(-1)))
        return out


@pytest.fixture(scope="session")
def one_sequence():
    """The :class:`OneSequence` driver class."""
    return OneSequence
