/* What the project's AMX kernels share: the OS permission request, one tile configuration (all
 * eight tiles 16 rows of 64 bytes: 16 x 32 bf16 operands, 16 x 16 float32 accumulators), the
 * accumulator read-back, and (scratch.h) per-thread scratch buffers kept across calls. */
#ifndef RESNEXT_AMX_TILES_H
#define RESNEXT_AMX_TILES_H

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "scratch.h"

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} TileConfig;

/* Linux hands out the AMX tile state only on request (once per process; later calls are no-ops). */
static inline int amx_request(void) {
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

__attribute__((target("amx-tile,amx-bf16"))) static inline void configure(void) {
  TileConfig cfg __attribute__((aligned(64)));
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  /* GCC does not see that ldtilecfg reads the whole struct: once this function was inlined into
   * another, it dropped the row and column stores as dead (all tiles then 0 x 0, and the first
   * tile instruction faulted). The barrier makes every byte of cfg live. */
  __asm__ volatile("" : : "m"(cfg) : "memory");
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) static inline void release(void) { _tile_release(); }

/* Accumulator tile m (0-3: 16 rows of 16 float32) to acc. */
__attribute__((target("amx-tile"))) static inline void tile_to(int m, float *acc) {
  switch (m) {
  case 0: _tile_stored(0, acc, 64); break;
  case 1: _tile_stored(1, acc, 64); break;
  case 2: _tile_stored(2, acc, 64); break;
  default: _tile_stored(3, acc, 64); break;
  }
}

#endif
