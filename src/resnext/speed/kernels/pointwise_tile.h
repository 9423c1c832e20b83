/* The inference 1x1 product's register tile and its walk over a thread's rows (see
 * pointwise_gemm.c for the operands' layouts): shared by pointwise_gemm.c and by grouped3x3.c,
 * whose fused kernel computes a bottleneck's first 1x1 a few rows ahead of the grouped 3x3 that
 * reads them. Header-only; the including kernel is built with AVX512-BF16. */
#ifndef RESNEXT_POINTWISE_TILE_H
#define RESNEXT_POINTWISE_TILE_H

#include <immintrin.h>
#include <stdint.h>

#include "bf16_io.h"
#include "pair_tile.h"

/* A second product summed into a tile's sums (a projection shortcut's, `shortcut_product`):
 * row i of its input at a + offs[i] (offs holding the next tile's rows too), K values. */
typedef struct {
  const uint16_t *a;
  const long *offs;
  int K;
} Second;

/* One mr x NR tile of y over all of K (mr 6 or 7, a constant where this is inlined). Rows past
 * `rows` repeat the last row's a (no reads beyond the matrix) and are not stored. Row i of a is at
 * a + i * lda, or with `offs` (a strided convolution's rows) at a + offs[i], offs holding the
 * next tile's rows too. With `second` (NULL where inlined without), its product over the next
 * second->K pair rows of b is added before the epilogue. */
static inline __attribute__((always_inline)) void tile(const uint16_t *a, long lda,
                                                       const uint16_t *b, long b_step, int K,
                                                       uint16_t *y, long ldy, int rows,
                                                       const float *bias, const uint16_t *res,
                                                       int relu, const long *offs,
                                                       const Second *second, const int mr) {
  const uint16_t *arow[MR];
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < mr; i++) {
    arow[i] = offs ? a + offs[i < rows ? i : rows - 1] : a + (i < rows ? i : rows - 1) * lda;
#pragma GCC unroll 4
    for (int j = 0; j < NV; j++) acc[i][j] = _mm512_setzero_ps();
  }
  /* The next tile's rows (the caller walks down the rows of one strip): both cache lines of
   * each y row's 64 columns, and the first two of each a row, a 64-channel row whole (the
   * hardware prefetcher follows longer rows). One line of each ran 2-10 % slower at 56x56. */
#pragma GCC unroll 8
  for (int i = 0; i < mr; i++) {
    const uint16_t *next = offs ? a + offs[i + mr] : a + (i + mr) * lda;
    _m_prefetchw(y + (i + mr) * ldy);
    _m_prefetchw(y + (i + mr) * ldy + 32);
    _mm_prefetch((const char *)next, _MM_HINT_T0);
    _mm_prefetch((const char *)(next + 32), _MM_HINT_T0);
    if (second) {
      const uint16_t *next2 = second->a + second->offs[i + mr];
      _mm_prefetch((const char *)next2, _MM_HINT_T0);
      _mm_prefetch((const char *)(next2 + 32), _MM_HINT_T0);
    }
  }
  dot_pairs(acc, arow, 2, b, b_step, K / 2, mr);
  if (second) {
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) arow[i] = second->a + second->offs[i < rows ? i : rows - 1];
    dot_pairs(acc, arow, 2, b + (long)(K / 2) * b_step, b_step, second->K / 2, mr);
  }
  if (bias) { /* a convolution's epilogue: + bias (+ residual), ReLU, then one rounding */
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
      if (i >= rows) break;
#pragma GCC unroll 4
      for (int j = 0; j < NV; j++) {
        acc[i][j] = _mm512_add_ps(acc[i][j], _mm512_loadu_ps(bias + 16 * j));
        if (res) {
          const __m256i r = _mm256_loadu_si256((const __m256i *)(res + i * ldy + 16 * j));
          acc[i][j] = _mm512_add_ps(acc[i][j], widen_bf16(r));
        }
        if (relu) acc[i][j] = _mm512_max_ps(acc[i][j], _mm512_setzero_ps());
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < mr; i++) {
    if (i >= rows) break;
#pragma GCC unroll 2
    for (int j = 0; j < NV; j += 2) {
      /* round to nearest even; the second argument fills the low 16 lanes */
      const __m512bh v = _mm512_cvtne2ps_pbh(acc[i][j + 1], acc[i][j]);
      _mm512_storeu_si512(y + i * ldy + 16 * j, (__m512i)v);
    }
  }
}

/* Rows i0 .. i1 - 1 (below `end`) of a (as `tile` finds them), all K values, into L2. Called
 * out of line (not inlined) it gained nothing; why is not known. */
static inline __attribute__((always_inline)) void prefetch_rows(const uint16_t *a, long lda,
                                                                const long *offs, int K, long i0,
                                                                long i1, long end) {
  for (long i = i0; i < i1 && i < end; i++) {
    const uint16_t *row = offs ? a + offs[i] : a + i * lda;
    for (int k = 0; k < K; k += 32) _mm_prefetch((const char *)(row + k), _MM_HINT_T1);
  }
}

/* A thread's tiles: rows r0 .. r1 - 1 of column strips s0 .. s1 - 1, in blocks of 8 tiles of rows
 * (kept in L2 while each strip passes over them), mr rows a tile (a constant where inlined). */
static inline __attribute__((always_inline)) void walk(const uint16_t *a, long lda,
                                                       const uint16_t *bp, int strip_major,
                                                       uint16_t *y, long ldy, int K, int N,
                                                       const float *bias, const uint16_t *res,
                                                       int relu, const long *offs,
                                                       const Second *second, long r0, long r1,
                                                       long s0, long s1, const int mr) {
  const long depth = K + (second ? second->K : 0); /* values per packed strip row */
  for (long m0 = r0; m0 < r1; m0 += 8 * mr) {
    const long m1 = m0 + 8 * mr < r1 ? m0 + 8 * mr : r1;
    for (long n0 = s0 * NR; n0 < s1 * NR; n0 += NR)
      for (long m = m0; m < m1; m += mr) {
        const int rows = m1 - m < mr ? (int)(m1 - m) : mr;
        if (K > 64 && n0 == s0 * NR) prefetch_rows(a, lda, offs, K, m + 8 * mr, m + 9 * mr, r1);
        if (second && second->K > 64 && n0 == s0 * NR)
          prefetch_rows(second->a, 0, second->offs, second->K, m + 8 * mr, m + 9 * mr, r1);
        const Second at = {second ? second->a : 0, second ? second->offs + m : 0,
                           second ? second->K : 0};
        if (strip_major) /* the inference convolution's packing, with its epilogue */
          tile(offs ? a : a + m * lda, lda, bp + n0 * depth, 2 * NR, K, y + m * ldy + n0, ldy,
               rows, bias + n0, res ? res + m * ldy + n0 : 0, relu, offs ? offs + m : 0,
               second ? &at : 0, mr);
        else /* the plain product, as the training step uses it */
          tile(a + m * lda, lda, bp + 2 * n0, 2L * N, K, y + m * ldy + n0, ldy, rows, 0, 0, 0, 0,
               0, mr);
      }
  }
}

#endif
