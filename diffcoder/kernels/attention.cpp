// Attention of a decode step on a CPU, bf16 in and out, fp32 inside: out = softmax(q k^T * scale
// + mask) v for a few query rows (a block of 4 tokens times the query heads folded onto each KV
// head) over a cache of a few hundred keys.
//
// Why: at that size SDPA's CPU flash kernel costs about 0.4 ms per call at batch 16, 30 calls per
// smol-135m pass (benchmarks/results/cpu-dev/smol135m_bf16_compiled_profile_b16.txt, recorded
// before this op; benchmarks/decode.py --ab-torch-ops measures the difference). Here each
// (batch, KV head) is one task of three passes:
//   scores: S^T[j] (16 query rows as the 16 lanes of a vector) = sum_d k[j, d] * q^T[d], with
//           keys that no query row may see skipped entirely (the unused tail of a static cache);
//   softmax over the keys, lane by lane (vertical max, exp and sum: no horizontal reductions);
//   values: O^T[d] = sum_j v[j, d] * P^T[j], 16 output columns at a time in registers.
// Sums are fp32 in another order than SDPA's, so results agree to bf16 rounding, not bit for bit;
// a query row that may see no key gets zeros, as SDPA gives.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <sleef.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "bf16.h"

namespace {

constexpr int kLanes = 16;

using diffcoder_kernels::bf16x16_to_fp32;

struct Views {
  const c10::BFloat16 *q, *k, *v;
  const bool* mask;  // nullptr: every row sees every key
  int64_t qs[3], ks[3], vs[3], ms[4];  // strides: q/k/v over (batch, head, row); mask over (batch, head, row, key)
  int64_t rows, keys, dim;
  float scale;
  c10::BFloat16* out;
  int64_t os[3];
};

void attend(const Views& a, int64_t b, int64_t h, std::vector<float>& scratch, std::vector<uint16_t>& sees,
            std::vector<int32_t>& seen) {
  const int64_t d = a.dim, L = a.keys;
  // scratch: q^T [d][16], S^T/P^T [L][16], values [L][16], O^T [d][16]
  scratch.resize(static_cast<size_t>(d * kLanes * 2 + 2 * L * kLanes));
  float* qt = scratch.data();
  float* st = qt + d * kLanes;
  float* vf = st + L * kLanes;
  float* ot = vf + L * kLanes;
  sees.resize(static_cast<size_t>(L));
  const c10::BFloat16* q = a.q + b * a.qs[0] + h * a.qs[1];
  const c10::BFloat16* k = a.k + b * a.ks[0] + h * a.ks[1];
  const c10::BFloat16* v = a.v + b * a.vs[0] + h * a.vs[1];
  c10::BFloat16* out = a.out + b * a.os[0] + h * a.os[1];
  for (int64_t r0 = 0; r0 < a.rows; r0 += kLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, a.rows - r0));
    const __mmask16 live = static_cast<__mmask16>((1u << lanes) - 1);
    // q^T for these rows (zeros in dead lanes) and which rows may see each key.
    int32_t* qp = reinterpret_cast<int32_t*>(qt);  // q^T as bf16 pairs: [d / 2][16 lanes]
    for (int64_t i = 0; i < d / 2 * kLanes; ++i) qp[i] = 0;
    for (int lane = 0; lane < lanes; ++lane) {
      const int32_t* qr = reinterpret_cast<const int32_t*>(q + (r0 + lane) * a.qs[2]);
      for (int64_t i = 0; i < d / 2; ++i) qp[i * kLanes + lane] = qr[i];
    }
    for (int64_t j = 0; j < L; ++j) sees[j] = a.mask ? 0 : live;
    if (a.mask) {
      const bool* m = a.mask + b * a.ms[0] + h * a.ms[1];
      for (int lane = 0; lane < lanes; ++lane) {
        const bool* mr = m + (r0 + lane) * a.ms[2];
        if (a.ms[3] != 1) {
          for (int64_t j = 0; j < L; ++j) sees[j] |= static_cast<uint16_t>(mr[j * a.ms[3]]) << lane;
          continue;
        }
        for (int64_t j0 = 0; j0 < L; j0 += 64) {  // 64 keys' bytes at a time; visit only the true ones
          const int64_t n = std::min<int64_t>(64, L - j0);
          const __mmask64 in = n == 64 ? ~0ULL : (1ULL << n) - 1;
          for (uint64_t bits = _mm512_test_epi8_mask(_mm512_maskz_loadu_epi8(in, mr + j0), _mm512_set1_epi8(1));
               bits; bits &= bits - 1)
            sees[j0 + __builtin_ctzll(bits)] |= static_cast<uint16_t>(1u << lane);
        }
      }
    }
    // Scores and their running max, lane by lane.
    const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    __m512 mx = neg_inf;
    const __m512 vscale = _mm512_set1_ps(a.scale);
    seen.clear();
    for (int64_t j = 0; j < L; ++j)
      if (sees[j]) seen.push_back(static_cast<int32_t>(j));
    const int64_t n_seen = static_cast<int64_t>(seen.size());
    // bf16 pair dot products: lane r += k[j, 2i] q[r, 2i] + k[j, 2i + 1] q[r, 2i + 1], with k's
    // pair broadcast straight from the cache and q^T in pairs (products exact in fp32). Four keys
    // at a time share each load of q^T and keep eight independent sums in flight.
    for (int64_t n = 0; n < n_seen; n += 4) {
      const int32_t* kp[4];
      for (int u = 0; u < 4; ++u)
        kp[u] = reinterpret_cast<const int32_t*>(k + seen[std::min(n + u, n_seen - 1)] * a.ks[2]);
      __m512 acc[4][2];
      for (int u = 0; u < 4; ++u) acc[u][0] = acc[u][1] = _mm512_setzero_ps();
      for (int64_t i = 0; i < d / 2; i += 2) {
        const __m512bh qa = (__m512bh)_mm512_loadu_si512(qp + i * kLanes);
        const __m512bh qb = (__m512bh)_mm512_loadu_si512(qp + (i + 1) * kLanes);
        for (int u = 0; u < 4; ++u) {
          acc[u][0] = _mm512_dpbf16_ps(acc[u][0], (__m512bh)_mm512_set1_epi32(kp[u][i]), qa);
          acc[u][1] = _mm512_dpbf16_ps(acc[u][1], (__m512bh)_mm512_set1_epi32(kp[u][i + 1]), qb);
        }
      }
      for (int u = 0; u < 4 && n + u < n_seen; ++u) {
        const int64_t j = seen[n + u];
        const __m512 sc = _mm512_mask_blend_ps(sees[j], neg_inf, _mm512_mul_ps(_mm512_add_ps(acc[u][0], acc[u][1]), vscale));
        _mm512_storeu_ps(st + j * kLanes, sc);
        mx = _mm512_max_ps(mx, sc);
      }
    }
    // Softmax numerators (masked lanes: exp(-inf) = 0) and their sums; a lane that sees no key
    // keeps max -inf, shifted by 0 instead so that it sums to 0 rather than NaN.
    const __m512 shift = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(mx, neg_inf, _CMP_EQ_OQ), mx, _mm512_setzero_ps());
    __m512 sum = _mm512_setzero_ps();
    for (int64_t n = 0; n < n_seen; ++n) {  // packed: P^T row n is key seen[n]
      const __m512 p = Sleef_expf16_u10(_mm512_sub_ps(_mm512_loadu_ps(st + seen[n] * kLanes), shift));
      _mm512_storeu_ps(st + n * kLanes, p);
      sum = _mm512_add_ps(sum, p);
    }
    // Values, 16 output columns at a time held in registers.
    for (int64_t d0 = 0; d0 < d; d0 += kLanes) {
      __m512 acc[kLanes];
      for (int i = 0; i < kLanes; ++i) acc[i] = _mm512_setzero_ps();
      // These 16 columns of the seen values as fp32 first, so that each is broadcast from memory.
      for (int64_t n = 0; n < n_seen; ++n) _mm512_storeu_ps(vf + n * kLanes, bf16x16_to_fp32(v + seen[n] * a.vs[2] + d0));
      for (int64_t n = 0; n < n_seen; ++n) {
        const __m512 p = _mm512_loadu_ps(st + n * kLanes);
        const float* vr = vf + n * kLanes;
        for (int i = 0; i < kLanes; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(vr[i]), p, acc[i]);
      }
      for (int i = 0; i < kLanes; ++i) _mm512_storeu_ps(ot + (d0 + i) * kLanes, acc[i]);
    }
    alignas(64) float inv[kLanes];
    const __m512 zero = _mm512_setzero_ps();
    _mm512_store_ps(inv, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(sum, zero, _CMP_GT_OQ), zero,
                                              _mm512_div_ps(_mm512_set1_ps(1.0f), sum)));
    const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(kLanes));
    for (int lane = 0; lane < lanes; ++lane) {
      c10::BFloat16* o = out + (r0 + lane) * a.os[2];
      const __m512 scale_lane = _mm512_set1_ps(inv[lane]);
      for (int64_t d0 = 0; d0 < d; d0 += kLanes) {  // O^T's column `lane`, 16 rows at a time
        const __m512 x = _mm512_i32gather_ps(column, ot + d0 * kLanes + lane, 4);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + d0), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(x, scale_lane)));
      }
    }
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "decode_attention: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "decode_attention: q, k and v must be bfloat16");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "decode_attention: q, k, v must be [batch, heads, rows, dim]");
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), D = q.size(3), L = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.sizes() == k.sizes(),
              "decode_attention: k and v must be [", B, ", ", H, ", keys, ", D, "], got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(D % kLanes == 0 && D > 0, "decode_attention: the head dimension must be a multiple of 16, got ", D);
  const at::Tensor qc = q.stride(3) == 1 ? q : q.contiguous();
  const at::Tensor kc = k.stride(3) == 1 ? k : k.contiguous();
  const at::Tensor vc = v.stride(3) == 1 ? v : v.contiguous();
  at::Tensor m;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "decode_attention: the mask must be boolean (True = may attend)");
    TORCH_CHECK(mask->dim() == 4 && mask->size(3) == L, "decode_attention: the mask must be [batch|1, heads|1, rows|1, ",
                L, "], got ", mask->sizes());
    m = mask->expand({B, H, R, L});  // broadcast dimensions get stride 0
  }
  at::Tensor out = at::empty({B, H, R, D}, q.options());
  Views a{};
  a.q = qc.data_ptr<c10::BFloat16>();
  a.k = kc.data_ptr<c10::BFloat16>();
  a.v = vc.data_ptr<c10::BFloat16>();
  a.mask = m.defined() ? m.data_ptr<bool>() : nullptr;
  for (int i = 0; i < 3; ++i) {
    a.qs[i] = qc.stride(i);
    a.ks[i] = kc.stride(i);
    a.vs[i] = vc.stride(i);
    a.os[i] = out.stride(i);
  }
  if (m.defined())
    for (int i = 0; i < 4; ++i) a.ms[i] = m.stride(i);
  a.rows = R;
  a.keys = L;
  a.dim = D;
  a.scale = static_cast<float>(scale);
  a.out = out.data_ptr<c10::BFloat16>();
  if (L == 0) return out.zero_();
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch;
    std::vector<uint16_t> sees;
    std::vector<int32_t> seen;
    for (int64_t t = t0; t < t1; ++t) attend(a, t / H, t % H, scratch, sees, seen);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(diffcoder_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(diffcoder_cpu, CPU, m) { m.impl("decode_attention", &decode_attention); }
