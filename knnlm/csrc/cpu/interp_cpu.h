// CPU kernels of the fused kNN-LM interpolation (implemented in interp_cpu.cpp).
#pragma once

#include <ATen/ATen.h>

namespace knnlm {

at::Tensor knn_interpolate_cpu(const at::Tensor& logits, const at::Tensor& dists,
                               const at::Tensor& values, double lam, double temperature);

}  // namespace knnlm
