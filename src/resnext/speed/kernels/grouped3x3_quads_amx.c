/* Grouped 3x3 convolution with 4 or 8 channels per group (padding 1, stride 1) of bf16
 * channels-last tensors on AMX tiles, several output pixels by a group's outputs to a tile's
 * 16 columns.
 *
 * Why: grouped3x3_amx.c makes 16 channels (4 groups of 4, or 2 of 8) one block-diagonal matrix per
 * tap pair, so a quarter (or half) of each tile product is useful: 6 products per 16 pixels x 16
 * channels. Here a tile row is a "quad" of P = 16 / cpg horizontally adjacent output pixels of
 * one group (4 pixels at 4 channels per group, 2 at 8), and its 16 columns are those P pixels x
 * the group's cpg outputs. One kernel row of a quad reads P + 2 input pixels x cpg channels, which
 * fit one 32-deep K step (32 / cpg pixels: 8 x 4 channels, the last 2 pixels times zero weights,
 * or 4 x 8), so a group takes 3 products (one per kernel row) per 16 quads: with 4 groups in the
 * 4 accumulators, 12 products per 64 pixels x 16 channels at 4 channels per group and 12 per 32
 * pixels x 32 channels at 8, half the block-diagonal form's. The weight is Toeplitz per kernel
 * row: column (d, o) of row (j, c) holds w[o][c][kh][j - d] for 0 <= j - d <= 2, else zero.
 *
 * Feeding the tiles: each group's channels are copied into a plane of their own, zero bordered,
 * rows of Wq = P Qv pixels (Qv quads a row, P Qv >= W + 2), so that quad v = oh Qv + q, kernel
 * row kh, is the plane's 32 values from pixel (oh + kh) Wq + P q: 16 quads are one tile load whose
 * rows are P pixels (32 bytes) apart, across row ends (the quads past W are computed and dropped).
 * (So a non-finite input value can reach outputs whose true value does not depend on it, through
 * the zero weights.) A set of 4 groups (16 or 32 channels) fills the 4 accumulators, which are
 * then read back together: at 4 channels per group a 4 x 4 transpose of 128-bit lanes turns a
 * quad's 4 rows (one per group: 4 pixels x 4 outputs) into its 4 pixels' 16 channels; at 8, the
 * 256-bit halves of two groups' rows are one pixel's 16 channels. Then + bias, ReLU if asked, one
 * rounding to bf16.
 *
 * Work: items of one image by the sets of 64 channels (whole cache lines of each pixel, read once
 * into the planes), fewer where the channels do not divide.
 *
 * Layout: x[N][H][W][C], y[N][H][W][C] bf16 (uint16); weights packed by
 * grouped_quads.pack_weights as bf16 [C / (4 cpg) sets][4 groups][3 kh][16 K pairs][16 columns]
 * [2]; bias[C] float32 or NULL.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx_tiles.h"

#define ITEM_CHANNELS 64 /* channels per item at most: whole cache lines of each pixel */

int grouped3x3_quads_amx_allowed(void) { return amx_request(); }

int grouped3x3_quads_amx_supported(int C, int cpg, int s) {
  return C > 0 && (cpg == 4 || cpg == 8) && C % (4 * cpg) == 0 && s == 1;
}

/* The planes of one image: quads per row and the sizes derived from it. */
typedef struct {
  int H, W, C, cpg;
  int P;          /* output pixels per quad: 16 / cpg */
  int Qr, Qv, Wq; /* quads holding outputs, quads a plane row, plane row in pixels */
  long plane;     /* values in one group's plane, slack for the last tile's reads included */
} Planes;

static Planes make_planes(int H, int W, int C, int cpg) {
  Planes p;
  p.H = H, p.W = W, p.C = C, p.cpg = cpg, p.P = 16 / cpg;
  p.Qr = (W + p.P - 1) / p.P;
  p.Qv = (W + 2 + p.P - 1) / p.P;
  p.Wq = p.P * p.Qv;
  /* the furthest read: quad (H Qv rounded up to 16) - 1, kernel row 2, 32 / cpg pixels */
  const long quads = ((long)H * p.Qv + 15) / 16 * 16;
  const long reach = 2L * p.Wq + p.P * quads + 32 / cpg, rows = (long)(H + 2) * p.Wq;
  p.plane = (reach > rows ? reach : rows) * cpg;
  return p;
}

/* Zero what fill does not write in `count` planes: row 0, each row's border columns, and row H + 1
 * on (with the slack the last tiles read). Fill never writes there, so once per call will do. */
static void zero_borders(uint16_t *planes, const Planes *p, int count) {
  const int c = p->cpg;
  for (int g = 0; g < count; ++g) {
    uint16_t *plane = planes + (long)g * p->plane;
    memset(plane, 0, (size_t)(p->Wq + 1) * c * 2); /* row 0 and row 1's first column */
    for (int r = 1; r <= p->H; ++r) {
      /* columns W + 1 .. Wq - 1 of row r and column 0 of row r + 1 */
      const long from = ((long)r * p->Wq + p->W + 1) * c;
      memset(plane + from, 0, (size_t)(p->Wq - p->W) * c * 2);
    }
    const long tail = (long)(p->H + 1) * p->Wq * c;
    memset(plane + tail, 0, (size_t)(p->plane - tail) * 2);
  }
}

/* The interior of the planes of channels c0 .. c0 + channels - 1 of image xn (their borders are
 * zero: zero_borders, once per call); plane k holds group c0 / cpg + k. */
static void fill(uint16_t *planes, const Planes *p, const uint16_t *xn, int c0, int channels) {
  const long gs = p->plane; /* values from one group's plane to the next */
  const int groups = channels / p->cpg;
  for (int ih = 0; ih < p->H; ++ih) {
    const uint16_t *src = xn + (long)ih * p->W * p->C + c0;
    uint16_t *row = planes + ((long)(ih + 1) * p->Wq + 1) * p->cpg;
    int iw = 0;
    if (p->cpg == 4) {
      for (; iw + 4 <= p->W; iw += 4)
        for (int b = 0; b < groups / 4; ++b) {
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
        for (int g = 0; g < groups; ++g) d[g * (gs / 4)] = s[g];
      }
    } else { /* 8 channels, 16 bytes, a group */
      for (; iw < p->W; ++iw) {
        const uint16_t *s = src + (long)iw * p->C;
        uint16_t *d = row + (long)iw * 8;
        for (int g = 0; g < groups; ++g)
          _mm_storeu_si128((__m128i *)(d + g * gs), _mm_loadu_si128((const __m128i *)(s + g * 8)));
      }
    }
  }
}

/* One set of 4 groups (channels c0 .. c0 + 4 cpg - 1) of one image: every 16 quads, the groups'
 * products into accumulators 0-3, then their outputs. */
__attribute__((target("amx-tile,amx-bf16,avx512bf16"))) static void set(
    const uint16_t *planes, const Planes *p, const uint16_t *ws, const float *bias, int relu,
    uint16_t *yn, int c0, float *acc) {
  const int wide = p->cpg == 8; /* 32 channels a set, else 16 */
  const __m512 zero = _mm512_setzero_ps();
  const __m512 b0 = bias ? _mm512_loadu_ps(bias + c0) : zero;
  const __m512 b1 = bias && wide ? _mm512_loadu_ps(bias + c0 + 16) : zero;
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
    _tile_loadd(A, planes + (G) * gs + ((long)kh * p->Wq + (long)p->P * v0) * p->cpg, 32);        \
    _tile_loadd(B, ws + ((G) * 3 + kh) * 512, 64);                                                \
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
      const __m512 r0 = _mm512_load_ps(acc + r * 16), r1 = _mm512_load_ps(acc + 256 + r * 16);
      const __m512 r2 = _mm512_load_ps(acc + 512 + r * 16), r3 = _mm512_load_ps(acc + 768 + r * 16);
      __m512 px[8]; /* pixel d's channels c0 .. + 15 in px[d], and at 8 per group c0 + 16 .. in
                     * px[4 + d] */
      if (!wide) {
        /* each row: 4 lanes (pixels d) of 4 outputs; lane d of the four rows is pixel d's 16 */
        const __m512 t0 = _mm512_shuffle_f32x4(r0, r1, 0x44), t1 = _mm512_shuffle_f32x4(r0, r1, 0xEE);
        const __m512 t2 = _mm512_shuffle_f32x4(r2, r3, 0x44), t3 = _mm512_shuffle_f32x4(r2, r3, 0xEE);
        px[0] = _mm512_shuffle_f32x4(t0, t2, 0x88);
        px[1] = _mm512_shuffle_f32x4(t0, t2, 0xDD);
        px[2] = _mm512_shuffle_f32x4(t1, t3, 0x88);
        px[3] = _mm512_shuffle_f32x4(t1, t3, 0xDD);
      } else {
        /* each row: 2 halves (pixels d) of 8 outputs; groups 0, 1 then 2, 3 */
        px[0] = _mm512_shuffle_f32x4(r0, r1, 0x44);
        px[1] = _mm512_shuffle_f32x4(r0, r1, 0xEE);
        px[4] = _mm512_shuffle_f32x4(r2, r3, 0x44);
        px[5] = _mm512_shuffle_f32x4(r2, r3, 0xEE);
      }
      uint16_t *dst = yn + ((long)oh * p->W + (long)p->P * q) * p->C + c0;
      for (int d = 0; d < p->P && p->P * q + d < p->W; ++d)
        for (int h = 0; h <= wide; ++h) {
          __m512 val = _mm512_add_ps(px[4 * h + d], h ? b1 : b0);
          if (relu) val = _mm512_max_ps(val, zero);
          _mm256_storeu_si256((__m256i *)(dst + (long)d * p->C + 16 * h),
                              (__m256i)_mm512_cvtneps_pbh(val));
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
  const Planes p = make_planes(H, W, C, cpg);
  const int set_channels = 4 * cpg, sets = C / set_channels;
  int per_item = ITEM_CHANNELS / set_channels; /* sets per item */
  while (sets % per_item) --per_item;
  const long items = (long)N * (sets / per_item);
  const size_t bytes = (size_t)p.plane * 4 * per_item * 2;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    uint16_t *planes = scratch(0, bytes);
    float *acc = scratch(1, 4 * 256 * sizeof(float));
    const int ok = planes && acc;
    failed = !ok;
    if (ok) {
      zero_borders(planes, &p, 4 * per_item); /* for every item of this call */
      configure();
    }
    /* every thread reaches the work-sharing loop (a thread without scratch skips its share) */
#pragma omp for schedule(static)
    for (long item = 0; item < items; ++item) {
      if (!ok) continue;
      const long n = item / (sets / per_item);
      const int s0 = (int)(item % (sets / per_item)) * per_item;
      fill(planes, &p, x + n * (long)H * W * C, s0 * set_channels, per_item * set_channels);
      for (int k = 0; k < per_item; ++k)
        set(planes + (long)k * 4 * p.plane, &p, wp + (long)(s0 + k) * 4 * 3 * 512, bias, relu,
            y + n * (long)H * W * C, (s0 + k) * set_channels, acc);
    }
    if (ok) release();
  }
  return failed ? -3 : 0;
}
