// Shared by the native CPU kernels: bf16 widening, and AMX's per-process permission and tile
// configuration.
#pragma once
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace diffcoder_kernels {

// 16 bf16 values widened to fp32 (exact: a bf16 is the top half of an fp32), lanes outside
// `live` read as 0.
inline __m512 bf16x16_to_fp32(const c10::BFloat16* p, __mmask16 live = 0xFFFF) {
  const __m256i raw = _mm256_maskz_loadu_epi16(live, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Linux grants the 8 KB AMX register state per process on request (ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); oneDNN asks the same way. Idempotent.
inline bool request_amx_permission() {
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return granted;
}

// AMX palette 1: eight tiles of up to 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows x 64 bytes, except tiles `short_tiles` (a bit set) with `rows` rows.
inline void configure_tiles(int rows = 16, unsigned short_tiles = 0) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = (short_tiles >> t & 1u) ? static_cast<uint8_t>(rows) : 16;
    cfg.colsb[t] = 64;
  }
  // GCC does not treat ldtilecfg as reading `cfg` and may sink the stores above after it once
  // this is inlined (a general-protection fault on an uninitialized configuration).
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

}  // namespace diffcoder_kernels
