#!/usr/bin/env bash
# Every GPU check and benchmark in one go, for a machine with a CUDA device: the kernel tests with the
# Triton kernels compiled for it, the engine/model/API tests (the e2e ones pin float32), sift.bench.kernels,
# sift.bench.spec, and sift.bench.long_context on the Llama-3.1-8B shape with random weights. Each step has its own
# time limit and log, so one failing step does not cost the others.
#
#   bash bench/gpu.sh [results dir]          (default: bench/results/gpu; PYTHON=... to pick the interpreter)
set -u
cd "$(dirname "$0")/.."
out=${1:-bench/results/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run it under a limit, keep its log, show its end
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -v 'it/s\]' > "$out/$name.log"
  tail -n 25 "$out/$name.log"
}

"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1
step kernel_tests 300 "$py" -m pytest tests/kernels -q -p no:cacheprovider
step e2e_tests 420 "$py" -m pytest tests/e2e tests/models tests/api -q -p no:cacheprovider -rf --timeout 120
step bench_kernels 300 "$py" -m sift.bench.kernels
step bench_spec 900 "$py" -m sift.bench.spec --concurrency 1 8 32 --rounds 2 --max-tokens 128 --no-lantern \
  --out "$out/spec.json"
step bench_long_context 600 "$py" -m sift.bench.long_context --model bench/shapes/llama-3.1-8b --load-format dummy \
  --contexts 1024,4096,8192,16384,32768 --prefill 2048,4096,8192 --budgets 256 --timed tidal-256,quest-256,loki-256 \
  --out "$out/long_context_llama8b.json"
