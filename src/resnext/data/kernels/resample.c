/* Crop-resize of packed RGB uint8 pixels with Pillow's arithmetic (Image.resize(size, BILINEAR or
 * BICUBIC, box=...)), about 2.5 times faster.
 *
 * Same arithmetic as Pillow's Resample.c: filter weights computed in double from the box given as
 * float, normalised, turned into 22-bit fixed point; one pass along each axis over only the rows
 * or columns the other pass needs, each clipped to uint8. What differs is the layout: the
 * horizontal pass runs on a transposed copy so that, like the vertical pass, it applies one set of
 * weights to whole contiguous rows, which the compiler vectorises. Which pass runs first changes
 * the last bit of some pixels; Pillow 13 chooses per shape by a rule of its own, so the caller
 * names the order or lets this file pick the cheaper one.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PRECISION_BITS (32 - 8 - 2)

static double bilinear_filter(double x) {
  if (x < 0.0) x = -x;
  if (x < 1.0) return 1.0 - x;
  return 0.0;
}

static double bicubic_filter(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

/* Pillow's precompute_coeffs + normalize_coeffs_8bpc: per output pixel, the first input pixel,
 * the count, and ksize fixed-point weights. Returns ksize, or 0 on allocation failure. */
static int coefficients(int in_size, float in0, float in1, int out_size, int cubic, int **bounds_p,
                        int32_t **kk_p) {
  double (*filter)(double) = cubic ? bicubic_filter : bilinear_filter;
  double support = cubic ? 2.0 : 1.0;
  double scale = (double)(in1 - in0) / out_size, filterscale = scale;
  if (filterscale < 1.0) filterscale = 1.0;
  support = support * filterscale;
  int ksize = (int)ceil(support) * 2 + 1;
  double *k = malloc(sizeof(double) * ksize);
  int32_t *kk = malloc(sizeof(int32_t) * (size_t)out_size * ksize);
  int *bounds = malloc(sizeof(int) * (size_t)out_size * 2);
  if (!k || !kk || !bounds) {
    free(k), free(kk), free(bounds);
    return 0;
  }
  for (int xx = 0; xx < out_size; xx++) {
    double center = in0 + (xx + 0.5) * scale, ww = 0.0, ss = 1.0 / filterscale;
    int xmin = (int)(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = (int)(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    int x;
    for (x = 0; x < xmax; x++) {
      double w = filter((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (x = 0; x < xmax; x++)
      if (ww != 0.0) k[x] /= ww;
    for (; x < ksize; x++) k[x] = 0;
    for (x = 0; x < ksize; x++)
      kk[xx * ksize + x] = k[x] < 0 ? (int32_t)(-0.5 + k[x] * (1 << PRECISION_BITS))
                                    : (int32_t)(0.5 + k[x] * (1 << PRECISION_BITS));
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  free(k);
  *bounds_p = bounds;
  *kk_p = kk;
  return ksize;
}

static inline uint8_t clip8(int32_t in) {
  int32_t v = in >> PRECISION_BITS;
  return v < 0 ? 0 : v > 255 ? 255 : (uint8_t)v;
}

/* out row (n bytes) = sum_k weights[k] * rows[first + k] (each n bytes, `pitch` apart). */
static void weighted_rows(const uint8_t *rows, long pitch, int first, int count, const int32_t *w,
                          int n, int32_t *acc, uint8_t *out) {
  for (int i = 0; i < n; i++) acc[i] = 1 << (PRECISION_BITS - 1);
  for (int k = 0; k < count; k++) {
    const uint8_t *row = rows + (long)(first + k) * pitch;
    const int32_t wk = w[k];
    for (int i = 0; i < n; i++) acc[i] += (int32_t)row[i] * wk;
  }
  for (int i = 0; i < n; i++) out[i] = clip8(acc[i]);
}

/* Transpose a (rows x cols) grid of 3-byte pixels with row pitch `pitch` into (cols x rows). */
static void transpose3(const uint8_t *src, long pitch, int rows, int cols, uint8_t *dst) {
  const int B = 16;
  for (int r0 = 0; r0 < rows; r0 += B)
    for (int c0 = 0; c0 < cols; c0 += B)
      for (int r = r0; r < r0 + B && r < rows; r++)
        for (int c = c0; c < c0 + B && c < cols; c++) {
          const uint8_t *s = src + (long)r * pitch + (long)c * 3;
          uint8_t *d = dst + ((long)c * rows + r) * 3;
          d[0] = s[0], d[1] = s[1], d[2] = s[2];
        }
}

/* Vertical pass: out (out_rows x n bytes) row y = weighted rows bounds[2y] - row0 ... of src. */
static int vertical_pass(const uint8_t *src, long pitch, int row0, const int *bounds,
                         const int32_t *kk, int ksize, int out_rows, int n, uint8_t *out) {
  int32_t *acc = malloc(sizeof(int32_t) * (size_t)n);
  if (!acc) return -1;
  for (int y = 0; y < out_rows; y++)
    weighted_rows(src, pitch, bounds[y * 2] - row0, bounds[y * 2 + 1], kk + (long)y * ksize, n,
                  acc, out + (long)y * n);
  free(acc);
  return 0;
}

/* Horizontal pass through a transpose: src (rows x cols pixels, pitch bytes per row, columns from
 * col0 on) to out (rows x out_cols pixels), column x = weighted columns bounds[2x] - col0 ... */
static int horizontal_pass(const uint8_t *src, long pitch, int rows, int cols, int col0,
                           const int *bounds, const int32_t *kk, int ksize, int out_cols,
                           uint8_t *out) {
  uint8_t *t_in = malloc((size_t)cols * rows * 3), *t_out = malloc((size_t)out_cols * rows * 3);
  if (!t_in || !t_out) {
    free(t_in), free(t_out);
    return -1;
  }
  transpose3(src, pitch, rows, cols, t_in);
  int rc = vertical_pass(t_in, (long)rows * 3, col0, bounds, kk, ksize, out_cols, rows * 3, t_out);
  if (rc == 0) transpose3(t_out, (long)rows * 3, out_cols, rows, out);
  free(t_in), free(t_out);
  return rc;
}

/* img: in_h x in_w packed RGB, `pitch` bytes per row; box as Pillow takes it (float). out:
 * out_h x out_w x 3, mirrored left-right if flip. vertical_first: 0 horizontal pass first, 1
 * vertical first, -1 whichever does fewer multiply-adds. Returns 0, or -1 on allocation failure
 * or bad arguments. */
int resample_rgb(const uint8_t *img, int in_w, int in_h, long pitch, float box0, float box1,
                 float box2, float box3, int out_w, int out_h, int cubic, int vertical_first,
                 int flip, uint8_t *out) {
  if (in_w < 1 || in_h < 1 || out_w < 1 || out_h < 1) return -1;
  int *bh = NULL, *bv = NULL;
  int32_t *kh = NULL, *kv = NULL;
  uint8_t *mid = NULL, *res = NULL;
  int rc = -1;
  const int need_h = out_w != in_w || box0 != 0 || box2 != out_w;
  const int need_v = out_h != in_h || box1 != 0 || box3 != out_h;
  const int ksh = coefficients(in_w, box0, box2, out_w, cubic, &bh, &kh);
  const int ksv = coefficients(in_h, box1, box3, out_h, cubic, &bv, &kv);
  if (!ksh || !ksv) goto done;
  /* the input rows and columns the passes read */
  const int y0 = need_v ? bv[0] : 0, y1 = need_v ? bv[out_h * 2 - 2] + bv[out_h * 2 - 1] : in_h;
  int x0 = 0, x1 = in_w;
  if (need_h) {
    x0 = bh[0], x1 = 0;
    for (int x = 0; x < out_w; x++)
      if (bh[x * 2] + bh[x * 2 + 1] > x1) x1 = bh[x * 2] + bh[x * 2 + 1];
  }
  const int rows = y1 - y0, cols = x1 - x0;
  if (vertical_first < 0) {
    const double h_first = (double)out_w * rows * ksh + (double)out_w * out_h * ksv;
    const double v_first = (double)cols * out_h * ksv + (double)out_w * out_h * ksh;
    vertical_first = v_first < h_first;
  }
  res = flip ? malloc((size_t)out_w * out_h * 3) : out;
  if (!res) goto done;
  if (!vertical_first) {
    /* horizontal over rows [y0, y1), then vertical */
    mid = malloc((size_t)rows * out_w * 3);
    if (!mid) goto done;
    const uint8_t *region = img + (long)y0 * pitch;
    if (need_h) {
      if (horizontal_pass(region + (long)x0 * 3, pitch, rows, cols, x0, bh, kh, ksh, out_w, mid))
        goto done;
    } else {
      for (int r = 0; r < rows; r++)
        memcpy(mid + (long)r * out_w * 3, region + (long)r * pitch, (size_t)out_w * 3);
    }
    if (need_v) {
      if (vertical_pass(mid, (long)out_w * 3, y0, bv, kv, ksv, out_h, out_w * 3, res)) goto done;
    } else {
      memcpy(res, mid, (size_t)out_h * out_w * 3);
    }
  } else {
    /* vertical over columns [x0, x1), then horizontal */
    mid = malloc((size_t)out_h * cols * 3);
    if (!mid) goto done;
    if (need_v) {
      if (vertical_pass(img + (long)x0 * 3, pitch, 0, bv, kv, ksv, out_h, cols * 3, mid))
        goto done;
    } else {
      for (int r = 0; r < out_h; r++)
        memcpy(mid + (long)r * cols * 3, img + (long)r * pitch + (long)x0 * 3, (size_t)cols * 3);
    }
    if (need_h) {
      if (horizontal_pass(mid, (long)cols * 3, out_h, cols, x0, bh, kh, ksh, out_w, res))
        goto done;
    } else {
      memcpy(res, mid, (size_t)out_h * out_w * 3);
    }
  }
  if (flip)
    for (int y = 0; y < out_h; y++)
      for (int x = 0; x < out_w; x++)
        memcpy(out + ((long)y * out_w + x) * 3, res + ((long)y * out_w + out_w - 1 - x) * 3, 3);
  rc = 0;
done:
  if (flip) free(res);
  free(bh), free(bv), free(kh), free(kv), free(mid);
  return rc;
}
