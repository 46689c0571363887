// Op schemas (declared once, here) and their CPU kernels: the fused kNN-LM interpolation and the
// few-row linear layer of speculative verification passes (CPU only).
// The CUDA kernels register themselves in knnlm/csrc/cuda/knnlm_cuda.cpp when built with CUDA.
// Fake (meta) kernels for torch.compile / opcheck are registered from Python in knnlm/ops.py.
#include <torch/library.h>

#include "cpu/interp_cpu.h"
#include "cpu/small_linear_cpu.h"

TORCH_LIBRARY(knnlm, m) {
  // logits [B, V] fp32/fp16/bf16, dists [B, K] fp32 (+inf = missing neighbour),
  // values [B, K] int64/int32 token ids in [0, V) -> log p [B, V] fp32.
  m.def("knn_interpolate(Tensor logits, Tensor dists, Tensor values, float lam, float temperature) -> Tensor");
  // x [M, K] fp32, weight [N, K] fp32, bias [N] fp32 or None -> x weight^T + bias [M, N] fp32;
  // CPUs with AVX-512F only (knnlm.cpu decides where it is used).
  m.def("small_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(knnlm, CPU, m) {
  m.impl("knn_interpolate", &knnlm::knn_interpolate_cpu);
  m.impl("small_linear", &knnlm::small_linear_cpu);
}
