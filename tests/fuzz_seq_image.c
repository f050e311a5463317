/*
 * libFuzzer target for kvc_seq_import on the CPU backend. Sequence images are what a serving
 * system moves between processes and machines, so an import must survive any bytes. The input
 * picks one of ten valid images (every codec policy; a length with a tail and one without; each
 * built once) and damages a copy: its length cut short, then (offset, xor) pairs anywhere in it.
 * The copy lies in a buffer of exactly the bytes given, so AddressSanitizer sees any read past
 * them.
 *
 * kvc_seq_import must return KVC_OK or a refusal it documents (KVC_ERR_CORRUPT,
 * KVC_ERR_INVALID_ARGUMENT, KVC_ERR_OUT_OF_MEMORY), and a refusal changes nothing a caller can
 * observe (kvc_test_snap). The cache validates after every call. An imported sequence, whose
 * payload bytes may be damaged (kvcomp.h: they are not checked), must still plan, store and
 * attend every layer (attention may report KVC_ERR_CORRUPT for a page that fails its checks, and
 * its values are then whatever the decoders made of the bytes), and free. Any violation aborts.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvc_fuzz_input.h"
#include "kvc_test_snap.h"
#include "kvc_test_util.h"
#include "kvcomp.h"

enum { LAYERS = 2, KV_HEADS = 2, Q_HEADS = 4, HEAD_DIM = 16, BT = 16, VARIANTS = 10 };
enum { ROW = KV_HEADS * HEAD_DIM, QROW = Q_HEADS * HEAD_DIM, MAX_LEN = 40 };

static void violation(const char *what, kvc_status_t st) {
  fprintf(stderr, "fuzz_seq_image: %s: %s\n", what, kvc_status_string(st));
  abort();
}

static void quiet(void *user, kvc_log_level_t level, const char *message) {
  (void)user, (void)level, (void)message;
}

static kvc_config_t config(int variant) {
  kvc_config_t cfg = KVC_CONFIG_INIT;
  cfg.num_layers = LAYERS;
  cfg.num_q_heads = Q_HEADS;
  cfg.num_kv_heads = KV_HEADS;
  cfg.head_dim = HEAD_DIM;
  cfg.block_tokens = BT;
  cfg.pool_bytes = (size_t)256 << 10;
  cfg.max_seqs = 4;
  cfg.max_seq_len = 256;
  cfg.max_batch_tokens = 64;
  kvc_fuzz_codec(variant, &cfg);
  cfg.log_fn = quiet;
  return cfg;
}

/* A complete step of sequence `id`: n new tokens, every layer stored and attended. Returns the
 * first attention status that is not KVC_OK (KVC_OK if none), or the reservation's
 * KVC_ERR_OUT_OF_MEMORY (then nothing else ran). */
static kvc_status_t step(kvc_cache_t *c, kvc_seq_id_t id, int n, uint64_t seed) {
  static uint16_t k[MAX_LEN * ROW], v[MAX_LEN * ROW], q[MAX_LEN * QROW], out[MAX_LEN * QROW];
  kvc_test_rng_t r;
  kvc_test_rng_seed(&r, seed);
  for (int i = 0; i < n * ROW; i++) {
    k[i] = kvc_test_f32_to_f16((float)kvc_test_rng_normal(&r));
    v[i] = kvc_test_f32_to_f16((float)kvc_test_rng_normal(&r));
  }
  for (int i = 0; i < n * QROW; i++) q[i] = kvc_test_f32_to_f16((float)kvc_test_rng_normal(&r));
  kvc_status_t st = kvc_seq_reserve(c, id, n, 0);
  if (st == KVC_ERR_OUT_OF_MEMORY) return st;
  if (st != KVC_OK) violation("reserve", st);
  const int32_t n_new = n;
  kvc_batch_t batch = {1, &id, &n_new, NULL};
  if ((st = kvc_plan(c, &batch, NULL)) != KVC_OK) violation("plan", st);
  kvc_status_t attended = KVC_OK;
  for (int l = 0; l < LAYERS; l++) {
    if ((st = kvc_store(c, l, k, v, NULL)) != KVC_OK) violation("store", st);
    st = kvc_attend(c, l, q, out, 0.25f, NULL);
    if (st != KVC_OK && st != KVC_ERR_CORRUPT) violation("attend", st);
    if (attended == KVC_OK) attended = st;
  }
  return attended;
}

typedef struct variant {
  kvc_cache_t *dst; /* imports go here, and are freed again */
  uint8_t *image;
  size_t bytes;
} variant_t;

/* Variant i's image (a sequence of 32 or 40 tokens, its full blocks compressed) and a cache of
 * the same configuration to import it into, built on first use. */
static variant_t *variant(int i) {
  static variant_t vs[VARIANTS];
  variant_t *v = &vs[i];
  if (v->image) return v;
  const kvc_config_t cfg = config(i);
  kvc_cache_t *src;
  kvc_status_t st = kvc_cache_create(&cfg, &src);
  if (st != KVC_OK || (st = kvc_cache_create(&cfg, &v->dst)) != KVC_OK) violation("create", st);
  int cached;
  if ((st = kvc_seq_add(src, 1, NULL, 0, 0, &cached)) != KVC_OK) violation("add", st);
  if ((st = step(src, 1, i < 5 ? 32 : 40, 7 + (uint64_t)i)) != KVC_OK) violation("prefill", st);
  if ((st = kvc_cache_synchronize(src)) != KVC_OK) violation("synchronize", st);
  if ((st = kvc_seq_export_bytes(src, 1, &v->bytes, NULL)) != KVC_OK) violation("export", st);
  v->image = malloc(v->bytes);
  if (!v->image) abort();
  if ((st = kvc_seq_export(src, 1, v->image, v->bytes, NULL)) != KVC_OK) violation("export", st);
  kvc_cache_destroy(src);
  return v;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  kvc_fuzz_input_t in = {data, size};
  variant_t *v = variant(kvc_fuzz_next(&in) % VARIANTS);
  const uint8_t cut = kvc_fuzz_next(&in);
  const size_t given = cut & 0x80 ? v->bytes - (size_t)(cut & 0x7f) % v->bytes : v->bytes;
  uint8_t *image = malloc(given ? given : 1);
  if (!image) abort();
  memcpy(image, v->image, given);
  while (in.n >= 3) {
    const size_t off = ((size_t)kvc_fuzz_next(&in) << 8 | kvc_fuzz_next(&in)) % (given ? given : 1);
    const uint8_t x = kvc_fuzz_next(&in);
    if (given) image[off] ^= x;
  }
  kvc_test_snap_t before, after;
  kvc_status_t st = kvc_test_snap_take(v->dst, &before);
  if (st != KVC_OK) violation("snapshot", st);
  st = kvc_seq_import(v->dst, 2, image, given, NULL);
  free(image);
  if (st != KVC_OK && st != KVC_ERR_CORRUPT && st != KVC_ERR_INVALID_ARGUMENT &&
      st != KVC_ERR_OUT_OF_MEMORY)
    violation("import", st);
  kvc_status_t snap = kvc_test_snap_take(v->dst, &after);
  if (snap != KVC_OK) violation("snapshot after the import", snap);
  if (st != KVC_OK) {
    const char *changed = kvc_test_snap_diff(&before, &after, 0);
    if (changed) {
      fprintf(stderr, "fuzz_seq_image: a refused import changed the %s\n", changed);
      abort();
    }
    return 0;
  }
  kvc_seq_info_t info;
  if ((st = kvc_seq_info(v->dst, 2, &info)) != KVC_OK) violation("info", st);
  if (info.length < 256) step(v->dst, 2, 1, 99); /* max_seq_len: 256 */
  if ((st = kvc_seq_free(v->dst, 2)) != KVC_OK) violation("free", st);
  if ((st = kvc_cache_validate(v->dst)) != KVC_OK) violation("validate after the free", st);
  return 0;
}
