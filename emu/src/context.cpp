// context.cpp: the fiber context switch (x86_64 and aarch64 assembly, ucontext
// elsewhere) and the per-OS-thread pool of fiber stacks.
#include "context.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <vector>

#if defined(__APPLE__)
#define BN_EMU_FUNC_BEGIN(name) ".globl _" #name "\n.private_extern _" #name "\n.p2align 4\n_" #name ":\n"
#define BN_EMU_FUNC_END(name) ""
#else
#define BN_EMU_FUNC_BEGIN(name) \
    ".globl " #name "\n.hidden " #name "\n.type " #name ", @function\n.p2align 4\n" #name ":\n"
#define BN_EMU_FUNC_END(name) ".size " #name ", .-" #name "\n"
#endif

#if BN_EMU_ASM_SWITCH && defined(__x86_64__)

// Frame on a suspended stack, from the saved stack pointer up:
//   [0] mxcsr (low 32 bits) and x87 control word (bits 32..47)
//   [1] r15  [2] r14  [3] r13  [4] r12  [5] rbx  [6] rbp  [7] return address
extern "C" void bn_emu_fiber_start();
// clang-format off
asm(".text\n"
    BN_EMU_FUNC_BEGIN(bn_emu_ctx_switch)
    "    pushq %rbp\n"
    "    pushq %rbx\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    subq $8, %rsp\n"
    "    stmxcsr (%rsp)\n"
    "    fnstcw 4(%rsp)\n"
    "    movl (%rsp), %eax\n"
    "    movzwl 4(%rsp), %ecx\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    // Loading MXCSR / the x87 control word is slow (it serialises): only when they differ.
    "    cmpl (%rsp), %eax\n"
    "    je 1f\n"
    "    ldmxcsr (%rsp)\n"
    "1:  cmpw 4(%rsp), %cx\n"
    "    je 2f\n"
    "    fldcw 4(%rsp)\n"
    "2:  addq $8, %rsp\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbx\n"
    "    popq %rbp\n"
    "    ret\n"
    BN_EMU_FUNC_END(bn_emu_ctx_switch)
    // First activation of a fiber: r12 = argument, rbx = entry; rsp is 16-byte aligned.
    BN_EMU_FUNC_BEGIN(bn_emu_fiber_start)
    "    movq %r12, %rdi\n"
    "    callq *%rbx\n"
    "    ud2\n"
    BN_EMU_FUNC_END(bn_emu_fiber_start));
// clang-format on

namespace bn_emu {

void context_init(Context* ctx, void* stack_lo, size_t bytes, void (*entry)(void*), void* arg) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack_lo) + bytes) & ~static_cast<uintptr_t>(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top) - 8;
    uint32_t mxcsr = 0;
    uint16_t fpucw = 0;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    sp[0] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
    sp[1] = 0;                                       // r15
    sp[2] = 0;                                       // r14
    sp[3] = 0;                                       // r13
    sp[4] = reinterpret_cast<uint64_t>(arg);         // r12
    sp[5] = reinterpret_cast<uint64_t>(entry);       // rbx
    sp[6] = 0;                                       // rbp: ends frame-pointer walks
    sp[7] = reinterpret_cast<uint64_t>(&bn_emu_fiber_start);
    ctx->sp = sp;
}

}  // namespace bn_emu

#elif BN_EMU_ASM_SWITCH && defined(__aarch64__)

// Frame on a suspended stack (176 bytes), from the saved stack pointer up:
//   x19..x28 at 0..72, x29 (fp) at 80, x30 (lr) at 88, d8..d15 at 96..152, fpcr at 160.
extern "C" void bn_emu_fiber_start();
// clang-format off
asm(".text\n"
    BN_EMU_FUNC_BEGIN(bn_emu_ctx_switch)
    "    sub sp, sp, #176\n"
    "    stp x19, x20, [sp, #0]\n"
    "    stp x21, x22, [sp, #16]\n"
    "    stp x23, x24, [sp, #32]\n"
    "    stp x25, x26, [sp, #48]\n"
    "    stp x27, x28, [sp, #64]\n"
    "    stp x29, x30, [sp, #80]\n"
    "    stp d8, d9, [sp, #96]\n"
    "    stp d10, d11, [sp, #112]\n"
    "    stp d12, d13, [sp, #128]\n"
    "    stp d14, d15, [sp, #144]\n"
    "    mrs x9, fpcr\n"
    "    str x9, [sp, #160]\n"
    "    mov x9, sp\n"
    "    str x9, [x0]\n"
    "    mov sp, x1\n"
    "    ldr x9, [sp, #160]\n"
    "    mrs x10, fpcr\n"
    "    cmp x9, x10\n"
    "    b.eq 1f\n"
    "    msr fpcr, x9\n"
    "1:\n"
    "    ldp x19, x20, [sp, #0]\n"
    "    ldp x21, x22, [sp, #16]\n"
    "    ldp x23, x24, [sp, #32]\n"
    "    ldp x25, x26, [sp, #48]\n"
    "    ldp x27, x28, [sp, #64]\n"
    "    ldp x29, x30, [sp, #80]\n"
    "    ldp d8, d9, [sp, #96]\n"
    "    ldp d10, d11, [sp, #112]\n"
    "    ldp d12, d13, [sp, #128]\n"
    "    ldp d14, d15, [sp, #144]\n"
    "    add sp, sp, #176\n"
    "    ret\n"
    BN_EMU_FUNC_END(bn_emu_ctx_switch)
    // First activation: x19 = argument, x20 = entry.
    BN_EMU_FUNC_BEGIN(bn_emu_fiber_start)
    "    mov x0, x19\n"
    "    blr x20\n"
    "    brk #0\n"
    BN_EMU_FUNC_END(bn_emu_fiber_start));
// clang-format on

namespace bn_emu {

void context_init(Context* ctx, void* stack_lo, size_t bytes, void (*entry)(void*), void* arg) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack_lo) + bytes) & ~static_cast<uintptr_t>(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top - 176);
    memset(sp, 0, 176);
    uint64_t fpcr = 0;
    asm volatile("mrs %0, fpcr" : "=r"(fpcr));
    sp[0] = reinterpret_cast<uint64_t>(arg);    // x19
    sp[1] = reinterpret_cast<uint64_t>(entry);  // x20
    sp[10] = 0;                                 // x29
    sp[11] = reinterpret_cast<uint64_t>(&bn_emu_fiber_start);  // x30
    sp[20] = fpcr;
    ctx->sp = sp;
}

}  // namespace bn_emu

#else  // ucontext fallback

namespace bn_emu {
namespace {

// makecontext passes int arguments: split the two pointers into 32-bit halves.
void ucontext_entry(unsigned e_hi, unsigned e_lo, unsigned a_hi, unsigned a_lo) {
    const uintptr_t e = (static_cast<uintptr_t>(static_cast<uint64_t>(e_hi) << 32)) | e_lo;
    const uintptr_t a = (static_cast<uintptr_t>(static_cast<uint64_t>(a_hi) << 32)) | a_lo;
    reinterpret_cast<void (*)(void*)>(e)(reinterpret_cast<void*>(a));
    __builtin_trap();
}

}  // namespace

void context_init(Context* ctx, void* stack_lo, size_t bytes, void (*entry)(void*), void* arg) {
    getcontext(&ctx->uc);
    ctx->uc.uc_stack.ss_sp = stack_lo;
    ctx->uc.uc_stack.ss_size = bytes;
    ctx->uc.uc_link = nullptr;
    const uint64_t e = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(entry));
    const uint64_t a = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(arg));
    makecontext(&ctx->uc, reinterpret_cast<void (*)()>(&ucontext_entry), 4, static_cast<unsigned>(e >> 32),
                static_cast<unsigned>(e), static_cast<unsigned>(a >> 32), static_cast<unsigned>(a));
}

}  // namespace bn_emu

#endif

// ---------------------------------------------------------------------------------------
// Stack pool.

namespace bn_emu {
namespace {

constexpr uint64_t kCanary = 0x5a17c0debadf00d5ull;
constexpr size_t kStacksPerSlab = 16;
// Each guard page splits a mapping in two; stay well below vm.max_map_count (65530 by
// default) across all OS threads. Stacks beyond the budget get only the canary.
constexpr long kGuardedStackBudget = 20000;
std::atomic<long> g_guarded_stacks{0};

size_t page_size() {
    static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    return p;
}

struct Mapping {
    void* addr;
    size_t bytes;
    long guarded;
};

struct StackPool {
    std::vector<Stack> free;
    uint32_t serial = 0;
    std::vector<Mapping> mappings;

    ~StackPool() {
        for (const Mapping& m : mappings) {
            munmap(m.addr, m.bytes);
            g_guarded_stacks.fetch_sub(m.guarded, std::memory_order_relaxed);
        }
    }

    bool grow() {
        const size_t guard = page_size();
        const size_t stride = kStackBytes + kStackColorBytes + guard;
        const size_t total = stride * kStacksPerSlab;
        void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS
#if defined(MAP_NORESERVE)
                                                                   | MAP_NORESERVE
#endif
                       ,
                       -1, 0);
        if (p == MAP_FAILED) return false;
        long guarded = 0;
        unsigned char* base = static_cast<unsigned char*>(p);
        for (size_t i = 0; i < kStacksPerSlab; ++i) {
            unsigned char* s = base + i * stride;
            if (g_guarded_stacks.fetch_add(1, std::memory_order_relaxed) < kGuardedStackBudget &&
                mprotect(s, guard, PROT_NONE) == 0) {
                ++guarded;
            } else {
                g_guarded_stacks.fetch_sub(1, std::memory_order_relaxed);
            }
            // Pseudo-random colour in [0, kStackColorBytes), a multiple of 64.
            const size_t color = ((serial++ * 0x9e3779b1u) >> 8) % (kStackColorBytes / 64) * 64;
            free.push_back(Stack{s + guard, kStackBytes + kStackColorBytes - color});
        }
        mappings.push_back(Mapping{p, total, guarded});
        return true;
    }
};

thread_local StackPool t_pool;

}  // namespace

bool stack_acquire(Stack* out) {
    if (t_pool.free.empty() && !t_pool.grow()) return false;
    *out = t_pool.free.back();
    t_pool.free.pop_back();
    return true;
}

void stack_release(const Stack& s) { t_pool.free.push_back(s); }

void stack_arm_canary(const Stack& s) { memcpy(s.lo, &kCanary, sizeof kCanary); }

bool stack_canary_intact(const Stack& s) { return memcmp(s.lo, &kCanary, sizeof kCanary) == 0; }

}  // namespace bn_emu
