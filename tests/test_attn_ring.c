/* The attention producer's ring of unit bytes (attention/kvc_attn_ring.h), driven the way the
 * producer drives it: units placed in order, released in the same order, a bounded number in
 * flight. Every placement is checked against the live units' bytes, and against a brute-force
 * placer (the same two candidate offsets, each checked against every live unit). Then the slots
 * that place sections inside a unit. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "attention/kvc_attn_ring.h"
#include "kvc_test_util.h"

enum { MAX_LIVE = 32 };

typedef struct unit {
  uint32_t off, need;
} unit_t;

/* The placement a brute-force check of every live unit allows: head if the unit fits before the
 * ring's end, else 0, provided it overlaps no live byte; -1 when it must wait. */
static int64_t brute_place(const unit_t *live, int n, uint32_t head, uint32_t ring, uint32_t need) {
  if (n == 0) return 0;
  const uint32_t off = head + need <= ring ? head : 0;
  for (int i = 0; i < n; i++)
    if (off < live[i].off + live[i].need && live[i].off < off + need) return -1;
  return off;
}

/* One run: `units` placements of sizes drawn by `size`, at most `max_live` in flight, the oldest
 * released at random moments (and whenever the ring says it must be). */
static void run(uint64_t seed, uint32_t ring, int max_live, int units, uint32_t max_need,
                int zero_every) {
  kvc_test_rng_t r;
  kvc_test_rng_seed(&r, seed);
  kvc_attn_ring_t rg = {0, 0, 0};
  unit_t live[MAX_LIVE];
  int n = 0, waits = 0, restarts = 0;
  uint32_t head = 0; /* the brute-force placer's own head */
  for (int u = 0; u < units; u++) {
    while (n == max_live || (n > 0 && kvc_test_rng_below(&r, 4) == 0)) {
      for (int i = 1; i < n; i++) live[i - 1] = live[i];
      if (--n > 0) kvc_attn_ring_advance(&rg, live[0].off);
    }
    const uint32_t need = zero_every && u % zero_every == 0
                              ? 0
                              : 16 * (1 + kvc_test_rng_below(&r, max_need / 16));
    uint32_t off = 0;
    for (;;) {
      /* With zero-byte units live, the brute-force placer may find room the FIFO does not use;
       * compare only without them. */
      int zeros = 0;
      for (int i = 0; i < n; i++) zeros += live[i].need == 0;
      const int64_t want = need == 0 ? (n ? head : 0) : brute_place(live, n, head, ring, need);
      const int ok = kvc_attn_ring_place(&rg, ring, need, n > 0, &off);
      if (!zeros) assert_int_equal(ok, want >= 0);
      if (ok) {
        if (!zeros) assert_int_equal(off, (uint32_t)want);
        break;
      }
      assert_true(n > 0); /* waiting is only ever for a live unit */
      waits++;
      for (int i = 1; i < n; i++) live[i - 1] = live[i];
      if (--n > 0) kvc_attn_ring_advance(&rg, live[0].off);
    }
    assert_true(off + need <= ring);
    for (int i = 0; i < n; i++)
      assert_false(need && live[i].need && off < live[i].off + live[i].need &&
                   live[i].off < off + need);
    restarts += off == 0 && n > 0 && need > 0;
    head = off + need;
    live[n++] = (unit_t){off, need};
  }
  /* The runs must exercise both waiting and restarting at the ring's start. */
  assert_true(waits > 0);
  assert_true(restarts > 0);
}

static void fifo_ring_places_units_without_overlap(void **state) {
  (void)state;
  const int units = 2000 + (int)(18000 * kvc_test_scale());
  /* The kernels' rings: 96 KiB, units from a few hundred bytes (compressed) to 32 KiB (fp16). */
  run(1, 96 * 1024, 10, units, 16 * 1024, 0);
  run(2, 96 * 1024, 10, units, 32 * 1024, 0);
  run(3, 61 * 1024, 10, units, 12 * 1024, 0);
  run(4, 4096, 32, units, 4096, 0);         /* units as large as the ring */
  run(5, 96 * 1024, 10, units, 16 * 1024, 7); /* damaged units (0 bytes) among them */
}

/* A section's slot by itself: rows as they are; a compressed section at its lead, with its
 * granules and slack, in whole lines, at most KVC_ATTN_SLOT_EXTRA bytes more. */
static void check_slot(int rows, uint32_t src_off, uint32_t bytes, uint32_t slack) {
  const uint32_t lead = kvc_attn_ring_lead(rows, src_off);
  const uint32_t slot = kvc_attn_ring_slot(rows, bytes, lead, slack);
  const uint32_t granules = (bytes + 15u) & ~15u;
  if (rows) {
    assert_int_equal(lead, 0);
    assert_int_equal(slot, granules);
    return;
  }
  assert_int_equal(lead, src_off % 128);
  assert_int_equal(slot % 128, 0);
  assert_true(lead + granules + slack <= slot);
  assert_true(slot <= granules + slack + KVC_ATTN_SLOT_EXTRA);
}

/* Slots as the producer uses them: a unit's sections (rows of whole lines, or compressed sections
 * at 16-byte pool offsets) laid out one after another from the unit's offset, units placed in the
 * ring in order. Every compressed section's ring offset must be congruent to its pool offset mod
 * 128, and every section must lie inside its unit. */
static void ring_slots_keep_sections_congruent(void **state) {
  (void)state;
  for (uint32_t slack = 0; slack <= 16; slack += 16)
    for (uint32_t src = 0; src < 512; src += 16)
      for (uint32_t bytes = 0; bytes < 700; bytes++) {
        check_slot(0, src, bytes, slack);
        check_slot(1, src, 128 * (bytes % 5), slack);
      }
  check_slot(0, 16 * 1024 + 112, 16 * 1024, 16); /* a raw-size section at the largest lead */
  kvc_test_rng_t r;
  kvc_test_rng_seed(&r, 56);
  const uint32_t ring = 96 * 1024;
  kvc_attn_ring_t rg = {0, 0, 0};
  uint32_t live_off[8];
  int n = 0, restarts = 0;
  const int units = 2000 + (int)(18000 * kvc_test_scale());
  for (int u = 0; u < units; u++) {
    /* Up to four pages of K and V: compressed sections, or rows (one kind per unit). */
    const int rows = kvc_test_rng_below(&r, 4) == 0, nsec = 2 * (1 + kvc_test_rng_below(&r, 4));
    uint32_t src[8], bytes[8], lead[8], at[8], need = 0;
    for (int i = 0; i < nsec; i++) {
      src[i] = 16 * kvc_test_rng_below(&r, 4096);
      bytes[i] = rows ? 128 * (1 + kvc_test_rng_below(&r, 64)) : 36 + kvc_test_rng_below(&r, 8192);
      lead[i] = kvc_attn_ring_lead(rows, src[i]);
      at[i] = need + lead[i];
      need += kvc_attn_ring_slot(rows, bytes[i], lead[i], 16);
    }
    uint32_t off = 0;
    if (n == 8) {
      for (int i = 1; i < n; i++) live_off[i - 1] = live_off[i];
      if (--n > 0) kvc_attn_ring_advance(&rg, live_off[0]);
    }
    while (!kvc_attn_ring_place(&rg, ring, need, n > 0, &off)) {
      assert_true(n > 0);
      for (int i = 1; i < n; i++) live_off[i - 1] = live_off[i];
      if (--n > 0) kvc_attn_ring_advance(&rg, live_off[0]);
    }
    restarts += off == 0 && n > 0;
    assert_int_equal(off % 128, 0);
    for (int i = 0; i < nsec; i++) {
      if (!rows) assert_int_equal((off + at[i]) % 128, src[i] % 128);
      assert_true(at[i] + bytes[i] <= need);
    }
    live_off[n++] = off;
  }
  assert_true(restarts > 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(fifo_ring_places_units_without_overlap),
      cmocka_unit_test(ring_slots_keep_sections_congruent),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
