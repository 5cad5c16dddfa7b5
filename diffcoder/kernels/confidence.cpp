// The release's greedy low-confidence proposal for each position, in one pass over its logits:
// x0 = argmax over the vocabulary without the mask token, and its softmax probability computed in
// float64 over the whole vocabulary (mask included), conf = exp(l[x0] - logsumexp(l)).
//
// Why: the torch ops behind diffcoder.engine.rules.propose convert every logit to float64, take a
// logsumexp, mask, argmax and gather, several passes over 64 x 49,152 float64 values per step at
// batch 16 on smol-135m; even fused by inductor that is, after the matmuls and the attention, the
// largest part of such a pass (benchmarks/decode_speed.py --ab-torch-ops measures the difference). Here
// the max and argmax run on float32 copies of the logits (exact: a bf16 or float32 logit is a
// float32 value), and only the sum of exponentials runs in float64 (Sleef's 1-ulp exp, the one
// torch's vectorized float64 exp uses). The result differs from the torch ops' in the order of the
// float64 additions only. A row holding a NaN follows torch's rules too (see nan_row).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <sleef.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "common.h"

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T>
__m512 load16(const T* p, __mmask16 live);

template <>
__m512 load16<c10::BFloat16>(const c10::BFloat16* p, __mmask16 live) {
  return _mm512_mask_blend_ps(live, _mm512_set1_ps(kNegInf), diffcoder_kernels::bf16x16_to_fp32(p, live));
}

template <>
__m512 load16<float>(const float* p, __mmask16 live) {
  return _mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), live, p);
}

template <typename T>
double value(const T* row, int64_t i) {
  return static_cast<double>(static_cast<float>(row[i]));
}

// A row holding a NaN, by torch's rules: the logsumexp, and so the confidence, is NaN, and argmax
// takes the first NaN (the mask token's position counts as -inf).
template <typename T>
void nan_row(const T* row, int64_t v, int64_t mask_id, double* conf, int64_t* x0) {
  double best = 0.0;
  int64_t arg = -1;
  for (int64_t i = 0; i < v; ++i) {
    const double l = i == mask_id ? -std::numeric_limits<double>::infinity() : value(row, i);
    if (std::isnan(l)) {
      arg = i;
      break;
    }
    if (arg < 0 || l > best) {
      best = l;
      arg = i;
    }
  }
  *x0 = arg;
  *conf = std::numeric_limits<double>::quiet_NaN();
}

template <typename T>
void vector_row(const T* row, int64_t v, int64_t mask_id, double* conf, int64_t* x0) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 vmax = _mm512_set1_ps(kNegInf), vbest = vmax;
  __m512i vidx = _mm512_set1_epi32(-1);
  __mmask16 nan = 0;
  for (int64_t j = 0; j < v; j += 16) {
    const int64_t left = v - j;
    const __mmask16 live = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    const __m512 x = load16(row + j, live);
    nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, x);
    __m512 xa = x;
    if (mask_id >= j && mask_id < j + 16)
      xa = _mm512_mask_blend_ps(static_cast<__mmask16>(1u << (mask_id - j)), x, _mm512_set1_ps(kNegInf));
    // Strictly greater: each lane keeps its first maximum, so the lowest index wins below.
    const __mmask16 gt = _mm512_cmp_ps_mask(xa, vbest, _CMP_GT_OQ);
    vbest = _mm512_mask_blend_ps(gt, vbest, xa);
    vidx = _mm512_mask_blend_epi32(gt, vidx, _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(j))));
  }
  if (nan) return nan_row(row, v, mask_id, conf, x0);
  const float best = _mm512_reduce_max_ps(vbest);
  const __mmask16 at_best = _mm512_cmp_ps_mask(vbest, _mm512_set1_ps(best), _CMP_EQ_OQ);
  // Lanes that never beat -inf hold -1: an all -inf row (or none but the mask) gives index 0, as torch.
  const __m512i cand = _mm512_mask_blend_epi32(at_best, _mm512_set1_epi32(std::numeric_limits<int>::max()), vidx);
  const int arg = _mm512_mask_reduce_min_epi32(_mm512_cmpge_epi32_mask(cand, _mm512_setzero_si512()), cand);
  *x0 = (arg == std::numeric_limits<int>::max() || at_best == 0) ? 0 : arg;
  const double m = _mm512_reduce_max_ps(vmax);
  const double shift = std::isinf(m) ? 0.0 : m;  // as torch.logsumexp
  const __m512d vshift = _mm512_set1_pd(shift);
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  for (int64_t j = 0; j < v; j += 16) {
    const int64_t left = v - j;
    const __mmask16 live = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    const __m512 x = load16(row + j, live);  // -inf past the end: exp gives 0
    const __m512d lo = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(x)), vshift);
    const __m512d hi = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1))), vshift);
    s0 = _mm512_add_pd(s0, Sleef_expd8_u10(lo));
    s1 = _mm512_add_pd(s1, Sleef_expd8_u10(hi));
  }
  const double s = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
  // The chosen token is the mask token only when nothing else beats -inf; its score is then -inf.
  const double chosen = *x0 == mask_id ? -std::numeric_limits<double>::infinity() : value(row, *x0);
  *conf = std::exp(chosen - (std::log(s) + shift));
}

// `masked` (optional, bool, one per row): rows to propose at; the others (positions already
// decoded, whose proposal no rule reads) are skipped, with confidence -inf and token mask_id.
std::tuple<at::Tensor, at::Tensor> greedy_confidence(const at::Tensor& logits, int64_t mask_id,
                                                     const std::optional<at::Tensor>& masked) {
  TORCH_CHECK(logits.device().is_cpu(), "greedy_confidence: CPU tensors only");
  TORCH_CHECK(logits.scalar_type() == at::kBFloat16 || logits.scalar_type() == at::kFloat,
              "greedy_confidence: logits must be bfloat16 or float32, got ", logits.scalar_type());
  TORCH_CHECK(logits.dim() >= 1 && logits.size(-1) > 0, "greedy_confidence: logits need a vocabulary dimension");
  const int64_t v = logits.size(-1);
  TORCH_CHECK(v < std::numeric_limits<int>::max() - 16, "greedy_confidence: vocabulary too large");
  const at::Tensor l = logits.contiguous();
  const int64_t rows = l.numel() / v;
  std::vector<int64_t> shape(l.sizes().begin(), l.sizes().end() - 1);
  at::Tensor conf = at::empty(shape, l.options().dtype(at::kDouble));
  at::Tensor x0 = at::empty(shape, l.options().dtype(at::kLong));
  double* cp = conf.data_ptr<double>();
  int64_t* xp = x0.data_ptr<int64_t>();
  std::vector<int64_t> todo;  // the rows to propose at, so that the threads split those evenly
  todo.reserve(static_cast<size_t>(rows));
  if (masked.has_value() && masked->defined()) {
    TORCH_CHECK(masked->scalar_type() == at::kBool && masked->sizes() == at::IntArrayRef(shape),
                "greedy_confidence: masked must be boolean, shaped as the logits without the vocabulary ",
                at::IntArrayRef(shape), ", got ", masked->scalar_type(), " ", masked->sizes());
    const at::Tensor m = masked->contiguous();
    const bool* mp = m.data_ptr<bool>();
    for (int64_t r = 0; r < rows; ++r) {
      if (mp[r]) {
        todo.push_back(r);
      } else {
        cp[r] = -std::numeric_limits<double>::infinity();
        xp[r] = mask_id;
      }
    }
  } else {
    for (int64_t r = 0; r < rows; ++r) todo.push_back(r);
  }
  at::parallel_for(0, static_cast<int64_t>(todo.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = todo[i];
      if (l.scalar_type() == at::kBFloat16)
        vector_row(l.data_ptr<c10::BFloat16>() + r * v, v, mask_id, cp + r, xp + r);
      else
        vector_row(l.data_ptr<float>() + r * v, v, mask_id, cp + r, xp + r);
    }
  });
  return {conf, x0};
}

}  // namespace

// The op's namespace: diffcoder_cpu in the AMX library, diffcoder_avx512 in the AVX-512 one
// (diffcoder/kernels/__init__.py compiles this file into both). The wrappers expand it first.
#ifndef DIFFCODER_OPS
#define DIFFCODER_OPS diffcoder_cpu
#endif
#define DIFFCODER_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define DIFFCODER_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

DIFFCODER_FRAGMENT(DIFFCODER_OPS, m) {
  m.def("greedy_confidence(Tensor logits, int mask_id, Tensor? masked=None) -> (Tensor, Tensor)");
}

DIFFCODER_IMPL(DIFFCODER_OPS, CPU, m) { m.impl("greedy_confidence", &greedy_confidence); }
