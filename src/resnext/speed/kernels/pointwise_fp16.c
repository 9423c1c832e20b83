/* A float32 1×1 convolution of a channels-last tensor whose products run in float16 (AVX512-FP16),
 * with float32 sums every 64 products; its bias, optionally a residual, and optionally a ReLU
 * applied in float32 as the output is written.
 *
 * Why: on a Xeon whose AMX is hidden (machine D of benchmarks/RESULTS.md) a 512-bit float16 FMA
 * does 32 multiply-adds in the time a float32 one does 16 (measured ~460 against ~240 GFLOP/s a
 * core), while its bf16 pair dot products run at the float32 rate. The 1×1s are most of a
 * ResNeXt's time; in float16 they can run up to twice as fast, at float16's precision.
 *
 * Precision and range. float16 keeps an 11-bit significand (bf16: 8, float32: 24) but reaches
 * only ±65504. The weight is scaled by a power of two 2^e (exact) so that its largest magnitude
 * lies in [0.5, 1); each block of input rows is scaled likewise so that its largest magnitude
 * lies in [128, 256), then both are rounded to float16. A partial sum of 64
 * products is then below 64 × 256 × 1 = 16384 and cannot overflow; it is converted to float32
 * and added to the row's float32 sums, which are scaled back (two exact power-of-two products)
 * before the bias. A block holding an infinity or NaN is computed instead in float32 from the
 * float16 weights, so the non-finite values come out where torch's would.
 *
 * Layout. The weight is packed in panels of 32 output channels, each C_in × 32 float16 (one
 * 64-byte vector per input channel). A block of up to MAX_ROWS pixel rows is converted into
 * tiles of TILE pixels; within a tile the input channels come in runs of 64, each run holding the
 * tile's pixels one after another (pixel r's run at r × 64), so a conversion writes whole vectors
 * and the product broadcasts each value from L1. A register tile is TILE = 12 pixels × 32
 * outputs: 12 float16 accumulators and one weight vector; each input channel costs one vector
 * load and 12 FMAs with their input value broadcast from memory. The input channels are taken
 * CHUNK at a time so that a panel's slice (16 KB) stays in L1 while the block's tiles pass over
 * it; the float32 sums live in a per-thread buffer (the block × the outputs, at most SUMS floats,
 * in L2) until the epilogue writes the output once. Timing on machine D chose the 12-pixel tile
 * and 64-product runs over 8 or 14 pixels and 32 or 128 (RESULTS.md, stop 56).
 *
 * Threads split the pixel rows; with fewer rows than two blocks a thread (batch 1's 7² and 14²
 * layers) they split the panels instead, so that each reads only its part of the weight.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "scratch.h"

enum { PANEL = 32, TILE = 12, RUN = 64, CHUNK = 256, MAX_ROWS = 96 };
/* the float32 sums a block keeps in its thread's buffer: at most this many floats */
enum { SUMS = 131072 };

/* The exponent e that puts the largest magnitude (its finite bit pattern) times 2^e in
 * [2^(top-1), 2^top): top 0 for the weight's [0.5, 1), 8 for the input's [128, 256); 0 for all
 * zeros; clamped to [-126, 126], where 2^e is a normal float. */
static int scale_exponent(uint32_t largest_bits, int top) {
  if (largest_bits == 0) return 0;
  int exponent; /* of the largest value: it lies in [2^exponent, 2^(exponent+1)) */
  if (largest_bits < 0x00800000u) {
    /* subnormal: find the leading bit */
    exponent = -127;
    uint32_t m = largest_bits;
    while (!(m & 0x00400000u)) {
      m <<= 1;
      --exponent;
    }
  } else {
    exponent = (int)(largest_bits >> 23) - 127;
  }
  int e = top - 1 - exponent;
  return e > 126 ? 126 : e < -126 ? -126 : e;
}

static float power_of_two(int e) { /* exact for e in [-126, 127] */
  uint32_t bits = (uint32_t)(e + 127) << 23;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

static uint32_t largest_bits(const float *v, long n) {
  __m512i top = _mm512_setzero_si512();
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  long i = 0;
  for (; i + 16 <= n; i += 16)
    top = _mm512_max_epu32(top, _mm512_and_si512(_mm512_loadu_si512(v + i), magnitude));
  uint32_t largest = (uint32_t)_mm512_reduce_max_epu32(top);
  for (; i < n; ++i) {
    uint32_t bits;
    memcpy(&bits, v + i, sizeof bits);
    bits &= 0x7fffffffu;
    if (bits > largest) largest = bits;
  }
  return largest; /* >= 0x7f800000: an infinity or NaN among them */
}

/* dst[0, n) = src[0, n) · scale rounded to float16 (to nearest even; the scale a power of two). */
static inline void scaled_halves(const float *src, _Float16 *dst, long n, float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  long i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_ph(dst + i, _mm512_cvtxps_ph(_mm512_mul_ps(_mm512_loadu_ps(src + i), s)));
  for (; i < n; ++i) dst[i] = (_Float16)(src[i] * scale);
}

/* Pack the weight, given in panel order (n / 32 panels, each k × 32 float32: panel p's row c holds
 * output channels 32p..32p+31 of input channel c), as float16 scaled by 2^exponent into `dest`
 * (n × k halves, the same order); 0, or 1 for bad sizes or a non-finite weight. */
int pointwise_fp16_pack(const float *panels, _Float16 *dest, int n, int k, int *exponent) {
  if (n < PANEL || n % PANEL || k < 1) return 1;
  const long count = (long)n * k; /* a multiple of 32 */
  const uint32_t largest = largest_bits(panels, count);
  if (largest >= 0x7f800000u) return 1;
  const int e = scale_exponent(largest, 0);
  scaled_halves(panels, dest, count, power_of_two(e));
  *exponent = e;
  return 0;
}

/* The 32 halves of `v` as two vectors of 16 floats (exact). */
static inline void widen(__m512h v, __m512 *lo, __m512 *hi) {
  const __m512i bits = _mm512_castph_si512(v);
  *lo = _mm512_cvtxph_ps(_mm256_castsi256_ph(_mm512_castsi512_si256(bits)));
  *hi = _mm512_cvtxph_ps(_mm256_castsi256_ph(_mm512_extracti64x4_epi64(bits, 1)));
}

/* sums (R pixels × 32, stride ld) (+)= the tile's runs over `chunk` input channels × one panel
 * slice; each run of 64 products summed in float16, then added in float32. */
static inline __attribute__((always_inline)) void tile_product(int R, const _Float16 *a,
                                                                const _Float16 *w, int chunk,
                                                                float *sums, long ld, int fresh) {
  for (int c0 = 0; c0 < chunk; c0 += RUN) {
    const int run = chunk - c0 < RUN ? chunk - c0 : RUN;
    const _Float16 *ar = a + (long)(c0 / RUN) * TILE * RUN;
    __m512h acc[TILE];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ph();
    for (int c = 0; c < run; ++c) {
      const __m512h wv = _mm512_load_ph(w + (long)(c0 + c) * PANEL);
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_fmadd_ph(_mm512_set1_ph(ar[r * RUN + c]), wv, acc[r]);
    }
    const int first = fresh && c0 == 0;
    for (int r = 0; r < R; ++r) {
      float *s = sums + r * ld;
      __m512 lo, hi;
      widen(acc[r], &lo, &hi);
      if (!first) {
        lo = _mm512_add_ps(lo, _mm512_load_ps(s));
        hi = _mm512_add_ps(hi, _mm512_load_ps(s + 16));
      }
      _mm512_store_ps(s, lo);
      _mm512_store_ps(s + 16, hi);
    }
  }
}

static void tile_any(int R, const _Float16 *a, const _Float16 *w, int chunk, float *sums, long ld,
                     int fresh) {
  switch (R) { /* constant tile heights, so the accumulators stay in registers */
#define TILE_CASE(n) \
  case n:            \
    tile_product(n, a, w, chunk, sums, ld, fresh); \
    break;
    TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) TILE_CASE(5) TILE_CASE(6)
    TILE_CASE(7) TILE_CASE(8) TILE_CASE(9) TILE_CASE(10) TILE_CASE(11) TILE_CASE(12)
#undef TILE_CASE
  }
}

typedef struct {
  const float *x;
  long height, width, out_h, out_w, stride;
  int k;
} Input;

static const float *pixel_row(const Input *in, long p) {
  const long image = p / (in->out_h * in->out_w);
  const long i = (p / in->out_w) % in->out_h, j = p % in->out_w;
  return in->x + ((image * in->height + i * in->stride) * in->width + j * in->stride) * in->k;
}

/* largest_bits over input rows [p0, p0 + rows). */
static uint32_t rows_largest_bits(const Input *in, long p0, int rows) {
  uint32_t largest = 0;
  for (int r = 0; r < rows; ++r) {
    const uint32_t bits = largest_bits(pixel_row(in, p0 + r), in->k);
    if (bits > largest) largest = bits;
  }
  return largest;
}

/* Convert rows [p0, p0 + rows) scaled by `scale` into tiles of runs (see the header). */
static void convert_rows(const Input *in, long p0, int rows, float scale, _Float16 *a) {
  const int k = in->k, runs = (k + RUN - 1) / RUN;
  for (int r = 0; r < rows; ++r) {
    const float *src = pixel_row(in, p0 + r);
    _Float16 *tile = a + (long)(r / TILE) * runs * TILE * RUN;
    for (int q = 0; q < runs; ++q) {
      const int c0 = q * RUN;
      scaled_halves(src + c0, tile + ((long)q * TILE + r % TILE) * RUN,
                    k - c0 < RUN ? k - c0 : RUN, scale);
    }
  }
}

/* Rows with an infinity or NaN: float32 sums of the float16 weights' products, unscaled after. */
static void float32_rows(const Input *in, long p0, int rows, const _Float16 *packed, int panel0,
                         int panels, float *sums, long ld) {
  const int k = in->k;
  for (int r = 0; r < rows; ++r) {
    const float *src = pixel_row(in, p0 + r);
    for (int p = 0; p < panels; ++p)
      for (int j = 0; j < PANEL; ++j) {
        const _Float16 *w = packed + (long)(panel0 + p) * k * PANEL + j;
        float total = 0.0f;
        for (int c = 0; c < k; ++c) total += src[c] * (float)w[(long)c * PANEL];
        sums[r * ld + p * PANEL + j] = total;
      }
  }
}

/* y[rows, columns of panels] = relu?(sums · unscale + bias (+ res)) */
static void write_rows(const float *sums, long ld, long p0, int rows, int column0, int columns,
                       float unscale_x, float unscale_w, const float *bias, const float *res,
                       float *y, int n, int relu) {
  const __m512 ux = _mm512_set1_ps(unscale_x), uw = _mm512_set1_ps(unscale_w);
  const __m512 zero = _mm512_setzero_ps();
  for (int r = 0; r < rows; ++r) {
    float *out = y + (p0 + r) * (long)n + column0;
    const float *add = res ? res + (p0 + r) * (long)n + column0 : NULL;
    for (int c = 0; c < columns; c += 16) {
      __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_load_ps(sums + r * ld + c), ux), uw);
      v = _mm512_add_ps(v, _mm512_loadu_ps(bias + column0 + c));
      if (add) v = _mm512_add_ps(v, _mm512_loadu_ps(add + c));
      /* max(v, 0) with v first: a NaN stays NaN through the ReLU, as in torch */
      if (relu) v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), v, zero);
      _mm512_storeu_ps(out + c, v);
    }
  }
}

/* One thread's part: pixel rows [row0, row1) × panels [panel0, panel0 + panels). */
static int run_part(const Input *in, const _Float16 *packed, int weight_exponent, long row0,
                    long row1, int panel0, int panels, const float *bias, const float *res,
                    float *y, int n, int relu) {
  const int k = in->k, runs = (k + RUN - 1) / RUN;
  const long ld = (long)panels * PANEL;
  int block = (int)(SUMS / ld) / TILE * TILE;
  block = block > MAX_ROWS ? MAX_ROWS : block < TILE ? TILE : block;
  const size_t a_halves = (size_t)(block / TILE) * runs * TILE * RUN;
  char *buffer = scratch(0, a_halves * sizeof(_Float16) + (size_t)block * ld * sizeof(float));
  if (!buffer) return 2;
  float *sums = (float *)buffer;
  _Float16 *a = (_Float16 *)(buffer + (size_t)block * ld * sizeof(float));
  const float unscale_w = power_of_two(-weight_exponent);
  for (long p0 = row0; p0 < row1; p0 += block) {
    const int rows = row1 - p0 < block ? (int)(row1 - p0) : block;
    const uint32_t largest = rows_largest_bits(in, p0, rows);
    float unscale_x = 1.0f;
    if (largest >= 0x7f800000u) {
      float32_rows(in, p0, rows, packed, panel0, panels, sums, ld);
    } else {
      const int e = scale_exponent(largest, 8);
      unscale_x = power_of_two(-e);
      convert_rows(in, p0, rows, power_of_two(e), a);
      for (int c0 = 0; c0 < k; c0 += CHUNK) {
        const int chunk = k - c0 < CHUNK ? k - c0 : CHUNK;
        for (int p = 0; p < panels; ++p) {
          const _Float16 *w = packed + ((long)(panel0 + p) * k + c0) * PANEL;
          for (int r = 0; r < rows; r += TILE) {
            const int height = rows - r < TILE ? rows - r : TILE;
            const _Float16 *tile =
                a + ((long)(r / TILE) * runs + c0 / RUN) * TILE * RUN; /* this chunk's runs */
            tile_any(height, tile, w, chunk, sums + r * ld + p * PANEL, ld, c0 == 0);
          }
        }
      }
    }
    write_rows(sums, ld, p0, rows, panel0 * PANEL, panels * PANEL, unscale_x, unscale_w, bias,
               res, y, n, relu);
  }
  return 0;
}

/* y = relu?(conv1x1(x, w, stride) + bias [+ res]) for a channels-last x of `images` × `height` ×
 * `width` pixels of k channels (every `stride`-th pixel of every `stride`-th row read), with
 * `packed` and `weight_exponent` from pointwise_fp16_pack, y and res (output pixels × n,
 * row-major). `res` may be `y` itself: each row's residual is read before it is written. */
int pointwise_fp16(const float *x, const _Float16 *packed, const float *bias, const float *res,
                   float *y, int images, int height, int width, int k, int n, int stride, int relu,
                   int weight_exponent, int threads) {
  if (images < 1 || height < 1 || width < 1 || k < 1 || n < PANEL || n % PANEL || stride < 1 ||
      threads < 1 || weight_exponent < -126 || weight_exponent > 126)
    return 1;
  Input in = {x, height, width, (height - 1) / stride + 1, (width - 1) / stride + 1, stride, k};
  const long rows = images * in.out_h * in.out_w;
  const int panels = n / PANEL;
  /* few rows (batch 1's late layers): split the weight, not the rows */
  const int split_panels = rows < 2L * MAX_ROWS * threads && panels >= threads;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    const int t = omp_get_thread_num(), count = omp_get_num_threads();
    if (split_panels) {
      const int first = panels * t / count, last = panels * (t + 1) / count;
      if (last > first)
        failed |= run_part(&in, packed, weight_exponent, 0, rows, first, last - first, bias, res,
                           y, n, relu);
    } else {
      const long first = rows * t / count, last = rows * (t + 1) / count;
      if (last > first)
        failed |= run_part(&in, packed, weight_exponent, first, last, 0, panels, bias, res, y, n,
                           relu);
    }
  }
  return failed;
}

/* The weight gradient dW = Gᵀ·X of the same convolution, with float16 products.
 *
 * G holds the output's gradient as pixel rows (rows × n, row-major) and X the input's pixels the
 * convolution read (every `stride`-th, k channels, a multiple of 32). The reduction runs over the
 * pixels in blocks (fixed by the layer's shape, not by the threads). Each block is scanned and
 * converted whole: X scaled by 2^ex so that its largest magnitude lies in [16, 32), G by 2^eg
 * into [8, 16) (a product is below 512 and a run of 64 below 32768, in float16's range), X into
 * panels of 32 channels (each pixel's 32 one vector), G as rows; with WG_TILED_G outputs or more,
 * G tile by tile instead (a tile's 12 values of each row side by side). There a block of G's rows
 * is larger than L2 and a tile reads 24 bytes of each, a line apiece; tiled, it reads them in
 * sequence: 0.66-0.88 of the time at ResNeXt-50's 2,048-output layers (RESULTS.md, stop 59), the
 * same outputs to the bit. With fewer outputs the copying cost more than it saved.
 *
 * A register tile holds 12 output channels × 32 input channels of dW: per pixel one X vector and
 * 12 FMAs with G's values broadcast from its row. Each run of 64 pixels' float16 sums is scaled
 * back and added to float32 sums in place. A block is at least WG_MIN_BLOCK rows, more when dW is
 * large beside a row (up to WG_MAX_BLOCK), so that the sums pass through the cache few times;
 * within it the outputs go OUT_CHUNK tiles at a time, so that those rows of G stay in L2 while
 * the panels of X pass under them. A block holding an infinity or NaN is summed in float32.
 *
 * Threads: with at least two blocks a thread, each sums a contiguous range of blocks into sums of
 * its own (thread 0 into dW), and the sums are added in thread order at the end, each thread a
 * share of dW's rows; with fewer, each takes a range of X's panels over every block, scanning and
 * converting every block itself (the scales are the block's either way). One barrier a call, none
 * a block: a thread descheduled by another process (data-loading workers on the same cores) would
 * otherwise hold up the other at every block. */
enum { WG_MIN_BLOCK = 256, WG_MAX_BLOCK = 1024, WG_X_TOP = 5, WG_G_TOP = 4, OUT_CHUNK = 8 };
enum { WG_TILED_G = 2048 };

/* dw (R output channels × 32, rows ld apart) += the products over `pixels` rows of g (R values
 * of each row, rows ldg apart) and xp (one 32-vector a row), in runs of 64 scaled back by
 * ux · ug. */
static inline __attribute__((always_inline)) void wgrad_tile(int R, const _Float16 *g, long ldg,
                                                              const _Float16 *xp, int pixels,
                                                              float *dw, long ld, __m512 ux,
                                                              __m512 ug) {
  for (int p0 = 0; p0 < pixels; p0 += RUN) {
    const int run = pixels - p0 < RUN ? pixels - p0 : RUN;
    __m512h acc[TILE];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ph();
    for (int p = p0; p < p0 + run; ++p) {
      const __m512h xv = _mm512_load_ph(xp + (long)p * PANEL);
      const _Float16 *gr = g + (long)p * ldg;
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ph(_mm512_set1_ph(gr[r]), xv, acc[r]);
    }
    for (int r = 0; r < R; ++r) {
      float *s = dw + r * ld;
      __m512 lo, hi;
      widen(acc[r], &lo, &hi);
      lo = _mm512_mul_ps(_mm512_mul_ps(lo, ux), ug); /* two exact power-of-two products */
      hi = _mm512_mul_ps(_mm512_mul_ps(hi, ux), ug);
      _mm512_store_ps(s, _mm512_add_ps(_mm512_load_ps(s), lo));
      _mm512_store_ps(s + 16, _mm512_add_ps(_mm512_load_ps(s + 16), hi));
    }
  }
}

static void wgrad_tile_any(int R, const _Float16 *g, long ldg, const _Float16 *xp, int pixels,
                           float *dw, long ld, __m512 ux, __m512 ug) {
  switch (R) {
#define WG_CASE(n) \
  case n:          \
    wgrad_tile(n, g, ldg, xp, pixels, dw, ld, ux, ug); \
    break;
    WG_CASE(1) WG_CASE(2) WG_CASE(3) WG_CASE(4) WG_CASE(5) WG_CASE(6)
    WG_CASE(7) WG_CASE(8) WG_CASE(9) WG_CASE(10) WG_CASE(11) WG_CASE(12)
#undef WG_CASE
  }
}

/* dw[:, columns [i0, i1)] += Σ over rows [p0, p0 + rows) of gᵀ·x in float32 (a block with an
 * infinity or NaN: they land where float32's would). */
static void wgrad_float32(const Input *in, const float *g, int n, long p0, int rows, int i0,
                          int i1, float *dw) {
  const int k = in->k;
  for (int r = 0; r < rows; ++r) {
    const float *xr = pixel_row(in, p0 + r), *gr = g + (p0 + r) * (long)n;
    for (int o = 0; o < n; ++o)
      for (int i = i0; i < i1; ++i) dw[(long)o * k + i] += gr[o] * xr[i];
  }
}

typedef struct {
  const Input *in;
  const float *g;
  int n, k;
  long block, ldg;
  int tiled; /* G's block converted tile by tile (else row by row, rows ldg apart) */
} Wgrad;

/* sums[:, panels [q0, q1)] += block `p0`'s products (`size` rows), converted into xh, gh */
static void wgrad_block(const Wgrad *w, long p0, int size, int q0, int q1, _Float16 *xh,
                        _Float16 *gh, float *sums) {
  const int n = w->n, k = w->k;
  const uint32_t lx = rows_largest_bits(w->in, p0, size);
  const uint32_t lg = largest_bits(w->g + p0 * (long)n, (long)size * n); /* G's rows are dense */
  if (lx >= 0x7f800000u || lg >= 0x7f800000u) {
    wgrad_float32(w->in, w->g, n, p0, size, q0 * PANEL, q1 * PANEL, sums);
    return;
  }
  const int ex = scale_exponent(lx, WG_X_TOP), eg = scale_exponent(lg, WG_G_TOP);
  const float scale_x = power_of_two(ex), scale_g = power_of_two(eg);
  _Float16 *row = gh + w->block * w->ldg; /* a row of G converted, before it is tiled */
  for (int r = 0; r < size; ++r) {
    const float *src = pixel_row(w->in, p0 + r);
    for (int q = q0; q < q1; ++q)
      scaled_halves(src + q * PANEL, xh + ((long)(q - q0) * size + r) * PANEL, PANEL, scale_x);
    if (!w->tiled) {
      scaled_halves(w->g + (p0 + r) * (long)n, gh + r * w->ldg, n, scale_g);
      continue;
    }
    scaled_halves(w->g + (p0 + r) * (long)n, row, n, scale_g);
    /* G tile by tile: the tile at output o holds its R values of each row side by side */
    int o = 0;
    for (; o + TILE <= n; o += TILE) /* a constant size: two moves, not a call */
      memcpy(gh + (long)o * size + (long)r * TILE, row + o, TILE * sizeof(_Float16));
    if (o < n)
      memcpy(gh + (long)o * size + (long)r * (n - o), row + o, (size_t)(n - o) * sizeof(_Float16));
  }
  const __m512 ux = _mm512_set1_ps(power_of_two(-ex)), ug = _mm512_set1_ps(power_of_two(-eg));
  for (int o0 = 0; o0 < n; o0 += OUT_CHUNK * TILE) {
    const int o1 = n - o0 < OUT_CHUNK * TILE ? n : o0 + OUT_CHUNK * TILE;
    for (int q = q0; q < q1; ++q)
      for (int o = o0; o < o1; o += TILE) {
        const int R = o1 - o < TILE ? o1 - o : TILE;
        wgrad_tile_any(R, w->tiled ? gh + (long)o * size : gh + o, w->tiled ? R : w->ldg,
                       xh + (long)(q - q0) * size * PANEL, size, sums + (long)o * k + q * PANEL, k,
                       ux, ug);
      }
  }
}

/* dw (n × k row-major float32: C_out × C_in, 64-byte aligned) = Σ over the output pixels of
 * g[p]ᵀ·x[p], for a channels-last x read as pointwise_fp16 reads it (k a multiple of 32) and g
 * (output pixels × n, row-major); 0, 1 for bad sizes, 2 without memory for the buffers. */
int pointwise_fp16_wgrad(const float *x, const float *g, float *dw, int images, int height,
                         int width, int k, int n, int stride, int threads) {
  if (images < 1 || height < 1 || width < 1 || k < PANEL || k % PANEL || n < 1 || stride < 1 ||
      threads < 1)
    return 1;
  Input in = {x, height, width, (height - 1) / stride + 1, (width - 1) / stride + 1, stride, k};
  const long rows = images * in.out_h * in.out_w;
  const int panels = k / PANEL;
  /* rows a block: the sums' n·k floats pass through the cache once a block, against (n + k)
   * halves of converted operands a row */
  long block = (long)n * k / (n + k) / RUN * RUN;
  block = block < WG_MIN_BLOCK ? WG_MIN_BLOCK : block > WG_MAX_BLOCK ? WG_MAX_BLOCK : block;
  if (block > rows) block = rows;
  const long blocks = (rows + block - 1) / block;
  const int by_blocks = blocks >= 2L * threads;
  if (!by_blocks && threads > panels) threads = panels;
  /* 64 bytes more than a multiple of 32 halves, so that G's rows are not a power of two apart */
  const Wgrad w = {&in, g, n, k, block, (n + 31) / 32 * 32 + 32, n >= WG_TILED_G};
  const size_t operand_bytes = ((size_t)block * (k + w.ldg) + w.ldg) * sizeof(_Float16);
  const size_t sums_bytes = by_blocks ? (size_t)n * k * sizeof(float) : 0;
  if (threads > 64) threads = 64;
  float *partial[64]; /* each thread's sums (thread 0's are dW itself) */
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), count = omp_get_num_threads();
    char *buffer = scratch(1, operand_bytes + (t > 0 ? sums_bytes : 0));
    if (!buffer) {
#pragma omp atomic write
      failed = 2;
    }
    _Float16 *xh = (_Float16 *)buffer;
    _Float16 *gh = xh + (size_t)block * k;
    float *sums = t > 0 && by_blocks && buffer ? (float *)(buffer + operand_bytes) : dw;
    partial[t] = sums;
    /* the thread's share: blocks [b0, b1) and panels [q0, q1) */
    const long b0 = by_blocks ? blocks * t / count : 0;
    const long b1 = by_blocks ? blocks * (t + 1) / count : blocks;
    const int q0 = by_blocks ? 0 : panels * t / count;
    const int q1 = by_blocks ? panels : panels * (t + 1) / count;
    if (buffer) {
      if (by_blocks)
        memset(sums, 0, sums_bytes);
      else
        for (int o = 0; o < n; ++o)
          memset(dw + (long)o * k + q0 * PANEL, 0, (size_t)(q1 - q0) * PANEL * sizeof(float));
      for (long b = b0; b < b1; ++b) {
        const long p0 = b * block;
        const int size = rows - p0 < block ? (int)(rows - p0) : (int)block;
        wgrad_block(&w, p0, size, q0, q1, xh, gh, sums);
      }
    }
    if (by_blocks) {
#pragma omp barrier
      int stop;
#pragma omp atomic read
      stop = failed;
      /* dW's rows [o0, o1) += the other threads' sums, in thread order */
      const long i0 = (long)k * (n * t / count), i1 = (long)k * (n * (t + 1) / count);
      for (int u = 1; u < count && !stop; ++u)
        for (long i = i0; i < i1; i += 16)
          _mm512_store_ps(dw + i, _mm512_add_ps(_mm512_load_ps(dw + i),
                                                _mm512_load_ps(partial[u] + i)));
    }
  }
  return failed;
}
