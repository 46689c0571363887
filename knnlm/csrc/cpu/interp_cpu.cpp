// CPU implementation: rows in parallel with at::parallel_for (V is split across threads too when
// there are few rows), the per-element math from knnlm/csrc/interp.h, inner loops written over fixed
// lane blocks so that the compiler vectorises them.
//
// knn_interpolate, per row:
//   1. kNN prep (O(K)): validate values, neighbour log-weights, group duplicates (the output row
//      is borrowed as a token -> neighbour-index scratch map), one log-mass per distinct token.
//   2. one read of the logits: chunked online max / sum-exp (fp32), merged across V chunks.
//   3. one write of the output: log p_lm + log(1 - lam) everywhere, then the log-space mix at
//      the distinct neighbour tokens of the chunk. No V-sized temporaries.
#include "cpu/interp_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "checks.h"
#include "interp.h"

namespace knnlm {
namespace {

struct LoadF32 {
  using T = float;
  static float at(const T* p, int64_t i) { return p[i]; }
};
struct LoadF16 {
  using T = uint16_t;
  static float at(const T* p, int64_t i) { return half_bits_to_float(p[i]); }
};
struct LoadBF16 {
  using T = uint16_t;
  static float at(const T* p, int64_t i) { return bf16_bits_to_float(p[i]); }
};

constexpr int64_t kChunk = 2048;  // elements per online-max step (stays in L1 for the 2nd look)

// The hot loops carry `#pragma omp simd` (the extension is built with -fopenmp): it lets the
// compiler vectorise the max / sum reductions (reassociation across SIMD lanes) and the
// branch-free helpers of interp.h.

// Online log-sum-exp of x[lo, hi): per chunk, its max, one rescale of the running sum, then the
// sum of exp(x - max) over the (L1-resident) chunk: one exp per element, one read from memory.
template <class L>
LseState range_lse(const typename L::T* x, int64_t lo, int64_t hi) {
  LseState st = lse_empty();
  for (int64_t j = lo; j < hi; j += kChunk) {
    const int64_t n = std::min(kChunk, hi - j);
    const typename L::T* xc = x + j;
    float cm = st.m;
#pragma omp simd reduction(max : cm)
    for (int64_t k = 0; k < n; ++k) {
      const float v = L::at(xc, k);
      cm = v > cm ? v : cm;  // a NaN logit is skipped here and poisons the sum below; a +inf
                             // one becomes the max and adds exp(inf - inf) = NaN below
    }
    float cs = 0.0f;
#pragma omp simd reduction(+ : cs)
    for (int64_t k = 0; k < n; ++k) cs += exp_nonpos(L::at(xc, k) - cm);
    st.s = st.s * exp_nonpos(st.m - cm) + cs;
    st.m = cm;
  }
  return st;
}

// out[lo, hi) = value at a token without kNN mass.
template <class L>
void range_write(const typename L::T* __restrict x, float* __restrict out, int64_t lo, int64_t hi,
                 float row_max, float log_sum, const MixParams& p) {
  if (p.mode == kKnnOnly) {
    std::fill(out + lo, out + hi, neg_inf());
    return;
  }
  const MixParams q = p;
#pragma omp simd
  for (int64_t j = lo; j < hi; ++j) out[j] = mix_no_knn(lm_log_prob(L::at(x, j), row_max, log_sum), q);
}

// Neighbour log-weights w_i = log softmax(-d / T)_i for a kKnnOk row; kKnnNone when the row has no
// kNN mass (no neighbour or all distances +inf), kKnnNan when a distance is NaN or -inf, as
// knnlm.scoring.knn_log_weights (w is then not filled in).
inline KnnRow knn_log_weights_row(const float* d, int64_t K, float T, float* w) {
  float smax = neg_inf();
  bool any_nan = false;
  for (int64_t i = 0; i < K; ++i) {
    w[i] = knn_score(d[i], T);
    smax = w[i] > smax ? w[i] : smax;  // NaN scores are skipped here and flagged
    any_nan |= is_nan(w[i]);
  }
  const KnnRow kind = knn_row_kind(smax, any_nan);
  if (kind != kKnnOk) return kind;
  float ssum = 0.0f;
#pragma omp simd reduction(+ : ssum)
  for (int64_t i = 0; i < K; ++i) ssum += exp_nonpos(w[i] - smax);
  const float lse = smax + logf(ssum);
  for (int64_t i = 0; i < K; ++i) w[i] -= lse;
  return kKnnOk;
}

template <typename Idx>
inline bool first_out_of_range(const Idx* v, int64_t n, int64_t V, int64_t* bad) {
  for (int64_t i = 0; i < n; ++i) {
    if (v[i] < 0 || static_cast<int64_t>(v[i]) >= V) {
      *bad = static_cast<int64_t>(v[i]);
      return true;
    }
  }
  return false;
}

struct RangeError {
  std::atomic<bool> hit{false};
  int64_t row = 0, value = 0;
  void set(int64_t r, int64_t v) {
    bool expected = false;
    if (hit.compare_exchange_strong(expected, true)) {
      row = r;
      value = v;
    }
  }
};

// How many V-chunks per row: enough tasks to keep every thread busy when B < threads, but no
// chunk below at::internal::GRAIN_SIZE elements (torch's own threshold for going parallel: a
// second parallel region costs more than it saves on short rows).
int64_t chunks_per_row(int64_t B, int64_t V) {
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  if (B >= nt) return 1;
  const int64_t want = (2 * nt + B - 1) / B;
  return std::max<int64_t>(1, std::min<int64_t>(want, V / at::internal::GRAIN_SIZE));
}

// Drives the per-row work. prep(b) runs once per row before its logits are read (kNN part,
// validation); the row statistics (max, log sum exp(x - max)) are then computed and finish(b, lo,
// hi, row_max, log_sum) produces the output of columns [lo, hi). With P = 1 (enough rows for all
// threads) it is a single parallel region and each row is written right after it is read (still
// in cache); with V split into P chunks per row, partial statistics are merged in between.
template <class L, class Prep, class Finish>
void run_rows(const typename L::T* x, int64_t B, int64_t V, bool need_lse, const Prep& prep,
              const Finish& finish) {
  auto stats = [](LseState st, float* row_max, float* log_sum) {
    *row_max = st.m;
    // all -inf row: log_sum = -inf and (x - max) - log_sum = NaN, like torch; NaN / +inf
    // logit: s and log_sum are NaN (see lse_push / range_lse).
    *log_sum = lse_log_sum(st);
  };
  const int64_t P = chunks_per_row(B, V);
  if (P == 1) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        prep(b);
        float row_max = 0.0f, log_sum = 0.0f;
        if (need_lse) stats(range_lse<L>(x + b * V, 0, V), &row_max, &log_sum);
        finish(b, int64_t{0}, V, row_max, log_sum);
      }
    });
    return;
  }
  std::vector<LseState> part(static_cast<size_t>(B * P), lse_empty());
  at::parallel_for(0, B * P, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / P, c = t % P;
      if (c == 0) prep(b);
      if (need_lse) part[t] = range_lse<L>(x + b * V, V * c / P, V * (c + 1) / P);
    }
  });
  std::vector<float> row_max(B, 0.0f), log_sum(B, 0.0f);
  if (need_lse) {
    for (int64_t b = 0; b < B; ++b) {
      LseState st = part[b * P];
      for (int64_t c = 1; c < P; ++c) st = lse_merge(st, part[b * P + c]);
      stats(st, &row_max[b], &log_sum[b]);
    }
  }
  at::parallel_for(0, B * P, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / P, c = t % P;
      finish(b, V * c / P, V * (c + 1) / P, row_max[b], log_sum[b]);
    }
  });
}

template <class L, typename Idx>
void interpolate_impl(const at::Tensor& logits, const at::Tensor& dists, const at::Tensor& values,
                      const MixParams& p, float T, at::Tensor& out) {
  const int64_t B = logits.size(0), V = logits.size(1), K = dists.size(1);
  const auto* x = reinterpret_cast<const typename L::T*>(logits.const_data_ptr());
  const float* d = dists.const_data_ptr<float>();
  const Idx* v = values.const_data_ptr<Idx>();
  float* o = out.mutable_data_ptr<float>();
  const bool use_knn = p.mode != kLmOnly && K > 0;

  // Per distinct neighbour token: its id (-1 for non-leaders / no kNN mass) and log-mass.
  std::vector<int64_t> lead_tok(use_knn ? B * K : 0, -1);
  std::vector<float> lead_lp(use_knn ? B * K : 0, neg_inf());
  std::vector<char> row_ok(B, 0), knn_nan(B, 0);
  RangeError err;

  auto prep = [&](int64_t b) {
    int64_t bad = 0;
    if (first_out_of_range(v + b * K, K, V, &bad)) {
      err.set(b, bad);
      return;
    }
    row_ok[b] = 1;
    if (!use_knn) return;
    std::vector<float> w(K), gsum(K, 0.0f);
    std::vector<int32_t> rep(K);
    const Idx* vb = v + b * K;
    const KnnRow kind = knn_log_weights_row(d + b * K, K, T, w.data());
    knn_nan[b] = kind == kKnnNan;
    if (kind != kKnnOk) return;  // no kNN mass in this row, or NaN kNN distribution
    // Group duplicates: borrow the output row as token -> last neighbour index (overwritten by
    // the write pass later), so the representative of a token is its last occurrence.
    float* slot = o + b * V;
    for (int64_t i = 0; i < K; ++i) {
      const int32_t ii = static_cast<int32_t>(i);
      std::memcpy(slot + vb[i], &ii, sizeof(ii));
    }
    for (int64_t i = 0; i < K; ++i) std::memcpy(&rep[i], slot + vb[i], sizeof(int32_t));
    float* gmax = lead_lp.data() + b * K;  // group max, then group log-mass, at the leader
    for (int64_t i = 0; i < K; ++i) gmax[rep[i]] = w[i] > gmax[rep[i]] ? w[i] : gmax[rep[i]];
    for (int64_t i = 0; i < K; ++i)
      if (gmax[rep[i]] != neg_inf()) gsum[rep[i]] += exp_nonpos(w[i] - gmax[rep[i]]);
    for (int64_t i = 0; i < K; ++i) {
      if (rep[i] == i) {
        lead_tok[b * K + i] = static_cast<int64_t>(vb[i]);
        gmax[i] = group_log_mass(gmax[i], gsum[i]);
      }
    }
  };

  auto finish = [&](int64_t b, int64_t lo, int64_t hi, float row_max, float log_sum) {
    if (!row_ok[b]) return;  // out-of-range values: reported below, nothing written
    const typename L::T* xb = x + b * V;
    float* ob = o + b * V;
    if (knn_nan[b]) {  // log p_knn = NaN at every token, and lam > 0: the whole row is NaN
      std::fill(ob + lo, ob + hi, quiet_nan());
      return;
    }
    range_write<L>(xb, ob, lo, hi, row_max, log_sum, p);
    if (!use_knn) return;
    for (int64_t i = 0; i < K; ++i) {
      const int64_t tok = lead_tok[b * K + i];
      if (tok >= lo && tok < hi) {
        const float lp_lm =
            p.mode == kKnnOnly ? neg_inf() : lm_log_prob(L::at(xb, tok), row_max, log_sum);
        ob[tok] = mix_value(lp_lm, lead_lp[b * K + i], p);
      }
    }
  };
  run_rows<L>(x, B, V, p.mode != kKnnOnly, prep, finish);
  TORCH_CHECK(!err.hit.load(), "knnlm: values must be token ids in [0, V) with V = ", V,
              ", got ", err.value, " in row ", err.row);
}

template <class F>
void dispatch_logits(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat: f(LoadF32{}); break;
    case at::kHalf: f(LoadF16{}); break;
    case at::kBFloat16: f(LoadBF16{}); break;
    default: TORCH_CHECK(false, "knnlm: unsupported logits dtype ", t);
  }
}

template <class F>
void dispatch_index(at::ScalarType t, const F& f) {
  if (t == at::kLong) {
    f(int64_t{});
  } else {
    f(int32_t{});
  }
}

}  // namespace

at::Tensor knn_interpolate_cpu(const at::Tensor& logits_in, const at::Tensor& dists_in,
                               const at::Tensor& values_in, double lam, double temperature) {
  check_inputs(logits_in, dists_in, values_in, lam, temperature);
  TORCH_CHECK(logits_in.device().is_cpu(), "knnlm: CPU kernel got a ", logits_in.device(), " tensor");
  const at::Tensor logits = logits_in.contiguous(), dists = dists_in.contiguous(),
                   values = values_in.contiguous();
  at::Tensor out = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const MixParams p = make_mix(lam);
  dispatch_logits(logits.scalar_type(), [&](auto ld) {
    dispatch_index(values.scalar_type(), [&](auto idx) {
      interpolate_impl<decltype(ld), decltype(idx)>(logits, dists, values, p,
                                                     static_cast<float>(temperature), out);
    });
  });
  return out;
}

}  // namespace knnlm
