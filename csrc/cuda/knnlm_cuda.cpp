// CUDA registration of the knnlm ops (schemas in csrc/knnlm.cpp). Compiled only when torch has
// CUDA and nvcc is present (see knnlm/ops.py): validates inputs, allocates the output and the
// small [B, K] scratch with torch, and calls the torch-free launchers of interp_kernels.cu on the
// current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

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
  TORCH_CHECK(K < std::numeric_limits<int32_t>::max() && V < std::numeric_limits<int32_t>::max(),
              "knnlm: K and V must be < 2^31 on CUDA");
  check_index_range(values, V, "values");  // device -> host sync; the kernel trusts the range
  at::Tensor out = at::empty({B, V}, logits.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  at::Tensor w = at::empty({B, K}, dists.options());
  at::Tensor idx = at::empty({B, 2 * K}, values.options().dtype(at::kInt));
  check_launch(cuda::launch_knn_interpolate(
      logits.const_data_ptr(), logits_dtype(logits), dists.const_data_ptr<float>(),
      values.const_data_ptr(), values.scalar_type() == at::kLong, out.mutable_data_ptr<float>(),
      w.mutable_data_ptr<float>(), idx.mutable_data_ptr<int32_t>(), B, V, K, lam, temperature,
      c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

at::Tensor knn_interpolate_target_cuda(const at::Tensor& logits_in, const at::Tensor& dists_in,
                                       const at::Tensor& values_in, const at::Tensor& target_in,
                                       double lam, double temperature) {
  check_inputs(logits_in, dists_in, values_in, lam, temperature);
  check_target(logits_in, target_in);
  TORCH_CHECK(logits_in.is_cuda(), "knnlm: CUDA kernel got a ", logits_in.device(), " tensor");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous(), dists = dists_in.contiguous(),
                   values = values_in.contiguous(), target = target_in.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1), K = dists.size(1);
  at::Tensor out = at::empty({B}, logits.options().dtype(at::kFloat));
  if (B == 0) return out;
  TORCH_CHECK(V > 0, "knnlm: empty vocabulary (V = 0)");
  check_index_range(values, V, "values");
  check_index_range(target, V, "target");
  check_launch(cuda::launch_knn_interpolate_target(
      logits.const_data_ptr(), logits_dtype(logits), dists.const_data_ptr<float>(),
      values.const_data_ptr(), values.scalar_type() == at::kLong, target.const_data_ptr(),
      target.scalar_type() == at::kLong, out.mutable_data_ptr<float>(), B, V, K, lam, temperature,
      c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

}  // namespace
}  // namespace knnlm

TORCH_LIBRARY_IMPL(knnlm, CUDA, m) {
  m.impl("knn_interpolate", &knnlm::knn_interpolate_cuda);
  m.impl("knn_interpolate_target", &knnlm::knn_interpolate_target_cuda);
}
