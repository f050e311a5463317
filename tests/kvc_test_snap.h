/* What a caller can observe of a cache, recorded before a call that must fail and compared after
 * it: "a failed call leaves the cache as it was" (test_cache_api, fuzz_cache). */
#ifndef KVC_TEST_SNAP_H
#define KVC_TEST_SNAP_H

#include "kvcomp.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVC_TEST_SNAP_IDS 8 /* the sequences recorded: ids 1..8 */

typedef struct kvc_test_snap {
  kvc_stats_t stats;
  kvc_status_t info_status[KVC_TEST_SNAP_IDS];
  kvc_seq_info_t info[KVC_TEST_SNAP_IDS];
  int events;
  int64_t fit;
} kvc_test_snap_t;

/* Validates the cache (which also brings every page size in), then records its statistics, the
 * info of sequences 1..8, kvc_tokens_fit, and drains the event queue (counting the events).
 * Returns the first failing call's status, KVC_OK when all passed. */
kvc_status_t kvc_test_snap_take(kvc_cache_t *c, kvc_test_snap_t *s);

/* Compares `after` with `before`: NULL when equal, else a static string naming what changed
 * ("statistics", "sequence info", "events", "tokens_fit"). `events` in `after` counts what was
 * emitted since `before` (which drained the queue). With infos_only, compares the sequences' info
 * alone. */
const char *kvc_test_snap_diff(const kvc_test_snap_t *before, const kvc_test_snap_t *after,
                               int infos_only);

#ifdef __cplusplus
}
#endif

#endif
