/* Int8 grouped 3x3 convolution (padding 1, stride 1 or 2) on channels-last uint8 maps, AVX512-VNNI.
 *
 * Why this kernel exists: torch's quantized engines (oneDNN, x86, fbgemm) run ResNeXt's grouped
 * 3x3s far below their dense int8 rate, so int8 ResNeXt-50 took 1.14x ResNet-50's time per image
 * (RESULTS.md, stop 62). Here one 512-bit register holds the int32 sums of 16 consecutive output
 * channels, and each VPDPBUSD adds, per lane, the products of four uint8 input channels of the
 * lane's group with its four int8 weights: 64 multiply-adds an instruction, at every group width.
 *  - 4 channels per group: the 16 lanes span 4 groups, laid out so that the block's 16 input
 *    bytes broadcast to the four 128-bit lanes give each lane its group's quad;
 *  - 8: one register per group, its 8 input bytes broadcast to every 64-bit lane, each output's
 *    two quads in neighbouring lanes;
 *  - 16 or more: all 16 lanes share one group, and each of its quads is broadcast from memory.
 * Every input load is a broadcast from memory: no shuffle in the inner loop (the layouts'
 * permutes come once per output pixel, with the requantization). A block of P output pixels of
 * a row is computed kernel row by kernel row: each input pixel of that row is broadcast once and
 * multiplied by the three weights of the kernel row, held in registers, into every output pixel
 * it reaches (1.13-1.65x per layer the loop over taps that loaded each input once per tap and
 * output pixel, RESULTS.md stop 64).
 *
 * Quantized arithmetic, as torch's engines define it: with input codes x (zero point zx), weight
 * codes w (symmetric, per output channel), sum = sum_taps,ci (x - zx) w = sum x w - zx * wsum,
 * where pixels outside the image read the code zx (the real value 0) so that wsum holds every
 * tap. Then y = clamp(round(sum * m + bias / sy) + zy, lo, 255) with m = sx sw / sy per output
 * channel, rounded to nearest even; lo = zy where a ReLU is fused, else 0. The kernel is given m
 * and b = bias / sy + zy - zx wsum m per channel, and computes clamp(round(sum x w * m + b)):
 * the same up to float rounding, with three fewer instructions per 16 outputs.
 *
 * Layout: x[N][H][W][C] and y[N][Ho][Wo][C] uint8; packed weights wp[C/16][9][R][16][4] int8
 * (built by grouped_int8.pack_weights); m, b per channel.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "grouped_int8_rows.h"

/* Lanes of a 16-channel output block, 4 channels a group: lane j sums output 4 (j % 4) + j / 4,
 * so that a 16-byte input load broadcast to the register's four 128-bit lanes gives every lane
 * its group's quad. One permute per output pixel (a 4x4 transpose of dwords) puts them back in
 * channel order. */
static inline __m512i transpose4x4(__m512i v) {
  return _mm512_permutexvar_epi32(
      _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), v);
}
/* 8 channels a group: one register per group, lane j summing quad j % 2 of output j / 2 (the
 * group's 8 input bytes broadcast to every 64-bit lane); output c of the block is the sum of
 * lanes 2c and 2c + 1 of its group's register. */
static inline __m512i pair_sums(__m512i a, __m512i b) {
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  return _mm512_add_epi32(_mm512_permutex2var_epi32(a, even, b),
                          _mm512_permutex2var_epi32(a, odd, b));
}

/* MODE 4 or 8: channels per group (the layouts above; A registers per pixel: 1 or 2); MODE 0:
 * 16 or more, all 16 lanes in one group, each of its Q quads broadcast. P pixels a block, stride
 * S. Each input pixel of a block's row is loaded (broadcast) once per register and kernel row,
 * and used by every output pixel of the block it reaches (up to 3 at stride 1, 2 at stride 2),
 * with the three weights of that kernel row held in registers. */
#define DEFINE_ROW(NAME, MODE, Q, P, S)                                                        \
  static void NAME(const uint8_t *xn, const int8_t *wp, const float *m, const float *b,       \
                   uint8_t *yr, const uint8_t *pad, int H, int W, int C, int cpg, int oh,      \
                   int Wo, int lo) {                                                           \
    enum { A = MODE == 8 ? 2 : 1, WR = MODE == 0 ? Q : A, J = (P - 1) * S + 3 };               \
    const uint8_t *xrow[3];                                                                    \
    for (int kh = 0; kh < 3; ++kh) xrow[kh] = input_row(xn, oh, S, kh, H, (long)W * C);       \
    for (int ow0 = 0; ow0 < Wo; ow0 += P) {                                                    \
      const int np = Wo - ow0 < P ? Wo - ow0 : P;                                              \
      /* the block's input pixels, row by row (the pad row outside the image or the block) */  \
      const uint8_t *col[3][J];                                                                \
      for (int kh = 0; kh < 3; ++kh) block_pixels(col[kh], J, xrow[kh], ow0, np, S, W, C, pad); \
      for (int cb = 0; cb < C / 16; ++cb) {                                                    \
        /* the block's own 16 channels (4 or 8 a group), else its group's first channel */     \
        const int off = MODE ? cb * 16 : (cb * 16 / cpg) * cpg;                                \
        const int8_t *wb = wp + (long)cb * 9 * WR * 64;                                        \
        __m512i acc[A][P];                                                                     \
        _Pragma("GCC unroll 2") for (int a = 0; a < A; ++a)                                    \
            _Pragma("GCC unroll 16") for (int p = 0; p < P; ++p) acc[a][p] =                    \
                _mm512_setzero_si512();                                                        \
        /* one pass per quad in MODE 0; in MODE 8 one pass, both groups side by side in an     \
         * inner loop of constant trip count (so that their sums stay in registers) */          \
        for (int r = 0; r < (MODE == 0 ? Q : 1); ++r) {                                        \
          for (int kh = 0; kh < 3; ++kh) {                                                     \
            __m512i w[A][3];                                                                   \
            _Pragma("GCC unroll 2") for (int a = 0; a < A; ++a)                                \
                _Pragma("GCC unroll 3") for (int kw = 0; kw < 3; ++kw) w[a][kw] =              \
                    _mm512_loadu_si512(wb + ((kh * 3 + kw) * WR + r + a) * 64);                \
            _Pragma("GCC unroll 32") for (int j = 0; j < J; ++j) {                             \
              const uint8_t *xp = col[kh][j] + off;                                            \
              _Pragma("GCC unroll 2") for (int a = 0; a < A; ++a) {                            \
                __m512i v;                                                                     \
                if (MODE == 4) {                                                               \
                  v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)xp));            \
                } else if (MODE == 8) {                                                        \
                  int64_t pair;                                                                \
                  memcpy(&pair, xp + 8 * a, 8);                                                \
                  v = _mm512_set1_epi64(pair);                                                 \
                } else {                                                                       \
                  int32_t quad;                                                                \
                  memcpy(&quad, xp + 4 * r, 4);                                                \
                  v = _mm512_set1_epi32(quad);                                                 \
                }                                                                              \
                _Pragma("GCC unroll 3") for (int kw = 0; kw < 3; ++kw) {                       \
                  const int p = (j - kw) / S;                                                  \
                  if (j >= kw && (j - kw) % S == 0 && p < P)                                   \
                    acc[a][p] = _mm512_dpbusd_epi32(acc[a][p], v, w[a][kw]);                   \
                }                                                                              \
              }                                                                                \
            }                                                                                  \
          }                                                                                    \
        }                                                                                      \
        const int c0 = cb * 16;                                                                \
        const __m512 mv = _mm512_loadu_ps(m + c0), bv = _mm512_loadu_ps(b + c0);               \
        const __m512i lov = _mm512_set1_epi32(lo);                                             \
        _Pragma("GCC unroll 16") for (int p = 0; p < P; ++p) {                                  \
          if (p >= np) continue;                                                               \
          const __m512i sum = MODE == 4   ? transpose4x4(acc[0][p])                            \
                              : MODE == 8 ? pair_sums(acc[0][p], acc[A - 1][p])                \
                                          : acc[0][p];                                         \
          const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), mv, bv);                   \
          /* below lo: lo; above 255: 255 (the unsigned saturating narrowing) */               \
          const __m512i q8 = _mm512_max_epi32(_mm512_cvtps_epi32(f), lov);                     \
          _mm_storeu_si128((__m128i *)(yr + (long)(ow0 + p) * C + c0),                         \
                           _mm512_cvtusepi32_epi8(q8));                                        \
        }                                                                                      \
      }                                                                                        \
    }                                                                                          \
  }

/* P = 7 where a row is a multiple of 7 pixels (every ResNet stage: 56, 28, 14, 7), else 8; 14
 * where a row is a multiple of 14 with 4 channels a group (the 7-pixel blocks leave the sums'
 * latency exposed), and at stride 1 with 16 or more (1.06-1.19x on 14-pixel rows, ad hoc); with
 * 8 channels a group, 14 pixels' two registers each would not fit in 32. */
#define DEFINE_ROWS(NAME, MODE, Q)        \
  DEFINE_ROW(NAME##_p7_s1, MODE, Q, 7, 1) \
  DEFINE_ROW(NAME##_p8_s1, MODE, Q, 8, 1) \
  DEFINE_ROW(NAME##_p7_s2, MODE, Q, 7, 2) \
  DEFINE_ROW(NAME##_p8_s2, MODE, Q, 8, 2)
DEFINE_ROWS(row_c4, 4, 1)
DEFINE_ROW(row_c4_p14_s1, 4, 1, 14, 1)
DEFINE_ROW(row_c4_p14_s2, 4, 1, 14, 2)
DEFINE_ROWS(row_c8, 8, 2)
DEFINE_ROWS(row_c16, 0, 4)
DEFINE_ROWS(row_c32, 0, 8)
DEFINE_ROWS(row_c64, 0, 16)
DEFINE_ROW(row_c16_p14_s1, 0, 4, 14, 1)
DEFINE_ROW(row_c32_p14_s1, 0, 8, 14, 1)
DEFINE_ROW(row_c64_p14_s1, 0, 16, 14, 1)

typedef void (*row_fn)(const uint8_t *, const int8_t *, const float *, const float *, uint8_t *,
                       const uint8_t *, int, int, int, int, int, int, int);

/* y = requantized grouped 3x3 of x (see the top of this file). Returns 0, or -1 for a shape the
 * kernel does not take (C not a multiple of 16, cpg not 4, 8, 16, 32 or 64, stride not 1 or 2,
 * codes out of range) and -2 where memory for the pad row could not be had. */
int grouped3x3_u8s8(const uint8_t *x, const int8_t *wp, const float *m, const float *b,
                    uint8_t *y, int N, int H, int W, int C, int cpg, int s, int zx, int zy, int relu,
                    int threads) {
  const int Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1, lo = relu ? zy : 0;
  const int s2 = s == 2, p14 = Wo % 14 == 0;
  row_fn row = cpg == 4    ? (p14 ? (s2 ? row_c4_p14_s2 : row_c4_p14_s1) : PICK_ROW(row_c4, Wo, s))
               : cpg == 8  ? PICK_ROW(row_c8, Wo, s)
               : cpg == 16 ? (p14 && !s2 ? row_c16_p14_s1 : PICK_ROW(row_c16, Wo, s))
               : cpg == 32 ? (p14 && !s2 ? row_c32_p14_s1 : PICK_ROW(row_c32, Wo, s))
               : cpg == 64 ? (p14 && !s2 ? row_c64_p14_s1 : PICK_ROW(row_c64, Wo, s))
                           : 0;
  if (!row || !takes_layer(C, s, zx, zy)) return -1;
  uint8_t *pad = zero_point_row(C, zx);
  if (!pad) return -2;
  const long rows = (long)N * Ho;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long r = 0; r < rows; ++r)
    row(x + r / Ho * (long)H * W * C, wp, m, b, y + r * (long)Wo * C, pad, H, W, C, cpg,
        (int)(r % Ho), Wo, lo);
  free(pad);
  return 0;
}
