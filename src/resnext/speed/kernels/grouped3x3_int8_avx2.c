/* Int8 grouped 3x3 convolution (padding 1, stride 1 or 2) on channels-last uint8 maps, AVX2.
 *
 * For x86 CPUs without VNNI (grouped3x3_int8.c is the AVX512-VNNI build of the same function).
 * Without VNNI the usual int8 product is VPMADDUBSW, which sums pairs of uint8 x int8 products in
 * int16 with saturation: codes above 127 can then overflow (why torch's engines ask for 7-bit
 * activations there). This kernel multiplies in int16 instead: VPMADDWD adds the two products of
 * a pair of input channels (zero-extended codes) and their int16 weights into int32, exactly for
 * every code, 16 multiply-adds an instruction, the same count per multiplier instruction as
 * VPMADDUBSW followed by the VPMADDWD that widens its sums.
 *
 * One 256-bit register holds the int32 sums of 8 consecutive output channels:
 *  - 4 channels per group: the 8 lanes span 2 groups, lane j summing output 4 (j % 2) + j / 2,
 *    so that the two groups' 8 input bytes broadcast to every 64-bit lane give each lane its
 *    group's channels, and a shuffle per channel pair turns them into the pair's two int16 codes
 *    in every lane; one permute per output pixel puts the sums back in channel order;
 *  - 8 or more: all 8 lanes in one group. Where the three input rows an output row reads hold
 *    codes below 128 only (what `quantize_int8`'s default 7-bit activations give, checked per
 *    row), VPMADDUBSW cannot saturate (2 x 127 x 128 < 32768): each quad of input channels is
 *    one 32-bit broadcast into VPMADDUBSW, its pair sums widened by VPMADDWD with ones (1.2-1.45x
 *    the int16 pairs per layer). Else the rows are first widened to int16 (about 2 % of the
 *    row's work), so that each channel pair is one 32-bit broadcast, with no shuffle.
 * A block of P output pixels of a row is computed kernel row by kernel row: each input pixel of
 * that row is loaded once per channel pair and multiplied by the three weights of the kernel row,
 * held in registers, into every output pixel it reaches (up to 3 at stride 1, 2 at stride 2).
 * Measured against torch's engine on a 2-core AVX2 EPYC (RESULTS.md, stop 65), this is 1.6-3.3x
 * as fast with 4 channels a group and on the 56-pixel stride-2 layer; with 16 or more channels
 * a group the engine and ours are closer: `resnext.speed.int8` times both per shape and keeps
 * the faster.
 *
 * Quantized arithmetic as in grouped3x3_int8.c: the kernel is given m and b per channel and
 * computes clamp(round(sum x w * m + b), lo, 255), pixels outside the image reading the code zx.
 *
 * Layout: x[N][H][W][C] and y[N][Ho][Wo][C] uint8; packed weights wp[C/8][9][R][8][2] int16,
 * then with 8 or more channels a group the same as int8 quads [C/8][9][cpg/4][8][4]
 * (grouped_int8.pack_weights with 8 lanes); m, b per channel.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "grouped_int8_rows.h"

/* A widened pixel's stride in int16s: C and 32 more, so that a block's pixels, 2 C bytes apart
 * (a power of two in ResNeXt), do not all fall in the same few sets of L1 (which made the
 * stride-2 layers 1.6-2.4x slower, ad hoc). */
static inline long wide_stride(int C) { return C + 32; }

/* One row of W pixels of C uint8 codes (C a multiple of 16) as int16, pixels wide_stride apart */
static inline void widen(const uint8_t *src, int16_t *dst, int W, int C) {
  for (int iw = 0; iw < W; ++iw)
    for (int c = 0; c < C; c += 16)
      _mm256_storeu_si256(
          (__m256i *)(dst + iw * wide_stride(C) + c),
          _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(src + (long)iw * C + c))));
}

/* The largest of n uint8 codes (n a multiple of 16) */
static inline int max_code(const uint8_t *p, long n) {
  __m128i m = _mm_setzero_si128();
  for (long i = 0; i < n; i += 16) m = _mm_max_epu8(m, _mm_loadu_si128((const __m128i *)(p + i)));
  m = _mm_max_epu8(m, _mm_srli_si128(m, 8));
  m = _mm_max_epu8(m, _mm_srli_si128(m, 4));
  m = _mm_max_epu8(m, _mm_srli_si128(m, 2));
  m = _mm_max_epu8(m, _mm_srli_si128(m, 1));
  return _mm_cvtsi128_si32(m) & 0xff;
}

/* MODE 4: 4 channels a group (2 groups a register, R = 2 pair passes); MODE 0: 8 or more, one
 * group a register, R = cpg / 2 pair passes. P pixels a block, stride S. */
#define DEFINE_ROW(NAME, MODE, P, S)                                                           \
  static void NAME(const uint8_t *xn, const int16_t *wp, const float *m, const float *b,      \
                   uint8_t *yr, const uint8_t *pad, int16_t *wide, int H, int W, int C,        \
                   int cpg, int oh, int Wo, int lo, int zx) {                                  \
    enum { J = (P - 1) * S + 3 };                                                              \
    const int R = MODE == 4 ? 2 : cpg / 2;                                                     \
    const uint8_t *xrow[3];                                                                    \
    /* MODE 0: where the row's three input rows (and the pad) hold codes below 128, VPMADDUBSW \
     * sums uint8 x int8 pairs in int16 without saturating (2 x 127 x 128 < 32768): a quad of  \
     * channels a broadcast, 1.2-1.45x the pairs' speed per layer; else the exact int16 pairs */ \
    int quads = MODE == 0 && zx < 128;                                                         \
    for (int kh = 0; kh < 3; ++kh) {                                                           \
      xrow[kh] = input_row(xn, oh, S, kh, H, (long)W * C);                                     \
      if (quads && xrow[kh]) quads = max_code(xrow[kh], (long)W * C) < 128;                    \
    }                                                                                          \
    for (int kh = 0; kh < 3; ++kh) {                                                           \
      /* else MODE 0 reads the rows widened to int16: each pair broadcast as it is, no shuffle */ \
      if (MODE == 0 && !quads && xrow[kh]) {                                                   \
        widen(xrow[kh], wide + kh * W * wide_stride(C), W, C);                                 \
        xrow[kh] = (const uint8_t *)(wide + kh * W * wide_stride(C));                          \
      }                                                                                        \
    }                                                                                          \
    const int bytes = MODE == 0 && !quads ? 2 : 1; /* a channel's */                          \
    if (bytes == 2) pad = (const uint8_t *)(wide + 3 * W * wide_stride(C));                    \
    const long pixel = bytes == 2 ? 2 * wide_stride(C) : C; /* bytes */                       \
    const int8_t *wq = (const int8_t *)(wp + (long)(C / 8) * 9 * R * 16); /* MODE 0's quads */ \
    const __m256i ones = _mm256_set1_epi16(1);                                                 \
    /* MODE 4, pass r's shuffle: every lane's two int16 codes from the broadcast bytes 4 g +   \
     * 2 r, +1 of the lane's group g = lane % 2 */                                             \
    __m256i pick[2];                                                                           \
    for (int r = 0; r < 2; ++r) {                                                              \
      uint8_t idx[32];                                                                         \
      for (int l = 0; l < 8; ++l) {                                                            \
        const int first = 4 * (l % 2) + 2 * r;                                                 \
        idx[4 * l] = first, idx[4 * l + 1] = 0x80, idx[4 * l + 2] = first + 1,                 \
                idx[4 * l + 3] = 0x80;                                                         \
      }                                                                                        \
      pick[r] = _mm256_loadu_si256((const __m256i *)idx);                                      \
    }                                                                                          \
    for (int ow0 = 0; ow0 < Wo; ow0 += P) {                                                    \
      const int np = Wo - ow0 < P ? Wo - ow0 : P;                                              \
      const uint8_t *col[3][J];                                                                \
      for (int kh = 0; kh < 3; ++kh)                                                           \
        block_pixels(col[kh], J, xrow[kh], ow0, np, S, W, pixel, pad);                         \
      for (int cb = 0; cb < C / 8; ++cb) {                                                     \
        /* MODE 4: the block's own 8 channels; MODE 0: its group's first channel */            \
        const int off = MODE ? cb * 8 : (cb * 8 / cpg) * cpg;                                  \
        const int16_t *wb = wp + (long)cb * 9 * R * 16;                                        \
        __m256i acc[P];                                                                        \
        _Pragma("GCC unroll 16") for (int p = 0; p < P; ++p) acc[p] = _mm256_setzero_si256();  \
        if (quads) {                                                                           \
          const int Q = cpg / 4;                                                               \
          const int8_t *wbq = wq + (long)cb * 9 * Q * 32;                                      \
          for (int q = 0; q < Q; ++q)                                                          \
            for (int kh = 0; kh < 3; ++kh) {                                                   \
              __m256i w[3];                                                                    \
              _Pragma("GCC unroll 3") for (int kw = 0; kw < 3; ++kw) w[kw] =                   \
                  _mm256_loadu_si256((const __m256i *)(wbq + ((kh * 3 + kw) * Q + q) * 32));   \
              _Pragma("GCC unroll 32") for (int j = 0; j < J; ++j) {                           \
                int32_t quad;                                                                  \
                memcpy(&quad, col[kh][j] + off + 4 * q, 4);                                    \
                const __m256i v = _mm256_set1_epi32(quad);                                     \
                _Pragma("GCC unroll 3") for (int kw = 0; kw < 3; ++kw) {                       \
                  const int p = (j - kw) / S;                                                  \
                  if (j >= kw && (j - kw) % S == 0 && p < P) {                                 \
                    acc[p] = _mm256_add_epi32(                                                 \
                        acc[p], _mm256_madd_epi16(_mm256_maddubs_epi16(v, w[kw]), ones));      \
                    __asm__("" : "+x"(acc[p]));                                                \
                  }                                                                            \
                }                                                                              \
              }                                                                                \
            }                                                                                  \
        } else                                                                                 \
        for (int r = 0; r < R; ++r) {                                                          \
          const __m256i sel = pick[r % 2]; /* MODE 4 */                                        \
          const int at = MODE == 4 ? 0 : 4 * r; /* MODE 0: pair r's bytes */                   \
          for (int kh = 0; kh < 3; ++kh) {                                                     \
            __m256i w[3];                                                                      \
            _Pragma("GCC unroll 3") for (int kw = 0; kw < 3; ++kw) w[kw] =                     \
                _mm256_loadu_si256((const __m256i *)(wb + ((kh * 3 + kw) * R + r) * 16));      \
            _Pragma("GCC unroll 32") for (int j = 0; j < J; ++j) {                             \
              const uint8_t *xp = col[kh][j] + off * bytes + at;                               \
              __m256i v;                                                                       \
              if (MODE == 4) {                                                                 \
                int64_t eight;                                                                 \
                memcpy(&eight, xp, 8);                                                         \
                v = _mm256_set1_epi64x(eight);                                                 \
                v = _mm256_shuffle_epi8(v, sel);                                               \
              } else {                                                                         \
                int32_t pair;                                                                  \
                memcpy(&pair, xp, 4);                                                          \
                v = _mm256_set1_epi32(pair);                                                   \
              }                                                                                \
              _Pragma("GCC unroll 3") for (int kw = 0; kw < 3; ++kw) {                         \
                const int p = (j - kw) / S;                                                    \
                if (j >= kw && (j - kw) % S == 0 && p < P) {                                   \
                  acc[p] = _mm256_add_epi32(acc[p], _mm256_madd_epi16(v, w[kw]));              \
                  /* kept in its register here: else GCC regroups the integer sums, computes    \
                   * many products ahead and spills them (2x the instructions) */               \
                  __asm__("" : "+x"(acc[p]));                                                  \
                }                                                                              \
              }                                                                                \
            }                                                                                  \
          }                                                                                    \
        }                                                                                      \
        const int c0 = cb * 8;                                                                 \
        const __m256 mv = _mm256_loadu_ps(m + c0), bv = _mm256_loadu_ps(b + c0);               \
        const __m256i lov = _mm256_set1_epi32(lo), top = _mm256_set1_epi32(255);               \
        /* MODE 4: output 4 g + q sits in lane 2 q + g */                                      \
        const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);                       \
        const __m256i low_dwords = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);                  \
        _Pragma("GCC unroll 16") for (int p = 0; p < P; ++p) {                                  \
          if (p >= np) continue;                                                               \
          const __m256i sum = MODE == 4 ? _mm256_permutevar8x32_epi32(acc[p], order) : acc[p]; \
          const __m256 f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), mv, bv);                   \
          /* below lo: lo; above 255: 255 (before the packs: the second reads int16) */        \
          const __m256i q32 =                                                                  \
              _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(f), lov), top);             \
          const __m256i q16 = _mm256_packus_epi32(q32, q32);                                   \
          const __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(q16, q16),        \
                                                         low_dwords);                          \
          _mm_storel_epi64((__m128i *)(yr + (long)(ow0 + p) * C + c0),                         \
                           _mm256_castsi256_si128(q8));                                        \
        }                                                                                      \
      }                                                                                        \
    }                                                                                          \
  }

/* P = 7 where a row is a multiple of 7 pixels (every ResNet stage: 56, 28, 14, 7), else 8: with
 * the three weights, the input and its shuffle, at most 16 registers. */
#define DEFINE_ROWS(NAME, MODE)        \
  DEFINE_ROW(NAME##_p7_s1, MODE, 7, 1) \
  DEFINE_ROW(NAME##_p8_s1, MODE, 8, 1) \
  DEFINE_ROW(NAME##_p7_s2, MODE, 7, 2) \
  DEFINE_ROW(NAME##_p8_s2, MODE, 8, 2)
DEFINE_ROWS(row_c4, 4)
DEFINE_ROWS(row_wide, 0)

typedef void (*row_fn)(const uint8_t *, const int16_t *, const float *, const float *, uint8_t *,
                       const uint8_t *, int16_t *, int, int, int, int, int, int, int, int);

/* y = requantized grouped 3x3 of x (see the top of this file). Returns 0, or -1 for a shape the
 * kernel does not take (C not a multiple of 16, cpg not 4, 8, 16, 32 or 64, stride not 1 or 2,
 * codes out of range) and -2 where memory for the pad row could not be had. */
int grouped3x3_u8s8(const uint8_t *x, const int16_t *wp, const float *m, const float *b,
                    uint8_t *y, int N, int H, int W, int C, int cpg, int s, int zx, int zy, int relu,
                    int threads) {
  const int Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1, lo = relu ? zy : 0;
  row_fn row = cpg == 4 ? PICK_ROW(row_c4, Wo, s)
               : cpg == 8 || cpg == 16 || cpg == 32 || cpg == 64 ? PICK_ROW(row_wide, Wo, s)
                                                                 : 0;
  if (!row || !takes_layer(C, s, zx, zy)) return -1;
  uint8_t *pad = zero_point_row(C, zx);
  if (!pad) return -2;
  const long rows = (long)N * Ho;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    /* each thread's three input rows widened, then a pad row of zx (MODE 0) */
    int16_t *wide = (int16_t *)malloc((3L * W + 1) * wide_stride(C) * sizeof(int16_t));
    if (wide)
      for (int c = 0; c < C; ++c) wide[3L * W * wide_stride(C) + c] = (int16_t)zx;
    else
#pragma omp atomic write
      failed = 1;
#pragma omp for schedule(static)
    for (long r = 0; r < rows; ++r)
      if (wide)
        row(x + r / Ho * (long)H * W * C, wp, m, b, y + r * (long)Wo * C, pad, wide, H, W, C,
            cpg, (int)(r % Ho), Wo, lo, zx);
    free(wide);
  }
  free(pad);
  return failed ? -2 : 0;
}
