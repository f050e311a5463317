/*
 * PTX wrappers of the CUDA attention kernels (attention/kvc_attn_cuda.cu, kvc_attn_v3.cuh,
 * kvc_attn_v3_huf.cuh): shared-memory addresses, mbarriers, bulk copies, the consumers' named
 * barriers, ldmatrix, mma.sync and, built for sm_90a, wgmma. Device code only; include from CUDA
 * sources.
 */
#ifndef KVC_ATTN_PTX_CUH
#define KVC_ATTN_PTX_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

namespace kvc_attn {
__device__ __forceinline__ uint32_t smem_u32(const void *p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar)
               : "memory");
}
/* Adds `bytes` to the transaction count the current phase of `bar` waits for. */
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
/* Bulk copy (the TMA engine) of `bytes` (a multiple of 16, both addresses 16-byte aligned) from
 * global src to shared dst, counted against mbarrier `bar` on completion. */
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void *src, uint32_t bytes,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
      ::"r"(dst), "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred P1;\n"
      "LAB_WAIT:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      " @P1 bra DONE;\n"
      " bra LAB_WAIT;\n"
      "DONE:\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
/* Barrier of the N consumer threads that also ORs `x` over them. */
template <int N> __device__ __forceinline__ bool consumers_any(bool x) {
  uint32_t r;
  asm volatile(
      "{\n .reg .pred p, q;\n setp.ne.u32 p, %1, 0;\n bar.red.or.pred q, 1, %2, p;\n"
      " selp.u32 %0, 1, 0, q;\n}\n"
      : "=r"(r)
      : "r"((uint32_t)x), "n"(N)
      : "memory");
  return r != 0;
}
template <int N> __device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 1, %0;\n" ::"n"(N) : "memory");
}
/* wgmma needs the architecture-specific target sm_90a (CMAKE_CUDA_ARCHITECTURES 90a, the
 * default); built for plain sm_90, v2 runs mma.sync everywhere. */
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr bool kHaveWgmma = true;
#else
constexpr bool kHaveWgmma = false;
#endif

/* Makes this thread's generic-proxy writes to shared memory visible to wgmma's (async-proxy)
 * reads; before the barrier after which other warps' wgmma read them. */
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
/* Descriptor of a 128-byte swizzled shared-memory operand (PTX ISA, "Matrix Descriptor"): start
 * address, leading and stride byte offsets. */
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | (uint64_t)(lbo >> 4) << 16 |
         (uint64_t)(sbo >> 4) << 32 | (uint64_t)1 << 62;
}
/* The accumulator operands of wgmma's m64nN (N / 8 blocks of four floats). */
#define KVC__WGMMA_D4(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define KVC__WGMMA_D_N64                                                                          \
  KVC__WGMMA_D4(0), KVC__WGMMA_D4(1), KVC__WGMMA_D4(2), KVC__WGMMA_D4(3), KVC__WGMMA_D4(4),        \
      KVC__WGMMA_D4(5), KVC__WGMMA_D4(6), KVC__WGMMA_D4(7)
#define KVC__WGMMA_D_N128                                                                         \
  KVC__WGMMA_D_N64, KVC__WGMMA_D4(8), KVC__WGMMA_D4(9), KVC__WGMMA_D4(10), KVC__WGMMA_D4(11),      \
      KVC__WGMMA_D4(12), KVC__WGMMA_D4(13), KVC__WGMMA_D4(14), KVC__WGMMA_D4(15)
/* Warpgroup MMA (sm_90a), D[64 x N] += A[64 x 16] B[16 x N]: A in registers (each warp of the
 * warpgroup its 16 rows, as mma.sync's A fragment), B in shared memory by descriptor (TB = 1: B
 * stored N-major, else K-major), D as N / 8 blocks of mma.sync's accumulator layout. It runs
 * asynchronously: wgmma_fence before it when D or A were written by other instructions, then
 * wgmma_commit and wgmma_wait before they are read or written again. PREC: "f16" or "bf16". */
#define KVC__WGMMA_RS_N64(PREC)                                                                   \
  asm volatile(                                                                                   \
      "{\n .reg .pred p;\n setp.ne.u32 p, %38, 0;\n "                                             \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." PREC "." PREC                                 \
      " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "   \
      "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, "  \
      "%36, p, 1, 1, %37;\n}\n"                                                                   \
      : KVC__WGMMA_D_N64                                                                          \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(TB), "r"(1u))
#define KVC__WGMMA_RS_N128(PREC)                                                                   \
  asm volatile(                                                                                    \
      "{\n .reg .pred p;\n setp.ne.u32 p, %70, 0;\n "                                              \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." PREC "." PREC                                 \
      " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "    \
      "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, " \
      "%37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, " \
      "%55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, "         \
      "%69;\n}\n"                                                                                  \
      : KVC__WGMMA_D_N128                                                                          \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(TB), "r"(1u))
/* The same with A in shared memory too (K-major, by descriptor), for N = 64. */
#define KVC__WGMMA_SS_N64(PREC)                                                                   \
  asm volatile(                                                                                   \
      "{\n .reg .pred p;\n setp.ne.u32 p, %34, 0;\n "                                             \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." PREC "." PREC                                 \
      " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "   \
      "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, "  \
      "0;\n}\n"                                                                                   \
      : KVC__WGMMA_D_N64                                                                          \
      : "l"(desc_a), "l"(desc_b), "r"(1u))
template <int N, int TB, class T>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4],
                                         uint64_t desc) {
  static_assert(N == 64 || N == 128, "instances built: n64, n128");
  constexpr bool f16 = std::is_same<T, __half>::value;
  if constexpr (N == 64 && f16) {
    KVC__WGMMA_RS_N64("f16");
  } else if constexpr (N == 64) {
    KVC__WGMMA_RS_N64("bf16");
  } else if constexpr (f16) {
    KVC__WGMMA_RS_N128("f16");
  } else {
    KVC__WGMMA_RS_N128("bf16");
  }
}
template <class T>
__device__ __forceinline__ void wgmma_ss64(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b) {
  if constexpr (std::is_same<T, __half>::value) {
    KVC__WGMMA_SS_N64("f16");
  } else {
    KVC__WGMMA_SS_N64("bf16");
  }
}
#undef KVC__WGMMA_RS_N64
#undef KVC__WGMMA_RS_N128
#undef KVC__WGMMA_SS_N64
#undef KVC__WGMMA_D_N128
#undef KVC__WGMMA_D_N64
#undef KVC__WGMMA_D4
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
template <class T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                 uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace kvc_attn

#endif /* KVC_ATTN_PTX_CUH */
