// y = x W^T (+ b) for a few rows of x: the decoder's linear layers in a speculative verification
// pass (4 to ~17 positions), where MKL's sgemm costs up to 3x its one-row product although the
// weight is read from memory once either way (see knnlm/cpu.py).
//
// Shape of the kernel: W (N, K) is read once, 4 rows at a time (a 4 x K panel, 9 KB for K = 576,
// which stays in L1 while up to 6 rows of x are multiplied with it: larger M goes 6 rows at a
// time over the same panel), with the next panel prefetched; each of the up-to 6 x 4 outputs of a
// panel is a 16-lane AVX-512 accumulator over K, reduced once at the end. Threads split N.
//
// Every output element y[m, n] is the same float whatever M, the row chunking or the number of
// threads: its k-sum is accumulated in one fixed order (16 lanes over k, then a fixed reduction
// tree). It differs from MKL's F.linear by float32 rounding only.
#include "cpu/small_linear_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KNNLM_SMALL_LINEAR_X86 1
#include <immintrin.h>
#endif

namespace knnlm {

#ifdef KNNLM_SMALL_LINEAR_X86
namespace {

constexpr int kPanel = 4;    // rows of W per panel
constexpr int kMaxRows = 6;  // rows of x per pass over a panel (6 x 4 accumulators + 4 + 1 registers)

// {sum a, sum b, sum c, sum d} of four 16-lane vectors.
__attribute__((target("avx512f"))) inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // 128-bit lanes: ab = [a0+a2, a1+a3, b0+b2, b1+b3], cd likewise
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  // lane i holds 4 partial sums of the i-th vector
  __m512 s = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  s = _mm512_add_ps(s, _mm512_permute_ps(s, 0x4E));  // within each lane: [0+2, 1+3, 2+0, 3+1]
  s = _mm512_add_ps(s, _mm512_permute_ps(s, 0xB1));  // every element of lane i: the sum of vector i
  const __m512i first = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(first, s));
}

// y[i, j] (+)= x[i, :] . w[j, :] for i < MB, j < nb (<= kPanel); x rows ldx apart, w rows K apart.
template <int MB>
__attribute__((target("avx512f"))) void panel(const float* x, int64_t ldx, const float* w, int64_t K,
                                              int nb, bool prefetch, const float* bias, float* y,
                                              int64_t ldy) {
  __m512 acc[MB][kPanel];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < kPanel; ++j) acc[i][j] = _mm512_setzero_ps();
  const float* next = w + kPanel * K;  // the next panel (prefetching past W's end is harmless)
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[kPanel];
    for (int j = 0; j < kPanel; ++j) wv[j] = j < nb ? _mm512_loadu_ps(w + j * K + k) : _mm512_setzero_ps();
    if (prefetch)
      for (int j = 0; j < kPanel; ++j) _mm_prefetch(reinterpret_cast<const char*>(next + j * K + k), _MM_HINT_T0);
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < kPanel; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if (k < K) {  // the last K % 16 columns, masked
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 wv[kPanel];
    for (int j = 0; j < kPanel; ++j)
      wv[j] = j < nb ? _mm512_maskz_loadu_ps(mask, w + j * K + k) : _mm512_setzero_ps();
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * ldx + k);
      for (int j = 0; j < kPanel; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    alignas(16) float out[4];
    _mm_store_ps(out, reduce4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
    for (int j = 0; j < nb; ++j) y[i * ldy + j] = bias ? out[j] + bias[j] : out[j];
  }
}

using PanelFn = void (*)(const float*, int64_t, const float*, int64_t, int, bool, const float*, float*, int64_t);
constexpr PanelFn kPanels[kMaxRows + 1] = {nullptr,   &panel<1>, &panel<2>, &panel<3>,
                                           &panel<4>, &panel<5>, &panel<6>};

// Whether this CPU runs the kernel (AVX-512F).
bool small_linear_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

}  // namespace
#else  // not x86-64 (or not GCC / clang): the op is registered but never runs; knnlm.cpu does not use it
namespace {
bool small_linear_supported() { return false; }
}  // namespace
#endif

at::Tensor small_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(small_linear_supported(), "knnlm: small_linear needs a CPU with AVX-512F");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "knnlm: small_linear takes x [M, K] and weight [N, K], got ",
              x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), "knnlm: small_linear: x has ", x.size(1), " columns, weight ",
              weight.size(1));
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "knnlm: small_linear takes float32 x and weight, got ", x.scalar_type(), " and ", weight.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == at::kFloat,
                "knnlm: small_linear: bias must be float32 [N] with N = ", weight.size(0), ", got ",
                bias->scalar_type(), " ", bias->sizes());
  }
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  at::Tensor y = at::empty({M, N}, xc.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return has_bias ? y.copy_(bc.expand({M, N})) : y.zero_();
#ifdef KNNLM_SMALL_LINEAR_X86
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  const float* bp = has_bias ? bc.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t panels = (N + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 16, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p * kPanel;
      const int nb = static_cast<int>(std::min<int64_t>(kPanel, N - n));
      for (int64_t m = 0; m < M; m += kMaxRows) {
        const int mb = static_cast<int>(std::min<int64_t>(kMaxRows, M - m));
        kPanels[mb](xp + m * K, K, wp + n * K, K, nb, m == 0 && p + 1 < p1, bp ? bp + n : nullptr,
                    yp + m * N + n, N);
      }
    }
  });
#endif
  return y;
}

}  // namespace knnlm
