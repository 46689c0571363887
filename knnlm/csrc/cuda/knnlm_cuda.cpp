// CUDA registration of the knnlm ops (schemas in knnlm/csrc/knnlm.cpp). Compiled only when torch
// has CUDA and nvcc is present (see knnlm/ops.py): validates shapes / dtypes / devices (host-side
// metadata only), allocates the output and any grouping scratch with torch, and calls the
// torch-free launchers of interp_kernels.cu on the current stream.
//
// No host synchronisation (CUDA-graph capturable): the token-id range is checked in the kernels,
// which write NaN for a row with an id outside [0, V). KNNLM_CUDA_CHECKS=1 adds host-side range
// checks (two .item() syncs per tensor) that raise the CPU kernel's error instead; for debugging.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>

#include "checks.h"
#include "cuda/launch.h"

namespace knnlm {
namespace {

cuda::LogitsDtype logits_dtype(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat: return cuda::kLogitsF32;
    case at::kHalf: return cuda::kLogitsF16;
    case at::kBFloat16: return cuda::kLogitsBF16;
    default: TORCH_CHECK(false, "knnlm: unsupported logits dtype ", logits.scalar_type());
  }
}

// KNNLM_CUDA_CHECKS set to anything but "", 0, false, no: synchronous range checks that raise.
bool sync_checks() {
  const char* env = std::getenv("KNNLM_CUDA_CHECKS");
  if (env == nullptr || env[0] == '\0') return false;
  return std::strcmp(env, "0") != 0 && std::strcmp(env, "false") != 0 && std::strcmp(env, "no") != 0;
}

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "knnlm: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor knn_interpolate_cuda(const at::Tensor& logits_in, const at::Tensor& dists_in,
                                const at::Tensor& values_in, double lam, double temperature) {
  check_inputs(logits_in, dists_in, values_in, lam, temperature);
  TORCH_CHECK(logits_in.is_cuda(), "knnlm: CUDA kernel got a ", logits_in.device(), " tensor");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous(), dists = dists_in.contiguous(),
                   values = values_in.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1), K = dists.size(1);
  TORCH_CHECK(K <= cuda::kMaxNeighbours && V < std::numeric_limits<int32_t>::max(),
              "knnlm: K must be <= 2^30 and V < 2^31 on CUDA");
  if (sync_checks()) check_index_range(values, V, "values");  // debug only: host syncs
  at::Tensor out = at::empty({B, V}, logits.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const int64_t scratch_bytes = cuda::knn_interpolate_scratch_bytes(B, V, K, lam);
  at::Tensor scratch;
  if (scratch_bytes > 0) scratch = at::empty({scratch_bytes}, logits.options().dtype(at::kByte));
  check_launch(cuda::launch_knn_interpolate(
      logits.const_data_ptr(), logits_dtype(logits), dists.const_data_ptr<float>(),
      values.const_data_ptr(), values.scalar_type() == at::kLong, out.mutable_data_ptr<float>(),
      scratch_bytes > 0 ? scratch.mutable_data_ptr() : nullptr, B, V, K, lam, temperature,
      c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

}  // namespace
}  // namespace knnlm

TORCH_LIBRARY_IMPL(knnlm, CUDA, m) {
  m.impl("knn_interpolate", &knnlm::knn_interpolate_cuda);
}
