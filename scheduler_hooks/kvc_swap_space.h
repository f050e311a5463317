/*
 * The allocator of the host swap region: byte extents of [0, capacity), first fit over a free
 * list kept sorted by offset and coalesced on free.
 *
 * Why not a jemalloc arena with extent hooks over the pinned region (DESIGN.md's suggestion): a
 * swap-out must know that its extents fit *before* the block manager commits the swap, and must
 * then place them without any chance of failing; jemalloc may ask its hooks for more memory at
 * any time, keeps per-size-class slabs that a bounded region fragments quickly, and cannot be
 * asked "would this fit". Swap extents are few (one per swapped block) and large, so a first-fit
 * list is fast enough, exact, and its worst case is easy to bound: the free list never holds more
 * than (extents allocated + 1) entries, so it is allocated once, at creation, and a swap never
 * allocates host memory.
 *
 * Offsets and sizes are multiples of KVC__SWAP_ALIGN. Not thread-safe (the cache serializes).
 */
#ifndef KVC_SWAP_SPACE_H
#define KVC_SWAP_SPACE_H

#include <stddef.h>
#include <stdint.h>

#include "allocator/kvc_host_alloc.h"
#include "kvcomp.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVC__SWAP_ALIGN 64u

typedef struct kvc__swap_space {
  uint64_t capacity; /* rounded down to KVC__SWAP_ALIGN */
  uint64_t used;
  int64_t extents; /* allocated extents */
  int64_t max_extents;
  uint64_t *free_off; /* [max_extents + 1] sorted by offset, never adjacent */
  uint64_t *free_len;
  int64_t nfree;
} kvc__swap_space_t;

/* An empty space of `capacity` bytes holding at most `max_extents` extents at once. capacity 0 is
 * valid (nothing fits). KVC_OK or KVC_ERR_OUT_OF_HOST_MEMORY. */
kvc_status_t kvc__swap_space_init(kvc__swap_space_t *s, kvc_host_alloc_t *ha, uint64_t capacity,
                                  int64_t max_extents);
void kvc__swap_space_release(kvc__swap_space_t *s, kvc_host_alloc_t *ha);

/* The size an extent of `bytes` takes. */
static inline uint64_t kvc__swap_space_round(uint64_t bytes) {
  return (bytes + KVC__SWAP_ALIGN - 1) / KVC__SWAP_ALIGN * KVC__SWAP_ALIGN;
}

/* Takes an extent of kvc__swap_space_round(bytes) (bytes > 0); 0 and *off on success, -1 when no
 * free extent is large enough or max_extents are allocated (nothing changes then). */
int kvc__swap_space_alloc(kvc__swap_space_t *s, uint64_t bytes, uint64_t *off);
/* Returns an extent taken with the same `bytes`. */
void kvc__swap_space_free(kvc__swap_space_t *s, uint64_t off, uint64_t bytes);

/* Checks the free list (sorted, in range, coalesced, sizes add up with `used`); KVC_OK or
 * KVC_ERR_INTERNAL with the reason in why[cap]. */
kvc_status_t kvc__swap_space_check(const kvc__swap_space_t *s, char *why, size_t cap);

#ifdef __cplusplus
}
#endif

#endif /* KVC_SWAP_SPACE_H */
