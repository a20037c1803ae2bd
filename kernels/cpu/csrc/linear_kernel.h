// Small-M matmul y[M, N] = x[M, K] @ W[N, K]^T with packed weights; one copy per instruction set.
//
// Included by linear_avx2.cpp and linear_avx512.cpp, each of which names its instruction set first (simd.h:
// SPECEDIT_ISA_NS, SPECEDIT_AVX512). Like every per-ISA header it includes no torch or libstdc++ header (see
// simd.h on why); its vector operations are simd.h's Isa.
//
// Packed layout (made by specedit.kernels.cpu.linear.pack_weight): groups of 32 output columns, each group
// [K][32] contiguous, N zero-padded to a multiple of 32. A thread's columns are one contiguous stream.
//
// Why this shape of kernel: each y[m, n] is ONE fp32 lane accumulating fma(x[m, k], w[n, k], acc) for
// k = 0, 1, ..., K-1 in that order, starting from +0. No horizontal sums, no split-K. So the bits of a
// row do not depend on M, on the row tile it falls in, on the thread split, or on AVX2 vs AVX-512
// (FMA is correctly rounded per lane). That is the row invariance the lossless guarantee needs.
//
// Why it is fast for small M: a tile of R rows x 16*C columns keeps its accumulators in registers; each
// weight vector loaded (and converted from f16/bf16) feeds R FMAs. All M rows of a group are done before
// the next group, so weights stream from DRAM once per call and re-reads hit L1/L2. The stream is
// software-prefetched 16 KB ahead, so memory and FMAs overlap even when M makes their times equal.
//
// GGUF block weights: quant_kernel.h (compute="exact", dequantized in registers into the same FMA chain) and
// int8_kernel.h (compute="int8", integer dot products), both included at the end.
#include "simd.h"  // first: in an AVX-512 unit it sets the target of everything after it

#include "codes.h"
#include "dispatch.h"
#include "quant.h"

namespace specedit_cpu {
namespace SPECEDIT_ISA_NS {
namespace {

// Tile shapes of this instruction set, from its register file: 32 zmm (AVX-512) or 16 ymm (AVX2).
struct Tiles {
  static constexpr bool WIDE = Isa::W == 16;
  // 16-column halves of a group per tile: the whole group on AVX-512; on AVX2 one half per pass, the second
  // pass reading the group from L1/L2.
  static constexpr int C = WIDE ? 2 : 1;
  // rows per tile: RMAX x 2 accumulators + 2 weights + 1 broadcast <= 32 zmm / 16 ymm
  static constexpr int RMAX = WIDE ? 12 : 6;
  // AVX2, M <= 2: both halves in one pass (4 accumulators per row). With one row and 2 accumulators, the
  // 4-cycle FMA latency would cap a core at 4 columns x k per cycle: below what DRAM delivers in f16.
  static constexpr int SMALL_M = WIDE ? 0 : 2;
  // rows per quantized tile (quant_kernel.h): 10 x 2 accumulators + scales, offsets, weights (AVX-512);
  // 3 x 2 accumulators + 2 scales + 2 offsets + 2 weights + temps <= 16 ymm (AVX2)
  static constexpr int QRMAX = WIDE ? 10 : 3;
  // rows per int8 tile (int8_kernel.h): IRMAX x (2 float + 2 int32 accumulators) + weights
  static constexpr int IRMAX = WIDE ? 6 : 2;
};

constexpr int GROUP = 32;            // columns per packed group
constexpr int NV = 16 / Isa::W;      // vectors per 16 columns
// How far ahead in the weight stream to prefetch. Hardware prefetchers stop at 4 KB pages; a few pages
// ahead keeps DRAM busy across them (measured on Zen 5: 4-8 KB reach ~45 GB/s, 12-32 KB ~65 GB/s).
constexpr int PREFETCH = 16384;

// R rows x 16*C columns. x: R rows at stride K. w: first column of the tile inside a packed group
// ([K][32]). y: R rows at stride ldy; only the first ncols of the tile's columns are written.
template <class T, int R, int C>
inline void tile(const float* x, int64_t K, const T* w, float* y, int64_t ldy, int ncols) {
  constexpr int LINES = (int)sizeof(T) * GROUP / 64;  // cache lines of weights per k
  // Every index into acc must be a compile-time constant after unrolling, or GCC keeps acc in memory.
  Isa::V acc[R][C][NV];
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][c][v] = Isa::zero();
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    const T* wk = w + k * GROUP;
#pragma GCC unroll 2
    for (int l = 0; l < LINES; ++l) prefetch((const char*)wk + PREFETCH + 64 * l);
    Isa::V wv[C][NV];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) wv[c][v] = Isa::load(wk + c * 16 + v * Isa::W);
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r) {
      const Isa::V xb = Isa::bcast(x + r * K + k);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][c][v] = Isa::fma(xb, wv[c][v], acc[r][c][v]);
    }
  }
  if (ncols == C * 16) {
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) Isa::store(y + r * ldy + c * 16 + v * Isa::W, acc[r][c][v]);
  } else {  // the last, partial group of columns
    float tmp[C * 16];
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) Isa::store(tmp + c * 16 + v * Isa::W, acc[r][c][v]);
      for (int j = 0; j < ncols; ++j) y[r * ldy + j] = tmp[j];
    }
  }
}

// Compile-time dispatch of a runtime row count 1..R to tile<T, r, C>.
template <class T, int R, int C>
inline void tile_rows(int r, const float* x, int64_t K, const T* w, float* y, int64_t ldy, int ncols) {
  if (r == R) {
    tile<T, R, C>(x, K, w, y, ldy, ncols);
  } else if constexpr (R > 1) {
    tile_rows<T, R - 1, C>(r, x, K, w, y, ldy, ncols);
  }
}

// Columns [col0, col1) (col0 a multiple of 32, col1 too unless it is N), all M rows, in tiles of at
// most RMAX rows x 16*C columns.
template <class T, int RMAX, int C>
void run_tiles(const float* x, int64_t M, int64_t K, const T* w, int64_t N, float* y, int64_t col0, int64_t col1) {
  constexpr int STEP = C * 16;
  // The first PREFETCH bytes of this thread's stream: the k loop prefetches only from there on.
  for (int64_t b = 0; b < PREFETCH; b += 64) prefetch((const char*)(w + col0 * K) + b);
  for (int64_t n0 = col0; n0 < col1; n0 += GROUP) {
    const T* wg = w + n0 * K;  // group n0 / 32 starts at (n0 / 32) * 32 * K
    for (int off = 0; off < GROUP && n0 + off < col1; off += STEP) {
      const int ncols = (int)(col1 - n0 - off < STEP ? col1 - n0 - off : STEP);
      for (int64_t m0 = 0; m0 < M; m0 += RMAX) {
        const int r = (int)(M - m0 < RMAX ? M - m0 : RMAX);
        tile_rows<T, RMAX, C>(r, x + m0 * K, K, wg + off, y + m0 * N + n0 + off, N, ncols);
      }
    }
  }
}

template <class T>
void run(const float* x, int64_t M, int64_t K, const T* w, int64_t N, float* y, int64_t col0, int64_t col1) {
  if constexpr (Tiles::SMALL_M > 0) {
    if (M <= Tiles::SMALL_M) return run_tiles<T, Tiles::SMALL_M, 2>(x, M, K, w, N, y, col0, col1);
  }
  run_tiles<T, Tiles::RMAX, Tiles::C>(x, M, K, w, N, y, col0, col1);
}

#include "quant_kernel.h"
#include "int8_kernel.h"

}  // namespace

// The entry point (dispatch.h, LinearCols): dtype is a WeightDtype (codes.h); the int8 layouts (W_I8_Q8_0 ..)
// read xq, x quantized (quant.h), instead of x. y has row stride ldy (>= N: a weight may fill a slice of y's
// columns).
void linear_cols(const float* x, const QRows* xq, int64_t M, int64_t K, const void* w, int dtype, float* y,
                 int64_t ldy, int64_t col0, int64_t col1) {
  const uint8_t* wq = (const uint8_t*)w;
  switch (dtype) {
    case W_I8_Q8_0: return run_i8<W_Q8_0>(*xq, M, wq, ldy, y, col0, col1);
    case W_I8_Q4_0: return run_i8<W_Q4_0>(*xq, M, wq, ldy, y, col0, col1);
    case W_I8_Q4_1: return run_i8<W_Q4_1>(*xq, M, wq, ldy, y, col0, col1);
    case W_I8_Q5_0: return run_i8<W_Q5_0>(*xq, M, wq, ldy, y, col0, col1);
    case W_I8_Q5_1: return run_i8<W_Q5_1>(*xq, M, wq, ldy, y, col0, col1);
    case W_I8_Q4_K: return run_i8<W_Q4_K>(*xq, M, wq, ldy, y, col0, col1);
    case W_I8_Q5_K: return run_i8<W_Q5_K>(*xq, M, wq, ldy, y, col0, col1);
    case W_I8_Q6_K: return run_i8<W_Q6_K>(*xq, M, wq, ldy, y, col0, col1);
    case W_F32: return run(x, M, K, (const float*)w, ldy, y, col0, col1);
    case W_F16: return run(x, M, K, (const f16_t*)w, ldy, y, col0, col1);
    case W_BF16: return run(x, M, K, (const bf16_t*)w, ldy, y, col0, col1);
    case W_Q8_0: return run_q<W_Q8_0>(x, M, K, (const uint8_t*)w, ldy, y, col0, col1);
    case W_Q4_0: return run_q<W_Q4_0>(x, M, K, (const uint8_t*)w, ldy, y, col0, col1);
    case W_Q4_1: return run_q<W_Q4_1>(x, M, K, (const uint8_t*)w, ldy, y, col0, col1);
    case W_Q5_0: return run_q<W_Q5_0>(x, M, K, (const uint8_t*)w, ldy, y, col0, col1);
    case W_Q5_1: return run_q<W_Q5_1>(x, M, K, (const uint8_t*)w, ldy, y, col0, col1);
    case W_Q4_K: return run_q<W_Q4_K>(x, M, K, (const uint8_t*)w, ldy, y, col0, col1);
    case W_Q5_K: return run_q<W_Q5_K>(x, M, K, (const uint8_t*)w, ldy, y, col0, col1);
    case W_Q6_K: return run_q<W_Q6_K>(x, M, K, (const uint8_t*)w, ldy, y, col0, col1);
  }
}

}  // namespace SPECEDIT_ISA_NS

LinearCols::Fn* const LinearCols::SPECEDIT_ISA_NS = SPECEDIT_ISA_NS::linear_cols;

}  // namespace specedit_cpu
