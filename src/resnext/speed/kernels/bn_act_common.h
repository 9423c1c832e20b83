/* The scalar parts of the fused training batch norm that do not depend on the instruction set,
 * shared by its AVX-512 (bn_act.c) and AVX2 (bn_act_avx2.c) builds: the ReLU mask modes, the
 * rows each thread takes, the per-thread totals' reduction, and the per-channel closed forms of
 * the statistics and of the backward's coefficients. */
#ifndef RESNEXT_BN_ACT_COMMON_H
#define RESNEXT_BN_ACT_COMMON_H

#include <math.h>
#include <string.h>

/* Where the backward takes the ReLU's mask from: none, the input x (the ReLU followed the norm
 * directly), or the bits the forward saved (y > 0, one bit per value; with a residual the ReLU's
 * input cannot be recomputed from x). */
enum { MASK_NONE = 0, MASK_FROM_X = 1, MASK_FROM_BITS = 2 };

/* Thread t's share [begin, end) of `rows` split into `threads` contiguous parts. */
static void rows_of(long rows, int threads, int t, long *begin, long *end) {
  long per = (rows + threads - 1) / threads;
  *begin = per * t < rows ? per * t : rows;
  *end = *begin + per < rows ? *begin + per : rows;
}

/* Sum the per-thread totals (thread t's two vectors start at part + 2t * channels) into out_a
 * and out_b. */
static void reduce(const double *part, int threads, long channels, double *out_a, double *out_b) {
  memset(out_a, 0, channels * sizeof(double));
  memset(out_b, 0, channels * sizeof(double));
  for (int t = 0; t < threads; ++t)
    for (long c = 0; c < channels; ++c) {
      out_a[c] += part[(2 * t) * channels + c];
      out_b[c] += part[(2 * t + 1) * channels + c];
    }
}

/* scale = weight * invstd and shift = bias - mean * scale (weight 1 and bias 0 when NULL). */
static void scale_shift(const float *weight, const float *bias, const float *mean,
                        const float *invstd, long channels, float *scale, float *shift) {
  for (long c = 0; c < channels; ++c) {
    scale[c] = (weight ? weight[c] : 1.0f) * invstd[c];
    shift[c] = (bias ? bias[c] : 0.0f) - mean[c] * scale[c];
  }
}

/* The batch mean, biased variance and 1/sqrt(var + eps) per channel from the sums of x - pivot
 * (sums[c]) and of their squares (sums[channels + c]) over `rows` values. */
static void batch_statistics(const double *sums, const float *pivot, long rows, long channels,
                             double eps, float *mean, float *var, float *invstd) {
  for (long c = 0; c < channels; ++c) {
    double d = sums[c] / rows, v = sums[channels + c] / rows - d * d;
    v = v > 0 ? v : 0;
    mean[c] = (float)(pivot[c] + d);
    var[c] = (float)v;
    invstd[c] = (float)(1.0 / sqrt(v + eps));
  }
}

/* From the sums of the masked gradient (sums[c]) and of its product with x - mean
 * (sums[channels + c]): dx = a * gm + b * (x - mean) + k per channel, and dweight/dbias where
 * those pointers are not NULL. */
static void grad_coefficients(const double *sums, const float *weight, const float *invstd,
                              long rows, long channels, float *a, float *b, float *k,
                              float *dweight, float *dbias) {
  for (long c = 0; c < channels; ++c) {
    double r = invstd[c], sum_g = sums[c], dw = sums[channels + c] * r;
    double ac = (weight ? weight[c] : 1.0) * r, bc = -ac * r * dw / rows;
    a[c] = (float)ac;
    b[c] = (float)bc;
    k[c] = (float)(-ac * sum_g / rows);
    if (dweight) dweight[c] = (float)dw;
    if (dbias) dbias[c] = (float)sum_g;
  }
}

/* The module's running statistics after a training forward, as nn.BatchNorm2d updates them:
 * running = (1 - factor) * running + factor * batch, with the variance made unbiased (count
 * values per channel). One call where torch ran five small ops per layer and step. */
void bn_update_running(const float *mean, const float *var, float *running_mean,
                       float *running_var, long channels, double factor, long count) {
  const float f = (float)factor, keep = (float)(1.0 - factor);
  const float n = (float)count, n1 = (float)(count > 1 ? count - 1 : 1);
  for (long c = 0; c < channels; ++c) {
    running_mean[c] = running_mean[c] * keep + f * mean[c];
    running_var[c] = running_var[c] * keep + f * (var[c] * n / n1);
  }
}

#endif
