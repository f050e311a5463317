/* First-fit allocator of the host swap region (kvc_swap_space.h). */
#include "scheduler_hooks/kvc_swap_space.h"

#include <stdio.h>
#include <string.h>

kvc_status_t kvc__swap_space_init(kvc__swap_space_t *s, kvc_host_alloc_t *ha, uint64_t capacity,
                                  int64_t max_extents) {
  memset(s, 0, sizeof(*s));
  s->capacity = capacity / KVC__SWAP_ALIGN * KVC__SWAP_ALIGN;
  s->max_extents = max_extents;
  if (s->capacity == 0 || max_extents <= 0) return KVC_OK;
  s->free_off = kvc_host_malloc(ha, (size_t)(max_extents + 1) * sizeof(uint64_t));
  s->free_len = kvc_host_malloc(ha, (size_t)(max_extents + 1) * sizeof(uint64_t));
  if (!s->free_off || !s->free_len) {
    kvc__swap_space_release(s, ha);
    return KVC_ERR_OUT_OF_HOST_MEMORY;
  }
  s->free_off[0] = 0;
  s->free_len[0] = s->capacity;
  s->nfree = 1;
  return KVC_OK;
}

void kvc__swap_space_release(kvc__swap_space_t *s, kvc_host_alloc_t *ha) {
  kvc_host_free(ha, s->free_off);
  kvc_host_free(ha, s->free_len);
  memset(s, 0, sizeof(*s));
}

int kvc__swap_space_alloc(kvc__swap_space_t *s, uint64_t bytes, uint64_t *off) {
  uint64_t need = kvc__swap_space_round(bytes);
  if (need == 0 || s->extents >= s->max_extents) return -1;
  for (int64_t i = 0; i < s->nfree; i++) {
    if (s->free_len[i] < need) continue;
    *off = s->free_off[i];
    s->free_off[i] += need;
    s->free_len[i] -= need;
    if (s->free_len[i] == 0) {
      memmove(s->free_off + i, s->free_off + i + 1, (size_t)(s->nfree - i - 1) * sizeof(uint64_t));
      memmove(s->free_len + i, s->free_len + i + 1, (size_t)(s->nfree - i - 1) * sizeof(uint64_t));
      s->nfree--;
    }
    s->used += need;
    s->extents++;
    return 0;
  }
  return -1;
}

void kvc__swap_space_free(kvc__swap_space_t *s, uint64_t off, uint64_t bytes) {
  uint64_t len = kvc__swap_space_round(bytes);
  /* First free extent after `off`. */
  int64_t lo = 0, hi = s->nfree;
  while (lo < hi) {
    int64_t mid = (lo + hi) / 2;
    if (s->free_off[mid] < off)
      lo = mid + 1;
    else
      hi = mid;
  }
  int merge_prev = lo > 0 && s->free_off[lo - 1] + s->free_len[lo - 1] == off;
  int merge_next = lo < s->nfree && off + len == s->free_off[lo];
  if (merge_prev && merge_next) {
    s->free_len[lo - 1] += len + s->free_len[lo];
    memmove(s->free_off + lo, s->free_off + lo + 1, (size_t)(s->nfree - lo - 1) * sizeof(uint64_t));
    memmove(s->free_len + lo, s->free_len + lo + 1, (size_t)(s->nfree - lo - 1) * sizeof(uint64_t));
    s->nfree--;
  } else if (merge_prev) {
    s->free_len[lo - 1] += len;
  } else if (merge_next) {
    s->free_off[lo] = off;
    s->free_len[lo] += len;
  } else {
    /* A new entry: at most extents + 1 free entries exist, and extents is about to drop. */
    memmove(s->free_off + lo + 1, s->free_off + lo, (size_t)(s->nfree - lo) * sizeof(uint64_t));
    memmove(s->free_len + lo + 1, s->free_len + lo, (size_t)(s->nfree - lo) * sizeof(uint64_t));
    s->free_off[lo] = off;
    s->free_len[lo] = len;
    s->nfree++;
  }
  s->used -= len;
  s->extents--;
}

kvc_status_t kvc__swap_space_check(const kvc__swap_space_t *s, char *why, size_t cap) {
  uint64_t free_total = 0;
  for (int64_t i = 0; i < s->nfree; i++) {
    if (s->free_len[i] == 0 || s->free_off[i] % KVC__SWAP_ALIGN ||
        s->free_len[i] % KVC__SWAP_ALIGN || s->free_off[i] + s->free_len[i] > s->capacity) {
      snprintf(why, cap, "swap free extent %lld [%llu, +%llu) malformed", (long long)i,
               (unsigned long long)s->free_off[i], (unsigned long long)s->free_len[i]);
      return KVC_ERR_INTERNAL;
    }
    if (i > 0 && s->free_off[i - 1] + s->free_len[i - 1] >= s->free_off[i]) {
      snprintf(why, cap, "swap free extents %lld and %lld overlap or touch", (long long)i - 1,
               (long long)i);
      return KVC_ERR_INTERNAL;
    }
    free_total += s->free_len[i];
  }
  if (free_total + s->used != s->capacity || s->nfree > s->extents + 1 ||
      s->extents > s->max_extents) {
    snprintf(why, cap,
             "swap space: free %llu + used %llu != %llu, or %lld free entries for %lld "
             "extents",
             (unsigned long long)free_total, (unsigned long long)s->used,
             (unsigned long long)s->capacity, (long long)s->nfree, (long long)s->extents);
    return KVC_ERR_INTERNAL;
  }
  return KVC_OK;
}
