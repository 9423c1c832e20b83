/* Float32 1×1 convolution of a channels-last tensor with 256-bit FMAs (AVX2), with its bias and
 * optionally a residual add and a ReLU applied in the same pass.
 *
 * Channels-last, a 1×1 convolution is a matrix product: each output pixel's C_out values are
 * the input pixel's C_in values times the (C_out × C_in) weight. The weight is packed into
 * panels of 16 output channels, each a C_in × 16 row-major block (`pointwise_fma.pack`), so that
 * one input channel's 16 weights are two adjacent 8-lane vectors. A register tile is 6 output
 * pixels × 16 output channels: 12 accumulators, two weight vectors and one broadcast input value
 * in 15 of the 16 registers; each input channel costs 12 FMAs, 2 vector loads and 6 broadcasts.
 *
 * Blocking, chosen by timing on an AMD Zen 3 (2 cores, 32 KB L1, 512 KB L2): the input channels
 * are taken 256 at a time, so that a panel's slice (16 KB) stays in L1 while 16 tiles (96
 * pixels) pass over it, and 8 panels' slices (128 KB) stay in L2 beside those 96 pixels' rows
 * (96 KB), read once per panel. 16 tiles rather than the 4 of stops 28–32: a layer's weights
 * are read once per block of pixels, from memory at batch 1, so fewer blocks mean fewer passes
 * over them (ResNeXt-50 at batch 1: 1.0–2.5 % off the network's latency per round; batch 16
 * level; `benchmarks/RESULTS.md`, stop 33). Partial sums go to the output between slices; the
 * first slice starts from the bias (and the residual, which is why the output may be the
 * residual itself: each tile reads its residual before it writes there), the last applies the
 * ReLU.
 *
 * The first tile over each weight slice prefetches the next slice into L2, one cache line per
 * input channel: measured 10–25 % off a batch-1 layer whose weights start in memory, nothing
 * at batch 16.
 *
 * Two more software prefetches, because at batch 16 the activations of the first stages
 * (13–51 MB) come from memory, where the hardware's stream detection loses track of the many
 * pixel rows and residual rows a block reads at once (measured on that Zen 3 with 4 tiles a
 * block, ResNeXt-50's 36 1×1s a batch: 5–8 % less time, up to 1.3× on a 56² or 28² layer
 * with a residual; 0–3 % in the whole network):
 *  - over a block's tiles, a few lines per tile of the next block's input rows go to L2 (with
 *    at most 512 input channels: wider rows brought no gain, and would compete with the
 *    block's weights there);
 *  - each tile that reads the residual first fetches the residual lines of the tile one panel
 *    on (the same pixels in the next panel, or the next block's in the first).
 *
 * A stride s > 1 reads every s-th pixel of every s-th row (a projection shortcut): each tile
 * computes its 6 pixels' addresses, so strided rows cost nothing extra.
 */
#include <immintrin.h>
#include <omp.h>

#include "pointwise_blocks.h"

enum { TILE_ROWS = 6, PREFETCH_MAX_CIN = 512 };
#ifndef K_SLICE /* the blocking; -D overrides are for benchmarks/bench_pointwise_fma.py */
#define K_SLICE 256
#endif
#ifndef TILES_PER_BLOCK
#define TILES_PER_BLOCK 16
#endif
#ifndef PANELS_PER_BLOCK
#define PANELS_PER_BLOCK 8
#endif

/* 6 pixels (rows `a[0..5]`, rows past `rows` repeat the last and are not stored) × 16 outputs
 * over `kc` input channels of the panel slice `b` (kc × 16). */
static void tile(const float *const a[TILE_ROWS], int rows, const float *b, long kc, float *y,
                 long ldy, int first, int last, const float *bias, const float *res, int relu,
                 const float *next) {
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  /* Named registers, not an array: GCC keeps an array of vectors on the stack. */
#define INIT(r)                                                                    \
  if (r >= rows) {                                                                 \
    c##r##0 = _mm256_setzero_ps();                                                 \
    c##r##1 = _mm256_setzero_ps();                                                 \
  } else if (first) {                                                              \
    c##r##0 = _mm256_loadu_ps(bias);                                               \
    c##r##1 = _mm256_loadu_ps(bias + 8);                                           \
    if (res) {                                                                     \
      c##r##0 = _mm256_add_ps(c##r##0, _mm256_loadu_ps(res + r * ldy));            \
      c##r##1 = _mm256_add_ps(c##r##1, _mm256_loadu_ps(res + r * ldy + 8));        \
    }                                                                              \
  } else {                                                                         \
    c##r##0 = _mm256_loadu_ps(y + r * ldy);                                        \
    c##r##1 = _mm256_loadu_ps(y + r * ldy + 8);                                    \
  }
  INIT(0) INIT(1) INIT(2) INIT(3) INIT(4) INIT(5)
#undef INIT
#pragma GCC unroll 4 /* measured: 3-4 % over the compiler's own choice */
  for (long p = 0; p < kc; p++) {
    if (next) _mm_prefetch((const char *)(next + p * PANEL), _MM_HINT_T1);
    __m256 b0 = _mm256_loadu_ps(b + p * PANEL), b1 = _mm256_loadu_ps(b + p * PANEL + 8);
#define STEP(r)                                                                    \
  {                                                                                \
    __m256 v = _mm256_broadcast_ss(a##r + p);                                      \
    c##r##0 = _mm256_fmadd_ps(v, b0, c##r##0);                                     \
    c##r##1 = _mm256_fmadd_ps(v, b1, c##r##1);                                     \
  }
    STEP(0) STEP(1) STEP(2) STEP(3) STEP(4) STEP(5)
#undef STEP
  }
  __m256 zero = _mm256_setzero_ps();
#define STORE(r)                                                                   \
  if (r < rows) {                                                                  \
    if (last && relu) {                                                            \
      c##r##0 = _mm256_max_ps(c##r##0, zero);                                      \
      c##r##1 = _mm256_max_ps(c##r##1, zero);                                      \
    }                                                                              \
    _mm256_storeu_ps(y + r * ldy, c##r##0);                                        \
    _mm256_storeu_ps(y + r * ldy + 8, c##r##1);                                    \
  }
  STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5)
#undef STORE
}

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
  const long pixels = l.pixels, block_rows = l.block_rows;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long item = 0; item < l.blocks; item++) {
    const PointwiseBlock blk = pointwise_block(&l, item);
    const long r0 = blk.r0, r1 = blk.r1, j0 = blk.j0, j1 = blk.j1;
    const float *rows[TILES_PER_BLOCK * TILE_ROWS]; /* each pixel's input channels */
    pointwise_rows(rows, &l, r0, r1 - r0, x, h, w, cin, stride);
    const float *next_rows[TILES_PER_BLOCK * TILE_ROWS]; /* the next block's, to prefetch */
    const long row_lines = (cin * (long)sizeof(float) + 63) / 64;
    long ahead_lines = 0, ahead_done = 0, ahead_per_tile = 0;
    if (r1 < pixels && cin <= PREFETCH_MAX_CIN) {
      const long count = pixels - r1 < block_rows ? pixels - r1 : block_rows;
      for (long r = r1; r < r1 + count; r++)
        next_rows[r - r1] = pixel_row(x, r, h, w, l.ho, l.wo, cin, stride);
      const long tiles = (cin + K_SLICE - 1) / K_SLICE * (j1 - j0) * TILES_PER_BLOCK;
      ahead_lines = count * row_lines;
      ahead_per_tile = (ahead_lines + tiles - 1) / tiles;
    }
    for (long k0 = 0; k0 < cin; k0 += K_SLICE) {
      const long kc = cin - k0 < K_SLICE ? cin - k0 : K_SLICE;
      const float *slice[TILES_PER_BLOCK * TILE_ROWS];
      for (int r = 0; r < TILES_PER_BLOCK * TILE_ROWS; r++) slice[r] = rows[r] + k0;
      for (long p = j0; p < j1; p++) {
        const float *b = packed + (p * cin + k0) * PANEL;
        /* The next slice this block reads (the next panel's, or the first panel's next one),
         * fetched into L2 while the first tile runs over this one: with few pixels (batch 1)
         * the weights come cold from memory and each is used by few tiles. */
        const float *next = p + 1 < j1          ? b + cin * PANEL
                            : k0 + K_SLICE < cin ? packed + (j0 * cin + k0 + K_SLICE) * PANEL
                                                 : 0;
        for (long r = r0, t = 0; r < r1; r += TILE_ROWS, t++) {
          const int count = r1 - r < TILE_ROWS ? (int)(r1 - r) : TILE_ROWS;
          const long at = r * cout + p * PANEL;
          for (long q = 0; q < ahead_per_tile && ahead_done < ahead_lines; q++, ahead_done++)
            _mm_prefetch((const char *)next_rows[ahead_done / row_lines] +
                             ahead_done % row_lines * 64,
                         _MM_HINT_T1);
          if (k0 == 0 && residual) { /* the residual lines of the tile one panel on */
            const long nr = p + 1 < j1 ? r : r + block_rows;
            const float *nres = residual + nr * cout + (p + 1 < j1 ? p + 1 : j0) * PANEL;
            for (long q = nr; q < nr + TILE_ROWS && q < pixels; q++, nres += cout)
              _mm_prefetch((const char *)nres, _MM_HINT_T0);
          }
          tile(slice + t * TILE_ROWS, count, b, kc, y + at, cout, k0 == 0, k0 + kc == cin,
               bias + p * PANEL, residual ? residual + at : 0, relu, t == 0 ? next : 0);
        }
      }
    }
  }
  return 0;
}
