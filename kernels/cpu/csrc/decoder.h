// What the bindings (bindings.cpp) and the decoder stack (decoder.cpp) share: plain structs and the entry
// points. No inline functions (see attention.h).
#pragma once
#include <stdint.h>

#include "attention.h"

namespace specedit_cpu {

// A weight packed by specedit.kernels.cpu.linear.pack_weight: [ceil(N/32)][K][32] in a WeightDtype (codes.h);
// W_I8 comes with scale [N]: W = scale[n] * q[n, k]; bias [N] float32 or null.
struct Packed {
  const void* data;
  int64_t N, K;
  int dtype;
  const float* bias;
  const float* scale;
};

// One decoder block of a Llama-family model. q_norm / k_norm ([D], Qwen3) may be null.
struct Layer {
  const float* attn_norm;  // [dim]
  Packed qkv;              // [(H + 2 Hkv) D, dim]: q heads, then k heads, then v heads
  const float* q_norm;
  const float* k_norm;
  Packed o;                // [dim, H D]
  const float* mlp_norm;   // [dim]
  Packed gate_up;          // [2 I, dim]: gate rows, then up rows
  Packed down;             // [dim, I]
};

struct StackDims {
  int64_t n_layers, dim, H, Hkv, D, I;
  float eps;       // RMSNorm epsilon
  double scale;    // softmax scale
  int64_t window;  // sliding window, 0 = none
  const float* cos;  // rope tables [max_position, D]
  const float* sin;
};

// Scratch for one forward of M rows: h [M, dim], qkv [M, (H + 2 Hkv) D], o [M, H D], gu [M, 2 I],
// a [M, I], y [M, dim] floats.
struct StackScratch {
  float *h, *qkv, *o, *gu, *a, *y;
};

// y[M, N] = x[M, K] @ W^T (+ bias), threads split the columns. isa: ISA_AVX2 or ISA_AVX512 (codes.h).
void linear_run(const float* x, int64_t M, const Packed& w, float* y, int64_t isa);

void attention_run(AttnProblem P, int64_t isa);  // attention.cpp

// Runs x [M, dim] through every layer in place: sequence b owns counts[b] consecutive rows (ragged: a
// sequence may send one row while another sends a whole draft; M = sum of counts). cache: [L, 2, B, Hkv, S, D]
// float32, contiguous; starts[b]: positions sequence b holds before this call (its t-th new K/V row goes to
// starts[b] + t).
void stack_forward(const StackDims& dims, const Layer* layers, float* x, int64_t B, const int64_t* counts,
                   const int64_t* starts, float* cache, int64_t S, const StackScratch& s, int64_t isa);

}  // namespace specedit_cpu
