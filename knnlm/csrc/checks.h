// Input validation shared by the CPU and CUDA bindings (torch-dependent; not included by .cu).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace knnlm {

inline void check_mixture(double lam, double temperature) {
  TORCH_CHECK(lam >= 0.0 && lam <= 1.0, "knnlm: lam must be in [0, 1], got ", lam);
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature),
              "knnlm: temperature must be a positive finite number, got ", temperature);
}

inline bool is_index_dtype(at::ScalarType t) { return t == at::kLong || t == at::kInt; }

// logits [B, V] fp32/fp16/bf16, dists [B, K] fp32, values [B, K] int64/int32, all on one device.
inline void check_inputs(const at::Tensor& logits, const at::Tensor& dists, const at::Tensor& values,
                         double lam, double temperature) {
  check_mixture(lam, temperature);
  TORCH_CHECK(logits.dim() == 2, "knnlm: logits must be 2-D [B, V], got shape ", logits.sizes());
  TORCH_CHECK(dists.dim() == 2, "knnlm: dists must be 2-D [B, K], got shape ", dists.sizes());
  TORCH_CHECK(values.sizes() == dists.sizes(), "knnlm: values must have the shape of dists ",
              dists.sizes(), ", got ", values.sizes());
  TORCH_CHECK(dists.size(0) == logits.size(0), "knnlm: dists/values have ", dists.size(0),
              " rows but logits has ", logits.size(0));
  const auto lt = logits.scalar_type();
  TORCH_CHECK(lt == at::kFloat || lt == at::kHalf || lt == at::kBFloat16,
              "knnlm: logits must be float32, float16 or bfloat16, got ", lt);
  TORCH_CHECK(dists.scalar_type() == at::kFloat, "knnlm: dists must be float32, got ",
              dists.scalar_type(), " (call .float())");
  TORCH_CHECK(is_index_dtype(values.scalar_type()), "knnlm: values must be int64 or int32, got ",
              values.scalar_type());
  TORCH_CHECK(dists.device() == logits.device() && values.device() == logits.device(),
              "knnlm: logits, dists and values must be on one device, got ", logits.device(), ", ",
              dists.device(), ", ", values.device());
  TORCH_CHECK(logits.size(0) == 0 || logits.size(1) > 0 || dists.size(1) == 0,
              "knnlm: empty vocabulary (V = 0) with neighbours");
}

// Range check with torch ops: two device -> host syncs. Used by the CUDA binding only under
// KNNLM_CUDA_CHECKS=1 (the CUDA kernels check in-kernel; the CPU kernel checks while it reads).
inline void check_index_range(const at::Tensor& idx, int64_t V, const char* what) {
  if (idx.numel() == 0) return;
  auto mm = at::aminmax(idx);
  const int64_t lo = std::get<0>(mm).item<int64_t>();
  const int64_t hi = std::get<1>(mm).item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < V, "knnlm: ", what, " must be token ids in [0, V) with V = ", V,
              ", got values in [", lo, ", ", hi, "]");
}

}  // namespace knnlm
