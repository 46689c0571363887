// CUDA kernels of the fused kNN-LM interpolation: one block per row, warp-shuffle + shared-memory
// block reductions, coalesced row reads/writes, raw CUDA runtime only (no torch includes; the
// stream comes from the binding). The per-element math is csrc/interp.h, shared with the CPU.
//
// knn_interpolate, per row (block):
//   1. online max / sum-exp over the logits (one exp per element, fp32), block-reduced;
//   2. neighbour log-weights (block max / sum over K); duplicate values grouped by borrowing the
//      output row as a token -> smallest-neighbour-index map (atomicMin), member counts per group;
//   3. coalesced write of log p_lm + log(1 - lam) over the whole row (overwrites the borrowed map);
//   4. each group leader (smallest index) log-sum-exps its members and writes the mixed value.
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda/launch.h"
#include "interp.h"

namespace knnlm {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
static_assert(kWarps <= 32, "block reductions assume at most 32 warps");

struct LoadF32 {
  using T = float;
  __device__ __forceinline__ static float at(const T* p, int64_t i) { return p[i]; }
};
struct LoadF16 {
  using T = uint16_t;
  __device__ __forceinline__ static float at(const T* p, int64_t i) { return half_bits_to_float(p[i]); }
};
struct LoadBF16 {
  using T = uint16_t;
  __device__ __forceinline__ static float at(const T* p, int64_t i) { return bf16_bits_to_float(p[i]); }
};

__device__ __forceinline__ LseState warp_lse(LseState st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    LseState o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
    st = lse_merge(st, o);  // commutative: every lane ends with the same state
  }
  return st;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Block-wide reductions; every thread gets the result. Must be called by all threads.
__device__ LseState block_lse(LseState st, LseState* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  st = warp_lse(st);
  if (lane == 0) smem[warp] = st;
  __syncthreads();
  st = lane < kWarps ? smem[lane] : lse_empty();
  st = warp_lse(st);
  __syncthreads();  // smem may be reused right after
  return st;
}

__device__ float block_max(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_max(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < kWarps ? smem[lane] : neg_inf();
  v = warp_max(v);
  __syncthreads();
  return v;
}

__device__ float block_sum(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < kWarps ? smem[lane] : 0.0f;
  v = warp_sum(v);
  __syncthreads();
  return v;
}

// (row max, log sum exp(x - max)) of one row.
template <class L>
__device__ void row_stats(const typename L::T* __restrict__ x, int64_t V, LseState* smem,
                          float* row_max, float* log_sum) {
  LseState st = lse_empty();
  for (int64_t j = threadIdx.x; j < V; j += kThreads) lse_push(st, L::at(x, j));
  st = block_lse(st, smem);
  *row_max = st.m;
  *log_sum = st.s > 0.0f ? logf(st.s) : neg_inf();
}

// Neighbour scores -d/T into w[i]; returns the (block-uniform) max score.
__device__ float knn_scores(const float* __restrict__ d, int64_t K, float T, float* w, float* smem) {
  float smax = neg_inf();
  for (int64_t i = threadIdx.x; i < K; i += kThreads) {
    const float s = knn_score(d[i], T);
    if (w != nullptr) w[i] = s;
    smax = s > smax ? s : smax;
  }
  return block_max(smax, smem);
}

template <class L, typename Idx>
__global__ void __launch_bounds__(kThreads)
interpolate_kernel(const typename L::T* __restrict__ logits, const float* __restrict__ dists,
                   const Idx* __restrict__ values, float* out, float* w_scratch,
                   int32_t* idx_scratch, int64_t V, int64_t K, float T, MixParams p) {
  __shared__ LseState red_lse[kWarps];
  __shared__ float red[kWarps];
  const int64_t b = blockIdx.x;
  const typename L::T* __restrict__ x = logits + b * V;
  float* o = out + b * V;
  int32_t* slot = reinterpret_cast<int32_t*>(o);  // output row borrowed as token -> index map
  const float* d = dists + b * K;
  const Idx* v = values + b * K;
  float* w = w_scratch + b * K;
  int32_t* rep = idx_scratch + b * 2 * K;
  int32_t* cnt = rep + K;

  float row_max = 0.0f, log_sum = 0.0f;
  if (p.mode != kKnnOnly) row_stats<L>(x, V, red_lse, &row_max, &log_sum);

  bool knn = p.mode != kLmOnly && K > 0;
  if (knn) {
    const float smax = knn_scores(d, K, T, w, red);
    knn = smax != neg_inf();  // block-uniform: no kNN mass when every distance is +inf
    if (knn) {
      float ssum = 0.0f;
      for (int64_t i = threadIdx.x; i < K; i += kThreads) ssum += exp_nonpos(w[i] - smax);
      ssum = block_sum(ssum, red);
      const float lse = smax + logf(ssum);
      for (int64_t i = threadIdx.x; i < K; i += kThreads) {
        w[i] -= lse;
        slot[v[i]] = 0x7fffffff;
        cnt[i] = 0;
      }
      __syncthreads();
      for (int64_t i = threadIdx.x; i < K; i += kThreads) atomicMin(&slot[v[i]], (int32_t)i);
      __syncthreads();
      for (int64_t i = threadIdx.x; i < K; i += kThreads) {
        const int32_t r = slot[v[i]];
        rep[i] = r;
        atomicAdd(&cnt[r], 1);
      }
      __syncthreads();  // all map reads done before the row is overwritten
    }
  }

  if (p.mode == kKnnOnly) {
    for (int64_t j = threadIdx.x; j < V; j += kThreads) o[j] = neg_inf();
  } else {
    for (int64_t j = threadIdx.x; j < V; j += kThreads)
      o[j] = mix_no_knn(lm_log_prob(L::at(x, j), row_max, log_sum), p);
  }
  if (!knn) return;
  __syncthreads();  // base row written before the neighbour tokens are overwritten

  for (int64_t i = threadIdx.x; i < K; i += kThreads) {
    if (rep[i] != i) continue;  // not the group leader (smallest index of its token)
    const int32_t n = cnt[i];
    // members are the j >= i with rep[j] == i; stop once all n are seen (deterministic order)
    float gmax = w[i];
    for (int64_t j = i + 1, seen = 1; seen < n; ++j) {
      if (rep[j] == i) {
        gmax = w[j] > gmax ? w[j] : gmax;
        ++seen;
      }
    }
    float gsum = 0.0f;
    if (gmax != neg_inf()) {
      for (int64_t j = i, seen = 0; seen < n; ++j) {
        if (rep[j] == i) {
          gsum += exp_nonpos(w[j] - gmax);
          ++seen;
        }
      }
    }
    const int64_t tok = static_cast<int64_t>(v[i]);
    const float lp_lm = p.mode == kKnnOnly ? neg_inf() : lm_log_prob(L::at(x, tok), row_max, log_sum);
    o[tok] = mix_value(lp_lm, group_log_mass(gmax, gsum), p);
  }
}

template <class L, typename Idx, typename Tdx>
__global__ void __launch_bounds__(kThreads)
interpolate_target_kernel(const typename L::T* __restrict__ logits, const float* __restrict__ dists,
                          const Idx* __restrict__ values, const Tdx* __restrict__ target,
                          float* __restrict__ out, int64_t V, int64_t K, float T, MixParams p) {
  __shared__ LseState red_lse[kWarps];
  __shared__ float red[kWarps];
  const int64_t b = blockIdx.x;
  const typename L::T* __restrict__ x = logits + b * V;
  const float* d = dists + b * K;
  const Idx* v = values + b * K;
  const int64_t t = static_cast<int64_t>(target[b]);

  float row_max = 0.0f, log_sum = 0.0f;
  if (p.mode != kKnnOnly) row_stats<L>(x, V, red_lse, &row_max, &log_sum);

  float lp_knn = neg_inf();
  if (p.mode != kLmOnly && K > 0) {
    const float smax = knn_scores(d, K, T, nullptr, red);
    if (smax != neg_inf()) {
      float ssum = 0.0f;
      for (int64_t i = threadIdx.x; i < K; i += kThreads) ssum += exp_nonpos(knn_score(d[i], T) - smax);
      ssum = block_sum(ssum, red);
      const float lse = smax + logf(ssum);
      // the target's group: neighbours voting for it
      float gmax = neg_inf();
      for (int64_t i = threadIdx.x; i < K; i += kThreads) {
        if (static_cast<int64_t>(v[i]) == t) {
          const float wi = knn_score(d[i], T) - lse;
          gmax = wi > gmax ? wi : gmax;
        }
      }
      gmax = block_max(gmax, red);
      if (gmax != neg_inf()) {
        float gsum = 0.0f;
        for (int64_t i = threadIdx.x; i < K; i += kThreads)
          if (static_cast<int64_t>(v[i]) == t) gsum += exp_nonpos((knn_score(d[i], T) - lse) - gmax);
        gsum = block_sum(gsum, red);
        lp_knn = group_log_mass(gmax, gsum);
      }
    }
  }
  if (threadIdx.x == 0) {
    const float lp_lm = p.mode == kKnnOnly ? neg_inf() : lm_log_prob(L::at(x, t), row_max, log_sum);
    out[b] = mix_value(lp_lm, lp_knn, p);
  }
}

template <class L, typename Idx>
void launch_full(const void* logits, const float* dists, const void* values, float* out, float* w,
                 int32_t* idx, int64_t B, int64_t V, int64_t K, float T, MixParams p,
                 cudaStream_t stream) {
  interpolate_kernel<L, Idx><<<static_cast<unsigned int>(B), kThreads, 0, stream>>>(
      static_cast<const typename L::T*>(logits), dists, static_cast<const Idx*>(values), out, w, idx,
      V, K, T, p);
}

template <class L, typename Idx, typename Tdx>
void launch_target(const void* logits, const float* dists, const void* values, const void* target,
                   float* out, int64_t B, int64_t V, int64_t K, float T, MixParams p,
                   cudaStream_t stream) {
  interpolate_target_kernel<L, Idx, Tdx><<<static_cast<unsigned int>(B), kThreads, 0, stream>>>(
      static_cast<const typename L::T*>(logits), dists, static_cast<const Idx*>(values),
      static_cast<const Tdx*>(target), out, V, K, T, p);
}

template <class F>
cudaError_t dispatch_dtype(LogitsDtype dtype, const F& f) {
  switch (dtype) {
    case kLogitsF32: f(LoadF32{}); break;
    case kLogitsF16: f(LoadF16{}); break;
    case kLogitsBF16: f(LoadBF16{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_knn_interpolate(const void* logits, LogitsDtype dtype, const float* dists,
                                   const void* values, bool values_i64, float* out,
                                   float* w_scratch, int32_t* idx_scratch, int64_t B, int64_t V,
                                   int64_t K, double lam, double temperature, cudaStream_t stream) {
  if (B == 0 || V == 0) return cudaSuccess;
  const MixParams p = make_mix(lam);
  const float T = static_cast<float>(temperature);
  return dispatch_dtype(dtype, [&](auto ld) {
    using L = decltype(ld);
    if (values_i64)
      launch_full<L, int64_t>(logits, dists, values, out, w_scratch, idx_scratch, B, V, K, T, p, stream);
    else
      launch_full<L, int32_t>(logits, dists, values, out, w_scratch, idx_scratch, B, V, K, T, p, stream);
  });
}

cudaError_t launch_knn_interpolate_target(const void* logits, LogitsDtype dtype, const float* dists,
                                          const void* values, bool values_i64, const void* target,
                                          bool target_i64, float* out, int64_t B, int64_t V,
                                          int64_t K, double lam, double temperature,
                                          cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  const MixParams p = make_mix(lam);
  const float T = static_cast<float>(temperature);
  return dispatch_dtype(dtype, [&](auto ld) {
    using L = decltype(ld);
    if (values_i64 && target_i64)
      launch_target<L, int64_t, int64_t>(logits, dists, values, target, out, B, V, K, T, p, stream);
    else if (values_i64)
      launch_target<L, int64_t, int32_t>(logits, dists, values, target, out, B, V, K, T, p, stream);
    else if (target_i64)
      launch_target<L, int32_t, int64_t>(logits, dists, values, target, out, B, V, K, T, p, stream);
    else
      launch_target<L, int32_t, int32_t>(logits, dists, values, target, out, B, V, K, T, p, stream);
  });
}

}  // namespace cuda
}  // namespace knnlm
