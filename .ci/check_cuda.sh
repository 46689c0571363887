#!/usr/bin/env bash
# Compile-check every knnlm/csrc/cuda/*.cu with nvcc for sm_80 and sm_90 (no GPU and no torch
# needed: the .cu files include only the CUDA runtime and knnlm/csrc/ headers). Fails on any compile error or
# warning; skips (exit 0) with a message only when nvcc is absent.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc_bin="${NVCC:-}"
if [[ -z "$nvcc_bin" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    nvcc_bin="$(command -v nvcc)"
  else
    for cand in "${CUDA_HOME:-/nonexistent}/bin/nvcc" /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
      if [[ -x "$cand" ]]; then nvcc_bin="$cand"; break; fi
    done
  fi
fi
if [[ -z "$nvcc_bin" ]]; then
  echo "check_cuda: SKIPPED - nvcc not found (set NVCC or CUDA_HOME to enable the CUDA compile check)"
  exit 0
fi

shopt -s nullglob
csrc="$root/knnlm/csrc"
sources=("$csrc"/cuda/*.cu)
if (( ${#sources[@]} == 0 )); then
  echo "check_cuda: FAILED - no knnlm/csrc/cuda/*.cu files found" >&2
  exit 1
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
echo "check_cuda: $("$nvcc_bin" --version | tail -n 1)"
status=0
for arch in sm_80 sm_90; do
  for src in "${sources[@]}"; do
    rel="${src#"$root"/}"
    if "$nvcc_bin" -std=c++17 -O3 -arch="$arch" -I"$csrc" --Werror all-warnings \
        -Xcompiler -Wall -c "$src" -o "$out/$(basename "$src" .cu)_$arch.o"; then
      echo "check_cuda: ok     $rel [$arch]"
    else
      echo "check_cuda: FAILED $rel [$arch]" >&2
      status=1
    fi
  done
done
exit "$status"
