// CUDA kernels of the fused kNN-LM interpolation: one block per row (several for few long rows),
// warp-shuffle + shared-memory block reductions, coalesced row reads/writes, raw CUDA runtime only
// (no torch includes; the stream comes from the binding). The per-element math is
// knnlm/csrc/interp.h, shared with the CPU.
//
// knn_interpolate, per row (block):
//   0. validate the row's token ids in-kernel (no host sync): ids outside [0, V) -> NaN row;
//   1. online max / sum-exp over the logits (one exp per element, fp32), block-reduced;
//   2. neighbour scores: block max / sum over K, NaN / -inf distance -> NaN row;
//   3. duplicate tokens grouped in parallel: keys (token << 32 | neighbour index) sorted with a
//      block-wide bitonic sort, then a segmented inclusive scan (Hillis-Steele, log2 K steps) of
//      online log-sum-exp states over the sorted order: the last element of each run of equal
//      tokens holds its group's log-mass. Deterministic (fixed comparator network and scan tree),
//      O(K log^2 K / threads) whatever the duplication. In shared memory for K <= 1024, else in
//      a [B, pow2(K)] global scratch from the binding;
//   4. coalesced write of log p_lm + log(1 - lam) over the whole row;
//   5. each group's last element writes the mixed value at its token.
//
// Few long rows (B blocks would leave most SMs idle: B < 4 x SMs, V >= 2 x kMinSplitChunk) split
// each row over S blocks (row_splits) in three launches on the stream: row_partial_kernel
// writes the online max / sum-exp state of each of the S chunks to scratch; base_row_kernel
// merges the row's S states and writes step 4 over its chunk; interpolate_kernel then runs with
// the merged states instead of steps 1 and 4 (steps 0, 2, 3, 5, and a NaN row overwrites the
// base row). Stream order makes the last launch see the base row.
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

// Grouping scratch per padded neighbour: the sort key and two scan buffers.
constexpr int64_t kGroupBytes = sizeof(uint64_t) + 2 * sizeof(LseState);
constexpr int64_t kSharedGroupCap = 1024;  // pow2(K) up to this: in dynamic shared memory (24 KiB)
constexpr uint64_t kPadKey = ~uint64_t{0};  // sorts after every real key (tokens are < 2^31)
constexpr int64_t kMinSplitChunk = 8192;  // fewest logits per block when a row is split (16 per thread)
constexpr int64_t kMaxSplits = 1024;
constexpr int64_t kBlocksPerSm = 4;  // 512-thread blocks: 4 fill an SM's 2048 threads

// Blocks per row of the full op: 1 when B rows already fill the GPU or rows are short, else
// enough to put about kBlocksPerSm blocks on every SM of the current device.
int64_t row_splits(int64_t B, int64_t V) {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    (void)cudaGetLastError();  // not a launch error: fall back to one block per row
    return 1;
  }
  const int64_t want = (kBlocksPerSm * sms + B - 1) / B;
  int64_t s = want < V / kMinSplitChunk ? want : V / kMinSplitChunk;
  s = s < kMaxSplits ? s : kMaxSplits;
  return s < 2 ? 1 : s;
}

int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }

int64_t group_pad(int64_t K) {
  int64_t n = 1;
  while (n < K) n <<= 1;
  return n;
}

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

// Online (max, sum exp(x - max)) state of x[begin, end), block-reduced.
template <class L>
__device__ LseState range_lse(const typename L::T* __restrict__ x, int64_t begin, int64_t end, LseState* smem) {
  LseState st = lse_empty();
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) lse_push(st, L::at(x, j));
  return block_lse(st, smem);
}

__device__ __forceinline__ void set_stats(LseState st, float* row_max, float* log_sum) {
  *row_max = st.m;
  *log_sum = lse_log_sum(st);  // -inf for an all -inf row (NaN output), NaN after a NaN / +inf
}

// (row max, log sum exp(x - max)) of one row.
template <class L>
__device__ void row_stats(const typename L::T* __restrict__ x, int64_t V, LseState* smem,
                          float* row_max, float* log_sum) {
  set_stats(range_lse<L>(x, 0, V, smem), row_max, log_sum);
}

// The same from a split row's S chunk states.
__device__ void merged_stats(const LseState* __restrict__ part, int64_t S, LseState* smem, float* row_max,
                             float* log_sum) {
  LseState st = lse_empty();
  for (int64_t i = threadIdx.x; i < S; i += kThreads) st = lse_merge(st, part[i]);
  set_stats(block_lse(st, smem), row_max, log_sum);
}

// Kind of the row's neighbour scores -d/T (block-uniform) and, for kKnnOk, the log-sum-exp of
// the scores (the log softmax normaliser).
__device__ KnnRow knn_row(const float* __restrict__ d, int64_t K, float T, float* smem,
                          float* lse) {
  float smax = neg_inf();
  int any_nan = 0;
  for (int64_t i = threadIdx.x; i < K; i += kThreads) {
    const float s = knn_score(d[i], T);
    smax = s > smax ? s : smax;  // NaN scores are skipped here and flagged
    any_nan |= is_nan(s);
  }
  any_nan = __syncthreads_or(any_nan);
  smax = block_max(smax, smem);
  const KnnRow kind = knn_row_kind(smax, any_nan != 0);
  if (kind == kKnnOk) {
    float ssum = 0.0f;
    for (int64_t i = threadIdx.x; i < K; i += kThreads) ssum += exp_nonpos(knn_score(d[i], T) - smax);
    ssum = block_sum(ssum, smem);
    *lse = smax + logf(ssum);
  }
  return kind;
}

// True (block-uniform) when an id of idx[0, n) lies outside [0, V). Reads n ids, no host sync.
template <typename Idx>
__device__ bool block_any_out_of_range(const Idx* __restrict__ idx, int64_t n, int64_t V) {
  int bad = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const int64_t t = static_cast<int64_t>(idx[i]);
    bad |= (t < 0) | (t >= V);
  }
  return __syncthreads_or(bad) != 0;
}

__device__ void fill_row(float* o, int64_t V, float value) {
  for (int64_t j = threadIdx.x; j < V; j += kThreads) o[j] = value;
}

// Step 4 over o[begin, end): log p_lm + log(1 - lam), or -inf everywhere for lam = 1 (kKnnOnly).
template <class L>
__device__ void write_base(const typename L::T* __restrict__ x, float* o, int64_t begin, int64_t end,
                           float row_max, float log_sum, MixParams p) {
  if (p.mode == kKnnOnly) {
    for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) o[j] = neg_inf();
    return;
  }
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads)
    o[j] = mix_no_knn(lm_log_prob(L::at(x, j), row_max, log_sum), p);
}

// [begin, end) of chunk s of a row of V logits split into chunks of ``chunk``.
__device__ __forceinline__ void chunk_range(int64_t s, int64_t chunk, int64_t V, int64_t* begin, int64_t* end) {
  *begin = s * chunk;
  *end = *begin + chunk < V ? *begin + chunk : V;
}

// Block-wide ascending bitonic sort of key[0, n), n a power of two. Each compare-exchange pair
// (i, i + j) with bit j of i clear is handled by one thread; the keys are unique.
__device__ void block_bitonic_sort(uint64_t* key, int n) {
  for (int k = 2; k <= n; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int t = threadIdx.x; t < n / 2; t += kThreads) {
        const int i = 2 * j * (t / j) + (t % j);
        const int l = i + j;
        const uint64_t a = key[i], c = key[l];
        if ((a > c) == ((i & k) == 0)) {
          key[i] = c;
          key[l] = a;
        }
      }
      __syncthreads();
    }
  }
}

__device__ __forceinline__ uint32_t key_token(uint64_t key) { return static_cast<uint32_t>(key >> 32); }
__device__ __forceinline__ uint32_t key_index(uint64_t key) { return static_cast<uint32_t>(key); }

// Segmented inclusive scan of online log-sum-exp states over the sorted keys: after it, element
// p holds the merge of the elements of its run of equal tokens up to p, so a run's last element
// holds the whole group. Hillis-Steele with double buffering (a -> b, swap), log2(n) steps: at
// step d, p merges p - d in when both hold the same token (sorted: the run covers p - d .. p).
// Returns the buffer with the result.
__device__ LseState* segmented_lse_scan(const uint64_t* key, LseState* a, LseState* b, int n) {
  for (int d = 1; d < n; d <<= 1) {
    for (int i = threadIdx.x; i < n; i += kThreads) {
      LseState st = a[i];
      if (i >= d && key_token(key[i - d]) == key_token(key[i])) st = lse_merge(a[i - d], st);
      b[i] = st;
    }
    __syncthreads();
    LseState* tmp = a;
    a = b;
    b = tmp;
  }
  return a;
}

template <class L, typename Idx>
__global__ void __launch_bounds__(kThreads)
interpolate_kernel(const typename L::T* __restrict__ logits, const float* __restrict__ dists,
                   const Idx* __restrict__ values, float* __restrict__ out,
                   unsigned char* __restrict__ group_scratch, int64_t V, int K, int Kp, float T,
                   MixParams p, const LseState* __restrict__ partial, int64_t S) {
  extern __shared__ uint64_t group_smem[];
  __shared__ LseState red_lse[kWarps];
  __shared__ float red[kWarps];
  const int64_t b = blockIdx.x;
  const typename L::T* __restrict__ x = logits + b * V;
  float* o = out + b * V;
  const float* d = dists + b * K;
  const Idx* v = values + b * K;

  // Token ids outside [0, V): the row is NaN (checked here, not on the host: no sync).
  if (block_any_out_of_range(v, K, V)) {
    fill_row(o, V, quiet_nan());
    return;
  }

  // partial != null: a split row, whose base row base_row_kernel has written
  float row_max = 0.0f, log_sum = 0.0f;
  if (p.mode != kKnnOnly) {
    if (partial != nullptr)
      merged_stats(partial + b * S, S, red_lse, &row_max, &log_sum);
    else
      row_stats<L>(x, V, red_lse, &row_max, &log_sum);
  }

  float lse = 0.0f;
  const KnnRow kind = p.mode != kLmOnly && K > 0 ? knn_row(d, K, T, red, &lse) : kKnnNone;
  if (kind == kKnnNan) {  // log p_knn = NaN at every token and lam > 0: the whole row is NaN
    fill_row(o, V, quiet_nan());
    return;
  }

  const uint64_t* key = nullptr;
  const LseState* group = nullptr;
  if (kind == kKnnOk) {
    unsigned char* base = Kp <= kSharedGroupCap
                              ? reinterpret_cast<unsigned char*>(group_smem)
                              : group_scratch + b * static_cast<int64_t>(Kp) * kGroupBytes;
    uint64_t* k = reinterpret_cast<uint64_t*>(base);
    LseState* sa = reinterpret_cast<LseState*>(k + Kp);
    LseState* sb = sa + Kp;
    for (int i = threadIdx.x; i < Kp; i += kThreads)
      k[i] = i < K ? (static_cast<uint64_t>(static_cast<uint32_t>(v[i])) << 32) | static_cast<uint32_t>(i)
                   : kPadKey;
    __syncthreads();
    block_bitonic_sort(k, Kp);
    for (int i = threadIdx.x; i < K; i += kThreads) {
      LseState st = lse_empty();
      lse_push(st, knn_score(d[key_index(k[i])], T) - lse);  // +inf distance: stays empty
      sa[i] = st;
    }
    __syncthreads();
    group = segmented_lse_scan(k, sa, sb, K);
    key = k;
  }

  if (partial == nullptr) write_base<L>(x, o, 0, V, row_max, log_sum, p);
  if (kind != kKnnOk) return;
  __syncthreads();  // base row written before the neighbour tokens are overwritten

  for (int i = threadIdx.x; i < K; i += kThreads) {
    const uint32_t tok = key_token(key[i]);
    if (i + 1 < K && key_token(key[i + 1]) == tok) continue;  // not the last of its group
    const float lp_lm = p.mode == kKnnOnly ? neg_inf() : lm_log_prob(L::at(x, tok), row_max, log_sum);
    o[tok] = mix_value(lp_lm, group_log_mass(group[i]), p);
  }
}

// Split rows, launch 1 of 3: block (s, b) writes the state of chunk s of row b to partial[b * S + s].
template <class L>
__global__ void __launch_bounds__(kThreads)
row_partial_kernel(const typename L::T* __restrict__ logits, LseState* __restrict__ partial, int64_t V,
                   int64_t chunk, int64_t S) {
  __shared__ LseState red_lse[kWarps];
  const int64_t b = blockIdx.y, s = blockIdx.x;
  int64_t begin, end;
  chunk_range(s, chunk, V, &begin, &end);
  const LseState st = range_lse<L>(logits + b * V, begin, end, red_lse);
  if (threadIdx.x == 0) partial[b * S + s] = st;
}

// Split rows, launch 2 of 3: block (s, b) writes log p_lm + log(1 - lam) (-inf for lam = 1) over
// chunk s of row b, from the row's merged chunk states.
template <class L>
__global__ void __launch_bounds__(kThreads)
base_row_kernel(const typename L::T* __restrict__ logits, const LseState* __restrict__ partial,
                float* __restrict__ out, int64_t V, int64_t chunk, int64_t S, MixParams p) {
  __shared__ LseState red_lse[kWarps];
  const int64_t b = blockIdx.y, s = blockIdx.x;
  int64_t begin, end;
  chunk_range(s, chunk, V, &begin, &end);
  float row_max = 0.0f, log_sum = 0.0f;
  if (p.mode != kKnnOnly) merged_stats(partial + b * S, S, red_lse, &row_max, &log_sum);
  write_base<L>(logits + b * V, out + b * V, begin, end, row_max, log_sum, p);
}

// Bytes of the grouping scratch (before the split-row states in the same buffer).
int64_t group_scratch_bytes(int64_t B, int64_t K, double lam) {
  const int64_t Kp = group_pad(K);
  if (lam == 0.0 || K == 0 || Kp <= kSharedGroupCap) return 0;
  return B * Kp * kGroupBytes;
}

template <class L, typename Idx>
void launch_full(const void* logits, const float* dists, const void* values, float* out,
                 void* scratch, int64_t B, int64_t V, int64_t K, float T, MixParams p, double lam,
                 cudaStream_t stream) {
  const int64_t Kp = group_pad(K);
  const size_t smem = p.mode != kLmOnly && Kp <= kSharedGroupCap ? static_cast<size_t>(Kp * kGroupBytes) : 0;
  const typename L::T* x = static_cast<const typename L::T*>(logits);
  const int64_t S = row_splits(B, V);
  LseState* partial = nullptr;
  if (S > 1) {
    partial = reinterpret_cast<LseState*>(static_cast<unsigned char*>(scratch) +
                                          align16(group_scratch_bytes(B, K, lam)));
    const int64_t chunk = (V + S - 1) / S;
    const dim3 grid(static_cast<unsigned int>(S), static_cast<unsigned int>(B));
    if (p.mode != kKnnOnly) row_partial_kernel<L><<<grid, kThreads, 0, stream>>>(x, partial, V, chunk, S);
    base_row_kernel<L><<<grid, kThreads, 0, stream>>>(x, partial, out, V, chunk, S, p);
  }
  interpolate_kernel<L, Idx><<<static_cast<unsigned int>(B), kThreads, smem, stream>>>(
      x, dists, static_cast<const Idx*>(values), out, static_cast<unsigned char*>(scratch), V,
      static_cast<int>(K), static_cast<int>(Kp), T, p, partial, S);
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

int64_t knn_interpolate_scratch_bytes(int64_t B, int64_t V, int64_t K, double lam) {
  const int64_t group = group_scratch_bytes(B, K, lam);
  const int64_t S = row_splits(B, V);
  if (S == 1) return group;
  return align16(group) + B * S * static_cast<int64_t>(sizeof(LseState));
}

cudaError_t launch_knn_interpolate(const void* logits, LogitsDtype dtype, const float* dists,
                                   const void* values, bool values_i64, float* out, void* scratch,
                                   int64_t B, int64_t V, int64_t K, double lam, double temperature,
                                   cudaStream_t stream) {
  if (B == 0 || V == 0) return cudaSuccess;
  if (K > kMaxNeighbours) return cudaErrorInvalidValue;
  const MixParams p = make_mix(lam);
  const float T = static_cast<float>(temperature);
  return dispatch_dtype(dtype, [&](auto ld) {
    using L = decltype(ld);
    if (values_i64)
      launch_full<L, int64_t>(logits, dists, values, out, scratch, B, V, K, T, p, lam, stream);
    else
      launch_full<L, int32_t>(logits, dists, values, out, scratch, B, V, K, T, p, lam, stream);
  });
}

}  // namespace cuda
}  // namespace knnlm
