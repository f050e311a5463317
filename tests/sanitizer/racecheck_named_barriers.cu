/*
 * Shows a false report of compute-sanitizer's racecheck that gpu_test_attn's
 * huffman_damage_gives_nan meets in attention kernel v2 at head_dim 256 (bench/NOTES-attention.md,
 * session 28). Not part of the build; on a GPU machine:
 *
 *   nvcc -O2 -lineinfo -arch=sm_90a racecheck_named_barriers.cu -o rnb
 *   compute-sanitizer --tool racecheck ./rnb 0   # 0 hazards
 *   compute-sanitizer --tool racecheck ./rnb 1   # 1 hazard (128), between lines marked W and R
 *
 * The kernel copies v2's barrier pattern: four consumer warps in two pairs, each pair with its
 * own named barrier of 64 threads (as decode_quant's pair_sync / pair_any), a barrier of the four
 * (consumers_any), and a fifth warp that stays out of both; then the epilogue's
 * __syncthreads_or, a store by every consumer warp (W), __syncthreads, and loads of every warp's
 * stores (R). W and R are ordered by the __syncthreads in both modes. With `unbalanced` set, pair 1
 * leaves its last item after two of its three pair barriers (as a pair does on a damaged
 * section), and racecheck reports W against R (on the lent H200). The tool appears to count a named
 * barrier that only some warps run as a step of the whole CTA, so those warps' accesses land one
 * barrier apart from the others' from then on. compute-sanitizer's synccheck reports no error for
 * gpu_test_attn's case (the barriers are used correctly). The GPU codec's compress kernel had
 * the same pattern (a named barrier of warps 1-7) and 95 such reports in gpu_test_codec until it
 * staged without it.
 */
#include <cstdio>
#include <cstdlib>

__device__ __forceinline__ void pair_sync(int bar) {
  asm volatile("bar.sync %0, 64;\n" ::"r"(bar) : "memory");
}

__device__ __forceinline__ bool pair_any(bool x, int bar) {
  unsigned r;
  asm volatile("{\n .reg .pred p, q;\n setp.ne.u32 p, %1, 0;\n bar.red.or.pred q, %2, 64, p;\n"
               " selp.u32 %0, 1, 0, q;\n}\n"
               : "=r"(r)
               : "r"((unsigned)x), "r"(bar)
               : "memory");
  return r != 0;
}

__device__ __forceinline__ bool consumers_any(bool x) {
  unsigned r;
  asm volatile("{\n .reg .pred p, q;\n setp.ne.u32 p, %1, 0;\n bar.red.or.pred q, 1, 128, p;\n"
               " selp.u32 %0, 1, 0, q;\n}\n"
               : "=r"(r)
               : "r"((unsigned)x)
               : "memory");
  return r != 0;
}

__global__ void kernel(bool unbalanced, int items, float *out) {
  __shared__ float scratch[4][32];
  __shared__ float stats[64];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  bool bad = false;
  if (warp < 4) {
    const int pair = warp >> 1, bar = 2 + pair;
    for (int it = 0; it < items; it++) {
      pair_sync(bar);
      scratch[warp][lane] = (float)(it + lane);
      const bool fail = unbalanced && pair == 1 && it == items - 1;
      const bool ok = !pair_any(fail, bar);
      if (ok) {
        const float s = scratch[warp ^ 1][(lane + 1) & 31];
        pair_sync(bar);
        scratch[warp][lane] = s + 1.f;
      }
      bad |= consumers_any(!ok);
    }
  }
  const bool cta_bad = __syncthreads_or(bad);
  if (warp < 4 && (lane & 3) == 0) stats[warp * 16 + (lane >> 2)] = (float)(warp + lane); /* W */
  __syncthreads();
  if (warp == 4) return;
  float acc = 0.f;
  for (int w = 0; w < 4; w++) acc += stats[w * 16 + (threadIdx.x & 15)]; /* R */
  out[blockIdx.x * 128 + threadIdx.x] = cta_bad ? -acc : acc;
}

int main(int argc, char **argv) {
  const bool unbalanced = argc > 1 && atoi(argv[1]) != 0;
  float *out = nullptr;
  if (cudaMalloc(&out, 4 * 128 * sizeof(float)) != cudaSuccess) return 1;
  kernel<<<4, 160>>>(unbalanced, 5, out);
  const cudaError_t e = cudaDeviceSynchronize();
  printf("unbalanced %d: %s\n", (int)unbalanced, cudaGetErrorString(e));
  cudaFree(out);
  return e == cudaSuccess ? 0 : 1;
}
