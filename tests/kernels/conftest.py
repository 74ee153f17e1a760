"""Kernel tests run the Triton kernels on CUDA when present, else on CPU through the Triton interpreter."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: set before import

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def poison(monkeypatch):
    """Every floating-point tensor allocated with torch.empty/empty_like during the test starts as NaN,
    so an output element a kernel forgets to write (or a stale buffer it reads) shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan(empty_like(*a, **k)))


@pytest.fixture
def paged_pool(device):
    """Factory: a random KV pool with shuffled block tables for requests of the given kv lengths."""

    def make(kv_lens, num_kv_heads, head_dim, block_size, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        blocks = [-(-n // block_size) for n in kv_lens]
        num_blocks = sum(blocks) + 2  # spare blocks: garbage a wrong index would read
        k_cache = torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=g).to(device, dtype)
        v_cache = torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=g).to(device, dtype)
        perm = torch.randperm(num_blocks, generator=g)
        block_tables = torch.zeros(len(kv_lens), max(blocks), dtype=torch.int32)
        used = 0
        for b, n in enumerate(blocks):
            block_tables[b, :n] = perm[used:used + n]
            used += n
        return k_cache, v_cache, block_tables.to(device), torch.tensor(kv_lens, dtype=torch.int32, device=device)

    return make
