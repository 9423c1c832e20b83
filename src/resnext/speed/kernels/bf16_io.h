/* AVX-512 helpers shared by the kernels that stream float32 or bfloat16 activations: widening a
 * bf16 load to float32, rounding float32 to bf16 exactly as torch does, storing either dtype, and
 * the lane mask of a channel block's tail. Header-only; each including kernel is built with
 * AVX-512F/BW/VL. */
#ifndef RESNEXT_BF16_IO_H
#define RESNEXT_BF16_IO_H

#include <immintrin.h>
#include <stdint.h>

/* 16 bf16 values (as uint16) to float32: the bits, shifted into the high half. */
static inline __m512 widen_bf16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* Round to nearest even, as torch's float -> bfloat16 conversion does; NaN stays a quiet NaN. */
static inline __m256i to_bf16(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  r = _mm512_srli_epi32(r, 16);
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

enum { F32 = 0, BF16 = 1 }; /* the kernels' dtype codes (float32, bfloat16 stored as uint16) */

/* Store the lanes m of v at element `offset` of a float32 or bf16 (rounded as above) array. */
static inline void store(void *base, int dtype, long offset, __mmask16 m, __m512 v) {
  if (dtype == F32)
    _mm512_mask_storeu_ps((float *)base + offset, m, v);
  else
    _mm256_mask_storeu_epi16((uint16_t *)base + offset, m, to_bf16(v));
}

/* Lanes of the 16-channel block starting at channel c that lie below `channels`. */
static inline __mmask16 lanes(long c, long channels) {
  long left = channels - c;
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

#endif
