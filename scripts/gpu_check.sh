#!/usr/bin/env bash
# One-shot GPU check of the fused op, run from the repo root on a machine with an NVIDIA GPU, a
# CUDA build of torch, nvcc, ninja and pytest (nothing is installed: knnlm is imported from the
# checkout). Steps, each logged under $OUT (default /tmp/knnlm_gpu_check):
#   env.log        GPU / driver / nvcc / torch versions
#   build.log      JIT build of the extension with the CUDA kernels (KNNLM_REQUIRE_KERNEL=1)
#   test_ops.log   python -m pytest tests/test_ops.py (CPU and CUDA cases)
#   test_cuda.log  python -m pytest tests/test_cuda.py (build / eval / mixture / generation with the
#                  model on the GPU against the CPU; needs transformers, tokenizers and faiss)
#   bench_ops.log  python benchmarks/bench_ops.py --quick --device cuda
#   sanitize.log   compute-sanitizer racecheck/memcheck of both grouping paths (best effort)
# --noconftest keeps tests/test_ops.py independent of the model fixtures in tests/conftest.py.
# GPU_CHECK_STEPS (default "build tests e2e bench sanitize") picks steps; the build always runs.
#
# $CXX without a shared libstdc++ (the device image's /opt/gcc/bin/g++ links it statically) gives
# the op a private libstdc++ whose iostreams segfault as soon as an error message formats a
# number; such a compiler is replaced by /usr/bin/g++ here.
set -uo pipefail
out="${OUT:-/tmp/knnlm_gpu_check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 KNNLM_REQUIRE_KERNEL=1 MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/knnlm_gpu_ext}"
py="${PYTHON:-python3}"
steps="${GPU_CHECK_STEPS:-build tests e2e bench sanitize}"
status=0
if [[ -n "${CXX:-}" && "$("$CXX" -print-file-name=libstdc++.so)" != /* && -x /usr/bin/g++ ]]; then
  echo "note: CXX=$CXX has no shared libstdc++; using CXX=/usr/bin/g++"
  export CXX=/usr/bin/g++
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nvcc --version | tail -n 1
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.device_count(), 'GPU(s)')"
} 2>&1 | tee "$out/env.log"

echo "== build" | tee "$out/build.log"
start=$(date +%s)
timeout 240 "$py" - <<'EOF' 2>&1 | tee -a "$out/build.log" || status=1
import logging, torch
logging.basicConfig(level=logging.INFO)
from knnlm import ops
assert ops.load_extension()
for name in ops.OP_NAMES:
    assert ops.get_op(name, torch.device("cuda")) is not None, name
print("built: CPU and CUDA kernels registered")
EOF
echo "build seconds: $(( $(date +%s) - start ))" | tee -a "$out/build.log"
# which compiler linked the op, and whether libstdc++ is shared (a toolchain that links it
# statically gives the op a private libstdc++ whose iostreams crash in error messages)
{
  echo "CXX=${CXX:-} CC=${CC:-}"
  grep -h "^cxx" "$TORCH_EXTENSIONS_DIR"/*/*/build.ninja
  ldd "$TORCH_EXTENSIONS_DIR"/*/*/knnlm_ops_*.so | grep -i "stdc++" || echo "WARNING: libstdc++ not linked dynamically"
} 2>&1 | tee -a "$out/build.log"

if [[ " $steps " == *" tests "* ]]; then
echo "== tests" | tee "$out/test_ops.log"
# -n 4 (pytest-xdist, when present): faster, and a crashing test takes down one worker, not the run
xdist=$("$py" -c "import xdist" 2>/dev/null && echo "-n 4")
timeout 200 "$py" -m pytest tests/test_ops.py -q -rfEs -p no:cacheprovider --noconftest $xdist 2>&1 \
  | tee -a "$out/test_ops.log" || status=1

fi

if [[ " $steps " == *" e2e "* ]]; then
echo "== end to end" | tee "$out/test_cuda.log"
timeout 300 "$py" -m pytest tests/test_cuda.py -q -rfEs -p no:cacheprovider 2>&1 | tee -a "$out/test_cuda.log" || status=1
fi

if [[ " $steps " == *" bench "* ]]; then
echo "== bench" | tee "$out/bench_ops.log"
for dtype in float32 bfloat16; do
  timeout 120 "$py" benchmarks/bench_ops.py --quick --device cuda --dtype "$dtype" 2>&1 | tee -a "$out/bench_ops.log" \
    || status=1
done

fi

if [[ " $steps " == *" sanitize "* ]] && command -v compute-sanitizer >/dev/null 2>&1; then
  cat > /tmp/knnlm_sanitize.py <<'EOF'
import torch
from knnlm import ops, scoring
op = ops.get_op("knn_interpolate", torch.device("cuda"))
g = torch.Generator().manual_seed(0)
for K, n_tok, V in ((300, 3, 4000), (2048, 3, 4000), (300, 3, 40000)):  # shared / global grouping; split rows
    x = torch.randn(2, V, generator=g).cuda()
    d = (torch.rand(2, K, generator=g) * 10).cuda()
    v = torch.randint(0, n_tok, (2, K), generator=g).cuda()
    out = op(x, d, v, 0.25, 2.0)
    torch.testing.assert_close(out, scoring.reference_interpolate(x, d, v, 0.25, 2.0), rtol=1e-5, atol=1e-5)
print("sanitized run ok")
EOF
  for tool in racecheck memcheck; do
    echo "== compute-sanitizer --tool $tool" | tee -a "$out/sanitize.log"
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 100 compute-sanitizer --tool "$tool" "$py" /tmp/knnlm_sanitize.py 2>&1 \
      | tail -n 20 | tee -a "$out/sanitize.log"
  done
fi
exit "$status"
