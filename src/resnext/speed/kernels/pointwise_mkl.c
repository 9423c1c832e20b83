/* A float32 1×1 convolution of a channels-last tensor as one MKL product on a weight packed once
 * (MKL's `cblas_sgemm_pack` and `cblas_sgemm_compute`, from the MKL inside torch), then its bias,
 * optionally a residual, and optionally a ReLU in one pass over the output.
 *
 * Channels-last, a 1×1 convolution is the product of the (pixels × C_in) input with the transposed
 * (C_out × C_in) weight; with a stride, of the pixels it reads, gathered first. On the Xeon without
 * AMX (RESULTS.md, stop 55) MKL's packed product ran the 7² and 14² layers of ResNeXt-50 at batch 1
 * at 1.1–1.5× oneDNN's fused 1×1 convolution, whose call also costs ~50 µs more. MKL packs for a number of pixel rows: the module
 * (`pointwise_mkl.MklConv1x1`) packs for the rows it is built for and leaves other inputs to
 * torch's product.
 *
 * The MKL functions are not linked in: torch loads its MKL privately, so the Python side looks them
 * up in torch's own library and hands their addresses to `pointwise_mkl_bind` once per process.
 *
 * The epilogue: without a residual, or with one elsewhere, the product is written (beta 0) and one
 * pass adds the bias (and the residual) and applies the ReLU; with the residual as the output
 * (written over it), the product is added onto it (beta 1) and the pass adds the bias and applies
 * the ReLU. The pass splits the rows between torch's OpenMP threads.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, PACKED = 151, B_MATRIX = 162 };

typedef void (*compute_fn)(int layout, int transa, int transb, int m, int n, int k, const float *a,
                           int lda, const float *b, int ldb, float beta, float *c, int ldc);
typedef void (*pack_fn)(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                        const float *src, int ld, float *dest);
typedef size_t (*size_fn)(int identifier, int m, int n, int k);

static compute_fn compute_ = NULL;
static pack_fn pack_ = NULL;
static size_fn size_ = NULL;

/* The three MKL functions' addresses; 0 when all are given. */
int pointwise_mkl_bind(void *compute, void *pack, void *size) {
  if (!compute || !pack || !size) return 1;
  compute_ = (compute_fn)compute;
  pack_ = (pack_fn)pack;
  size_ = (size_fn)size;
  return 0;
}

/* Bytes MKL needs for the (k × n) weight packed for products of `m` rows; 0 before the bind. */
size_t pointwise_mkl_packed_bytes(int m, int n, int k) {
  return size_ ? size_(B_MATRIX, m, n, k) : 0;
}

/* Pack `w` (n × k row-major: the convolution's C_out × C_in weight) as the product's transposed
 * right-hand matrix, for `m` rows, into `dest` (pointwise_mkl_packed_bytes(m, n, k) bytes). */
int pointwise_mkl_pack(const float *w, float *dest, int m, int n, int k) {
  if (!pack_ || m < 1 || n < 1 || k < 1) return 1;
  pack_(ROW_MAJOR, B_MATRIX, TRANS, m, n, k, 1.0f, w, k, dest);
  return 0;
}

/* The calling thread's buffer for a strided layer's gathered pixels, grown as needed and kept
 * (a strided layer runs on every call, so it is not returned between calls). */
static _Thread_local float *gathered_ = NULL;
static _Thread_local size_t gathered_size_ = 0;

static float *gather_buffer(size_t floats) {
  if (floats > gathered_size_) {
    float *grown = (float *)aligned_alloc(64, ((floats * sizeof(float) + 63) / 64) * 64);
    if (!grown) return NULL;
    free(gathered_);
    gathered_ = grown;
    gathered_size_ = floats;
  }
  return gathered_;
}

/* y = relu?(conv1x1(x, w, stride) + bias [+ res]) for a channels-last x of `images` × `height` ×
 * `width` pixels of k channels, i.e. x's every `stride`-th pixel of every `stride`-th row times wᵀ,
 * with y and res (rows × n, row-major) of the output's pixels; `packed` from pointwise_mkl_pack for
 * those rows, n and k. A stride > 1 first gathers those pixels into a buffer of the calling
 * thread's, so that the product reads them as one matrix. `res` may be `y` itself (written over
 * it). */
int pointwise_mkl(const float *x, const float *packed, const float *bias, const float *res,
                  float *y, int images, int height, int width, int k, int n, int stride, int relu,
                  int threads) {
  if (!compute_ || images < 1 || height < 1 || width < 1 || n < 1 || k < 1 || stride < 1 ||
      threads < 1)
    return 1;
  const long out_h = (height - 1) / stride + 1, out_w = (width - 1) / stride + 1;
  const long rows = images * out_h * out_w;
  if (rows > 2147483647L) return 1;
  const int m = (int)rows;
  const float *a = x;
  if (stride > 1) {
    float *buffer = gather_buffer((size_t)rows * (size_t)k);
    if (!buffer) return 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long p = 0; p < rows; ++p) {
      const long image = p / (out_h * out_w), i = (p / out_w) % out_h, j = p % out_w;
      const float *from = x + ((image * height + i * stride) * (long)width + j * stride) * k;
      memcpy(buffer + p * (long)k, from, (size_t)k * sizeof(float));
    }
    a = buffer;
  }
  const int onto = res != NULL && res == y;
  compute_(ROW_MAJOR, NO_TRANS, PACKED, m, n, k, a, k, packed, n, onto ? 1.0f : 0.0f, y, n);
  const float *other = onto ? NULL : res;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long r = 0; r < m; ++r) {
    float *row = y + r * (long)n;
    const float *add = other ? other + r * (long)n : NULL;
    /* NaN < 0 is false: a NaN stays NaN through the ReLU, as in torch */
    if (add && relu) {
#pragma omp simd
      for (long c = 0; c < n; ++c) {
        const float v = row[c] + bias[c] + add[c];
        row[c] = v < 0.0f ? 0.0f : v;
      }
    } else if (add) {
#pragma omp simd
      for (long c = 0; c < n; ++c) row[c] += bias[c] + add[c];
    } else if (relu) {
#pragma omp simd
      for (long c = 0; c < n; ++c) {
        const float v = row[c] + bias[c];
        row[c] = v < 0.0f ? 0.0f : v;
      }
    } else {
#pragma omp simd
      for (long c = 0; c < n; ++c) row[c] += bias[c];
    }
  }
  return 0;
}
