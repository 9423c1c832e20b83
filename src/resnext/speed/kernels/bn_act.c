/* Training-mode batch norm with its ReLU (and the block's residual addition) on channels-last
 * activations, forward and backward, fp32 or bf16, in as few passes over memory as the maths allows.
 *
 * Why C: PyTorch runs batch norm, ReLU, the residual add and each of their backward functions as
 * separate passes, and its CPU batch-norm backward on bf16 channels-last tensors converts and
 * reduces slowly; in a ResNeXt-50 training step these passes cost more than a quarter of the time.
 * Here the forward is two passes (statistics; normalise + add + ReLU) and the backward two
 * (masked gradient sums; input gradient), each streaming the tensor once with AVX-512.
 *
 * A channels-last tensor of N images, C channels and H x W pixels is a row-major (rows, C) matrix
 * with rows = N * H * W; every function here takes that view. dtype 0 is float32, 1 is bfloat16
 * (stored as uint16; arithmetic is always in float32, results rounded to nearest even like torch).
 * The OpenMP threads split the rows. Per-channel sums go through float32 partials over blocks of
 * BLOCK rows into double totals, so a channel of a million values keeps about 1e-7 relative
 * accuracy.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include "bf16_io.h"
#include "bn_act_common.h"

#define AHEAD 2048 /* bytes to prefetch ahead of each load of a streaming pass */
#define BLOCK 32 /* rows the sums walk once per chunk of channels, and per float32 partial sum */


static inline __m512 load(const void *base, int dtype, long offset, __mmask16 m) {
  if (dtype == F32) {
    _mm_prefetch((const char *)((const float *)base + offset) + AHEAD, _MM_HINT_T0);
    return _mm512_maskz_loadu_ps(m, (const float *)base + offset);
  }
  _mm_prefetch((const char *)((const uint16_t *)base + offset) + AHEAD, _MM_HINT_T0);
  return widen_bf16(_mm256_maskz_loadu_epi16(m, (const uint16_t *)base + offset));
}

/* `load` without the prefetch: for the sums, whose blocked walk the hardware prefetcher follows
 * better without it (measured). */
static inline __m512 load_cached(const void *base, int dtype, long offset, __mmask16 m) {
  if (dtype == F32) return _mm512_maskz_loadu_ps(m, (const float *)base + offset);
  return widen_bf16(_mm256_maskz_loadu_epi16(m, (const uint16_t *)base + offset));
}


/* Stores v like `store` and returns which stored values are > 0 (of lanes m): exactly the mask
 * a ReLU's backward reads from its saved output, rounding to bf16 included. */
static inline __mmask16 store_positive(void *base, int dtype, long offset, __mmask16 m, __m512 v) {
  if (dtype == F32) {
    _mm512_mask_storeu_ps((float *)base + offset, m, v);
    return _mm512_mask_cmp_ps_mask(m, v, _mm512_setzero_ps(), _CMP_GT_OQ);
  }
  __m256i h = to_bf16(v);
  _mm256_mask_storeu_epi16((uint16_t *)base + offset, m, h);
  /* After the ReLU y is +0 or positive, never NaN (max returns its 0 for a NaN), so the signed
   * 16-bit compare of the bf16 bits with 0 is y > 0. */
  return _mm256_mask_cmpgt_epi16_mask(m, h, _mm256_setzero_si256());
}

/* Two per-channel sums of NV 16-channel vectors from channel C0, over rows [R0, R1), added into
 * double totals. The 2 * NV running float32 sums stay in registers (NV is a constant, so the
 * unrolled loop keeps them there); BODY reads the element at `at` (lanes `m`) and adds its two
 * summands to `sa` and `sb`. */
#define CHUNK_SUMS(NV, R0, R1, C0, CHANNELS, TOTAL_A, TOTAL_B, BODY)                           \
  {                                                                                            \
    __m512 acc_a[NV], acc_b[NV];                                                               \
    for (int j = 0; j < (NV); ++j) acc_a[j] = acc_b[j] = _mm512_setzero_ps();                  \
    for (long r = (R0); r < (R1); ++r) {                                                       \
      _Pragma("GCC unroll 8") for (int j = 0; j < (NV); ++j) {                                 \
        const long c = (C0) + 16L * j;                                                         \
        const __mmask16 m = lanes(c, (CHANNELS));                                              \
        const long at = r * (CHANNELS) + c;                                                    \
        __m512 sa = acc_a[j], sb = acc_b[j];                                                   \
        BODY                                                                                   \
        acc_a[j] = sa;                                                                         \
        acc_b[j] = sb;                                                                         \
      }                                                                                        \
    }                                                                                          \
    float part[2][16 * (NV)];                                                                  \
    for (int j = 0; j < (NV); ++j) {                                                           \
      _mm512_storeu_ps(part[0] + 16 * j, acc_a[j]);                                            \
      _mm512_storeu_ps(part[1] + 16 * j, acc_b[j]);                                            \
    }                                                                                          \
    const long n = (CHANNELS) - (C0) < 16 * (NV) ? (CHANNELS) - (C0) : 16 * (NV);              \
    for (long i = 0; i < n; ++i) {                                                             \
      (TOTAL_A)[(C0) + i] += part[0][i];                                                       \
      (TOTAL_B)[(C0) + i] += part[1][i];                                                       \
    }                                                                                          \
  }

/* Two per-channel sums over rows [ROWS_BEGIN, ROWS_END), added into double totals (BODY as in
 * CHUNK_SUMS). Each block of BLOCK rows is walked once per chunk of up to 128 channels: the
 * first walk brings its lines in from memory, the others find them in L1 or L2. Why not one walk
 * per row with the running sums in an L1 array, loaded and stored for every 16 values: that was
 * 3-4x slower on the Intel Xeon (ResNeXt-50's bf16 shapes, in cache; ~1.5x from memory). */
#define CHANNEL_SUMS(ROWS_BEGIN, ROWS_END, CHANNELS, TOTAL_A, TOTAL_B, BODY)                    \
  {                                                                                            \
    for (long r0 = (ROWS_BEGIN); r0 < (ROWS_END); r0 += BLOCK) {                               \
      const long r1 = r0 + BLOCK < (ROWS_END) ? r0 + BLOCK : (ROWS_END);                       \
      long c0 = 0;                                                                             \
      for (; c0 + 128 <= (CHANNELS); c0 += 128)                                                \
        CHUNK_SUMS(8, r0, r1, c0, (CHANNELS), (TOTAL_A), (TOTAL_B), BODY)                      \
      if (c0 + 64 <= (CHANNELS)) {                                                             \
        CHUNK_SUMS(4, r0, r1, c0, (CHANNELS), (TOTAL_A), (TOTAL_B), BODY)                      \
        c0 += 64;                                                                              \
      }                                                                                        \
      for (; c0 < (CHANNELS); c0 += 16)                                                        \
        CHUNK_SUMS(1, r0, r1, c0, (CHANNELS), (TOTAL_A), (TOTAL_B), BODY)                      \
    }                                                                                          \
  }

/* Scratch for one call's per-channel sums: per thread two double totals. */
typedef struct {
  double *totals;
} Scratch;

static int scratch_alloc(Scratch *s, int threads, long channels) {
  s->totals = (double *)calloc((size_t)threads * 2 * channels, sizeof(double));
  return !s->totals;
}

static void scratch_free(Scratch *s) { free(s->totals); }

/* Runs BODY (see CHANNEL_SUMS) over all rows on the caller's `threads` OpenMP threads and puts
 * the two per-channel sums into OUT_A and OUT_B; FAILED is set to 1 if scratch memory could not
 * be allocated (then nothing was summed), else 0. */
#define PARALLEL_CHANNEL_SUMS(FAILED, ROWS, CHANNELS, OUT_A, OUT_B, BODY)                       \
  {                                                                                            \
    Scratch scratch;                                                                           \
    (FAILED) = scratch_alloc(&scratch, threads, (CHANNELS));                                   \
    if (!(FAILED)) {                                                                           \
      _Pragma("omp parallel for schedule(static) num_threads(threads)")                        \
      for (int t = 0; t < threads; ++t) {                                                      \
        long begin, end;                                                                       \
        rows_of((ROWS), threads, t, &begin, &end);                                             \
        double *ta = scratch.totals + (2 * t) * (CHANNELS), *tb = ta + (CHANNELS);             \
        CHANNEL_SUMS(begin, end, (CHANNELS), ta, tb, BODY)                                     \
      }                                                                                        \
      reduce(scratch.totals, threads, (CHANNELS), (OUT_A), (OUT_B));                           \
    }                                                                                          \
    scratch_free(&scratch);                                                                    \
  }

/* sum[c] = sum over rows of (x - pivot[c]), sumsq[c] = sum of its squares. Shifting by a value
 * of the channel (the caller passes the first row) keeps the variance free of cancellation. */
static int bn_stats(const void *x, int dtype, long rows, long channels, const float *pivot,
                    double *sum, double *sumsq, int threads) {
  int failed;
  PARALLEL_CHANNEL_SUMS(failed, rows, channels, sum, sumsq, {
    __m512 d = _mm512_sub_ps(load_cached(x, dtype, at, m), _mm512_maskz_loadu_ps(m, pivot + c));
    sa = _mm512_add_ps(sa, d);
    sb = _mm512_fmadd_ps(d, d, sb);
  })
  return failed;
}

/* y = relu?(x * scale + shift [+ res]); res may be NULL. With `bits` (and relu) the mask y > 0 is
 * also written, one 16-bit word per 16-channel block of each row. */
static void bn_apply(const void *x, const void *res, void *y, int dtype, long rows,
                     long channels, const float *scale, const float *shift, int relu,
                     uint16_t *bits, int threads) {
  const long blocks = (channels + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long r = 0; r < rows; ++r) {
    for (long c = 0; c < channels; c += 16) {
      __mmask16 m = lanes(c, channels);
      long at = r * channels + c;
      __m512 v = _mm512_fmadd_ps(load(x, dtype, at, m), _mm512_maskz_loadu_ps(m, scale + c),
                                 _mm512_maskz_loadu_ps(m, shift + c));
      if (res) v = _mm512_add_ps(v, load(res, dtype, at, m));
      if (relu) v = _mm512_max_ps(v, _mm512_setzero_ps());
      if (bits)
        bits[r * blocks + c / 16] = store_positive(y, dtype, at, m, v);
      else
        store(y, dtype, at, m, v);
    }
  }
}

/* The incoming gradient gv with the ReLU's mask applied: from x (the ReLU followed the norm
 * directly, so its input was x * scale + shift), from the saved bits (word `bit_at`), or none. */
static inline __m512 masked(__m512 gv, const uint16_t *bits, long bit_at, __mmask16 m, int mode,
                            __m512 scale, __m512 shift, __m512 xv) {
  __m512 zero = _mm512_setzero_ps();
  if (mode == MASK_FROM_X)
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_fmadd_ps(xv, scale, shift), zero,
                                                  _CMP_GT_OQ),
                               gv);
  if (mode == MASK_FROM_BITS) return _mm512_maskz_mov_ps(m & bits[bit_at], gv);
  return gv;
}

/* sum_g[c] = sum of the masked gradient gm, sum_gx[c] = sum of gm * (x - mean[c]); gm is also
 * written to gm_out when that is not NULL (it is the residual branch's gradient). */
static int bn_grad_sums(const void *g, const void *x, const uint16_t *bits, void *gm_out,
                        int dtype, long rows, long channels, const float *scale,
                        const float *shift, const float *mean, int mode, double *sum_g,
                        double *sum_gx, int threads) {
  const long blocks = (channels + 15) / 16;
  int failed;
  PARALLEL_CHANNEL_SUMS(failed, rows, channels, sum_g, sum_gx, {
    __m512 xv = load_cached(x, dtype, at, m);
    __m512 gm = masked(load_cached(g, dtype, at, m), bits, r * blocks + c / 16, m, mode,
                       _mm512_maskz_loadu_ps(m, scale + c), _mm512_maskz_loadu_ps(m, shift + c), xv);
    if (gm_out) store(gm_out, dtype, at, m, gm);
    sa = _mm512_add_ps(sa, gm);
    sb = _mm512_fmadd_ps(gm, _mm512_sub_ps(xv, _mm512_maskz_loadu_ps(m, mean + c)), sb);
  })
  return failed;
}

/* dx = a * gm + b * (x - mean) + k per channel (batch norm's input gradient in closed form). */
static void bn_grad_input(const void *g, const void *x, const uint16_t *bits, void *dx,
                          int dtype, long rows, long channels, const float *scale,
                          const float *shift, const float *mean, int mode, const float *a,
                          const float *b, const float *k, int threads) {
  const long blocks = (channels + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long r = 0; r < rows; ++r) {
    for (long c = 0; c < channels; c += 16) {
      __mmask16 m = lanes(c, channels);
      long at = r * channels + c;
      __m512 xv = load(x, dtype, at, m);
      __m512 gm = masked(load(g, dtype, at, m), bits, r * blocks + c / 16, m, mode,
                         _mm512_maskz_loadu_ps(m, scale + c), _mm512_maskz_loadu_ps(m, shift + c),
                         xv);
      /* b * (x - mean), not b * x + const: the latter cancels when |mean| >> std. */
      __m512 centred = _mm512_sub_ps(xv, _mm512_maskz_loadu_ps(m, mean + c));
      __m512 v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + c), gm,
                                 _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, b + c), centred,
                                                 _mm512_maskz_loadu_ps(m, k + c)));
      store(dx, dtype, at, m, v);
    }
  }
}

static float element(const void *x, int dtype, long at) {
  if (dtype == F32) return ((const float *)x)[at];
  uint32_t bits = (uint32_t)((const uint16_t *)x)[at] << 16;
  float v;
  memcpy(&v, &bits, sizeof v);
  return v;
}

/* The training forward: batch statistics of x, then y = relu?(BN(x) [+ res]). Writes the batch
 * mean, 1/sqrt(var + eps) and the biased variance per channel (for the running statistics), and
 * with `bits` (not NULL, relu set) the mask y > 0, rows x ceil(channels / 16) 16-bit words, for
 * the backward (MASK_FROM_BITS): 1/16 of the bytes of rereading a bf16 y.
 * Returns 0, or 1 if memory for the per-thread sums could not be allocated. */
int bn_act_forward(const void *x, const void *res, void *y, int dtype, long rows, long channels,
                   const float *weight, const float *bias, double eps, int relu, float *mean,
                   float *invstd, float *var, int threads, uint16_t *bits) {
  double *sums = (double *)malloc(2 * channels * sizeof(double));
  float *pivot = (float *)malloc(3 * channels * sizeof(float));
  int failed = !sums || !pivot;
  if (!failed) {
    float *scale = pivot + channels, *shift = scale + channels;
    for (long c = 0; c < channels; ++c) pivot[c] = element(x, dtype, c);
    failed = bn_stats(x, dtype, rows, channels, pivot, sums, sums + channels, threads);
    if (!failed) {
      batch_statistics(sums, pivot, rows, channels, eps, mean, var, invstd);
      scale_shift(weight, bias, mean, invstd, channels, scale, shift);
      bn_apply(x, res, y, dtype, rows, channels, scale, shift, relu, relu ? bits : NULL, threads);
    }
  }
  free(sums);
  free(pivot);
  return failed;
}

/* The backward of bn_act_forward given the output gradient g: dx, and dweight/dbias when those
 * pointers are not NULL. mode says where the ReLU's mask comes from (MASK_FROM_BITS: `bits`, as
 * the forward wrote them); with gm (not NULL) the masked gradient is also written there (it is
 * the residual's gradient) and reread by the second pass. With gm the mask must not be
 * MASK_NONE. Returns 0, or 1 on a failed allocation. */
int bn_act_backward(const void *g, const void *x, const uint16_t *bits, void *gm, void *dx, int dtype,
                    long rows, long channels, const float *weight, const float *bias,
                    const float *mean, const float *invstd, int mode, float *dweight,
                    float *dbias, int threads) {
  double *sums = (double *)malloc(2 * channels * sizeof(double));
  float *scale = (float *)malloc(5 * channels * sizeof(float));
  int failed = !sums || !scale;
  if (!failed) {
    float *shift = scale + channels, *a = shift + channels, *b = a + channels, *k = b + channels;
    scale_shift(weight, bias, mean, invstd, channels, scale, shift);
    failed = bn_grad_sums(g, x, bits, gm, dtype, rows, channels, scale, shift, mean, mode, sums,
                          sums + channels, threads);
    if (!failed) {
      grad_coefficients(sums, weight, invstd, rows, channels, a, b, k, dweight, dbias);
      if (gm)
        bn_grad_input(gm, x, bits, dx, dtype, rows, channels, scale, shift, mean, MASK_NONE, a, b, k,
                      threads);
      else
        bn_grad_input(g, x, bits, dx, dtype, rows, channels, scale, shift, mean, mode, a, b, k,
                      threads);
    }
  }
  free(sums);
  free(scale);
  return failed;
}
