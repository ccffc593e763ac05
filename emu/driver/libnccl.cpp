// libnccl.cpp: an emulated NCCL. Built by build.rs into a shared library named
// libnccl.so (SONAME libnccl.so) that exports the NCCL entry points cudarc's bindings
// call, for ranks that run as threads of one process on the emulated driver's devices
// (driver/libcuda.cpp): so SyncBatchNorm's NCCL path runs in `cargo test`.
//
// Model, and its assumptions:
//   * a communicator is found by its unique id: ncclCommInitRank blocks until all
//     nranks ranks of that id have joined, each from a thread whose current context is
//     a different device (NCCL refuses two ranks on one device with ncclInvalidUsage);
//   * collectives are synchronous, as everything on the emulated driver is: a call
//     returns once every rank of the communicator has made its matching call and the
//     data has moved. Data moves through the emulated driver's own copies
//     (cuMemcpyDtoH / cuMemcpyHtoD, found with dlsym), so every buffer is checked
//     against its live allocations;
//   * the ranks' n-th collectives must agree (kind, count, type, operation), as NCCL
//     requires; where they do not, every rank's call fails with ncclInvalidUsage (a
//     real NCCL may hang or corrupt memory instead). A rank that waits more than
//     BN_EMU_NCCL_TIMEOUT_S seconds (default 120) for the others fails with
//     ncclSystemError, so that a test fails where a real run would hang, and the
//     communicator's later calls fail too (its ranks are out of step);
//   * all-reduce sums, in rank order, f32, f64, int32, int64 and uint8 (what
//     SyncBatchNorm and the tests use); other types or operations fail with
//     ncclInvalidArgument. ncclGroupStart / ncclGroupEnd nest and do nothing else.

#include <dlfcn.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace {

// ncclResult_t
enum : int {
    kSuccess = 0,
    kUnhandledCudaError = 1,
    kSystemError = 2,
    kInternalError = 3,
    kInvalidArgument = 4,
    kInvalidUsage = 5,
};

// ncclDataType_t and ncclRedOp_t values (nccl.h).
enum : int { kInt8 = 0, kUint8 = 1, kInt32 = 2, kUint32 = 3, kInt64 = 4, kUint64 = 5, kFloat16 = 6, kFloat32 = 7, kFloat64 = 8, kBfloat16 = 9 };
enum : int { kSum = 0 };
enum Kind : int { kAllGather = 1, kAllReduce = 2 };

size_t type_size(int t) {
    switch (t) {
        case kInt8: case kUint8: return 1;
        case kFloat16: case kBfloat16: return 2;
        case kInt32: case kUint32: case kFloat32: return 4;
        case kInt64: case kUint64: case kFloat64: return 8;
        default: return 0;
    }
}

struct UniqueId {
    char internal[128];
};

// One rank's side of its current collective.
struct Slot {
    int kind = 0;
    const void* send = nullptr;
    void* recv = nullptr;
    size_t count = 0;
    int type = 0;
    int op = 0;
};

struct Shared {
    int nranks = 0;
    std::mutex m;
    std::condition_variable cv;
    std::vector<int> devices;
    // the barrier's state
    uint64_t generation = 0;
    int arrived = 0;
    std::vector<Slot> slots;
    // a rank gave up waiting: the ranks are out of step, every later call fails
    bool broken = false;
};

struct Comm {
    std::shared_ptr<Shared> shared;
    int rank = 0;
    int device = 0;
};

std::mutex g_lock;
std::map<std::string, std::shared_ptr<Shared>> g_pending;  // communicators still forming
std::atomic<uint64_t> g_ids{0};
thread_local int t_group_depth = 0;

int timeout_s() {
    const char* v = std::getenv("BN_EMU_NCCL_TIMEOUT_S");
    const long n = v != nullptr ? std::strtol(v, nullptr, 10) : 0;
    return n > 0 ? static_cast<int>(n) : 120;
}

// Waits until every rank has arrived; false after the timeout.
bool barrier(Shared& sh, std::unique_lock<std::mutex>& lk) {
    const uint64_t gen = sh.generation;
    if (++sh.arrived == sh.nranks) {
        sh.arrived = 0;
        sh.generation += 1;
        sh.cv.notify_all();
        return true;
    }
    if (sh.cv.wait_for(lk, std::chrono::seconds(timeout_s()), [&] { return sh.generation != gen; })) return true;
    sh.arrived -= 1;
    sh.broken = true;
    return false;
}

// The emulated driver's calls this library moves data with.
using DtoH = int (*)(void*, uint64_t, size_t);
using HtoD = int (*)(uint64_t, const void*, size_t);
using GetDevice = int (*)(int*);

// Found in the global scope (the driver preloaded with RTLD_GLOBAL), else in a libcuda
// this process already loaded locally (cudarc's own dlopen of the emulated driver found
// through LD_LIBRARY_PATH); never loads one.
template <class F>
F driver(const char* name) {
    if (void* f = dlsym(RTLD_DEFAULT, name)) return reinterpret_cast<F>(f);
    for (const char* lib : {"libcuda.so", "libcuda.so.1"}) {
        if (void* h = dlopen(lib, RTLD_LAZY | RTLD_NOLOAD)) {
            void* f = dlsym(h, name);
            dlclose(h);  // drops the reference RTLD_NOLOAD took; the library stays loaded
            if (f != nullptr) return reinterpret_cast<F>(f);
        }
    }
    return nullptr;
}

int copy_in(std::vector<unsigned char>& host, const void* src, size_t bytes) {
    static const DtoH f = driver<DtoH>("cuMemcpyDtoH_v2");
    if (f == nullptr) return kUnhandledCudaError;
    host.resize(bytes);
    if (bytes == 0) return kSuccess;
    return f(host.data(), reinterpret_cast<uint64_t>(src), bytes) == 0 ? kSuccess : kUnhandledCudaError;
}

int copy_out(void* dst, const unsigned char* host, size_t bytes) {
    static const HtoD f = driver<HtoD>("cuMemcpyHtoD_v2");
    if (f == nullptr) return kUnhandledCudaError;
    if (bytes == 0) return kSuccess;
    return f(reinterpret_cast<uint64_t>(dst), host, bytes) == 0 ? kSuccess : kUnhandledCudaError;
}

template <class V>
void add_into(std::vector<unsigned char>& acc, const std::vector<unsigned char>& v, size_t count) {
    for (size_t i = 0; i < count; ++i) {
        V a, b;
        std::memcpy(&a, acc.data() + i * sizeof(V), sizeof(V));
        std::memcpy(&b, v.data() + i * sizeof(V), sizeof(V));
        a = static_cast<V>(a + b);
        std::memcpy(acc.data() + i * sizeof(V), &a, sizeof(V));
    }
}

bool add(int type, std::vector<unsigned char>& acc, const std::vector<unsigned char>& v, size_t count) {
    switch (type) {
        case kFloat32: add_into<float>(acc, v, count); return true;
        case kFloat64: add_into<double>(acc, v, count); return true;
        case kInt32: add_into<int32_t>(acc, v, count); return true;
        case kInt64: add_into<int64_t>(acc, v, count); return true;
        case kUint8: add_into<uint8_t>(acc, v, count); return true;
        default: return false;
    }
}

const char* kind_name(int k) { return k == kAllGather ? "ncclAllGather" : "ncclAllReduce"; }

// One collective of one rank: publish, meet, check that the ranks agree, move this
// rank's data, meet again (no rank returns, and reuses its buffers, while another may
// still read them).
int collective(Comm* c, const Slot& mine) {
    if (c == nullptr || !c->shared) return kInvalidArgument;
    Shared& sh = *c->shared;
    std::unique_lock<std::mutex> lk(sh.m);
    if (sh.broken) return kSystemError;
    sh.slots[c->rank] = mine;
    if (!barrier(sh, lk)) {
        std::fprintf(stderr, "emulated NCCL: rank %d waited %d s for the other ranks in %s\n", c->rank, timeout_s(),
                     kind_name(mine.kind));
        return kSystemError;
    }
    const std::vector<Slot> all = sh.slots;
    lk.unlock();
    int rc = kSuccess;
    for (const Slot& s : all) {
        if (s.kind != mine.kind || s.count != mine.count || s.type != mine.type || s.op != mine.op) {
            rc = kInvalidUsage;
        }
    }
    const size_t bytes = mine.count * type_size(mine.type);
    if (rc == kSuccess && type_size(mine.type) == 0) rc = kInvalidArgument;
    if (rc == kSuccess && mine.kind == kAllReduce && mine.op != kSum) rc = kInvalidArgument;
    std::vector<std::vector<unsigned char>> data(all.size());
    for (size_t r = 0; rc == kSuccess && r < all.size(); ++r) rc = copy_in(data[r], all[r].send, bytes);
    if (rc == kSuccess && mine.kind == kAllGather) {
        std::vector<unsigned char> out;
        for (const auto& d : data) out.insert(out.end(), d.begin(), d.end());
        // every rank read every send buffer before any rank writes its output
        lk.lock();
        if (!barrier(sh, lk)) rc = kSystemError;
        lk.unlock();
        if (rc == kSuccess) rc = copy_out(mine.recv, out.data(), out.size());
    } else if (rc == kSuccess) {
        std::vector<unsigned char> sum = data[0];
        for (size_t r = 1; r < data.size(); ++r) {
            if (!add(mine.type, sum, data[r], mine.count)) rc = kInvalidArgument;
        }
        lk.lock();
        if (!barrier(sh, lk)) rc = kSystemError;
        lk.unlock();
        if (rc == kSuccess) rc = copy_out(mine.recv, sum.data(), sum.size());
    } else {
        // the ranks still meet once more, so that none waits at the next call
        lk.lock();
        barrier(sh, lk);
        lk.unlock();
    }
    if (rc != kSuccess && rc != kSystemError) {
        std::fprintf(stderr, "emulated NCCL: %s on rank %d failed (%d): the ranks' calls disagree or are unsupported\n",
                     kind_name(mine.kind), c->rank, rc);
    }
    lk.lock();
    if (!barrier(sh, lk)) rc = kSystemError;
    return rc;
}

}  // namespace

#define BN_API extern "C" __attribute__((visibility("default")))

BN_API int ncclGetVersion(int* version) {
    if (version == nullptr) return kInvalidArgument;
    *version = 23000;
    return kSuccess;
}

BN_API int ncclGetUniqueId(UniqueId* id) {
    if (id == nullptr) return kInvalidArgument;
    std::memset(id->internal, 0, sizeof id->internal);
    std::snprintf(id->internal, sizeof id->internal, "bn-emu-nccl %ld %llu", static_cast<long>(getpid()),
                  static_cast<unsigned long long>(g_ids.fetch_add(1) + 1));
    return kSuccess;
}

BN_API int ncclCommInitRank(Comm** comm, int nranks, UniqueId id, int rank) {
    if (comm == nullptr || nranks < 1 || rank < 0 || rank >= nranks) return kInvalidArgument;
    static const GetDevice get_device = driver<GetDevice>("cuCtxGetDevice");
    int device = -1;
    if (get_device == nullptr || get_device(&device) != 0) return kUnhandledCudaError;
    const std::string key(id.internal, sizeof id.internal);
    std::shared_ptr<Shared> sh;
    {
        std::lock_guard<std::mutex> g(g_lock);
        auto& slot = g_pending[key];
        if (!slot) {
            slot = std::make_shared<Shared>();
            slot->nranks = nranks;
            slot->devices.assign(static_cast<size_t>(nranks), -1);
            slot->slots.resize(static_cast<size_t>(nranks));
        }
        sh = slot;
    }
    std::unique_lock<std::mutex> lk(sh->m);
    if (sh->nranks != nranks || sh->devices[rank] != -1) return kInvalidUsage;
    sh->devices[rank] = device;
    if (!barrier(*sh, lk)) {
        std::fprintf(stderr, "emulated NCCL: rank %d waited %d s for the other ranks to join\n", rank, timeout_s());
        return kSystemError;
    }
    {
        std::lock_guard<std::mutex> g(g_lock);
        g_pending.erase(key);
    }
    for (int r = 0; r < nranks; ++r) {
        if (r != rank && sh->devices[r] == device) {
            std::fprintf(stderr, "emulated NCCL: duplicate GPU: rank %d and rank %d both on device %d\n", rank, r,
                         device);
            return kInvalidUsage;
        }
    }
    *comm = new Comm{sh, rank, device};
    return kSuccess;
}

BN_API int ncclCommDestroy(Comm* comm) {
    if (comm == nullptr) return kInvalidArgument;
    delete comm;
    return kSuccess;
}

BN_API int ncclCommAbort(Comm* comm) { return ncclCommDestroy(comm); }

BN_API int ncclCommCount(const Comm* comm, int* count) {
    if (comm == nullptr || count == nullptr) return kInvalidArgument;
    *count = comm->shared->nranks;
    return kSuccess;
}

BN_API int ncclCommUserRank(const Comm* comm, int* rank) {
    if (comm == nullptr || rank == nullptr) return kInvalidArgument;
    *rank = comm->rank;
    return kSuccess;
}

BN_API int ncclCommCuDevice(const Comm* comm, int* device) {
    if (comm == nullptr || device == nullptr) return kInvalidArgument;
    *device = comm->device;
    return kSuccess;
}

BN_API int ncclAllGather(const void* send, void* recv, size_t count, int type, Comm* comm, void* stream) {
    (void)stream;
    Slot s;
    s.kind = kAllGather;
    s.send = send;
    s.recv = recv;
    s.count = count;
    s.type = type;
    return collective(comm, s);
}

BN_API int ncclAllReduce(const void* send, void* recv, size_t count, int type, int op, Comm* comm, void* stream) {
    (void)stream;
    Slot s;
    s.kind = kAllReduce;
    s.send = send;
    s.recv = recv;
    s.count = count;
    s.type = type;
    s.op = op;
    return collective(comm, s);
}

BN_API int ncclGroupStart() {
    t_group_depth += 1;
    return kSuccess;
}

BN_API int ncclGroupEnd() {
    if (t_group_depth == 0) return kInvalidUsage;
    t_group_depth -= 1;
    return kSuccess;
}

BN_API const char* ncclGetErrorString(int result) {
    switch (result) {
        case kSuccess: return "no error";
        case kUnhandledCudaError: return "unhandled cuda error (emulated)";
        case kSystemError: return "unhandled system error (emulated: a rank waited too long)";
        case kInternalError: return "internal error (emulated)";
        case kInvalidArgument: return "invalid argument (emulated)";
        case kInvalidUsage: return "invalid usage (emulated)";
        default: return "unknown result code";
    }
}
