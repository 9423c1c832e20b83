/* Grouped 3x3 convolution with 4 channels per group (padding 1, stride 1) of bf16 channels-last
 * tensors on AMX tiles, 4 output pixels by 4 output channels to a tile column block.
 *
 * Why: grouped3x3_amx.c makes 16 channels (4 groups) one block-diagonal matrix per tap pair, so
 * a quarter of each tile product is useful: 6 products per 16 pixels x 16 channels. Here a tile
 * row is a "quad" of 4 horizontally adjacent output pixels of one group, and its 16 columns are
 * those 4 pixels x the group's 4 outputs. One kernel row of a quad reads 6 input pixels x 4
 * channels, which fit one 32-deep K step (8 pixels x 4 channels, the last 2 pixels times zero
 * weights), so a group takes 3 products (one per kernel row) per 16 quads: 12 products per 64
 * pixels x 16 channels, half as many, each 9/16 useful. The weight is Toeplitz per kernel row:
 * column (d, o) of row (j, c) holds w[o][c][kh][j - d] for 0 <= j - d <= 2, else zero.
 *
 * Feeding the tiles: each group's 4 channels are copied into a plane of their own, zero
 * bordered, rows of Wq = 4 Qv pixels (Qv quads a row, Qv >= (W + 2) / 4), so that quad v = oh Qv
 * + q, kernel row kh, is the plane's 8 pixels from pixel (oh + kh) Wq + 4 q: 16 quads are one
 * tile load whose rows are 4 pixels (32 bytes) apart, across row ends (the quads past W are
 * computed and dropped). (So a non-finite input value can reach outputs whose true value does
 * not depend on it, through the zero weights.) A block of 16 channels is 4 groups, whose 4
 * accumulators are then read back together: a 4 x 4 transpose of 128-bit lanes turns a quad's 4
 * rows (one per group: 4 pixels x 4 outputs) into its 4 pixels' 16 channels, + bias, ReLU if
 * asked, rounded to bf16.
 *
 * Work: items of one image by up to 4 blocks (64 channels, whole cache lines of each pixel, read
 * once into the planes: 4 pixels x 16 channels transposed into 4 planes at a time).
 *
 * Layout: x[N][H][W][C], y[N][H][W][C] bf16 (uint16); weights packed by
 * grouped_quads.pack_weights as bf16 [C/16][4 groups][3 kh][16 K pairs][16 columns][2]; bias[C]
 * float32 or NULL.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx_tiles.h"

#define MAX_CB 4 /* blocks of 16 channels per item */

int grouped3x3_quads_amx_allowed(void) { return amx_request(); }

int grouped3x3_quads_amx_supported(int C, int cpg, int s) {
  return C > 0 && C % 16 == 0 && cpg == 4 && s == 1;
}

/* The planes of one image: quads per row and the sizes derived from it. */
typedef struct {
  int H, W, C;
  int Qr, Qv, Wq; /* quads holding outputs, quads a plane row, plane row in pixels */
  long plane;     /* values in one group's plane, slack for the last tile's reads included */
} Planes;

static Planes make_planes(int H, int W, int C) {
  Planes p;
  p.H = H, p.W = W, p.C = C;
  p.Qr = (W + 3) / 4;
  p.Qv = (W + 2 + 3) / 4;
  p.Wq = 4 * p.Qv;
  /* the furthest read: quad (H Qv rounded up to 16) - 1, kernel row 2, 8 pixels */
  const long quads = ((long)H * p.Qv + 15) / 16 * 16;
  p.plane = ((2L * p.Wq + 4 * quads + 8) > (long)(H + 2) * p.Wq ? 2L * p.Wq + 4 * quads + 8
                                                                  : (long)(H + 2) * p.Wq) * 4;
  return p;
}

/* Zero what fill does not write in `count` planes: row 0, each row's border columns, and row H + 1
 * on (with the slack the last tiles read). Fill never writes there, so once per call will do. */
static void zero_borders(uint16_t *planes, const Planes *p, int count) {
  for (int g = 0; g < count; ++g) {
    uint16_t *plane = planes + (long)g * p->plane;
    memset(plane, 0, (size_t)(p->Wq + 1) * 4 * 2); /* row 0 and row 1's first column */
    for (int r = 1; r <= p->H; ++r) {
      /* columns W + 1 .. Wq - 1 of row r and column 0 of row r + 1 */
      const long from = ((long)r * p->Wq + p->W + 1) * 4;
      memset(plane + from, 0, (size_t)(p->Wq - p->W) * 4 * 2);
    }
    const long tail = (long)(p->H + 1) * p->Wq * 4;
    memset(plane + tail, 0, (size_t)(p->plane - tail) * 2);
  }
}

/* The interior of the planes of blocks b0 .. b0 + cb - 1 of image xn (their borders are zero:
 * zero_borders, once per call). */
static void fill(uint16_t *planes, const Planes *p, const uint16_t *xn, int b0, int cb) {
  const long gs = p->plane; /* values from one group's plane to the next */
  for (int ih = 0; ih < p->H; ++ih) {
    const uint16_t *src = xn + (long)ih * p->W * p->C + b0 * 16;
    uint16_t *row = planes + ((long)(ih + 1) * p->Wq + 1) * 4;
    int iw = 0;
    for (; iw + 4 <= p->W; iw += 4)
      for (int b = 0; b < cb; ++b) {
        /* 4 pixels x 4 groups of 4 channels (64 bits each) to 4 groups x 4 pixels */
        const uint16_t *s = src + (long)iw * p->C + b * 16;
        const __m256i p0 = _mm256_loadu_si256((const __m256i *)s);
        const __m256i p1 = _mm256_loadu_si256((const __m256i *)(s + p->C));
        const __m256i p2 = _mm256_loadu_si256((const __m256i *)(s + 2L * p->C));
        const __m256i p3 = _mm256_loadu_si256((const __m256i *)(s + 3L * p->C));
        const __m256i a = _mm256_unpacklo_epi64(p0, p1); /* groups 0 | 2 of pixels 0, 1 */
        const __m256i c = _mm256_unpackhi_epi64(p0, p1); /* groups 1 | 3 */
        const __m256i e = _mm256_unpacklo_epi64(p2, p3);
        const __m256i f = _mm256_unpackhi_epi64(p2, p3);
        uint16_t *d = row + (long)iw * 4 + (long)b * 4 * gs;
        _mm256_storeu_si256((__m256i *)d, _mm256_permute2x128_si256(a, e, 0x20));
        _mm256_storeu_si256((__m256i *)(d + gs), _mm256_permute2x128_si256(c, f, 0x20));
        _mm256_storeu_si256((__m256i *)(d + 2 * gs), _mm256_permute2x128_si256(a, e, 0x31));
        _mm256_storeu_si256((__m256i *)(d + 3 * gs), _mm256_permute2x128_si256(c, f, 0x31));
      }
    for (; iw < p->W; ++iw) {
      uint64_t *d = (uint64_t *)(row + (long)iw * 4);
      const uint64_t *s = (const uint64_t *)(src + (long)iw * p->C);
      for (int g = 0; g < 4 * cb; ++g) d[g * (gs / 4)] = s[g];
    }
  }
}

/* Block b of one image: every 16 quads, the 4 groups' products, then their outputs. */
__attribute__((target("amx-tile,amx-bf16,avx512bf16"))) static void block(
    const uint16_t *planes, const Planes *p, const uint16_t *wb, const float *bias, int relu,
    uint16_t *yn, int b, float *acc) {
  const __m512 bv = bias ? _mm512_loadu_ps(bias + b * 16) : _mm512_setzero_ps();
  const long quads = (long)p->H * p->Qv, gs = p->plane;
  for (long v0 = 0; v0 < quads; v0 += 16) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    /* group g into accumulator g; A and B tiles alternate so a load never waits on the product
     * still reading its tile */
#define GROUP(G, A, B)                                                                            \
  for (int kh = 0; kh < 3; ++kh) {                                                                \
    _tile_loadd(A, planes + (G) * gs + ((long)kh * p->Wq + 4 * v0) * 4, 32);                      \
    _tile_loadd(B, wb + ((G) * 3 + kh) * 512, 64);                                                \
    _tile_dpbf16ps(G, A, B);                                                                      \
  }
    GROUP(0, 4, 6)
    GROUP(1, 5, 7)
    GROUP(2, 4, 6)
    GROUP(3, 5, 7)
#undef GROUP
    _tile_stored(0, acc, 64);
    _tile_stored(1, acc + 256, 64);
    _tile_stored(2, acc + 512, 64);
    _tile_stored(3, acc + 768, 64);
    for (int r = 0; r < 16; ++r) {
      const long v = v0 + r;
      const int oh = (int)(v / p->Qv), q = (int)(v % p->Qv);
      if (oh >= p->H) break;
      if (q >= p->Qr) continue;
      /* row r of each group's accumulator: 4 lanes (pixels d) of 4 outputs; lane d of the four
       * rows is pixel d's 16 channels */
      const __m512 r0 = _mm512_load_ps(acc + r * 16), r1 = _mm512_load_ps(acc + 256 + r * 16);
      const __m512 r2 = _mm512_load_ps(acc + 512 + r * 16), r3 = _mm512_load_ps(acc + 768 + r * 16);
      const __m512 t0 = _mm512_shuffle_f32x4(r0, r1, 0x44), t1 = _mm512_shuffle_f32x4(r0, r1, 0xEE);
      const __m512 t2 = _mm512_shuffle_f32x4(r2, r3, 0x44), t3 = _mm512_shuffle_f32x4(r2, r3, 0xEE);
      __m512 px[4];
      px[0] = _mm512_shuffle_f32x4(t0, t2, 0x88);
      px[1] = _mm512_shuffle_f32x4(t0, t2, 0xDD);
      px[2] = _mm512_shuffle_f32x4(t1, t3, 0x88);
      px[3] = _mm512_shuffle_f32x4(t1, t3, 0xDD);
      uint16_t *dst = yn + ((long)oh * p->W + 4 * q) * p->C + b * 16;
      for (int d = 0; d < 4 && 4 * q + d < p->W; ++d) {
        __m512 val = _mm512_add_ps(px[d], bv);
        if (relu) val = _mm512_max_ps(val, _mm512_setzero_ps());
        _mm256_storeu_si256((__m256i *)(dst + (long)d * p->C), (__m256i)_mm512_cvtneps_pbh(val));
      }
    }
  }
}

/* y = conv(x) (+ bias, then ReLU if relu). Returns 0; -1 for a shape the kernel does not take,
 * -2 if the OS refuses AMX, -3 if scratch memory cannot be had. */
int grouped3x3_quads_amx(const uint16_t *x, const uint16_t *wp, const float *bias, uint16_t *y,
                         int N, int H, int W, int C, int cpg, int s, int relu, int threads) {
  if (N < 0 || H < 1 || W < 1 || threads < 1 || !grouped3x3_quads_amx_supported(C, cpg, s))
    return -1;
  if (!grouped3x3_quads_amx_allowed()) return -2;
  const Planes p = make_planes(H, W, C);
  const int blocks = C / 16;
  int cb = MAX_CB;
  while (blocks % cb) --cb;
  const long items = (long)N * (blocks / cb);
  const size_t bytes = (size_t)p.plane * 4 * cb * 2;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    uint16_t *planes = scratch(0, bytes);
    float *acc = scratch(1, 4 * 256 * sizeof(float));
    const int ok = planes && acc;
    failed = !ok;
    if (ok) {
      zero_borders(planes, &p, 4 * cb); /* for every item of this call */
      configure();
    }
    /* every thread reaches the work-sharing loop (a thread without scratch skips its share) */
#pragma omp for schedule(static)
    for (long item = 0; item < items; ++item) {
      if (!ok) continue;
      const long n = item / (blocks / cb);
      const int b0 = (int)(item % (blocks / cb)) * cb;
      fill(planes, &p, x + n * (long)H * W * C, b0, cb);
      for (int b = 0; b < cb; ++b)
        block(planes + (long)b * 4 * p.plane, &p, wp + (long)(b0 + b) * 4 * 3 * 512, bias, relu,
              y + n * (long)H * W * C, b0 + b, acc);
    }
    if (ok) release();
  }
  return failed ? -3 : 0;
}
