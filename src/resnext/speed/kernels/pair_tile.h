/* The register tiles of the project's AVX512-BF16 products: mr rows x NR = 64 columns of float32
 * accumulators, fed per pair of the reduction by four loads of the b operand's pairs and one
 * broadcast of each row's a pair (pointwise_gemm.c, stem_dot.c). mr is 6 (24 accumulators) or
 * MR = 7 (28, of which GCC keeps two on the stack): seven rows divide the 49 pixels of a 7x7 map
 * and the 112 of the stem's rows, where six computed 54 rows for 49 (a 7x7 layer at batch 1 ran
 * 10 % slower); on large maps six ran 1-4 % faster. */
#ifndef RESNEXT_PAIR_TILE_H
#define RESNEXT_PAIR_TILE_H

#include <immintrin.h>
#include <stdint.h>

#define MR 7 /* rows of the largest tile */
#define NV 4 /* 16-lane registers per tile row */
#define NR (16 * NV)

/* acc[i][.] += sum over kp pairs of (a pair of row i) * (64 columns of b) for rows i < mr (a
 * constant where this is inlined), the pairs of row i at a[i], a[i] + a_step, ... and the column
 * pairs at b, b + b_step, ... (in bf16 elements). */
static inline __attribute__((always_inline)) void dot_pairs(__m512 acc[MR][NV],
                                                            const uint16_t *a[MR], long a_step,
                                                            const uint16_t *b, long b_step,
                                                            long kp, const int mr) {
  for (long k = 0; k < kp; k++) {
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; j++) bv[j] = (__m512bh)_mm512_loadu_si512(b + 32 * j);
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
      const __m512bh pair = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(a[i] + k * a_step));
#pragma GCC unroll 4
      for (int j = 0; j < NV; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], pair, bv[j]);
    }
    b += b_step;
  }
}

#endif
