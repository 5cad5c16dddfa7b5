// Attention of a decode step on a CPU, bf16 in and out, fp32 inside: out = softmax(q k^T * scale
// + mask) v for a few query rows (a block of 4 tokens times the query heads folded onto each KV
// head) over a cache of a few hundred keys.
//
// Why: at that size SDPA's CPU flash kernel pays a large fixed cost per call, 30 calls per
// smol-135m pass (benchmarks/attention_kernels.py times both at a decode's shapes;
// benchmarks/decode_speed.py --ab-torch-ops measures the difference in whole passes). Here each
// (batch, KV head) is one task of three passes, 16 query rows at a time:
//   scores: S^T[j] (the 16 query rows as the 16 lanes of a vector) = sum_d k[j, d] * q^T[d], with
//           keys that no query row may see skipped (the unused tail of a static cache);
//   softmax over the keys, lane by lane (vertical max, exp and sum: no horizontal reductions);
//   values: O = P V over the keys seen.
// With a head dimension that is a multiple of 32 (every model here), the scores and the values are
// AMX tile products: S^T blocks of 16 keys x 16 rows straight from the cache's key rows, and P V
// with P rounded to bf16 (as SDPA's CPU kernel rounds it for bf16 inputs) against the seen value
// rows, interleaved in pairs. Otherwise they are AVX-512 loops (bf16 pair dot products for the
// scores, fp32 FMAs for the values). Sums are fp32 in another order than SDPA's, so results agree
// to bf16 rounding, not bit for bit; a query row that may see no key gets zeros, as SDPA gives.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
// The vectorized helpers (a 16 x 16 bf16 transpose) for the AVX-512 build this file always is.
#ifndef CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY_AVX512
#endif
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY avx512
#endif
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <sleef.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <vector>

#include "common.h"

namespace {

constexpr int kLanes = 16;
constexpr int64_t kTileQ = 16 * kLanes;  // int32 pairs of q^T in one B tile: 16 pairs x 16 rows

using diffcoder_kernels::bf16x16_to_fp32;

struct Views {
  const c10::BFloat16 *q, *k, *v;
  const bool* mask;  // nullptr: every row sees every key
  int64_t qs[3], ks[3], vs[3], ms[4];  // strides: q/k/v over (batch, head, row); mask over (batch, head, row, key)
  int64_t mask_rows;  // row r reads mask row r % mask_rows (a folded query's rows repeat the tokens' mask)
  int64_t rows, keys, dim;
  float scale;
  c10::BFloat16* out;
  int64_t os[3];
};

// Per-thread buffers, grown to the largest task seen.
struct Scratch {
  std::vector<float> f;          // q^T pairs, S^T (P^T after the softmax), values or O
  std::vector<uint16_t> sees;    // per key: which of the 16 rows may see it (bit r = row r0 + r)
  std::vector<int32_t> seen;     // keys some row sees, in order
  std::vector<c10::BFloat16> h;  // AMX: P^T and P in bf16, the seen value rows interleaved in pairs
};

// Which of rows r0.. (`lanes` of them) may see each key: sees[j] bit r. A mask row is read 64
// keys at a time and spread onto the 16-bit words of 32 keys per vector, no per-key loop.
void mark_sees(const Views& a, int64_t b, int64_t h, int64_t r0, int lanes, uint16_t* sees) {
  const int64_t L = a.keys, L64 = (L + 63) / 64 * 64;
  const uint16_t live = static_cast<uint16_t>((1u << lanes) - 1);
  if (!a.mask) {
    for (int64_t j = 0; j < L; ++j) sees[j] = live;
    return;
  }
  const bool* m = a.mask + b * a.ms[0] + h * a.ms[1];
  if (a.ms[3] != 1) {  // a mask strided along the keys: bit by bit
    for (int64_t j = 0; j < L; ++j) sees[j] = 0;
    for (int lane = 0; lane < lanes; ++lane)
      for (int64_t j = 0; j < L; ++j)
        sees[j] |= static_cast<uint16_t>(m[(r0 + lane) % a.mask_rows * a.ms[2] + j * a.ms[3]]) << lane;
    return;
  }
  for (int64_t j0 = 0; j0 < L64; j0 += 64) {
    const int64_t n = std::min<int64_t>(64, L - j0);
    const __mmask64 in = n == 64 ? ~0ULL : (1ULL << n) - 1;
    __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
    for (int lane = 0; lane < lanes; ++lane) {
      const bool* row = m + (r0 + lane) % a.mask_rows * a.ms[2];
      const uint64_t bits = _mm512_test_epi8_mask(_mm512_maskz_loadu_epi8(in, row + j0), _mm512_set1_epi8(1));
      const __m512i bit = _mm512_set1_epi16(static_cast<int16_t>(1u << lane));
      lo = _mm512_or_si512(lo, _mm512_maskz_mov_epi16(static_cast<__mmask32>(bits), bit));
      hi = _mm512_or_si512(hi, _mm512_maskz_mov_epi16(static_cast<__mmask32>(bits >> 32), bit));
    }
    _mm512_storeu_si512(sees + j0, lo);  // sees has room for L rounded up to 64
    _mm512_storeu_si512(sees + j0 + 32, hi);
  }
}

// One key's scores for the 16 rows: the bf16 pair dot products of k[j] with q^T.
__m512 key_scores(const int32_t* kp, const int32_t* qp, int64_t pairs) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (int64_t i = 0; i < pairs; i += 2) {
    acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_set1_epi32(kp[i]), (__m512bh)_mm512_loadu_si512(qp + i * kLanes));
    acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_set1_epi32(kp[i + 1]),
                            (__m512bh)_mm512_loadu_si512(qp + (i + 1) * kLanes));
  }
  return _mm512_add_ps(acc0, acc1);
}

// Scaled, masked scores S^T[j] of every seen key into st (masked lanes -inf); their running max.
// AVX-512: four keys at a time share each load of q^T and keep eight sums in flight.
__m512 scores_avx(const c10::BFloat16* k, int64_t k_stride, const int32_t* qp, int64_t d, const uint16_t* sees,
                  const std::vector<int32_t>& seen, float scale, float* st) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), vscale = _mm512_set1_ps(scale);
  __m512 mx = neg_inf;
  const int64_t n_seen = static_cast<int64_t>(seen.size());
  for (int64_t n = 0; n < n_seen; n += 4) {
    const int32_t* kp[4];
    for (int u = 0; u < 4; ++u)
      kp[u] = reinterpret_cast<const int32_t*>(k + seen[std::min(n + u, n_seen - 1)] * k_stride);
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
  return mx;
}

// Rows [j0, j1) of a [keys][d] bf16 cache, towards L1.
void prefetch_rows(const c10::BFloat16* base, int64_t stride, int64_t d, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t c = 0; c < d * 2; c += 64)
      _mm_prefetch(reinterpret_cast<const char*>(base + j * stride) + c, _MM_HINT_T0);
}

// The same with AMX (d a multiple of 32): per block of 16 keys that some row sees, S^T = K q^T
// as one C tile (tile 0), A = 16 key rows x 32 dims read in place from the cache (tiles 4, 5),
// B = q^T's pairs (tiles 6, 7, loaded once when d <= 64). Keys after the last whole block: AVX.
__m512 scores_amx(const c10::BFloat16* k, int64_t k_stride, const int32_t* qp, int64_t d, int64_t L,
                  const uint16_t* sees, float scale, float* st) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), vscale = _mm512_set1_ps(scale);
  __m512 mx = neg_inf;
  const int64_t chunks = d / 32, k_bytes = k_stride * 2;
  const bool preloaded = chunks <= 2;
  if (preloaded) {
    _tile_loadd(6, qp, 64);
    if (chunks > 1) _tile_loadd(7, qp + kTileQ, 64);
  }
  alignas(64) float block[kLanes * kLanes];
  auto take = [&](int64_t j, __m512 raw) {
    const __m512 sc = _mm512_mask_blend_ps(sees[j], neg_inf, _mm512_mul_ps(raw, vscale));
    _mm512_storeu_ps(st + j * kLanes, sc);
    mx = _mm512_max_ps(mx, sc);
  };
  const int64_t whole = L / kLanes * kLanes;
  prefetch_rows(k, k_stride, d, 0, std::min<int64_t>(L, 2 * kLanes));
  for (int64_t j0 = 0; j0 < whole; j0 += kLanes) {
    // Tile loads are not prefetched by the hardware: ask for the key rows two blocks ahead.
    prefetch_rows(k, k_stride, d, j0 + 2 * kLanes, std::min<int64_t>(L, j0 + 3 * kLanes));
    const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sees + j0));
    if (_mm256_testz_si256(words, words)) continue;  // no row sees these 16 keys
    _tile_zero(0);
    const char* kb = reinterpret_cast<const char*>(k + j0 * k_stride);
    for (int64_t c = 0; c < chunks; ++c) {
      if (preloaded && c == 0) {
        _tile_loadd(4, kb, k_bytes);
        _tile_dpbf16ps(0, 4, 6);
      } else if (preloaded) {
        _tile_loadd(5, kb + 64, k_bytes);
        _tile_dpbf16ps(0, 5, 7);
      } else {
        _tile_loadd(4, kb + c * 64, k_bytes);
        _tile_loadd(6, qp + c * kTileQ, 64);
        _tile_dpbf16ps(0, 4, 6);
      }
    }
    _tile_stored(0, block, 64);
    for (int i = 0; i < kLanes; ++i)
      if (sees[j0 + i]) take(j0 + i, _mm512_load_ps(block + i * kLanes));
  }
  for (int64_t j = whole; j < L; ++j)
    if (sees[j]) take(j, key_scores(reinterpret_cast<const int32_t*>(k + j * k_stride), qp, d / 2));
  return mx;
}

// O^T[d] = sum over the seen keys n of v[seen[n], d] P^T[n], 16 columns of d at a time held in
// registers (ot: [d][16 lanes]).
void values_avx(const c10::BFloat16* v, int64_t v_stride, int64_t d, const std::vector<int32_t>& seen,
                const float* pt, float* vf, float* ot) {
  const int64_t n_seen = static_cast<int64_t>(seen.size());
  for (int64_t d0 = 0; d0 < d; d0 += kLanes) {
    __m512 acc[kLanes];
    for (int i = 0; i < kLanes; ++i) acc[i] = _mm512_setzero_ps();
    // These 16 columns of the seen values as fp32 first, so that each is broadcast from memory.
    for (int64_t n = 0; n < n_seen; ++n) _mm512_storeu_ps(vf + n * kLanes, bf16x16_to_fp32(v + seen[n] * v_stride + d0));
    for (int64_t n = 0; n < n_seen; ++n) {
      const __m512 p = _mm512_loadu_ps(pt + n * kLanes);
      const float* vr = vf + n * kLanes;
      for (int i = 0; i < kLanes; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(vr[i]), p, acc[i]);
    }
    for (int i = 0; i < kLanes; ++i) _mm512_storeu_ps(ot + (d0 + i) * kLanes, acc[i]);
  }
}

// O = P V with AMX (d a multiple of 32; o: [16 rows][d]). P (rows x seen keys, bf16) comes from
// P^T by 16 x 16 transposes; the seen value rows are interleaved in pairs of keys (AMX's B layout:
// [key pair][d][2]); both are zero-padded to 32 keys. Per 64 columns of d, four C tiles (0-3)
// accumulate A = P's 32 keys (tile 4) times B = their 16 value pairs x 16 columns (tiles 5-7).
void values_amx(const c10::BFloat16* v, int64_t v_stride, int64_t d, const std::vector<int32_t>& seen,
                const float* pt, std::vector<c10::BFloat16>& h, float* o) {
  const int64_t n_seen = static_cast<int64_t>(seen.size()), n_pad = (n_seen + 31) / 32 * 32;
  h.resize(static_cast<size_t>(2 * n_pad * kLanes + n_pad * d));
  c10::BFloat16* ptb = h.data();             // P^T in bf16: [n_pad][16]
  c10::BFloat16* p = ptb + n_pad * kLanes;   // P: [16][n_pad]
  c10::BFloat16* vv = p + n_pad * kLanes;    // [n_pad / 2][d][2]
  for (int64_t n = 0; n < n_pad; ++n) {
    const __m256i row = n < n_seen ? (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(pt + n * kLanes)) : _mm256_setzero_si256();
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ptb + n * kLanes), row);
  }
  for (int64_t n0 = 0; n0 < n_pad; n0 += kLanes)
    at::vec::transpose_mxn<c10::BFloat16, kLanes, kLanes>(ptb + n0 * kLanes, kLanes, p + n0, n_pad);
  // out[2i] = first[i], out[2i + 1] = second[i]: i = 0..15 (lo) or 16..31 (hi)
  alignas(64) int16_t lo_idx[32], hi_idx[32];
  for (int i = 0; i < 16; ++i) {
    lo_idx[2 * i] = static_cast<int16_t>(i), lo_idx[2 * i + 1] = static_cast<int16_t>(32 + i);
    hi_idx[2 * i] = static_cast<int16_t>(16 + i), hi_idx[2 * i + 1] = static_cast<int16_t>(48 + i);
  }
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  for (int64_t kp = 0; kp < n_pad / 2; ++kp) {
    const c10::BFloat16* first = 2 * kp < n_seen ? v + seen[2 * kp] * v_stride : nullptr;
    const c10::BFloat16* second = 2 * kp + 1 < n_seen ? v + seen[2 * kp + 1] * v_stride : nullptr;
    for (int64_t d0 = 0; d0 < d; d0 += 32) {
      const __m512i x = first ? _mm512_loadu_si512(first + d0) : _mm512_setzero_si512();
      const __m512i y = second ? _mm512_loadu_si512(second + d0) : _mm512_setzero_si512();
      _mm512_storeu_si512(vv + (kp * d + d0) * 2, _mm512_permutex2var_epi16(x, lo, y));
      _mm512_storeu_si512(vv + (kp * d + d0 + 16) * 2, _mm512_permutex2var_epi16(x, hi, y));
    }
  }
  const int64_t p_bytes = n_pad * 2, vv_bytes = d * 4;
  for (int64_t dg = 0; dg < d; dg += 64) {
    const bool four = d - dg >= 64;  // else 32 columns: two C tiles
    _tile_zero(0);
    _tile_zero(1);
    if (four) {
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int64_t kc = 0; kc < n_pad; kc += 32) {
      const c10::BFloat16* b = vv + ((kc / 2) * d + dg) * 2;
      _tile_loadd(4, p + kc, p_bytes);
      _tile_loadd(5, b, vv_bytes);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, b + 32, vv_bytes);
      _tile_dpbf16ps(1, 4, 6);
      if (four) {
        _tile_loadd(7, b + 64, vv_bytes);
        _tile_dpbf16ps(2, 4, 7);
        _tile_loadd(5, b + 96, vv_bytes);
        _tile_dpbf16ps(3, 4, 5);
      }
    }
    _tile_stored(0, o + dg, d * 4);
    _tile_stored(1, o + dg + 16, d * 4);
    if (four) {
      _tile_stored(2, o + dg + 32, d * 4);
      _tile_stored(3, o + dg + 48, d * 4);
    }
  }
}

void attend(const Views& a, int64_t b, int64_t h, bool amx, Scratch& s) {
  const int64_t d = a.dim, L = a.keys;
  // f: q^T [d][16], S^T/P^T [L][16], values [L][16] (AVX) or O [16][d] (AMX), O^T [d][16] (AVX)
  s.f.resize(static_cast<size_t>(d * kLanes * 2 + 2 * L * kLanes));
  float* qt = s.f.data();
  float* st = qt + d * kLanes;
  float* vf = st + L * kLanes;
  float* ot = vf + L * kLanes;
  s.sees.resize(static_cast<size_t>((L + 63) / 64 * 64));
  const c10::BFloat16* q = a.q + b * a.qs[0] + h * a.qs[1];
  const c10::BFloat16* k = a.k + b * a.ks[0] + h * a.ks[1];
  const c10::BFloat16* v = a.v + b * a.vs[0] + h * a.vs[1];
  c10::BFloat16* out = a.out + b * a.os[0] + h * a.os[1];
  for (int64_t r0 = 0; r0 < a.rows; r0 += kLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, a.rows - r0));
    // q^T for these rows as bf16 pairs [d / 2][16 lanes] (zeros in dead lanes).
    int32_t* qp = reinterpret_cast<int32_t*>(qt);
    for (int64_t i = 0; i < d / 2 * kLanes; ++i) qp[i] = 0;
    for (int lane = 0; lane < lanes; ++lane) {
      const int32_t* qr = reinterpret_cast<const int32_t*>(q + (r0 + lane) * a.qs[2]);
      for (int64_t i = 0; i < d / 2; ++i) qp[i * kLanes + lane] = qr[i];
    }
    uint16_t* sees = s.sees.data();
    mark_sees(a, b, h, r0, lanes, sees);
    s.seen.clear();
    for (int64_t j = 0; j < L; ++j)
      if (sees[j]) s.seen.push_back(static_cast<int32_t>(j));
    const int64_t n_seen = static_cast<int64_t>(s.seen.size());
    const __m512 mx = amx ? scores_amx(k, a.ks[2], qp, d, L, sees, a.scale, st)
                          : scores_avx(k, a.ks[2], qp, d, sees, s.seen, a.scale, st);
    // Softmax numerators (masked lanes: exp(-inf) = 0) and their sums; a lane that sees no key
    // keeps max -inf, shifted by 0 instead so that it sums to 0 rather than NaN.
    const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    const __m512 shift = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(mx, neg_inf, _CMP_EQ_OQ), mx, _mm512_setzero_ps());
    __m512 sum = _mm512_setzero_ps();
    for (int64_t n = 0; n < n_seen; ++n) {  // packed: P^T row n is key seen[n]
      const __m512 p = Sleef_expf16_u10(_mm512_sub_ps(_mm512_loadu_ps(st + s.seen[n] * kLanes), shift));
      _mm512_storeu_ps(st + n * kLanes, p);
      sum = _mm512_add_ps(sum, p);
    }
    alignas(64) float inv[kLanes];
    const __m512 zero = _mm512_setzero_ps();
    _mm512_store_ps(inv, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(sum, zero, _CMP_GT_OQ), zero,
                                              _mm512_div_ps(_mm512_set1_ps(1.0f), sum)));
    if (amx) {
      float* o = vf;  // O: [16][d]
      values_amx(v, a.vs[2], d, s.seen, st, s.h, o);
      for (int lane = 0; lane < lanes; ++lane) {
        c10::BFloat16* dst = out + (r0 + lane) * a.os[2];
        const __m512 scale_lane = _mm512_set1_ps(inv[lane]);
        for (int64_t d0 = 0; d0 < d; d0 += kLanes)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d0),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o + lane * d + d0), scale_lane)));
      }
      continue;
    }
    values_avx(v, a.vs[2], d, s.seen, st, vf, ot);
    const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(kLanes));
    for (int lane = 0; lane < lanes; ++lane) {
      c10::BFloat16* dst = out + (r0 + lane) * a.os[2];
      const __m512 scale_lane = _mm512_set1_ps(inv[lane]);
      for (int64_t d0 = 0; d0 < d; d0 += kLanes) {  // O^T's column `lane`, 16 rows at a time
        const __m512 x = _mm512_i32gather_ps(column, ot + d0 * kLanes + lane, 4);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d0), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(x, scale_lane)));
      }
    }
  }
}

// The views of q, k, v, mask and out for the tasks; checks shapes and dtypes ("who" names the op).
Views make_views(const char* who, const at::Tensor& qc, const at::Tensor& kc, const at::Tensor& vc,
                 const std::optional<at::Tensor>& mask, double scale, const at::Tensor& out, at::Tensor& m) {
  const int64_t B = qc.size(0), H = qc.size(1), R = qc.size(2), D = qc.size(3), L = kc.size(2);
  TORCH_CHECK(kc.size(0) == B && kc.size(1) == H && kc.size(3) == D && vc.sizes() == kc.sizes(), who,
              ": k and v must be [", B, ", ", H, ", keys, ", D, "], got ", kc.sizes(), " and ", vc.sizes());
  TORCH_CHECK(D % kLanes == 0 && D > 0, who, ": the head dimension must be a multiple of 16, got ", D);
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, who, ": the mask must be boolean (True = may attend)");
    // Mask rows: one per query row, or one per token of a folded query (R a multiple of them:
    // row g * tokens + t reads mask row t), so the caller need not repeat the mask per head.
    TORCH_CHECK(mask->dim() == 4 && mask->size(3) == L && mask->size(2) > 0 && R % mask->size(2) == 0, who,
                ": the mask must be [batch|1, heads|1, rows or a divisor of rows (", R, "), ", L, "], got ",
                mask->sizes());
    m = mask->expand({B, H, mask->size(2), L});  // broadcast dimensions get stride 0
  }
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
  a.mask_rows = m.defined() ? m.size(2) : 1;
  a.rows = R;
  a.keys = L;
  a.dim = D;
  a.scale = static_cast<float>(scale);
  a.out = out.data_ptr<c10::BFloat16>();
  return a;
}

// One task per (batch, KV head), in parallel; `prepare(b, h, views)` may point the views' q at
// per-thread rows it fills first.
template <typename Prepare>
void run_tasks(const Views& a, int64_t B, int64_t H, Prepare prepare) {
  const bool amx = a.dim % 32 == 0 && diffcoder_kernels::request_amx_permission();
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    if (amx) diffcoder_kernels::configure_tiles();
    Scratch scratch;
    std::vector<c10::BFloat16> rows;
    for (int64_t t = t0; t < t1; ++t) {
      Views task = a;
      prepare(t / H, t % H, task, rows);
      attend(task, t / H, t % H, amx, scratch);
    }
    if (amx) _tile_release();
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "decode_attention: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "decode_attention: q, k and v must be bfloat16");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "decode_attention: q, k, v must be [batch, heads, rows, dim]");
  const at::Tensor qc = q.stride(3) == 1 ? q : q.contiguous();
  const at::Tensor kc = k.stride(3) == 1 ? k : k.contiguous();
  const at::Tensor vc = v.stride(3) == 1 ? v : v.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options()), m;
  const Views a = make_views("decode_attention", qc, kc, vc, mask, scale, out, m);
  if (a.keys == 0) return out.zero_();
  run_tasks(a, q.size(0), q.size(1), [](int64_t, int64_t, Views&, std::vector<c10::BFloat16>&) {});
  return out;
}

// out = x * cos + rotate_half(x) * sin for one head's row (d a multiple of 32), in fp32 with one
// rounding to bf16, as the compiled step computes it.
void rope_row(const c10::BFloat16* x, const c10::BFloat16* c, const c10::BFloat16* s, int64_t d, c10::BFloat16* out) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; i += kLanes) {
    const __m512 x1 = bf16x16_to_fp32(x + i), x2 = bf16x16_to_fp32(x + half + i);
    const __m512 lo = _mm512_sub_ps(_mm512_mul_ps(x1, bf16x16_to_fp32(c + i)), _mm512_mul_ps(x2, bf16x16_to_fp32(s + i)));
    const __m512 hi = _mm512_add_ps(_mm512_mul_ps(x2, bf16x16_to_fp32(c + half + i)),
                                    _mm512_mul_ps(x1, bf16x16_to_fp32(s + half + i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), (__m256i)_mm512_cvtneps_pbh(lo));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + half + i), (__m256i)_mm512_cvtneps_pbh(hi));
  }
}

// A decode step's attention from the fused q/k/v projection, the rotary tables and the KV cache:
// per (sequence, KV head), the step's keys (rotated) and values are written into the cache at
// `write_idx`, then its query heads (rotated, folded onto the KV head: row g * tokens + t is head
// h * group + g at token t) attend over the first `keys` cache columns. One op instead of the
// rotary, the cache writes, the folding copy and the attention, each of which costs a pass over
// small tensors with its own fixed cost.
//   heads [batch, tokens, n_heads + 2 kv, d]; cos, sin [batch|1, 1, tokens, d]; k_cache, v_cache
//   [batch, kv, columns, d] (written in place); write_idx [tokens]; mask over [.., rows, keys].
at::Tensor rope_cache_attention(const at::Tensor& heads, const at::Tensor& cos, const at::Tensor& sin,
                                at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& write_idx, int64_t keys,
                                int64_t n_heads, const std::optional<at::Tensor>& mask, double scale) {
  const char* who = "rope_cache_attention";
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&heads, &cos, &sin, &k_cache, &v_cache}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kBFloat16, who, ": bfloat16 CPU tensors only");
    TORCH_CHECK(t->dim() == 4 && t->stride(3) == 1, who, ": 4-D tensors with contiguous rows expected, got ",
                t->sizes(), " with strides ", t->strides());
  }
  const int64_t B = heads.size(0), T = heads.size(1), D = heads.size(3), KV = k_cache.size(1);
  TORCH_CHECK(n_heads > 0 && n_heads % KV == 0 && heads.size(2) == n_heads + 2 * KV, who, ": heads must hold ",
              n_heads, " query heads and ", KV, " key and value heads, got ", heads.sizes());
  TORCH_CHECK(D % 32 == 0, who, ": the head dimension must be a multiple of 32, got ", D);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == B && k_cache.size(3) == D, who,
              ": caches must be [", B, ", ", KV, ", columns, ", D, "], got ", k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(keys > 0 && keys <= k_cache.size(2), who, ": keys must be in [1, ", k_cache.size(2), "], got ", keys);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&cos, &sin})
    TORCH_CHECK((t->size(0) == B || t->size(0) == 1) && t->size(1) == 1 && t->size(2) == T && t->size(3) == D, who,
                ": cos and sin must be [", B, "|1, 1, ", T, ", ", D, "], got ", t->sizes());
  TORCH_CHECK(write_idx.scalar_type() == at::kLong && write_idx.dim() == 1 && write_idx.size(0) == T, who,
              ": write_idx must be ", T, " int64 cache columns");
  const at::Tensor idx = write_idx.contiguous();
  const int64_t* cols = idx.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(cols[t] >= 0 && cols[t] < keys, who, ": write column ", cols[t], " is outside the ", keys, " keys");
  const int64_t G = n_heads / KV, R = G * T;
  const at::Tensor k = k_cache.narrow(2, 0, keys), v = v_cache.narrow(2, 0, keys);
  at::Tensor out = at::empty({B, KV, R, D}, heads.options()), m;
  // q's views are replaced per task by the rotated rows (row stride D); the shape is what counts.
  const Views a = make_views(who, out.as_strided({B, KV, R, D}, {0, 0, D, 1}), k, v, mask, scale, out, m);
  const auto* hp = heads.data_ptr<c10::BFloat16>();
  const auto* cp = cos.data_ptr<c10::BFloat16>();
  const auto* sp = sin.data_ptr<c10::BFloat16>();
  auto* kp = k_cache.data_ptr<c10::BFloat16>();
  auto* vp = v_cache.data_ptr<c10::BFloat16>();
  const int64_t hs0 = heads.stride(0), hs1 = heads.stride(1), hs2 = heads.stride(2);
  const int64_t cs0 = cos.size(0) == 1 ? 0 : cos.stride(0), cs2 = cos.stride(2);
  const int64_t ss0 = sin.size(0) == 1 ? 0 : sin.stride(0), ss2 = sin.stride(2);
  const int64_t ks0 = k_cache.stride(0), ks1 = k_cache.stride(1), ks2 = k_cache.stride(2);
  const int64_t vs0 = v_cache.stride(0), vs1 = v_cache.stride(1), vs2 = v_cache.stride(2);
  run_tasks(a, B, KV, [&](int64_t b, int64_t h, Views& task, std::vector<c10::BFloat16>& rows) {
    rows.resize(static_cast<size_t>(R * D));
    for (int64_t t = 0; t < T; ++t) {
      const c10::BFloat16* tok = hp + b * hs0 + t * hs1;
      const c10::BFloat16 *c = cp + b * cs0 + t * cs2, *s = sp + b * ss0 + t * ss2;
      rope_row(tok + (n_heads + h) * hs2, c, s, D, kp + b * ks0 + h * ks1 + cols[t] * ks2);
      std::memcpy(vp + b * vs0 + h * vs1 + cols[t] * vs2, tok + (n_heads + KV + h) * hs2, D * sizeof(c10::BFloat16));
      for (int64_t g = 0; g < G; ++g) rope_row(tok + (h * G + g) * hs2, c, s, D, rows.data() + (g * T + t) * D);
    }
    task.q = rows.data() - b * task.qs[0] - h * task.qs[1];  // attend() adds these offsets back
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(diffcoder_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
  m.def("rope_cache_attention(Tensor heads, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor write_idx, int keys, int n_heads, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(diffcoder_cpu, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("rope_cache_attention", &rope_cache_attention);
}
