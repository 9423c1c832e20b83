/* The weight gradient of a grouped 3x3 convolution (padding 1, stride 1 or 2, up to 16 channels
 * per group) of bf16 channels-last tensors, on AMX tiles.
 *
 * Why: the gradient is a sum over every output position of dy[p][o] * x[p + tap][i] within a
 * group: a product whose depth is the positions. AVX512-BF16's pair dot product does it at a
 * fraction of an AMX tile product's rate on the Intel Xeon this was written on. As in the forward
 * kernel (grouped3x3_amx.c), 16 consecutive channels form a block: the tile product computes the
 * whole 16 x 16 input-by-output matrix of a block and tap, of which the groups' diagonal blocks
 * (all of it at 16 channels per group, a quarter at 4) are the gradient.
 *
 * Feeding the tiles, per image and block:
 *  - x as A (16 input channels x 32 positions per tile): the block's channels transposed into
 *    channel rows of a zero-bordered grid, so that any tap is a column offset: tap (kh, kw) of
 *    output position v is grid position v + off(kh, kw), one strided tile load whatever the
 *    offset. At stride 2 the grid is split into its four row/column parity planes, so that the
 *    positions one tap reads are again consecutive in one plane.
 *  - dy as B (32 positions x 16 outputs, positions paired as AMX's VNNI layout wants): copied
 *    once, with zeros at the positions past each output row and past the last row.
 * Output position v = oh * Wq + ow, Wq being the plane's width (W + 2 at stride 1); the columns
 * ow >= Wo have dy = 0 and so add nothing.
 *
 * Each thread adds its items' tiles into float32 sums of its own ([blocks][9][16][16], its
 * scratch); the threads then add them up, a slice each, and write the groups' diagonal blocks
 * out as dw[C][cpg][3][3], a range of output channels each.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx_tiles.h"
#include "bf16_transpose.h"

int grouped3x3_wgrad_amx_allowed(void) { return amx_request(); }

int grouped3x3_wgrad_amx_supported(int C, int cpg, int s) {
  const int small = cpg == 1 || cpg == 2 || cpg == 4 || cpg == 8;
  const int dense = cpg >= 16 && cpg % 16 == 0 && cpg <= 256;
  return C > 0 && C % 16 == 0 && (small || dense) && C % cpg == 0 && (s == 1 || s == 2);
}

/* The planes of one image and block: s * s parity planes of the zero-bordered grid (rows H + 2,
 * columns W + 2), each Rq x Wq, channel-major with `len` positions per channel row. */
typedef struct {
  int H, W, C, s, Ho, Wo, Wq, Rq;
  long len;   /* positions per channel row of a plane (reads past the grid included) */
  long steps; /* 32-position K steps: ceil(Ho * Wq / 32) */
} Geometry;

static Geometry geometry(int H, int W, int C, int s) {
  Geometry g;
  g.H = H, g.W = W, g.C = C, g.s = s;
  g.Ho = (H - 1) / s + 1, g.Wo = (W - 1) / s + 1;
  g.Wq = (W + 2 + s - 1) / s, g.Rq = (H + 2 + s - 1) / s;
  g.steps = ((long)g.Ho * g.Wq + 31) / 32;
  /* the furthest read: the last step's 32 positions at the largest offset, (2/s) rows and
   * columns on; and the transposing writes 16 positions past the last row */
  const long reads = g.steps * 32 + (2 / s) * (long)g.Wq + 2 / s;
  const long writes = (long)g.Rq * g.Wq + 16;
  g.len = ((reads > writes ? reads : writes) + 31) / 32 * 32;
  return g;
}

/* Bytes of one tile's planes (a) and of its pairs (bv). */
static long plane_bytes(const Geometry *g) { return (long)g->s * g->s * 16 * g->len * 2; }
static long pair_bytes(const Geometry *g) { return g->steps * 32 * 16 * 2; }

/* The planes of tiles t0 .. t0 + ct - 1 (16 channels each) of image xn (x[H][W][C]): tile u's
 * plane p channel c at a + u * plane_bytes / 2 + (p * 16 + c) * len. Grid pixel (R, Q) is input
 * pixel (R - 1, Q - 1) or zero outside it. The tiles of one pixel are taken one after the other,
 * so that the pixel's cache lines are read from memory once for all of them (one tile at a time
 * read each line twice or more, 32 bytes at a time: 1.6x slower at ResNeXt-50's stage 1). */
static void fill_planes(uint16_t *a, const uint16_t *xn, const Geometry *g, int t0, int ct) {
  const int s = g->s;
  const long tile = plane_bytes(g) / 2;
  for (int pr = 0; pr < s; ++pr)
    for (int pc = 0; pc < s; ++pc)
      for (int row = 0; row < g->Rq; ++row) {
        const int ih = row * s + pr - 1;
        const int inside = ih >= 0 && ih < g->H;
        for (int q0 = 0; q0 < g->Wq; q0 += 16) {
          const uint16_t *px[16];
          for (int k = 0; k < 16; ++k) {
            const int iw = (q0 + k) * s + pc - 1;
            px[k] = inside && q0 + k < g->Wq && iw >= 0 && iw < g->W
                        ? xn + ((long)ih * g->W + iw) * g->C + t0 * 16
                        : NULL;
          }
          /* a row's last segment runs into the next row with zeros, which that row overwrites */
          const long at = (long)row * g->Wq + q0;
          for (int u = 0; u < ct; ++u) {
            __m256i r[16];
            for (int k = 0; k < 16; ++k)
              r[k] = px[k] ? _mm256_loadu_si256((const __m256i *)(px[k] + u * 16))
                           : _mm256_setzero_si256();
            transpose16(r);
            uint16_t *plane = a + u * tile + (long)(pr * s + pc) * 16 * g->len;
            for (int c = 0; c < 16; ++c)
              _mm256_storeu_si256((__m256i *)(plane + c * g->len + at), r[c]);
          }
        }
      }
  const long end = (long)g->Rq * g->Wq;
  for (int u = 0; u < ct; ++u)
    for (int p = 0; p < s * s; ++p)
      for (int c = 0; c < 16; ++c)
        memset(a + u * tile + ((long)p * 16 + c) * g->len + end, 0, (size_t)(g->len - end) * 2);
}

/* dy of tiles t0 .. t0 + ct - 1 of image gn (dy[Ho][Wo][C]) as VNNI pairs: tile u's
 * bv + u * pair_bytes / 2 holds [v / 2][o][v % 2] for output position v = oh * Wq + ow, zero
 * where ow >= Wo or oh >= Ho, for steps * 32 positions. */
static void fill_pairs(uint16_t *bv, const uint16_t *gn, const Geometry *g, int t0, int ct) {
  const long total = g->steps * 32;
  int oh = 0, ow = 0;
  const long tile = pair_bytes(g) / 2;
  for (long v = 0; v < total; v += 2) {
    const uint16_t *px[2];
    for (int m = 0; m < 2; ++m) {
      px[m] = oh < g->Ho && ow < g->Wo ? gn + ((long)oh * g->Wo + ow) * g->C + t0 * 16 : NULL;
      if (++ow == g->Wq) ow = 0, ++oh;
    }
    for (int u = 0; u < ct; ++u) {
      __m256i p[2];
      for (int m = 0; m < 2; ++m)
        p[m] = px[m] ? _mm256_loadu_si256((const __m256i *)(px[m] + u * 16))
                     : _mm256_setzero_si256();
      _mm512_storeu_si512(bv + u * tile + v * 16, pair_rows(p[0], p[1]));
    }
  }
}

/* Plane and offset of tap (kh, kw) (see the top). */
static inline long tap_at(const Geometry *g, int kh, int kw) {
  const int s = g->s;
  return (long)((kh % s) * s + kw % s) * 16 * g->len + (kh / s) * (long)g->Wq + kw / s;
}

/* sums[tap] (16 x 16 float32 each, [input][output]) += the block's products over all positions,
 * for taps 0-5 (accumulators 0-5) then 6-8 (0-2). A: tile 6, B: tile 7. */
#define ACC(T, OFF)                                                                             \
  _tile_loadd(6, a + (OFF) + 32 * k, astride);                                                  \
  _tile_dpbf16ps(T, 6, 7);

__attribute__((target("amx-tile,amx-bf16"))) static void products(const uint16_t *a,
                                                                   const uint16_t *bv,
                                                                   const Geometry *g,
                                                                   float *sums) {
  const long astride = g->len * 2;
  long off[9];
  for (int t = 0; t < 9; ++t) off[t] = tap_at(g, t / 3, t % 3);
  _tile_loadd(0, sums + 0 * 256, 64);
  _tile_loadd(1, sums + 1 * 256, 64);
  _tile_loadd(2, sums + 2 * 256, 64);
  _tile_loadd(3, sums + 3 * 256, 64);
  _tile_loadd(4, sums + 4 * 256, 64);
  _tile_loadd(5, sums + 5 * 256, 64);
  for (long k = 0; k < g->steps; ++k) {
    _tile_loadd(7, bv + 512 * k, 64);
    ACC(0, off[0]) ACC(1, off[1]) ACC(2, off[2]) ACC(3, off[3]) ACC(4, off[4]) ACC(5, off[5])
  }
  _tile_stored(0, sums + 0 * 256, 64);
  _tile_stored(1, sums + 1 * 256, 64);
  _tile_stored(2, sums + 2 * 256, 64);
  _tile_stored(3, sums + 3 * 256, 64);
  _tile_stored(4, sums + 4 * 256, 64);
  _tile_stored(5, sums + 5 * 256, 64);
  _tile_loadd(0, sums + 6 * 256, 64);
  _tile_loadd(1, sums + 7 * 256, 64);
  _tile_loadd(2, sums + 8 * 256, 64);
  for (long k = 0; k < g->steps; ++k) {
    _tile_loadd(7, bv + 512 * k, 64);
    ACC(0, off[6]) ACC(1, off[7]) ACC(2, off[8])
  }
  _tile_stored(0, sums + 6 * 256, 64);
  _tile_stored(1, sums + 7 * 256, 64);
  _tile_stored(2, sums + 8 * 256, 64);
}

/* 16-channel tiles per item: whole groups, at least 4 tiles (64 channels: whole cache lines
 * of each pixel) where the channels allow, and a divisor of the tile count. */
static int chunk_tiles(int tiles, int group_tiles) {
  int ct = group_tiles > 4 ? group_tiles : 4;
  if (ct > tiles) ct = tiles;
  while (tiles % ct || ct % group_tiles) --ct;
  return ct;
}

/* dw[C][cpg][3][3] (float32) = the gradient for x[N][H][W][C] and dy[N][Ho][Wo][C] (bf16).
 * Returns 0; -1 for a shape the kernel does not take; -2 where AMX is refused; -3 if memory for
 * the sums or buffers runs out. */
int grouped3x3_wgrad_amx(const uint16_t *x, const uint16_t *dy, float *dw, int N, int H, int W,
                         int C, int cpg, int s, int threads) {
  if (N < 0 || H < 1 || W < 1 || threads < 1 || !grouped3x3_wgrad_amx_supported(C, cpg, s))
    return -1;
  if (!grouped3x3_wgrad_amx_allowed()) return -2;
  const Geometry g = geometry(H, W, C, s);
  /* a group spans gt tiles (1 below 16 channels per group); output tile `to` pairs with the gt
   * input tiles of its group, its sums at sums[(to * gt + i) * 9 + tap] */
  const int tiles = C / 16, gt = cpg > 16 ? cpg / 16 : 1, ct = chunk_tiles(tiles, gt);
  const long items = (long)N * (tiles / ct), per_sums = (long)tiles * gt * 9 * 256;
  /* each thread's sums, in its scratch (kept across calls: the 1.2 MB a thread of stage 4 needs
   * were calloc'ed, page-faulted and added by one thread on every call, 16 % of its time) */
  float **mine = (float **)calloc((size_t)threads, sizeof(float *));
  if (!mine) return -3;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    const int me = omp_get_thread_num(), team = omp_get_num_threads();
    float *sums = (float *)scratch(2, (size_t)per_sums * sizeof(float));
    uint16_t *a = scratch(0, (size_t)(ct * plane_bytes(&g)));
    uint16_t *bv = scratch(1, (size_t)(ct * pair_bytes(&g)));
    const int ok = sums && a && bv;
    if (ok) {
      memset(sums, 0, (size_t)per_sums * sizeof(float));
      mine[me] = sums;
      configure();
    } else {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (long item = 0; item < items; ++item) {
      if (!ok) continue;
      const long n = item / (tiles / ct);
      const int t0 = (int)(item % (tiles / ct)) * ct;
      fill_planes(a, x + n * (long)H * W * C, &g, t0, ct);
      fill_pairs(bv, dy + n * (long)g.Ho * g.Wo * C, &g, t0, ct);
      for (int u = 0; u < ct; ++u) {
        const int first = u / gt * gt; /* the chunk's first tile of u's group */
        for (int i = 0; i < gt; ++i)
          products(a + (first + i) * (plane_bytes(&g) / 2), bv + u * (pair_bytes(&g) / 2), &g,
                   sums + ((long)(t0 + u) * gt + i) * 9 * 256);
      }
    }
    if (ok) release();
    /* the implicit barrier of the loop above: every thread's sums are done */
    int bad;
#pragma omp atomic read
    bad = failed;
    if (!bad) {
      /* the threads' sums added into thread 0's, a slice each */
      const long per = (per_sums / team + 15) / 16 * 16;
      const long e0 = per * me < per_sums ? per * me : per_sums;
      const long e1 = e0 + per < per_sums ? e0 + per : per_sums;
      for (int t = 1; t < team; ++t)
        for (long e = e0; e < e1; ++e) mine[0][e] += mine[t][e];
#pragma omp barrier
      /* sums[(to * gt + i) * 9 + tap][row][col]: input channel (first + i) * 16 + row, output
       * to * 16 + col; output o's group starts at input channel o / cpg * cpg */
      const float *all = mine[0];
#pragma omp for schedule(static)
      for (int o = 0; o < C; ++o)
        for (int j = 0; j < cpg; ++j) {
          const int in = o / cpg * cpg + j, to = o / 16;
          const int i = gt > 1 ? in / 16 - o / cpg * cpg / 16 : 0;
          for (int tap = 0; tap < 9; ++tap)
            dw[((long)o * cpg + j) * 9 + tap] =
                all[(((long)to * gt + i) * 9 + tap) * 256 + (in % 16) * 16 + o % 16];
        }
    }
  }
  free(mine);
  return failed ? -3 : 0;
}
