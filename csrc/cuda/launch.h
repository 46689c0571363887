// Host-side launchers of the CUDA kernels (csrc/cuda/interp_kernels.cu). Torch-free on purpose:
// the .cu files are compiled by plain nvcc (see .ci/check_cuda.sh); the torch binding in
// csrc/cuda/knnlm_cuda.cpp validates inputs, allocates, and passes the current stream in.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace knnlm {
namespace cuda {

enum LogitsDtype : int { kLogitsF32 = 0, kLogitsF16 = 1, kLogitsBF16 = 2 };

// logits [B, V] (dtype), dists [B, K] fp32, values [B, K] (int64 if values_i64 else int32, already
// validated to lie in [0, V)), out [B, V] fp32. Scratch: w [B, K] fp32, idx [B, 2K] int32.
// Returns the launch status (cudaGetLastError()).
cudaError_t launch_knn_interpolate(const void* logits, LogitsDtype dtype, const float* dists,
                                   const void* values, bool values_i64, float* out,
                                   float* w_scratch, int32_t* idx_scratch, int64_t B, int64_t V,
                                   int64_t K, double lam, double temperature, cudaStream_t stream);

// Same inputs plus target [B] (int64 if target_i64 else int32, validated); out [B] fp32.
cudaError_t launch_knn_interpolate_target(const void* logits, LogitsDtype dtype, const float* dists,
                                          const void* values, bool values_i64, const void* target,
                                          bool target_i64, float* out, int64_t B, int64_t V,
                                          int64_t K, double lam, double temperature,
                                          cudaStream_t stream);

}  // namespace cuda
}  // namespace knnlm
