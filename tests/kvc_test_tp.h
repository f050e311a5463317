/*
 * Tensor-parallel test harness (tests/test_tp.c on the CPU backend, tests/gpu_test_tp.cu on two
 * GPUs through NCCL): every rank drives its own cache from one thread with the same random
 * serving schedule (admission with shared prompt prefixes, chunked prefill, decode, forks,
 * frees, swaps, capacity queries) and K/V of its own statistics, so that its pages compress to
 * sizes of their own. Each rank logs what it saw (every call's status, every event, the block
 * tables, the agreed capacity) for the test to compare across ranks.
 */
#ifndef KVC_TEST_TP_H
#define KVC_TEST_TP_H

#include <pthread.h>
#include <stdint.h>

#include "kvcomp.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { KVC_TEST_TP_MAX_RANKS = 4 };

/* An all-reduce over threads (a kvc_tp_allreduce_fn): one member per rank, user = its member. It
 * also counts the exchanges whose result differed from a rank's own values, i.e. where the
 * agreement overruled some rank's decision, and whether the ranks ever exchanged different
 * counts. */
typedef struct kvc_test_tp_group {
  int ranks;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int arrived, broken; /* broken: a rank waited a minute for the others and gave up */
  int64_t generation;  /* exchanges completed */
  int64_t values[KVC_TEST_TP_MAX_RANKS][2], result[2];
  int count[KVC_TEST_TP_MAX_RANKS];
  int64_t overruled_status, overruled_evictions, count_mismatches;
} kvc_test_tp_group_t;

typedef struct kvc_test_tp_member {
  kvc_test_tp_group_t *group;
  int rank;
} kvc_test_tp_member_t;

void kvc_test_tp_group_init(kvc_test_tp_group_t *g, int ranks, kvc_test_tp_member_t *members);
void kvc_test_tp_group_destroy(kvc_test_tp_group_t *g);
int kvc_test_tp_allreduce_max(void *member, int64_t *values, int count);

/* How a rank stores and attends one layer of a planned step, given host rows k, v [rows][kv heads]
 * [head_dim] and q [rows][q heads][head_dim] in fp16 (the CUDA test copies them to the device). */
typedef struct kvc_test_tp_io {
  void *user;
  kvc_status_t (*store_attend)(void *user, kvc_cache_t *c, int layer, const uint16_t *k,
                               const uint16_t *v, const uint16_t *q, int rows, int attend);
  void *stream; /* for kvc_plan and swaps */
  /* When non-zero, the rank's host allocations fail during this op's add (fault injection,
   * CPU backend only; the caller sets it up). */
  int inject_host_failure_op;
} kvc_test_tp_io_t;

/* The shape every rank's cache has (kvc_test_tp_config fills a config with it). */
enum {
  KVC_TEST_TP_LAYERS = 2,
  KVC_TEST_TP_KV_HEADS = 2, /* per rank */
  KVC_TEST_TP_Q_HEADS = 4,
  KVC_TEST_TP_MAX_SEQS = 48,
  KVC_TEST_TP_MAX_ROWS = 12 * 24, /* new tokens of one step */
  KVC_TEST_TP_MAX_OPS = 1 << 15,
  KVC_TEST_TP_MAX_EVENTS = 1 << 16,
};

/* What one rank saw. */
typedef struct kvc_test_tp_log {
  int ops;
  int32_t status[KVC_TEST_TP_MAX_OPS]; /* each call's status, in order */
  int64_t fit[KVC_TEST_TP_MAX_OPS];    /* kvc_tokens_fit_agreed's value, or -1 */
  int events;
  kvc_event_t event[KVC_TEST_TP_MAX_EVENTS];
  uint64_t tables; /* digest of every live sequence's info and block table after the run */
  int64_t oom;     /* calls that returned KVC_ERR_OUT_OF_MEMORY */
  int64_t forks, swap_outs, swap_ins, prefix_hits; /* successful ones (hits: tokens) */
  int64_t tokens;  /* tokens stored over the run */
  kvc_status_t failure; /* first unexpected status (KVC_OK if none) */
  char why[160];
} kvc_test_tp_log_t;

/* Fills *cfg (from KVC_CONFIG_INIT) with the test's shape on `backend`, a small pool and swap. */
void kvc_test_tp_config(kvc_config_t *cfg, kvc_backend_t backend, int head_dim);

/* Runs `iters` iterations of the schedule seeded by `seed` on this rank's cache `c` (created with
 * the group's allreduce), logging into *log. The same seed on every rank gives every rank the
 * same calls. Returns KVC_OK or the first status the schedule did not expect. */
kvc_status_t kvc_test_tp_run(kvc_cache_t *c, int rank, uint64_t seed, int iters,
                             const kvc_test_tp_io_t *io, kvc_test_tp_log_t *log);

/* The first difference between two ranks' logs, written to why[cap]; 0 when none. */
int kvc_test_tp_compare(const kvc_test_tp_log_t *a, const kvc_test_tp_log_t *b, char *why,
                        int cap);

#ifdef __cplusplus
}
#endif

#endif
