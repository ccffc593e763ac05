// libcuda.cpp: an emulated CUDA driver. Built by build.rs into a shared library named
// libcuda.so (SONAME libcuda.so) that exports the driver API entry points cudarc and
// cuda-batchnorm call, with every kernel launch run by the emulator (runtime.cpp) from
// the same kernel sources nvcc compiles.
//
// What it is for: executing the host side of the GPU path (cudarc's buffers, streams
// and events, the crate's module loading, function lookup, launch arguments, workspace
// handling, bnbench's timing code) on a machine without a GPU. A process uses it either
// by loading it before cudarc looks for libcuda (tests: bn_emu_preload_driver, which
// matches cudarc's first candidate name by SONAME) or through LD_LIBRARY_PATH.
//
// Model, and its assumptions:
//   * four identical devices, ordinals 0 to 3, compute capability 9.0, each with its
//     primary context; their other attributes are small and fixed (see attribute()),
//     chosen so that launch plans stay quick to emulate. SyncBatchNorm's ranks run as
//     threads on them, one device each, with the emulated NCCL (driver/libnccl.cpp).
//     BN_EMU_DRIVER_DEVICES=n shows n (0 to 16); 0 none, where cuInit fails with
//     CUDA_ERROR_NO_DEVICE. Their memory is one pool, so a pointer of one device is
//     valid on every other, as with peer access enabled;
//   * device memory is host memory: a device pointer is the host address of a block
//     allocated here, filled with 0xFF bytes, so every copy and memset is checked
//     against the live allocations and a range outside them fails with
//     CUDA_ERROR_INVALID_VALUE;
//   * everything is synchronous: an async call has finished when it returns, streams
//     and events only keep order trivially, an event's time is the host clock's;
//   * cuModuleLoadData takes PTX text, and refuses an ISA newer than the driver's CUDA
//     version supports (BN_EMU_DRIVER_VERSION plays an older driver);
//     cuModuleGetFunction succeeds only for a name that the PTX declares as an .entry and
//     that the emulator has registered;
//   * every kernel takes one BnParams (kernels/params.h). A launch hands the emulator
//     the allocations that BnParams' addresses point into as its regions: those of x,
//     dy, weight, bias and z read-only, the counters' as Counters (zero before and after),
//     the rest read-write. A violation inside the kernel fails the launch with
//     CUDA_ERROR_ILLEGAL_ADDRESS and prints the emulator's message on stderr;
//   * occupancy: cuOccupancyMaxActiveBlocksPerMultiprocessor answers from threads and
//     shared memory alone (2048 threads and 228 KB per multiprocessor, at most 32
//     blocks; no register model), or BN_EMU_DRIVER_OCCUPANCY blocks when set, so tests
//     can play a device whose kernels fit fewer; cuLaunchCooperativeKernel refuses a
//     grid above that many blocks per multiprocessor with
//     CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE, as the driver does;
//   * one lock serialises every call, so launches from several threads take turns;
//   * stream capture (CUDA graphs), for one stream at a time: while a created stream
//     captures, its kernel launches, device-to-device copies and memsets are checked
//     and recorded instead of run; cuStreamEndCapture returns them as a graph, which
//     cuGraphInstantiateWithFlags turns into an executable graph and cuGraphLaunch
//     replays in order (each launch against the allocations live at replay). What a
//     hot path must not do while it is captured fails as on a real driver and
//     invalidates the capture (cuStreamEndCapture then fails with
//     CUDA_ERROR_STREAM_CAPTURE_INVALIDATED): synchronising or querying the capturing
//     stream, a synchronous copy, memset, cuMemAlloc, cuMemFree or cuCtxSynchronize
//     from a thread the capture's mode forbids them (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED),
//     querying or synchronising an event recorded during the capture
//     (CUDA_ERROR_CAPTURED_EVENT). Not emulated, and refused the same way: a host copy
//     on the capturing stream (there is no pinned memory here), stream-ordered
//     allocation on it (graph memory nodes), waiting from it on an event recorded
//     outside the capture without CU_EVENT_WAIT_EXTERNAL, and a second stream joining
//     the capture through an event (CUDA_ERROR_NOT_SUPPORTED).

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "ffi.h"
#include "params.h"

namespace {

// CUresult values used here (cuda.h).
enum : int {
    kSuccess = 0,
    kInvalidValue = 1,
    kOutOfMemory = 2,
    kNotInitialized = 3,
    kNoDevice = 100,
    kInvalidDevice = 101,
    kInvalidImage = 200,
    kInvalidContext = 201,
    kInvalidPtx = 218,
    kUnsupportedPtxVersion = 222,
    kInvalidHandle = 400,
    kIllegalState = 401,
    kNotFound = 500,
    kIllegalAddress = 700,
    kLaunchOutOfResources = 701,
    kLaunchFailed = 719,
    kCooperativeLaunchTooLarge = 720,
    kNotSupported = 801,
    kCaptureUnsupported = 900,
    kCaptureInvalidated = 901,
    kCaptureWrongThread = 908,
    kCapturedEvent = 907,
};

// CUstreamCaptureMode and CUstreamCaptureStatus values.
enum : int { kCaptureGlobal = 0, kCaptureThreadLocal = 1, kCaptureRelaxed = 2 };
enum : int { kStatusNone = 0, kStatusActive = 1, kStatusInvalidated = 2 };

constexpr int kDriverVersion = 13000;  // CUDA 13.0, unless BN_EMU_DRIVER_VERSION says otherwise
constexpr int kSmCount = 8;

struct Module {
    std::string ptx;
};

struct Function {
    std::string name;
    // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: 48 KiB until raised (the opt-in).
    int max_dynamic_shared = 48 * 1024;
};

// CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: an H100's 227 KiB.
constexpr int kSharedOptin = 227 * 1024;

// One operation of a graph, with its arguments as they were at capture.
struct Node {
    enum Kind { kLaunch, kCopy, kMemset } kind = kLaunch;
    Function* function = nullptr;
    uint32_t grid[3] = {1, 1, 1};
    uint32_t block[3] = {1, 1, 1};
    uint32_t shared = 0;
    bool cooperative = false;
    BnParams params{};
    uint64_t dst = 0, src = 0;
    bool dst_device = true, src_device = true;  // a copy's sides: device or host memory
    size_t bytes = 0;
    uint8_t value = 0;
};

struct Graph {
    std::vector<Node> nodes;
};

struct GraphExec {
    std::vector<Node> nodes;
};

// A stream's capture in progress.
struct Capture {
    uint64_t id;
    int mode;
    std::thread::id thread;
    bool invalidated = false;
    std::vector<Node> nodes;
};

struct Stream {
    std::unique_ptr<Capture> capture;
};

struct Event {
    std::chrono::steady_clock::time_point at;
    bool recorded = false;
    uint64_t captured_in = 0;  // the capture that recorded it last, or 0
};

struct State {
    std::mutex lock;
    bool initialised = false;
    int primary_refs = 0;
    std::map<uint64_t, uint64_t> allocations;  // base -> bytes
    uint64_t allocated = 0;
    std::set<Stream*> streams;
    std::set<Module*> modules;
    std::set<Function*> functions;
    std::set<Event*> events;
    std::set<Graph*> graphs;
    std::set<GraphExec*> execs;
    uint64_t captures_begun = 0;
};

State& state() {
    static State* s = new State();  // never destroyed: drops may run during exit
    return *s;
}

// The devices' primary contexts: addresses that identify them.
constexpr int kMaxDevices = 16;
constexpr int kDefaultDevices = 4;
char g_context_tags[kMaxDevices];
void* context_of(int dev) { return &g_context_tags[dev]; }
// The device of a context, or -1 for anything else.
int device_of(const void* ctx) {
    const char* c = static_cast<const char*>(ctx);
    return (c >= g_context_tags && c < g_context_tags + kMaxDevices) ? static_cast<int>(c - g_context_tags) : -1;
}
thread_local void* t_current = nullptr;

constexpr uint64_t kTotalMemory = 8ull << 30;

// Whether [addr, addr + bytes) lies inside one live allocation. Caller holds the lock.
bool inside(const State& s, uint64_t addr, uint64_t bytes) {
    auto it = s.allocations.upper_bound(addr);
    if (it == s.allocations.begin()) return false;
    --it;
    return addr >= it->first && addr - it->first <= it->second && bytes <= it->second - (addr - it->first);
}

// The allocation containing addr, as (base, bytes), or (0, 0).
std::pair<uint64_t, uint64_t> allocation_of(const State& s, uint64_t addr) {
    auto it = s.allocations.upper_bound(addr);
    if (it == s.allocations.begin()) return {0, 0};
    --it;
    if (addr - it->first < it->second) return {it->first, it->second};
    return {0, 0};
}

// The null stream, CU_STREAM_LEGACY (0x1) and CU_STREAM_PER_THREAD (0x2) are always
// valid (candle computes on the per-thread stream); every stream is synchronous here.
bool stream_ok(const State& s, void* stream) {
    const uintptr_t h = reinterpret_cast<uintptr_t>(stream);
    return h <= 2 || s.streams.count(static_cast<Stream*>(stream)) != 0;
}

// The capture `stream` is in, or nullptr (the null and legacy streams never capture).
Capture* capture_of(const State& s, void* stream) {
    if (reinterpret_cast<uintptr_t>(stream) <= 2) return nullptr;
    Stream* st = static_cast<Stream*>(stream);
    return s.streams.count(st) != 0 ? st->capture.get() : nullptr;
}

// Whether a capture forbids this thread the calls that could synchronise with it
// (CUDA's "potentially unsafe API calls"): its own thread's unless it is relaxed, and
// every thread's when it is global.
bool capture_forbids(const Capture& c) {
    return c.mode == kCaptureGlobal || (c.mode == kCaptureThreadLocal && c.thread == std::this_thread::get_id());
}

// For such a call: kSuccess when no capture forbids it; otherwise every capture that
// does is invalidated and the call fails.
int unsafe_call(State& s) {
    int rc = kSuccess;
    for (Stream* st : s.streams) {
        if (st->capture != nullptr && capture_forbids(*st->capture)) {
            st->capture->invalidated = true;
            rc = kCaptureUnsupported;
        }
    }
    return rc;
}

// An operation the capture cannot take: it invalidates the capture.
int refuse(Capture* c, int rc) {
    c->invalidated = true;
    return rc;
}

int attribute(int attr, int* out) {
    switch (attr) {
        case 1: *out = 1024; return kSuccess;        // max threads per block
        case 2: *out = 1024; return kSuccess;        // max block x
        case 3: *out = 1024; return kSuccess;        // max block y
        case 4: *out = 64; return kSuccess;          // max block z
        case 5: *out = 2147483647; return kSuccess;  // max grid x
        case 6: *out = 65535; return kSuccess;       // max grid y
        case 7: *out = 65535; return kSuccess;       // max grid z
        case 8: *out = 48 * 1024; return kSuccess;   // shared memory per block
        case 81: *out = 228 * 1024; return kSuccess; // shared memory per multiprocessor
        case 97: *out = kSharedOptin; return kSuccess;  // shared memory per block, opt-in
        case 10: *out = 32; return kSuccess;         // warp size
        case 13: *out = 1000000; return kSuccess;    // clock rate, kHz
        case 16: *out = kSmCount; return kSuccess;   // multiprocessors
        case 36: *out = 1000000; return kSuccess;    // memory clock rate, kHz
        case 37: *out = 64; return kSuccess;         // memory bus width, bits
        case 38: *out = 4 << 20; return kSuccess;    // L2 bytes
        case 39: *out = 2048; return kSuccess;       // threads per multiprocessor
        case 41: *out = 1; return kSuccess;          // unified addressing
        case 75: *out = 9; return kSuccess;          // compute capability major
        case 76: *out = 0; return kSuccess;          // compute capability minor
        case 115: *out = 1; return kSuccess;         // memory pools supported
        default: *out = 0; return kSuccess;
    }
}

int check_ready(const State& s) {
    if (!s.initialised) return kNotInitialized;
    if (device_of(t_current) < 0) return kInvalidContext;
    return kSuccess;
}

// Handles: a created object is live until destroyed; using a dead one is an error.
template <class H>
int create(State& s, std::set<H*>& live, void** out, H* h) {
    const int rc = check_ready(s);
    if (rc != kSuccess || out == nullptr) {
        delete h;
        return rc != kSuccess ? rc : kInvalidValue;
    }
    live.insert(h);
    *out = h;
    return kSuccess;
}

template <class H>
int destroy(std::set<H*>& live, void* handle) {
    H* h = static_cast<H*>(handle);
    if (live.erase(h) == 0) return kInvalidHandle;
    delete h;
    return kSuccess;
}

int do_alloc(State& s, uint64_t* dptr, size_t bytes) {
    if (dptr == nullptr || bytes == 0) return kInvalidValue;
    if (bytes > kTotalMemory - s.allocated) return kOutOfMemory;
    // 256-byte aligned, as cuMemAlloc's pointers are.
    void* p = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
    if (p == nullptr) return kOutOfMemory;
    // cuMemAlloc's memory holds whatever was there: poison it, so that reading memory
    // nobody wrote (a workspace counter never zeroed, say) shows (NaN for floats).
    std::memset(p, 0xFF, bytes);
    *dptr = reinterpret_cast<uint64_t>(p);
    s.allocations[*dptr] = bytes;
    s.allocated += bytes;
    return kSuccess;
}

int do_free(State& s, uint64_t dptr) {
    auto it = s.allocations.find(dptr);
    if (it == s.allocations.end()) return kInvalidValue;
    s.allocated -= it->second;
    std::free(reinterpret_cast<void*>(it->first));
    s.allocations.erase(it);
    return kSuccess;
}

void complain(const char* what, uint64_t addr, uint64_t bytes) {
    std::fprintf(stderr, "emulated CUDA driver: %s: [0x%llx, +%llu) is not inside one live allocation\n", what,
                 static_cast<unsigned long long>(addr), static_cast<unsigned long long>(bytes));
}

int run_launch(State& s, Function* f, const uint32_t grid[3], const uint32_t block[3], uint32_t shared,
               bool cooperative, const BnParams& p);

// Runs one operation whose copy ranges were checked against the live allocations (a
// launch finds its regions itself).
int run_node(State& s, const Node& n) {
    switch (n.kind) {
        case Node::kLaunch:
            return run_launch(s, n.function, n.grid, n.block, n.shared, n.cooperative, n.params);
        case Node::kCopy:
            std::memmove(reinterpret_cast<void*>(n.dst), reinterpret_cast<const void*>(n.src), n.bytes);
            return kSuccess;
        case Node::kMemset:
            std::memset(reinterpret_cast<void*>(n.dst), n.value, n.bytes);
            return kSuccess;
    }
    return kInvalidValue;
}

// Whether a recorded copy or memset still lies in live allocations when its graph
// replays (one may have been freed since the capture).
bool still_inside(const State& s, const Node& n) {
    if (n.kind == Node::kLaunch) return true;
    for (const auto& [device, addr] : {std::pair{n.dst_device, n.dst}, std::pair{n.src_device, n.src}}) {
        if (device && !inside(s, addr, n.bytes)) {
            complain("a graph's copy or memset", addr, n.bytes);
            return false;
        }
    }
    return true;
}

// A checked operation on `stream`: recorded if the stream captures, run otherwise.
int submit(State& s, void* stream, const Node& n) {
    if (Capture* c = capture_of(s, stream)) {
        if (c->invalidated) return kCaptureInvalidated;
        c->nodes.push_back(n);
        return kSuccess;
    }
    return run_node(s, n);
}

int do_copy(State& s, const char* what, uint64_t dst, bool dst_device, uint64_t src, bool src_device, size_t bytes,
            void* stream) {
    int rc = check_ready(s);
    if (rc != kSuccess) return rc;
    if (!stream_ok(s, stream)) return kInvalidHandle;
    if (bytes == 0) return kSuccess;
    if (dst_device && !inside(s, dst, bytes)) {
        complain(what, dst, bytes);
        return kInvalidValue;
    }
    if (src_device && !inside(s, src, bytes)) {
        complain(what, src, bytes);
        return kInvalidValue;
    }
    Capture* c = capture_of(s, stream);
    if (c != nullptr && !c->invalidated && (!dst_device || !src_device)) return refuse(c, kCaptureUnsupported);
    Node n;
    n.kind = Node::kCopy;
    n.dst = dst;
    n.src = src;
    n.dst_device = dst_device;
    n.src_device = src_device;
    n.bytes = bytes;
    return submit(s, stream, n);
}

int do_memset(State& s, uint64_t dst, uint8_t value, size_t bytes, void* stream) {
    int rc = check_ready(s);
    if (rc != kSuccess) return rc;
    if (!stream_ok(s, stream)) return kInvalidHandle;
    if (bytes == 0) return kSuccess;
    if (!inside(s, dst, bytes)) {
        complain("cuMemsetD8", dst, bytes);
        return kInvalidValue;
    }
    Node n;
    n.kind = Node::kMemset;
    n.dst = dst;
    n.src_device = false;  // no source
    n.value = value;
    n.bytes = bytes;
    return submit(s, stream, n);
}

// The CUDA version the driver reports: BN_EMU_DRIVER_VERSION (e.g. 12080 for 12.8) lets a
// test play an older driver.
int driver_version() {
    const char* v = std::getenv("BN_EMU_DRIVER_VERSION");
    if (v == nullptr || *v == '\0') return kDriverVersion;
    char* end = nullptr;
    const long parsed = std::strtol(v, &end, 10);
    return (end != nullptr && *end == '\0' && parsed > 0 && parsed < 100000) ? static_cast<int>(parsed) : kDriverVersion;
}

// How many devices the driver shows: BN_EMU_DRIVER_DEVICES=n (0 to 16), four when it is
// unset or anything else. 0 plays a machine whose driver is installed but sees no GPU
// (a container without one, CUDA_VISIBLE_DEVICES=""), where NVIDIA's cuInit fails
// with CUDA_ERROR_NO_DEVICE.
int device_count() {
    const char* v = std::getenv("BN_EMU_DRIVER_DEVICES");
    if (v == nullptr || *v == '\0') return kDefaultDevices;
    char* end = nullptr;
    const long n = std::strtol(v, &end, 10);
    return (end != nullptr && *end == '\0' && n >= 0 && n <= kMaxDevices) ? static_cast<int>(n) : kDefaultDevices;
}

bool device_visible() { return device_count() > 0; }

bool valid_device(int dev) { return dev >= 0 && dev < device_count(); }

// Newest PTX ISA (10 * major + minor) a driver of CUDA `version` JIT-compiles, from
// NVIDIA's PTX ISA release notes: 11.x -> 7.x, 12.0-12.5 -> 8.0-8.5, 12.6 -> 8.5,
// 12.8 -> 8.7, 12.9 -> 8.8, 13.x -> 9.x.
int max_ptx_isa(int version) {
    const int major = version / 1000;
    const int minor = (version % 1000) / 10;
    if (major >= 13) return (major - 4) * 10 + minor;
    if (major == 12) return minor <= 5 ? 80 + minor : (minor == 6 ? 85 : 79 + minor);
    if (major == 11) return 70 + minor;
    return 0;
}

// The ".version X.Y" of PTX text as 10 * X + Y, or -1.
int ptx_isa(const char* text) {
    const char* v = std::strstr(text, ".version");
    int major = 0, minor = 0;
    if (v == nullptr || std::sscanf(v, ".version %d.%d", &major, &minor) != 2) return -1;
    return major * 10 + minor;
}

// Blocks of `threads` threads and `shared` dynamic shared bytes resident per
// multiprocessor (the model in the header).
int occupancy(unsigned threads, size_t shared) {
    if (const char* v = std::getenv("BN_EMU_DRIVER_OCCUPANCY")) {
        const int n = std::atoi(v);
        if (n > 0) return n;
    }
    if (threads == 0 || threads > 1024) return 0;
    int n = static_cast<int>(2048 / threads);
    if (n > 32) n = 32;
    const size_t smem = 228 * 1024;
    if (shared > 0) {
        const size_t by_smem = smem / (shared + 1024);  // 1 KB reserved per block
        if (by_smem < static_cast<size_t>(n)) n = static_cast<int>(by_smem);
    }
    return n;
}

int do_launch(State& s, Function* f, const uint32_t grid[3], const uint32_t block[3], uint32_t shared, void* stream,
              void** params, void** extra, bool cooperative) {
    int rc = check_ready(s);
    if (rc != kSuccess) return rc;
    if (s.functions.count(f) == 0) return kInvalidHandle;
    if (!stream_ok(s, stream)) return kInvalidHandle;
    if (extra != nullptr || params == nullptr || params[0] == nullptr) return kInvalidValue;
    // Past 48 KiB only after the function's limit was raised, as the driver requires.
    if (shared > static_cast<uint32_t>(f->max_dynamic_shared)) return kInvalidValue;
    if (cooperative) {
        const uint64_t blocks = uint64_t{grid[0]} * grid[1] * grid[2];
        const int per_sm = occupancy(block[0] * block[1] * block[2], shared);
        if (blocks > static_cast<uint64_t>(per_sm) * kSmCount) return kCooperativeLaunchTooLarge;
    }
    Node n;
    n.kind = Node::kLaunch;
    n.function = f;
    for (int i = 0; i < 3; ++i) {
        n.grid[i] = grid[i];
        n.block[i] = block[i];
    }
    n.shared = shared;
    n.cooperative = cooperative;
    std::memcpy(&n.params, params[0], sizeof n.params);
    return submit(s, stream, n);
}

// Runs one launch on the emulator, with the allocations that its parameters point into
// as its regions.
int run_launch(State& s, Function* f, const uint32_t grid[3], const uint32_t block[3], uint32_t shared,
               bool cooperative, const BnParams& p) {
    struct Field {
        uint64_t addr;
        const char* name;
        bool read_only;
    };
    const Field fields[] = {
        {p.x, "x", true},
        {p.y, "y", false},
        {p.dy, "dy", true},
        {p.dx, "dx", false},
        {p.weight, "weight", true},
        {p.bias, "bias", true},
        {p.running_mean, "running_mean", false},
        {p.running_var, "running_var", false},
        {p.save_mean, "save_mean", false},
        {p.save_invstd, "save_invstd", false},
        {p.grad_weight, "grad_weight", false},
        {p.grad_bias, "grad_bias", false},
        {p.ws_counters, "ws_counters", false},
        {p.ws_partials, "ws_partials", false},
        {p.ws_channel, "ws_channel", false},
        {p.z, "z", true},
        {p.dz, "dz", false},
    };
    // One region per allocation that some address points into, named after the first
    // field that does.
    struct Alloc {
        uint64_t base, bytes;
        std::string name;
        bool read_only, counters;
    };
    std::vector<Alloc> allocs;
    for (const Field& fd : fields) {
        if (fd.addr == 0) continue;
        const auto [base, bytes] = allocation_of(s, fd.addr);
        if (bytes == 0) continue;  // not device memory: any access fails the launch
        const bool counters = fd.addr == p.ws_counters;
        bool found = false;
        for (Alloc& a : allocs) {
            if (a.base == base) {
                a.read_only = a.read_only && fd.read_only;
                a.counters = a.counters && counters;
                a.name += std::string("/") + fd.name;
                found = true;
            }
        }
        if (!found) allocs.push_back(Alloc{base, bytes, fd.name, fd.read_only, counters});
    }
    std::vector<bn_emu_region> regions;
    for (const Alloc& a : allocs) {
        const uint32_t kind = a.counters ? 4u : (a.read_only ? 0u : 2u);
        regions.push_back(bn_emu_region{a.base, a.bytes, a.name.data(), a.name.size(), kind, 0});
    }
    bn_emu_launch_desc d{};
    d.kernel = f->name.data();
    d.kernel_len = f->name.size();
    for (int i = 0; i < 3; ++i) {
        d.grid[i] = grid[i];
        d.block[i] = block[i];
    }
    d.dynamic_shared_bytes = shared;
    d.shared_limit_bytes = f->max_dynamic_shared > 48 * 1024 ? kSharedOptin : 0;
    d.cooperative = cooperative ? 1 : 0;
    d.seed = bn_emu_seed_from_env();
    d.max_resident_blocks = 4;
    d.preempt_one_in = bn_emu_preempt_from_env();
    d.params = &p;
    d.params_len = sizeof p;
    d.regions = regions.data();
    d.nregions = regions.size();
    const char* msg = nullptr;
    size_t msg_len = 0;
    if (bn_emu_launch(&d, &msg, &msg_len) != 0) {
        std::fprintf(stderr, "emulated CUDA driver: launch of %s failed: %.*s\n", f->name.c_str(),
                     static_cast<int>(msg_len), msg != nullptr ? msg : "");
        return kIllegalAddress;
    }
    return kSuccess;
}

// Runs a graph's nodes in order.
int replay(State& s, const std::vector<Node>& nodes) {
    for (const Node& n : nodes) {
        if (!still_inside(s, n)) return kInvalidValue;
        const int rc = run_node(s, n);
        if (rc != kSuccess) return rc;
    }
    return kSuccess;
}

bool registered(const std::string& name) {
    const size_t n = bn_emu_kernel_count();
    for (size_t i = 0; i < n; ++i) {
        size_t len = 0;
        const char* k = bn_emu_kernel_name(i, &len);
        if (name.size() == len && std::memcmp(name.data(), k, len) == 0) return true;
    }
    return false;
}

const char* error_name(int e) {
    switch (e) {
        case kSuccess: return "CUDA_SUCCESS";
        case kInvalidValue: return "CUDA_ERROR_INVALID_VALUE";
        case kOutOfMemory: return "CUDA_ERROR_OUT_OF_MEMORY";
        case kNotInitialized: return "CUDA_ERROR_NOT_INITIALIZED";
        case kNoDevice: return "CUDA_ERROR_NO_DEVICE";
        case kInvalidDevice: return "CUDA_ERROR_INVALID_DEVICE";
        case kInvalidImage: return "CUDA_ERROR_INVALID_IMAGE";
        case kInvalidContext: return "CUDA_ERROR_INVALID_CONTEXT";
        case kInvalidPtx: return "CUDA_ERROR_INVALID_PTX";
        case kUnsupportedPtxVersion: return "CUDA_ERROR_UNSUPPORTED_PTX_VERSION";
        case kInvalidHandle: return "CUDA_ERROR_INVALID_HANDLE";
        case kNotFound: return "CUDA_ERROR_NOT_FOUND";
        case kIllegalAddress: return "CUDA_ERROR_ILLEGAL_ADDRESS";
        case kLaunchFailed: return "CUDA_ERROR_LAUNCH_FAILED";
        case kLaunchOutOfResources: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
        case kNotSupported: return "CUDA_ERROR_NOT_SUPPORTED";
        case kIllegalState: return "CUDA_ERROR_ILLEGAL_STATE";
        case kCaptureUnsupported: return "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
        case kCaptureInvalidated: return "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED";
        case kCapturedEvent: return "CUDA_ERROR_CAPTURED_EVENT";
        case kCaptureWrongThread: return "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD";
        default: return nullptr;
    }
}

const char* error_string(int e) {
    switch (e) {
        case kSuccess: return "no error";
        case kInvalidValue: return "invalid argument";
        case kOutOfMemory: return "out of memory";
        case kNotInitialized: return "initialization error";
        case kNoDevice: return "no CUDA-capable device is detected";
        case kInvalidDevice: return "invalid device ordinal";
        case kInvalidImage: return "device kernel image is invalid";
        case kInvalidContext: return "invalid device context";
        case kInvalidPtx: return "a PTX JIT compilation failed";
        case kUnsupportedPtxVersion: return "the provided PTX was compiled with an unsupported toolchain.";
        case kInvalidHandle: return "invalid resource handle";
        case kNotFound: return "named symbol not found";
        case kIllegalAddress: return "an illegal memory access was encountered (emulated)";
        case kLaunchFailed: return "unspecified launch failure";
        case kLaunchOutOfResources: return "too many resources requested for launch (injected)";
        case kNotSupported: return "operation not supported";
        case kIllegalState: return "the operation cannot be performed in the present state";
        case kCaptureUnsupported: return "operation not permitted when stream is capturing";
        case kCaptureInvalidated: return "operation failed due to a previous error during capture";
        case kCapturedEvent: return "operation not permitted on an event last recorded in a capturing stream";
        case kCaptureWrongThread: return "attempt to terminate a thread-local capture sequence from another thread";
        default: return nullptr;
    }
}

}  // namespace

#define BN_API extern "C" __attribute__((visibility("default")))

// ---- fault injection (tests) ------------------------------------------------------------
//
// bn_emu_driver_fail_call(kind, skip) makes the calling thread's (skip + 1)-th call of a
// kind fail as a real driver's can, before it does anything: a kernel launch with
// CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, a host-to-device copy with CUDA_ERROR_INVALID_VALUE,
// an allocation with CUDA_ERROR_OUT_OF_MEMORY. Per thread, so tests running in parallel
// inject only into their own calls (every call here runs on the caller's thread).
namespace {
enum InjectKind : int { kInjectLaunch = 0, kInjectCopyHtoD = 1, kInjectAlloc = 2 };
thread_local int t_inject_kind = -1;
thread_local unsigned t_inject_skip = 0;

// Whether this call of `kind` is the one to fail (and, if so, disarms the injection).
bool injected(int kind) {
    if (t_inject_kind != kind) return false;
    if (t_inject_skip > 0) {
        --t_inject_skip;
        return false;
    }
    t_inject_kind = -1;
    return true;
}
}  // namespace

BN_API void bn_emu_driver_fail_call(int kind, unsigned skip) {
    t_inject_kind = kind;
    t_inject_skip = skip;
}
#define LOCKED State& s = state(); std::lock_guard<std::mutex> guard(s.lock)

// ---- initialisation, device, context ---------------------------------------------------

BN_API int cuInit(unsigned flags) {
    LOCKED;
    if (flags != 0) return kInvalidValue;
    if (!device_visible()) return kNoDevice;
    s.initialised = true;
    return kSuccess;
}

BN_API int cuDriverGetVersion(int* v) {
    if (v == nullptr) return kInvalidValue;
    *v = driver_version();
    return kSuccess;
}

BN_API int cuDeviceGetCount(int* count) {
    LOCKED;
    if (!s.initialised) return kNotInitialized;
    if (count == nullptr) return kInvalidValue;
    *count = device_count();
    return kSuccess;
}

BN_API int cuDeviceGet(int* dev, int ordinal) {
    LOCKED;
    if (!s.initialised) return kNotInitialized;
    if (dev == nullptr) return kInvalidValue;
    if (!valid_device(ordinal)) return kInvalidDevice;
    *dev = ordinal;
    return kSuccess;
}

BN_API int cuDeviceGetAttribute(int* out, int attr, int dev) {
    LOCKED;
    if (!s.initialised) return kNotInitialized;
    if (out == nullptr) return kInvalidValue;
    if (!valid_device(dev)) return kInvalidDevice;
    return attribute(attr, out);
}

BN_API int cuDeviceGetName(char* name, int len, int dev) {
    if (name == nullptr || len <= 0) return kInvalidValue;
    if (!valid_device(dev)) return kInvalidDevice;
    // driver::DEVICE_NAME in emu/src/lib.rs repeats this name (tests/gpu.rs checks it).
    std::snprintf(name, static_cast<size_t>(len), "%s", "cuda-batchnorm emulated device (CPU)");
    return kSuccess;
}

BN_API int cuDeviceTotalMem_v2(size_t* bytes, int dev) {
    if (bytes == nullptr) return kInvalidValue;
    if (!valid_device(dev)) return kInvalidDevice;
    *bytes = kTotalMemory;
    return kSuccess;
}

BN_API int cuDeviceComputeCapability(int* major, int* minor, int dev) {
    if (major == nullptr || minor == nullptr) return kInvalidValue;
    if (!valid_device(dev)) return kInvalidDevice;
    *major = 9;
    *minor = 0;
    return kSuccess;
}

BN_API int cuDevicePrimaryCtxRetain(void** ctx, int dev) {
    LOCKED;
    if (!s.initialised) return kNotInitialized;
    if (ctx == nullptr) return kInvalidValue;
    if (!valid_device(dev)) return kInvalidDevice;
    s.primary_refs += 1;
    *ctx = context_of(dev);
    return kSuccess;
}

BN_API int cuDevicePrimaryCtxRelease_v2(int dev) {
    LOCKED;
    if (!valid_device(dev)) return kInvalidDevice;
    if (s.primary_refs > 0) s.primary_refs -= 1;
    return kSuccess;
}

// The driver's contexts are the devices' primary contexts, which cuCtxDestroy may not
// destroy; cudarc references the call (a program linked against the driver needs it).
BN_API int cuCtxDestroy_v2(void* ctx) {
    (void)ctx;
    return kInvalidContext;
}

BN_API int cuCtxSetCurrent(void* ctx) {
    if (ctx != nullptr && device_of(ctx) < 0) return kInvalidContext;
    t_current = ctx;
    return kSuccess;
}

BN_API int cuCtxGetCurrent(void** ctx) {
    if (ctx == nullptr) return kInvalidValue;
    *ctx = t_current;
    return kSuccess;
}

BN_API int cuCtxGetDevice(int* dev) {
    if (dev == nullptr) return kInvalidValue;
    if (device_of(t_current) < 0) return kInvalidContext;
    *dev = device_of(t_current);
    return kSuccess;
}

BN_API int cuCtxSynchronize(void) {
    LOCKED;
    const int rc = check_ready(s);
    return rc != kSuccess ? rc : unsafe_call(s);
}

BN_API int cuCtxPushCurrent_v2(void* ctx) { return cuCtxSetCurrent(ctx); }

BN_API int cuCtxPopCurrent_v2(void** ctx) {
    if (ctx != nullptr) *ctx = t_current;
    t_current = nullptr;
    return kSuccess;
}

BN_API int cuGetErrorName(int e, const char** out) {
    if (out == nullptr) return kInvalidValue;
    *out = error_name(e);
    return *out != nullptr ? kSuccess : kInvalidValue;
}

BN_API int cuGetErrorString(int e, const char** out) {
    if (out == nullptr) return kInvalidValue;
    *out = error_string(e);
    return *out != nullptr ? kSuccess : kInvalidValue;
}

// ---- memory -----------------------------------------------------------------------------

BN_API int cuMemAlloc_v2(uint64_t* dptr, size_t bytes) {
    if (injected(kInjectAlloc)) return kOutOfMemory;
    LOCKED;
    int rc = check_ready(s);
    if (rc == kSuccess) rc = unsafe_call(s);
    return rc != kSuccess ? rc : do_alloc(s, dptr, bytes);
}

BN_API int cuMemAllocAsync(uint64_t* dptr, size_t bytes, void* stream) {
    if (injected(kInjectAlloc)) return kOutOfMemory;
    LOCKED;
    const int rc = check_ready(s);
    if (rc != kSuccess) return rc;
    if (!stream_ok(s, stream)) return kInvalidHandle;
    if (Capture* c = capture_of(s, stream)) return refuse(c, kNotSupported);
    return do_alloc(s, dptr, bytes);
}

BN_API int cuMemFree_v2(uint64_t dptr) {
    LOCKED;
    const int rc = unsafe_call(s);
    return rc != kSuccess ? rc : do_free(s, dptr);
}

BN_API int cuMemFreeAsync(uint64_t dptr, void* stream) {
    LOCKED;
    if (!stream_ok(s, stream)) return kInvalidHandle;
    if (Capture* c = capture_of(s, stream)) return refuse(c, kNotSupported);
    return do_free(s, dptr);
}

BN_API int cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    LOCKED;
    if (free_bytes == nullptr || total == nullptr) return kInvalidValue;
    *total = kTotalMemory;
    *free_bytes = kTotalMemory - s.allocated;
    return kSuccess;
}

BN_API int cuMemcpyHtoDAsync_v2(uint64_t dst, const void* src, size_t bytes, void* stream) {
    if (injected(kInjectCopyHtoD)) return kInvalidValue;
    LOCKED;
    return do_copy(s, "cuMemcpyHtoD", dst, true, reinterpret_cast<uint64_t>(src), false, bytes, stream);
}

BN_API int cuMemcpyDtoHAsync_v2(void* dst, uint64_t src, size_t bytes, void* stream) {
    LOCKED;
    return do_copy(s, "cuMemcpyDtoH", reinterpret_cast<uint64_t>(dst), false, src, true, bytes, stream);
}

BN_API int cuMemcpyDtoDAsync_v2(uint64_t dst, uint64_t src, size_t bytes, void* stream) {
    LOCKED;
    return do_copy(s, "cuMemcpyDtoD", dst, true, src, true, bytes, stream);
}

// The synchronous calls wait for the device: a capture may forbid them.
static int sync_call() {
    LOCKED;
    return unsafe_call(s);
}

BN_API int cuMemcpyHtoD_v2(uint64_t dst, const void* src, size_t bytes) {
    const int rc = sync_call();
    return rc != kSuccess ? rc : cuMemcpyHtoDAsync_v2(dst, src, bytes, nullptr);
}

BN_API int cuMemcpyDtoH_v2(void* dst, uint64_t src, size_t bytes) {
    const int rc = sync_call();
    return rc != kSuccess ? rc : cuMemcpyDtoHAsync_v2(dst, src, bytes, nullptr);
}

BN_API int cuMemcpyDtoD_v2(uint64_t dst, uint64_t src, size_t bytes) {
    const int rc = sync_call();
    return rc != kSuccess ? rc : cuMemcpyDtoDAsync_v2(dst, src, bytes, nullptr);
}

BN_API int cuMemsetD8Async(uint64_t dst, unsigned char value, size_t bytes, void* stream) {
    LOCKED;
    return do_memset(s, dst, value, bytes, stream);
}

BN_API int cuMemsetD8_v2(uint64_t dst, unsigned char value, size_t bytes) {
    const int rc = sync_call();
    return rc != kSuccess ? rc : cuMemsetD8Async(dst, value, bytes, nullptr);
}

// ---- streams and events -------------------------------------------------------------------

BN_API int cuStreamCreate(void** stream, unsigned flags) {
    (void)flags;
    LOCKED;
    return create(s, s.streams, stream, new Stream());
}

BN_API int cuStreamCreateWithPriority(void** stream, unsigned flags, int priority) {
    (void)priority;
    return cuStreamCreate(stream, flags);
}

BN_API int cuStreamDestroy_v2(void* stream) {
    LOCKED;
    return destroy(s.streams, stream);
}

BN_API int cuStreamSynchronize(void* stream) {
    LOCKED;
    if (!stream_ok(s, stream)) return kInvalidHandle;
    if (Capture* c = capture_of(s, stream)) return refuse(c, kCaptureUnsupported);
    // The legacy stream synchronises with every stream.
    return reinterpret_cast<uintptr_t>(stream) <= 1 ? unsafe_call(s) : kSuccess;
}

BN_API int cuStreamQuery(void* stream) { return cuStreamSynchronize(stream); }

// ---- stream capture and graphs -------------------------------------------------------------

BN_API int cuStreamBeginCapture_v2(void* stream, int mode) {
    LOCKED;
    const int rc = check_ready(s);
    if (rc != kSuccess) return rc;
    if (!stream_ok(s, stream)) return kInvalidHandle;
    if (mode != kCaptureGlobal && mode != kCaptureThreadLocal && mode != kCaptureRelaxed) return kInvalidValue;
    // The null, legacy and per-thread streams do not capture here.
    if (reinterpret_cast<uintptr_t>(stream) <= 2) return kCaptureUnsupported;
    Stream* st = static_cast<Stream*>(stream);
    if (st->capture != nullptr) return kIllegalState;
    st->capture.reset(new Capture{++s.captures_begun, mode, std::this_thread::get_id(), false, {}});
    return kSuccess;
}

BN_API int cuStreamBeginCapture(void* stream, int mode) { return cuStreamBeginCapture_v2(stream, mode); }

BN_API int cuStreamEndCapture(void* stream, void** graph) {
    LOCKED;
    if (graph == nullptr) return kInvalidValue;
    if (!stream_ok(s, stream)) return kInvalidHandle;
    Capture* c = capture_of(s, stream);
    if (c == nullptr) return kIllegalState;
    if (c->mode != kCaptureRelaxed && c->thread != std::this_thread::get_id()) return kCaptureWrongThread;
    std::unique_ptr<Capture> ended = std::move(static_cast<Stream*>(stream)->capture);
    *graph = nullptr;
    if (ended->invalidated) return kCaptureInvalidated;
    Graph* g = new Graph{std::move(ended->nodes)};
    s.graphs.insert(g);
    *graph = g;
    return kSuccess;
}

BN_API int cuStreamIsCapturing(void* stream, int* status) {
    LOCKED;
    if (status == nullptr) return kInvalidValue;
    if (!stream_ok(s, stream)) return kInvalidHandle;
    const Capture* c = capture_of(s, stream);
    *status = c == nullptr ? kStatusNone : (c->invalidated ? kStatusInvalidated : kStatusActive);
    return kSuccess;
}

BN_API int cuGraphDestroy(void* graph) {
    LOCKED;
    return destroy(s.graphs, graph);
}

// CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH (1), _UPLOAD (2) and
// _USE_NODE_PRIORITY (8) change nothing here; _DEVICE_LAUNCH (4) is not emulated.
BN_API int cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long flags) {
    LOCKED;
    const int rc = check_ready(s);
    if (rc != kSuccess) return rc;
    if (exec == nullptr || (flags & ~0xBull) != 0) return kInvalidValue;
    Graph* g = static_cast<Graph*>(graph);
    if (s.graphs.count(g) == 0) return kInvalidHandle;
    return create(s, s.execs, exec, new GraphExec{g->nodes});
}

BN_API int cuGraphExecDestroy(void* exec) {
    LOCKED;
    return destroy(s.execs, exec);
}

BN_API int cuGraphUpload(void* exec, void* stream) {
    LOCKED;
    if (s.execs.count(static_cast<GraphExec*>(exec)) == 0 || !stream_ok(s, stream)) return kInvalidHandle;
    return kSuccess;
}

// A launch on a capturing stream records the graph's nodes into that capture.
BN_API int cuGraphLaunch(void* exec, void* stream) {
    LOCKED;
    const int rc = check_ready(s);
    if (rc != kSuccess) return rc;
    GraphExec* e = static_cast<GraphExec*>(exec);
    if (s.execs.count(e) == 0 || !stream_ok(s, stream)) return kInvalidHandle;
    if (Capture* c = capture_of(s, stream)) {
        if (c->invalidated) return kCaptureInvalidated;
        c->nodes.insert(c->nodes.end(), e->nodes.begin(), e->nodes.end());
        return kSuccess;
    }
    return replay(s, e->nodes);
}

// One device: no peer copies.
BN_API int cuMemcpyPeerAsync(uint64_t dst, void* dst_ctx, uint64_t src, void* src_ctx, size_t bytes, void* stream) {
    (void)dst, (void)dst_ctx, (void)src, (void)src_ctx, (void)bytes, (void)stream;
    return kNotSupported;
}

// The capture `id` if it is still in progress on some stream, or nullptr.
static Capture* capture_by_id(const State& s, uint64_t id) {
    for (const Stream* st : s.streams) {
        if (st->capture != nullptr && st->capture->id == id) return st->capture.get();
    }
    return nullptr;
}

BN_API int cuStreamWaitEvent(void* stream, void* event, unsigned flags) {
    LOCKED;
    if (!stream_ok(s, stream)) return kInvalidHandle;
    Event* e = static_cast<Event*>(event);
    if (s.events.count(e) == 0) return kInvalidHandle;
    Capture* c = capture_of(s, stream);
    if (c != nullptr) {
        if (c->invalidated) return kCaptureInvalidated;
        // An event of this capture orders nothing more on one stream; an outside one
        // needs CU_EVENT_WAIT_EXTERNAL (1), which is a no-op in a synchronous driver.
        if (e->captured_in != c->id && e->recorded && (flags & 1u) == 0) return refuse(c, kNotSupported);
        return kSuccess;
    }
    // Another stream would join the capture: not emulated.
    if (e->captured_in != 0) {
        if (Capture* joined = capture_by_id(s, e->captured_in)) return refuse(joined, kNotSupported);
    }
    return kSuccess;
}

BN_API int cuEventCreate(void** event, unsigned flags) {
    (void)flags;
    LOCKED;
    return create(s, s.events, event, new Event());
}

BN_API int cuEventDestroy_v2(void* event) {
    LOCKED;
    return destroy(s.events, event);
}

BN_API int cuEventRecord(void* event, void* stream) {
    LOCKED;
    Event* e = static_cast<Event*>(event);
    if (s.events.count(e) == 0 || !stream_ok(s, stream)) return kInvalidHandle;
    if (Capture* c = capture_of(s, stream)) {
        if (c->invalidated) return kCaptureInvalidated;
        e->captured_in = c->id;
        return kSuccess;
    }
    e->at = std::chrono::steady_clock::now();
    e->recorded = true;
    e->captured_in = 0;
    return kSuccess;
}

BN_API int cuEventRecordWithFlags(void* event, void* stream, unsigned flags) {
    (void)flags;
    return cuEventRecord(event, stream);
}

BN_API int cuEventSynchronize(void* event) {
    LOCKED;
    Event* e = static_cast<Event*>(event);
    if (s.events.count(e) == 0) return kInvalidHandle;
    return e->captured_in != 0 ? kCapturedEvent : kSuccess;
}

BN_API int cuEventQuery(void* event) { return cuEventSynchronize(event); }

BN_API int cuEventElapsedTime(float* ms, void* start, void* end) {
    LOCKED;
    Event* a = static_cast<Event*>(start);
    Event* b = static_cast<Event*>(end);
    if (ms == nullptr) return kInvalidValue;
    if (s.events.count(a) == 0 || s.events.count(b) == 0) return kInvalidHandle;
    if (a->captured_in != 0 || b->captured_in != 0) return kCapturedEvent;
    if (!a->recorded || !b->recorded) return kInvalidHandle;
    *ms = std::chrono::duration<float, std::milli>(b->at - a->at).count();
    return kSuccess;
}

BN_API int cuEventElapsedTime_v2(float* ms, void* start, void* end) { return cuEventElapsedTime(ms, start, end); }

// ---- modules and launches -------------------------------------------------------------------

// Loading a module from a file: not emulated (the crate embeds its PTX); cudarc
// references it.
BN_API int cuModuleLoad(void** module, const char* path) {
    (void)module;
    (void)path;
    return kNotSupported;
}

BN_API int cuModuleLoadData(void** module, const void* image) {
    LOCKED;
    const int rc = check_ready(s);
    if (rc != kSuccess) return rc;
    if (module == nullptr || image == nullptr) return kInvalidValue;
    const char* text = static_cast<const char*>(image);
    // PTX text, as the crate embeds it (a cubin or fatbin starts with ELF or fatbin magic).
    const int isa = ptx_isa(text);
    if (isa < 0 || std::strstr(text, ".target") == nullptr) return kInvalidPtx;
    if (isa > max_ptx_isa(driver_version())) return kUnsupportedPtxVersion;
    return create(s, s.modules, module, new Module{text});
}

BN_API int cuModuleUnload(void* module) {
    LOCKED;
    return destroy(s.modules, module);
}

BN_API int cuModuleGetFunction(void** function, void* module, const char* name) {
    LOCKED;
    const int rc = check_ready(s);
    if (rc != kSuccess) return rc;
    Module* m = static_cast<Module*>(module);
    if (function == nullptr || name == nullptr) return kInvalidValue;
    if (s.modules.count(m) == 0) return kInvalidHandle;
    const std::string entry = std::string(".entry ") + name + "(";
    if (m->ptx.find(entry) == std::string::npos || !registered(name)) return kNotFound;
    // Handles are kept for the life of the process, like the module's functions.
    for (Function* f : s.functions) {
        if (f->name == name) {
            *function = f;
            return kSuccess;
        }
    }
    Function* f = new Function{name};
    s.functions.insert(f);
    *function = f;
    return kSuccess;
}

BN_API int cuLaunchKernel(void* function, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                          unsigned shared, void* stream, void** params, void** extra) {
    if (injected(kInjectLaunch)) return kLaunchOutOfResources;
    LOCKED;
    const uint32_t grid[3] = {gx, gy, gz};
    const uint32_t block[3] = {bx, by, bz};
    return do_launch(s, static_cast<Function*>(function), grid, block, shared, stream, params, extra, false);
}

BN_API int cuLaunchCooperativeKernel(void* function, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                     unsigned bz, unsigned shared, void* stream, void** params) {
    if (injected(kInjectLaunch)) return kLaunchOutOfResources;
    LOCKED;
    const uint32_t grid[3] = {gx, gy, gz};
    const uint32_t block[3] = {bx, by, bz};
    return do_launch(s, static_cast<Function*>(function), grid, block, shared, stream, params, nullptr, true);
}

// CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES (1) is answered as 0: the emulator allocates static
// shared memory as a kernel runs and checks the total then; MAX_DYNAMIC_SHARED_SIZE_BYTES
// (8) is the launch limit, settable up to the opt-in.
BN_API int cuFuncGetAttribute(int* out, int attr, void* function) {
    LOCKED;
    const int rc = check_ready(s);
    if (rc != kSuccess) return rc;
    if (out == nullptr) return kInvalidValue;
    Function* f = static_cast<Function*>(function);
    if (s.functions.count(f) == 0) return kInvalidHandle;
    switch (attr) {
        case 0: *out = 1024; return kSuccess;  // max threads per block
        case 1: *out = 0; return kSuccess;
        case 8: *out = f->max_dynamic_shared; return kSuccess;
        default: return kInvalidValue;  // not emulated: no silent zero
    }
}

BN_API int cuFuncSetAttribute(void* function, int attr, int value) {
    LOCKED;
    const int rc = check_ready(s);
    if (rc != kSuccess) return rc;
    Function* f = static_cast<Function*>(function);
    if (s.functions.count(f) == 0) return kInvalidHandle;
    if (attr != 8 || value < 0 || value > kSharedOptin) return kInvalidValue;
    f->max_dynamic_shared = value;
    return kSuccess;
}

BN_API int cuOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void* function, int block_size,
                                                       size_t dynamic_shared) {
    LOCKED;
    const int rc = check_ready(s);
    if (rc != kSuccess) return rc;
    if (blocks == nullptr || block_size <= 0) return kInvalidValue;
    if (s.functions.count(static_cast<Function*>(function)) == 0) return kInvalidHandle;
    *blocks = occupancy(static_cast<unsigned>(block_size), dynamic_shared);
    return kSuccess;
}
