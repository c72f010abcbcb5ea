#!/usr/bin/env bash
# Compile-check the torch-free CUDA kernel files (csrc/cuda/*.cu) with nvcc for sm_80 and sm_90a.
#
#   bash tools/check_cuda_compile.sh          (from anywhere; paths are taken from the repo root)
#
# Every file is compiled with `nvcc -c -std=c++17 -O3 -I csrc` once per architecture (in parallel,
# one job per CPU); any error fails the script (exit 1) and prints the compiler's log. The binding
# (csrc/cuda/bindings.cpp) needs torch's CUDA headers and is not compiled here: pip builds it.
# Without nvcc the script says so and exits 0 (nothing can be checked on such a machine).
# Environment: NVCC (the compiler to use), DVPO_CHECK_ARCHS (default "80 90a"),
# DVPO_CHECK_EXTRA_FLAGS (appended, e.g. "--use_fast_math" to mirror setup.py).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

NVCC="${NVCC:-}"
if [ -z "$NVCC" ]; then
  for cand in "$(command -v nvcc 2>/dev/null)" "${CUDA_HOME:-}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
    if [ -n "$cand" ] && [ -x "$cand" ]; then NVCC="$cand"; break; fi
  done
fi
if [ -z "$NVCC" ]; then
  echo "check_cuda_compile: nvcc not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin): CUDA kernels NOT compile-checked"
  exit 0
fi

shopt -s nullglob
FILES=(csrc/cuda/*.cu)
if [ ${#FILES[@]} -eq 0 ]; then
  echo "check_cuda_compile: no csrc/cuda/*.cu files: nothing to check" >&2
  exit 1
fi
read -r -a ARCHS <<< "${DVPO_CHECK_ARCHS:-80 90a}"
read -r -a EXTRA <<< "${DVPO_CHECK_EXTRA_FLAGS:-}"
JOBS="$(nproc 2>/dev/null || echo 2)"

echo "check_cuda_compile: $("$NVCC" --version | grep -o 'release [0-9.]*' | head -1) at $NVCC"
echo "check_cuda_compile: ${#FILES[@]} file(s) x ${#ARCHS[@]} arch(es) [${ARCHS[*]}], $JOBS job(s)"

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

compile() {  # file arch -> writes $OUT/<name>.<arch>.{log,status}
  local file="$1" arch="$2" name tag start status
  name="$(basename "$file" .cu)"
  tag="$OUT/$name.sm_$arch"
  start=$SECONDS
  "$NVCC" -c -std=c++17 -O3 -I csrc "-gencode=arch=compute_$arch,code=sm_$arch" -Xptxas -warn-spills \
    "${EXTRA[@]}" "$file" -o "$tag.o" > "$tag.log" 2>&1
  status=$?
  echo "$status $((SECONDS - start))" > "$tag.status"
}

running=0
for file in "${FILES[@]}"; do
  for arch in "${ARCHS[@]}"; do
    compile "$file" "$arch" &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then wait -n 2>/dev/null || wait; running=$((running - 1)); fi
  done
done
wait

failed=0
for file in "${FILES[@]}"; do
  for arch in "${ARCHS[@]}"; do
    tag="$OUT/$(basename "$file" .cu).sm_$arch"
    read -r status secs < "$tag.status" 2>/dev/null || { status=1; secs=0; }
    if [ "$status" -eq 0 ]; then
      note=""
      if grep -q "spill" "$tag.log" 2>/dev/null; then note=" (ptxas reports spills, see below)"; fi
      printf '  ok    %-34s sm_%-4s %4ss%s\n' "$file" "$arch" "$secs" "$note"
      if [ -n "$note" ]; then sed 's/^/        /' "$tag.log"; fi
    else
      failed=$((failed + 1))
      printf '  FAIL  %-34s sm_%-4s\n' "$file" "$arch"
      sed 's/^/        /' "$tag.log"
    fi
  done
done

if [ "$failed" -ne 0 ]; then
  echo "check_cuda_compile: $failed compilation(s) FAILED"
  exit 1
fi
echo "check_cuda_compile: all ${#FILES[@]} kernel file(s) compiled for ${ARCHS[*]}"
