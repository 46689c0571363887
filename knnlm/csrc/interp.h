// Per-element math of the fused kNN-LM interpolation, shared by the CPU (knnlm/csrc/cpu) and CUDA
// (knnlm/csrc/cuda) kernels so that both run the very same code. No torch includes: this header
// is compiled by nvcc in the .cu files as well as by the host compiler.
//
// The formula and its conventions are specified by the torch reference in knnlm/scoring.py:
//   log p(v) = logaddexp(log(1 - lam) + log_softmax(logits)(v), log(lam) + log p_knn(v))
//   p_knn(v) = sum_{i : values_i = v} softmax(-dists / T)_i
// +inf distance = missing neighbour (zero weight); all-+inf row => log p_knn = -inf everywhere;
// lam = 0 -> log p_lm exactly, lam = 1 -> log p_knn exactly (the zero-weight side is not read).
// Non-finite inputs (see scoring.py): a logits row with a NaN, a +inf, or only -inf has
// log p_lm = NaN at every token; a dists row with a NaN or -inf has log p_knn = NaN at every token;
// NaN then propagates through the mix. Nothing here is compiled with fast-math: the NaN tests
// (x != x, comparisons that are false for NaN) rely on IEEE semantics.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define KNNLM_HD __host__ __device__ __forceinline__
#else
#define KNNLM_HD inline
#endif

namespace knnlm {

// -FLT_MAX: the initial running max of the online log-sum-exp. Finite on purpose, so that a
// -inf logit seen first gives exp(-inf - (-FLT_MAX)) = 0 instead of exp(NaN).
#define KNNLM_LOWEST (-3.402823466e+38f)

KNNLM_HD float neg_inf() { return -INFINITY; }
KNNLM_HD float quiet_nan() { return NAN; }
KNNLM_HD bool is_nan(float x) { return x != x; }

KNNLM_HD float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

KNNLM_HD uint32_t float_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

// ---- input conversions (branch-free so the host compiler can vectorise them) ----------------

// IEEE binary16 bits -> fp32 (exact; handles zero/denormal/inf/NaN).
KNNLM_HD float half_bits_to_float(uint16_t h) {
  const uint32_t w = (uint32_t)h << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // normal / inf / NaN: shift the exponent+mantissa into place and rebias by scaling.
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 1.925929944387236e-34f;  // 2^-112
  // zero / denormal: build 0.5 + m * 2^-24 and subtract 0.5 (exact).
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t is_denormal = 0u - (uint32_t)(two_w < (1u << 27));  // all ones / zero mask
  const uint32_t r = sign | (float_to_bits(denormalized) & is_denormal) |
                     (float_to_bits(normalized) & ~is_denormal);
  return bits_to_float(r);
}

// bfloat16 bits -> fp32 (exact).
KNNLM_HD float bf16_bits_to_float(uint16_t h) { return bits_to_float((uint32_t)h << 16); }

// ---- exp for non-positive arguments ----------------------------------------------------------
// Every exp in the op is of a value minus a running/row/group maximum, i.e. x <= 0. Cephes-style
// range reduction + degree-6 polynomial (about 1 ulp), written branch-free. Results below
// exp(-87.3) (fp32 denormals) are flushed to 0: they are < 1e-38 relative to the max term that is
// always part of the same sum, so they cannot change a result. exp(-inf) = 0, NaN propagates.
KNNLM_HD float exp_nonpos(float x) {
  const float xc = x < -87.0f ? -87.0f : x;  // keep 2^n a normal number
  // n = round(xc / ln2) by the 1.5 * 2^23 magic-number trick (branch-free, vectorises; the
  // compilers keep the two additions since fast-math reassociation is never enabled).
  const float biased = xc * 1.44269504088896341f + 12582912.0f;
  const float n = biased - 12582912.0f;
  float r = xc - n * 0.693359375f;  // ln2 split in two for an exact reduction
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n: the low mantissa bits of `biased` hold n (two's complement), n + 127 is in [1, 127].
  const float scale = bits_to_float((float_to_bits(biased) + 127u) << 23);
  const float y = p * scale;
  return x < -87.0f ? 0.0f : y;  // NaN < -87 is false: NaN goes through and propagates
}

// ---- online log-sum-exp state: lse = m + log(s) ----------------------------------------------

struct LseState {
  float m;  // running max (KNNLM_LOWEST when empty)
  float s;  // sum of exp(x - m)
};

KNNLM_HD LseState lse_empty() {
  LseState st;
  st.m = KNNLM_LOWEST;
  st.s = 0.0f;
  return st;
}

// Fold one element in with a single exp: rescale the sum only when the max moves.
// A NaN element makes s NaN (d = NaN); so does +inf: it becomes the max and adds x - x = NaN
// (exp(inf - inf)), which is what log_softmax gives for such a row. s is never NaN otherwise.
KNNLM_HD void lse_push(LseState& st, float x) {
  const float d = x - st.m;
  if (d > 0.0f) {
    st.s = st.s * exp_nonpos(-d) + (1.0f + (x - x));
    st.m = x;
  } else {
    st.s += exp_nonpos(d);
  }
}

// Merge two states (associative up to rounding): used for lane / warp / thread reductions.
KNNLM_HD LseState lse_merge(LseState a, LseState b) {
  LseState r;
  r.m = a.m > b.m ? a.m : b.m;
  r.s = a.s * exp_nonpos(a.m - r.m) + b.s * exp_nonpos(b.m - r.m);
  return r;
}

// log(s): -inf for an empty state (no element, or only -inf), NaN for a NaN state (a NaN or
// +inf element). Written as s == 0 rather than s > 0 so that NaN is not mistaken for empty.
KNNLM_HD float lse_log_sum(LseState st) { return st.s == 0.0f ? neg_inf() : logf(st.s); }

// log(sum exp(x)) of the state; -inf when it saw no finite element, NaN after a NaN / +inf.
KNNLM_HD float lse_value(LseState st) { return st.s == 0.0f ? neg_inf() : st.m + logf(st.s); }

// ---- the mixture ------------------------------------------------------------------------------

// Same definition as torch.logaddexp: max + log1p(exp(-|a - b|)), -inf when both are -inf, NaN
// when either is NaN. (mx == -inf only when b == -inf and a is -inf or NaN: a + b is then -inf
// or NaN, as torch gives; with mx = NaN the general formula yields NaN.)
KNNLM_HD float log_add_exp(float a, float b) {
  const float mx = a > b ? a : b;
  const float mn = a > b ? b : a;
  if (mx == neg_inf()) return a + b;
  return mx + log1pf(exp_nonpos(mn - mx));
}

enum MixMode : int { kLmOnly = 0, kKnnOnly = 1, kMix = 2 };

struct MixParams {
  int mode;        // MixMode
  float log_lm;    // log(1 - lam), -inf for lam = 1
  float log_knn;   // log(lam), -inf for lam = 0
};

// Host side: computed in double and rounded once, as the reference does with Python floats.
KNNLM_HD MixParams make_mix(double lam) {
  MixParams p;
  p.mode = lam == 0.0 ? kLmOnly : (lam == 1.0 ? kKnnOnly : kMix);
  p.log_lm = lam < 1.0 ? (float)log1p(-lam) : neg_inf();
  p.log_knn = lam > 0.0 ? (float)log(lam) : neg_inf();
  return p;
}

// log p_lm(v) from the logit and the row statistics, exactly as torch.log_softmax orders it:
// (x - max) - log(sum exp(x - max)).
KNNLM_HD float lm_log_prob(float x, float row_max, float log_sum) { return (x - row_max) - log_sum; }

// Output value at a token no neighbour votes for (log p_knn = -inf).
// Written with selects only (no early returns) so that loops over it vectorise.
KNNLM_HD float mix_no_knn(float lp_lm, const MixParams& p) {
  const float shifted = lp_lm + (p.mode == kLmOnly ? 0.0f : p.log_lm);
  return p.mode == kKnnOnly ? neg_inf() : shifted;
}

// Output value at a token with kNN log-mass lp_knn (may be -inf).
KNNLM_HD float mix_value(float lp_lm, float lp_knn, const MixParams& p) {
  if (p.mode == kLmOnly) return lp_lm;
  if (p.mode == kKnnOnly) return lp_knn;
  return log_add_exp(lp_lm + p.log_lm, lp_knn + p.log_knn);
}

// kNN score of one neighbour: -dist / T, as the reference computes it (+inf dist -> -inf).
KNNLM_HD float knn_score(float dist, float temperature) { return -dist / temperature; }

// log-sum-exp of a group of scores given the group max (-inf max => -inf, no NaN).
// log p_knn of one token = log-sum-exp of its neighbours' log-weights, taken around the group's
// own max (the reference sums exp(w - row max) in probability space instead). The two agree to
// fp32 precision except where the reference underflows: a neighbour whose weight is below
// ~e^-87 relative to the best one gets a finite log-mass here and -inf / a denormal-rounded value
// there. That only shows at lam = 1 (for lam < 1 the LM term dominates such a token).
// A single-member group has gsum = exp(0) = 1 exactly: its log-mass is gmax (log(1) = 0), so the
// log is skipped for it.
KNNLM_HD float group_log_mass(float gmax, float gsum) {
  if (gmax == neg_inf()) return neg_inf();
  return gsum == 1.0f ? gmax : gmax + logf(gsum);
}

// The same from an online log-sum-exp state of the group's weights (the CUDA kernel reduces
// groups with lse_merge): empty state (every member -inf) -> -inf.
KNNLM_HD float group_log_mass(LseState st) {
  return st.s == 0.0f ? neg_inf() : group_log_mass(st.m, st.s);
}

// Validity of a row of neighbour scores -d / T, given the max over the non-NaN scores and whether
// any score was NaN: kKnnNone (no neighbour, or every distance +inf: no kNN mass, log p_knn = -inf
// everywhere), kKnnNan (a NaN distance, or a -inf one, whose score +inf leaves log softmax
// undefined: log p_knn = NaN everywhere, as the reference gives), kKnnOk otherwise.
enum KnnRow : int { kKnnOk = 0, kKnnNone = 1, kKnnNan = 2 };

KNNLM_HD KnnRow knn_row_kind(float score_max, bool any_nan) {
  if (any_nan || score_max == INFINITY) return kKnnNan;
  return score_max == neg_inf() ? kKnnNone : kKnnOk;
}

}  // namespace knnlm
