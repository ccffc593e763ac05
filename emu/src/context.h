// context.h: fiber stacks and the context switch used by the emulator runtime.
#pragma once

#include <stddef.h>
#include <stdint.h>

#if !defined(BN_EMU_FORCE_UCONTEXT) && (defined(__x86_64__) || defined(__aarch64__))
#define BN_EMU_ASM_SWITCH 1
#else
#define BN_EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

namespace bn_emu {

// Usable bytes of one fiber stack (a guard page sits below it where the budget allows).
constexpr size_t kStackBytes = 64 * 1024;
// Extra bytes mapped above each stack: the stack top is placed at a different offset
// (multiple of 64) in each, so that the hot top-of-stack lines of a thousand fibers do
// not all fall into the same cache sets (page-aligned stacks would).
constexpr size_t kStackColorBytes = 16 * 1024;

// A saved execution context: a stack pointer whose stack holds the callee-saved
// registers and floating-point control state (assembly switch), or a ucontext.
struct Context {
#if BN_EMU_ASM_SWITCH
    void* sp = nullptr;
#else
    ucontext_t uc;
#endif
};

}  // namespace bn_emu

#if BN_EMU_ASM_SWITCH
// Assembly (context.cpp): pushes the callee-saved registers and FP control state,
// stores the stack pointer to *from_sp, loads to_sp, pops, and returns there.
extern "C" void bn_emu_ctx_switch(void** from_sp, void* to_sp);
#endif

namespace bn_emu {

// Saves the running context into *from and resumes *to.
inline void context_switch(Context* from, Context* to) {
#if BN_EMU_ASM_SWITCH
    bn_emu_ctx_switch(&from->sp, to->sp);
#else
    swapcontext(&from->uc, &to->uc);
#endif
}

// Prepares *ctx so that switching to it calls entry(arg) on the stack [stack_lo,
// stack_lo + bytes). entry must never return.
void context_init(Context* ctx, void* stack_lo, size_t bytes, void (*entry)(void*), void* arg);

// One pooled stack.
struct Stack {
    unsigned char* lo = nullptr;  // lowest usable byte
    size_t bytes = 0;             // usable bytes from lo (the top is lo + bytes)
};

// Takes a stack from the calling OS thread's pool (mapping more when it is empty).
// Returns false if memory could not be mapped.
bool stack_acquire(Stack* out);
// Gives a stack back to the calling OS thread's pool.
void stack_release(const Stack& s);
// Writes / checks the canary word at the bottom of a stack (overflow detection for
// stacks mapped without a guard page).
void stack_arm_canary(const Stack& s);
bool stack_canary_intact(const Stack& s);

}  // namespace bn_emu
