// common.cuh: what every cuda-batchnorm kernel builds on.
//
// The same kernel source is compiled two ways:
//   * by nvcc to PTX (build.rs), the code that runs on the GPU;
//   * as host C++ with BN_EMULATION defined (the cuda-batchnorm-emu crate), so that
//     `cargo test` executes every kernel on the CPU under an emulator that runs each
//     CUDA thread as a fiber and checks every memory access.
//
// To keep both builds honest, kernels touch memory only through the few things defined
// here:
//   * global memory through bn::Gmem<T> views, built from the u64 device addresses in
//     BnParams (the emulator checks every access against the buffer it belongs to);
//   * shared memory through BN_SHARED / BN_DYNAMIC_SHARED (plain `__shared__` does not
//     compile under the emulator, on purpose);
//   * entry points through BN_KERNEL, which also registers them with the emulator.
// Everything else a kernel uses is the CUDA subset the emulator implements: thread and
// block indices, __syncthreads, __syncwarp, the __shfl_*_sync family, __ballot_sync,
// atomics on pointers obtained from Gmem::at, __threadfence, and the f16/bf16
// conversion intrinsics.
#pragma once

#include <stdint.h>

#if defined(BN_EMULATION)
#include <string.h>

#include "bn_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "params.h"

// Loop unrolling hint; host compilers (the emulator) do without.
#if defined(BN_EMULATION)
#define BN_UNROLL
#else
#define BN_UNROLL _Pragma("unroll")
#endif

namespace bn {

// Threads per block of every kernel. Static shared memory is sized from it, and the
// launch plan (src/launch.rs, BLOCK_THREADS) must agree.
constexpr int kBlockThreads = 256;
constexpr int kWarps = kBlockThreads / 32;

// ---------------------------------------------------------------------------------------
// Element types and the conversions between storage (T), parameter (P) and
// accumulator (A) types. Every arithmetic step runs in A; T and P are only loaded and
// stored.

template <class T>
struct Num;

template <>
struct Num<float> {
    __device__ __forceinline__ static float to_f32(float v) { return v; }
    __device__ __forceinline__ static double to_f64(float v) { return static_cast<double>(v); }
    __device__ __forceinline__ static float from_f32(float v) { return v; }
    __device__ __forceinline__ static float from_f64(double v) { return static_cast<float>(v); }
};

template <>
struct Num<double> {
    __device__ __forceinline__ static float to_f32(double v) { return static_cast<float>(v); }
    __device__ __forceinline__ static double to_f64(double v) { return v; }
    __device__ __forceinline__ static double from_f32(float v) { return static_cast<double>(v); }
    __device__ __forceinline__ static double from_f64(double v) { return v; }
};

template <>
struct Num<__half> {
    __device__ __forceinline__ static float to_f32(__half v) { return __half2float(v); }
    __device__ __forceinline__ static double to_f64(__half v) { return static_cast<double>(__half2float(v)); }
    __device__ __forceinline__ static __half from_f32(float v) { return __float2half_rn(v); }
    // Halves are never combined with f64 accumulators; the f32 step is exact for the
    // values that reach here.
    __device__ __forceinline__ static __half from_f64(double v) { return __float2half_rn(static_cast<float>(v)); }
};

template <>
struct Num<__nv_bfloat16> {
    __device__ __forceinline__ static float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
    __device__ __forceinline__ static double to_f64(__nv_bfloat16 v) { return static_cast<double>(__bfloat162float(v)); }
    __device__ __forceinline__ static __nv_bfloat16 from_f32(float v) { return __float2bfloat16_rn(v); }
    __device__ __forceinline__ static __nv_bfloat16 from_f64(double v) { return __float2bfloat16_rn(static_cast<float>(v)); }
};

// Converts a stored value to the accumulator type A (float or double).
template <class A, class T>
__device__ __forceinline__ A to_acc(T v);
template <>
__device__ __forceinline__ float to_acc<float, float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_acc<float, __half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ double to_acc<double, double>(double v) { return v; }

// Rounds an accumulator value to the storage type T (round to nearest even).
template <class T, class A>
__device__ __forceinline__ T from_acc(A v);
template <>
__device__ __forceinline__ float from_acc<float, float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ double from_acc<double, double>(double v) { return v; }

// The bits of a double, for tests that echo kernel arguments.
__device__ __forceinline__ uint64_t bits_of(double v) {
#if defined(BN_EMULATION)
    uint64_t b;
    memcpy(&b, &v, sizeof(b));
    return b;
#else
    return static_cast<uint64_t>(__double_as_longlong(v));
#endif
}

// 1 / sqrt(v) in the accumulator type; rsqrt as PyTorch's CUDA kernels use it.
__device__ __forceinline__ float acc_rsqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double acc_rsqrt(double v) { return rsqrt(v); }
// sqrt(v) in the accumulator type (the gathered statistics take 1 / sqrt, as PyTorch's).
__device__ __forceinline__ float acc_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double acc_sqrt(double v) { return sqrt(v); }

// ---------------------------------------------------------------------------------------
// Vectors: a 16-byte pack of elements, loaded and stored with one instruction.

template <class T>
struct VecWidth {
    static constexpr int value = 16 / static_cast<int>(sizeof(T));
};

template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
    T v[N];
};

template <class T>
struct Unconst {
    using type = T;
};
template <class T>
struct Unconst<const T> {
    using type = T;
};

// ---------------------------------------------------------------------------------------
// Global memory. A Gmem<T> is a typed view of one kernel argument. Under the emulator
// it remembers which launch buffer it points into, and every access is checked
// against that buffer's bounds and (for vectors) alignment.

template <class T>
struct Gmem {
    using Elem = typename Unconst<T>::type;
    T* base;
#if defined(BN_EMULATION)
    bn_emu::Bounds bounds;
#endif

    __device__ __forceinline__ explicit Gmem(uint64_t addr)
        : base(reinterpret_cast<T*>(static_cast<uintptr_t>(addr)))
#if defined(BN_EMULATION)
          ,
          bounds(bn_emu::bounds_of(reinterpret_cast<const void*>(static_cast<uintptr_t>(addr))))
#endif
    {
    }

    __device__ __forceinline__ bool present() const { return base != nullptr; }

    template <class I>
    __device__ __forceinline__ T ld(I i) const {
#if defined(BN_EMULATION)
        bn_emu::check_global(bounds, base + i, sizeof(T), alignof(T), bn_emu::kAccessRead);
#endif
        return base[i];
    }

    // Load that bypasses L1: for data another block wrote during this launch.
    template <class I>
    __device__ __forceinline__ T ld_cg(I i) const {
#if defined(BN_EMULATION)
        bn_emu::check_global(bounds, base + i, sizeof(T), alignof(T), bn_emu::kAccessRead);
        return base[i];
#else
        return __ldcg(base + i);
#endif
    }

    template <class I>
    __device__ __forceinline__ void st(I i, T v) const {
#if defined(BN_EMULATION)
        bn_emu::check_global(bounds, base + i, sizeof(T), alignof(T), bn_emu::kAccessWrite);
#endif
        base[i] = v;
    }

    // Loads elements [i, i + N) as one vector; base + i must be aligned to the pack.
    template <int N, class I>
    __device__ __forceinline__ Pack<Elem, N> ld_vec(I i) const {
#if defined(BN_EMULATION)
        bn_emu::check_global(bounds, base + i, sizeof(Pack<Elem, N>), alignof(Pack<Elem, N>), bn_emu::kAccessRead);
#endif
        return *reinterpret_cast<const Pack<Elem, N>*>(base + i);
    }

    template <int N, class I>
    __device__ __forceinline__ void st_vec(I i, const Pack<Elem, N>& v) const {
#if defined(BN_EMULATION)
        bn_emu::check_global(bounds, base + i, sizeof(Pack<Elem, N>), alignof(Pack<Elem, N>), bn_emu::kAccessWrite);
#endif
        *reinterpret_cast<Pack<Elem, N>*>(base + i) = v;
    }

    // Address of element i, for atomics; checked as a read-write access.
    template <class I>
    __device__ __forceinline__ T* at(I i) const {
#if defined(BN_EMULATION)
        bn_emu::check_global(bounds, base + i, sizeof(T), alignof(T), bn_emu::kAccessAtomic);
#endif
        return base + i;
    }

    // Elements from element i up to the next 16-byte boundary (0 when aligned).
    template <class I>
    __device__ __forceinline__ int head_to_align(I i) const {
        const uintptr_t addr = reinterpret_cast<uintptr_t>(base + i);
        const int mis = static_cast<int>(addr & 15u);
        return mis == 0 ? 0 : (16 - mis) / static_cast<int>(sizeof(T));
    }
};

}  // namespace bn

// ---------------------------------------------------------------------------------------
// Shared memory. BN_SHARED(T, name, count) declares a block-wide array of `count`
// elements of T (16-byte aligned); BN_DYNAMIC_SHARED(T, name) names the dynamic
// shared memory of the launch as an array of T. Both index with name[i].

#if defined(BN_EMULATION)
#define BN_SHARED(T, name, count) BN_EMU_SHARED(T, name, count)
#define BN_DYNAMIC_SHARED(T, name) BN_EMU_DYNAMIC_SHARED(T, name)
#else
#define BN_SHARED(T, name, count) __shared__ __align__(16) T name[count]
#define BN_DYNAMIC_SHARED(T, name)                      \
    extern __shared__ __align__(16) unsigned char bn_dynamic_smem_[]; \
    T* name = reinterpret_cast<T*>(bn_dynamic_smem_)
#endif

// ---------------------------------------------------------------------------------------
// Entry points. Every kernel takes one BnParams by value; BN_KERNEL(name, body) defines
// `extern "C" __global__ void name(const BnParams p)` calling `body(p)`, and under the
// emulator registers it by name.

//
// BN_KERNEL_RESIDENT(name, blocks, body) also promises ptxas that `blocks` blocks of 256
// threads share a multiprocessor (__launch_bounds__' second argument: at most 65536 /
// (256 * blocks) registers). Without it ptxas trades the streaming loops' loads in
// flight for occupancy (the static report showed 32 of 64 bytes ahead of their first
// use); with it, it keeps the loads together within that register budget.

#if defined(BN_EMULATION)
#define BN_KERNEL_RESIDENT(name, blocks, ...) BN_KERNEL(name, __VA_ARGS__)
#define BN_KERNEL(name, ...)                                                          \
    extern "C" void name(const BnParams p) { __VA_ARGS__(p); }                        \
    static void bn_emu_entry_##name(const void* params) {                             \
        name(*static_cast<const BnParams*>(params));                                  \
    }                                                                                 \
    static const bn_emu::KernelRegistration bn_emu_registration_##name(               \
        #name, &bn_emu_entry_##name, sizeof(BnParams))
#else
#define BN_KERNEL_RESIDENT(name, blocks, ...)                                         \
    extern "C" __global__ void __launch_bounds__(bn::kBlockThreads, blocks) name(const BnParams p) { \
        __VA_ARGS__(p);                                                               \
    }
#define BN_KERNEL(name, ...)                                                          \
    extern "C" __global__ void __launch_bounds__(bn::kBlockThreads) name(const BnParams p) { \
        __VA_ARGS__(p);                                                               \
    }
#endif
