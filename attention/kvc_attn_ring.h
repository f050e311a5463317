/*
 * The attention kernels' ring of unit bytes (attention/kvc_attn_cuda.cu, `producer`): where the
 * producer warp places each unit's page sections in shared memory. Plain C, usable on host and
 * device, so that a CPU test can drive it (tests/test_attn_ring.c).
 *
 * Units are placed and released in one order (a FIFO). The live units occupy one circular run
 * of the ring, from the oldest's offset `tail` to `head`; a unit goes at `head`, or at 0 when it
 * does not fit before the ring's end ("wrapped": the newer units restarted at 0, so the free
 * bytes are [head, tail) until the units before the restart are released). Placing a unit
 * therefore costs the same however many units are in flight: the producer's time per unit
 * bounds every kernel's unit rate, so nothing here may scale with the units in flight.
 */
#ifndef KVC_ATTN_RING_H
#define KVC_ATTN_RING_H

#include <stdint.h>

#include "allocator/kvc_pool_layout.h" /* KVC_HD */

typedef struct kvc_attn_ring {
  uint32_t head;    /* where the next unit goes, unless it must restart at 0 */
  uint32_t tail;    /* offset of the oldest live unit */
  uint32_t wrapped; /* units after the oldest restarted at offset 0 */
} kvc_attn_ring_t;

/* Places a unit of `need` bytes (<= ring_bytes) in a ring of `ring_bytes`; `any_live`: units are
 * in flight. Returns 1 and sets *off when it fits; 0 when the oldest live unit must be released
 * first (never when nothing is live). A unit of 0 bytes goes at head and never waits. */
KVC_HD int kvc_attn_ring_place(kvc_attn_ring_t *r, uint32_t ring_bytes, uint32_t need,
                               int any_live, uint32_t *off) {
  if (!any_live) {
    r->tail = 0;
    r->wrapped = 0;
    *off = 0;
  } else if (need == 0 || r->head + need <= (r->wrapped ? r->tail : ring_bytes)) {
    *off = r->head;
  } else if (!r->wrapped && need <= r->tail) {
    r->wrapped = 1;
    *off = 0;
  } else {
    return 0;
  }
  r->head = *off + need;
  return 1;
}

/* The oldest live unit was released and units remain: the next oldest sits at `oldest_off`. */
KVC_HD void kvc_attn_ring_advance(kvc_attn_ring_t *r, uint32_t oldest_off) {
  if (oldest_off < r->tail) r->wrapped = 0; /* the oldest is now one placed after the restart */
  r->tail = oldest_off;
}

/*
 * Ring slots: where a unit's sections go inside its bytes. Every slot is a whole number of
 * 128-byte lines, so that every unit starts at a multiple of 128 in the ring (which the kernels
 * start 128-aligned). Rows (staging and raw pages) take their bytes as they are: whole lines at
 * every head_dim, and three uncompressed 64-token units fill the ring at head_dim 128. A
 * compressed section starts `lead` = its pool offset mod 128 bytes into its slot and keeps `slack`
 * bytes after it, so that its bulk copies read and write addresses congruent mod 128: copies that
 * were not ran bit-pack (8, 32k) 1.7% and (16, 128k) 4.6% slower (congruence, not alignment:
 * 128-aligned slots alone changed nothing; bench/NOTES-attention.md, session 56).
 */
/* The most bytes a compressed section's slot holds past the section and its slack: a lead of 112,
 * then up to 112 to the line's end (sections and slack are whole 16-byte granules). */
#define KVC_ATTN_SLOT_EXTRA 224

/* The lead of a section whose bytes start at src_off in the pool (whose chunks are 128-aligned). */
KVC_HD uint32_t kvc_attn_ring_lead(int rows, uint32_t src_off) {
  return rows ? 0u : src_off & 127u;
}

/* The slot of a section of `bytes` with that lead. */
KVC_HD uint32_t kvc_attn_ring_slot(int rows, uint32_t bytes, uint32_t lead, uint32_t slack) {
  const uint32_t granules = (bytes + 15u) & ~15u;
  return rows ? granules : (lead + granules + slack + 127u) & ~127u;
}

#endif /* KVC_ATTN_RING_H */
