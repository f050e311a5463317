/*
 * The CUDA backend: the pool, page directories, free stack and step buffers in device memory;
 * swap memory pinned and mapped on the host. The same protocol as the CPU backend
 * (kvc_backend_cpu.c), as small kernels.
 *
 * A store writes every new row into a staging page; the compression of the blocks a step
 * completes runs at the next plan (or earlier, kvc_cache.c says when), from the job list of the
 * step's upload, which is still in meta_dev then: every such launch is enqueued before the next
 * upload.
 *
 * Nothing on the store/attend path synchronizes, allocates or copies between host and device:
 * store and attend only launch kernels on the caller's stream, so a step can be captured in a
 * CUDA graph. The host talks to the device at two points, both asynchronous:
 *   - plan: the step's arrays are packed into one of kUploadSlots pinned buffers and copied with
 *     one cudaMemcpyAsync into a device buffer (a pinned buffer is reused only once its copy's
 *     event has completed, which in the steady state it long has);
 *   - page sizes: the next plan copies the finished step's page_bytes/page_codec into a pinned
 *     size slot with an event; a later plan reads the slot once the event has completed.
 * Work lists of the per-request hooks (block ids to free, swap extents) travel as kernel
 * parameters, in launches of up to kIdsPerLaunch ids, so hooks need no upload buffer either.
 *
 * Errors found by kernels (the free stack running dry, an entry in an unexpected state — both
 * impossible unless the host accounting has a bug) set pool.error; the host sees it with the next
 * page sizes and reports KVC_ERR_INTERNAL.
 *
 * Chunks are popped and pushed by many threads at once, so which chunk ids a page gets (and the
 * order of the free stack) depends on scheduling and differs from the CPU backend; only page
 * contents are the same. A new staging page is not cleared: its slots past the tail's length hold
 * whatever the chunks held before (on both backends), and no reader looks at them (the attention
 * kernels read kv_len rows, compression reads its scratch block, which every job fills whole).
 */
#include <cuda_runtime.h>

#include <stdint.h>
#include <string.h>

#include "attention/kvc_attn.h"
#include "compress/kvc_codec_cuda.h"
#include "scheduler_hooks/kvc_backend.h"
#include "scheduler_hooks/kvc_cache_test.h"

namespace {

constexpr int kUploadSlots = 3;
constexpr int kIdsPerLaunch = 256;
constexpr int kSwapPerLaunch = 128;
constexpr int kThreads = 128;

/* Device error codes in pool.error. */
constexpr int32_t kErrStackDry = 1;
constexpr int32_t kErrEntryState = 2;

struct id_list {
  int32_t id[kIdsPerLaunch]; /* 1 KiB of kernel parameters */
};

struct swap_list {
  int32_t block[kSwapPerLaunch];
  uint64_t off[kSwapPerLaunch]; /* 1.5 KiB of kernel parameters */
};

struct cuda_be {
  int device;
  kvc_dev_pool_t pool;   /* base [total_chunks * chunk_bytes], free stack, top, error */
  kvc_page_entry_t *dir; /* device [num_layers][max_blocks] */
  uint8_t *scratch;      // device [max_jobs][2][num_kv_heads][block_tokens][head_dim]
  int32_t *full_tokens;  /* device [max_jobs], every element block_tokens */
  uint32_t *page_bytes;  /* device [num_layers][max_jobs] */
  uint8_t *page_codec;   /* device [num_layers][max_jobs] */
  uint8_t *page_chunks;  /* device [num_layers][max_jobs] chunks each page took */
  kvc_pack_cursor_t *cursor; /* device [max_blocks]: packing (allocator/kvc_pool_layout.h) */
  uint64_t *hdr_off;         /* device [max_seq_blocks]: extent offsets, for read_swap_headers */
  uint64_t *hdr;             /* device [max_seq_blocks][num_layers]: the headers it gathers */
  uint8_t *meta_dev;     /* device [meta_cap]: the plan's arrays */
  uint8_t *meta_host;    /* pinned [kUploadSlots][meta_cap] */
  size_t meta_cap;
  cudaEvent_t meta_event[kUploadSlots];
  int meta_pending[kUploadSlots];
  int meta_next;
  uint8_t *sizes_host; /* pinned [KVC__SIZE_SLOTS] x slot_stride */
  size_t slot_stride;  /* bytes [L][J] uint32, codecs and chunks [L][J] uint8, error int32 */
  cudaEvent_t size_event[KVC__SIZE_SLOTS];
  void *workspace; /* device, split-K attention */
  size_t workspace_bytes;
  uint8_t *swap_host;      /* pinned, mapped [swap_bytes] */
  uint8_t *swap_dev;       /* its device address */
  cudaEvent_t order_event; /* orders the cache's work across streams */

  /* The step's device arrays (inside meta_dev) and attention arguments. The deferred
   * compression reads d_job_block, so it runs before the next plan's upload replaces it. */
  const int32_t *d_row_block, *d_row_slot, *d_job_block, *d_job_staged, *d_new_staging;
  kvc_attn_args_t attn;
  /* Host scratch of plan_cascade: [5][max_plan_seqs] int32 and [max_plan_seqs] keys. */
  int32_t *cascade_host;
  uint64_t *cascade_keys;
};

cuda_be *be_of(const kvc_cache_t *c) { return static_cast<cuda_be *>(c->be); }

size_t align16(size_t x) { return (x + 15) & ~(size_t)15; }

kvc_status_t cuda_status(const kvc_cache_t *c, cudaError_t e, const char *what) {
  if (e == cudaSuccess) return KVC_OK;
  kvc__log(c, KVC_LOG_ERROR, "%s: %s", what, cudaGetErrorString(e));
  return e == cudaErrorMemoryAllocation ? KVC_ERR_OUT_OF_MEMORY : KVC_ERR_CUDA;
}

#define KVC_CU(call)                                                                               \
  do {                                                                                             \
    cudaError_t e_ = (call);                                                                       \
    if (e_ != cudaSuccess) return cuda_status(c, e_, #call);                                       \
  } while (0)
#define KVC_LAUNCHED(kernel)                                                                       \
  do {                                                                                             \
    cudaError_t e_ = cudaGetLastError();                                                           \
    if (e_ != cudaSuccess) return cuda_status(c, e_, "launching " #kernel);                        \
  } while (0)

/* Makes the cache's device current for the scope of a backend call, and restores the caller's. */
struct device_scope {
  int prev = -1;
  cudaError_t err = cudaSuccess;
  explicit device_scope(int device) {
    err = cudaGetDevice(&prev);
    if (err != cudaSuccess || prev == device)
      prev = -1;
    else
      err = cudaSetDevice(device);
  }
  ~device_scope() {
    if (prev >= 0) cudaSetDevice(prev);
  }
};

#define KVC_ON_DEVICE(be)                                                                          \
  device_scope scope_((be)->device);                                                               \
  if (scope_.err != cudaSuccess) return cuda_status(c, scope_.err, "selecting the device")

/* Everything the cache enqueued before runs before what `stream` gets next. */
kvc_status_t enter(kvc_cache_t *c, cuda_be *be, void *stream) {
  if (stream == c->last_stream) return KVC_OK;
  KVC_CU(cudaEventRecord(be->order_event, static_cast<cudaStream_t>(c->last_stream)));
  KVC_CU(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), be->order_event, 0));
  c->last_stream = stream;
  return KVC_OK;
}

/* ---- kernels ------------------------------------------------------------------------------- */

/* The stack keeps runs of chunk ids in order: a pop hands out the top n, top first (the pool
 * starts with chunk 0 on top), and a push puts ids[0] on top, so a page's chunks tend to follow
 * each other in the pool and attention copies such a run at once (kvc_attn_cuda.cu: copy_bulk). */
__device__ bool pop_chunks(const kvc_dev_pool_t &p, uint32_t n, uint32_t *out) {
  int32_t old = atomicSub(p.free_top, (int32_t)n);
  if (old < (int32_t)n) {
    atomicAdd(p.free_top, (int32_t)n);
    atomicExch(p.error, kErrStackDry);
    return false;
  }
  for (uint32_t i = 0; i < n; i++) out[i] = p.free_stack[old - 1 - (int32_t)i];
  return true;
}

__device__ void push_chunks(const kvc_dev_pool_t &p, uint32_t n, const uint32_t *ids) {
  int32_t old = atomicAdd(p.free_top, (int32_t)n);
  for (uint32_t i = 0; i < n; i++) p.free_stack[old + (int32_t)i] = ids[n - 1 - i];
}

__device__ void clear_entry(kvc_page_entry_t *e) {
  e->nbytes = 0;
  e->kind = KVC_PAGE_EMPTY;
  e->nchunks = 0;
  e->codec = 0;
  e->first = 0;
}

__global__ void fill_stack_kernel(uint32_t *stack, uint32_t n) {
  uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) stack[i] = n - 1 - i; /* low chunk ids on top, as on the CPU */
}

__global__ void fill_i32_kernel(int32_t *a, int n, int32_t value) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) a[i] = value;
}

/* (1) Staging pages for new partial blocks, and for compress jobs whose block had none
 * (`staged` non-null: only where staged[i] == 0): one thread per block. */
__global__ void take_staging_kernel(kvc_page_entry_t *dir, const int32_t *blocks,
                                    const int32_t *staged, int n, uint32_t chunks, uint32_t bytes,
                                    kvc_dev_pool_t pool) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n || (staged && staged[i] > 0)) return;
  kvc_page_entry_t *e = &dir[blocks[i]];
  if (e->kind != KVC_PAGE_EMPTY) {
    atomicExch(pool.error, kErrEntryState);
    return;
  }
  if (!pop_chunks(pool, chunks, e->chunk)) return;
  e->nchunks = (uint8_t)chunks;
  e->nbytes = bytes;
  e->codec = 0;
  e->kind = KVC_PAGE_STAGING;
}

/* (2) One thread block per new row: its K and V rows of every head into its block's staging
 * page, in words of W. */
template <typename W>
__global__ void append_kernel(const uint8_t *k, const uint8_t *v, const int32_t *row_block,
                              const int32_t *row_slot, const kvc_page_entry_t *dir,
                              kvc_dev_pool_t pool, int heads, int block_tokens, int row_bytes) {
  const int r = blockIdx.x, slot = row_slot[r];
  const kvc_page_entry_t *e = &dir[row_block[r]];
  if (e->kind != KVC_PAGE_STAGING) {
    if (threadIdx.x == 0) atomicExch(pool.error, kErrEntryState);
    return;
  }
  const int wpr = row_bytes / (int)sizeof(W), total = 2 * heads * wpr;
  for (int w = threadIdx.x; w < total; w += blockDim.x) {
    const int t = w / (heads * wpr), h = (w / wpr) % heads, i = w % wpr;
    const W *src =
        reinterpret_cast<const W *>((t ? v : k) + ((size_t)r * heads + h) * row_bytes) + i;
    uint32_t off = kvc_staging_row_offset(t, h, slot, heads, block_tokens, row_bytes) +
                   (uint32_t)(i * sizeof(W));
    *reinterpret_cast<W *>(kvc_page_byte(pool.base, pool.chunk_bytes, e, off)) = *src;
  }
}

/* (3) A completed block's rows: its staging page -> its job's scratch block. */
__global__ void copy_staged_kernel(const int32_t *job_block, const int32_t *job_staged,
                                   const kvc_page_entry_t *dir, kvc_dev_pool_t pool,
                                   uint8_t *scratch, uint32_t staging_bytes, int heads,
                                   int block_tokens, int row_bytes) {
  const int j = blockIdx.x, staged = job_staged[j];
  if (staged == 0) return;
  const kvc_page_entry_t *e = &dir[job_block[j]];
  if (e->kind != KVC_PAGE_STAGING) {
    if (threadIdx.x == 0) atomicExch(pool.error, kErrEntryState);
    return;
  }
  const int wpr = row_bytes / 16, total = 2 * heads * staged * wpr;
  for (int w = threadIdx.x; w < total; w += blockDim.x) {
    const int i = w % wpr, tok = (w / wpr) % staged, h = (w / (wpr * staged)) % heads,
              t = w / (wpr * staged * heads);
    uint32_t off = kvc_staging_row_offset(t, h, tok, heads, block_tokens, row_bytes) + i * 16;
    *reinterpret_cast<uint4 *>(scratch + (size_t)j * staging_bytes + off) =
        *reinterpret_cast<const uint4 *>(kvc_page_byte(pool.base, pool.chunk_bytes, e, off));
  }
}

/* (3) Then the staging pages of the completed blocks go back: one thread per block. */
__global__ void give_staging_kernel(kvc_page_entry_t *dir, const int32_t *blocks, int n,
                                    kvc_dev_pool_t pool) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  kvc_page_entry_t *e = &dir[blocks[i]];
  if (e->kind != KVC_PAGE_STAGING) {
    atomicExch(pool.error, kErrEntryState);
    return;
  }
  push_chunks(pool, e->nchunks, e->chunk);
  clear_entry(e);
}

/* After (4): the codec each page got, for the host's statistics. */
__global__ void page_codec_kernel(const kvc_page_entry_t *dir, const int32_t *job_block, int n,
                                  uint8_t *codec) {
  int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j < n) codec[j] = dir[job_block[j]].codec;
}

/* Every layer's page of ids[0..n): one thread per (block, layer), each giving back the chunks
 * its page owns (not a shared chunk[0]); the block's packing cursor restarts. */
__global__ void free_kernel(id_list ids, int n, int layers, int max_blocks, kvc_page_entry_t *dir,
                            kvc_dev_pool_t pool, kvc_pack_cursor_t *cursor) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n * layers) return;
  if (i % layers == 0) cursor[ids.id[i / layers]].layer = -1;
  kvc_page_entry_t *e = &dir[(size_t)(i % layers) * max_blocks + ids.id[i / layers]];
  if (e->kind == KVC_PAGE_EMPTY) return;
  const uint32_t own = kvc_page_own_first(e);
  push_chunks(pool, e->nchunks - own, e->chunk + own);
  clear_entry(e);
}

/* Fork: one thread block per layer gives `dst` a staging page holding a copy of `src`'s. */
__global__ void copy_tail_kernel(int32_t src, int32_t dst, int max_blocks, kvc_page_entry_t *dir,
                                 kvc_dev_pool_t pool, uint32_t staging_chunks,
                                 uint32_t staging_bytes) {
  __shared__ int ok;
  const kvc_page_entry_t *s = &dir[(size_t)blockIdx.x * max_blocks + src];
  kvc_page_entry_t *d = &dir[(size_t)blockIdx.x * max_blocks + dst];
  if (threadIdx.x == 0) {
    ok = s->kind == KVC_PAGE_STAGING && d->kind == KVC_PAGE_EMPTY;
    if (!ok)
      atomicExch(pool.error, kErrEntryState);
    else
      ok = pop_chunks(pool, staging_chunks, d->chunk);
    if (ok) {
      d->nchunks = (uint8_t)staging_chunks;
      d->nbytes = staging_bytes;
      d->codec = 0;
      d->kind = KVC_PAGE_STAGING;
    }
  }
  __syncthreads();
  if (!ok) return;
  for (uint32_t off = threadIdx.x * 16u; off < staging_bytes; off += blockDim.x * 16u)
    *reinterpret_cast<uint4 *>(kvc_page_byte(pool.base, pool.chunk_bytes, d, off)) =
        *reinterpret_cast<const uint4 *>(kvc_page_byte(pool.base, pool.chunk_bytes, s, off));
}

__device__ uint64_t round16(uint64_t x) { return (x + 15u) & ~(uint64_t)15u; }

/* Swap-out copy: one thread block per (block, layer) writes the entry's header and its page into
 * the block's extent of mapped host memory (layout in kvc_cache_internal.h). The pages are freed
 * by a free_kernel launch after this one. */
__global__ void swap_out_kernel(swap_list list, int layers, int max_blocks,
                                const kvc_page_entry_t *dir, kvc_dev_pool_t pool, uint8_t *swap) {
  const int i = blockIdx.x / layers, l = blockIdx.x % layers;
  const int32_t b = list.block[i];
  const kvc_page_entry_t *e = &dir[(size_t)l * max_blocks + b];
  uint8_t *base = swap + list.off[i];
  uint64_t pos = round16((uint64_t)layers * KVC__SWAP_HDR_BYTES);
  for (int m = 0; m < l; m++) {
    const kvc_page_entry_t *o = &dir[(size_t)m * max_blocks + b];
    if (o->kind != KVC_PAGE_EMPTY) pos += round16(o->nbytes);
  }
  if (threadIdx.x == 0) memcpy(base + (size_t)l * KVC__SWAP_HDR_BYTES, e, KVC__SWAP_HDR_BYTES);
  if (e->kind == KVC_PAGE_EMPTY) return;
  const uint32_t words = (uint32_t)(round16(e->nbytes) / 16);
  for (uint32_t w = threadIdx.x; w < words; w += blockDim.x)
    *reinterpret_cast<uint4 *>(base + pos + (uint64_t)w * 16) =
        *reinterpret_cast<const uint4 *>(kvc_page_byte(pool.base, pool.chunk_bytes, e, w * 16));
}

/* Swap-in, first the chunks: one thread per block takes them for its pages in layer order, so that
 * a page that was packed packs again where it was and takes the chunks it took then (the block
 * manager charges what the pages measured). An entry it cannot fill stays EMPTY. */
__global__ void swap_in_take_kernel(swap_list list, int n, int layers, int max_blocks,
                                    kvc_page_entry_t *dir, kvc_dev_pool_t pool, const uint8_t *swap,
                                    uint32_t staging_chunks, kvc_pack_cursor_t *cursor) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int32_t b = list.block[i];
  const uint8_t *base = swap + list.off[i];
  const uint32_t cb = pool.chunk_bytes;
  kvc_pack_cursor_t cur = {-1, 0, 0};
  for (int l = 0; l < layers; l++) {
    kvc_page_entry_t saved;
    memcpy(&saved, base + (size_t)l * KVC__SWAP_HDR_BYTES, KVC__SWAP_HDR_BYTES);
    if (saved.kind == KVC_PAGE_EMPTY) continue;
    kvc_page_entry_t *e = &dir[(size_t)l * max_blocks + b];
    if (e->kind != KVC_PAGE_EMPTY) {
      atomicExch(pool.error, kErrEntryState);
      return;
    }
    const bool staging = saved.kind == KVC_PAGE_STAGING;
    const uint32_t first = !staging && saved.first ? kvc_pack_after(&cur, l, cb) : 0;
    const uint32_t n_new = staging ? staging_chunks : kvc_pack_popped(first, saved.nbytes, cb);
    if (!pop_chunks(pool, n_new, e->chunk + (first ? 1 : 0))) return;
    if (first) e->chunk[0] = cur.chunk;
    e->first = (uint8_t)first;
    e->nchunks = (uint8_t)(n_new + (first ? 1 : 0));
    e->nbytes = saved.nbytes;
    e->codec = saved.codec;
    e->kind = saved.kind;
    if (!staging) cur = kvc_pack_cursor_after(e, l, saved.nbytes, cb);
  }
  cursor[b] = cur;
}

/* Swap-in, then the bytes: one thread block per (block, layer) copies its page back. */
__global__ void swap_in_kernel(swap_list list, int layers, int max_blocks, kvc_page_entry_t *dir,
                               kvc_dev_pool_t pool, const uint8_t *swap) {
  const int i = blockIdx.x / layers, l = blockIdx.x % layers;
  const uint8_t *base = swap + list.off[i];
  kvc_page_entry_t saved;
  memcpy(&saved, base + (size_t)l * KVC__SWAP_HDR_BYTES, KVC__SWAP_HDR_BYTES);
  if (saved.kind == KVC_PAGE_EMPTY) return;
  uint64_t pos = round16((uint64_t)layers * KVC__SWAP_HDR_BYTES);
  for (int m = 0; m < l; m++) {
    kvc_page_entry_t o;
    memcpy(&o, base + (size_t)m * KVC__SWAP_HDR_BYTES, KVC__SWAP_HDR_BYTES);
    if (o.kind != KVC_PAGE_EMPTY) pos += round16(o.nbytes);
  }
  const kvc_page_entry_t *e = &dir[(size_t)l * max_blocks + list.block[i]];
  if (e->kind != saved.kind || e->nbytes != saved.nbytes) return; /* the take failed */
  const uint32_t words = (uint32_t)(round16(saved.nbytes) / 16);
  for (uint32_t w = threadIdx.x; w < words; w += blockDim.x)
    *reinterpret_cast<uint4 *>(kvc_page_byte(pool.base, pool.chunk_bytes, e, w * 16)) =
        *reinterpret_cast<const uint4 *>(base + pos + (uint64_t)w * 16);
}

int blocks_for(int n) { return (n + kThreads - 1) / kThreads; }

/* The page headers of n extents (KVC__SWAP_HDR_BYTES each, layer by layer at the extent's start),
 * gathered into out[n][layers]: one thread per header. */
static_assert(KVC__SWAP_HDR_BYTES == sizeof(uint64_t), "a header is one 8-byte word");
__global__ void gather_headers_kernel(const uint8_t *mem, const uint64_t *off, int n, int layers,
                                      uint64_t *out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= n * layers) return;
  const uint8_t *h = mem + off[t / layers] + (size_t)(t % layers) * KVC__SWAP_HDR_BYTES;
  uint64_t v = 0;
  for (int k = 0; k < (int)KVC__SWAP_HDR_BYTES; k++) v |= (uint64_t)h[k] << (8 * k);
  out[t] = v;
}

/* ---- the backend operations ---------------------------------------------------------------- */

void cuda_destroy(kvc_cache_t *c) {
  cuda_be *be = be_of(c);
  if (!be) return;
  {
    device_scope scope(be->device);
    /* Destroy is not on any hot path; the whole device is the simplest thing to wait for. */
    cudaDeviceSynchronize();
    cudaFree(be->pool.base);
    cudaFree(be->pool.free_stack);
    cudaFree(be->pool.free_top);
    cudaFree(be->pool.error);
    cudaFree(be->dir);
    cudaFree(be->scratch);
    cudaFree(be->full_tokens);
    cudaFree(be->page_bytes);
    cudaFree(be->page_codec);
    cudaFree(be->page_chunks);
    cudaFree(be->cursor);
    cudaFree(be->hdr_off);
    cudaFree(be->hdr);
    cudaFree(be->meta_dev);
    cudaFree(be->workspace);
    cudaFreeHost(be->meta_host);
    cudaFreeHost(be->sizes_host);
    cudaFreeHost(be->swap_host);
    /* Events not created yet are NULL (the state is zeroed at allocation). */
    if (be->order_event) cudaEventDestroy(be->order_event);
    for (int i = 0; i < kUploadSlots; i++)
      if (be->meta_event[i]) cudaEventDestroy(be->meta_event[i]);
    for (int i = 0; i < KVC__SIZE_SLOTS; i++)
      if (be->size_event[i]) cudaEventDestroy(be->size_event[i]);
    cudaGetLastError(); /* errors of the cleanup itself are not the caller's concern */
  }
  kvc_host_free(c->ha, be->cascade_host);
  kvc_host_free(c->ha, be->cascade_keys);
  kvc_host_free(c->ha, be);
  c->be = NULL;
}

size_t meta_bytes(const kvc__geometry_t *g) {
  size_t s = (size_t)g->max_plan_seqs, r = (size_t)g->max_rows, j = (size_t)g->max_jobs;
  /* qo_indptr, block_indptr; kv_len, new_staging; block_ids; row_block, row_slot; job_block,
   * job_staged; a cascade's prefix_qo_indptr, prefix_rows, prefix_kv_len, prefix_block_start,
   * suffix_kv_len, suffix_block_start: what cuda_plan packs. */
  return align16((s + 1) * 4) * 2 + align16(s * 4) * 2 + align16((size_t)g->max_table_entries * 4) +
         align16(r * 4) * 2 + align16(j * 4) * 2 + align16((s + 1) * 4) + align16(r * 4) +
         align16(s * 4) * 4;
}

kvc_status_t make_events(kvc_cache_t *c, cuda_be *be) {
  KVC_CU(cudaEventCreateWithFlags(&be->order_event, cudaEventDisableTiming));
  for (int i = 0; i < kUploadSlots; i++)
    KVC_CU(cudaEventCreateWithFlags(&be->meta_event[i], cudaEventDisableTiming));
  for (int i = 0; i < KVC__SIZE_SLOTS; i++)
    KVC_CU(cudaEventCreateWithFlags(&be->size_event[i], cudaEventDisableTiming));
  return KVC_OK;
}

kvc_status_t create_on_device(kvc_cache_t *c, cuda_be *be) {
  const kvc__geometry_t *g = &c->geo;
  const size_t L = (size_t)c->cfg.num_layers, J = (size_t)g->max_jobs;
  int count = 0;
  KVC_CU(cudaGetDeviceCount(&count));
  if (c->cfg.device < 0 || c->cfg.device >= count) {
    kvc__log(c, KVC_LOG_ERROR, "kvc_cache_create: device %d of %d", c->cfg.device, count);
    return KVC_ERR_INVALID_ARGUMENT;
  }
  KVC_ON_DEVICE(be);
  kvc_status_t st = make_events(c, be);
  if (st != KVC_OK) return st;
  be->pool.chunk_bytes = g->chunk_bytes;
  be->pool.num_chunks = g->total_chunks;
  KVC_CU(cudaMalloc(&be->pool.base, (size_t)g->total_chunks * g->chunk_bytes));
  KVC_CU(cudaMalloc(&be->pool.free_stack, (size_t)g->total_chunks * sizeof(uint32_t)));
  KVC_CU(cudaMalloc(&be->pool.free_top, sizeof(int32_t)));
  KVC_CU(cudaMalloc(&be->pool.error, sizeof(int32_t)));
  KVC_CU(cudaMalloc(&be->dir, L * (size_t)g->max_blocks * sizeof(kvc_page_entry_t)));
  KVC_CU(cudaMalloc(&be->scratch, J * g->staging_bytes));
  KVC_CU(cudaMalloc(&be->full_tokens, J * sizeof(int32_t)));
  KVC_CU(cudaMalloc(&be->page_bytes, L * J * sizeof(uint32_t)));
  KVC_CU(cudaMalloc(&be->page_codec, L * J));
  KVC_CU(cudaMalloc(&be->page_chunks, L * J));
  KVC_CU(cudaMalloc(&be->cursor, (size_t)g->max_blocks * sizeof(kvc_pack_cursor_t)));
  KVC_CU(cudaMalloc(&be->hdr_off, (size_t)g->max_seq_blocks * sizeof(uint64_t)));
  KVC_CU(cudaMalloc(&be->hdr, (size_t)g->max_seq_blocks * L * sizeof(uint64_t)));
  be->cascade_host = static_cast<int32_t *>(
      kvc_host_calloc(c->ha, 5 * (size_t)g->max_plan_seqs, sizeof(int32_t)));
  be->cascade_keys =
      static_cast<uint64_t *>(kvc_host_calloc(c->ha, (size_t)g->max_plan_seqs, sizeof(uint64_t)));
  if (!be->cascade_host || !be->cascade_keys) return KVC_ERR_OUT_OF_HOST_MEMORY;
  be->meta_cap = meta_bytes(g);
  KVC_CU(cudaMalloc(&be->meta_dev, be->meta_cap));
  KVC_CU(cudaHostAlloc(&be->meta_host, kUploadSlots * be->meta_cap, cudaHostAllocPortable));
  be->slot_stride = align16(L * J * 4) + 2 * align16(L * J) + 16;
  KVC_CU(cudaHostAlloc(&be->sizes_host, KVC__SIZE_SLOTS * be->slot_stride, cudaHostAllocPortable));
  be->workspace_bytes =
      kvc_attn_cuda_workspace_bytes(g->max_rows, c->cfg.num_q_heads, c->cfg.head_dim,
                                    g->max_plan_seqs, c->cfg.max_seq_len, c->cfg.block_tokens);
  if (be->workspace_bytes) KVC_CU(cudaMalloc(&be->workspace, be->workspace_bytes));
  if (c->cfg.swap_bytes) {
    KVC_CU(cudaHostAlloc(&be->swap_host, c->cfg.swap_bytes,
                         cudaHostAllocMapped | cudaHostAllocPortable));
    KVC_CU(cudaHostGetDevicePointer(reinterpret_cast<void **>(&be->swap_dev), be->swap_host, 0));
  }
  int32_t top = (int32_t)g->total_chunks;
  KVC_CU(cudaMemset(be->dir, 0, L * (size_t)g->max_blocks * sizeof(kvc_page_entry_t)));
  KVC_CU(cudaMemset(be->pool.error, 0, sizeof(int32_t)));
  /* Every cursor's layer -1: no page to pack after. */
  KVC_CU(cudaMemset(be->cursor, 0xff, (size_t)g->max_blocks * sizeof(kvc_pack_cursor_t)));
  KVC_CU(cudaMemcpy(be->pool.free_top, &top, sizeof(top), cudaMemcpyHostToDevice));
  fill_stack_kernel<<<(g->total_chunks + 255) / 256, 256>>>(be->pool.free_stack, g->total_chunks);
  KVC_LAUNCHED(fill_stack_kernel);
  fill_i32_kernel<<<blocks_for((int)J), kThreads>>>(be->full_tokens, (int)J, c->cfg.block_tokens);
  KVC_LAUNCHED(fill_i32_kernel);
  KVC_CU(cudaDeviceSynchronize());
  return KVC_OK;
}

kvc_status_t cuda_create(kvc_cache_t *c) {
  cuda_be *be = static_cast<cuda_be *>(kvc_host_calloc(c->ha, 1, sizeof(cuda_be)));
  if (!be) return KVC_ERR_OUT_OF_HOST_MEMORY;
  be->device = c->cfg.device;
  c->be = be;
  kvc_status_t st = create_on_device(c, be);
  if (st != KVC_OK) {
    cudaGetLastError(); /* a failed cudaMalloc leaves its error behind; not ours to keep */
    cuda_destroy(c);
  }
  return st;
}

/* Takes `n` int32 of the upload buffer at *off (16-byte aligned): their host address, and their
 * device address in *dev. */
int32_t *take(cuda_be *be, uint8_t *host, size_t *off, int n, const int32_t **dev) {
  int32_t *h = reinterpret_cast<int32_t *>(host + *off);
  *dev = reinterpret_cast<const int32_t *>(be->meta_dev + *off);
  *off += align16((size_t)n * sizeof(int32_t));
  return h;
}

/* Copies `n` int32 into the upload buffer at *off; returns the device address. */
const int32_t *pack(cuda_be *be, uint8_t *host, size_t *off, const int32_t *src, int n) {
  const int32_t *dev;
  int32_t *h = take(be, host, off, n, &dev);
  if (n > 0) memcpy(h, src, (size_t)n * sizeof(int32_t));
  return dev;
}

/* The cascade of a step whose sequences share prefixes (kvc_attn_args_t::prefix_seqs), when
 * kvc_config_t::cascade asks for it and, at 1, the attention's cost model expects a gain
 * (kvc_attn_cuda_cascade_pays): the groups (kvc_bm_plan_prefix_groups), then their arrays into
 * the upload buffer. */
void plan_cascade(const kvc_cache_t *c, cuda_be *be, uint8_t *host, size_t *off,
                  kvc_attn_args_t *a) {
  const kvc_bm_plan_t *p = &c->plan;
  const int ns = p->num_seqs, bt = c->cfg.block_tokens;
  int32_t *seq_group = be->cascade_host, *blocks = seq_group + ns, *rows = blocks + ns;
  int32_t *tokens = rows + ns, *seq_rows = tokens + ns;
  const int groups = kvc_bm_plan_prefix_groups(p, bt, seq_group, blocks, be->cascade_keys);
  if (groups == 0) return;
  for (int g = 0; g < groups; g++) {
    rows[g] = 0;
    tokens[g] = blocks[g] * bt;
  }
  int grouped = 0; /* rows of sequences in a group */
  for (int s = 0; s < ns; s++) {
    seq_rows[s] = p->qo_indptr[s + 1] - p->qo_indptr[s];
    if (seq_group[s] >= 0) rows[seq_group[s]] += seq_rows[s], grouped += seq_rows[s];
  }
  if (c->cfg.cascade == 1 &&
      !kvc_attn_cuda_cascade_pays(a, groups, rows, tokens, seq_rows, seq_group))
    return;
  /* The first launch's sequences: the groups, then (if any) one of no tokens for the rest. */
  const int np = groups + (grouped < p->total_rows);
  int32_t *qo = take(be, host, off, np + 1, &a->prefix_qo_indptr);
  int32_t *map = take(be, host, off, p->total_rows, &a->prefix_rows);
  int32_t *kv = take(be, host, off, np, &a->prefix_kv_len);
  int32_t *start = take(be, host, off, np, &a->prefix_block_start);
  int32_t *skv = take(be, host, off, ns, &a->suffix_kv_len);
  int32_t *sstart = take(be, host, off, ns, &a->suffix_block_start);
  qo[0] = 0;
  a->prefix_max_rows = a->prefix_max_tokens = a->suffix_max_tokens = 0;
  for (int g = 0; g < np; g++) {
    const int r = g < groups ? rows[g] : p->total_rows - grouped;
    qo[g + 1] = qo[g] + r;
    kv[g] = g < groups ? tokens[g] : 0;
    start[g] = 0;
    if (r > a->prefix_max_rows) a->prefix_max_rows = r;
    if (kv[g] > a->prefix_max_tokens) a->prefix_max_tokens = kv[g];
  }
  /* Rows in sequence order within each first-launch sequence; its table starts at any member's
   * (they hold the prefix at the same places). */
  int32_t *at = rows; /* reused: the next free row of each */
  for (int g = 0; g < np; g++) at[g] = qo[g];
  for (int s = 0; s < ns; s++) {
    const int g = seq_group[s] >= 0 ? seq_group[s] : groups;
    for (int r = p->qo_indptr[s]; r < p->qo_indptr[s + 1]; r++) map[at[g]++] = r;
    const int pb = g < groups ? blocks[g] : 0;
    if (g < groups) start[g] = p->block_indptr[s];
    skv[s] = p->kv_len[s] - pb * bt;
    sstart[s] = p->block_indptr[s] + pb;
    if (skv[s] > a->suffix_max_tokens) a->suffix_max_tokens = skv[s];
  }
  a->prefix_seqs = np;
}

kvc_status_t cuda_plan(kvc_cache_t *c, void *stream) {
  cuda_be *be = be_of(c);
  const kvc_bm_plan_t *p = &c->plan;
  KVC_ON_DEVICE(be);
  kvc_status_t st = enter(c, be, stream);
  if (st != KVC_OK) return st;
  const int k = be->meta_next;
  be->meta_next = (k + 1) % kUploadSlots;
  /* Backpressure only: the host is kUploadSlots plans ahead of the device. */
  if (be->meta_pending[k]) KVC_CU(cudaEventSynchronize(be->meta_event[k]));
  uint8_t *host = be->meta_host + (size_t)k * be->meta_cap;
  size_t off = 0;
  const int ns = p->num_seqs;
  kvc_attn_args_t a;
  memset(&a, 0, sizeof(a));
  a.qo_indptr = pack(be, host, &off, p->qo_indptr, ns + 1);
  a.kv_len = pack(be, host, &off, p->kv_len, ns);
  a.block_indptr = pack(be, host, &off, p->block_indptr, ns + 1);
  a.block_ids = pack(be, host, &off, p->block_ids, p->block_indptr[ns]);
  be->d_row_block = pack(be, host, &off, p->row_block, p->total_rows);
  be->d_row_slot = pack(be, host, &off, p->row_slot, p->total_rows);
  be->d_job_block = pack(be, host, &off, p->job_block, p->num_jobs);
  be->d_job_staged = pack(be, host, &off, p->job_staged, p->num_jobs);
  be->d_new_staging = pack(be, host, &off, p->new_staging, p->num_new_staging);

  int max_qo = 0;
  for (int s = 0; s < ns; s++) {
    int n = p->qo_indptr[s + 1] - p->qo_indptr[s];
    if (n > max_qo) max_qo = n;
  }
  a.num_q_heads = c->cfg.num_q_heads;
  a.num_kv_heads = c->cfg.num_kv_heads;
  a.head_dim = c->cfg.head_dim;
  a.block_tokens = c->cfg.block_tokens;
  a.dtype = c->cfg.dtype;
  a.num_seqs = ns;
  a.total_q_rows = p->total_rows;
  a.max_kv_len = p->max_kv_len;
  a.max_qo_len = max_qo;
  /* The codecs this cache's pages can use: FIXED codes every block with its codec, or raw when
   * that cannot code it; the other policies choose per page among all three. */
  a.codec_mask = c->cfg.policy == KVC_POLICY_FIXED
                     ? (1u << KVC_CODEC_RAW) | (1u << c->cfg.codec)
                     : (1u << KVC_CODEC_RAW) | (1u << KVC_CODEC_BITPACK) | (1u << KVC_CODEC_HUFFMAN);
  /* Those policies' pages are often all of one codec (FASTEST_WITHIN's default budget takes
   * bit-pack wherever it fits). Where at most one measured page in 1024 is Huffman coded, v3 runs
   * in two passes (kvc_attn_args_t.huffman_rare): on the bench's shape a CTA reads ~100 pages, so
   * ~10% of the CTAs then read theirs twice, against every page in the slower instance. Only
   * launches with enough tokens gain (kvc_attn_cuda_two_passes_pay). */
  const int64_t *by = c->pages_by_codec;
  int64_t kv_tokens = 0;
  for (int s = 0; s < ns; s++) kv_tokens += p->kv_len[s];
  a.huffman_rare = c->cfg.policy != KVC_POLICY_FIXED && by[KVC_CODEC_BITPACK] > 0 &&
                   by[KVC_CODEC_HUFFMAN] * 1024 <= by[KVC_CODEC_BITPACK] &&
                   kvc_attn_cuda_two_passes_pay(&a, kv_tokens);
  a.pool = be->pool.base;
  a.chunk_bytes = be->pool.chunk_bytes;
  a.workspace = be->workspace;
  a.workspace_bytes = be->workspace_bytes;
  a.cascade = c->cfg.cascade;
  if (c->cfg.cascade && ns >= 2) plan_cascade(c, be, host, &off, &a);
  KVC_CU(cudaMemcpyAsync(be->meta_dev, host, off, cudaMemcpyHostToDevice,
                         static_cast<cudaStream_t>(stream)));
  KVC_CU(cudaEventRecord(be->meta_event[k], static_cast<cudaStream_t>(stream)));
  be->meta_pending[k] = 1;
  be->attn = a;
  return KVC_OK;
}

/* kvc_store on the device, the steps numbered as in kvc_cache.c. */
kvc_status_t cuda_store(kvc_cache_t *c, int layer, const void *k, const void *v, void *stream) {
  cuda_be *be = be_of(c);
  const kvc_bm_plan_t *p = &c->plan;
  const kvc__geometry_t *g = &c->geo;
  const int H = c->cfg.num_kv_heads, bt = c->cfg.block_tokens, rb = (int)g->row_bytes;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  KVC_ON_DEVICE(be);
  kvc_status_t st = enter(c, be, stream);
  if (st != KVC_OK) return st;
  kvc_page_entry_t *dir = be->dir + (size_t)layer * (size_t)g->max_blocks;
  if (p->num_new_staging > 0) {
    take_staging_kernel<<<blocks_for(p->num_new_staging), kThreads, 0, s>>>(
        dir, be->d_new_staging, nullptr, p->num_new_staging, g->staging_chunks, g->staging_bytes,
        be->pool);
    KVC_LAUNCHED(take_staging_kernel);
  }
  if (p->num_jobs > 0) {
    take_staging_kernel<<<blocks_for(p->num_jobs), kThreads, 0, s>>>(
        dir, be->d_job_block, be->d_job_staged, p->num_jobs, g->staging_chunks, g->staging_bytes,
        be->pool);
    KVC_LAUNCHED(take_staging_kernel);
  }
  if (p->total_rows > 0) {
    const uint8_t *kb = static_cast<const uint8_t *>(k), *vb = static_cast<const uint8_t *>(v);
    if ((reinterpret_cast<uintptr_t>(k) | reinterpret_cast<uintptr_t>(v)) % 16 == 0)
      append_kernel<uint4><<<p->total_rows, kThreads, 0, s>>>(
          kb, vb, be->d_row_block, be->d_row_slot, dir, be->pool, H, bt, rb);
    else
      append_kernel<uint16_t><<<p->total_rows, kThreads, 0, s>>>(
          kb, vb, be->d_row_block, be->d_row_slot, dir, be->pool, H, bt, rb);
    KVC_LAUNCHED(append_kernel);
  }
  return KVC_OK;
}

/* The deferred compression of `layer`: the last plan's jobs, read from its upload. */
kvc_status_t cuda_compress(kvc_cache_t *c, int layer, void *stream) {
  cuda_be *be = be_of(c);
  const kvc__geometry_t *g = &c->geo;
  const int H = c->cfg.num_kv_heads, bt = c->cfg.block_tokens, rb = (int)g->row_bytes;
  const int n = c->step_num_jobs;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  KVC_ON_DEVICE(be);
  kvc_status_t st = enter(c, be, stream);
  if (st != KVC_OK || n == 0) return st;
  kvc_page_entry_t *dir = be->dir + (size_t)layer * (size_t)g->max_blocks;
  copy_staged_kernel<<<n, kThreads, 0, s>>>(be->d_job_block, be->full_tokens, dir, be->pool,
                                            be->scratch, g->staging_bytes, H, bt, rb);
  KVC_LAUNCHED(copy_staged_kernel);
  give_staging_kernel<<<blocks_for(n), kThreads, 0, s>>>(dir, be->d_job_block, n, be->pool);
  KVC_LAUNCHED(give_staging_kernel);
  size_t at = (size_t)layer * (size_t)g->max_jobs;
  st = kvc_codec_cuda_compress_packed(&c->codec, be->scratch, be->full_tokens, be->d_job_block, n,
                                      dir, be->pool, be->page_bytes + at, be->cursor, layer,
                                      be->page_chunks + at, stream);
  if (st != KVC_OK) return st;
  page_codec_kernel<<<blocks_for(n), kThreads, 0, s>>>(dir, be->d_job_block, n,
                                                       be->page_codec + at);
  KVC_LAUNCHED(page_codec_kernel);
  return KVC_OK;
}

kvc_status_t cuda_attend(kvc_cache_t *c, int layer, const void *q, void *out, float scale,
                         void *stream) {
  cuda_be *be = be_of(c);
  KVC_ON_DEVICE(be);
  kvc_status_t st = enter(c, be, stream);
  if (st != KVC_OK) return st;
  kvc_attn_args_t a = be->attn;
  a.dir = be->dir + (size_t)layer * (size_t)c->geo.max_blocks;
  a.q = q;
  a.out = out;
  a.scale = scale;
  return kvc_attn_cuda(&a, stream);
}

uint32_t *slot_bytes(cuda_be *be, int slot) {
  return reinterpret_cast<uint32_t *>(be->sizes_host + (size_t)slot * be->slot_stride);
}

kvc_status_t cuda_sizes_fetch(kvc_cache_t *c, int slot, int num_jobs, void *stream) {
  cuda_be *be = be_of(c);
  const size_t L = (size_t)c->cfg.num_layers, J = (size_t)c->geo.max_jobs;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  KVC_ON_DEVICE(be);
  kvc_status_t st = enter(c, be, stream);
  if (st != KVC_OK) return st;
  uint8_t *base = be->sizes_host + (size_t)slot * be->slot_stride;
  uint8_t *codecs = base + align16(L * J * 4), *chunks = codecs + align16(L * J);
  int32_t *error = reinterpret_cast<int32_t *>(chunks + align16(L * J));
  KVC_CU(cudaMemcpy2DAsync(base, J * 4, be->page_bytes, J * 4, (size_t)num_jobs * 4, L,
                           cudaMemcpyDeviceToHost, s));
  KVC_CU(cudaMemcpy2DAsync(codecs, J, be->page_codec, J, (size_t)num_jobs, L,
                           cudaMemcpyDeviceToHost, s));
  KVC_CU(cudaMemcpy2DAsync(chunks, J, be->page_chunks, J, (size_t)num_jobs, L,
                           cudaMemcpyDeviceToHost, s));
  KVC_CU(cudaMemcpyAsync(error, be->pool.error, sizeof(int32_t), cudaMemcpyDeviceToHost, s));
  KVC_CU(cudaEventRecord(be->size_event[slot], s));
  return KVC_OK;
}

kvc_status_t cuda_sizes_poll(kvc_cache_t *c, int slot, int wait, int *ready, const uint32_t **bytes,
                             const uint8_t **codecs, const uint8_t **chunks) {
  cuda_be *be = be_of(c);
  const size_t L = (size_t)c->cfg.num_layers, J = (size_t)c->geo.max_jobs;
  KVC_ON_DEVICE(be);
  cudaError_t e =
      wait ? cudaEventSynchronize(be->size_event[slot]) : cudaEventQuery(be->size_event[slot]);
  *ready = 0;
  if (e == cudaErrorNotReady) return KVC_OK;
  KVC_CU(e);
  uint8_t *base = be->sizes_host + (size_t)slot * be->slot_stride;
  const int32_t *error =
      reinterpret_cast<const int32_t *>(base + align16(L * J * 4) + 2 * align16(L * J));
  if (*error) {
    kvc__log(c, KVC_LOG_ERROR, "device reported pool error %d (%s)", *error,
             *error == kErrStackDry ? "free stack ran dry" : "directory entry in the wrong state");
    return KVC_ERR_INTERNAL;
  }
  *ready = 1;
  *bytes = slot_bytes(be, slot);
  *codecs = base + align16(L * J * 4);
  *chunks = *codecs + align16(L * J);
  return KVC_OK;
}

kvc_status_t cuda_free_pages(kvc_cache_t *c, const int32_t *blocks, int n, void *stream) {
  cuda_be *be = be_of(c);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int L = c->cfg.num_layers;
  KVC_ON_DEVICE(be);
  kvc_status_t st = enter(c, be, stream);
  if (st != KVC_OK) return st;
  for (int first = 0; first < n; first += kIdsPerLaunch) {
    int m = n - first < kIdsPerLaunch ? n - first : kIdsPerLaunch;
    id_list ids;
    memcpy(ids.id, blocks + first, (size_t)m * sizeof(int32_t));
    free_kernel<<<blocks_for(m * L), kThreads, 0, s>>>(ids, m, L, c->geo.max_blocks, be->dir,
                                                       be->pool, be->cursor);
    KVC_LAUNCHED(free_kernel);
  }
  return KVC_OK;
}

kvc_status_t cuda_copy_tail(kvc_cache_t *c, int32_t src, int32_t dst, void *stream) {
  cuda_be *be = be_of(c);
  KVC_ON_DEVICE(be);
  kvc_status_t st = enter(c, be, stream);
  if (st != KVC_OK) return st;
  copy_tail_kernel<<<c->cfg.num_layers, 256, 0, static_cast<cudaStream_t>(stream)>>>(
      src, dst, c->geo.max_blocks, be->dir, be->pool, c->geo.staging_chunks, c->geo.staging_bytes);
  KVC_LAUNCHED(copy_tail_kernel);
  return KVC_OK;
}

/* Swap-out (out: copies to mem, then frees the pages when `release`) or swap-in (from mem);
 * mem NULL: the cache's swap memory. */
kvc_status_t cuda_swap(kvc_cache_t *c, const int32_t *blocks, const uint64_t *offsets, int n,
                       const void *mem, int out, int release, void *stream) {
  cuda_be *be = be_of(c);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int L = c->cfg.num_layers;
  KVC_ON_DEVICE(be);
  kvc_status_t st = enter(c, be, stream);
  if (st != KVC_OK) return st;
  uint8_t *base = mem ? static_cast<uint8_t *>(const_cast<void *>(mem)) : be->swap_dev;
  for (int first = 0; first < n; first += kSwapPerLaunch) {
    int m = n - first < kSwapPerLaunch ? n - first : kSwapPerLaunch;
    swap_list list;
    memcpy(list.block, blocks + first, (size_t)m * sizeof(int32_t));
    memcpy(list.off, offsets + first, (size_t)m * sizeof(uint64_t));
    if (out) {
      swap_out_kernel<<<m * L, kThreads, 0, s>>>(list, L, c->geo.max_blocks, be->dir, be->pool,
                                                 base);
      KVC_LAUNCHED(swap_out_kernel);
      if (!release) continue;
      id_list ids;
      memcpy(ids.id, blocks + first, (size_t)m * sizeof(int32_t));
      free_kernel<<<blocks_for(m * L), kThreads, 0, s>>>(ids, m, L, c->geo.max_blocks, be->dir,
                                                         be->pool, be->cursor);
      KVC_LAUNCHED(free_kernel);
    } else {
      swap_in_take_kernel<<<blocks_for(m), kThreads, 0, s>>>(list, m, L, c->geo.max_blocks,
                                                             be->dir, be->pool, base,
                                                             c->geo.staging_chunks, be->cursor);
      KVC_LAUNCHED(swap_in_take_kernel);
      swap_in_kernel<<<m * L, kThreads, 0, s>>>(list, L, c->geo.max_blocks, be->dir, be->pool,
                                                base);
      KVC_LAUNCHED(swap_in_kernel);
    }
  }
  return KVC_OK;
}

kvc_status_t cuda_swap_out(kvc_cache_t *c, const int32_t *blocks, const uint64_t *offsets, int n,
                           void *mem, int release, void *stream) {
  return cuda_swap(c, blocks, offsets, n, mem, 1, release, stream);
}

kvc_status_t cuda_swap_in(kvc_cache_t *c, const int32_t *blocks, const uint64_t *offsets, int n,
                          const void *mem, void *stream) {
  return cuda_swap(c, blocks, offsets, n, mem, 0, 0, stream);
}

kvc_status_t cuda_read_swap_headers(kvc_cache_t *c, const void *mem, const uint64_t *offsets,
                                    int n, uint8_t *out, void *stream) {
  cuda_be *be = be_of(c);
  KVC_ON_DEVICE(be);
  kvc_status_t st = enter(c, be, stream);
  if (st != KVC_OK) return st;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int L = c->cfg.num_layers;
  KVC_CU(cudaMemcpyAsync(be->hdr_off, offsets, (size_t)n * sizeof(uint64_t),
                         cudaMemcpyHostToDevice, s));
  gather_headers_kernel<<<blocks_for(n * L), kThreads, 0, s>>>(static_cast<const uint8_t *>(mem),
                                                               be->hdr_off, n, L, be->hdr);
  KVC_LAUNCHED(gather_headers_kernel);
  KVC_CU(cudaMemcpyAsync(out, be->hdr, (size_t)n * L * sizeof(uint64_t), cudaMemcpyDeviceToHost,
                         s));
  KVC_CU(cudaStreamSynchronize(s));
  return KVC_OK;
}

kvc_status_t cuda_copy_bytes(kvc_cache_t *c, void *dst, const void *src, size_t bytes,
                             int host_to_backend, void *stream) {
  cuda_be *be = be_of(c);
  KVC_ON_DEVICE(be);
  kvc_status_t st = enter(c, be, stream);
  if (st != KVC_OK) return st;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  KVC_CU(cudaMemcpyAsync(dst, src, bytes,
                         host_to_backend ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost, s));
  KVC_CU(cudaStreamSynchronize(s));
  return KVC_OK;
}

kvc_status_t cuda_synchronize(kvc_cache_t *c) {
  cuda_be *be = be_of(c);
  KVC_ON_DEVICE(be);
  KVC_CU(cudaStreamSynchronize(static_cast<cudaStream_t>(c->last_stream)));
  return KVC_OK;
}

kvc_status_t cuda_read_state(kvc_cache_t *c, kvc_page_entry_t *dir, uint32_t *free_stack,
                             int32_t *free_top) {
  cuda_be *be = be_of(c);
  KVC_ON_DEVICE(be);
  int32_t error = 0;
  KVC_CU(cudaStreamSynchronize(static_cast<cudaStream_t>(c->last_stream)));
  KVC_CU(cudaMemcpy(dir, be->dir,
                    (size_t)c->cfg.num_layers * (size_t)c->geo.max_blocks * sizeof(*dir),
                    cudaMemcpyDeviceToHost));
  KVC_CU(cudaMemcpy(free_top, be->pool.free_top, sizeof(int32_t), cudaMemcpyDeviceToHost));
  KVC_CU(cudaMemcpy(&error, be->pool.error, sizeof(int32_t), cudaMemcpyDeviceToHost));
  if (error || *free_top < 0 || (uint32_t)*free_top > c->geo.total_chunks) {
    kvc__log(c, KVC_LOG_ERROR, "device pool: error flag %d, free stack top %d", error, *free_top);
    return KVC_ERR_INTERNAL;
  }
  KVC_CU(cudaMemcpy(free_stack, be->pool.free_stack, (size_t)*free_top * sizeof(uint32_t),
                    cudaMemcpyDeviceToHost));
  return KVC_OK;
}

kvc_status_t cuda_read_entry(kvc_cache_t *c, int layer, int32_t block, kvc_page_entry_t *e) {
  cuda_be *be = be_of(c);
  KVC_ON_DEVICE(be);
  KVC_CU(cudaStreamSynchronize(static_cast<cudaStream_t>(c->last_stream)));
  KVC_CU(cudaMemcpy(e, be->dir + (size_t)layer * (size_t)c->geo.max_blocks + (size_t)block,
                    sizeof(*e), cudaMemcpyDeviceToHost));
  return KVC_OK;
}

kvc_status_t cuda_read_page(kvc_cache_t *c, const kvc_page_entry_t *e, uint8_t *out) {
  cuda_be *be = be_of(c);
  const uint32_t cb = c->geo.chunk_bytes;
  KVC_ON_DEVICE(be);
  KVC_CU(cudaStreamSynchronize(static_cast<cudaStream_t>(c->last_stream)));
  for (uint32_t off = 0, n; off < e->nbytes; off += n) {
    const uint32_t room = kvc_page_run(e, cb, off);
    n = e->nbytes - off < room ? e->nbytes - off : room;
    KVC_CU(cudaMemcpy(out + off, kvc_page_byte(be->pool.base, cb, e, off), n,
                      cudaMemcpyDeviceToHost));
  }
  return KVC_OK;
}

size_t cuda_overhead_bytes(const kvc_cache_t *c) {
  const cuda_be *be = be_of(c);
  const kvc__geometry_t *g = &c->geo;
  const size_t L = (size_t)c->cfg.num_layers, J = (size_t)g->max_jobs;
  return L * (size_t)g->max_blocks * sizeof(kvc_page_entry_t) + (size_t)g->total_chunks * 4 +
         J * g->staging_bytes + J * 4 + L * J * 6 + be->meta_cap * (1 + kUploadSlots) +
         KVC__SIZE_SLOTS * be->slot_stride + be->workspace_bytes +
         (size_t)g->max_blocks * sizeof(kvc_pack_cursor_t) +
         (size_t)g->max_seq_blocks * (L + 1) * sizeof(uint64_t);
}

size_t cuda_host_data_bytes(const kvc_cache_t *) { return 0; }

} // namespace

extern "C" const kvc__backend_ops_t kvc__backend_cuda = {
    "cuda",          cuda_create,     cuda_destroy,        cuda_plan,
    cuda_store,      cuda_compress,   cuda_attend,         cuda_sizes_fetch,
    cuda_sizes_poll, cuda_free_pages, cuda_copy_tail,      cuda_swap_out,
    cuda_swap_in,    cuda_read_swap_headers, cuda_copy_bytes,   cuda_synchronize,
    cuda_read_state, cuda_read_entry, cuda_read_page,  cuda_overhead_bytes,
    cuda_host_data_bytes,
};

/* ---- test accessor (kvc_cache_test.h) ------------------------------------------------------- */

extern "C" int kvc__cache_cuda_kernel(const kvc_cache_t *c) {
  if (c->ops != &kvc__backend_cuda || !c->be) return -1;
  return kvc_attn_cuda_kernel(&be_of(c)->attn);
}
