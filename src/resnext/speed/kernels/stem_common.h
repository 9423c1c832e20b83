/* What the fused stem kernels share (stem_amx.c on AMX tiles, stem_dot.c on AVX512-BF16 pair dot
 * products): a k x k convolution of channels-last pixels, + bias, ReLU, then 3x3 max pooling at
 * stride 2 with padding 1, written only as the pooled output. Each thread runs bands of pooled
 * rows of one image: the input rows a band reads are copied once into zero-padded bf16 rows
 * (float32 products: split into hi and lo rows), the convolution's rows are computed, by the
 * kernel's own `conv_row`, into a ring of three float32 rows (raw sums, L2 resident), and each
 * finished 3x3 window is pooled. Pooling commutes with the bias and the ReLU (both monotone, the
 * bias constant per channel), so the window's max is taken of the raw sums and the bias and ReLU
 * applied once per pooled value: bit-identical to adding them first. Band edges: a band of pooled
 * rows starting at r0 > 0 recomputes convolution row 2 r0 - 1, which the band above also
 * computed (at batch 1, where images are split into bands; not at batch 16).
 *
 * Layout: x[N][H][W][Cin] or [N][Cin][H][W], bf16 (as uint16) or float32, whatever the products'
 * dtype (so a float32 NCHW image needs no cast or layout pass before the network);
 * y[N][Hp][Wp][C] in the products' dtype; bias[C] float32. */
#ifndef RESNEXT_STEM_COMMON_H
#define RESNEXT_STEM_COMMON_H

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "bf16_split.h"
#include "scratch.h"

typedef struct {
  const void *x;
  int bf16;    /* products and y in bf16 (else float32: bf16x3) */
  int in_bf16; /* x is bf16 (else float32) */
  int nchw;    /* x is [N][Cin][H][W] (else [N][H][W][Cin]) */
  int N, H, W, Cin, k, s, pad, C;
  int Hc, Wc; /* the convolution's output size */
  int Hp, Wp; /* the pooled output's size */
  int spr;    /* K steps per kernel row: of 32 values (AMX), or pairs of values (dot products) */
} Stem;

/* The rows a band reads, zero-padded, channels-last: padded row ih - row0 holds input row ih
 * from column -pad on, zeros around the image, in bf16; for float32 products split into hi and
 * lo rows (each input value split once, not once per patch it falls in). */
typedef struct {
  uint16_t *hi, *lo;
  int row0;      /* the input row of padded row 0 */
  long row_vals; /* values per padded row */
} Padded;

/* n float32 values to bf16 hi and (unless NULL) lo; any n, the last partial chunk through a
 * zeroed copy. */
__attribute__((target("avx512f,avx512bw"))) static void split_values(const float *src, long n,
                                                                     uint16_t *hi, uint16_t *lo) {
  long i = 0;
  for (; i + 32 <= n; i += 32) split32(src + i, hi + i, lo ? lo + i : NULL);
  if (i < n) {
    float tail[32] = {0};
    uint16_t th[32], tl[32];
    memcpy(tail, src + i, (size_t)(n - i) * 4);
    split32(tail, th, lo ? tl : NULL);
    memcpy(hi + i, th, (size_t)(n - i) * 2);
    if (lo) memcpy(lo + i, tl, (size_t)(n - i) * 2);
  }
}

static inline float bf16_value(uint16_t v) {
  union {
    uint32_t bits;
    float value;
  } u = {(uint32_t)v << 16};
  return u.value;
}

/* Lane indices of the two permutes, for output value p = 16 j + lane (pixel p / 3, channel
 * p % 3): the first picks r (pixel % 16) or g (16 + pixel % 16) into (r, g), the second keeps
 * (r, g)'s lane or picks b (16 + pixel % 16). Constants, so that no row recomputes them. */
static const int RG[48] = {0,  16, 0,  1,  17, 1,  2,  18, 2,  3,  19, 3,  4,  20, 4,  5,
                           21, 5,  6,  22, 6,  7,  23, 7,  8,  24, 8,  9,  25, 9,  10, 26,
                           10, 11, 27, 11, 12, 28, 12, 13, 29, 13, 14, 30, 14, 15, 31, 15};
static const int RGB[48] = {0,  1,  16, 3,  4,  17, 6,  7,  18, 9,  10, 19, 12, 13, 20, 15,
                            0,  21, 2,  3,  22, 5,  6,  23, 8,  9,  24, 11, 12, 25, 14, 15,
                            26, 1,  2,  27, 4,  5,  28, 7,  8,  29, 10, 11, 30, 13, 14, 31};

/* Pixels 0 .. 16 m - 1 (the whole 16s in W) of a row of 3 float32 planes (`plane` values apart)
 * interleaved into dst as RGB triples, in two lane permutes per 16 values; returns 16 m. */
__attribute__((target("avx512f"))) static int interleave3(const float *x, long plane, int W,
                                                           float *dst) {
  __m512i idx1[3], idx2[3];
  for (int j = 0; j < 3; ++j) {
    idx1[j] = _mm512_loadu_si512(RG + 16 * j);
    idx2[j] = _mm512_loadu_si512(RGB + 16 * j);
  }
  int w = 0;
  for (; w + 16 <= W; w += 16) {
    const __m512 r = _mm512_loadu_ps(x + w), g = _mm512_loadu_ps(x + plane + w);
    const __m512 b = _mm512_loadu_ps(x + 2 * plane + w);
    for (int j = 0; j < 3; ++j) {
      const __m512 rg = _mm512_permutex2var_ps(r, idx1[j], g);
      _mm512_storeu_ps(dst + 3L * w + 16 * j, _mm512_permutex2var_ps(rg, idx2[j], b));
    }
  }
  return w;
}

/* Input row ih of image n as W Cin float32 values, channels-last: x itself where it is float32
 * channels-last, else gathered (from the channel planes of an NCHW x) and widened into tmp. */
static const float *row_values(const Stem *st, long n, int ih, float *tmp) {
  const int W = st->W, Cin = st->Cin;
  if (!st->nchw) {
    const long at = (n * st->H + ih) * (long)W * Cin;
    if (!st->in_bf16) return (const float *)st->x + at;
    const uint16_t *x = (const uint16_t *)st->x + at;
    for (long i = 0; i < (long)W * Cin; ++i) tmp[i] = bf16_value(x[i]);
    return tmp;
  }
  int w0 = 0;
  if (Cin == 3 && !st->in_bf16) { /* an RGB float32 image: 16 pixels of 3 planes at a time */
    const long plane = (long)st->H * W, at = (n * 3 * st->H + ih) * (long)W;
    w0 = interleave3((const float *)st->x + at, plane, W, tmp);
  }
  for (int c = 0; c < Cin; ++c) {
    const long at = ((n * Cin + c) * st->H + ih) * (long)W;
    if (st->in_bf16) {
      const uint16_t *x = (const uint16_t *)st->x + at;
      for (int w = w0; w < W; ++w) tmp[(long)w * Cin + c] = bf16_value(x[w]);
    } else {
      const float *x = (const float *)st->x + at;
      for (int w = w0; w < W; ++w) tmp[(long)w * Cin + c] = x[w];
    }
  }
  return tmp;
}

/* Input rows first .. last of image n into `pd` (see Padded); tmp holds W Cin floats. */
static void fill_rows(const Stem *st, long n, int first, int last, const Padded *pd, float *tmp) {
  const long lead = (long)st->pad * st->Cin, vals = (long)st->W * st->Cin;
  const size_t tail = (size_t)(pd->row_vals - lead - vals) * 2;
  for (int ih = first; ih <= last; ++ih) {
    const long at = (ih - pd->row0) * pd->row_vals;
    uint16_t *hi = pd->hi + at, *lo = pd->lo ? pd->lo + at : NULL;
    memset(hi, 0, (size_t)lead * 2);
    memset(hi + lead + vals, 0, tail);
    if (lo) memset(lo, 0, (size_t)lead * 2), memset(lo + lead + vals, 0, tail);
    if (st->bf16 && st->in_bf16 && !st->nchw) { /* already what the products read */
      memcpy(hi + lead, (const uint16_t *)st->x + (n * st->H + ih) * vals, (size_t)vals * 2);
      continue;
    }
    split_values(row_values(st, n, ih, tmp), vals, hi + lead, lo ? lo + lead : NULL);
  }
}

/* One convolution row oh (raw sums, no bias) into `row` ([at least Wc][C] float32), from the
 * padded rows: the kernel's own product. */
typedef void (*conv_row_fn)(const Stem *st, const uint16_t *wp, const Padded *pd, int oh,
                            float *row);

/* Pooled row r of image n: per pooled column, the max over the 3 x 3 window of the convolution
 * rows (ring slots, NULL outside the image) and columns, + bias, ReLU, into y. */
__attribute__((target("avx512f,avx512bw"))) static void pool_row(const Stem *st,
                                                                 float *const rows[3],
                                                                 const float *bias, long n,
                                                                 int r, void *y) {
  const int C = st->C;
  const long out = ((n * st->Hp + r) * (long)st->Wp) * C;
  for (int q = 0; q < st->Wp; ++q) {
    const int c0 = 2 * q - 1 < 0 ? 0 : 2 * q - 1, c1 = 2 * q + 1 < st->Wc ? 2 * q + 1 : st->Wc - 1;
    for (int c = 0; c < C; c += 16) {
      __m512 m = _mm512_set1_ps(-__builtin_inff());
      __mmask16 nan = 0; /* max_ps drops a NaN in one operand; torch's pooling keeps it */
      for (int i = 0; i < 3; ++i) {
        if (!rows[i]) continue;
        for (int w = c0; w <= c1; ++w) {
          const __m512 v = _mm512_loadu_ps(rows[i] + (long)w * C + c);
          m = _mm512_max_ps(m, v);
          nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        }
      }
      /* ReLU as max(0, x): max_ps returns its second operand where one is NaN */
      m = _mm512_max_ps(_mm512_setzero_ps(), _mm512_add_ps(m, _mm512_loadu_ps(bias + c)));
      m = _mm512_mask_blend_ps(nan, m, _mm512_set1_ps(__builtin_nanf("")));
      const long at = out + (long)q * C + c;
      if (st->bf16) {
        const __m512i b = _mm512_srli_epi32(round_bf16(_mm512_castps_si512(m)), 16);
        _mm256_storeu_si256((__m256i *)((uint16_t *)y + at), _mm512_cvtepi32_epi16(b));
      } else {
        _mm512_storeu_ps((float *)y + at, m);
      }
    }
  }
}

/* Pooled rows r0 .. r1 - 1 of image n: the input rows they read padded once, then each
 * convolution row computed once by `conv_row` into the ring (slot oh % 3), each pooled row once
 * its window's last row is there. */
static void run_band(const Stem *st, const uint16_t *wp, const float *bias, long n, int r0, int r1,
                     void *y, float *ring, long ring_row, Padded *pd, float *tmp, conv_row_fn conv_row) {
  const int c0 = 2 * r0 - 1 < 0 ? 0 : 2 * r0 - 1;
  const int c1 = 2 * r1 - 1 < st->Hc ? 2 * r1 - 1 : st->Hc - 1; /* convolution rows c0 .. c1 */
  int first = st->s * c0 - st->pad, last = st->s * c1 - st->pad + st->k - 1;
  if (first < 0) first = 0;
  if (last > st->H - 1) last = st->H - 1;
  pd->row0 = first;
  fill_rows(st, n, first, last, pd, tmp);
  int next = c0; /* the next convolution row to compute */
  for (int r = r0; r < r1; ++r) {
    const int end = 2 * r + 1 < st->Hc ? 2 * r + 1 : st->Hc - 1;
    for (; next <= end; ++next) conv_row(st, wp, pd, next, ring + (next % 3) * ring_row);
    float *rows[3];
    for (int i = 0; i < 3; ++i) {
      const int oh = 2 * r - 1 + i;
      rows[i] = oh >= 0 && oh < st->Hc ? ring + (oh % 3) * ring_row : NULL;
    }
    pool_row(st, rows, bias, n, r, y);
  }
}

/* st's sizes from its shape: the convolution's output, then the pooled one. */
static void stem_sizes(Stem *st) {
  st->Hc = (st->H + 2 * st->pad - st->k) / st->s + 1, st->Wc = (st->W + 2 * st->pad - st->k) / st->s + 1;
  st->Hp = (st->Hc - 1) / 2 + 1, st->Wp = (st->Wc - 1) / 2 + 1;
}

/* The whole stem: bands of pooled rows shared between the threads, each computed by run_band
 * with `conv_row`, in scratch of 3 ring rows of `ring_row` floats and padded rows of `row_vals`
 * values (each kernel says how far its products read). `begin` and `end` (or NULL) run on each
 * thread around its bands (the AMX tile configuration). Returns 0, or -2 if memory runs out. */
static int run_stem(const Stem *st, const uint16_t *wp, const float *bias, void *y, int threads,
                    long ring_row, long row_vals, conv_row_fn conv_row, void (*begin)(void),
                    void (*end)(void)) {
  const int N = st->N, W = st->W, H = st->H, Cin = st->Cin;
  if (N == 0) return 0;
  /* bands per image: whole images while there are enough to share, else each image split so
   * that every thread has several bands (their edges recompute one convolution row each) */
  int bands = N >= 4 * threads ? 1 : (4 * threads + N - 1) / N;
  if (bands > st->Hp) bands = st->Hp;
  const long items = (long)N * bands;
  const long image_end = (long)(st->pad + W) * Cin;
  const long vals = (row_vals > image_end ? row_vals : (image_end + 31) / 32 * 32) + 32;
  const size_t pad_bytes = (size_t)H * vals * 2;
  const size_t tmp_bytes = ((size_t)W * Cin * 4 + 63) / 64 * 64;
  const size_t bytes = 3 * ring_row * 4 + (st->bf16 ? 1 : 2) * pad_bytes + tmp_bytes + 64;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    char *buf = scratch(0, bytes);
    const int nth = omp_get_num_threads(), me = omp_get_thread_num();
    const long first = items * me / nth, last = items * (me + 1) / nth;
    if (!buf) failed = 1;
    if (buf && first < last) {
      float *ring = (float *)buf;
      Padded pd = {(uint16_t *)(buf + 3 * ring_row * 4), NULL, 0, vals};
      if (!st->bf16) pd.lo = pd.hi + pad_bytes / 2;
      float *tmp = (float *)(buf + 3 * ring_row * 4 + (st->bf16 ? 1 : 2) * pad_bytes);
      if (begin) begin();
      for (long item = first; item < last; ++item) {
        const long n = item / bands, b = item % bands;
        const int r0 = (int)(st->Hp * b / bands), r1 = (int)(st->Hp * (b + 1) / bands);
        run_band(st, wp, bias, n, r0, r1, y, ring, ring_row, &pd, tmp, conv_row);
      }
      if (end) end();
    }
  }
  return failed ? -2 : 0;
}

#endif
