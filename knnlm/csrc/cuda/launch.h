// Host-side launchers of the CUDA kernels (knnlm/csrc/cuda/interp_kernels.cu). Torch-free on
// purpose: the .cu files are compiled by plain nvcc (see .ci/check_cuda.sh); the torch binding in
// knnlm/csrc/cuda/knnlm_cuda.cpp validates shapes/dtypes, allocates, and passes the current stream.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace knnlm {
namespace cuda {

enum LogitsDtype : int { kLogitsF32 = 0, kLogitsF16 = 1, kLogitsBF16 = 2 };

// Most neighbours per row (the grouping keys hold the neighbour index in 32 bits and the sort
// pads K to a power of two that must fit an int).
constexpr int64_t kMaxNeighbours = int64_t{1} << 30;

// Bytes of global scratch launch_knn_interpolate needs on the current device: the grouping's
// when it does not fit in shared memory (K > 1024 and lam > 0), plus 8 bytes per block of a split
// row (few long rows: each row's chunks are reduced by several blocks). 0 when neither applies.
int64_t knn_interpolate_scratch_bytes(int64_t B, int64_t V, int64_t K, double lam);

// logits [B, V] (dtype), dists [B, K] fp32, values [B, K] (int64 if values_i64 else int32), out
// [B, V] fp32, scratch: knn_interpolate_scratch_bytes(B, V, K, lam) bytes (may be null when 0),
// asked for on the same current device.
// Never synchronises with the host: a row with a value outside [0, V) is written as NaN.
// Returns the launch status (cudaGetLastError()).
cudaError_t launch_knn_interpolate(const void* logits, LogitsDtype dtype, const float* dists,
                                   const void* values, bool values_i64, float* out, void* scratch,
                                   int64_t B, int64_t V, int64_t K, double lam, double temperature,
                                   cudaStream_t stream);

}  // namespace cuda
}  // namespace knnlm
