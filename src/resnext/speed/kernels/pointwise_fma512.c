/* Float32 1×1 convolution of a channels-last tensor with 512-bit FMAs (AVX-512F): the AVX-512
 * build of `pointwise_fma` (`pointwise_fma.c` is the AVX2 one), with the same arguments and the
 * same packed weight.
 *
 * The weight is packed in panels of 16 output channels, each a C_in × 16 row-major block
 * (`pointwise_fma.pack`), so that one input channel's 16 weights of a panel are one 16-lane
 * vector. A register tile is 7 output pixels × 4 panels (64 outputs): 28 accumulators and 4
 * weight vectors, each input channel costing 28 FMAs, 4 vector loads and 7 broadcasts. That is
 * one register more than the 32 with the broadcast, so GCC keeps one accumulator on the stack
 * (a load and a store per 28 FMAs). 7 rows because every feature map of a ResNet at 224² has a
 * multiple of 7 pixels (56², 28², 14², 7²), so no tile computes rows it throws away: at batch 1,
 * 7 × 4 ran ResNeXt-50's 36 1×1s in 0.99× the time of 6 × 4 (49 pixels in 9 tiles of 6) and
 * 0.74–0.82× that of 12 × 2 and 14 × 2, whose tiles of 12 or 14 pixels waste rows there
 * (benchmarks/RESULTS.md, stop 68). Outputs left over past the last multiple of 64 take tiles
 * of one panel.
 *
 * Blocking (on an AMD Zen 4, 32 KB L1, 1 MB L2 a core): the input channels are taken 256 at a
 * time; a block is 8 tiles (56 pixels) × 8 panels, so a 4-panel slice (64 KB) is read from L2
 * by the block's tiles while their 7 rows' slices (7 KB) stay in L1. Partial sums go to the
 * output between slices; the first slice starts from the bias (and the residual, which is why
 * the output may be the residual itself: each tile reads its residual before it writes there),
 * the last applies the ReLU. The first tile over each weight slice prefetches the next slice
 * (the block's next panels, or its first panels' next input channels) into L2, one cache line
 * per input channel and panel: at batch 1 a layer's weights come from memory and each is used
 * by few tiles. Spreading those prefetches over all the block's tiles, or fetching the next
 * block's first slice too, measured level (stop 68).
 *
 * A stride s > 1 reads every s-th pixel of every s-th row (a projection shortcut): each tile
 * reads its 7 pixels through their own addresses, so strided rows cost nothing extra.
 */
#include <immintrin.h>
#include <omp.h>

#include "pointwise_blocks.h"

enum { TILE_ROWS = 7, TILE_PANELS = 4 };
#ifndef K_SLICE /* the blocking; -D overrides are for benchmarks/bench_pointwise_fma.py */
#define K_SLICE 256
#endif
#ifndef TILES_PER_BLOCK
#define TILES_PER_BLOCK 8
#endif
#ifndef PANELS_PER_BLOCK /* a multiple of TILE_PANELS */
#define PANELS_PER_BLOCK 8
#endif

/* One tile: `rows` (≤ 7) pixels, rows `a[0..6]` (rows past `rows` repeat the last and are not
 * stored), × NP panels (4, or 1 for the outputs past the last multiple of 64) whose slices
 * start at `b`, `ps` floats apart, over `kc` input channels. The accumulators are named
 * registers, not an array: GCC keeps an array of vectors on the stack. A constant NP lets GCC
 * drop the other panels' code. */
#define ACC(r) __m512 c##r##0, c##r##1, c##r##2, c##r##3;
#define INIT_ONE(r, q)                                                                     \
  if (q < NP) {                                                                            \
    if (r >= rows)                                                                         \
      c##r##q = _mm512_setzero_ps();                                                       \
    else if (first) {                                                                      \
      c##r##q = _mm512_loadu_ps(bias + 16 * q);                                            \
      if (res) c##r##q = _mm512_add_ps(c##r##q, _mm512_loadu_ps(res + r * ldy + 16 * q));  \
    } else                                                                                 \
      c##r##q = _mm512_loadu_ps(y + r * ldy + 16 * q);                                     \
  }
#define INIT(r) INIT_ONE(r, 0) INIT_ONE(r, 1) INIT_ONE(r, 2) INIT_ONE(r, 3)
#define STEP(r)                                                                            \
  {                                                                                        \
    const __m512 v = _mm512_set1_ps(a##r[p]);                                              \
    c##r##0 = _mm512_fmadd_ps(v, w0, c##r##0);                                             \
    if (NP > 1) {                                                                          \
      c##r##1 = _mm512_fmadd_ps(v, w1, c##r##1);                                           \
      c##r##2 = _mm512_fmadd_ps(v, w2, c##r##2);                                           \
      c##r##3 = _mm512_fmadd_ps(v, w3, c##r##3);                                           \
    }                                                                                      \
  }
#define STORE_ONE(r, q)                                                                    \
  if (q < NP) {                                                                            \
    if (last && relu) c##r##q = _mm512_max_ps(c##r##q, zero);                              \
    _mm512_storeu_ps(y + r * ldy + 16 * q, c##r##q);                                       \
  }
#define STORE(r)                                                                           \
  if (r < rows) {                                                                          \
    STORE_ONE(r, 0) STORE_ONE(r, 1) STORE_ONE(r, 2) STORE_ONE(r, 3)                        \
  }
#define TILE_FUNCTION(name, N)                                                             \
  static void name(const float *const a[TILE_ROWS], int rows, const float *b, long ps,      \
                   long kc, float *y, long ldy, int first, int last, const float *bias,     \
                   const float *res, int relu, const float *next) {                         \
    enum { NP = N };                                                                        \
    const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5],    \
                *a6 = a[6];                                                                 \
    ACC(0) ACC(1) ACC(2) ACC(3) ACC(4) ACC(5) ACC(6)                                        \
    INIT(0) INIT(1) INIT(2) INIT(3) INIT(4) INIT(5) INIT(6)                                 \
    _Pragma("GCC unroll 2") for (long p = 0; p < kc; p++) {                                 \
      if (next)                                                                             \
        for (int q = 0; q < NP; q++)                                                        \
          _mm_prefetch((const char *)(next + q * ps + p * PANEL), _MM_HINT_T1);             \
      const __m512 w0 = _mm512_loadu_ps(b + p * PANEL);                                     \
      const __m512 w1 = NP > 1 ? _mm512_loadu_ps(b + ps + p * PANEL) : w0;                  \
      const __m512 w2 = NP > 1 ? _mm512_loadu_ps(b + 2 * ps + p * PANEL) : w0;              \
      const __m512 w3 = NP > 1 ? _mm512_loadu_ps(b + 3 * ps + p * PANEL) : w0;              \
      STEP(0) STEP(1) STEP(2) STEP(3) STEP(4) STEP(5) STEP(6)                               \
    }                                                                                       \
    const __m512 zero = _mm512_setzero_ps();                                                \
    STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5) STORE(6)                          \
  }

TILE_FUNCTION(tile4, 4)
TILE_FUNCTION(tile1, 1)

/* y = relu?(x ⊛ w + bias + residual) for x (n, h, w, cin) channels-last, y and residual
 * (n, ho, wo, cout), ho = (h − 1) / stride + 1. `packed` is (cout / 16, cin, 16); `residual`
 * may be NULL or y itself. Returns 0, or −1 for a refused shape. */
int pointwise_fma(const float *x, const float *packed, const float *bias, const float *residual,
                  float *y, int n, int h, int w, int cin, int cout, int stride, int relu,
                  int threads) {
  PointwiseLayer l;
  if (!pointwise_plan(&l, n, h, w, cin, cout, stride, threads, TILE_ROWS * TILES_PER_BLOCK,
                      PANELS_PER_BLOCK))
    return -1;
  const long ps = (long)cin * PANEL; /* floats from one panel to the next */
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long item = 0; item < l.blocks; item++) {
    const PointwiseBlock blk = pointwise_block(&l, item);
    const long r0 = blk.r0, r1 = blk.r1, j0 = blk.j0, j1 = blk.j1;
    const float *rows[TILES_PER_BLOCK * TILE_ROWS]; /* each pixel's input channels */
    pointwise_rows(rows, &l, r0, r1 - r0, x, h, w, cin, stride);
    for (long k0 = 0; k0 < cin; k0 += K_SLICE) {
      const long kc = cin - k0 < K_SLICE ? cin - k0 : K_SLICE;
      const float *slice[TILES_PER_BLOCK * TILE_ROWS];
      for (int r = 0; r < TILES_PER_BLOCK * TILE_ROWS; r++) slice[r] = rows[r] + k0;
      for (long p = j0; p < j1;) {
        const long np = p + TILE_PANELS <= j1 ? TILE_PANELS : 1;
        const float *b = packed + p * ps + k0 * PANEL;
        const float *next = p + np < j1          ? b + np * ps
                            : k0 + K_SLICE < cin ? packed + j0 * ps + (k0 + K_SLICE) * PANEL
                                                 : 0;
        for (long r = r0, t = 0; r < r1; r += TILE_ROWS, t++) {
          const int count = r1 - r < TILE_ROWS ? (int)(r1 - r) : TILE_ROWS;
          const long at = r * cout + p * PANEL;
          (np == TILE_PANELS ? tile4 : tile1)(slice + t * TILE_ROWS, count, b, ps, kc, y + at,
                                              cout, k0 == 0, k0 + kc == cin, bias + p * PANEL,
                                              residual ? residual + at : 0, relu,
                                              t == 0 ? next : 0);
        }
        p += np;
      }
    }
  }
  return 0;
}
