/* Per-thread scratch buffers kept across calls, for kernels whose threads need working memory. */
#ifndef RESNEXT_SCRATCH_H
#define RESNEXT_SCRATCH_H

#include <stdlib.h>

#define SCRATCH_SLOTS 5

/* This thread's scratch buffer `slot` (< SCRATCH_SLOTS), at least `bytes` long, 64-byte aligned
 * (NULL if memory runs out). Kept across calls (OpenMP threads live as long as the process) and
 * grown when a call needs more: a call neither allocates nor zeroes its buffers whole. */
static inline void *scratch(int slot, size_t bytes) {
  static __thread void *buffer[SCRATCH_SLOTS];
  static __thread size_t size[SCRATCH_SLOTS];
  if (size[slot] < bytes) {
    free(buffer[slot]);
    buffer[slot] = aligned_alloc(64, (bytes + 63) / 64 * 64);
    size[slot] = buffer[slot] ? bytes : 0;
  }
  return buffer[slot];
}

#endif
