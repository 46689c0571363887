// CPU kernel of the few-row linear layer (implemented in small_linear_cpu.cpp).
#pragma once

#include <ATen/ATen.h>

namespace knnlm {

at::Tensor small_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

}  // namespace knnlm
