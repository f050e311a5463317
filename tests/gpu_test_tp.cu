/*
 * Tensor parallelism on GPUs through NCCL: one rank per GPU (two or more; skipped with fewer),
 * each with its own CUDA cache over its share of the kv heads and K/V of its own statistics, run
 * tests/test_tp.c's serving schedule with the agreement of include/kvcomp_nccl.h. Every call must
 * return the same status on every rank, the events and block tables must be the same, every cache
 * must validate, and the agreement must have overruled ranks' own decisions.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

extern "C" {
#include <cmocka.h>
}
#include <cuda_runtime.h>

#include "kvc_test_tp.h"
#include "kvc_test_util.h"
#include "kvcomp.h"
#if KVC_HAVE_NCCL
#include "kvcomp_nccl.h"
#endif

enum { HEAD_DIM = 64, MAX_ROWS = KVC_TEST_TP_MAX_ROWS };

#if KVC_HAVE_NCCL
typedef struct gpu_io {
  cudaStream_t stream;
  void *k, *v, *q, *out;
} gpu_io_t;

static kvc_status_t gpu_store_attend(void *user, kvc_cache_t *c, int layer, const uint16_t *k,
                                     const uint16_t *v, const uint16_t *q, int rows, int attend) {
  gpu_io_t *g = (gpu_io_t *)user;
  const size_t kv = (size_t)rows * KVC_TEST_TP_KV_HEADS * HEAD_DIM * 2;
  const size_t qb = (size_t)rows * KVC_TEST_TP_Q_HEADS * HEAD_DIM * 2;
  /* The host rows are rewritten for the next layer: copy them before returning. */
  if (cudaMemcpyAsync(g->k, k, kv, cudaMemcpyHostToDevice, g->stream) != cudaSuccess ||
      cudaMemcpyAsync(g->v, v, kv, cudaMemcpyHostToDevice, g->stream) != cudaSuccess ||
      cudaMemcpyAsync(g->q, q, qb, cudaMemcpyHostToDevice, g->stream) != cudaSuccess ||
      cudaStreamSynchronize(g->stream) != cudaSuccess)
    return KVC_ERR_CUDA;
  kvc_status_t st = kvc_store(c, layer, g->k, g->v, g->stream);
  if (st == KVC_OK && attend) st = kvc_attend(c, layer, g->q, g->out, 0.125f, g->stream);
  return st;
}

typedef struct rank_job {
  int rank, iters;
  uint64_t seed;
  ncclComm_t comm;
  kvc_test_tp_log_t *log;
  kvc_status_t create, run;
  kvc_nccl_tp_t *tp;
  int64_t exchanges, overruled; /* agreements, and those whose result was not this rank's own */
  double agree_seconds;         /* host time inside them */
} rank_job_t;

/* kvc_nccl_tp_allreduce_max, counting the agreements that overruled this rank. */
static int counting_allreduce(void *user, int64_t *values, int count) {
  rank_job_t *j = (rank_job_t *)user;
  int64_t own[2] = {values[0], count > 1 ? values[1] : 0};
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  const int rc = kvc_nccl_tp_allreduce_max(j->tp, values, count);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  j->agree_seconds += (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
  j->exchanges++;
  if (rc == 0 && (values[0] != own[0] || (count > 1 && values[1] != own[1]))) j->overruled++;
  return rc;
}

static void *rank_main(void *arg) {
  rank_job_t *j = (rank_job_t *)arg;
  j->create = KVC_ERR_CUDA;
  if (cudaSetDevice(j->rank) != cudaSuccess) return NULL;
  j->create = kvc_nccl_tp_create(j->comm, &j->tp);
  if (j->create != KVC_OK) return NULL;
  kvc_config_t cfg;
  kvc_test_tp_config(&cfg, KVC_BACKEND_CUDA, HEAD_DIM);
  cfg.device = j->rank;
  cfg.tp_allreduce_max = counting_allreduce;
  cfg.tp_user = j;
  kvc_cache_t *c = NULL;
  j->create = kvc_cache_create(&cfg, &c);
  gpu_io_t g = {};
  const size_t kv = (size_t)MAX_ROWS * KVC_TEST_TP_KV_HEADS * HEAD_DIM * 2;
  const size_t qb = (size_t)MAX_ROWS * KVC_TEST_TP_Q_HEADS * HEAD_DIM * 2;
  if (j->create == KVC_OK &&
      (cudaStreamCreate(&g.stream) != cudaSuccess || cudaMalloc(&g.k, kv) != cudaSuccess ||
       cudaMalloc(&g.v, kv) != cudaSuccess || cudaMalloc(&g.q, qb) != cudaSuccess ||
       cudaMalloc(&g.out, qb) != cudaSuccess))
    j->create = KVC_ERR_CUDA;
  if (j->create == KVC_OK) {
    kvc_test_tp_io_t io = {&g, gpu_store_attend, (void *)g.stream, 0};
    j->run = kvc_test_tp_run(c, j->rank, j->seed, j->iters, &io, j->log);
  }
  kvc_cache_destroy(c);
  cudaFree(g.k);
  cudaFree(g.v);
  cudaFree(g.q);
  cudaFree(g.out);
  if (g.stream) cudaStreamDestroy(g.stream);
  kvc_nccl_tp_destroy(j->tp);
  return NULL;
}
#endif

static void ranks_agree_over_nccl(void **state) {
  (void)state;
#if !KVC_HAVE_NCCL
  print_message("built without NCCL\n");
  skip();
#else
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 2) {
    print_message("needs two GPUs (found %d)\n", ndev);
    skip();
  }
  const int ranks = ndev < KVC_TEST_TP_MAX_RANKS ? ndev : KVC_TEST_TP_MAX_RANKS;
  int devs[KVC_TEST_TP_MAX_RANKS];
  for (int r = 0; r < ranks; r++) devs[r] = r;
  const int iters = (int)(450 * kvc_test_scale()) + 50;
  int64_t oom = 0, overruled = 0;
  for (uint64_t seed = 1; seed <= 2; seed++) {
    ncclComm_t comms[KVC_TEST_TP_MAX_RANKS];
    assert_int_equal(ncclCommInitAll(comms, ranks, devs), ncclSuccess);
    kvc_test_tp_log_t *logs[KVC_TEST_TP_MAX_RANKS];
    rank_job_t jobs[KVC_TEST_TP_MAX_RANKS];
    pthread_t th[KVC_TEST_TP_MAX_RANKS];
    for (int r = 0; r < ranks; r++) {
      logs[r] = (kvc_test_tp_log_t *)calloc(1, sizeof(kvc_test_tp_log_t));
      jobs[r] = rank_job_t{r, iters, seed, comms[r], logs[r], KVC_OK, KVC_OK, NULL, 0, 0, 0.0};
      assert_int_equal(pthread_create(&th[r], NULL, rank_main, &jobs[r]), 0);
    }
    for (int r = 0; r < ranks; r++) pthread_join(th[r], NULL);
    for (int r = 0; r < ranks; r++) {
      assert_int_equal(jobs[r].create, KVC_OK);
      if (jobs[r].run != KVC_OK) fail_msg("%s", logs[r]->why);
    }
    char why[200];
    for (int r = 1; r < ranks; r++)
      if (kvc_test_tp_compare(logs[0], logs[r], why, sizeof(why)))
        fail_msg("seed %llu, rank 0 against rank %d: %s", (unsigned long long)seed, r, why);
    const kvc_test_tp_log_t *l = logs[0];
    int64_t overruled_here = 0;
    for (int r = 0; r < ranks; r++) overruled_here += jobs[r].overruled;
    print_message("seed %llu, %d ranks: %d calls, %lld agreements (%.1f us each on rank 0, "
                  "host time), %lld rank decisions overruled, %lld out of memory, %lld tokens "
                  "stored, %lld prefix-hit tokens, %lld forks, %lld swap-outs, %lld swap-ins\n",
                  (unsigned long long)seed, ranks, l->ops, (long long)jobs[0].exchanges,
                  1e6 * jobs[0].agree_seconds / (double)(jobs[0].exchanges ? jobs[0].exchanges : 1),
                  (long long)overruled_here, (long long)l->oom, (long long)l->tokens,
                  (long long)l->prefix_hits, (long long)l->forks, (long long)l->swap_outs,
                  (long long)l->swap_ins);
    assert_true(l->tokens > 1000 && l->swap_outs > 0 && l->swap_ins > 0);
    oom += l->oom;
    overruled += overruled_here;
    for (int r = 0; r < ranks; r++) {
      ncclCommDestroy(comms[r]);
      free(logs[r]);
    }
  }
  assert_true(oom > 0 && overruled > 0);
#endif
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(ranks_agree_over_nccl),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
