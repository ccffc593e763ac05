// ffi.h: the C ABI between the Rust crate (src/lib.rs) and the C++ runtime.
// Keep in sync with the #[repr(C)] mirrors in src/lib.rs.
#pragma once

#include <stddef.h>
#include <stdint.h>

extern "C" {

// One launch buffer. kind: 0 Input, 1 Output, 2 InOut, 3 Scratch, 4 Counters.
struct bn_emu_region {
    uint64_t addr;
    uint64_t bytes;
    const char* name;  // not NUL-terminated
    size_t name_len;
    uint32_t kind;
    uint32_t reserved;
};

struct bn_emu_launch_desc {
    const char* kernel;  // not NUL-terminated
    size_t kernel_len;
    uint32_t grid[3];
    uint32_t block[3];
    uint32_t dynamic_shared_bytes;
    uint32_t cooperative;  // 0 or 1
    uint32_t shared_limit_bytes;  // static + dynamic per block; 0: CUDA's default 48 KiB
    uint32_t reserved;
    uint64_t seed;
    uint32_t max_resident_blocks;
    uint32_t preempt_one_in;  // 0: off; n: a global load or store yields with probability 1/n
    const void* params;
    size_t params_len;
    const bn_emu_region* regions;
    size_t nregions;
};

// Runs one launch to completion on the calling OS thread. Returns 0 on success, 1 on
// failure; *message / *message_len receive the error text (empty on success), valid
// until the next call of bn_emu_launch on the same OS thread.
int bn_emu_launch(const bn_emu_launch_desc* desc, const char** message, size_t* message_len);

// Parses a seed (decimal, or 0x hex; surrounding whitespace ignored) into *out:
// returns 1, or 0 when the text is not one.
int bn_emu_parse_seed(const char* text, size_t len, uint64_t* out);

// BN_EMU_SEED parsed by bn_emu_parse_seed, or a fixed seed when unset or invalid.
uint64_t bn_emu_seed_from_env(void);

// BN_EMU_PREEMPT parsed the same way (the launch's preempt_one_in), 0 when unset,
// invalid or too large.
uint32_t bn_emu_preempt_from_env(void);

// Registered kernels: count, and the name of one (not NUL-terminated; static storage).
size_t bn_emu_kernel_count(void);
const char* bn_emu_kernel_name(size_t index, size_t* len);
}
