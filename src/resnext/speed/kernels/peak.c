/* This CPU's arithmetic peak: AVX-512 float32 FMAs and AVX512-BF16 pair dot products per second.
 *
 * Why: a speed target is only meaningful against what the machine can do at best. Each thread
 * runs ACC independent accumulator chains (more than an FMA's latency times its issue rate, so
 * the units never wait on a result) for `iters` rounds with nothing but the one instruction in
 * the loop; the accumulators are summed into `sink` so the compiler cannot drop the work.
 *
 * Counting: one 512-bit FMA is 16 lanes x 2 = 32 FLOP; one VDPBF16PS is 16 lanes x 2 pairs x 2 =
 * 64 FLOP. The caller divides the returned FLOP count by the wall time it measures.
 */
#include <immintrin.h>
#include <omp.h>

#define ACC 24

static double fma_thread(long iters) {
  __m512 acc[ACC];
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
#pragma GCC unroll 24
  for (int i = 0; i < ACC; i++) acc[i] = _mm512_set1_ps((float)i);
  for (long k = 0; k < iters; k++) {
#pragma GCC unroll 24
    for (int i = 0; i < ACC; i++) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  }
  __m512 s = acc[0];
#pragma GCC unroll 24
  for (int i = 1; i < ACC; i++) s = _mm512_add_ps(s, acc[i]);
  return (double)_mm512_reduce_add_ps(s);
}

/* Compiled for AVX512-BF16 alone, so the library loads on AVX-512 CPUs without it. */
__attribute__((target("avx512bf16,avx512f"))) static double dot_bf16_thread(long iters) {
  __m512 acc[ACC];
  /* bf16 1.0 (0x3f80): each lane gains exactly 2 per round, exact in float32 up to 2^24. */
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3f80);
#pragma GCC unroll 24
  for (int i = 0; i < ACC; i++) acc[i] = _mm512_set1_ps((float)i);
  for (long k = 0; k < iters; k++) {
#pragma GCC unroll 24
    for (int i = 0; i < ACC; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  }
  __m512 s = acc[0];
#pragma GCC unroll 24
  for (int i = 1; i < ACC; i++) s = _mm512_add_ps(s, acc[i]);
  return (double)_mm512_reduce_add_ps(s);
}

/* kind 0: float32 FMA, 1: bf16 pair dot product. Returns the FLOP done by the threads that ran
 * (OpenMP may grant fewer than asked for). */
double peak_run(int kind, long iters, int threads, double *sink) {
  double total = 0.0;
  int ran = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
#pragma omp single
    ran = omp_get_num_threads();
    total += kind == 0 ? fma_thread(iters) : dot_bf16_thread(iters);
  }
  *sink = total;
  return (double)iters * ACC * (kind == 0 ? 32.0 : 64.0) * ran;
}
