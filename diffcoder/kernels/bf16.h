// Shared by the native CPU kernels: 16 bf16 values widened to fp32 (exact: a bf16 is the top half
// of an fp32), lanes outside `live` read as 0.
#pragma once
#include <c10/util/BFloat16.h>
#include <immintrin.h>

namespace diffcoder_kernels {

inline __m512 bf16x16_to_fp32(const c10::BFloat16* p, __mmask16 live = 0xFFFF) {
  const __m256i raw = _mm256_maskz_loadu_epi16(live, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

}  // namespace diffcoder_kernels
