#include "kvc_test_snap.h"

#include <string.h>

kvc_status_t kvc_test_snap_take(kvc_cache_t *c, kvc_test_snap_t *s) {
  memset(s, 0, sizeof(*s));
  kvc_status_t st = kvc_cache_validate(c);
  if (st != KVC_OK) return st;
  s->stats.struct_size = sizeof(s->stats);
  if ((st = kvc_get_stats(c, &s->stats)) != KVC_OK) return st;
  for (int i = 0; i < KVC_TEST_SNAP_IDS; i++)
    s->info_status[i] = kvc_seq_info(c, (kvc_seq_id_t)i + 1, &s->info[i]);
  kvc_event_t ev[64];
  int n = 0;
  do {
    if ((st = kvc_poll_events(c, ev, 64, &n, NULL)) != KVC_OK) return st;
    s->events += n;
  } while (n == 64);
  return kvc_tokens_fit(c, &s->fit);
}

const char *kvc_test_snap_diff(const kvc_test_snap_t *before, const kvc_test_snap_t *after,
                               int infos_only) {
  for (int i = 0; i < KVC_TEST_SNAP_IDS; i++)
    if (before->info_status[i] != after->info_status[i] ||
        memcmp(&before->info[i], &after->info[i], sizeof(after->info[i])) != 0)
      return "sequence info";
  if (infos_only) return NULL;
  if (memcmp(&before->stats, &after->stats, sizeof(after->stats)) != 0) return "statistics";
  if (after->events != 0) return "events";
  if (before->fit != after->fit) return "tokens_fit";
  return NULL;
}
