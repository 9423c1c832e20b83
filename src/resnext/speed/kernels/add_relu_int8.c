/* A residual block's int8 add-and-ReLU on uint8 maps of the same layout, AVX-512 or AVX2.
 *
 * Why this kernel exists: torch's quantized add_relu ran ResNeXt-50's and ResNet-50's residual
 * adds at 7-14 GB/s on the Xeon of RESULTS.md's stop 63, 11-14 % of an int8 forward.
 *
 * Arithmetic, as torch defines it: the real values (a - za) sa and (b - zb) sb added, then
 * quantized to the output's scale so and zero point zo, rounded to nearest even and clamped to
 * [lo, 255] (lo = zo with the ReLU, else 0). The caller folds the scales into ma = sa / so,
 * mb = sb / so and c = zo - za ma - zb mb; here y = clamp(round(a ma + b mb + c)): the same up to
 * float rounding.
 *
 * One source, two builds (add_int8.BUILDS): with -mavx512f 16 values a vector, else 8 on AVX2;
 * both give the same codes.
 */
#include <immintrin.h>
#include <stdint.h>

#if defined(__AVX512F__)
enum { STEP = 16 };
typedef __m512 vf;
typedef __m512i vi;
#define set1_ps _mm512_set1_ps
#define set1_epi32 _mm512_set1_epi32
#define fmadd_ps _mm512_fmadd_ps

static inline vf widen(const uint8_t *p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

static inline void narrow(uint8_t *p, vf f, vi lo) {
  /* below lo: lo; above 255: 255 (the unsigned saturating narrowing) */
  _mm_storeu_si128((__m128i *)p, _mm512_cvtusepi32_epi8(_mm512_max_epi32(_mm512_cvtps_epi32(f), lo)));
}
#else
enum { STEP = 8 };
typedef __m256 vf;
typedef __m256i vi;
#define set1_ps _mm256_set1_ps
#define set1_epi32 _mm256_set1_epi32
#define fmadd_ps _mm256_fmadd_ps

static inline vf widen(const uint8_t *p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static inline void narrow(uint8_t *p, vf f, vi lo) {
  /* below lo: lo; above 255: 255 (before the packs: the second reads int16) */
  const __m256i q =
      _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(f), lo), _mm256_set1_epi32(255));
  const __m128i q16 = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
  _mm_storel_epi64((__m128i *)p, _mm_packus_epi16(q16, q16));
}
#endif

/* y[i] for i in [start, end); STEP values a step (four a loop turn), the last partial step in
 * plain C */
static void add_range(const uint8_t *a, const uint8_t *b, uint8_t *y, long start, long end,
                      float ma, float mb, float c, int lo) {
  const vf mav = set1_ps(ma), mbv = set1_ps(mb), cv = set1_ps(c);
  const vi lov = set1_epi32(lo);
  long i = start;
#pragma GCC unroll 4
  for (; i + STEP <= end; i += STEP)
    narrow(y + i, fmadd_ps(widen(a + i), mav, fmadd_ps(widen(b + i), mbv, cv)), lov);
  for (; i < end; ++i) {
    const float f = (float)a[i] * ma + ((float)b[i] * mb + c);
    int q = (int)__builtin_nearbyintf(f);
    q = q < lo ? lo : q > 255 ? 255 : q;
    y[i] = (uint8_t)q;
  }
}

/* y = the requantized add (and ReLU) of a and b, n values each; 0, or -1 for a bad argument */
int add_relu_u8(const uint8_t *a, const uint8_t *b, uint8_t *y, long n, float ma, float mb,
                float c, int lo, int threads) {
  if (n < 0 || lo < 0 || lo > 255) return -1;
  /* chunks of whole cache lines, one range per thread */
  const long chunk = ((n + threads - 1) / threads + 63) / 64 * 64;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int t = 0; t < threads; ++t) {
    const long start = t * chunk, end = start + chunk < n ? start + chunk : n;
    if (start < end) add_range(a, b, y, start, end, ma, mb, c, lo);
  }
  return 0;
}
