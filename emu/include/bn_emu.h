// bn_emu.h: the CUDA subset that cuda-batchnorm kernels may use, for host C++.
//
// kernels/common.cuh includes this header when BN_EMULATION is defined. The kernel
// sources are then compiled by the host C++ compiler (C++17, g++ or clang) and run by
// the cuda-batchnorm-emu runtime (emu/src), which executes every CUDA thread as a
// fiber and checks barriers, warp collectives, and every global and shared memory
// access. See emu/README.md for the model and its limits.
//
// Everything the runtime implements out of line is declared in namespace bn_emu; the
// CUDA names (threadIdx, __syncthreads, __shfl_sync, atomicAdd, ...) are thin inline
// wrappers or macros over those declarations.
#pragma once

#if !defined(__cplusplus) || __cplusplus < 201703L
#error "bn_emu.h needs C++17"
#endif

// Standard headers come first: some libstdc++ headers spell __attribute__((__noinline__)),
// which the __noinline__ macro below would break if they were included after it.
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------
// 1. Qualifiers.

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Plain __shared__ has no emulation: every use is a compile error that says what to use.
#define __shared__                                                                        \
    _Pragma("GCC error \"plain __shared__ is not supported by the cuda-batchnorm emulator: declare shared memory with BN_SHARED(T, name, count) or BN_DYNAMIC_SHARED(T, name) from common.cuh\"")

// ---------------------------------------------------------------------------------------
// 2. Index types and the per-thread view of the current emulated thread.

struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

constexpr int warpSize = 32;

namespace bn_emu {

// What threadIdx, blockIdx, blockDim and gridDim read. The runtime keeps one per fiber
// and points bn_emu_tv at the view of the fiber that is running.
struct ThreadView {
    uint3 thread_idx;
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
};

}  // namespace bn_emu

// The running fiber's view (one per OS thread; fibers of a launch all run on the OS
// thread that called launch). Valid only while a kernel runs.
extern __thread const bn_emu::ThreadView* bn_emu_tv;
// Non-zero while a launch with global-access preemption runs on this OS thread (see
// bn_emu::preempt_point).
extern __thread uint32_t bn_emu_preempt;

#define threadIdx (bn_emu_tv->thread_idx)
#define blockIdx (bn_emu_tv->block_idx)
#define blockDim (bn_emu_tv->block_dim)
#define gridDim (bn_emu_tv->grid_dim)

// ---------------------------------------------------------------------------------------
// Runtime entry points (emu/src/runtime.cpp).

namespace bn_emu {

enum RegionKind : int {
    kRegionInput = 0,
    kRegionOutput = 1,
    kRegionInOut = 2,
    kRegionScratch = 3,
    kRegionCounters = 4,
};

// Which launch buffer a Gmem view points into. Caches the region's extent and kind so
// that check_global needs no lookup. An empty Bounds (begin == end == 0) belongs to no
// region: every access through it fails.
struct Bounds {
    uintptr_t begin = 0;
    uintptr_t end = 0;
    int kind = -1;
    int region = -1;  // index into the launch's region table, -1 if none
    uintptr_t base = 0;  // the address the view was built from
};

// The region containing `base`, or an empty Bounds for null or unknown addresses.
Bounds bounds_of(const void* base);

// Reports a failed access (never returns: the launch is abandoned).
[[noreturn]] void global_access_failed(const Bounds& b, const void* p, size_t bytes, size_t align, bool write);

// How a kernel touches global memory (check_global's `access`).
enum Access : int {
    kAccessRead = 0,
    kAccessWrite = 1,
    kAccessAtomic = 2,  // Gmem::at: the address is handed to an atomic
};

// Scratch regions carry partial results between the blocks of one launch, so they get
// a model of the memory model's release/acquire patterns: a plain store there is seen by
// other blocks only after a __threadfence() (or __threadfence_system(), or grid_sync())
// executed by a thread of the storing block, and another block may read it only after a
// fence of its own that follows both that publication and its own latest global atomic
// (the one that observed the signal); otherwise the read fails the launch. Defined in
// runtime.cpp; called by check_global for Scratch regions only.
void scratch_access(const Bounds& b, const void* p, size_t bytes, int access);

// Publishes the calling block's scratch stores to every block and records the fence
// (__threadfence, __threadfence_system).
void publish_block_stores();

// Records a global atomic by the calling block (Gmem::at): a read of another block's
// published scratch must come after a fence that follows the block's last atomic.
void note_atomic();

// In a launch with global-access preemption (Options::preempt_one_in), a scheduling
// point taken before a global load or store with a seeded probability, so that races
// between plain accesses of different threads, which no barrier, atomic or fence
// separates, can show.
void preempt_point();

// In the same mode, the record of which block wrote each byte of the Output and InOut
// regions: a second block writing a byte in one launch fails it (no kernel here has two
// blocks write one output value; a protocol that lets two blocks finalise does).
void output_write(const Bounds& b, const void* p, size_t bytes);

// Checks one access of `bytes` bytes at p, aligned to `align`, through a view with
// bounds b. Inline fast path; the failure path reports and abandons the launch.
inline void check_global(const Bounds& b, const void* p, size_t bytes, size_t align, int access) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const bool write = access != kAccessRead;
    const bool ok = a >= b.begin && a <= b.end && b.end - a >= bytes && (a & (align - 1)) == 0 &&
                    !(write && b.kind == kRegionInput) && b.end != 0;
    if (__builtin_expect(!ok, 0)) global_access_failed(b, p, bytes, align, write);
    if (access == kAccessAtomic) note_atomic();
    if (b.kind == kRegionScratch) scratch_access(b, p, bytes, access);
    if (__builtin_expect(bn_emu_preempt != 0, 0) && access != kAccessAtomic) {
        if (access == kAccessWrite && (b.kind == kRegionOutput || b.kind == kRegionInOut)) output_write(b, p, bytes);
        preempt_point();
    }
}

// Registers a kernel entry point at static-initialisation time (see BN_KERNEL).
struct KernelRegistration {
    KernelRegistration(const char* name, void (*entry)(const void* params), size_t params_bytes);
};

// Grid-wide barrier; only valid in a cooperative launch.
void grid_sync(const char* file = __builtin_FILE(), int line = __builtin_LINE());

// Block barrier (the __syncthreads family). mode: 0 plain, 1 count, 2 and, 3 or.
int syncthreads(const char* file, int line, int mode = 0, int predicate = 0);

enum CollectiveOp : int {
    kShflIdx = 0,
    kShflUp = 1,
    kShflDown = 2,
    kShflXor = 3,
    kBallot = 4,
    kAll = 5,
    kAny = 6,
    kSyncwarp = 7,
};

// One warp-collective operation by the calling lane; returns this lane's result
// (the shuffled value's bytes, or the vote result).
uint64_t warp_collective(int op, unsigned mask, uint64_t value, unsigned value_bytes, int arg, int width,
                         const char* file, int line);

unsigned active_mask(const char* file, int line);

// A scheduling point with no other effect (fences, __nanosleep, atomics).
void yield_point();

[[noreturn]] void fail(const char* message);

// ---------------------------------------------------------------------------------------
// Shared memory.

// One BN_SHARED declaration site (one per template instantiation, as a function-local
// static). Constant-initialised: no guard, no dynamic initialisation.
struct SharedSite {
    const char* name;
    const char* file;
    int line;
};

// The block's allocation for `site` (created, 0xFF-filled, on first use in the block).
void* shared_site_alloc(const SharedSite* site, size_t elem_bytes, size_t elem_align, size_t count);
// The launch's dynamic shared memory; *bytes receives its size.
void* dynamic_shared(size_t* bytes);
[[noreturn]] void shared_index_failed(const SharedSite* site, long long index, unsigned long long count,
                                      size_t elem_bytes);

// A block-wide shared array: name[i] is a bounds-checked T&.
template <class T>
struct SharedArray {
    T* ptr;
    size_t count;
    const SharedSite* site;

    template <class I>
    T& operator[](I i) const {
        static_assert(std::is_integral<I>::value || std::is_enum<I>::value, "shared arrays are indexed by integers");
        if constexpr (std::is_signed<I>::value) {
            if (__builtin_expect(static_cast<long long>(i) < 0 || static_cast<unsigned long long>(i) >= count, 0))
                shared_index_failed(site, static_cast<long long>(i), count, sizeof(T));
        } else {
            if (__builtin_expect(static_cast<unsigned long long>(i) >= count, 0))
                shared_index_failed(site, static_cast<long long>(i), count, sizeof(T));
        }
        return ptr[i];
    }
};

template <class T>
inline SharedArray<T> make_dynamic_shared(const SharedSite* site) {
    static_assert(alignof(T) <= 16, "dynamic shared memory is 16-byte aligned");
    size_t bytes = 0;
    void* p = dynamic_shared(&bytes);
    return SharedArray<T>{static_cast<T*>(p), bytes / sizeof(T), site};
}

}  // namespace bn_emu

#define BN_EMU_SHARED(T, name, count)                                                            \
    static constexpr ::bn_emu::SharedSite bn_emu_site_##name{#name, __FILE__, __LINE__};        \
    const ::bn_emu::SharedArray<T> name {                                                        \
        static_cast<T*>(::bn_emu::shared_site_alloc(&bn_emu_site_##name, sizeof(T), alignof(T),   \
                                                    static_cast<size_t>(count))),                 \
            static_cast<size_t>(count), &bn_emu_site_##name                                       \
    }

#define BN_EMU_DYNAMIC_SHARED(T, name)                                                           \
    static constexpr ::bn_emu::SharedSite bn_emu_site_##name{#name " (dynamic)", __FILE__, __LINE__}; \
    const ::bn_emu::SharedArray<T> name = ::bn_emu::make_dynamic_shared<T>(&bn_emu_site_##name)

// ---------------------------------------------------------------------------------------
// 3. Barriers and warp collectives.

#define __syncthreads() ::bn_emu::syncthreads(__FILE__, __LINE__)
#define __syncthreads_count(pred) ::bn_emu::syncthreads(__FILE__, __LINE__, 1, (pred) ? 1 : 0)
#define __syncthreads_and(pred) ::bn_emu::syncthreads(__FILE__, __LINE__, 2, (pred) ? 1 : 0)
#define __syncthreads_or(pred) ::bn_emu::syncthreads(__FILE__, __LINE__, 3, (pred) ? 1 : 0)

inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::bn_emu::warp_collective(::bn_emu::kSyncwarp, mask, 0, 0, 0, warpSize, file, line);
}

namespace bn_emu {

template <class T>
inline uint64_t to_bits(const T& v) {
    static_assert(std::is_trivially_copyable<T>::value, "warp shuffles move trivially copyable values");
    static_assert(sizeof(T) == 1 || sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8,
                  "warp shuffles move values of 1, 2, 4 or 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    return bits;
}

template <class T>
inline T from_bits(uint64_t bits) {
    T v;
    memcpy(static_cast<void*>(&v), &bits, sizeof(T));
    return v;
}

template <class T>
inline T shuffle(int op, unsigned mask, const T& var, int arg, int width, const char* file, int line) {
    return from_bits<T>(warp_collective(op, mask, to_bits(var), sizeof(T), arg, width, file, line));
}

}  // namespace bn_emu

template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
    return ::bn_emu::shuffle(::bn_emu::kShflIdx, mask, var, srcLane, width, file, line);
}

template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned int delta, int width = warpSize,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::bn_emu::shuffle(::bn_emu::kShflUp, mask, var, static_cast<int>(delta), width, file, line);
}

template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned int delta, int width = warpSize,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::bn_emu::shuffle(::bn_emu::kShflDown, mask, var, static_cast<int>(delta), width, file, line);
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::bn_emu::shuffle(::bn_emu::kShflXor, mask, var, laneMask, width, file, line);
}

inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    return static_cast<unsigned>(
        ::bn_emu::warp_collective(::bn_emu::kBallot, mask, predicate != 0, 4, 0, warpSize, file, line));
}

inline int __all_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return static_cast<int>(
        ::bn_emu::warp_collective(::bn_emu::kAll, mask, predicate != 0, 4, 0, warpSize, file, line));
}

inline int __any_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return static_cast<int>(
        ::bn_emu::warp_collective(::bn_emu::kAny, mask, predicate != 0, 4, 0, warpSize, file, line));
}

// The lanes of the calling warp that execute this __activemask() together: the lanes
// that reach the same call while every other live lane of the warp is blocked elsewhere
// (at a barrier or collective) or has exited. A scheduling point.
inline unsigned __activemask(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::bn_emu::active_mask(file, line);
}

// ---------------------------------------------------------------------------------------
// 4. Atomics (genuinely atomic read-modify-writes, each also a scheduling point: the
// fiber yields first, then performs the operation when it runs again).

namespace bn_emu {

template <class T>
inline T atomic_update_cas(T* addr, T (*update)(T old, T val, T cmp), T val, T cmp) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "atomics on 4- or 8-byte values");
    using U = typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type;
    yield_point();
    U* p = reinterpret_cast<U*>(addr);
    U old_bits = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    for (;;) {
        const T old = from_bits<T>(old_bits);
        const T next = update(old, val, cmp);
        U next_bits;
        memcpy(&next_bits, &next, sizeof(U));
        if (__atomic_compare_exchange_n(p, &old_bits, next_bits, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return old;
    }
}

template <class T>
inline T atomic_fetch_add_int(T* addr, T val) {
    yield_point();
    return __atomic_fetch_add(addr, val, __ATOMIC_SEQ_CST);
}

}  // namespace bn_emu

inline int atomicAdd(int* a, int v) { return ::bn_emu::atomic_fetch_add_int(a, v); }
inline unsigned int atomicAdd(unsigned int* a, unsigned int v) { return ::bn_emu::atomic_fetch_add_int(a, v); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
    return ::bn_emu::atomic_fetch_add_int(a, v);
}
inline float atomicAdd(float* a, float v) {
    return ::bn_emu::atomic_update_cas<float>(a, [](float o, float x, float) { return o + x; }, v, 0.0f);
}
inline double atomicAdd(double* a, double v) {
    return ::bn_emu::atomic_update_cas<double>(a, [](double o, double x, double) { return o + x; }, v, 0.0);
}

inline int atomicSub(int* a, int v) {
    ::bn_emu::yield_point();
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);
}
inline unsigned int atomicSub(unsigned int* a, unsigned int v) {
    ::bn_emu::yield_point();
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);
}

namespace bn_emu {
template <class T>
inline T atomic_exchange(T* a, T v) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "atomics on 4- or 8-byte values");
    using U = typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type;
    yield_point();
    U bits;
    memcpy(&bits, &v, sizeof(U));
    return from_bits<T>(__atomic_exchange_n(reinterpret_cast<U*>(a), bits, __ATOMIC_SEQ_CST));
}

template <class T>
inline T atomic_cas(T* a, T compare, T val) {
    yield_point();
    T expected = compare;
    __atomic_compare_exchange_n(a, &expected, val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return expected;
}
}  // namespace bn_emu

inline int atomicExch(int* a, int v) { return ::bn_emu::atomic_exchange(a, v); }
inline unsigned int atomicExch(unsigned int* a, unsigned int v) { return ::bn_emu::atomic_exchange(a, v); }
inline unsigned long long atomicExch(unsigned long long* a, unsigned long long v) {
    return ::bn_emu::atomic_exchange(a, v);
}
inline float atomicExch(float* a, float v) { return ::bn_emu::atomic_exchange(a, v); }

inline int atomicCAS(int* a, int compare, int val) { return ::bn_emu::atomic_cas(a, compare, val); }
inline unsigned int atomicCAS(unsigned int* a, unsigned int compare, unsigned int val) {
    return ::bn_emu::atomic_cas(a, compare, val);
}
inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long compare, unsigned long long val) {
    return ::bn_emu::atomic_cas(a, compare, val);
}

#define BN_EMU_ATOMIC_MINMAX(T)                                                                              \
    inline T atomicMax(T* a, T v) {                                                                          \
        return ::bn_emu::atomic_update_cas<T>(a, [](T o, T x, T) { return o < x ? x : o; }, v, static_cast<T>(0)); \
    }                                                                                                        \
    inline T atomicMin(T* a, T v) {                                                                          \
        return ::bn_emu::atomic_update_cas<T>(a, [](T o, T x, T) { return x < o ? x : o; }, v, static_cast<T>(0)); \
    }
BN_EMU_ATOMIC_MINMAX(int)
BN_EMU_ATOMIC_MINMAX(unsigned int)
BN_EMU_ATOMIC_MINMAX(long long)
BN_EMU_ATOMIC_MINMAX(unsigned long long)
#undef BN_EMU_ATOMIC_MINMAX

// old = *a; *a = (old >= v) ? 0 : old + 1; returns old.
inline unsigned int atomicInc(unsigned int* a, unsigned int v) {
    return ::bn_emu::atomic_update_cas<unsigned int>(
        a, [](unsigned int o, unsigned int x, unsigned int) { return o >= x ? 0u : o + 1u; }, v, 0u);
}

// ---------------------------------------------------------------------------------------
// 5. Fences and sleep (scheduling points).

// __threadfence_block orders memory for the block only, so it publishes nothing to other
// blocks (see scratch_access).
inline void __threadfence() {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    ::bn_emu::publish_block_stores();
    ::bn_emu::yield_point();
}
inline void __threadfence_block() {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    ::bn_emu::yield_point();
}
inline void __threadfence_system() {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    ::bn_emu::publish_block_stores();
    ::bn_emu::yield_point();
}
inline void __nanosleep(unsigned int) { ::bn_emu::yield_point(); }

// ---------------------------------------------------------------------------------------
// 6. Math that libm lacks or names differently. Computed with IEEE host arithmetic,
// correctly rounded except where noted (rsqrtf, __expf, __logf use the host's
// sqrtf/expf/logf, which need not round the way the GPU's approximations do).

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }

inline int __float_as_int(float x) { return ::bn_emu::from_bits<int>(::bn_emu::to_bits(x)); }
inline unsigned int __float_as_uint(float x) { return ::bn_emu::from_bits<unsigned int>(::bn_emu::to_bits(x)); }
inline float __int_as_float(int x) { return ::bn_emu::from_bits<float>(::bn_emu::to_bits(x)); }
inline float __uint_as_float(unsigned int x) { return ::bn_emu::from_bits<float>(::bn_emu::to_bits(x)); }
inline long long __double_as_longlong(double x) { return ::bn_emu::from_bits<long long>(::bn_emu::to_bits(x)); }
inline double __longlong_as_double(long long x) { return ::bn_emu::from_bits<double>(::bn_emu::to_bits(x)); }

inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned int>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
    return (x >> 16) | (x << 16);
}

// CUDA's global min/max overloads. Mixed signed/unsigned arguments compare as unsigned;
// float/double mixes compare as double; float and double follow fminf/fmaxf (a NaN
// argument yields the other one).
#define BN_EMU_MINMAX_SAME(T)                              \
    inline T min(T a, T b) { return b < a ? b : a; }       \
    inline T max(T a, T b) { return a < b ? b : a; }
BN_EMU_MINMAX_SAME(int)
BN_EMU_MINMAX_SAME(unsigned int)
BN_EMU_MINMAX_SAME(long)
BN_EMU_MINMAX_SAME(unsigned long)
BN_EMU_MINMAX_SAME(long long)
BN_EMU_MINMAX_SAME(unsigned long long)
#undef BN_EMU_MINMAX_SAME
#define BN_EMU_MINMAX_MIXED(S, U)                                                    \
    inline U min(S a, U b) { return min(static_cast<U>(a), b); }                     \
    inline U min(U a, S b) { return min(a, static_cast<U>(b)); }                     \
    inline U max(S a, U b) { return max(static_cast<U>(a), b); }                     \
    inline U max(U a, S b) { return max(a, static_cast<U>(b)); }
BN_EMU_MINMAX_MIXED(int, unsigned int)
BN_EMU_MINMAX_MIXED(long, unsigned long)
BN_EMU_MINMAX_MIXED(long long, unsigned long long)
#undef BN_EMU_MINMAX_MIXED
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(static_cast<double>(a), b); }
inline double min(double a, float b) { return fmin(a, static_cast<double>(b)); }
inline double max(float a, double b) { return fmax(static_cast<double>(a), b); }
inline double max(double a, float b) { return fmax(a, static_cast<double>(b)); }

// ---------------------------------------------------------------------------------------
// 7. f16 and bf16 storage types and their conversions (IEEE round to nearest even,
// subnormals kept, overflow to infinity, NaN stays NaN).

struct __half {
    unsigned short __x;
    __half() = default;
};

struct __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
};

static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "__half is 2 bytes");
static_assert(sizeof(__nv_bfloat16) == 2 && alignof(__nv_bfloat16) == 2, "__nv_bfloat16 is 2 bytes");
static_assert(std::is_trivially_copyable<__half>::value && std::is_trivially_default_constructible<__half>::value,
              "__half is a plain value");
static_assert(std::is_trivially_copyable<__nv_bfloat16>::value &&
                  std::is_trivially_default_constructible<__nv_bfloat16>::value,
              "__nv_bfloat16 is a plain value");

inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short x) {
    __half h;
    h.__x = x;
    return h;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) {
    __nv_bfloat16 h;
    h.__x = x;
    return h;
}

inline float __half2float(__half h) {
    const uint32_t x = h.__x;
    const uint32_t sign = (x & 0x8000u) << 16;
    const uint32_t exp = (x >> 10) & 0x1fu;
    uint32_t mant = x & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (mant << 13);  // inf, or NaN with its payload
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else {
        // Subnormal: value = mant * 2^-24; normalise.
        int e = 113;  // biased float exponent of 2^-14
        while ((mant & 0x400u) == 0) {
            mant <<= 1;
            --e;
        }
        bits = sign | (static_cast<uint32_t>(e) << 23) | ((mant & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

inline __half __float2half_rn(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t a = x & 0x7fffffffu;
    uint32_t h;
    if (a > 0x7f800000u) {
        h = sign | 0x7e00u | ((a >> 13) & 0x3ffu);  // quiet NaN, top payload bits kept
    } else if (a >= 0x47800000u) {
        h = sign | 0x7c00u;  // >= 2^16 (or inf): infinity
    } else if (a >= 0x38800000u) {
        // Normal half range [2^-14, 2^16): rebias, round the 13 dropped bits.
        const uint32_t e = (a >> 23) - 112u;
        const uint32_t mant = a & 0x7fffffu;
        h = (e << 10) | (mant >> 13);
        const uint32_t rest = mant & 0x1fffu;
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into inf
        h |= sign;
    } else if (a >= 0x33000000u) {
        // [2^-25, 2^-14): subnormal half (or rounds up to the smallest normal).
        const uint32_t e = a >> 23;  // 102 ..= 112
        const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126u - e;  // 14 ..= 24
        h = mant >> shift;
        const uint32_t rest = mant & ((1u << shift) - 1u);
        const uint32_t half = 1u << (shift - 1u);
        if (rest > half || (rest == half && (h & 1u))) ++h;
        h |= sign;
    } else {
        h = sign;  // below half the smallest subnormal: signed zero
    }
    return __ushort_as_half(static_cast<unsigned short>(h));
}

inline float __bfloat162float(__nv_bfloat16 h) {
    const uint32_t bits = static_cast<uint32_t>(h.__x) << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t h;
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        h = (x >> 16) | 0x0040u;  // quiet NaN
    } else {
        h = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    }
    return __ushort_as_bfloat16(static_cast<unsigned short>(h));
}

inline __half __float2half(float f) { return __float2half_rn(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
