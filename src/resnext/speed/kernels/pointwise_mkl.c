/* A float32 1×1 convolution of a channels-last tensor as one MKL product on a weight packed once
 * (MKL's `cblas_sgemm_pack` and `cblas_sgemm_compute`, from the MKL inside torch), then its bias,
 * optionally a residual, and optionally a ReLU in one pass over the output.
 *
 * Channels-last, a stride-1 1×1 convolution is the product of the (pixels × C_in) input with the
 * transposed (C_out × C_in) weight. On the Xeon without AMX (RESULTS.md, stop 55) MKL's packed
 * product ran the 7² and 14² layers of ResNeXt-50 at batch 1 at 1.1–1.5× oneDNN's fused 1×1
 * convolution, whose call also costs ~50 µs more. MKL packs for a number of pixel rows: the module
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

/* y = relu?(x · wᵀ + bias [+ res]) for x (m × k) and y, res (m × n), all row-major; `packed` from
 * pointwise_mkl_pack for these m, n, k. `res` may be `y` itself (written over it). */
int pointwise_mkl(const float *x, const float *packed, const float *bias, const float *res,
                  float *y, int m, int k, int n, int relu, int threads) {
  if (!compute_ || m < 1 || n < 1 || k < 1 || threads < 1) return 1;
  const int onto = res != NULL && res == y;
  compute_(ROW_MAJOR, NO_TRANS, PACKED, m, n, k, x, k, packed, n, onto ? 1.0f : 0.0f, y, n);
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
