/* Grouped 3x3 convolution (padding 1, stride 1 or 2) on channels-last tensors, AVX-512.
 *
 * Why this kernel exists: oneDNN runs ResNeXt-50's stage-1 grouped 3x3 (4 channels per group)
 * at about a sixth of its dense rate, because a group fills a quarter of a 16-lane register.
 * Here a register holds 16 consecutive channels, viewed as four 4-lane blocks. A group's channel
 * mixing is split two ways so that the inner loop is only fused multiply-adds:
 *  - across blocks (groups of 8 or more channels), the input register is block-shuffled R times
 *    (R = 1, 2 or 4), one in-register shuffle per input vector, so that every 4x4 block of the
 *    group's weight matrix meets its input block in place;
 *  - within a block, the 4x4 product is split into 4 diagonals: diagonal j multiplies input lane i
 *    by the weight of output lane (i - j) mod 4. Each diagonal has its own accumulator, summed
 *    over all taps and rotated into place once per output pixel.
 * Groups wider than 16 channels read M = cpg / 16 input registers per 16 outputs.
 *
 * Layout: x[N][H][W][C] and y[N][Ho][Wo][C], both fp32 or both bf16; packed fp32 weights
 * wp[C/16][9][M][R][4][16] (built by grouped_kernel.pack_weights); bias[C] fp32 or NULL.
 */
#include <immintrin.h>
#include <stdint.h>

#include "dgrad_phases.h"
#include "input_prefetch.h"

static inline __m512 load_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline void store_f32(float *p, __m512 v) { _mm512_storeu_ps(p, v); }
static inline __m512 load_bf16(const uint16_t *p) {
  __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
/* what a pixel outside the image reads: 16 zero channels, float32 or bf16. A plain load from
 * here rather than a zero-masked one from the image: masked, the kernels below ran 1.01-1.14x
 * slower on the AMD machine (float32 and bf16, ResNeXt-50's layers). */
static const float ZERO_ROW[16] __attribute__((aligned(64)));
static inline void store_bf16(uint16_t *p, __m512 v) {
  _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v));
}

/* The input register with its 4-lane blocks permuted so that block b holds block sigma_r(b). */
static inline __m512 block_shuffle(__m512 v, int R, int r) {
  if (R == 2) return _mm512_shuffle_f32x4(v, v, 0xB1); /* swap blocks within pairs */
  if (r == 1) return _mm512_shuffle_f32x4(v, v, 0x39); /* rotate blocks by 1, 2, 3 */
  if (r == 2) return _mm512_shuffle_f32x4(v, v, 0x4E);
  return _mm512_shuffle_f32x4(v, v, 0x93);
}

#define DEFINE_KERNEL(NAME, T, LOAD, STORE, R, M, P)                                             \
  /* P output pixels of one 16-channel output block: all taps into 4 diagonal accumulators. */ \
  static inline __attribute__((always_inline)) void NAME##_block(                              \
      const T *xn, const float *wb, int H, int W, int C, int ib0, int oh, int iw0,                \
      int s, int cols_ok, const signed char *taps, __m512 acc[P][4]) {                         \
    for (int kh = 0; kh < 3; ++kh) {                                                           \
      const int ih = oh * s - 1 + kh;                                                          \
      if (ih < 0 || ih >= H) continue;                                                         \
      const T *xrow = xn + (long)ih * W * C + ib0 * 16;                                        \
      for (int kw = 0; kw < 3; ++kw) {                                                         \
        const int t = TAP(taps, kh, kw);                                                       \
        if (t < 0) continue;                                                                   \
        _Pragma("GCC unroll 4") for (int e = 0; e < M; ++e) {                                  \
          const float *wt = wb + (t * M + e) * R * 64;                                         \
          const T *xb = xrow + e * 16 + (long)(iw0 + kw) * C;                                  \
          __m512 v[P];                                                                         \
          _Pragma("GCC unroll 16") for (int p = 0; p < P; ++p) {                               \
            const int iw = iw0 + kw + p * s;                                                   \
            /* columns outside the image read a row of zeros */                                \
            const int in = cols_ok || (iw >= 0 && iw < W);                                     \
            v[p] = LOAD(in ? xb + (long)p * s * C : (const T *)ZERO_ROW);                      \
          }                                                                                    \
          _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r) {                                \
            __m512 u[P];                                                                       \
            _Pragma("GCC unroll 16") for (int p = 0; p < P; ++p)                               \
                u[p] = r ? block_shuffle(v[p], R, r) : v[p];                                   \
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) {                              \
              const __m512 wv = load_f32(wt + (r * 4 + j) * 16);                               \
              _Pragma("GCC unroll 16") for (int p = 0; p < P; ++p)                             \
                  acc[p][j] = _mm512_fmadd_ps(u[p], wv, acc[p][j]);                            \
            }                                                                                  \
          }                                                                                    \
        }                                                                                      \
      }                                                                                        \
    }                                                                                          \
  }                                                                                            \
  /* Output row oh of image xn, every channel, into yr (its pixels `spread` apart). */         \
  static inline __attribute__((always_inline)) void NAME##_at(                                 \
      const T *xn, const float *wp, const float *bias, T *yr, const int spread, int H, int W,  \
      int C, int cpg, int oh, int Wo, int s, int relu, const signed char *taps) {              \
    RowAhead ahead = row_ahead(xn, H, W, C, sizeof(T), oh, s, (Wo + P - 1) / P, 0);           \
    for (int ow0 = 0; ow0 < Wo; ow0 += P) {                                                    \
      const int np = Wo - ow0 < P ? Wo - ow0 : P;                                              \
      const int iw0 = ow0 * s - 1;                                                             \
      const int cols_ok = iw0 >= 0 && iw0 + 2 + (P - 1) * s < W;                               \
      /* The bottom input row is new to this output row: fetch the next pixels' channels      \
       * early, the strided per-block reads below defeat the hardware prefetcher. */          \
      prefetch_pixels(xn, H, W, C * (long)sizeof(T), oh * s + 1, oh * s + 1, iw0 + P * s,     \
                      P * s, 0, C * (long)sizeof(T));                                          \
      row_ahead_step(&ahead); /* a tile's share, before its blocks */                          \
      for (int cb = 0; cb < C / 16; ++cb) {                                                    \
        const int ib0 = cpg > 16 ? (cb / M) * M : cb;                                          \
        const float *wb = wp + (long)cb * 9 * M * R * 64;                                      \
        __m512 acc[P][4];                                                                      \
        _Pragma("GCC unroll 16") for (int p = 0; p < P; ++p)                                   \
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) acc[p][j] = _mm512_setzero_ps(); \
        if (cols_ok)                                                                           \
          NAME##_block(xn, wb, H, W, C, ib0, oh, iw0, s, 1, taps, acc);                        \
        else                                                                                   \
          NAME##_block(xn, wb, H, W, C, ib0, oh, iw0, s, 0, taps, acc);                        \
        const __m512 b = bias ? load_f32(bias + cb * 16) : _mm512_setzero_ps();                \
        /* fully unrolled (a runtime bound would keep acc in memory instead of registers) */   \
        _Pragma("GCC unroll 16") for (int p = 0; p < P; ++p) {                                 \
          if (p >= np) continue;                                                               \
          /* out[4b + i] = sum_j acc[j][4b + (i + j) mod 4] */                                 \
          __m512 o = _mm512_add_ps(b, acc[p][0]);                                              \
          o = _mm512_add_ps(o, _mm512_permute_ps(acc[p][1], 0x39));                            \
          o = _mm512_add_ps(o, _mm512_permute_ps(acc[p][2], 0x4E));                            \
          o = _mm512_add_ps(o, _mm512_permute_ps(acc[p][3], 0x93));                            \
          if (relu) o = _mm512_max_ps(o, _mm512_setzero_ps());                                 \
          STORE(yr + (long)(ow0 + p) * spread * C + cb * 16, o);                               \
        }                                                                                      \
      }                                                                                        \
    }                                                                                          \
  }                                                                                            \
  /* One output row (image n = r / Ho, row r % Ho), every channel. */                         \
  static void NAME(const T *x, const float *wp, const float *bias, T *y, int H, int W, int C,  \
                   int cpg, int Ho, int Wo, int s, int relu, long r) {                         \
    NAME##_at(x + r / Ho * (long)H * W * C, wp, bias, y + r * (long)Wo * C, 1, H, W, C, cpg,   \
              (int)(r % Ho), Wo, s, relu, 0);                                                  \
  }                                                                                            \
  /* Output row oh of one phase of a stride-2 input gradient (see grouped3x3_dgrad_s2). */     \
  static void NAME##_phase(const void *xn, const float *wp, void *yr, int H, int W, int C,     \
                           int cpg, int oh, int Wo, const signed char *taps) {                 \
    NAME##_at((const T *)xn, wp, 0, (T *)yr, 2, H, W, C, cpg, oh, Wo, 1, 0, taps);             \
  }

DEFINE_KERNEL(row_f32_c4, float, load_f32, store_f32, 1, 1, 4)
DEFINE_KERNEL(row_f32_c8, float, load_f32, store_f32, 2, 1, 4)
DEFINE_KERNEL(row_f32_c16, float, load_f32, store_f32, 4, 1, 4)
DEFINE_KERNEL(row_f32_c32, float, load_f32, store_f32, 4, 2, 4)
DEFINE_KERNEL(row_f32_c64, float, load_f32, store_f32, 4, 4, 4)
DEFINE_KERNEL(row_bf16_c4, uint16_t, load_bf16, store_bf16, 1, 1, 4)
DEFINE_KERNEL(row_bf16_c8, uint16_t, load_bf16, store_bf16, 2, 1, 4)
DEFINE_KERNEL(row_bf16_c16, uint16_t, load_bf16, store_bf16, 4, 1, 4)
DEFINE_KERNEL(row_bf16_c32, uint16_t, load_bf16, store_bf16, 4, 2, 4)
DEFINE_KERNEL(row_bf16_c64, uint16_t, load_bf16, store_bf16, 4, 4, 4)

/* bf16 with 4 or 8 channels per group (ResNeXt-50's stages 1 and 2), using the AVX512-BF16 pair
 * dot product (twice the FMA rate). A 32-channel input register is 16 pairs of channels; pair l
 * belongs to group l / (cpg / 2). For each output o of a group, accumulator o gets, lane by lane,
 * the pair's dot product with its weights to output o of that pair's group; per pixel the lanes
 * of each group are then summed and the cpg accumulators' sums interleaved into channel order
 * (for 8 channels per group 14 permutes in three levels, against 72 dot products). A tile is P
 * pixels x 32 channels: 6 x 4 accumulators for 4 per group, 2 x 8 for 8 (3 x 8 ran no faster
 * and leaves partial tiles on 28- and 14-pixel rows). The next tile's pixels of the lowest input
 * row are prefetched (without, 8 per group at stride 2 ran 1.35x slower at batch 16). Packed
 * weights: wq[C/32][9][cpg][32] bf16 (value 2l + k of output o's vector is the weight from input
 * channel 2l + k of the block to output o of that channel's group). */
#define PAIR_P 6 /* the most pixels of a tile */

/* A tile's sums over the 9 taps (cpg and P constants where inlined). */
static inline __attribute__((always_inline)) void pairs_block(
    const uint16_t *xn, const uint16_t *wb, int H, int W, int C, int cb, int oh, int iw0, int s,
    int cols_ok, const signed char *taps, __m512 acc[PAIR_P][8], const int cpg, const int P) {
  for (int kh = 0; kh < 3; ++kh) {
    const int ih = oh * s - 1 + kh;
    if (ih < 0 || ih >= H) continue;
    const uint16_t *xrow = xn + (long)ih * W * C + cb * 32;
    for (int kw = 0; kw < 3; ++kw) {
      const int t = TAP(taps, kh, kw);
      if (t < 0) continue;
      const uint16_t *wt = wb + t * cpg * 32;
      if (cpg == 4) { /* the 4 weight vectors held, each pixel's input loaded as it is used */
        __m512bh w[4];
#pragma GCC unroll 4
        for (int o = 0; o < 4; ++o) w[o] = (__m512bh)_mm512_loadu_si512(wt + o * 32);
#pragma GCC unroll 8
        for (int p = 0; p < P; ++p) {
          const int iw = iw0 + kw + p * s;
          const __mmask32 in = (cols_ok || (iw >= 0 && iw < W)) ? 0xFFFFFFFFu : 0;
          const __m512bh v = (__m512bh)_mm512_maskz_loadu_epi16(in, xrow + (long)iw * C);
#pragma GCC unroll 4
          for (int o = 0; o < 4; ++o) acc[p][o] = _mm512_dpbf16_ps(acc[p][o], v, w[o]);
        }
        continue;
      }
      /* 8 per group: the P inputs held, each output's weights loaded as they are used */
      __m512bh v[PAIR_P];
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) {
        const int iw = iw0 + kw + p * s;
        const __mmask32 in = (cols_ok || (iw >= 0 && iw < W)) ? 0xFFFFFFFFu : 0;
        v[p] = (__m512bh)_mm512_maskz_loadu_epi16(in, xrow + (long)iw * C);
      }
#pragma GCC unroll 8
      for (int o = 0; o < cpg; ++o) {
        const __m512bh w = (__m512bh)_mm512_loadu_si512(wt + o * 32);
#pragma GCC unroll 8
        for (int p = 0; p < P; ++p) acc[p][o] = _mm512_dpbf16_ps(acc[p][o], v[p], w);
      }
    }
  }
}

/* From accumulators a and b: lane 2i + k holds lanes 2i and 2i + 1 of (a, b)[k] summed. */
static inline __m512 pair_sums(__m512 a, __m512 b) {
  const __m512i even = _mm512_setr_epi32(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
  const __m512i odd = _mm512_setr_epi32(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  return _mm512_add_ps(_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b));
}

/* One pixel's 32 outputs in channel order (the two halves), from its cpg accumulators. */
static inline __attribute__((always_inline)) void pairs_outputs(const __m512 acc[8], const int cpg,
                                                                __m512 *o0, __m512 *o1) {
  if (cpg == 4) {
    /* m01 = [o0 o1 per group], m23 = [o2 o3 per group]: groups 0-3, then groups 4-7 */
    const __m512i lo = _mm512_setr_epi32(0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23);
    const __m512i hi = _mm512_setr_epi32(8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31);
    const __m512 m01 = pair_sums(acc[0], acc[1]), m23 = pair_sums(acc[2], acc[3]);
    *o0 = _mm512_permutex2var_ps(m01, lo, m23);
    *o1 = _mm512_permutex2var_ps(m01, hi, m23);
    return;
  }
  /* 8 per group: m01 (outputs 0, 1) and m23 (2, 3) hold lane 4g + 2h + k = half h of group g's
   * sum for output k (+2); the halves' sum, lane 4g + j = output j of group g; then from m0123
   * and m4567 (outputs 4-7), channel order: groups 0-1, then groups 2-3. */
  const __m512i half0 = _mm512_setr_epi32(0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
  const __m512i half1 = _mm512_setr_epi32(2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  const __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i hi = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  __m512 m[4];
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) m[q] = pair_sums(acc[2 * q], acc[2 * q + 1]);
  const __m512 m0123 = _mm512_add_ps(_mm512_permutex2var_ps(m[0], half0, m[1]),
                                     _mm512_permutex2var_ps(m[0], half1, m[1]));
  const __m512 m4567 = _mm512_add_ps(_mm512_permutex2var_ps(m[2], half0, m[3]),
                                     _mm512_permutex2var_ps(m[2], half1, m[3]));
  *o0 = _mm512_permutex2var_ps(m0123, lo, m4567);
  *o1 = _mm512_permutex2var_ps(m0123, hi, m4567);
}

/* Output row oh of image xn, every channel, into yr (its pixels `spread` apart; cpg and P
 * constants). */
static inline __attribute__((always_inline)) void pairs_row_at(
    const uint16_t *xn, const uint16_t *wq, const float *bias, uint16_t *yr, const int spread,
    int H, int W, int C, int oh, int Wo, int s, int relu, const signed char *taps, const int cpg,
    const int P) {
  RowAhead ahead = row_ahead(xn, H, W, C, 2, oh, s, (long)(C / 32) * ((Wo + P - 1) / P), 0);
  for (int ow0 = 0; ow0 < Wo; ow0 += P) {
    const int np = Wo - ow0 < P ? Wo - ow0 : P;
    const int iw0 = ow0 * s - 1;
    const int cols_ok = iw0 >= 0 && iw0 + 2 + (P - 1) * s < W;
    prefetch_pixels(xn, H, W, 2L * C, oh * s + 1, oh * s + 1, iw0 + P * s, P * s, 0, 2L * C);
    for (int cb = 0; cb < C / 32; ++cb) {
      row_ahead_step(&ahead);
      const uint16_t *wb = wq + (long)cb * 9 * cpg * 32;
      __m512 acc[PAIR_P][8];
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
        for (int o = 0; o < cpg; ++o) acc[p][o] = _mm512_setzero_ps();
      if (cols_ok)
        pairs_block(xn, wb, H, W, C, cb, oh, iw0, s, 1, taps, acc, cpg, P);
      else
        pairs_block(xn, wb, H, W, C, cb, oh, iw0, s, 0, taps, acc, cpg, P);
      const __m512 b0 = bias ? load_f32(bias + cb * 32) : _mm512_setzero_ps();
      const __m512 b1 = bias ? load_f32(bias + cb * 32 + 16) : _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) {
        if (p >= np) continue;
        __m512 o0, o1;
        pairs_outputs(acc[p], cpg, &o0, &o1);
        o0 = _mm512_add_ps(b0, o0);
        o1 = _mm512_add_ps(b1, o1);
        if (relu) {
          o0 = _mm512_max_ps(o0, _mm512_setzero_ps());
          o1 = _mm512_max_ps(o1, _mm512_setzero_ps());
        }
        uint16_t *dst = yr + (long)(ow0 + p) * spread * C + cb * 32;
        store_bf16(dst, o0);
        store_bf16(dst + 16, o1);
      }
    }
  }
}

/* Output row r % Ho of image r / Ho, every channel. */
static inline __attribute__((always_inline)) void pairs_row(
    const void *xv, const float *wpv, const float *bias, void *yv, int H, int W, int C, int Ho,
    int Wo, int s, int relu, long r, const int cpg, const int P) {
  pairs_row_at((const uint16_t *)xv + r / Ho * (long)H * W * C, (const uint16_t *)wpv, bias,
               (uint16_t *)yv + r * (long)Wo * C, 1, H, W, C, (int)(r % Ho), Wo, s, relu, 0, cpg,
               P);
}

static void row_bf16dp_c4(const void *xv, const float *wpv, const float *bias, void *yv, int H,
                          int W, int C, int cpg, int Ho, int Wo, int s, int relu, long r) {
  (void)cpg;
  pairs_row(xv, wpv, bias, yv, H, W, C, Ho, Wo, s, relu, r, 4, 6);
}

static void row_bf16dp_c8(const void *xv, const float *wpv, const float *bias, void *yv, int H,
                          int W, int C, int cpg, int Ho, int Wo, int s, int relu, long r) {
  (void)cpg;
  pairs_row(xv, wpv, bias, yv, H, W, C, Ho, Wo, s, relu, r, 8, 2);
}

static void phase_bf16dp_c4(const void *xn, const float *wp, void *yr, int H, int W, int C,
                            int cpg, int oh, int Wo, const signed char *taps) {
  (void)cpg;
  pairs_row_at(xn, (const uint16_t *)wp, 0, yr, 2, H, W, C, oh, Wo, 1, 0, taps, 4, 6);
}

static void phase_bf16dp_c8(const void *xn, const float *wp, void *yr, int H, int W, int C,
                            int cpg, int oh, int Wo, const signed char *taps) {
  (void)cpg;
  pairs_row_at(xn, (const uint16_t *)wp, 0, yr, 2, H, W, C, oh, Wo, 1, 0, taps, 8, 2);
}

/* bf16 with 16, 32 or 64 channels per group (ResNeXt-50's stages 3-4), using the pair dot
 * product too. A group this wide is a small dense convolution: each block of 16 outputs is a sum
 * over 9 taps and the group's cpg/2 input pairs of (that pair, broadcast) times (the 16 outputs'
 * weights for it). A tile is PW output pixels of a row by NB output blocks: per pair, NB weight
 * loads and PW broadcasts feed PW x NB dot products. PW = 7 divides the 7-, 14-, 28- and 56-pixel
 * rows, so no tile is partial. A pixel outside the image broadcasts from a row of zeros: with
 * masked broadcasts instead (zero-masking, the address clamped inside the row) 16 channels per
 * group ran 1.3-1.4x slower and 32 1.06-1.08x (the AMD machine). Before each block of a tile,
 * that block's line of the next tile's new input pixels is prefetched: with its input cold, as in
 * the network, stage 3 ran 1.13x (stride 1) and 1.2x (stride 2) faster, 1-2 % slower warm; all
 * of a pixel's lines at once, at the tile's start, made it slower. Packed weights:
 * wq[C/16][9][cpg/2][16][2] bf16 (value k of output l's pair j is the weight from group input
 * 2j + k to output 16 b + l). */
#define PW 7
#define NB 2
/* what a pixel outside the image reads: zero pairs for the widest group's inputs (and the
 * second block's, 8 pairs on, with 16 per group) */
static const int32_t ZERO_PAIRS[64] __attribute__((aligned(64)));
/* One tile's sums over the 9 taps. With `shared` (32 or 64 channels per group) the NB blocks
 * read the same group's inputs, so each broadcast serves all of them; with 16 the blocks are
 * NB adjacent groups, 16 channels apart. */
static inline __attribute__((always_inline)) void wide_tile(
    const uint16_t *xn, const uint16_t *wq, int H, int W, int C, int cpg, int oh, int ow0, int np,
    int s, int b0, int shared, const signed char *taps, __m512 acc[NB][PW]) {
  const int pairs = cpg / 2;
  const long tap_size = (long)pairs * 32, group0 = (long)b0 * 16 / cpg * cpg;
  for (int kh = 0; kh < 3; ++kh) {
    const int ih = oh * s - 1 + kh;
    if (ih < 0 || ih >= H) continue;
    const uint16_t *xrow = xn + (long)ih * W * C + group0;
    for (int kw = 0; kw < 3; ++kw) {
      const int t = TAP(taps, kh, kw);
      if (t < 0) continue;
      /* each pixel's first input pair; a pixel outside the image (or past the row) reads
       * zeros, so that every broadcast is a plain one (masked ones ran slower) */
      const int32_t *px[PW];
#pragma GCC unroll 8
      for (int p = 0; p < PW; ++p) {
        const int iw = (ow0 + p) * s - 1 + kw;
        const int in = p < np && iw >= 0 && iw < W;
        px[p] = in ? (const int32_t *)(xrow + (long)iw * C) : (const int32_t *)ZERO_PAIRS;
      }
      const uint16_t *wt = wq + ((long)b0 * 9 + t) * tap_size;
      for (int j = 0; j < pairs; ++j) {
        __m512bh w[NB];
#pragma GCC unroll 4
        for (int v = 0; v < NB; ++v) w[v] = (__m512bh)_mm512_loadu_si512(wt + v * 9 * tap_size + j * 32);
#pragma GCC unroll 8
        for (int p = 0; p < PW; ++p) {
          if (shared) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32(px[p][j]);
#pragma GCC unroll 4
            for (int v = 0; v < NB; ++v) acc[v][p] = _mm512_dpbf16_ps(acc[v][p], a, w[v]);
          } else {
#pragma GCC unroll 4
            for (int v = 0; v < NB; ++v) {
              const __m512bh a = (__m512bh)_mm512_set1_epi32(px[p][j + 8 * v]);
              acc[v][p] = _mm512_dpbf16_ps(acc[v][p], a, w[v]);
            }
          }
        }
      }
    }
  }
}

/* Output row oh of image xn, every channel, into yr (its pixels `spread` apart). */
static inline __attribute__((always_inline)) void wide_row_at(
    const uint16_t *xn, const uint16_t *wq, const float *bias, uint16_t *yr, const int spread,
    int H, int W, int C, int cpg, int oh, int Wo, int s, int relu, const signed char *taps) {
  const long tiles = (long)(C / 16 / NB) * ((Wo + PW - 1) / PW);
  RowAhead ahead = row_ahead(xn, H, W, C, 2, oh, s, tiles, 1);
  for (int ow0 = 0; ow0 < Wo; ow0 += PW) {
    const int np = Wo - ow0 < PW ? Wo - ow0 : PW;
    const int next = (ow0 + PW - 1) * s + 2;
    for (int b0 = 0; b0 < C / 16; b0 += NB) {
      row_ahead_step(&ahead);
      /* this block's line of the next tile's columns, in the rows this output row is the first
       * to read (the row before read the others) */
      prefetch_pixels(xn, H, W, 2L * C, oh * s + 2 - s, oh * s + 1, next, PW * s, 32L * b0, 64);
      prefetch_outputs(yr, 2L * spread * C, ow0 + PW, PW, Wo, 32L * b0, 64);
      __m512 acc[NB][PW];
#pragma GCC unroll 4
      for (int v = 0; v < NB; ++v)
#pragma GCC unroll 8
        for (int p = 0; p < PW; ++p) acc[v][p] = _mm512_setzero_ps();
      if (cpg == 16)
        wide_tile(xn, wq, H, W, C, cpg, oh, ow0, np, s, b0, 0, taps, acc);
      else
        wide_tile(xn, wq, H, W, C, cpg, oh, ow0, np, s, b0, 1, taps, acc);
#pragma GCC unroll 4
      for (int v = 0; v < NB; ++v) {
        const __m512 b = bias ? load_f32(bias + (b0 + v) * 16) : _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int p = 0; p < PW; ++p) {
          if (p >= np) continue;
          __m512 o = _mm512_add_ps(acc[v][p], b);
          if (relu) o = _mm512_max_ps(o, _mm512_setzero_ps());
          store_bf16(yr + (long)(ow0 + p) * spread * C + (b0 + v) * 16, o);
        }
      }
    }
  }
}

static void row_bf16dp_wide(const void *xv, const float *wpv, const float *bias, void *yv, int H,
                            int W, int C, int cpg, int Ho, int Wo, int s, int relu, long r) {
  wide_row_at((const uint16_t *)xv + r / Ho * (long)H * W * C, (const uint16_t *)wpv, bias,
              (uint16_t *)yv + r * (long)Wo * C, 1, H, W, C, cpg, (int)(r % Ho), Wo, s, relu, 0);
}

static void phase_bf16dp_wide(const void *xn, const float *wp, void *yr, int H, int W, int C,
                              int cpg, int oh, int Wo, const signed char *taps) {
  wide_row_at(xn, (const uint16_t *)wp, 0, yr, 2, H, W, C, cpg, oh, Wo, 1, 0, taps);
}

typedef void (*row_fn)(const void *, const float *, const float *, void *, int, int, int, int,
                       int, int, int, int, long);

#include "grouped3x3_split.h"

static row_fn pick(int cpg, int bf16) {
  switch (cpg) {
  case 4: return bf16 ? (row_fn)row_bf16_c4 : (row_fn)row_f32_c4;
  case 8: return bf16 ? (row_fn)row_bf16_c8 : (row_fn)row_f32_c8;
  case 16: return bf16 ? (row_fn)row_bf16_c16 : (row_fn)row_f32_c16;
  case 32: return bf16 ? (row_fn)row_bf16_c32 : (row_fn)row_f32_c32;
  case 64: return bf16 ? (row_fn)row_bf16_c64 : (row_fn)row_f32_c64;
  default: return 0;
  }
}

/* 1 if this kernel takes the shape: 16-channel blocks, 4, 8, 16, 32 or 64 channels per group,
 * stride 1 or 2. */
int grouped3x3_supported(int C, int cpg, int s) {
  return C % 16 == 0 && pick(cpg, 0) != 0 && (s == 1 || s == 2);
}

/* 1 if the bf16 pair-dot-product kernels of packing 1 take the shape: 4 or 8 channels per
 * group, channels a multiple of 32. */
int grouped3x3_pairs_supported(int C, int cpg, int s) {
  return C % 32 == 0 && (cpg == 4 || cpg == 8) && (s == 1 || s == 2);
}

/* 1 if the wide-group pair kernel (packing 2) takes the shape: 16, 32 or 64 channels per group
 * (so 32-channel blocks of outputs), stride 1 or 2. */
int grouped3x3_wide_pairs_supported(int C, int cpg, int s) {
  return C % (16 * NB) == 0 && (cpg == 16 || cpg == 32 || cpg == 64) && (s == 1 || s == 2);
}

/* The row kernel of `packing` (0: widening, float32 or bf16; 1-3: bf16 pairs, see
 * grouped3x3_nhwc) for this shape, or NULL where it does not take it. */
static row_fn row_for(int packing, int bf16, int C, int cpg, int s) {
  if (packing == 0) return grouped3x3_supported(C, cpg, s) ? pick(cpg, bf16) : 0;
  if (!bf16) return 0;
  if (packing == 1 && grouped3x3_pairs_supported(C, cpg, s))
    return cpg == 4 ? row_bf16dp_c4 : row_bf16dp_c8;
  if (packing == 2 && grouped3x3_wide_pairs_supported(C, cpg, s)) return row_bf16dp_wide;
  if (packing == 3 && grouped3x3_split_supported(C, cpg, s))
    return cpg == 4 ? row_split_c4 : row_split_c8;
  return 0;
}

/* y = conv(x) (+ bias, then ReLU if relu). packing 0: fp32 weights for the diagonal kernel
 * (fp32 or bf16 activations); packing 1: bf16 weight pairs for the bf16 dot-product kernels of 4
 * and 8 channels per group; packing 2: those of 16-64 channels per group; packing 3: those of the
 * split-order kernels (grouped3x3_split.h; x and y in that order). Returns 0, or -1 for an
 * unsupported shape. */
int grouped3x3_nhwc(const void *x, const float *wp, const float *bias, void *y, int bf16,
                    int packing, int N, int H, int W, int C, int cpg, int s, int relu,
                    int threads) {
  const row_fn row = row_for(packing, bf16, C, cpg, s);
  if (N < 0 || H < 1 || W < 1 || threads < 1 || !row) return -1;
  const int Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1;
  const long rows = (long)N * Ho;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long r = 0; r < rows; ++r) row(x, wp, bias, y, H, W, C, cpg, Ho, Wo, s, relu, r);
  return 0;
}


static phase_fn pick_phase(int cpg, int bf16) {
  switch (cpg) {
  case 4: return bf16 ? row_bf16_c4_phase : row_f32_c4_phase;
  case 8: return bf16 ? row_bf16_c8_phase : row_f32_c8_phase;
  case 16: return bf16 ? row_bf16_c16_phase : row_f32_c16_phase;
  case 32: return bf16 ? row_bf16_c32_phase : row_f32_c32_phase;
  case 64: return bf16 ? row_bf16_c64_phase : row_f32_c64_phase;
  default: return 0;
  }
}

/* dx = the input gradient (H x W) of a stride-2 grouped 3x3 convolution from its output gradient
 * dy, in four phases (dgrad_phases.h): wp is each group's matrix transposed, packed as for the
 * forward (packing 0, 1 or 2; not flipped), taps[4][9] the phases' tap maps. Returns 0, or -1 for
 * an unsupported shape. */
int grouped3x3_dgrad_s2(const void *dy, const float *wp, const signed char *taps, void *dx,
                        int bf16, int packing, int N, int H, int W, int C, int cpg, int threads) {
  if (N < 0 || H < 1 || W < 1 || threads < 1) return -1;
  phase_fn row;
  if (packing == 1) {
    if (!bf16 || !grouped3x3_pairs_supported(C, cpg, 2)) return -1;
    row = cpg == 4 ? phase_bf16dp_c4 : phase_bf16dp_c8;
  } else if (packing == 2) {
    if (!bf16 || !grouped3x3_wide_pairs_supported(C, cpg, 2)) return -1;
    row = phase_bf16dp_wide;
  } else if (packing == 0) {
    if (!grouped3x3_supported(C, cpg, 2)) return -1;
    row = pick_phase(cpg, bf16);
  } else {
    return -1;
  }
  dgrad_s2_phases(row, dy, wp, taps, dx, bf16 ? 2 : 4, N, H, W, C, cpg, threads);
  return 0;
}

/* ---- A bottleneck's first 1x1 and its grouped 3x3 in one call (bf16 inference) ----
 *
 * Apart, the 1x1 writes its whole output (12.8 MB for stage 1 at batch 16) before the grouped
 * 3x3 reads it back, by then from memory: in the network the grouped layers ran at their
 * cold-cache time, 1.1-1.2x their time in cache. Here each thread computes the 1x1's output rows
 * just before the first grouped output row that reads them, so the grouped kernel finds them in
 * L1 or L2. The 1x1 is pointwise_gemm.c's inference tile (pointwise_tile.h), the 3x3 the row
 * kernels above: the same sums in the same order as the two calls apart. */
#include <omp.h>

#include "pointwise_tile.h"
#include "scratch.h"

/* The first and the last input row (as global rows n * H + ih) that output row r reads. */
static inline long first_row_read(long r, int H, int Ho, int s) {
  const int oh = (int)(r % Ho), ih = oh * s - 1 > 0 ? oh * s - 1 : 0;
  return r / Ho * H + ih;
}

static inline long last_row_read(long r, int H, int Ho, int s) {
  const int oh = (int)(r % Ho), ih = oh * s + 1 < H - 1 ? oh * s + 1 : H - 1;
  return r / Ho * H + ih;
}

/* Rows [q0, q1) (each W pixels) of a 1x1's output y (N channels) from its input a (K channels):
 * relu(a b + bias [+ res]), b packed strip by strip as pointwise_conv_bf16 takes it; res (NULL,
 * or y itself) laid out as y. Tiles of 7 pixels where the rows divide into them (ResNeXt's maps:
 * 56, 28, 14 and 7 wide), else 6. */
static void pointwise_rows(const uint16_t *a, const uint16_t *bs, const float *bias,
                           const uint16_t *res, uint16_t *y, int K, int N, int W, long q0,
                           long q1) {
  if (q0 >= q1) return;
  if (W % MR == 0)
    walk(a, K, bs, 1, y, N, K, N, bias, res, 1, 0, 0, q0 * W, q1 * W, 0, N / NR, MR);
  else
    walk(a, K, bs, 1, y, N, K, N, bias, res, 1, 0, 0, q0 * W, q1 * W, 0, N / NR, 6);
}

/* A bottleneck's last 1x1 taken into the image walk (`image_rows`): its packed weight and bias,
 * and the thread's buffer of one image's grouped rows, which it reads. */
typedef struct {
  const uint16_t *bs;
  const float *bias;
  uint16_t *rows;
} Last;

/* One image on one thread: the first 1x1 of an (K channels) into `own` (one image, C channels),
 * `chunk` rows at a time (at least those the next grouped row needs), each just before the first
 * grouped row that reads it; the grouped rows into yn, or with `last` into last->rows, and then,
 * `chunk` rows at a time, the last 1x1 of those with the image's input as its residual, written
 * over that input (yn == an, K outputs): the rows it writes were all read by the first 1x1. */
static void image_rows(const uint16_t *an, const uint16_t *bs, const float *bias1, int K,
                       uint16_t *own, const float *wp, const float *bias2, row_fn row,
                       uint16_t *yn, int H, int W, int C, int cpg, int s, int relu, long chunk,
                       const Last *last) {
  const int Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1;
  long done = 0, done_last = 0;
  for (int oh = 0; oh < Ho; ++oh) { /* rows of image 0 of (own, yn) */
    const long need = last_row_read(oh, H, Ho, s) + 1;
    if (done < need) {
      long until = done + chunk > need ? done + chunk : need;
      until = until < H ? until : H;
      pointwise_rows(an, bs, bias1, 0, own, K, C, W, done, until);
      done = until;
    }
    row(own, wp, bias2, last ? last->rows : yn, H, W, C, cpg, Ho, Wo, s, relu, oh);
    if (last && (oh + 1 - done_last >= chunk || oh == Ho - 1)) {
      pointwise_rows(last->rows, last->bs, last->bias, yn, yn, C, K, Wo, done_last, oh + 1);
      done_last = oh + 1;
    }
  }
}

/* y = grouped 3x3 of relu(conv1x1(a) + bias1), as grouped3x3_nhwc computes it with bf16
 * activations and `packing` (0-3) on the 1x1's output; a: N x H x W x K, bs as for
 * pointwise_conv_bf16, the 1x1's output C channels. The 1x1's rows are computed `ahead` pixels'
 * worth at a time (at least the rows needed: tiles of several rows keep its weights in use, as
 * its own walk does), each just before the first grouped row that reads them.
 *  - Whole images per thread (N a multiple of the threads): each thread's images one by one,
 *    the 1x1's output in the thread's own buffer of one image, reused image after image, so
 *    that it stays in cache and never goes to memory (mid is not used and may be NULL). Written
 *    into a full-size mid instead, the fused pair measured 1.038x faster layer by layer but
 *    level in the network: its written lines pushed the grouped output out of the caches
 *    before the next 1x1 read it.
 *  - Else (one image, or images that do not divide): each thread takes a contiguous share of
 *    y's rows and computes, into mid (N x H x W x C), the 1x1 rows that its rows are the first
 *    to need (by their last row read); the rows another thread also reads come first, before a
 *    barrier. With mid NULL the call allocates it and frees it before returning (memory the
 *    caller never sees: a recording of the call, `replay.py`, then keeps nothing it lacks).
 * Returns 0, -1 for a shape either kernel refuses, or 2 if a buffer could not be allocated. */
int pointwise_grouped3x3_bf16(const uint16_t *a, const uint16_t *bs, const float *bias1, int K,
                              uint16_t *mid, const float *wp, const float *bias2, uint16_t *y,
                              int packing, int N, int H, int W, int C, int cpg, int s, int relu,
                              int ahead, int threads) {
  if (N < 0 || H < 1 || W < 1 || threads < 1 || ahead < 1 || !bias1 || K < 2 || K % 2 ||
      C % NR)
    return -1;
  const row_fn row = row_for(packing, 1, C, cpg, s);
  if (!row) return -1;
  const int Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1;
  const long rows = (long)N * Ho, chunk = (ahead + W - 1) / W;
  if (N % threads == 0) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
      const int T = omp_get_num_threads(), t = omp_get_thread_num();
      uint16_t *own = (uint16_t *)scratch(0, sizeof(uint16_t) * H * W * C);
      failed = !own;
      for (long n = N * t / T; own && n < N * (t + 1) / T; ++n)
        image_rows(a + n * H * W * K, bs, bias1, K, own, wp, bias2, row, y + n * Ho * Wo * C, H,
                   W, C, cpg, s, relu, chunk, 0);
    }
    return failed ? 2 : 0;
  }
  uint16_t *allocated = NULL;
  if (!mid) {
    allocated = (uint16_t *)aligned_alloc(64, ((size_t)N * H * W * C * 2 + 63) / 64 * 64);
    if (!allocated) return 2;
    mid = allocated;
  }
#pragma omp parallel num_threads(threads)
  {
    const int T = omp_get_num_threads(), t = omp_get_thread_num();
    const long g0 = rows * t / T, g1 = rows * (t + 1) / T;
    const long own0 = g0 > 0 ? last_row_read(g0 - 1, H, Ho, s) + 1 : 0;
    const long own1 = g1 > g0 ? last_row_read(g1 - 1, H, Ho, s) + 1 : own0;
    /* this thread's rows that a later thread reads too (every later thread's rows start at or
     * after the first row that row g1 reads) */
    long shared0 = own1;
    if (g1 < rows) {
      const long f = first_row_read(g1, H, Ho, s);
      shared0 = f > own1 ? own1 : f < own0 ? own0 : f;
    }
    pointwise_rows(a, bs, bias1, 0, mid, K, C, W, shared0, own1);
#pragma omp barrier
    long done = own0;
    for (long r = g0; r < g1; ++r) {
      const long need = last_row_read(r, H, Ho, s) + 1;
      if (done < need && done < shared0) {
        long until = done + chunk > need ? done + chunk : need;
        until = until < shared0 ? until : shared0;
        pointwise_rows(a, bs, bias1, 0, mid, K, C, W, done, until);
        done = until;
      }
      row(mid, wp, bias2, y, H, W, C, cpg, Ho, Wo, s, relu, r);
    }
  }
  free(allocated);
  return 0;
}

/* A whole stride-1 bottleneck with an identity shortcut, for inference, written over its input:
 * x = relu(conv1x1_3(g) + bias3 + x) where g = the grouped 3x3 (as pointwise_grouped3x3_bf16,
 * stride 1, ReLU) of relu(conv1x1_1(x) + bias1); x: N x H x W x K, the middle C channels, bs1 and
 * bs3 packed as pointwise_conv_bf16 takes them (K -> C and C -> K). Whole images per thread only
 * (N a multiple of the threads): the grouped rows go into a second buffer of the thread's, one
 * image, and the last 1x1 takes them `ahead` pixels' worth at a time, so that neither the first
 * 1x1's output nor the grouped output goes to memory. Returns 0, -1 for a shape it does not take
 * (the caller then runs pointwise_grouped3x3_bf16 and the last 1x1 apart), or 2 if a buffer
 * could not be allocated (nothing written). */
int bottleneck_dot_bf16(uint16_t *x, const uint16_t *bs1, const float *bias1, const float *wp,
                        const float *bias2, const uint16_t *bs3, const float *bias3, int packing,
                        int N, int H, int W, int K, int C, int cpg, int ahead, int threads) {
  const row_fn row = row_for(packing, 1, C, cpg, 1);
  if (!row || N < 0 || H < 1 || W < 1 || threads < 1 || N % threads || ahead < 1 || !bias1 ||
      !bias3 || K % NR || C % NR)
    return -1;
  const long chunk = (ahead + W - 1) / W;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    const int T = omp_get_num_threads(), t = omp_get_thread_num();
    uint16_t *own = (uint16_t *)scratch(0, sizeof(uint16_t) * H * W * C);
    const Last last = {bs3, bias3, (uint16_t *)scratch(1, sizeof(uint16_t) * H * W * C)};
    if (!own || !last.rows) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp barrier /* every thread's buffers, or none written */
    for (long n = N * t / T; !failed && n < N * (t + 1) / T; ++n) {
      uint16_t *xn = x + n * H * W * K;
      image_rows(xn, bs1, bias1, K, own, wp, bias2, row, xn, H, W, C, cpg, 1, 1, chunk, &last);
    }
  }
  return failed ? 2 : 0;
}
