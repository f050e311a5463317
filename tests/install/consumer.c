/* Uses the installed library as a serving engine would: a CPU cache, one sequence, its capacity.
 * Prints "consumer: ok" and exits 0, or says which call failed. */
#include <kvcomp.h>
#if KVC_NCCL_HEADER
#include <kvcomp_nccl.h>
#endif
#include <stdio.h>

int main(void) {
  kvc_config_t cfg = KVC_CONFIG_INIT;
  cfg.backend = KVC_BACKEND_CPU;
  cfg.num_layers = 2;
  cfg.num_q_heads = 4;
  cfg.num_kv_heads = 2;
  cfg.head_dim = 64;
  cfg.pool_bytes = (size_t)8 << 20;
  kvc_cache_t *cache = NULL;
  kvc_status_t st = kvc_cache_create(&cfg, &cache);
  if (st != KVC_OK) {
    fprintf(stderr, "consumer: kvc_cache_create: %s\n", kvc_status_string(st));
    return 1;
  }
  const int32_t prompt[5] = {1, 2, 3, 4, 5};
  int cached = -1;
  int64_t fit = 0;
  if ((st = kvc_seq_add(cache, 7, prompt, 5, 0, &cached)) != KVC_OK ||
      (st = kvc_seq_reserve(cache, 7, 5, 0)) != KVC_OK ||
      (st = kvc_tokens_fit(cache, &fit)) != KVC_OK || cached != 0 || fit <= 0) {
    fprintf(stderr, "consumer: sequence calls: %s (cached %d, fit %lld)\n", kvc_status_string(st),
            cached, (long long)fit);
    kvc_cache_destroy(cache);
    return 1;
  }
  kvc_cache_destroy(cache);
  printf("consumer: ok\n");
  return 0;
}
