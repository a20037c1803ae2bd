// What the bindings (bindings.cpp) and the decoder (decoder.cpp) share: plain structs and the entry
// points. No inline functions (see attention.h).
#pragma once
#include <stdint.h>

#include "attention.h"
#include "quant.h"

namespace specedit_cpu {

// One part of a packed weight: N output columns in one WeightDtype (codes.h). Float formats are
// pack_weight's [ceil(N/32)][K][32]; GGUF block formats are repack()'s layouts (quant.h).
struct Part {
  const void* data;
  int64_t N;
  int dtype;
};

// A linear layer: its output columns are its parts' columns in order (a fused q/k/v or gate/up whose GGUF
// tensors differ in type keeps one part each); bias [N] float32 or null, added after the product.
constexpr int MAX_PARTS = 3;
struct Packed {
  Part part[MAX_PARTS];
  int nparts;
  int64_t N, K;
  const float* bias;
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

struct DecoderDims {
  int64_t n_layers, dim, H, Hkv, D, I;
  float eps;       // RMSNorm epsilon
  double scale;    // softmax scale
  int64_t window;  // sliding window, 0 = none
  const float* cos;  // rope tables [max_position, D]
  const float* sin;
};

// Scratch for one forward of M rows: h [M, dim], qkv [M, (H + 2 Hkv) D], o [M, H D], gu [M, 2 I],
// a [M, I], y [M, dim] floats.
struct DecoderScratch {
  float *h, *qkv, *o, *gu, *a, *y;
};

// y[M, N] = x[M, K] @ W^T (+ bias), threads split the columns. isa: ISA_AVX2 or ISA_AVX512 (codes.h).
void linear_run(const float* x, int64_t M, const Packed& w, float* y, int64_t isa);

void attention_run(AttnProblem P, int64_t isa);  // attention.cpp

// quant.cpp. repack: groups [g0, g1) of a GGUF weight raw [N][K / QK blocks] (dtype W_Q8_0 .. W_Q6_K) into
// out, laid out as quant.h says. dequant_cols: columns cols[0..n) of a repacked weight -> out [n, K] float32,
// the values the kernel multiplies by.
void repack(const uint8_t* raw, int64_t N, int64_t K, int dtype, uint8_t* out, int64_t g0, int64_t g1);
void dequant_cols(const uint8_t* w, int64_t K, int dtype, const int64_t* cols, int64_t n, float* out);
// quant.cpp: rows [r0, r1) of x [M, K] quantized for compute="int8" into o's buffers (quant.h, QRows).
void quantize_rows(const float* x, int64_t K, const QRows& o, int64_t r0, int64_t r1);

// Runs x [M, dim] through every layer in place: sequence b owns counts[b] consecutive rows (ragged: a
// sequence may send one row while another sends a whole draft; M = sum of counts). cache: [L, 2, B, Hkv, S, D]
// float32, contiguous; starts[b]: positions sequence b holds before this call (its t-th new K/V row goes to
// starts[b] + t).
void decoder_forward(const DecoderDims& dims, const Layer* layers, float* x, int64_t B, const int64_t* counts,
                     const int64_t* starts, float* cache, int64_t S, const DecoderScratch& s, int64_t isa);

}  // namespace specedit_cpu
