#!/usr/bin/env bash
# One prepared pass over everything that needs a GPU, for a machine lent for a few minutes:
# build (CUDA extension for this GPU only), `dvpo check`, the GPU tests (CUDA + Triton backends
# and the op API on CUDA tensors), then a GPU benchmark sweep. Every phase has its own time limit
# and the script goes on after a failure, so one broken phase still leaves the others' results.
#
#   OUT=/tmp/gpu bash tools/gpu_check.sh          (results and logs in $OUT)
#
# Environment: OUT (default ./gpu-results), GPU_CHECK_ARCHS (default: this GPU's, e.g. 90a on Hopper),
# GPU_BUILD_S / GPU_TEST_S / GPU_BENCH_S (phase limits in seconds), GPU_TEST_JOBS (pytest-xdist workers),
# GPU_BENCH_ARGS (replaces the benchmark's sweep arguments).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
T0=$(date +%s)
log() { echo "== [$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/summary.log"; }

log "machine"
{ nvidia-smi -L; nvcc --version | tail -2
  $PY -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee -a "$OUT/summary.log"

ARCH="${GPU_CHECK_ARCHS:-$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}' + ('a' if m == 9 else ''))")}"
log "build (DVPO_CUDA_ARCHS=$ARCH)"
DVPO_BUILD_CUDA=1 DVPO_CUDA_ARCHS="$ARCH" MAX_JOBS="${MAX_JOBS:-16}" timeout "${GPU_BUILD_S:-240}" \
  $PY -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1
rc=$?
log "build rc=$rc"
if [ $rc -ne 0 ]; then tail -60 "$OUT/build.log" | tee -a "$OUT/summary.log"; fi
$PY -c "import dvpo, dvpo.ops as o; print(o.backends('cuda'))" 2>&1 | tee -a "$OUT/summary.log"

log "dvpo check (fp32, bf16)"
for dt in float32 bfloat16; do timeout 60 $PY -m dvpo check --device cuda --dtype $dt 2>&1 | tee -a "$OUT/summary.log"; done

log "GPU tests"
# The CPU emulation of the CUDA kernels is for machines without a GPU: skipped here. `-m gpu`: only the
# cases on CUDA tensors (the contract modules' cuda and triton backends, the CUDA-only files); the CPU
# backends' cases run in CI.
DVPO_SKIP_CUDA_EMU=1 DVPO_REQUIRE_CUDA_BACKEND=1 timeout -s INT "${GPU_TEST_S:-200}" \
  $PY -m pytest -q -p no:cacheprovider -m gpu -n "${GPU_TEST_JOBS:-8}" --timeout 120 -rfE \
  --junitxml="$OUT/junit.xml" tests/test_quantile_huber.py tests/test_cvar.py tests/test_critic_loss.py \
  tests/test_distributional_gae.py tests/test_reduce_tokens.py tests/test_cuda_backend.py tests/test_cuda_tails.py tests/test_cuda_graphs.py \
  tests/test_triton_backend.py \
  >"$OUT/pytest.log" 2>&1
rc=$?
log "GPU tests rc=$rc"
tail -40 "$OUT/pytest.log" | tee -a "$OUT/summary.log"

log "trainer on the GPU (tiny DVPO run, cuda critic loss)"
timeout "${GPU_TRAIN_S:-90}" $PY -m dvpo train --algo dvpo --task math --device cuda --steps 10 --sft-steps 300 \
  --n-eval 64 --eval-every 5 --no-plots --no-progress --out /tmp/dvpo-gpu-run --sft-cache /tmp/dvpo-gpu-cache \
  >"$OUT/train.log" 2>&1
log "trainer rc=$?"
tail -8 "$OUT/train.log" | tee -a "$OUT/summary.log"

log "GPU benchmark"
# SIGINT: the harness stops after the current case and still writes its JSON. The crossover sweep
# times the CUDA pairwise and sorted (merge-path) kernels side by side: the data for a CUDA `auto` rule.
# shellcheck disable=SC2086
timeout -s INT "${GPU_BENCH_S:-150}" $PY bench/run.py --device cuda --out "$OUT" --no-plots --no-progress \
  ${GPU_BENCH_ARGS:---ops critic_loss,quantile_huber,cvar,distributional_gae --dtypes fp32,bf16 --sweeps tokens,crossover --crossover 100,200,500,1000 --compile-shapes headline --no-e2e} >"$OUT/bench.log" 2>&1
log "GPU benchmark rc=$?"
tail -30 "$OUT/bench.log" | tee -a "$OUT/summary.log"
log "done"
