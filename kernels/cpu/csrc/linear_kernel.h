// Small-M matmul y[M, N] = x[M, K] @ W[N, K]^T with packed weights; one copy per instruction set.
//
// Included by linear_avx2.cpp and linear_avx512.cpp, each of which defines SPECEDIT_ISA_NS and enables
// its instruction set first. It includes no torch or libstdc++ header on purpose: inline functions from
// those would be compiled for the wider ISA and could be merged (ODR) with copies used on other CPUs.
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
// int8_kernel.h (compute="int8", integer dot products), both included at the end, over the Isa struct below
// (the one place for per-ISA intrinsics).
#include <immintrin.h>
#include <stdint.h>

#include "codes.h"
#include "quant.h"

namespace specedit_cpu {
namespace SPECEDIT_ISA_NS {
namespace {

struct f16_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

#if defined(SPECEDIT_AVX512)
struct Isa {
  using V = __m512;
  static constexpr int W = 16;     // fp32 lanes per vector
  static constexpr int C = 2;      // 16-column halves of a group per tile: the whole group
  static constexpr int RMAX = 12;  // rows per tile: 12 x 2 accumulators + 2 weights + 1 broadcast <= 32 zmm
  static constexpr int SMALL_M = 0;  // no special case for few rows
  static inline V zero() { return _mm512_setzero_ps(); }
  static inline V bcast(const float* p) { return _mm512_set1_ps(*p); }
  static inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static inline V load(const float* p) { return _mm512_loadu_ps(p); }
  static inline V load(const f16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  static inline V load(const bf16_t* p) {  // bf16 is the top half of an fp32: widen and shift, exact
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  static inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
  static inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static inline V fms(V a, V b, V c) { return _mm512_fmsub_ps(a, b, c); }  // a * b - c, one rounding
  // integer lanes for the quantized formats (quant_kernel.h): W bytes widened to W int32 lanes
  using VI = __m512i;
  static constexpr int QRMAX = 10;  // rows per quantized tile: 10 x 2 accumulators + scales, offsets, weights
  static inline VI load_u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
  static inline VI load_i8(const uint8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)); }
  static inline VI set1i(int v) { return _mm512_set1_epi32(v); }
  static inline VI iota(int step) {
    return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), set1i(step));
  }
  static inline VI andi(VI a, VI b) { return _mm512_and_si512(a, b); }
  static inline VI ori(VI a, VI b) { return _mm512_or_si512(a, b); }
  static inline VI subi(VI a, VI b) { return _mm512_sub_epi32(a, b); }
  static inline VI srli4(VI a) { return _mm512_srli_epi32(a, 4); }
  static inline VI slli4(VI a) { return _mm512_slli_epi32(a, 4); }
  static inline VI srlv(VI a, VI n) { return _mm512_srlv_epi32(a, n); }
  static inline V cvt(VI a) { return _mm512_cvtepi32_ps(a); }
  // int8 dot products (int8_kernel.h; AVX-512 BW + VNNI): a VI holds 64 bytes, 16 columns x 4 k
  static constexpr int IRMAX = 6;    // rows per int8 tile: 6 x (2 float + 2 int32 accumulators) + weights
  static constexpr int Q8_OFF = 128;  // Q8_0 quants enter vpdpbusd as q + 128 (unsigned); 128 * sum(x) is taken back
  static inline VI loadb(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static inline VI lo4(VI b) { return _mm512_and_si512(b, _mm512_set1_epi8(15)); }
  static inline VI hi4(VI b) { return _mm512_and_si512(_mm512_srli_epi16(b, 4), _mm512_set1_epi8(15)); }
  static inline VI addbits(VI q, const uint8_t* bits, int v) {  // + v in the bytes whose bit is set
    uint64_t k;
    __builtin_memcpy(&k, bits, 8);
    return _mm512_mask_add_epi8(q, k, q, _mm512_set1_epi8((char)v));
  }
  static inline VI q8(const uint8_t* p) { return _mm512_xor_si512(loadb(p), _mm512_set1_epi8((char)0x80)); }
  static inline VI bcast4(const int8_t* p) {
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  }
  static inline VI dot4(VI acc, VI w, VI x) { return _mm512_dpbusd_epi32(acc, w, x); }  // + sum of 4 u8 * s8
  static inline VI dot4_q8(VI acc, VI w, VI x) { return dot4(acc, w, x); }
  static inline V fnma(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b, one rounding
};
#else
struct Isa {
  using V = __m256;
  static constexpr int W = 8;
  static constexpr int C = 1;     // one 16-column half per pass; the second pass reads the group from L1/L2
  static constexpr int RMAX = 6;  // 6 x 2 accumulators + 2 weights + 1 broadcast <= 16 ymm
  // M <= 2: both halves in one pass (4 accumulators per row). With one row and 2 accumulators, the 4-cycle
  // FMA latency would cap a core at 4 columns x k per cycle: below what DRAM delivers in f16.
  static constexpr int SMALL_M = 2;
  static inline V zero() { return _mm256_setzero_ps(); }
  static inline V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static inline V load(const float* p) { return _mm256_loadu_ps(p); }
  static inline V load(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
  static inline V load(const bf16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  }
  static inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static inline V add(V a, V b) { return _mm256_add_ps(a, b); }
  static inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static inline V fms(V a, V b, V c) { return _mm256_fmsub_ps(a, b, c); }
  using VI = __m256i;
  static constexpr int QRMAX = 3;  // 3 x 2 accumulators + 2 scales + 2 offsets + 2 weights + temps <= 16 ymm
  static inline VI load_u8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
  static inline VI load_i8(const uint8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
  static inline VI set1i(int v) { return _mm256_set1_epi32(v); }
  static inline VI iota(int step) {
    return _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), set1i(step));
  }
  static inline VI andi(VI a, VI b) { return _mm256_and_si256(a, b); }
  static inline VI ori(VI a, VI b) { return _mm256_or_si256(a, b); }
  static inline VI subi(VI a, VI b) { return _mm256_sub_epi32(a, b); }
  static inline VI srli4(VI a) { return _mm256_srli_epi32(a, 4); }
  static inline VI slli4(VI a) { return _mm256_slli_epi32(a, 4); }
  static inline VI srlv(VI a, VI n) { return _mm256_srlv_epi32(a, n); }
  static inline V cvt(VI a) { return _mm256_cvtepi32_ps(a); }
  // int8 dot products (int8_kernel.h): a VI holds 32 bytes, 8 columns x 4 k
  static constexpr int IRMAX = 2;   // rows per int8 tile: 2 x (2 float + 2 int32 accumulators) + weights
  static constexpr int Q8_OFF = 0;  // Q8_0 quants stay signed (dot4_q8)
  static inline VI loadb(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
  static inline VI lo4(VI b) { return _mm256_and_si256(b, _mm256_set1_epi8(15)); }
  static inline VI hi4(VI b) { return _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi8(15)); }
  static inline VI addbits(VI q, const uint8_t* bits, int v) {  // + v in the bytes whose bit is set
    uint32_t k;
    __builtin_memcpy(&k, bits, 4);
    // byte i takes bit i: each byte gets its bit's source byte, then all of its other bits set
    const VI shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    VI b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)k), shuf);
    b = _mm256_cmpeq_epi8(_mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)), _mm256_set1_epi64x(-1));
    return _mm256_or_si256(q, _mm256_and_si256(b, _mm256_set1_epi8((char)v)));
  }
  static inline VI q8(const uint8_t* p) { return loadb(p); }
  static inline VI bcast4(const int8_t* p) {
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
  }
  // + sum of 4 u8 * s8 (pair sums of at most 63 * 127 * 2: no int16 saturation)
  static inline VI dot4(VI acc, VI w, VI x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
  }
  // + sum of 4 s8 * s8: |w| * (x with w's sign), pair sums at most 128 * 127 * 2
  static inline VI dot4_q8(VI acc, VI w, VI x) { return dot4(acc, _mm256_abs_epi8(w), _mm256_sign_epi8(x, w)); }
  static inline V fnma(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
};
#endif

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
    for (int l = 0; l < LINES; ++l) _mm_prefetch((const char*)wk + PREFETCH + 64 * l, _MM_HINT_T0);
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
  for (int64_t b = 0; b < PREFETCH; b += 64) _mm_prefetch((const char*)(w + col0 * K) + b, _MM_HINT_T0);
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
  if constexpr (Isa::SMALL_M > 0) {
    if (M <= Isa::SMALL_M) return run_tiles<T, Isa::SMALL_M, 2>(x, M, K, w, N, y, col0, col1);
  }
  run_tiles<T, Isa::RMAX, Isa::C>(x, M, K, w, N, y, col0, col1);
}

#include "quant_kernel.h"
#include "int8_kernel.h"

}  // namespace

// Entry point: dtype is a WeightDtype (codes.h); the int8 layouts (W_I8_Q8_0 ..) read xq, x quantized
// (quant.h), instead of x. y has row stride ldy (>= N: a weight may fill a slice of y's columns).
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
}  // namespace specedit_cpu
