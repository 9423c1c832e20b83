/* The quads form of a grouped 3x3 convolution (4 or 8 channels per group, stride 1, bf16) on AMX
 * tiles: each group's zero-bordered plane and a set of 4 groups' products and read-back (see
 * grouped3x3_quads_amx.c for the method). Shared by that kernel and the block kernel of
 * grouped3x3_amx.c, which runs a bottleneck's grouped convolution in this form. */
#ifndef RESNEXT_QUADS_PLANES_H
#define RESNEXT_QUADS_PLANES_H

#include <stdint.h>
#include <string.h>

#include "amx_tiles.h"

/* Whether the quads form takes C channels of cpg per group (stride 1 only). */
static inline int quads_supported(int C, int cpg) {
  return C > 0 && (cpg == 4 || cpg == 8) && C % (4 * cpg) == 0;
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
  /* the furthest read: quad H Qv + 14 (a range of rows from any row reads up to 15 quads past
   * its end), kernel row 2, 32 / cpg pixels */
  const long quads = (long)H * p.Qv + 15;
  const long reach = 2L * p.Wq + p.P * quads + 32 / cpg, rows = (long)(H + 2) * p.Wq;
  p.plane = (reach > rows ? reach : rows) * cpg;
  return p;
}

/* Zero what the fills do not write in `count` planes: row 0, each row's border columns, and row
 * H + 1 on (with the slack the last tiles read). No fill writes there, so once per call will do. */
static void quads_zero_borders(uint16_t *planes, const Planes *p, int count) {
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
static void quads_fill(uint16_t *planes, const Planes *p, const uint16_t *xn, int c0, int channels) {
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

/* One set of 4 groups (channels c0 .. c0 + 4 cpg - 1) at quads v_begin .. v_end - 1 (whole
 * output rows lo .. hi - 1: v_begin = lo Qv, v_end = hi Qv): every 16 quads, the groups' products
 * into accumulators 0-3, then their outputs (+ bias, ReLU if relu, rounded to bf16) into out,
 * whose first row is output row lo (rows of W pixels, C channels each). */
__attribute__((target("amx-tile,amx-bf16,avx512bf16"))) static void quads_rows(
    const uint16_t *planes, const Planes *p, const uint16_t *ws, const float *bias, int relu,
    uint16_t *out, int c0, float *acc, int lo, int hi) {
  const int wide = p->cpg == 8; /* 32 channels a set, else 16 */
  const __m512 zero = _mm512_setzero_ps();
  const __m512 b0 = bias ? _mm512_loadu_ps(bias + c0) : zero;
  const __m512 b1 = bias && wide ? _mm512_loadu_ps(bias + c0 + 16) : zero;
  const long v_end = (long)hi * p->Qv, gs = p->plane;
  for (long v0 = (long)lo * p->Qv; v0 < v_end; v0 += 16) {
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
      if (oh >= hi) break;
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
      uint16_t *dst = out + ((long)(oh - lo) * p->W + (long)p->P * q) * p->C + c0;
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

#endif
