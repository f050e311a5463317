/*
 * The cache object behind kvcomp.h, shared by the files of scheduler_hooks/:
 *   kvc_cache.c         create/destroy, configuration, the per-request hooks, plan/store/attend,
 *                       the deferred compression of the blocks a step completes, page-size
 *                       collection, the device work the block manager asks for
 *   kvc_cache_stats.c   stats, Prometheus text, events, validation, test accessors
 *   kvc_swap_space.c    the allocator of the host swap region
 *   kvc_backend_cpu.c   the CPU backend (pool in host memory)
 *   kvc_backend_cuda.cu the CUDA backend (pool in device memory), only in CUDA builds
 *
 * Division of labour. The block manager (allocator/kvc_blocks.h) decides everything about blocks
 * and capacity and hands back device work. This layer keeps a host mirror of every page directory
 * entry (kind, size once measured, codec, swapped out or not), turns the block manager's work
 * into backend calls, and feeds measured page sizes back. A backend (kvc_backend.h) owns the pool,
 * the page directories, the free stack of chunks and everything that touches page bytes.
 *
 * Locking: every public entry point takes `mu` for its whole duration, so a cache is used by one
 * call at a time; the stats calls take it too, which is what makes them safe from any thread.
 */
#ifndef KVC_CACHE_INTERNAL_H
#define KVC_CACHE_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "allocator/kvc_blocks.h"
#include "allocator/kvc_host_alloc.h"
#include "allocator/kvc_pool_layout.h"
#include "compress/kvc_codec.h"
#include "kvcomp.h"
#include "scheduler_hooks/kvc_swap_space.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvc__backend_ops kvc__backend_ops_t;

/* Capacity of the event queue (kvcomp.h: the newest 65536 events are kept). */
#define KVC__EVENT_CAP 65536
/* Steps whose page sizes may be in flight from the device at once; a plan waits for the oldest
 * only when the device is this many steps behind. */
#define KVC__SIZE_SLOTS 4
/* Bytes of the header a swapped-out page keeps in swap memory: the first 8 bytes of its
 * kvc_page_entry_t (nbytes, kind, nchunks, codec). A block's extent is
 *   [round16(num_layers * 8) header bytes][page 0 bytes, padded to 16][page 1 ...]... */
#define KVC__SWAP_HDR_BYTES 8u

static inline uint64_t kvc__round16(uint64_t x) { return (x + 15u) & ~(uint64_t)15u; }

/* Host mirror of one page directory entry. */
typedef struct kvc__page_meta {
  uint32_t nbytes;  /* staging: the staging size; compressed: its size once measured, else 0 */
  uint8_t kind;     /* kvc_page_kind_t of the page (also while it is swapped out) */
  uint8_t codec;    /* kvc_codec_t of a measured compressed page */
  uint8_t measured; /* a compressed page whose size (and codec) the host knows */
  uint8_t swapped;  /* the page is in host swap memory; the directory entry is EMPTY */
  uint8_t chunks;   /* a measured compressed page: the chunks it took (packed: fewer) */
} kvc__page_meta_t;

/* Derived sizes, fixed at creation. */
typedef struct kvc__geometry {
  uint32_t chunk_bytes;
  uint32_t total_chunks;
  int32_t max_blocks;
  uint32_t staging_bytes; /* one staging page (one layer) */
  uint32_t staging_chunks;
  uint32_t max_page_bytes; /* the largest page any codec writes */
  uint32_t worst_page_chunks;
  uint32_t row_bytes; /* head_dim * element size */
  uint32_t elem_bytes;
  int max_plan_seqs;         /* min(max_seqs, max_batch_tokens) */
  int max_rows;              /* max_batch_tokens */
  int max_jobs;              /* blocks one step can complete */
  int64_t max_table_entries; /* block ids in one plan's CSR tables */
  int32_t max_seq_blocks;    /* blocks one sequence can hold */
} kvc__geometry_t;

/* One step's page sizes on their way to the host. */
typedef struct kvc__size_slot {
  uint64_t step;
  int num_jobs;
  int32_t *job_block; /* [max_jobs] host copy: block of each job */
} kvc__size_slot_t;

/* Live sequence ids (running and swapped), for validation: a dense array plus an open-addressing
 * index. Sized for max_seqs at creation; the block manager admits no more. */
typedef struct kvc__seq_set {
  kvc_seq_id_t *ids; /* [max_seqs] */
  int32_t *index;    /* [mask + 1] position in ids, -1 empty */
  uint32_t mask;
  int n;
} kvc__seq_set_t;

struct kvc_cache {
  kvc_config_t cfg;
  kvc_codec_params_t codec;
  kvc__geometry_t geo;
  uint64_t codec_identity;

  kvc_host_alloc_t *ha;
  kvc_bm_t *bm;
  pthread_mutex_t mu;
  /* Set when device work failed after the block manager had committed: the pool and the block
   * manager may disagree, so every later call returns this status. */
  kvc_status_t sticky;

  const kvc__backend_ops_t *ops;
  void *be;          /* backend state */
  void *last_stream; /* stream of the cache's most recent device work */

  /* Host mirror of the directories. */
  kvc__page_meta_t *meta; /* [num_layers][max_blocks] */
  int64_t staging_pages;  /* in the pool */
  int64_t measured_pages; /* compressed, measured, in the pool */
  uint64_t measured_bytes;
  uint64_t measured_chunks;
  int64_t pages_by_codec[3];

  /* The step. */
  uint64_t step;         /* the block manager's number of the last planned step (0: none) */
  int plan_valid;        /* attend may run for the layers stored in step `step` */
  int step_fetched;      /* step `step`'s page sizes were handed to a size slot */
  kvc_bm_plan_t plan;    /* arrays owned by the block manager (valid until its next plan) */
  uint8_t *layer_stored; /* [num_layers] */
  int layers_stored;
  int32_t *step_job_block; /* [max_jobs] this step's job blocks (the plan's copy) */
  int step_num_jobs;
  uint64_t *pending_step; /* [max_blocks] step whose pages of the block are unmeasured, 0 */
  /* Deferred compression (kvc_cache.c): layer_deferred[l] says that layer l's pages of this
   * step's jobs are still full staging pages, to be compressed by compress_deferred. */
  uint8_t *layer_deferred; /* [num_layers] */
  int layers_deferred;

  kvc__size_slot_t slots[KVC__SIZE_SLOTS];
  int slot_first, slot_count; /* ring of slots in flight, oldest first */

  /* Swap. */
  kvc__swap_space_t swap;
  uint64_t *swap_off;      /* [max_blocks] extent of a swapped-out block, UINT64_MAX: none */
  uint64_t *swap_len;      /* [max_blocks] */
  int32_t *swap_table;     /* [max_seq_blocks] the table of the sequence being swapped out */
  uint64_t *swap_work_off; /* [max_seq_blocks] extent offsets in the swap work's block order */
  uint8_t *block_mark;     /* [max_blocks] scratch flags, all 0 between calls */

  kvc__seq_set_t live;

  /* Events. */
  kvc_event_t *events; /* [KVC__EVENT_CAP] ring */
  int ev_first, ev_count;
  int64_t ev_dropped;
};

/* Logs through cfg.log_fn (or stderr) when level <= cfg.log_level. */
void kvc__log(const kvc_cache_t *c, kvc_log_level_t level, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Whether layer `layer` of block `b` is a full block of the last step whose compression is
 * deferred: its page is a staging page holding all block_tokens rows. */
static inline int kvc__compress_pending(const kvc_cache_t *c, int layer, int32_t b) {
  return c->layer_deferred[layer] && c->pending_step[b] == c->step;
}

/* Staging (and swap) extent size of block `b`, from the mirror. */
uint64_t kvc__swap_extent_bytes(const kvc_cache_t *c, int32_t b);

/* Waits for the backend, then reports every page size in flight to the block manager. */
kvc_status_t kvc__collect_all(kvc_cache_t *c);
/* Makes every page of sequence `id` measured: compresses its blocks whose compression is
 * deferred (unless a step is open), then kvc__collect_all (a host wait). Changes only how its
 * full blocks are encoded and what the host knows of their sizes. */
kvc_status_t kvc__measure_seq(kvc_cache_t *c, kvc_seq_id_t id, void *stream);

/* The cache's lock (kvcomp.h, "Threading"), taken by every public call. */
kvc_cache_t *kvc__lock(const kvc_cache_t *c);
void kvc__unlock(kvc_cache_t *c);
/* Runs the block manager's work (kvc_cache.c). */
kvc_status_t kvc__run_work(kvc_cache_t *c, const kvc_bm_work_t *w, int swap_dir, const void *mem,
                           void *stream);
/* Sets the host mirror of one page, keeping the page counters in step. */
void kvc__meta_set(kvc_cache_t *c, int layer, int32_t block, kvc_page_kind_t kind,
                   uint32_t nbytes, uint8_t codec, uint8_t chunks, int measured);
/* Adds `id` to the set of live sequences (sized max_seqs, so it cannot fail for an id the block
 * manager accepted); non-zero when it is there already. */
int kvc__live_add(kvc_cache_t *c, kvc_seq_id_t id);
/* The status of a call that may have agreed with the other tensor-parallel ranks: a failed
 * agreement (KVC_ERR_NCCL) makes the cache unusable. */
kvc_status_t kvc__tp_status(kvc_cache_t *c, kvc_status_t st);

/* Validation pieces (kvc_cache_stats.c). */
kvc_status_t kvc__validate_locked(kvc_cache_t *c);

/* Statuses: records a device failure as sticky and returns it. */
kvc_status_t kvc__fail_device(kvc_cache_t *c, kvc_status_t st, const char *what);

#ifdef __cplusplus
}
#endif

#endif /* KVC_CACHE_INTERNAL_H */
