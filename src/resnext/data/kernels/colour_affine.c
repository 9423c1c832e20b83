/* The batch stage's colour map in one pass: packed RGB uint8 images (N, H, W, 3) to float32
 * planes (N, 3, H, W), each output pixel = M_n @ rgb + s_n with a per-image 3x3 matrix and shift.
 *
 * Why C: in torch the same map needs a permute-and-convert pass that writes a float copy of the
 * batch before the 1x1 convolution reads it again; here each uint8 pixel is read once and each
 * float written once. Images are independent, so the OpenMP threads split the batch.
 */
#include <stdint.h>

#define BLOCK 64 /* pixels per inner block: three 64-float rows stay in registers/L1 */

/* Per image and channel, the sum of the channel's values (for the contrast blend's mean). */
void rgb_channel_sums(const uint8_t *x, long n, long pixels, double *sums, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long i = 0; i < n; ++i) {
    const uint8_t *img = x + i * pixels * 3;
    uint64_t r = 0, g = 0, b = 0;
    for (long p = 0; p < pixels; ++p) {
      r += img[3 * p];
      g += img[3 * p + 1];
      b += img[3 * p + 2];
    }
    sums[3 * i] = (double)r;
    sums[3 * i + 1] = (double)g;
    sums[3 * i + 2] = (double)b;
  }
}

/* out[i, c, p] = m[i, c, 0] * x[i, p, 0] + m[i, c, 1] * x[i, p, 1] + m[i, c, 2] * x[i, p, 2]
 * + s[i, c]; m is (n, 3, 3), s is (n, 3), both float32 and contiguous. */
void rgb_affine_planes(const uint8_t *x, long n, long pixels, const float *m, const float *s,
                       float *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long i = 0; i < n; ++i) {
    const uint8_t *img = x + i * pixels * 3;
    const float *mi = m + 9 * i, *si = s + 3 * i;
    float *o0 = out + i * pixels * 3, *o1 = o0 + pixels, *o2 = o1 + pixels;
    for (long start = 0; start < pixels; start += BLOCK) {
      long count = pixels - start < BLOCK ? pixels - start : BLOCK;
      float r[BLOCK], g[BLOCK], b[BLOCK];
      const uint8_t *src = img + 3 * start;
      /* De-interleave first so that the arithmetic below runs on whole vectors. */
      for (long p = 0; p < count; ++p) {
        r[p] = (float)src[3 * p];
        g[p] = (float)src[3 * p + 1];
        b[p] = (float)src[3 * p + 2];
      }
      for (long p = 0; p < count; ++p) {
        o0[start + p] = mi[0] * r[p] + mi[1] * g[p] + mi[2] * b[p] + si[0];
        o1[start + p] = mi[3] * r[p] + mi[4] * g[p] + mi[5] * b[p] + si[1];
        o2[start + p] = mi[6] * r[p] + mi[7] * g[p] + mi[8] * b[p] + si[2];
      }
    }
  }
}
