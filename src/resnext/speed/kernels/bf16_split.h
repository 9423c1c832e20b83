/* float32 to bf16 as the project's kernels split it: round to nearest (ties to even) in integer
 * arithmetic, and a value split into a bf16 high part and the bf16 rounding of what it leaves. */
#ifndef RESNEXT_BF16_SPLIT_H
#define RESNEXT_BF16_SPLIT_H

#include <immintrin.h>
#include <stdint.h>

/* a rounded to bf16 (nearest, ties to even), as float32 bits with the low half zero. Integer
 * arithmetic: the Intel Xeon's AVX512-BF16 conversions measured several times slower. */
__attribute__((target("avx512f"))) static inline __m512i round_bf16(__m512i bits) {
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
  return _mm512_and_si512(up, _mm512_set1_epi32((int)0xffff0000u));
}

/* 32 float32 values to bf16 hi = bf16(a) and, unless lo is NULL, lo = bf16(a - hi) (the
 * subtraction is exact), in K-pair order. */
__attribute__((target("avx512f,avx512bw"))) static inline void split32(const float *a,
                                                                        uint16_t *hi,
                                                                        uint16_t *lo) {
  /* the odd 16-bit words of two vectors of 32-bit lanes: their high halves, in order */
  const __m512i odd_words = _mm512_set_epi16(
      63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27, 25, 23, 21, 19,
      17, 15, 13, 11, 9, 7, 5, 3, 1);
  const __m512 a0 = _mm512_loadu_ps(a), a1 = _mm512_loadu_ps(a + 16);
  const __m512i h0 = round_bf16(_mm512_castps_si512(a0)), h1 = round_bf16(_mm512_castps_si512(a1));
  _mm512_storeu_si512(hi, _mm512_permutex2var_epi16(h0, odd_words, h1));
  if (!lo) return;
  const __m512i l0 = round_bf16(_mm512_castps_si512(_mm512_sub_ps(a0, _mm512_castsi512_ps(h0))));
  const __m512i l1 = round_bf16(_mm512_castps_si512(_mm512_sub_ps(a1, _mm512_castsi512_ps(h1))));
  _mm512_storeu_si512(lo, _mm512_permutex2var_epi16(l0, odd_words, l1));
}

#endif
