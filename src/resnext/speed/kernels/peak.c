/* This CPU's arithmetic peak: AVX-512 (or, without it, AVX2) float32 FMAs, AVX512-BF16 pair dot
 * products and AMX bf16 tile products per second.
 *
 * Why: a speed target is only meaningful against what the machine can do at best. Each thread
 * runs ACC independent accumulator chains (more than an FMA's latency times its issue rate, so
 * the units never wait on a result) for `iters` rounds with nothing but the one instruction in
 * the loop; the accumulators are summed into `sink` so the compiler cannot drop the work.
 *
 * Counting: one 512-bit FMA is 16 lanes x 2 = 32 FLOP, one 256-bit FMA 16; one VDPBF16PS is 16
 * lanes x 2 pairs x 2 = 64 FLOP; one TDPBF16PS on full tiles is 16 x 16 outputs x 32 products x 2
 * = 16,384 FLOP. The caller divides the returned FLOP count by the wall time it measures.
 *
 * The library is compiled for no particular ISA; each function names the instructions it needs,
 * so that it loads on any x86-64 CPU and the caller runs only the kinds this CPU has.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ACC 24
#define ACC256 12 /* of AVX2's 16 registers, beside the two operands */

__attribute__((target("avx512f"))) static double fma_thread(long iters) {
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

__attribute__((target("avx2,fma"))) static double fma256_thread(long iters) {
  __m256 acc[ACC256];
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
#pragma GCC unroll 12
  for (int i = 0; i < ACC256; i++) acc[i] = _mm256_set1_ps((float)i);
  for (long k = 0; k < iters; k++) {
#pragma GCC unroll 12
    for (int i = 0; i < ACC256; i++) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  }
  __m256 s = acc[0];
#pragma GCC unroll 12
  for (int i = 1; i < ACC256; i++) s = _mm256_add_ps(s, acc[i]);
  float lanes[8];
  _mm256_storeu_ps(lanes, s);
  double total = 0.0;
  for (int i = 0; i < 8; i++) total += lanes[i];
  return total;
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

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define AMX_ACC 4 /* accumulator tiles 0-3; the sources are tiles 4-5 (4-7 when loaded) */

typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} TileConfig;

/* Linux hands out the AMX tile state only on request, once per process. */
static int amx_allowed(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

/* AMX_ACC independent chains of TDPBF16PS on full 16 x 64-byte tiles; -1 if AMX is refused.
 *
 * With `loaded`, the same four tile products a round as a matrix product's inner loop runs them:
 * two A and two B operand tiles loaded from memory before each round (4 KB, which stays in L1),
 * each output tile the product of one A and one B (2 x 2 blocking, the most eight tiles allow:
 * one 1 KB tile load per tile product). Why: on the Xeon this was written on, the loaded rate,
 * not the register-only one, is what moved with the machine's slow and fast phases (0.42x of the
 * register-only rate in slow rounds, 1.0x in fast ones), so it bounds any kernel that streams
 * its operands. */
__attribute__((target("amx-tile,amx-bf16"))) static double amx_bf16_thread(long iters, int loaded) {
  if (!amx_allowed()) return -1.0;
  TileConfig cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  /* bf16 1.0: each output gains exactly 32 per product */
  static __thread uint16_t operand[4][16 * 32] __attribute__((aligned(64)));
  for (int i = 0; i < 4 * 16 * 32; i++) operand[i / 512][i % 512] = 0x3f80;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  if (loaded) {
    for (long k = 0; k < iters; k++) {
      _tile_loadd(4, operand[0], 64);
      _tile_loadd(5, operand[1], 64);
      _tile_loadd(6, operand[2], 64);
      _tile_loadd(7, operand[3], 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  } else {
    _tile_loadd(4, operand[0], 64);
    _tile_loadd(5, operand[1], 64);
    for (long k = 0; k < iters; k++) {
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(1, 4, 5);
      _tile_dpbf16ps(2, 4, 5);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  float out[16 * 16];
  _tile_stored(3, out, 64);
  _tile_release();
  return (double)out[0];
}

/* kind 0: float32 FMA (AVX-512), 1: bf16 pair dot product, 2: AMX bf16 tile product, 3: float32
 * FMA (AVX2), 4: AMX bf16 tile products with their operand tiles loaded each round. Returns the
 * FLOP done by the threads that ran (OpenMP may grant fewer than asked for), or -1 if AMX was
 * refused. */
double peak_run(int kind, long iters, int threads, double *sink) {
  double total = 0.0;
  int ran = 0, refused = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total) reduction(| : refused)
  {
#pragma omp single
    ran = omp_get_num_threads();
    double r = kind == 0   ? fma_thread(iters)
               : kind == 1 ? dot_bf16_thread(iters)
               : kind == 3 ? fma256_thread(iters)
                           : amx_bf16_thread(iters, kind == 4);
    if (r < 0) refused = 1; else total += r;
  }
  *sink = total;
  if (refused) return -1.0;
  if (kind == 2 || kind == 4) return (double)iters * AMX_ACC * 16384.0 * ran;
  if (kind == 3) return (double)iters * ACC256 * 16.0 * ran;
  return (double)iters * ACC * (kind == 0 ? 32.0 : 64.0) * ran;
}
