/* Grouped 3x3 convolution (padding 1, stride 1 or 2) on channels-last float32 tensors, AVX2 + FMA.
 *
 * The AVX-512 kernel's scheme (grouped3x3.c) on 8-lane registers, for CPUs without AVX-512
 * (AMD Zen 1-3, Intel before Skylake-SP and most laptops), where oneDNN runs ResNeXt-50's
 * stage-1 grouped 3x3 (4 channels per group) at about a tenth of its dense rate. A register holds
 * 8 consecutive channels viewed as two 4-lane blocks:
 *  - across blocks (groups of 8 or more channels) the input register is also used with its two
 *    blocks swapped (R = 2), so that every 4x4 block of the group's weights meets its input block
 *    in place;
 *  - within a block the 4x4 product is split into 4 diagonals with an accumulator each, summed
 *    over all taps and rotated into place once per output pixel (the rotation stays within a
 *    128-bit lane, one vpermilps).
 * Groups wider than 8 channels read M = cpg / 8 input registers per 8 outputs. With 16 registers,
 * P = 2 output pixels (8 accumulators) is what fits beside the inputs and a weight vector.
 *
 * Layout: x[N][H][W][C] and y[N][Ho][Wo][C] float32; packed weights wp[C/8][9][M][R][4][8]
 * (built by grouped_kernel.pack_weights for 8 lanes); bias[C] or NULL.
 */
#include <immintrin.h>

#include "dgrad_phases.h"
#include "input_prefetch.h"

#ifndef PIXELS
#define PIXELS 2
#endif

static inline __m256 swap_blocks(__m256 v) { return _mm256_permute2f128_ps(v, v, 0x01); }

#define DEFINE_KERNEL(NAME, R, M, P)                                                              \
  /* P output pixels of one 8-channel output block: all taps into 4 diagonal accumulators. */  \
  static inline __attribute__((always_inline)) void NAME##_block(                              \
      const float *xn, const float *wb, int H, int W, int C, int ib0, int oh, int iw0, int s,   \
      int cols_ok, const signed char *taps, __m256 acc[P][4]) {                                \
    for (int kh = 0; kh < 3; ++kh) {                                                           \
      const int ih = oh * s - 1 + kh;                                                          \
      if (ih < 0 || ih >= H) continue;                                                         \
      const float *xrow = xn + (long)ih * W * C + ib0 * 8;                                     \
      for (int kw = 0; kw < 3; ++kw) {                                                         \
        const int t = TAP(taps, kh, kw);                                                       \
        if (t < 0) continue;                                                                   \
        _Pragma("GCC unroll 8") for (int e = 0; e < M; ++e) {                                  \
          const float *wt = wb + (t * M + e) * R * 32;                                         \
          const float *xb = xrow + e * 8 + (long)(iw0 + kw) * C;                               \
          __m256 v[P];                                                                         \
          _Pragma("GCC unroll 8") for (int p = 0; p < P; ++p) {                                \
            const int iw = iw0 + kw + p * s;                                                   \
            /* columns outside the image read as zeros */                                      \
            v[p] = (cols_ok || (iw >= 0 && iw < W)) ? _mm256_loadu_ps(xb + (long)p * s * C)    \
                                                    : _mm256_setzero_ps();                     \
          }                                                                                    \
          _Pragma("GCC unroll 2") for (int r = 0; r < R; ++r) {                                \
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) {                              \
              /* the weight loaded once into a register for all P pixels: left alone,          \
               * GCC folds it into each FMA, and P + 4P loads per 4P FMAs (not P + 4)          \
               * made the loop load-bound on Zen 3: 4-10 % slower per layer */                 \
              __m256 wv = _mm256_loadu_ps(wt + (r * 4 + j) * 8);                               \
              __asm__("" : "+x"(wv));                                                          \
              _Pragma("GCC unroll 8") for (int p = 0; p < P; ++p) acc[p][j] =                  \
                  _mm256_fmadd_ps(r ? swap_blocks(v[p]) : v[p], wv, acc[p][j]);                \
            }                                                                                  \
          }                                                                                    \
        }                                                                                      \
      }                                                                                        \
    }                                                                                          \
  }                                                                                            \
  /* Output row oh of image xn, every channel, into yr (its pixels `spread` apart). */         \
  static inline __attribute__((always_inline)) void NAME##_at(                                 \
      const float *xn, const float *wp, const float *bias, float *yr, const int spread, int H, \
      int W, int C, int oh, int Wo, int s, int relu, const signed char *taps) {                \
    RowAhead ahead = row_ahead(xn, H, W, C, sizeof(float), oh, s, (Wo + P - 1) / P, 0);        \
    for (int ow0 = 0; ow0 < Wo; ow0 += P) {                                                    \
      const int np = Wo - ow0 < P ? Wo - ow0 : P;                                              \
      const int iw0 = ow0 * s - 1;                                                             \
      const int cols_ok = iw0 >= 0 && iw0 + 2 + (P - 1) * s < W;                               \
      /* the bottom s input rows are new to this output row: fetch their next pixels           \
       * early (at stride 2 the middle row too: 4-5 % faster at 56x56, ad hoc) */              \
      prefetch_pixels(xn, H, W, C * (long)sizeof(float), oh * s + 2 - s, oh * s + 1,          \
                      iw0 + P * s, P * s, 0, C * (long)sizeof(float));                         \
      row_ahead_step(&ahead); /* a tile's share, before its blocks */                          \
      for (int cb = 0; cb < C / 8; ++cb) {                                                     \
        const int ib0 = M > 1 ? (cb / M) * M : cb;                                             \
        const float *wb = wp + (long)cb * 9 * M * R * 32;                                      \
        __m256 acc[P][4];                                                                      \
        _Pragma("GCC unroll 8") for (int p = 0; p < P; ++p)                                    \
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) acc[p][j] = _mm256_setzero_ps(); \
        if (cols_ok)                                                                           \
          NAME##_block(xn, wb, H, W, C, ib0, oh, iw0, s, 1, taps, acc);                        \
        else                                                                                   \
          NAME##_block(xn, wb, H, W, C, ib0, oh, iw0, s, 0, taps, acc);                        \
        const __m256 b = bias ? _mm256_loadu_ps(bias + cb * 8) : _mm256_setzero_ps();          \
        /* fully unrolled (a runtime bound would keep acc in memory instead of registers) */   \
        _Pragma("GCC unroll 8") for (int p = 0; p < P; ++p) {                                  \
          if (p >= np) continue;                                                               \
          /* out[4b + i] = sum_j acc[j][4b + (i + j) mod 4] */                                 \
          __m256 o = _mm256_add_ps(b, acc[p][0]);                                              \
          o = _mm256_add_ps(o, _mm256_permute_ps(acc[p][1], 0x39));                            \
          o = _mm256_add_ps(o, _mm256_permute_ps(acc[p][2], 0x4E));                            \
          o = _mm256_add_ps(o, _mm256_permute_ps(acc[p][3], 0x93));                            \
          if (relu) o = _mm256_max_ps(o, _mm256_setzero_ps());                                 \
          _mm256_storeu_ps(yr + (long)(ow0 + p) * spread * C + cb * 8, o);                     \
        }                                                                                      \
      }                                                                                        \
    }                                                                                          \
  }                                                                                            \
  /* One output row (image n = r / Ho, row r % Ho), every channel. */                         \
  static void NAME(const float *x, const float *wp, const float *bias, float *y, int H, int W, \
                   int C, int Ho, int Wo, int s, int relu, long r) {                           \
    NAME##_at(x + r / Ho * (long)H * W * C, wp, bias, y + r * (long)Wo * C, 1, H, W, C,        \
              (int)(r % Ho), Wo, s, relu, 0);                                                  \
  }                                                                                            \
  /* Output row oh of one phase of a stride-2 input gradient (see grouped3x3_dgrad_s2). */     \
  static void NAME##_phase(const void *xn, const float *wp, void *yr, int H, int W, int C,     \
                           int cpg, int oh, int Wo, const signed char *taps) {                 \
    (void)cpg;                                                                                 \
    NAME##_at((const float *)xn, wp, 0, (float *)yr, 2, H, W, C, oh, Wo, 1, 0, taps);          \
  }

DEFINE_KERNEL(row_c4, 1, 1, PIXELS)
DEFINE_KERNEL(row_c8, 2, 1, PIXELS)
DEFINE_KERNEL(row_c16, 2, 2, PIXELS)
DEFINE_KERNEL(row_c32, 2, 4, PIXELS)
DEFINE_KERNEL(row_c64, 2, 8, PIXELS)

typedef void (*row_fn)(const float *, const float *, const float *, float *, int, int, int, int,
                       int, int, int, long);

static row_fn pick(int cpg) {
  switch (cpg) {
  case 4: return row_c4;
  case 8: return row_c8;
  case 16: return row_c16;
  case 32: return row_c32;
  case 64: return row_c64;
  default: return 0;
  }
}

/* 1 if this kernel takes the shape: 8-channel blocks, 4, 8, 16, 32 or 64 channels per group,
 * stride 1 or 2. */
int grouped3x3_supported(int C, int cpg, int s) {
  return C % 8 == 0 && pick(cpg) != 0 && (s == 1 || s == 2);
}

/* The lanes of a register, which the weight packing follows. */
int grouped3x3_lanes(void) { return 8; }

/* y = conv(x) (+ bias, then ReLU if relu), float32 only: the same entry point as the AVX-512
 * kernel's, which returns -1 here for bf16 or the bf16 pair packing. Returns 0, or -1 for an
 * unsupported shape. */
int grouped3x3_nhwc(const void *x, const float *wp, const float *bias, void *y, int bf16,
                    int packing, int N, int H, int W, int C, int cpg, int s, int relu,
                    int threads) {
  if (N < 0 || H < 1 || W < 1 || threads < 1 || bf16 || packing != 0) return -1;
  if (!grouped3x3_supported(C, cpg, s)) return -1;
  const row_fn row = pick(cpg);
  const int Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1;
  const long rows = (long)N * Ho;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long r = 0; r < rows; ++r) row(x, wp, bias, y, H, W, C, Ho, Wo, s, relu, r);
  return 0;
}


static phase_fn pick_phase(int cpg) {
  switch (cpg) {
  case 4: return row_c4_phase;
  case 8: return row_c8_phase;
  case 16: return row_c16_phase;
  case 32: return row_c32_phase;
  case 64: return row_c64_phase;
  default: return 0;
  }
}

/* dx = the input gradient of a stride-2 grouped 3x3 convolution, float32 only: the AVX-512
 * kernel's entry point (grouped3x3.c), which returns -1 here for bf16 or a pair packing. */
int grouped3x3_dgrad_s2(const void *dy, const float *wp, const signed char *taps, void *dx,
                        int bf16, int packing, int N, int H, int W, int C, int cpg, int threads) {
  if (N < 0 || H < 1 || W < 1 || threads < 1 || bf16 || packing != 0) return -1;
  if (!grouped3x3_supported(C, cpg, 2)) return -1;
  dgrad_s2_phases(pick_phase(cpg), dy, wp, taps, dx, 4, N, H, W, C, cpg, threads);
  return 0;
}
