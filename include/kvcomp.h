/*
 * kvcomp — a paged, lossy-compressed KV-cache manager for LLM serving engines.
 *
 * The engine's scheduler owns requests and batching; kvcomp owns the memory the keys and values of
 * every running sequence live in. K/V are kept in blocks of `block_tokens` tokens; a block that is
 * full is compressed (error-bounded quantization + Huffman or bit-pack coding) into variable-size
 * *pages*, one per layer, that carry everything needed to decode them. Attention kernels read the
 * pages directly and never write decompressed KV back to memory.
 *
 * Conventions (NCCL-style):
 *   - Every fallible call returns kvc_status_t and writes results through out-pointers. A call that
 *     fails changes nothing: every sequence, the pool and the statistics stay as they were.
 *   - Handles are opaque and created/destroyed in pairs.
 *   - kvc_config_t is versioned by its first field (struct_size) and only ever grows at its end.
 *   - No CUDA types here; CUDA conveniences live in kvcomp_cuda.h. A `void *stream` argument is a
 *     cudaStream_t on the CUDA backend (NULL = legacy default stream) and is ignored on the CPU
 *     backend. Tensor pointers are device pointers on the CUDA backend, host pointers on the CPU
 *     backend.
 *
 * Threading: one scheduler thread drives a cache (every call except those marked "any thread").
 * Every call holds the cache's mutex for its duration, so calls that do come from several threads
 * are serialized and cannot corrupt it, but the per-step protocol below assumes a single driver.
 * kvc_get_stats(), kvc_stats_prometheus(), kvc_seq_info(), kvc_tokens_fit() and kvc_cache_config()
 * may be called from any thread at any time (they wait while another call holds the cache).
 *
 * Streams (CUDA backend): the cache keeps all of its device work in one order. When a call's
 * stream differs from the stream of the cache's previous device work, the new stream first waits
 * for that work (an event, no host wait). Hooks without a stream argument (kvc_seq_add,
 * kvc_seq_reserve, kvc_seq_fork, kvc_seq_free) enqueue their device work (releasing the pages of
 * freed or evicted blocks, copying a forked tail) on the stream of the cache's most recent call
 * that took one (initially the legacy default stream). A stream given to the cache must stay valid
 * until the cache has been given another stream, synchronized, or destroyed.
 *
 * CUDA graphs: kvc_store and kvc_attend only launch kernels on their stream, so the stores and
 * attends of a step may be captured (cudaStreamBeginCapture) on the stream its kvc_plan was given.
 * The cache records the step as done when the calls return: launch the captured graph exactly
 * once, before the cache's next call that enqueues work. kvc_plan and the hooks are not capturable.
 *
 * Device failures: a call that fails with KVC_ERR_CUDA (or KVC_ERR_INTERNAL) after the cache had
 * committed to its effect (a store, the device work of a hook) cannot restore the cache; it stays
 * unusable and every later call returns that status. Destroy it. A failed tensor-parallel
 * agreement (KVC_ERR_NCCL, see "Tensor parallelism") does the same.
 *
 * The per-step protocol (FlashInfer plan/run; vLLM allocate_slots semantics):
 *
 *     kvc_seq_add(c, id, prompt, n, 0, &n_cached);     // prefix-cache hit: n_cached tokens known
 *     kvc_seq_reserve(c, id, n - n_cached, 0);          // may fail with KVC_ERR_OUT_OF_MEMORY
 *     kvc_plan(c, &batch, stream);                     // once per step, all layers
 *     for (layer...) {
 *         kvc_store(c, layer, k, v, stream);           // append this step's K/V
 *         kvc_attend(c, layer, q, out, scale, stream); // causal attention over cache + new tokens
 *     }
 */
#ifndef KVCOMP_H
#define KVCOMP_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVC_VERSION_MAJOR 0
#define KVC_VERSION_MINOR 1
#define KVC_VERSION_PATCH 0
/* Encoded as major * 10000 + minor * 100 + patch, like NCCL_VERSION_CODE. */
#define KVC_VERSION_CODE (KVC_VERSION_MAJOR * 10000 + KVC_VERSION_MINOR * 100 + KVC_VERSION_PATCH)

typedef enum kvc_status {
  KVC_OK = 0,
  KVC_ERR_INVALID_ARGUMENT = 1,   /* NULL, out of range or inconsistent argument */
  KVC_ERR_NOT_FOUND = 2,          /* unknown or already freed sequence id */
  KVC_ERR_INVALID_STATE = 3,      /* call out of order (attend before plan, fork mid-step, ...) */
  KVC_ERR_OUT_OF_MEMORY = 4,      /* the device pool (or swap space) cannot hold the request */
  KVC_ERR_OUT_OF_HOST_MEMORY = 5, /* a host allocation failed */
  KVC_ERR_CUDA = 6,               /* a CUDA runtime call or kernel launch failed */
  KVC_ERR_NCCL = 7,               /* an NCCL call failed */
  KVC_ERR_UNSUPPORTED = 8,        /* valid, but not built or not supported (head_dim, dtype, ...) */
  KVC_ERR_CORRUPT = 9,            /* a page failed its checksum or format checks */
  KVC_ERR_INTERNAL = 10,          /* a bug in kvcomp: please report it */
  KVC_STATUS_COUNT
} kvc_status_t;

/* A static string naming `status`; never NULL, also for values out of range. Any thread. */
const char *kvc_status_string(kvc_status_t status);

/* KVC_VERSION_CODE of the library actually linked. Any thread. */
int kvc_version(void);

typedef enum kvc_backend {
  KVC_BACKEND_CPU = 0,  /* pool in host memory; plain C; the reference implementation */
  KVC_BACKEND_CUDA = 1, /* pool in device memory; requires a build with KVC_CUDA */
} kvc_backend_t;

typedef enum kvc_dtype {
  KVC_DTYPE_F16 = 0,
  KVC_DTYPE_BF16 = 1,
  KVC_DTYPE_F32 = 2, /* CPU backend only (exact reference runs, model evaluation) */
} kvc_dtype_t;

/* How a page is coded. Recorded in every page; a cache may hold pages of every codec at once. */
typedef enum kvc_codec {
  KVC_CODEC_RAW = 0,     /* values as given, no loss */
  KVC_CODEC_BITPACK = 1, /* error-bounded quantization, fixed-width codes */
  KVC_CODEC_HUFFMAN = 2, /* error-bounded quantization, canonical length-limited Huffman codes */
} kvc_codec_t;

/* Which codec a full block is stored with. */
typedef enum kvc_codec_policy {
  KVC_POLICY_FIXED = 0,          /* `codec`; raw for a block it cannot code (NaN/Inf, too wide) */
  KVC_POLICY_SMALLEST = 1,       /* whichever codec gives the smallest page */
  KVC_POLICY_FASTEST_WITHIN = 2, /* fastest to decode (raw, bit-pack, Huffman) whose page is at most
                                    `size_budget` times the raw page */
} kvc_codec_policy_t;

typedef enum kvc_bound_mode {
  KVC_BOUND_RELATIVE = 0, /* bound is a fraction of each quantization group's range (max - min) */
  KVC_BOUND_ABSOLUTE = 1, /* bound is in the units of the values */
} kvc_bound_mode_t;

typedef enum kvc_log_level {
  KVC_LOG_ERROR = 0,
  KVC_LOG_WARN = 1,
  KVC_LOG_INFO = 2,
  KVC_LOG_DEBUG = 3,
} kvc_log_level_t;

/* Receives the library's log lines (no trailing newline). Called on the thread that made the call. */
typedef void (*kvc_log_fn)(void *user, kvc_log_level_t level, const char *message);

/*
 * Tensor parallelism. Each rank runs its own cache over its share of the kv heads (num_kv_heads
 * and num_q_heads as this rank holds them) and makes the same calls, with the same arguments, in
 * the same order (an SPMD scheduler, as TensorRT-LLM's and SGLang's tensor-parallel workers run).
 * Block ids, block tables, the prefix cache and every call's status are then the same on every
 * rank, although each rank's pages have their own compressed sizes: whatever a hook decides from
 * this rank alone (pool space, the cached blocks it evicts for room, swap space, host memory) is
 * agreed with the other ranks before the hook commits, through the caller's all-reduce
 * (kvc_config_t.tp_allreduce_max; kvcomp_nccl.h provides one over an NCCL communicator). A hook
 * succeeds only when it can on every rank, and evicts on every rank the blocks the neediest rank
 * must evict. Hooks that agree: kvc_seq_add, kvc_seq_reserve, kvc_seq_fork, kvc_seq_swap_out,
 * kvc_seq_swap_in, kvc_seq_import (one all-reduce each, two for an import, made only after the
 * call's own argument and state checks passed, so a call that every rank refuses alike exchanges
 * nothing) and kvc_tokens_fit_agreed.
 * The plan, store and attend of a step need no agreement and exchange nothing.
 * A rank whose cache failed for good (KVC_ERR_CUDA, KVC_ERR_INTERNAL, KVC_ERR_NCCL: see "Device
 * failures") no longer takes part: the job must stop, as after any NCCL error.
 */

/* In place, over every rank of the group: values[i] becomes the largest values[i] of any rank
 * (count <= 2). Returns 0 on success; anything else makes the calling cache unusable
 * (KVC_ERR_NCCL). Called with the cache's lock held, on the thread of the hook that agrees. */
typedef int (*kvc_tp_allreduce_fn)(void *user, int64_t *values, int count);

/*
 * Cache configuration. Always start from KVC_CONFIG_INIT and change fields by name: struct_size
 * tells the library which version of this struct the caller was compiled against, and fields the
 * caller does not know take their defaults.
 */
typedef struct kvc_config {
  size_t struct_size;      /* sizeof(kvc_config_t) as the caller sees it */
  kvc_backend_t backend;   /* default KVC_BACKEND_CPU */
  int device;              /* CUDA device ordinal (CUDA backend) */

  /* Model shape, as held by this rank. */
  int num_layers;          /* >= 1 */
  int num_q_heads;         /* query heads; a multiple of num_kv_heads */
  int num_kv_heads;        /* >= 1 */
  int head_dim;            /* CPU: a multiple of 8, 8..256. CUDA: 64, 128 or 256 */
  kvc_dtype_t dtype;       /* of K, V, Q and attention outputs; default KVC_DTYPE_F16 */

  /* Memory. */
  int block_tokens;        /* tokens per block; a power of two, 16..256; default 64. CUDA: at most
                            * 128, at head_dim 256 at most 64 unless every page is raw (policy
                            * FIXED, codec RAW) */
  size_t pool_bytes;       /* the one pool, taken at creation and never grown; default 256 MiB */
  size_t swap_bytes;       /* host memory for swapped-out sequences; 0 disables swap; default 0 */
  int max_seqs;            /* live sequences (running, swapped) at once, < 2^29; default 256 */
  int max_seq_len;         /* tokens per sequence; default 131072 */
  int max_batch_tokens;    /* new tokens in one step over all sequences; default 8192 */
  float watermark;         /* fraction of the pool kvc_seq_reserve keeps free for sequences that
                              already hold blocks when admitting a new one; default 0.01 */
  int prefix_caching;      /* keep full blocks addressable by their token prefix; default 1 */

  /* Compression. */
  kvc_codec_policy_t policy; /* default KVC_POLICY_FIXED */
  kvc_codec_t codec;         /* for KVC_POLICY_FIXED; default KVC_CODEC_HUFFMAN */
  float size_budget;         /* for KVC_POLICY_FASTEST_WITHIN, in (0, 1]; default 0.35 */
  kvc_bound_mode_t bound_mode; /* default KVC_BOUND_RELATIVE */
  float k_bound;           /* error bound on every reconstructed key, > 0 */
  float v_bound;           /* error bound on every reconstructed value, > 0 */

  /* Logging. */
  kvc_log_fn log_fn;       /* NULL: log lines at or below log_level go to stderr */
  void *log_user;
  kvc_log_level_t log_level; /* default KVC_LOG_WARN */

  /* Attention (appended after the first published layout). */
  int cascade;             /* a prefix of whole blocks that a group of a step's sequences holds
                              (the same blocks: prefix-cache hits, forks) is read once for the
                              group (CUDA backend; two launches and a merge, as FlashInfer's and
                              vLLM's cascade attention): 1 when the plan's cost model expects a
                              gain (default), 2 whenever there is such a group, 0 never. Same
                              results */

  /* Tensor parallelism (appended; see "Tensor parallelism" above). */
  kvc_tp_allreduce_fn tp_allreduce_max; /* NULL (default): this cache decides alone */
  void *tp_user;                        /* passed to tp_allreduce_max; borrowed for the cache's
                                           lifetime */
} kvc_config_t;

/* Default error bounds (relative to each group's range), chosen by `./kvc eval` on stories260K:
 * +0.30% perplexity at 4.31 bits/value, 7% fewer bits than KIVI-style 4-bit interpolated to the
 * same change (bench/runner/results/EVAL.md). */
#define KVC_DEFAULT_K_BOUND 0.04f
#define KVC_DEFAULT_V_BOUND 0.12f

#define KVC_CONFIG_INIT                                                                            \
  {                                                                                                \
    sizeof(kvc_config_t), KVC_BACKEND_CPU, 0, 0, 0, 0, 0, KVC_DTYPE_F16, 64, (size_t)256 << 20, 0,   \
        256, 131072, 8192, 0.01f, 1, KVC_POLICY_FIXED, KVC_CODEC_HUFFMAN, 0.35f,                    \
        KVC_BOUND_RELATIVE, KVC_DEFAULT_K_BOUND, KVC_DEFAULT_V_BOUND, NULL, NULL, KVC_LOG_WARN, 1, \
        NULL, NULL                                                                                 \
  }

typedef struct kvc_cache kvc_cache_t;

/* Sequence ids are chosen by the caller (a request id); any value except KVC_SEQ_NONE. */
typedef uint64_t kvc_seq_id_t;
#define KVC_SEQ_NONE UINT64_MAX

/*
 * Creates a cache: validates `config` (copied; the caller keeps ownership; min(struct_size,
 * sizeof(kvc_config_t)) bytes are read, later fields take their defaults), takes the pool (cudaMalloc
 * on the CUDA backend) and the host metadata. Synchronous. The reason for a rejected configuration
 * is logged (config->log_fn, else stderr).
 * Besides the pool the cache holds: per block id and layer one 264-byte page directory entry;
 * per block that one step can complete (max_batch_tokens / block_tokens + min(max_seqs,
 * max_batch_tokens), at most max_batch_tokens) one uncompressed block of compress scratch; on CUDA
 * also the split-K attention workspace, the step's block tables (device and 3 pinned copies,
 * sized for min(max_seqs, max_batch_tokens) sequences of max_seq_len tokens), and swap_bytes of
 * pinned, mapped host memory.
 * Returns KVC_OK, KVC_ERR_INVALID_ARGUMENT (NULL, bad shape, pool too small to hold one
 * worst-case block of every layer beyond the watermark or too large to address (~2^62 bytes),
 * CUDA device out of range),
 * KVC_ERR_UNSUPPORTED (backend not built, dtype/head_dim not supported), KVC_ERR_OUT_OF_MEMORY,
 * KVC_ERR_OUT_OF_HOST_MEMORY, KVC_ERR_CUDA. *out is set only on KVC_OK.
 */
kvc_status_t kvc_cache_create(const kvc_config_t *config, kvc_cache_t **out);

/* Waits for the cache's outstanding work, then frees everything it owns. NULL is a no-op. */
void kvc_cache_destroy(kvc_cache_t *cache);

/* The configuration the cache runs with, defaults filled in. The caller sets out->struct_size
 * (e.g. from KVC_CONFIG_INIT); min(out->struct_size, sizeof(kvc_config_t)) bytes are written.
 * KVC_ERR_INVALID_ARGUMENT for NULL or a struct_size smaller than the first kvc_config_t. Any
 * thread. */
kvc_status_t kvc_cache_config(const kvc_cache_t *cache, kvc_config_t *out);

/* ---------------------------------------------------------------------------------------------
 * Per-request hooks (vLLM KVCacheManager / TensorRT-LLM addSequence semantics).
 * None of these enqueues device work except swap; all are O(blocks touched).
 * ------------------------------------------------------------------------------------------- */

/*
 * Adds sequence `id` with its prompt `tokens` [n_tokens] (copied; may be NULL when n_tokens is 0).
 * With prefix caching on, attaches the longest run of cached full blocks whose chained hash of
 * (tokens, codec, bounds, `salt`) matches and writes how many tokens it covers to *n_cached
 * (a multiple of block_tokens, always < n_tokens so the last prompt token is recomputed); the
 * sequence then has length *n_cached and the caller computes tokens [*n_cached, n_tokens).
 * Token ids are kept so that blocks completed later can be cached by their prefix.
 * Returns KVC_ERR_INVALID_ARGUMENT (id in use or KVC_SEQ_NONE, n_tokens < 0 or > max_seq_len),
 * KVC_ERR_OUT_OF_MEMORY (max_seqs live sequences), KVC_ERR_OUT_OF_HOST_MEMORY.
 */
kvc_status_t kvc_seq_add(kvc_cache_t *cache, kvc_seq_id_t id, const int32_t *tokens, int n_tokens,
                         uint64_t salt, int *n_cached);

/*
 * Guarantees that the next steps can store `n_new` more tokens (plus `n_lookahead` speculative
 * slots) for `id`, taking pool space for them now. Space is charged at the worst case (a raw page)
 * for blocks not yet compressed and released as soon as actual page sizes are known. Reserving
 * again only ever grows the reservation. When the sequence holds no blocks yet (admission), the
 * watermark is kept free as well. Fails cleanly: KVC_ERR_OUT_OF_MEMORY (the pool cannot guarantee
 * it even after evicting unreferenced cached blocks), KVC_ERR_INVALID_ARGUMENT (negative counts,
 * past max_seq_len), KVC_ERR_NOT_FOUND, KVC_ERR_INVALID_STATE (sequence swapped out or in the
 * current incomplete step), KVC_ERR_OUT_OF_HOST_MEMORY (its block table grows here, so that
 * kvc_plan never allocates). A forked child's reservation is its length, and swapping out releases
 * a sequence's reservation: reserve before growing either.
 */
kvc_status_t kvc_seq_reserve(kvc_cache_t *cache, kvc_seq_id_t id, int n_new, int n_lookahead);

/*
 * New sequence `child` sharing every full block of `parent` (reference counted, no copy) and a
 * copy of its tail (enqueued on the cache's last-used stream; visible to the next plan).
 * For parallel sampling and beam search. Returns KVC_ERR_NOT_FOUND, KVC_ERR_INVALID_ARGUMENT
 * (child id in use), KVC_ERR_INVALID_STATE (parent swapped out or mid-step), KVC_ERR_OUT_OF_MEMORY
 * (max_seqs live sequences, or no room for the tail copy), KVC_ERR_OUT_OF_HOST_MEMORY.
 */
kvc_status_t kvc_seq_fork(kvc_cache_t *cache, kvc_seq_id_t parent, kvc_seq_id_t child);

/*
 * Frees `id`. Its full blocks stay in the prefix cache (if enabled) until evicted (LRU, the
 * sequence's last blocks first); everything else returns to the pool (enqueued on the cache's
 * last-used stream), and a swapped-out sequence's swap memory is released. Preemption by drop is a
 * free followed by a later kvc_seq_add of the same tokens. Returns KVC_ERR_NOT_FOUND,
 * KVC_ERR_INVALID_STATE (mid-step).
 */
kvc_status_t kvc_seq_free(kvc_cache_t *cache, kvc_seq_id_t id);

/*
 * Preemption by swap: moves the sequence's pages (compressed bytes, not fp16) and its tail to host
 * swap memory and frees their pool space; kvc_seq_swap_in brings them back (new chunks, same block
 * ids). Blocks shared with other sequences stay in the pool. Enqueued on `stream`; a swapped-out
 * sequence cannot be planned, forked or reserved, and comes back with its reservation released.
 * Swap-out first compresses the blocks the last step completed if the sequence holds any (see
 * kvc_store; even when the swap-out then fails, for lack of swap space or because another
 * tensor-parallel rank refused it), then waits for the sizes of pages still in flight (a host
 * wait: swap is not on the hot path); each moved block takes its pages' bytes plus a small header
 * of swap memory, and the space is checked conservatively, as if every block of the sequence
 * moved.
 * Returns KVC_ERR_NOT_FOUND, KVC_ERR_INVALID_STATE (already swapped out / not swapped out,
 * mid-step), KVC_ERR_OUT_OF_MEMORY (swap space, or pool on swap-in), KVC_ERR_UNSUPPORTED
 * (swap_bytes is 0).
 */
kvc_status_t kvc_seq_swap_out(kvc_cache_t *cache, kvc_seq_id_t id, void *stream);
kvc_status_t kvc_seq_swap_in(kvc_cache_t *cache, kvc_seq_id_t id, void *stream);

typedef enum kvc_seq_state {
  KVC_SEQ_RUNNING = 0,
  KVC_SEQ_SWAPPED = 1,
} kvc_seq_state_t;

typedef struct kvc_seq_info {
  int length;            /* tokens stored (or planned in the current step) */
  int reserved;          /* tokens the sequence may grow to without another reserve */
  int num_blocks;        /* blocks in its table, the tail included */
  int shared_blocks;     /* of those, blocks with a reference count above one */
  kvc_seq_state_t state;
} kvc_seq_info_t;

/* KVC_OK, KVC_ERR_INVALID_ARGUMENT (NULL), KVC_ERR_NOT_FOUND. Any thread. */
kvc_status_t kvc_seq_info(const kvc_cache_t *cache, kvc_seq_id_t id, kvc_seq_info_t *out);

/*
 * Conservative capacity estimate from the measured average page size: how many more tokens fit
 * in the pool (after the watermark), counting blocks that could be evicted from the prefix cache.
 * Cheap; host only. Any thread.
 */
kvc_status_t kvc_tokens_fit(const kvc_cache_t *cache, int64_t *n_tokens);

/* kvc_tokens_fit agreed over the tensor-parallel ranks: the smallest of their estimates (what an
 * admission can count on). A hook like those that agree: every rank calls it at the same point of
 * its calls. Without tp_allreduce_max the same as kvc_tokens_fit. Returns KVC_OK,
 * KVC_ERR_INVALID_ARGUMENT (NULL), KVC_ERR_NCCL (the exchange failed: the cache is unusable), or
 * the cache's earlier failure. */
kvc_status_t kvc_tokens_fit_agreed(kvc_cache_t *cache, int64_t *n_tokens);

/* ---------------------------------------------------------------------------------------------
 * Moving a sequence between caches: prefill on one GPU and decode on another (disaggregation),
 * rebalancing, migration. The pages move as they are compressed, not as fp16.
 * ------------------------------------------------------------------------------------------- */

/*
 * A sequence image holds a sequence's length and every page of its blocks, as compressed, in one
 * buffer of the backend's memory (device memory of the cache's device on the CUDA backend, host
 * memory on the CPU backend). The caller moves it (cudaMemcpyPeer, ncclSend / ncclRecv, RDMA) and
 * a cache of the same configuration (num_layers, num_kv_heads, head_dim, dtype, block_tokens,
 * codec, policy and bounds, and so the same page chunk size) imports it.
 *
 * kvc_seq_export_bytes: the size of `id`'s image. Like swap-out, it first compresses the blocks
 * the last step completed and waits for the page sizes in flight (a host wait: not the hot path).
 * kvc_seq_export: writes `id`'s image to image[cap] (the header and index synchronously, the pages
 * enqueued on `stream`). The sequence stays as it was: free it to move it. Returns KVC_OK,
 * KVC_ERR_INVALID_ARGUMENT (NULL, cap below kvc_seq_export_bytes), KVC_ERR_NOT_FOUND,
 * KVC_ERR_INVALID_STATE (swapped out, no tokens yet, or a step open), KVC_ERR_OUT_OF_HOST_MEMORY,
 * KVC_ERR_CUDA.
 * kvc_seq_import: adds sequence `id` from image[bytes] (complete before the work on `stream`; it
 * may be reused once that work is done): reads the image's header and index to the host
 * (synchronously), then copies its pages into this pool on `stream`. An admission: it needs room
 * for its pages plus the watermark, evicts cached blocks for it, and is agreed over
 * tensor-parallel ranks. The sequence's reservation is its length; its blocks are not in the
 * prefix cache, nor are those it completes later. Returns KVC_OK, KVC_ERR_INVALID_ARGUMENT (NULL,
 * id in use, an image of another configuration), KVC_ERR_CORRUPT (the header or index is not an
 * image's, does not fit `bytes`, or disagrees with the page headers the copy would read),
 * KVC_ERR_OUT_OF_MEMORY (pool, block ids, max_seqs), KVC_ERR_OUT_OF_HOST_MEMORY, KVC_ERR_CUDA.
 * Under tensor parallelism every rank imports its own image of the same sequence (images of
 * different lengths are KVC_ERR_INVALID_ARGUMENT on every rank), and a refusal on any rank (a
 * damaged image included) is a refusal on all. The pages' payload bytes are not
 * checked: altered ones decode to wrong values (the decoders stay within the page).
 */
kvc_status_t kvc_seq_export_bytes(kvc_cache_t *cache, kvc_seq_id_t id, size_t *bytes,
                                  void *stream);
kvc_status_t kvc_seq_export(kvc_cache_t *cache, kvc_seq_id_t id, void *image, size_t cap,
                            void *stream);
kvc_status_t kvc_seq_import(kvc_cache_t *cache, kvc_seq_id_t id, const void *image, size_t bytes,
                            void *stream);

/* ---------------------------------------------------------------------------------------------
 * Per-step plan and per-layer run (FlashInfer-style).
 * ------------------------------------------------------------------------------------------- */

/* One step's batch. Token rows of store/attend tensors follow this order: sequence 0's new tokens,
 * then sequence 1's, ... (`num_new_tokens[i]` rows each). */
typedef struct kvc_batch {
  int num_seqs;                  /* >= 1 */
  const kvc_seq_id_t *seq_ids;   /* [num_seqs], distinct, running */
  const int32_t *num_new_tokens; /* [num_seqs], each >= 1 and within the sequence's reservation */
  const int32_t *token_ids;      /* [sum num_new_tokens] the new tokens' ids, for prefix caching of
                                    the blocks they complete; NULL: those blocks are not cached */
} kvc_batch_t;

/*
 * Plans a step: checks the batch, assigns every new token its slot, and builds all device-side
 * metadata (CSR block tables, tail lengths, split-K partitions, store destinations) once for all
 * layers, uploading it asynchronously on `stream`. The sequences' lengths advance by their new
 * tokens now; the step is complete once kvc_store has run for every layer. Arrays in `batch` are
 * read before return. Also compresses the blocks the previous step completed (enqueued on
 * `stream`, see kvc_store) and collects, without waiting, the page sizes of earlier steps'
 * compressed blocks and releases their reservations. Does not synchronize and allocates nothing
 * from CUDA.
 * Returns KVC_ERR_INVALID_ARGUMENT (shape, duplicates, more than max_batch_tokens, more tokens than
 * reserved), KVC_ERR_NOT_FOUND, KVC_ERR_INVALID_STATE (previous step incomplete, sequence swapped
 * out), KVC_ERR_CUDA.
 */
kvc_status_t kvc_plan(kvc_cache_t *cache, const kvc_batch_t *batch, void *stream);

/*
 * Appends the planned step's new keys and values of `layer`: k, v [total_new_tokens, num_kv_heads,
 * head_dim] row-major in config.dtype (borrowed until the enqueued work completes). Blocks that
 * become full keep their exact rows in their staging pages until the next kvc_plan, so this
 * step's kvc_attend reads every token the step stored exactly, as it was stored, and only blocks
 * completed by earlier steps through the lossy codec (as an engine attends over a prefill's own
 * K/V). The next kvc_plan compresses them, one batched launch per layer, taking the space for
 * their pages on the device; kvc_seq_free, kvc_seq_swap_out and eviction of such a block, and
 * kvc_cache_synchronize, compress them earlier. Until then they hold staging pages, which their
 * worst-case charge covers (kvc_stats_t counts them in staging_bytes). Enqueued on `stream`,
 * returns before the work is done; no synchronization, no CUDA
 * allocation (capturable in a CUDA graph). Returns KVC_ERR_INVALID_STATE (no plan, layer already
 * stored this step), KVC_ERR_INVALID_ARGUMENT (NULL tensor, layer out of range), KVC_ERR_CUDA.
 */
kvc_status_t kvc_store(kvc_cache_t *cache, int layer, const void *k, const void *v, void *stream);

/*
 * Attention of the planned step for `layer`, after kvc_store for that layer: for each new token i
 * of each sequence, softmax(scale * q_i · K^T) V over the sequence's cached tokens and its new
 * tokens up to and including i (causal). q, out [total_new_tokens, num_q_heads, head_dim] in
 * config.dtype; query head h uses kv head h / (num_q_heads / num_kv_heads). Accumulates in fp32
 * (fp64 on the CPU backend). Compressed pages are decoded on the fly, nothing decompressed is
 * written to memory. Enqueued on `stream`; no synchronization, no allocation on the CUDA backend
 * (the CPU backend takes one host scratch allocation). May be repeated for a stored layer until the
 * next kvc_plan; once every layer is stored, a kvc_seq_free or kvc_seq_swap_out may release pages
 * the plan reads, so it also ends attention for that step. Returns KVC_ERR_INVALID_STATE (no plan,
 * layer not stored this step, step ended as above), KVC_ERR_INVALID_ARGUMENT (NULL tensor, layer
 * out of range, scale not finite and > 0), KVC_ERR_CUDA; on the CPU backend also
 * KVC_ERR_OUT_OF_HOST_MEMORY, KVC_ERR_CORRUPT. A failed attend leaves the cache as it was. The
 * CPU backend's results are reproducible bit for bit; the CUDA backend's may differ in their last
 * bits between identical steps where its kernels hand work to warps as they ask for it (Huffman
 * pages; bit-pack pages at head_dim 64 and 128 in blocks of 32 or 64 tokens; README, known
 * limits).
 */
kvc_status_t kvc_attend(kvc_cache_t *cache, int layer, const void *q, void *out, float scale,
                        void *stream);

/* Compresses the blocks the last step completed (see kvc_store: that step's attends after this
 * read them compressed), waits for all work the cache enqueued (on the stream of its most recent
 * device work, which is ordered after all earlier work), then collects page sizes, so that the
 * stats count every full block as a page. Not on the hot path. */
kvc_status_t kvc_cache_synchronize(kvc_cache_t *cache);

/* ---------------------------------------------------------------------------------------------
 * Observability.
 * ------------------------------------------------------------------------------------------- */

typedef struct kvc_stats {
  size_t struct_size;          /* set by the caller to sizeof(kvc_stats_t) */
  size_t pool_bytes;           /* the pool */
  size_t page_bytes;           /* bytes of compressed pages (headers, codebooks, scales included) */
  size_t page_alloc_bytes;     /* chunk bytes those pages took (a block's pages share chunks:
                                  only its last page's last chunk is partly unused) */
  size_t staging_bytes;        /* chunk bytes of uncompressed tail blocks */
  size_t reserved_bytes;       /* chunk bytes promised to reservations and pages of unknown size */
  size_t free_bytes;           /* chunk bytes available to new reservations */
  size_t metadata_bytes;       /* page directory, tables, host metadata */
  double fragmentation;        /* (page_alloc_bytes - page_bytes) / page_alloc_bytes */
  double compression_ratio;    /* raw bytes of compressed blocks / page_bytes */
  int64_t tokens_stored;       /* over live sequences (shared blocks counted once) */
  int64_t live_seqs;
  int64_t swapped_seqs;
  int64_t cached_blocks;       /* full blocks addressable by the prefix cache */
  int64_t prefix_queries;      /* blocks looked up */
  int64_t prefix_hits;         /* blocks found */
  int64_t evictions;           /* cached blocks evicted */
  int64_t swap_outs;
  int64_t swap_ins;
  int64_t pages_by_codec[3];   /* indexed by kvc_codec_t */
} kvc_stats_t;

/* A consistent snapshot. The caller sets out->struct_size; min(struct_size, sizeof(kvc_stats_t))
 * bytes are written (KVC_ERR_INVALID_ARGUMENT when smaller than the first kvc_stats_t). Page sizes
 * reach the host asynchronously, so page_bytes and friends lag the device by a step or two
 * (kvc_cache_synchronize brings them up to date). Any thread. */
kvc_status_t kvc_get_stats(const kvc_cache_t *cache, kvc_stats_t *out);

/* Prometheus text exposition of the stats into buf[cap] (NUL-terminated); *needed is the length
 * without the NUL. With cap too small, writes nothing and returns KVC_ERR_INVALID_ARGUMENT with
 * *needed set. Any thread. */
kvc_status_t kvc_stats_prometheus(const kvc_cache_t *cache, char *buf, size_t cap, size_t *needed);

typedef enum kvc_event_kind {
  KVC_EVENT_BLOCK_STORED = 0,  /* a block became full (compressed by the next plan, kvc_store)
                                  and, if hashed, entered the cache */
  KVC_EVENT_BLOCK_REMOVED = 1, /* a block's pages were freed */
  KVC_EVENT_BLOCK_EVICTED = 2, /* an unreferenced cached block was evicted to make room */
} kvc_event_kind_t;

typedef struct kvc_event {
  kvc_event_kind_t kind;
  int32_t block_id;
  uint64_t block_hash; /* 0 for blocks that are not in the prefix cache */
} kvc_event_t;

/* Moves up to `cap` pending events, oldest first, into events; *n is how many. The queue keeps the
 * newest 65536 events; *dropped (optional) counts those lost to overflow since the last call. */
kvc_status_t kvc_poll_events(kvc_cache_t *cache, kvc_event_t *events, int cap, int *n,
                             int64_t *dropped);

/* Checks every invariant (refcounts, free lists, directory, block tables, accounting): every pool
 * chunk is free or owned by exactly one page (a page that starts in the last chunk of its block's
 * previous layer's page shares it), every directory entry agrees with the block manager, every
 * block of a running sequence holds the page its length implies. Host side; synchronizes and
 * collects page sizes first (on CUDA it copies the directories to the host). Returns KVC_OK,
 * KVC_ERR_INTERNAL (the reason is logged), KVC_ERR_OUT_OF_HOST_MEMORY (its scratch copies). */
kvc_status_t kvc_cache_validate(kvc_cache_t *cache);

#ifdef __cplusplus
}
#endif

#endif /* KVCOMP_H */
