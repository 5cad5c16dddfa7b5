// y = x W^T in bf16 for decode-shaped inputs (a few to 64 rows) on CPUs with AMX (Intel Xeon
// 4th generation and later), built by diffcoder/kernels/__init__.py with torch.utils.cpp_extension.
//
// Why not oneDNN: a decode pass of a small model makes ~120 matmuls of 4-8 rows each, so it is a
// stream of weights from memory. oneDNN's prepacked bf16 kernel pays a fixed cost per call that is
// large next to such a matmul, and streams a whole pass's weights well below what a plain read of
// the same bytes reaches (benchmarks/linear_kernels.py --streamed, benchmarks/decode_speed.py
// "matmuls alone"). Here every weight is one contiguous stream of AMX B tiles, prefetched ahead,
// and a call costs a few us.
//
// Layout. W [N, K] is packed once into panels of 16 output columns, each in AMX's VNNI order:
// packed[p, k2, c, j] = W[16 p + c, 2 k2 + j], shape [ceil(N / 16), K2, 16, 2], K2 = ceil(K / 2)
// rounded up to 16 (zero padding). One B tile (16 pairs of k x 16 columns, 1 KB) is then
// contiguous, and so is a whole panel. x is copied into a zero-padded [16 m-tiles, 2 K2] buffer.
// For each panel, up to 4 C tiles (64 rows x 16 columns, fp32) accumulate A (x) x B (W) over k;
// the sums are rounded once to bf16 (round to nearest even), with the bias added in fp32 first,
// as F.linear does. Products of bf16 values are exact in fp32, so results differ from F.linear's
// only in the order of the fp32 additions.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr int64_t kPanelCols = 16;    // output columns per panel: one C tile's width in fp32
constexpr int64_t kTileRows = 16;     // rows of an A or C tile; k pairs of a B tile
constexpr int64_t kMaxMTiles = 4;     // C tiles per panel pass: 64 rows of x
// Software prefetch 4 KB ahead in the panel: the hardware prefetcher does not cover tile loads, and
// streaming with it alone is clearly slower (any distance from 2 to 8 KB does about as well).
constexpr int64_t kPrefetchElems = 2048;

using diffcoder_kernels::request_amx_permission;

// Tiles 0-3: C (fp32 sums, 16 x 16); 4, 5: A (x, 16 rows x 32 bf16); 6: B (W panel, 16 k pairs).
// `rows` < 16 shortens C0 and A4, for an x of fewer than 16 rows read in place.
void configure_tiles(int rows) { diffcoder_kernels::configure_tiles(rows, 1u << 0 | 1u << 4); }

int64_t padded_pairs(int64_t k) { return ((k + 1) / 2 + kTileRows - 1) / kTileRows * kTileRows; }

at::Tensor pack_amx(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "pack_amx: the weight must be 2-D [out, in], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "pack_amx: the weight must be bfloat16, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.device().is_cpu(), "pack_amx: the weight must be on the CPU");
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1), k2 = padded_pairs(k);
  const int64_t panels = (n + kPanelCols - 1) / kPanelCols;
  at::Tensor packed = at::zeros({panels, k2, kPanelCols, 2}, w.options());
  const auto* src = w.data_ptr<c10::BFloat16>();
  auto* dst = packed.data_ptr<c10::BFloat16>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t c = 0; c < kPanelCols && p * kPanelCols + c < n; ++c) {
        const c10::BFloat16* row = src + (p * kPanelCols + c) * k;
        c10::BFloat16* out = dst + p * k2 * kPanelCols * 2 + c * 2;
        for (int64_t kk = 0; kk < k; ++kk) out[(kk / 2) * kPanelCols * 2 + (kk % 2)] = row[kk];
      }
  });
  return packed;
}

// One panel against MT m-tiles of x: C[i] = sum over k of A[i] B, then stored to `sums`.
template <int MT>
void panel_sums(const uint16_t* x, int64_t x_row_bytes, const uint16_t* panel, int64_t k2, float* sums) {
  _tile_zero(0);
  if (MT > 1) _tile_zero(1);
  if (MT > 2) _tile_zero(2);
  if (MT > 3) _tile_zero(3);
  for (int64_t kb = 0; kb < k2; kb += kTileRows) {
    const uint16_t* b = panel + kb * kPanelCols * 2;
    for (int line = 0; line < kTileRows; ++line)
      _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchElems + line * 32), _MM_HINT_T0);
    _tile_loadd(6, b, 64);
    const char* a = reinterpret_cast<const char*>(x + kb * 2);
    _tile_loadd(4, a, x_row_bytes);
    _tile_dpbf16ps(0, 4, 6);
    if (MT > 1) {
      _tile_loadd(5, a + kTileRows * x_row_bytes, x_row_bytes);
      _tile_dpbf16ps(1, 5, 6);
    }
    if (MT > 2) {
      _tile_loadd(7, a + 2 * kTileRows * x_row_bytes, x_row_bytes);
      _tile_dpbf16ps(2, 7, 6);
    }
    if (MT > 3) {
      _tile_loadd(4, a + 3 * kTileRows * x_row_bytes, x_row_bytes);
      _tile_dpbf16ps(3, 4, 6);
    }
  }
  for (int i = 0; i < MT; ++i) {
    float* dst = sums + i * kTileRows * kPanelCols;
    switch (i) {
      case 0: _tile_stored(0, dst, 64); break;
      case 1: _tile_stored(1, dst, 64); break;
      case 2: _tile_stored(2, dst, 64); break;
      default: _tile_stored(3, dst, 64); break;
    }
  }
}

at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                      const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(request_amx_permission(), "amx_linear: the kernel refused AMX state to this process");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16,
              "amx_linear: x and the packed weight must be bfloat16, got ", x.scalar_type(), " and ",
              packed.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "amx_linear: CPU tensors only");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kPanelCols && packed.size(3) == 2,
              "amx_linear: `packed` must come from pack_amx, got shape ", packed.sizes());
  TORCH_CHECK(x.dim() >= 1, "amx_linear: x must have a feature dimension");
  const int64_t k = x.size(-1), k2 = packed.size(1), panels = packed.size(0), n = out_features;
  TORCH_CHECK(padded_pairs(k) == k2, "amx_linear: x has ", k, " features but the weight was packed for ",
              2 * k2, " (padded)");
  TORCH_CHECK(n > (panels - 1) * kPanelCols && n <= panels * kPanelCols, "amx_linear: out_features ", n,
              " does not match the packed weight's ", panels, " panels");
  const c10::BFloat16* bias_ptr = nullptr;
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n && bias->scalar_type() == at::kBFloat16,
                "amx_linear: the bias must be bfloat16 with out_features elements");
    bias_c = bias->contiguous();
    bias_ptr = bias_c.data_ptr<c10::BFloat16>();
  }
  const int64_t m = k == 0 ? 0 : x.numel() / k;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0) return out.view(out_shape);
  // x is read in place when its rows are already what A tiles want (a decode step: K a multiple of
  // 32, contiguous, and up to 16 rows (one shortened tile) or whole tiles of 16); otherwise it is
  // copied into a zero-padded buffer.
  const bool in_place = (m <= kTileRows || m % kTileRows == 0) && k == 2 * k2 && x.is_contiguous();
  const bool short_tile = in_place && m < kTileRows;
  const int64_t m_pad = short_tile ? m : (m + kTileRows - 1) / kTileRows * kTileRows;
  const int64_t x_cols = 2 * k2;
  at::Tensor xbuf = x;
  if (!in_place) {
    xbuf = at::zeros({m_pad, x_cols}, x.options());
    xbuf.narrow(0, 0, m).narrow(1, 0, k).copy_(x.reshape({m, k}));
  }
  const auto* xp = reinterpret_cast<const uint16_t*>(xbuf.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  auto* op = out.data_ptr<c10::BFloat16>();
  const int64_t panel_elems = k2 * kPanelCols * 2;

  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    configure_tiles(short_tile ? static_cast<int>(m) : kTileRows);
    alignas(64) float sums[kMaxMTiles * kTileRows * kPanelCols];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t cols = std::min(kPanelCols, n - p * kPanelCols);
      const __mmask16 col_mask = static_cast<__mmask16>((1u << cols) - 1);
      __m512 bias_v = _mm512_setzero_ps();
      if (bias_ptr) {
        bias_v = diffcoder_kernels::bf16x16_to_fp32(bias_ptr + p * kPanelCols, col_mask);
      }
      for (int64_t row0 = 0; row0 < m_pad; row0 += kMaxMTiles * kTileRows) {
        const int64_t mt = short_tile ? 1 : std::min(kMaxMTiles, (m_pad - row0) / kTileRows);
        const uint16_t* xm = xp + row0 * x_cols;
        const uint16_t* panel = wp + p * panel_elems;
        switch (mt) {
          case 4: panel_sums<4>(xm, x_cols * 2, panel, k2, sums); break;
          case 3: panel_sums<3>(xm, x_cols * 2, panel, k2, sums); break;
          case 2: panel_sums<2>(xm, x_cols * 2, panel, k2, sums); break;
          default: panel_sums<1>(xm, x_cols * 2, panel, k2, sums); break;
        }
        const int64_t rows = std::min(mt * kTileRows, m - row0);
        for (int64_t r = 0; r < rows; ++r) {
          const __m512 v = _mm512_add_ps(_mm512_load_ps(sums + r * kPanelCols), bias_v);
          _mm256_mask_storeu_epi16(op + (row0 + r) * n + p * kPanelCols, col_mask,
                                   (__m256i)_mm512_cvtneps_pbh(v));
        }
      }
    }
    _tile_release();
  });
  return out.view(out_shape);
}


// The packed copy of each weight, made on first use and remade when the weight changed in place
// (its version counter moved, or its storage was swapped), so updates are never served stale.
// Keyed by the weight's TensorImpl; a weak reference tells a live weight from a freed one whose
// address was reused, and entries of freed weights are dropped whenever a new one is added.
struct PackedEntry {
  c10::weak_intrusive_ptr<c10::TensorImpl> owner;
  int64_t version;
  const void* data;
  at::Tensor packed;
};

std::mutex cache_mutex;
std::unordered_map<const c10::TensorImpl*, PackedEntry> packed_cache;

int64_t weight_version(const at::Tensor& w) { return w.is_inference() ? -1 : static_cast<int64_t>(w._version()); }

at::Tensor packed_weight(const at::Tensor& w) {
  const int64_t version = weight_version(w);
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = packed_cache.find(w.unsafeGetTensorImpl());
  if (it != packed_cache.end() && !it->second.owner.expired() && it->second.version == version &&
      it->second.data == w.data_ptr())
    return it->second.packed;
  for (auto e = packed_cache.begin(); e != packed_cache.end();)
    e = e->second.owner.expired() ? packed_cache.erase(e) : std::next(e);
  at::Tensor packed = pack_amx(w.detach());
  packed_cache.insert_or_assign(
      w.unsafeGetTensorImpl(),
      PackedEntry{c10::weak_intrusive_ptr<c10::TensorImpl>(w.getIntrusivePtr()), version, w.data_ptr(), packed});
  return packed;
}

// F.linear(x, w, bias) for a bf16 weight in its usual [out, in] layout, packed behind the scenes.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && x.size(-1) == w.size(1), "packed_linear: x has ", x.size(-1),
              " features, the weight ", w.sizes());
  return amx_linear(x, packed_weight(w), w.size(0), bias);
}

int64_t packed_weights() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  int64_t live = 0;
  for (const auto& e : packed_cache) live += !e.second.owner.expired();
  return live;
}

bool amx_ready() { return request_amx_permission(); }

}  // namespace

TORCH_LIBRARY(diffcoder_cpu, m) {
  m.def("pack_amx(Tensor weight) -> Tensor");
  m.def("amx_linear(Tensor x, Tensor packed, int out_features, Tensor? bias) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("packed_weights() -> int", &packed_weights);
  m.def("amx_ready() -> bool", &amx_ready);
}

TORCH_LIBRARY_IMPL(diffcoder_cpu, CPU, m) {
  m.impl("pack_amx", &pack_amx);
  m.impl("amx_linear", &amx_linear);
  m.impl("packed_linear", &packed_linear);
}
