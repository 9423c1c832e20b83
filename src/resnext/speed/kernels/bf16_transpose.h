/* Re-laying bf16 (uint16) data for AMX tiles with AVX-512: a 16 x 16 transpose (rows of one
 * operand made columns, for an A operand whose depth is the other axis) and two rows interleaved
 * value by value (AMX's pairs, for a B operand). Header-only; each including kernel is built with
 * AVX-512F/BW/VL. */
#ifndef RESNEXT_BF16_TRANSPOSE_H
#define RESNEXT_BF16_TRANSPOSE_H

#include <immintrin.h>

/* 16 rows of 16 bf16 transposed in place: r[c] becomes element c of every input row. Interleaves
 * of 16, 32 and 64 bits within 128-bit lanes, then the lanes swapped. */
static inline void transpose16(__m256i r[16]) {
  __m256i t[16], u[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm256_unpacklo_epi16(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm256_unpackhi_epi16(r[2 * k], r[2 * k + 1]);
  }
  for (int q = 0; q < 4; ++q) { /* rows 4q .. 4q + 3 */
    u[4 * q] = _mm256_unpacklo_epi32(t[4 * q], t[4 * q + 2]);
    u[4 * q + 1] = _mm256_unpackhi_epi32(t[4 * q], t[4 * q + 2]);
    u[4 * q + 2] = _mm256_unpacklo_epi32(t[4 * q + 1], t[4 * q + 3]);
    u[4 * q + 3] = _mm256_unpackhi_epi32(t[4 * q + 1], t[4 * q + 3]);
  }
  /* u[4q + j] holds, for rows 4q .. 4q + 3, columns 2j, 2j + 1 (lane 0) and 2j + 8, 2j + 9 */
  for (int h = 0; h < 2; ++h) /* rows 8h .. 8h + 7 */
    for (int j = 0; j < 4; ++j) {
      t[8 * h + 2 * j] = _mm256_unpacklo_epi64(u[8 * h + j], u[8 * h + 4 + j]);
      t[8 * h + 2 * j + 1] = _mm256_unpackhi_epi64(u[8 * h + j], u[8 * h + 4 + j]);
    }
  /* t[8h + c] holds rows 8h .. 8h + 7 of column c (lane 0) and of column c + 8 (lane 1) */
  for (int c = 0; c < 8; ++c) {
    r[c] = _mm256_permute2x128_si256(t[c], t[8 + c], 0x20);
    r[c + 8] = _mm256_permute2x128_si256(t[c], t[8 + c], 0x31);
  }
}

/* 16 values of row a and of row b as one 64-byte row of pairs: a0 b0 a1 b1 ... a15 b15. */
static inline __m512i pair_rows(__m256i a, __m256i b) {
  const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                       39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  /* index bit 5 picks the second operand: words 32-47 are b's 16 values */
  return _mm512_permutex2var_epi16(_mm512_castsi256_si512(a), idx, _mm512_castsi256_si512(b));
}

#endif
