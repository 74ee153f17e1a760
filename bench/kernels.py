"""Benchmark of the Triton paged-attention kernels against torch SDPA on the same device.

Run from the repository root: ``python -m sift.bench.kernels [--quick]``. Needs a CUDA device; prints a
table and writes bench/results/kernels.json. Decode is memory-bound, so it is reported as achieved
bandwidth (K/V bytes read / time) against the measured peak of a large device-to-device copy.
Inputs that would fit in L2 are rotated over several copies so the numbers do not measure the cache.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from sift.bench.provenance import write_result

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"
HQ, HKV, DIM, BLOCK = 32, 8, 128, 16  # a Llama-3-8B-like attention layer
DTYPE = torch.bfloat16
ROTATE_BYTES = 256 << 20  # smaller inputs are rotated over copies totalling this (~5x the 50-60 MB L2 of H100/H200)


def _bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3  # seconds


def _rotations(nbytes: int) -> int:
    return max(1, -(-ROTATE_BYTES // nbytes))


def peak_bandwidth(device) -> float:
    """Bytes/s of a 2 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(1 << 29, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / _bench(lambda: dst.copy_(src))


def bench_decode(device, batch: int, ctx: int, peak: float) -> dict:
    from sift.kernels.paged_attention import paged_decode

    blocks = ctx // BLOCK
    kv_bytes = 2 * batch * ctx * HKV * DIM * DTYPE.itemsize
    rot = _rotations(kv_bytes)
    pool = rot * batch * blocks
    k_cache = torch.randn(pool * BLOCK, HKV, DIM, device=device, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(pool, device=device, dtype=torch.int32).view(rot, batch, blocks)  # scattered blocks
    kv_lens = torch.full((batch,), ctx, device=device, dtype=torch.int32)
    q = torch.randn(batch, HQ, DIM, device=device, dtype=DTYPE)
    tables = itertools.cycle(list(perm))
    t_triton = _bench(lambda: paged_decode(q, k_cache, v_cache, next(tables), kv_lens, BLOCK, DIM ** -0.5,
                                           max_kv_len=ctx))
    # SDPA over dense, contiguous K/V of the same size: what the paged layout costs against no paging
    dense = [(torch.randn(batch, HKV, ctx, DIM, device=device, dtype=DTYPE),
              torch.randn(batch, HKV, ctx, DIM, device=device, dtype=DTYPE)) for _ in range(rot)]
    kvs = itertools.cycle(dense)
    q4 = q.view(batch, HQ, 1, DIM)

    def sdpa():
        k, v = next(kvs)
        return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)

    t_sdpa = _bench(sdpa)
    return dict(kind="decode", batch=batch, ctx=ctx, triton_ms=t_triton * 1e3, sdpa_ms=t_sdpa * 1e3,
                triton_gbs=kv_bytes / t_triton / 1e9, sdpa_gbs=kv_bytes / t_sdpa / 1e9,
                triton_frac_peak=kv_bytes / t_triton / peak)


def bench_prefill(device, length: int) -> dict:
    from sift.kernels.paged_attention import paged_attention

    blocks = length // BLOCK
    k_cache = torch.randn(blocks * BLOCK, HKV, DIM, device=device, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(blocks, device=device, dtype=torch.int32)[None]
    q = torch.randn(length, HQ, DIM, device=device, dtype=DTYPE)
    cu = torch.tensor([0, length], device=device, dtype=torch.int32)
    kv_lens = torch.tensor([length], device=device, dtype=torch.int32)
    t_triton = _bench(lambda: paged_attention(q, k_cache, v_cache, table, cu, kv_lens, BLOCK, DIM ** -0.5,
                                              max_q_len=length))
    q4 = q.transpose(0, 1)[None]
    k4, v4 = (c.transpose(0, 1)[None].contiguous() for c in (k_cache, v_cache))
    t_sdpa = _bench(lambda: F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True))
    flops = 2 * 2 * HQ * DIM * length * length / 2  # QK^T and PV, causal half
    return dict(kind="prefill", length=length, triton_ms=t_triton * 1e3, sdpa_ms=t_sdpa * 1e3,
                triton_tflops=flops / t_triton / 1e12, sdpa_tflops=flops / t_sdpa / 1e12)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few sizes only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA device present; the Triton kernels are only benchmarked on a GPU "
              "(correctness on CPU: pytest tests/kernels). Nothing measured, nothing written.")
        return 0
    device = torch.device("cuda")
    torch.manual_seed(0)
    ctxs = [1024, 8192, 32768] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768]
    batches = [1, 16, 64] if args.quick else [1, 4, 16, 32, 64]
    lengths = [1024, 4096] if args.quick else [512, 1024, 2048, 4096, 8192]
    peak = peak_bandwidth(device)
    rows = []
    print(f"{torch.cuda.get_device_name(device)}; copy peak {peak / 1e9:.0f} GB/s; "
          f"Hq={HQ} Hkv={HKV} D={DIM} {DTYPE} block={BLOCK}")
    print(f"{'decode':>8} {'batch':>5} {'ctx':>6} {'triton ms':>10} {'sdpa ms':>9} {'triton GB/s':>12} "
          f"{'sdpa GB/s':>10} {'% peak':>7}")
    for batch, ctx in itertools.product(batches, ctxs):
        r = bench_decode(device, batch, ctx, peak)
        rows.append(r)
        print(f"{'':>8} {batch:>5} {ctx:>6} {r['triton_ms']:>10.3f} {r['sdpa_ms']:>9.3f} {r['triton_gbs']:>12.0f} "
              f"{r['sdpa_gbs']:>10.0f} {100 * r['triton_frac_peak']:>6.1f}%")
        torch.cuda.empty_cache()
    print(f"{'prefill':>8} {'len':>5} {'triton ms':>10} {'sdpa ms':>9} {'triton TF/s':>12} {'sdpa TF/s':>10}")
    for length in lengths:
        r = bench_prefill(device, length)
        rows.append(r)
        print(f"{'':>8} {length:>5} {r['triton_ms']:>10.3f} {r['sdpa_ms']:>9.3f} {r['triton_tflops']:>12.1f} "
              f"{r['sdpa_tflops']:>10.1f}")
    name = torch.cuda.get_device_name(device)
    write_result(RESULTS, dict(device=name, torch=torch.__version__, peak_copy_gbs=peak / 1e9, heads=[HQ, HKV],
                               head_dim=DIM, dtype=str(DTYPE), block_size=BLOCK, results=rows), device=name, indent=1)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
