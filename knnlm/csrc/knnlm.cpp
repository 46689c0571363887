// Op schemas of the fused kNN-LM interpolation (declared once, here) and their CPU kernels.
// The CUDA kernels register themselves in knnlm/csrc/cuda/knnlm_cuda.cpp when built with CUDA.
// Fake (meta) kernels for torch.compile / opcheck are registered from Python in knnlm/ops.py.
#include <torch/library.h>

#include "cpu/interp_cpu.h"

TORCH_LIBRARY(knnlm, m) {
  // logits [B, V] fp32/fp16/bf16, dists [B, K] fp32 (+inf = missing neighbour),
  // values [B, K] int64/int32 token ids in [0, V) -> log p [B, V] fp32.
  m.def("knn_interpolate(Tensor logits, Tensor dists, Tensor values, float lam, float temperature) -> Tensor");
}

TORCH_LIBRARY_IMPL(knnlm, CPU, m) {
  m.impl("knn_interpolate", &knnlm::knn_interpolate_cpu);
}
