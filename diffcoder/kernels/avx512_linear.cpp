// y = x W^T for bf16 x and W on CPUs with AVX-512F but no bf16 dot-product instructions (no AMX,
// no avx512_bf16: Intel Xeon Skylake to Ice Lake, AMD Zen 3), built by diffcoder/kernels/__init__.py
// with torch.utils.cpp_extension as its own library (no AMX or bf16 instructions in it).
//
// Why not oneDNN: without native bf16 instructions its bf16 matmul converts as it goes and runs
// well below both the float32 FMA rate and the memory's (benchmarks/linear_kernels.py). Here a bf16
// weight is widened to fp32 in registers (exact: a bf16 is the top half of an fp32) and multiplied
// with fp32 FMAs: half the bytes of a float32 weight at the float32 compute rate.
//
// Layout: none. W stays in its usual [N, K] row-major layout (no packed copy to keep or refresh):
// each output is a dot product along k, 16 lanes at a time, of one row of x and one row of W. A
// tile of up to kMaxRows rows of x against kCols rows of W keeps kMaxRows x kCols fp32 vector sums
// in registers; each is reduced across its lanes at the end. Every output is therefore summed in
// the same order whatever the tile it fell in, so a row's result never depends on the rows
// batched with it. Columns are taken kChunkCols at a time, all row tiles per chunk, so that a
// chunk's weights are read from memory once and from cache for the other row tiles. The sums get
// the bias in fp32 and are rounded once to bf16 (round to nearest even), as F.linear does.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <vector>

namespace {

constexpr int kCols = 4;             // rows of W (output columns) per tile
constexpr int kMaxRows = 6;          // rows of x per tile: 24 vector sums + 4 weight vectors in registers
constexpr int64_t kChunkCols = 64;   // output columns whose weights stay in cache across row tiles
// Software prefetch 4 KB ahead in each weight row: with the hardware prefetcher alone a 4-row
// decode matmul streams a large weight clearly slower.
constexpr int64_t kPrefetchElems = 2048;

using diffcoder_kernels::bf16x16_to_fp32;

// out[r * kChunkCols + c] = sum over k of x[r, k] w[c, k], for R rows of x (fp32, row stride k) and
// C rows of w (bf16, row stride k).
template <int R, int C>
void tile_sums(const float* x, const c10::BFloat16* w, int64_t k, float* out) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  int64_t kk = 0;
  for (; kk + 16 <= k; kk += 16) {
    __m512 wv[C];
    for (int c = 0; c < C; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(w + c * k + kk + kPrefetchElems), _MM_HINT_T0);
      wv[c] = bf16x16_to_fp32(w + c * k + kk);
    }
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * k + kk);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  if (kk < k) {  // the last k % 16 features; the other lanes read as 0
    const __mmask16 live = static_cast<__mmask16>((1u << (k - kk)) - 1);
    __m512 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = bf16x16_to_fp32(w + c * k + kk, live);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(live, x + r * k + kk);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * kChunkCols + c] = _mm512_reduce_add_ps(acc[r][c]);
}

template <int R>
void row_tile_sums(const float* x, const c10::BFloat16* w, int64_t k, int cols, float* out) {
  int c = 0;
  for (; c + kCols <= cols; c += kCols) tile_sums<R, kCols>(x, w + c * k, k, out + c);
  for (; c < cols; ++c) tile_sums<R, 1>(x, w + c * k, k, out + c);
}

// 16 fp32 values rounded to bf16, nearest even (c10::BFloat16's rounding; a NaN becomes 0x7FC0).
inline __m256i fp32x16_to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC00000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "bf16_linear: x and the weight must be bfloat16, got ", x.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "bf16_linear: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2, "bf16_linear: the weight must be 2-D [out, in], got ", weight.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), "bf16_linear: x has ", x.size(-1),
              " features, the weight ", weight.sizes());
  const int64_t n = weight.size(0), k = weight.size(1);
  const at::Tensor w = weight.contiguous();
  std::vector<float> bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n && bias->scalar_type() == at::kBFloat16,
                "bf16_linear: the bias must be bfloat16 with out_features elements");
    const at::Tensor b = bias->contiguous();
    const auto* bp = b.data_ptr<c10::BFloat16>();
    bias_f.assign(bp, bp + n);  // c10::BFloat16 -> float: exact
  }
  const int64_t m = k == 0 ? 0 : x.numel() / k;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out.view(out_shape);
  // x widened to fp32 once (exact), rows contiguous.
  const at::Tensor xf = x.reshape({m, k}).to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  const auto* wp = w.data_ptr<c10::BFloat16>();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  const float* bias_p = bias_f.empty() ? nullptr : bias_f.data();
  const int64_t chunks = (n + kChunkCols - 1) / kChunkCols;

  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    alignas(64) float sums[kMaxRows * kChunkCols];
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      const int64_t n0 = chunk * kChunkCols;
      const int cols = static_cast<int>(std::min(kChunkCols, n - n0));
      const c10::BFloat16* wc = wp + n0 * k;
      for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, m - r0));
        const float* xr = xp + r0 * k;
        switch (rows) {
          case 6: row_tile_sums<6>(xr, wc, k, cols, sums); break;
          case 5: row_tile_sums<5>(xr, wc, k, cols, sums); break;
          case 4: row_tile_sums<4>(xr, wc, k, cols, sums); break;
          case 3: row_tile_sums<3>(xr, wc, k, cols, sums); break;
          case 2: row_tile_sums<2>(xr, wc, k, cols, sums); break;
          default: row_tile_sums<1>(xr, wc, k, cols, sums); break;
        }
        for (int r = 0; r < rows; ++r)
          for (int c = 0; c < cols; c += 16) {
            const __mmask16 live = static_cast<__mmask16>(cols - c >= 16 ? 0xFFFF : (1u << (cols - c)) - 1);
            __m512 v = _mm512_maskz_loadu_ps(live, sums + r * kChunkCols + c);
            if (bias_p) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(live, bias_p + n0 + c));
            _mm256_mask_storeu_epi16(op + (r0 + r) * n + n0 + c, live, fp32x16_to_bf16(v));
          }
      }
    }
  });
  return out.view(out_shape);
}

}  // namespace

TORCH_LIBRARY(diffcoder_avx512, m) { m.def("bf16_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(diffcoder_avx512, CPU, m) { m.impl("bf16_linear", &bf16_linear); }
