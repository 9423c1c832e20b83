/* bf16 grouped 3x3 with 4 or 8 channels per group on AVX512-BF16 pair dot products, with the
 * channels in the "split" order (included by grouped3x3.c; packing 3).
 *
 * In channel order a group's pairs share a register with other groups' pairs, so each output's
 * sum is spread over lanes: the kernels of packing 1 sum lanes and put outputs in place with 6
 * (4 per group) or 14 (8 per group) permutes per pixel and 32 channels, a third of the time of
 * their 36 or 72 dot products. Here a block of 16 groups (B = 16 cpg channels) is stored so that
 * no lane crosses a group:
 *   input position 32 r + 2 g + k of a block is channel cpg g + 2 r + k (pair r of group g);
 *   output position 16 o + g is channel cpg g + o (output o of group g).
 * So input register r holds pair r of the 16 groups, and accumulator o gets, lane by lane, output
 * o of each group: every dot product is useful and no lane moves. The order is free to choose
 * inside a bottleneck: the 1x1 before writes its outputs in it and the 1x1 after reads its inputs
 * in it (resnext.speed.group_order permutes their weights).
 *
 * A tile is P = 16 / cpg pixels of an output row by one block: P x cpg = 16 accumulators, the
 * tile's P x R input registers (R = cpg / 2) held for each tap while each of the tap's cpg x R
 * weight vectors is loaded once and used for every pixel; a thread walks an output row block by
 * block. Packed weights:
 * wq[C/B][9][cpg][R][32] bf16, value 2 g + k of vector (o, r) the weight from input 2 r + k of
 * group g of the block to its output o. bias (or NULL): float32 in the output order. */
#ifndef RESNEXT_GROUPED3X3_SPLIT_H
#define RESNEXT_GROUPED3X3_SPLIT_H

#include <immintrin.h>
#include <stdint.h>

#include "input_prefetch.h"

#define SPLIT_P 4 /* the most pixels of a tile (4 per group) */
/* what a pixel outside the image (or past the row) reads: a block of zeros, 8 per group */
static const uint16_t ZERO_BLOCK[128] __attribute__((aligned(64)));

/* One tile: P pixels from ow0 of output row oh, block b (cpg, R, P, B constants where inlined). */
static inline __attribute__((always_inline)) void split_tile(const uint16_t *xn,
                                                             const uint16_t *wq, const float *bias,
                                                             uint16_t *yr, int H, int W, int C,
                                                             int Wo, int oh, int ow0, int s,
                                                             int relu, int b, const int cpg,
                                                             const int R, const int P,
                                                             const int B) {
  const int np = Wo - ow0 < P ? Wo - ow0 : P;
  /* the next tile's columns of the rows this output row is the first to read (the other rows
   * were read by the row before, and are in cache), this block's channels */
  const int next = (ow0 + P - 1) * s + 2;
  prefetch_pixels(xn, H, W, 2L * C, oh * s + 2 - s, oh * s + 1, next, P * s, 2L * b * B, 2L * B);
  prefetch_outputs(yr, 2L * C, ow0 + P, P, Wo, 2L * b * B, 2L * B);
  __m512 acc[SPLIT_P][8];
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
    for (int o = 0; o < cpg; ++o) acc[p][o] = _mm512_setzero_ps();
  for (int kh = 0; kh < 3; ++kh) {
    const int ih = oh * s - 1 + kh;
    if (ih < 0 || ih >= H) continue;
    const uint16_t *xrow = xn + (long)ih * W * C + (long)b * B;
    for (int kw = 0; kw < 3; ++kw) {
      const uint16_t *wt = wq + ((long)b * 9 + kh * 3 + kw) * cpg * R * 32;
      __m512bh v[SPLIT_P][4];
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) {
        const int iw = (ow0 + p) * s - 1 + kw;
        const uint16_t *src = p < np && iw >= 0 && iw < W ? xrow + (long)iw * C : ZERO_BLOCK;
#pragma GCC unroll 4
        for (int q = 0; q < R; ++q) v[p][q] = (__m512bh)_mm512_loadu_si512(src + 32 * q);
      }
#pragma GCC unroll 8
      for (int o = 0; o < cpg; ++o)
#pragma GCC unroll 4
        for (int q = 0; q < R; ++q) {
          const __m512bh w = (__m512bh)_mm512_loadu_si512(wt + (o * R + q) * 32);
#pragma GCC unroll 4
          for (int p = 0; p < P; ++p) acc[p][o] = _mm512_dpbf16_ps(acc[p][o], v[p][q], w);
        }
    }
  }
#pragma GCC unroll 8
  for (int o = 0; o < cpg; ++o) {
    const __m512 bo = bias ? _mm512_loadu_ps(bias + b * B + 16 * o) : _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      if (p >= np) continue;
      __m512 out = _mm512_add_ps(acc[p][o], bo);
      if (relu) out = _mm512_max_ps(out, _mm512_setzero_ps());
      _mm256_storeu_si256((__m256i *)(yr + (long)(ow0 + p) * C + b * B + 16 * o),
                          (__m256i)_mm512_cvtneps_pbh(out));
    }
  }
}

/* One output row (image n = r / Ho, row r % Ho), every block (cpg a constant where inlined). */
static inline __attribute__((always_inline)) void split_row(const uint16_t *x, const uint16_t *wq,
                                                            const float *bias, uint16_t *y, int H,
                                                            int W, int C, int Ho, int Wo, int s,
                                                            int relu, long r, const int cpg) {
  const int R = cpg / 2, P = 16 / cpg, B = 16 * cpg;
  const long n = r / Ho;
  const int oh = (int)(r % Ho);
  const uint16_t *xn = x + n * (long)H * W * C;
  uint16_t *yr = y + r * (long)Wo * C;
  /* block by block along the row: a block's weights stay in L1 (18 KB with 8 per group; tile by
   * tile over every block instead, 256 channels' 36 KB did not, and ran 1.2x slower) */
  RowAhead ahead = row_ahead(xn, H, W, C, 2, oh, s, (long)(C / B) * ((Wo + P - 1) / P), 0);
  for (int b = 0; b < C / B; ++b)
    for (int ow0 = 0; ow0 < Wo; ow0 += P) {
      row_ahead_step(&ahead); /* stride 2: 1.46x faster in cache, 1.54x evicted */
      split_tile(xn, wq, bias, yr, H, W, C, Wo, oh, ow0, s, relu, b, cpg, R, P, B);
    }
}
static void row_split_c4(const void *x, const float *wq, const float *bias, void *y, int H, int W,
                         int C, int cpg, int Ho, int Wo, int s, int relu, long r) {
  (void)cpg;
  split_row(x, (const uint16_t *)wq, bias, y, H, W, C, Ho, Wo, s, relu, r, 4);
}

static void row_split_c8(const void *x, const float *wq, const float *bias, void *y, int H, int W,
                         int C, int cpg, int Ho, int Wo, int s, int relu, long r) {
  (void)cpg;
  split_row(x, (const uint16_t *)wq, bias, y, H, W, C, Ho, Wo, s, relu, r, 8);
}

/* 1 if the split-order kernels (packing 3) take the shape: 4 or 8 channels per group, whole
 * blocks of 16 groups, stride 1 or 2. */
int grouped3x3_split_supported(int C, int cpg, int s) {
  return (cpg == 4 || cpg == 8) && C % (16 * cpg) == 0 && (s == 1 || s == 2);
}

#endif
