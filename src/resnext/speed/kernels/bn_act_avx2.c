/* Training-mode batch norm with its ReLU (and the block's residual addition) on channels-last
 * float32 activations, forward and backward, AVX2 + FMA: `bn_act.c`'s passes on 8-lane registers
 * for CPUs without AVX-512.
 *
 * The same entry points, arguments and results as bn_act.c, float32 only (dtype 1, bf16, is
 * refused: these CPUs have no native bf16). The forward is two passes (statistics; normalise +
 * add + ReLU) and the backward two (masked gradient sums; input gradient). A channels-last tensor
 * is a row-major (rows, C) matrix; the OpenMP threads split the rows; per-channel sums go through
 * float32 partials over blocks of BLOCK rows into double totals; rows of more than STREAM_ABOVE
 * channels are summed in memory order, not in bn_act.c's walk (see CHANNEL_SUMS). The ReLU
 * mask bits have bn_act.c's format, one 16-bit word per 16-channel block of each row (two
 * 8-lane masks).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bn_act_common.h"

#define AHEAD 2048 /* bytes to prefetch ahead of each load of a streaming pass */
#define BLOCK 32   /* rows per float32 partial sum, and per walk of the register-held sums */
#define CHUNK 4    /* 8-channel vectors per walk of the register-held sums: 2 x 4 in registers */
#define STREAM_ABOVE 256 /* channels above which the sums read rows in memory order */

/* How many of the 8 channels from c lie below `channels` (8 for every block but a last partial
 * one); loads and stores of a full block are plain, only a partial one is masked. Why: masked
 * stores (vmaskmovps) are microcoded on AMD Zen CPUs, several times slower than plain ones; an
 * earlier build that masked every access ran 0.6-1.3x torch's float32 batch norm. */
static inline int lanes(long c, long channels) {
  const long left = channels - c;
  return left > 8 ? 8 : (int)left;
}

static inline __m256i tail_mask(int left) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* Lanes outside the block read as zeros and are never written. */
static inline __m256 load_cached(const float *p, int m) {
  return m == 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, tail_mask(m));
}
static inline __m256 load(const float *p, int m) {
  _mm_prefetch((const char *)p + AHEAD, _MM_HINT_T0);
  return load_cached(p, m);
}
static inline void store(float *p, int m, __m256 v) {
  if (m == 8)
    _mm256_storeu_ps(p, v);
  else
    _mm256_maskstore_ps(p, tail_mask(m), v);
}

/* The 8 mask bits of the 8-channel block at c, from its row's 16-bit words. */
static inline int bits_of(const uint16_t *bits, long row_words, long c) {
  return (bits[row_words + c / 16] >> (c % 16)) & 0xFF;
}

/* The incoming gradient gv with the ReLU's mask applied (see bn_act.c's `masked`). */
static inline __m256 masked(__m256 gv, const uint16_t *bits, long row_words, long c, int mode,
                            __m256 scale, __m256 shift, __m256 xv) {
  if (mode == MASK_FROM_X)
    return _mm256_and_ps(gv, _mm256_cmp_ps(_mm256_fmadd_ps(xv, scale, shift),
                                           _mm256_setzero_ps(), _CMP_GT_OQ));
  if (mode == MASK_FROM_BITS) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i set = _mm256_and_si256(_mm256_set1_epi32(bits_of(bits, row_words, c)), bit);
    return _mm256_and_ps(gv, _mm256_castsi256_ps(_mm256_cmpeq_epi32(set, bit)));
  }
  return gv;
}

/* Two per-channel sums of NV 8-channel vectors from channel C0 over rows [R0, R1), added into
 * double totals, their running sums in registers; BODY reads the element at `at` (lanes `m`) and
 * adds its two summands to `sa` and `sb` (as bn_act.c's CHUNK_SUMS). */
#define CHUNK_SUMS(NV, R0, R1, C0, CHANNELS, TOTAL_A, TOTAL_B, BODY)                           \
  {                                                                                            \
    __m256 acc_a[NV], acc_b[NV];                                                               \
    for (int j = 0; j < (NV); ++j) acc_a[j] = acc_b[j] = _mm256_setzero_ps();                  \
    for (long r = (R0); r < (R1); ++r) {                                                       \
      _Pragma("GCC unroll 4") for (int j = 0; j < (NV); ++j) {                                 \
        const long c = (C0) + 8L * j;                                                          \
        const int m = lanes(c, (CHANNELS));                                                    \
        const long at = r * (CHANNELS) + c;                                                    \
        __m256 sa = acc_a[j], sb = acc_b[j];                                                   \
        BODY                                                                                   \
        acc_a[j] = sa;                                                                         \
        acc_b[j] = sb;                                                                         \
      }                                                                                        \
    }                                                                                          \
    float part[2][8 * (NV)];                                                                   \
    for (int j = 0; j < (NV); ++j) {                                                           \
      _mm256_storeu_ps(part[0] + 8 * j, acc_a[j]);                                             \
      _mm256_storeu_ps(part[1] + 8 * j, acc_b[j]);                                             \
    }                                                                                          \
    const long n = (CHANNELS) - (C0) < 8 * (NV) ? (CHANNELS) - (C0) : 8 * (NV);                \
    for (long i = 0; i < n; ++i) {                                                             \
      (TOTAL_A)[(C0) + i] += part[0][i];                                                       \
      (TOTAL_B)[(C0) + i] += part[1][i];                                                       \
    }                                                                                          \
  }

/* Two per-channel sums over rows [ROWS_BEGIN, ROWS_END), added into double totals (BODY as in
 * CHUNK_SUMS), two ways by the width of a row. Up to STREAM_ABOVE channels a block of BLOCK rows
 * fits in L1 and is walked once per CHUNK vectors of channels, the running sums in registers.
 * Wider rows are read in memory order, the running float32 sums of a block in PART (2 x
 * CHANNELS floats, in L1) and added into the totals after each block: there the walk per chunk
 * leaves L1 and its strided first touches defeat the prefetcher. On a Zen 3 (ResNeXt-50's
 * float32 layers) rows in memory order were 1.07-1.28x faster from 512 channels up and
 * 0.78-0.93x as fast at 64 and 256 channels. */
#define CHANNEL_SUMS(ROWS_BEGIN, ROWS_END, CHANNELS, TOTAL_A, TOTAL_B, PART, BODY)              \
  {                                                                                            \
    for (long r0 = (ROWS_BEGIN); r0 < (ROWS_END); r0 += BLOCK) {                               \
      const long r1 = r0 + BLOCK < (ROWS_END) ? r0 + BLOCK : (ROWS_END);                       \
      if ((CHANNELS) <= STREAM_ABOVE) {                                                        \
        long c0 = 0;                                                                           \
        for (; c0 + 8 * CHUNK <= (CHANNELS); c0 += 8 * CHUNK)                                  \
          CHUNK_SUMS(CHUNK, r0, r1, c0, (CHANNELS), (TOTAL_A), (TOTAL_B), BODY)                \
        for (; c0 < (CHANNELS); c0 += 8)                                                       \
          CHUNK_SUMS(1, r0, r1, c0, (CHANNELS), (TOTAL_A), (TOTAL_B), BODY)                    \
        continue;                                                                              \
      }                                                                                        \
      memset((PART), 0, 2 * (CHANNELS) * sizeof(float));                                       \
      for (long r = r0; r < r1; ++r)                                                           \
        for (long c = 0; c < (CHANNELS); c += 8) {                                             \
          const int m = lanes(c, (CHANNELS));                                                  \
          const long at = r * (CHANNELS) + c;                                                  \
          __m256 sa = load_cached((PART) + c, m), sb = load_cached((PART) + (CHANNELS) + c, m); \
          BODY                                                                                 \
          store((PART) + c, m, sa);                                                            \
          store((PART) + (CHANNELS) + c, m, sb);                                               \
        }                                                                                      \
      for (long c = 0; c < (CHANNELS); ++c) {                                                  \
        (TOTAL_A)[c] += (PART)[c];                                                             \
        (TOTAL_B)[c] += (PART)[(CHANNELS) + c];                                                \
      }                                                                                        \
    }                                                                                          \
  }

/* Runs BODY over all rows on `threads` OpenMP threads into OUT_A and OUT_B (per-thread double
 * totals, then summed); FAILED is 1 if the scratch could not be allocated, else 0. */
#define PARALLEL_CHANNEL_SUMS(FAILED, ROWS, CHANNELS, OUT_A, OUT_B, BODY)                       \
  {                                                                                            \
    double *totals = (double *)calloc((size_t)threads * 2 * (CHANNELS), sizeof(double));       \
    float *parts = (float *)malloc((size_t)threads * 2 * (CHANNELS) * sizeof(float));          \
    (FAILED) = !totals || !parts;                                                              \
    if (!(FAILED)) {                                                                           \
      _Pragma("omp parallel for schedule(static) num_threads(threads)")                        \
      for (int t = 0; t < threads; ++t) {                                                      \
        long begin, end;                                                                       \
        rows_of((ROWS), threads, t, &begin, &end);                                             \
        double *ta = totals + (2 * t) * (CHANNELS), *tb = ta + (CHANNELS);                     \
        float *part = parts + (2 * t) * (CHANNELS);                                            \
        CHANNEL_SUMS(begin, end, (CHANNELS), ta, tb, part, BODY)                               \
      }                                                                                        \
      reduce(totals, threads, (CHANNELS), (OUT_A), (OUT_B));                                   \
    }                                                                                          \
    free(totals);                                                                              \
    free(parts);                                                                               \
  }

/* sum[c] = sum over rows of (x - pivot[c]), sumsq[c] = sum of its squares. */
static int bn_stats(const float *x, long rows, long channels, const float *pivot, double *sum,
                    double *sumsq, int threads) {
  int failed;
  PARALLEL_CHANNEL_SUMS(failed, rows, channels, sum, sumsq, {
    __m256 d = _mm256_sub_ps(load_cached(x + at, m), load_cached(pivot + c, m));
    sa = _mm256_add_ps(sa, d);
    sb = _mm256_fmadd_ps(d, d, sb);
  })
  return failed;
}

/* y = relu?(x * scale + shift [+ res]); with `bits` (and relu) also the mask y > 0. */
static void bn_apply(const float *x, const float *res, float *y, long rows, long channels,
                     const float *scale, const float *shift, int relu, uint16_t *bits,
                     int threads) {
  const long words = (channels + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long r = 0; r < rows; ++r) {
    unsigned word = 0;
    for (long c = 0; c < channels; c += 8) {
      const int m = lanes(c, channels);
      const long at = r * channels + c;
      __m256 v = _mm256_fmadd_ps(load(x + at, m), load_cached(scale + c, m),
                                 load_cached(shift + c, m));
      if (res) v = _mm256_add_ps(v, load(res + at, m));
      if (relu) v = _mm256_max_ps(v, _mm256_setzero_ps());
      store(y + at, m, v);
      if (bits) {
        const int positive =
            _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ)) & ((1 << m) - 1);
        word |= (unsigned)positive << (c % 16);
        if (c % 16 == 8 || c + 8 >= channels) {
          bits[r * words + c / 16] = (uint16_t)word;
          word = 0;
        }
      }
    }
  }
}

/* sum_g[c] = sum of the masked gradient gm, sum_gx[c] = sum of gm * (x - mean[c]); gm is also
 * written to gm_out when that is not NULL. */
static int bn_grad_sums(const float *g, const float *x, const uint16_t *bits, float *gm_out,
                        long rows, long channels, const float *scale, const float *shift,
                        const float *mean, int mode, double *sum_g, double *sum_gx, int threads) {
  const long words = (channels + 15) / 16;
  int failed;
  PARALLEL_CHANNEL_SUMS(failed, rows, channels, sum_g, sum_gx, {
    __m256 xv = load_cached(x + at, m);
    __m256 gm = masked(load_cached(g + at, m), bits, r * words, c, mode,
                       load_cached(scale + c, m), load_cached(shift + c, m), xv);
    if (gm_out) store(gm_out + at, m, gm);
    sa = _mm256_add_ps(sa, gm);
    sb = _mm256_fmadd_ps(gm, _mm256_sub_ps(xv, load_cached(mean + c, m)), sb);
  })
  return failed;
}

/* dx = a * gm + b * (x - mean) + k per channel. */
static void bn_grad_input(const float *g, const float *x, const uint16_t *bits, float *dx,
                          long rows, long channels, const float *scale, const float *shift,
                          const float *mean, int mode, const float *a, const float *b,
                          const float *k, int threads) {
  const long words = (channels + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long r = 0; r < rows; ++r) {
    for (long c = 0; c < channels; c += 8) {
      const int m = lanes(c, channels);
      const long at = r * channels + c;
      __m256 xv = load(x + at, m);
      __m256 gm = masked(load(g + at, m), bits, r * words, c, mode,
                         load_cached(scale + c, m), load_cached(shift + c, m), xv);
      /* b * (x - mean), not b * x + const: the latter cancels when |mean| >> std. */
      __m256 centred = _mm256_sub_ps(xv, load_cached(mean + c, m));
      __m256 v = _mm256_fmadd_ps(load_cached(a + c, m), gm,
                                 _mm256_fmadd_ps(load_cached(b + c, m), centred,
                                                 load_cached(k + c, m)));
      store(dx + at, m, v);
    }
  }
}

/* bn_act.c's bn_act_forward, float32 only. Returns 0, 1 if memory for the per-thread sums could
 * not be allocated, or 3 for a dtype this build does not take. */
int bn_act_forward(const void *xv, const void *resv, void *yv, int dtype, long rows,
                   long channels, const float *weight, const float *bias, double eps, int relu,
                   float *mean, float *invstd, float *var, int threads, uint16_t *bits) {
  if (dtype != 0) return 3;
  const float *x = xv, *res = resv;
  double *sums = (double *)malloc(2 * channels * sizeof(double));
  float *pivot = (float *)malloc(3 * channels * sizeof(float));
  int failed = !sums || !pivot;
  if (!failed) {
    float *scale = pivot + channels, *shift = scale + channels;
    for (long c = 0; c < channels; ++c) pivot[c] = x[c];
    failed = bn_stats(x, rows, channels, pivot, sums, sums + channels, threads);
    if (!failed) {
      batch_statistics(sums, pivot, rows, channels, eps, mean, var, invstd);
      scale_shift(weight, bias, mean, invstd, channels, scale, shift);
      bn_apply(x, res, yv, rows, channels, scale, shift, relu, relu ? bits : NULL, threads);
    }
  }
  free(sums);
  free(pivot);
  return failed;
}

/* bn_act.c's bn_act_backward, float32 only. Returns 0, 1 on a failed allocation, or 3 for a
 * dtype this build does not take. */
int bn_act_backward(const void *gv, const void *xv, const uint16_t *bits, void *gm, void *dx,
                    int dtype, long rows, long channels, const float *weight, const float *bias,
                    const float *mean, const float *invstd, int mode, float *dweight,
                    float *dbias, int threads) {
  if (dtype != 0) return 3;
  const float *g = gv, *x = xv;
  double *sums = (double *)malloc(2 * channels * sizeof(double));
  float *scale = (float *)malloc(5 * channels * sizeof(float));
  int failed = !sums || !scale;
  if (!failed) {
    float *shift = scale + channels, *a = shift + channels, *b = a + channels, *k = b + channels;
    scale_shift(weight, bias, mean, invstd, channels, scale, shift);
    failed = bn_grad_sums(g, x, bits, gm, rows, channels, scale, shift, mean, mode, sums,
                          sums + channels, threads);
    if (!failed) {
      grad_coefficients(sums, weight, invstd, rows, channels, a, b, k, dweight, dbias);
      if (gm)
        bn_grad_input(gm, x, bits, dx, rows, channels, scale, shift, mean, MASK_NONE, a, b, k,
                      threads);
      else
        bn_grad_input(g, x, bits, dx, rows, channels, scale, shift, mean, mode, a, b, k,
                      threads);
    }
  }
  free(sums);
  free(scale);
  return failed;
}
