// params.h: the one argument every cuda-batchnorm kernel takes.
//
// Mirrored field for field by `BnParams` in src/launch.rs (#[repr(C)]); the
// `bn_selftest_params` kernel echoes every field back so that tests catch any drift
// between the two definitions. Layout rules: 8-byte fields first, then 4-byte fields,
// no implicit padding.
#pragma once

#include <stdint.h>

// flags
#define BN_F_INDEX64 (1u << 0)   // 64-bit index arithmetic (tensor over 2^31 - 1 elements)
#define BN_F_VEC (1u << 1)       // 16-byte loads and stores where alignment allows
#define BN_F_BATCH_STATS (1u << 2) // normalise with this batch's statistics (else running)
#define BN_F_UPDATE_RUNNING (1u << 3) // fold the batch statistics into running_mean/var
#define BN_F_FROZEN (1u << 4)    // eval with precomputed coefficients: ws_channel = A[2C] scale, shift
// Fused epilogues (baseline family only): out = relu(bn(x) [+ z]).
#define BN_F_RELU (1u << 5)      // forward: y = relu(v); backward: dy zeroed where the forward's output y <= 0
#define BN_F_ADD (1u << 6)       // forward: v = bn(x) + z; backward: dz = the (masked) dy, written

struct BnParams {
    // Device addresses; 0 means absent. T = input storage type, P = parameter type,
    // A = accumulator type (f32, or f64 for f64 inputs).
    uint64_t x;             // T[N*C*S] input
    uint64_t y;             // T[N*C*S] forward output
    uint64_t dy;            // T[N*C*S] gradient of the output
    uint64_t dx;            // T[N*C*S] gradient of the input
    uint64_t weight;        // P[C] (absent: 1)
    uint64_t bias;          // P[C] (absent: 0)
    uint64_t running_mean;  // P[C]
    uint64_t running_var;   // P[C]
    uint64_t save_mean;     // A[C] batch mean
    uint64_t save_invstd;   // A[C] 1 / sqrt(biased batch variance + eps)
    uint64_t grad_weight;   // P[C]
    uint64_t grad_bias;     // P[C]
    uint64_t ws_counters;   // u32[counters]: zero between launches
    uint64_t ws_partials;   // A[3 * splits * C]: per-split partial results
    uint64_t ws_channel;    // A[5 * C]: per-channel results one kernel leaves for the next
                            // (BN_F_FROZEN: A[2 * C], scale then shift, read only)
    uint64_t z;             // T[N*C*S] residual added before the ReLU (BN_F_ADD, forward)
    uint64_t dz;            // T[N*C*S] gradient of the residual (BN_F_ADD, backward dx stage)

    int64_t n;              // batch size N
    int64_t c;              // channels C
    int64_t s;              // spatial size S (product of the dimensions after C; 1 if none)
    int64_t chunk;          // elements per split and channel (nchw) or rows per split (nhwc)

    double eps;
    double momentum;        // running = momentum * batch + (1 - momentum) * running
    double bessel;          // M / (M - 1), M = N * S values per channel

    uint32_t flags;         // BN_F_*
    uint32_t splits;        // blocks that share one channel (nchw) or one channel tile (nhwc)
    uint32_t tile_x;        // nhwc: threads across channels (blockDim.x)
    uint32_t reserved;      // keeps the size a multiple of 8
};
