/* Max pooling of channels-last maps for training, with a one-byte argmax per output value, and
 * for inference without one.
 *
 * Why C: torch's max_pool2d saves an int64 index per output value for its backward (8 bytes per
 * value, 4x a bf16 output), and its backward scatters through those indices into a zeroed input
 * gradient; in a ResNeXt-50 bf16 training step the stem's pooling and its backward took ~12 ms on
 * the project's Intel machine, most of it moving indices. Here the index is the tap of the
 * window (kh * k + kw, one byte), and in the backward each input value gathers the gradients of
 * the windows that chose it and is written once.
 *
 * x[N][H][W][C] and y[N][Ho][Wo][C], float32 or bfloat16 (dtype 0 / 1), window k x k, stride s,
 * padding p (p <= k / 2, so every window has an in-map tap), no dilation, floor output size.
 * Ties and NaNs are resolved as torch does: a later tap wins only if it is greater or NaN.
 */
#include <immintrin.h>
#include <stdint.h>

#include "bf16_io.h"

static inline __m512 load16(const void *base, int dtype, long at, __mmask16 m) {
  if (dtype == F32) return _mm512_maskz_loadu_ps(m, (const float *)base + at);
  return widen_bf16(_mm256_maskz_loadu_epi16(m, (const uint16_t *)base + at));
}

static int shape_ok(int k, int s, int p) { return k >= 1 && k <= 15 && s >= 1 && p >= 0 && 2 * p <= k; }

/* y = the window maxima, idx = the winning tap of each (none written where idx is NULL: inference,
 * where torch's pooling still writes an int64 index per value). Returns 0, or -1 for a shape it
 * refuses. */
int maxpool_forward(const void *x, void *y, uint8_t *idx, int dtype, int n, int h, int w, int c,
                    int k, int s, int p, int threads) {
  if (!shape_ok(k, s, p)) return -1;
  const int ho = (h + 2 * p - k) / s + 1, wo = (w + 2 * p - k) / s + 1;
  const long out_rows = (long)n * ho * wo;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long r = 0; r < out_rows; ++r) {
    const int img = (int)(r / ((long)ho * wo)), oh = (int)(r / wo % ho), ow = (int)(r % wo);
    const int h0 = oh * s - p, w0 = ow * s - p;
    for (long ch = 0; ch < c; ch += 16) {
      const __mmask16 m = lanes(ch, c);
      __m512 best = _mm512_set1_ps(-__builtin_inff());
      __m512i tap = _mm512_set1_epi32(-1);
      for (int kh = 0; kh < k; ++kh) {
        const int ih = h0 + kh;
        if (ih < 0 || ih >= h) continue;
        for (int kw = 0; kw < k; ++kw) {
          const int iw = w0 + kw;
          if (iw < 0 || iw >= w) continue;
          const __m512 v = load16(x, dtype, (((long)img * h + ih) * w + iw) * c + ch, m);
          /* torch keeps the first in-map tap until a greater value or a NaN comes. */
          __mmask16 take = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) |
                           _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) |
                           _mm512_cmpeq_epi32_mask(tap, _mm512_set1_epi32(-1));
          best = _mm512_mask_mov_ps(best, take, v);
          tap = _mm512_mask_mov_epi32(tap, take, _mm512_set1_epi32(kh * k + kw));
        }
      }
      store(y, dtype, r * c + ch, m, best);
      if (idx) _mm_mask_storeu_epi8(idx + r * c + ch, m, _mm512_cvtepi32_epi8(tap));
    }
  }
  return 0;
}

/* The outputs whose windows hold input position i along one axis: [*lo, *hi] (may be empty). */
static inline void covering(int i, int k, int s, int p, int out, int *lo, int *hi) {
  const int first = i + p - k + 1;
  *lo = first <= 0 ? 0 : (first + s - 1) / s;
  const int last = (i + p) / s;
  *hi = last < out - 1 ? last : out - 1;
}

/* dx = the gradient of maxpool_forward's input, given gy and the saved taps. Each input value
 * gathers, in float32 registers, the gradients of the (at most ceil(k/s)^2) outputs whose window
 * holds it and chose it, in the order torch's backward adds them, and is written once: no zeroed
 * buffer, no scattered read-modify-write. Returns 0, or -1 for a shape it refuses. */
int maxpool_backward(const void *gy, const uint8_t *idx, void *dx, int dtype, int n, int h, int w,
                     int c, int k, int s, int p, int threads) {
  if (!shape_ok(k, s, p)) return -1;
  const int ho = (h + 2 * p - k) / s + 1, wo = (w + 2 * p - k) / s + 1;
  const long in_rows = (long)n * h;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long r = 0; r < in_rows; ++r) {
    const int img = (int)(r / h), ih = (int)(r % h);
    int oh_lo, oh_hi;
    covering(ih, k, s, p, ho, &oh_lo, &oh_hi);
    for (int iw = 0; iw < w; ++iw) {
      int ow_lo, ow_hi;
      covering(iw, k, s, p, wo, &ow_lo, &ow_hi);
      for (long ch = 0; ch < c; ch += 16) {
        const __mmask16 m = lanes(ch, c);
        __m512 sum = _mm512_setzero_ps();
        for (int oh = oh_lo; oh <= oh_hi; ++oh) {
          const int kh = ih + p - s * oh;
          for (int ow = ow_lo; ow <= ow_hi; ++ow) {
            const long o = (((long)img * ho + oh) * wo + ow) * c + ch;
            const int t = kh * k + (iw + p - s * ow);
            const __mmask16 hit =
                _mm_mask_cmpeq_epi8_mask(m, _mm_maskz_loadu_epi8(m, idx + o), _mm_set1_epi8((char)t));
            /* No branch on `hit`: with random maxima it is unpredictable and cost 2x. */
            sum = _mm512_mask_add_ps(sum, hit, sum, load16(gy, dtype, o, hit));
          }
        }
        store(dx, dtype, (r * w + iw) * c + ch, m, sum);
      }
    }
  }
  return 0;
}
