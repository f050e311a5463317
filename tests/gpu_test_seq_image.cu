/*
 * Moving a sequence between CUDA caches (kvc_seq_export / kvc_seq_import): on one GPU, and from
 * GPU 0 to GPU 1 (cudaMemcpyPeer, and ncclSend / ncclRecv when built with NCCL). The imported
 * sequence must attend bitwise as the original (the same pages, the same kernels) before and
 * after both decode on past a block boundary, and both caches must validate. The image is
 * compared with fp16's bytes for the same tokens. KVC_TEST_SCALE < 1 shortens the decoding after
 * the move (steps_after).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include <cmocka.h>
}
#include <cuda_runtime.h>

#include "kvc_test_util.h"
#include "kvcomp.h"
#if KVC_HAVE_NCCL
#include <nccl.h>
#endif

enum { LAYERS = 4, KV_HEADS = 8, Q_HEADS = 32, HEAD_DIM = 128, BT = 64, MAX_ROWS = 512 };
enum { ROW = KV_HEADS * HEAD_DIM, QROW = Q_HEADS * HEAD_DIM };

#define CU(x) assert_int_equal((int)(x), (int)cudaSuccess)

typedef struct dev_cache {
  int device;
  kvc_cache_t *c;
  cudaStream_t s;
  uint16_t *k, *v, *q, *out; /* device rows */
} dev_cache_t;

static void open_cache(dev_cache_t *d, int device, kvc_codec_t codec) {
  d->device = device;
  CU(cudaSetDevice(device));
  kvc_config_t cfg = KVC_CONFIG_INIT;
  cfg.backend = KVC_BACKEND_CUDA;
  cfg.device = device;
  cfg.num_layers = LAYERS;
  cfg.num_q_heads = Q_HEADS;
  cfg.num_kv_heads = KV_HEADS;
  cfg.head_dim = HEAD_DIM;
  cfg.block_tokens = BT;
  cfg.pool_bytes = (size_t)256 << 20;
  cfg.max_seqs = 8;
  cfg.max_seq_len = 8192;
  cfg.max_batch_tokens = MAX_ROWS;
  cfg.codec = codec;
  assert_int_equal(kvc_cache_create(&cfg, &d->c), KVC_OK);
  CU(cudaStreamCreate(&d->s));
  CU(cudaMalloc(&d->k, (size_t)MAX_ROWS * ROW * 2));
  CU(cudaMalloc(&d->v, (size_t)MAX_ROWS * ROW * 2));
  CU(cudaMalloc(&d->q, (size_t)MAX_ROWS * QROW * 2));
  CU(cudaMalloc(&d->out, (size_t)MAX_ROWS * QROW * 2));
}

static void close_cache(dev_cache_t *d) {
  CU(cudaSetDevice(d->device));
  CU(cudaStreamSynchronize(d->s));
  kvc_cache_destroy(d->c);
  cudaFree(d->k);
  cudaFree(d->v);
  cudaFree(d->q);
  cudaFree(d->out);
  cudaStreamDestroy(d->s);
}

/* One step of n new tokens of sequence 1 on each cache (the same K/V and queries), attending in
 * every layer; host[i] gets cache i's last layer outputs. */
static void step_all(dev_cache_t **ds, int nd, int n, uint64_t seed, uint16_t **host) {
  static uint16_t k[MAX_ROWS * ROW], v[MAX_ROWS * ROW], q[MAX_ROWS * QROW];
  kvc_seq_id_t id = 1;
  int32_t nn = n;
  kvc_batch_t b = {1, &id, &nn, NULL};
  for (int i = 0; i < nd; i++) {
    assert_int_equal(kvc_seq_reserve(ds[i]->c, id, n, 0), KVC_OK);
    assert_int_equal(kvc_plan(ds[i]->c, &b, ds[i]->s), KVC_OK);
  }
  for (int l = 0; l < LAYERS; l++) {
    kvc_test_rng_t r;
    kvc_test_rng_seed(&r, seed * 977 + (uint64_t)l);
    for (int j = 0; j < n * ROW; j++) k[j] = kvc_test_f32_to_f16((float)kvc_test_rng_normal(&r));
    for (int j = 0; j < n * ROW; j++) v[j] = kvc_test_f32_to_f16((float)kvc_test_rng_normal(&r));
    for (int j = 0; j < n * QROW; j++) q[j] = kvc_test_f32_to_f16((float)kvc_test_rng_normal(&r));
    for (int i = 0; i < nd; i++) {
      dev_cache_t *d = ds[i];
      CU(cudaSetDevice(d->device));
      CU(cudaMemcpy(d->k, k, (size_t)n * ROW * 2, cudaMemcpyHostToDevice));
      CU(cudaMemcpy(d->v, v, (size_t)n * ROW * 2, cudaMemcpyHostToDevice));
      CU(cudaMemcpy(d->q, q, (size_t)n * QROW * 2, cudaMemcpyHostToDevice));
      assert_int_equal(kvc_store(d->c, l, d->k, d->v, d->s), KVC_OK);
      assert_int_equal(kvc_attend(d->c, l, d->q, d->out, 0.088f, d->s), KVC_OK);
      if (l == LAYERS - 1) {
        CU(cudaMemcpyAsync(host[i], d->out, (size_t)n * QROW * 2, cudaMemcpyDeviceToHost, d->s));
        CU(cudaStreamSynchronize(d->s));
      }
    }
  }
}

static uint16_t *g_out[2];

/* Steps decoded after the move (the first of 5 tokens, then 1 each): BT + 2, or with
 * KVC_TEST_SCALE < 1 (compute-sanitizer runs) as few as still take both sequences past the next
 * block boundary, where the tail block is compressed. */
static int steps_after(int len) {
  /* A tail of r tokens needs BT - r + 1 more to pass the next boundary; the first step brings 5. */
  const int r = len % BT, need = r ? BT - r + 1 : 0;
  const int cross = 2 + (need > 5 ? need - 5 : 0);
  int steps = (int)((BT + 2) * kvc_test_scale() + 0.999);
  if (steps < cross) steps = cross;
  return steps < BT + 2 ? steps : BT + 2;
}

/* Moves sequence 1 (len tokens) from a to b with `transfer`, then compares them decoding on. */
typedef void (*transfer_fn)(void *dst, int dst_dev, const void *src, int src_dev, size_t bytes);

static void check_move(dev_cache_t *a, dev_cache_t *b, int len, transfer_fn transfer,
                       const char *how) {
  CU(cudaSetDevice(a->device));
  assert_int_equal(kvc_seq_add(a->c, 1, NULL, 0, 0, NULL), KVC_OK);
  for (int at = 0; at < len; at += MAX_ROWS)
    step_all(&a, 1, len - at < MAX_ROWS ? len - at : MAX_ROWS, 5 + (uint64_t)at, g_out);
  size_t bytes = 0;
  assert_int_equal(kvc_seq_export_bytes(a->c, 1, &bytes, a->s), KVC_OK);
  void *img_a = NULL, *img_b = NULL;
  CU(cudaMalloc(&img_a, bytes));
  assert_int_equal(kvc_seq_export(a->c, 1, img_a, bytes, a->s), KVC_OK);
  CU(cudaStreamSynchronize(a->s));
  CU(cudaSetDevice(b->device));
  CU(cudaMalloc(&img_b, bytes));
  transfer(img_b, b->device, img_a, a->device, bytes);
  /* An image whose first extent's first page header disagrees with its index is refused. */
  const size_t blocks = (size_t)(len + BT - 1) / BT;
  const size_t extents = 64 + ((blocks * LAYERS * 8 + 15) & ~(size_t)15);
  uint8_t byte = 0;
  CU(cudaMemcpy(&byte, (uint8_t *)img_b + extents, 1, cudaMemcpyDeviceToHost));
  CU(cudaMemset((uint8_t *)img_b + extents, byte ^ 0x20, 1));
  assert_int_equal(kvc_seq_import(b->c, 1, img_b, bytes, b->s), KVC_ERR_CORRUPT);
  CU(cudaMemset((uint8_t *)img_b + extents, byte, 1));
  assert_int_equal(kvc_seq_import(b->c, 1, img_b, bytes, b->s), KVC_OK);
  const double fp16 = (double)len * LAYERS * 2 * ROW * 2;
  print_message("%s: %d tokens, image %zu bytes (%.2fx fewer than fp16's)\n", how, len, bytes,
                fp16 / (double)bytes);
  dev_cache_t *ds[2] = {a, b};
  const int steps = steps_after(len);
  for (int s = 0; s < steps; s++) {
    const int n = s == 0 ? 5 : 1;
    step_all(ds, 2, n, 1000 + (uint64_t)s, g_out);
    assert_memory_equal(g_out[0], g_out[1], (size_t)n * QROW * 2);
  }
  assert_int_equal(kvc_cache_validate(a->c), KVC_OK);
  assert_int_equal(kvc_cache_validate(b->c), KVC_OK);
  assert_int_equal(kvc_seq_free(a->c, 1), KVC_OK);
  assert_int_equal(kvc_seq_free(b->c, 1), KVC_OK);
  CU(cudaSetDevice(a->device));
  CU(cudaFree(img_a));
  CU(cudaSetDevice(b->device));
  CU(cudaFree(img_b));
}

static void copy_peer(void *dst, int dst_dev, const void *src, int src_dev, size_t bytes) {
  CU(cudaMemcpyPeer(dst, dst_dev, src, src_dev, bytes));
}

static void one_gpu(void **state) {
  (void)state;
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 1) skip(); /* as the other GPU tests */
  const kvc_codec_t codecs[] = {KVC_CODEC_HUFFMAN, KVC_CODEC_BITPACK, KVC_CODEC_RAW};
  for (int i = 0; i < 3; i++) {
    dev_cache_t a, b;
    open_cache(&a, 0, codecs[i]);
    open_cache(&b, 0, codecs[i]);
    check_move(&a, &b, 1000, copy_peer, "one GPU");
    check_move(&a, &b, 3 * BT, copy_peer, "one GPU, no tail");
    close_cache(&a);
    close_cache(&b);
  }
}

#if KVC_HAVE_NCCL
static ncclComm_t g_comm[2];
static void copy_nccl(void *dst, int dst_dev, const void *src, int src_dev, size_t bytes) {
  /* One thread drives both ranks: the send and the receive in one group. */
  assert_int_equal(ncclGroupStart(), ncclSuccess);
  CU(cudaSetDevice(src_dev));
  assert_int_equal(ncclSend(src, bytes, ncclUint8, 1, g_comm[0], 0), ncclSuccess);
  CU(cudaSetDevice(dst_dev));
  assert_int_equal(ncclRecv(dst, bytes, ncclUint8, 0, g_comm[1], 0), ncclSuccess);
  assert_int_equal(ncclGroupEnd(), ncclSuccess);
  CU(cudaSetDevice(src_dev));
  CU(cudaDeviceSynchronize());
  CU(cudaSetDevice(dst_dev));
  CU(cudaDeviceSynchronize());
}
#endif

static void two_gpus(void **state) {
  (void)state;
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 2) {
    print_message("needs two GPUs (found %d)\n", ndev);
    skip();
  }
  dev_cache_t a, b;
  open_cache(&a, 0, KVC_CODEC_HUFFMAN);
  open_cache(&b, 1, KVC_CODEC_HUFFMAN);
  check_move(&a, &b, 2000, copy_peer, "GPU 0 to GPU 1, cudaMemcpyPeer");
#if KVC_HAVE_NCCL
  int devs[2] = {0, 1};
  assert_int_equal(ncclCommInitAll(g_comm, 2, devs), ncclSuccess);
  check_move(&a, &b, 2000, copy_nccl, "GPU 0 to GPU 1, ncclSend / ncclRecv");
  ncclCommDestroy(g_comm[0]);
  ncclCommDestroy(g_comm[1]);
#endif
  close_cache(&a);
  close_cache(&b);
}

int main(void) {
  g_out[0] = (uint16_t *)malloc((size_t)MAX_ROWS * QROW * 2);
  g_out[1] = (uint16_t *)malloc((size_t)MAX_ROWS * QROW * 2);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(one_gpu),
      cmocka_unit_test(two_gpus),
  };
  const int rc = cmocka_run_group_tests(tests, NULL, NULL);
  free(g_out[0]);
  free(g_out[1]);
  return rc;
}
