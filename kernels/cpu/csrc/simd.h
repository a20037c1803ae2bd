// The one ISA wrapper: every SIMD intrinsic the extension uses is called here and in the kernel headers
// (linear_kernel.h, quant_kernel.h, int8_kernel.h, attention_kernel.h), nowhere else.
//
// `Isa` is the widest instruction set the including translation unit is compiled for:
//   AVX-512 (F, BW, VL, VNNI; 16 fp32 lanes, 32 registers) in the *_avx512.cpp units, which define
//     SPECEDIT_AVX512 before including anything: the target pragma below then applies to the whole unit.
//     dispatch.cpp runs them only on a CPU that reports the same four features.
//   AVX2 + FMA + F16C (8 lanes, 16 registers) everywhere else: the whole build's baseline flags (build.py).
// The kernels are written once over Isa and compiled once per instruction set. Each operation is lane-wise
// and correctly rounded IEEE arithmetic, or exact (loads, conversions of exact values, integer sums), so a lane
// gets the same bits on either instruction set; the only cross-lane operations (hmax, sum16, transpose) are
// exact or use one fixed order on both.
//
// No torch or libstdc++ header here or in the per-ISA code: an inline function from one would be compiled
// for AVX-512 in one unit and could be merged (ODR) with the copy other units run on any CPU. Everything
// below sits in an anonymous namespace for the same reason: each unit keeps its own copy.
#pragma once

#if defined(SPECEDIT_AVX512)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
#endif

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

namespace specedit_cpu {
namespace {

struct f16_t { uint16_t bits; };   // IEEE half, as stored by pack_weight
struct bf16_t { uint16_t bits; };  // bfloat16: the top half of an fp32

// The sum of 8 lanes in a fixed tree: 8 -> 4 (l + l+4) -> 2 (l + l+2) -> 1 (l + l+1).
inline float sum8_tree(__m256 s8) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

#if defined(SPECEDIT_AVX512)
struct Isa {
  using V = __m512;   // fp32 lanes
  using VI = __m512i;  // int32 lanes, or 64 bytes for the int8 dot products
  static constexpr int W = 16;  // fp32 lanes per vector

  static inline V zero() { return _mm512_setzero_ps(); }
  static inline V set1(float x) { return _mm512_set1_ps(x); }
  static inline V bcast(const float* p) { return _mm512_set1_ps(*p); }
  static inline V load(const float* p) { return _mm512_loadu_ps(p); }
  static inline V load(const f16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  static inline V load(const bf16_t* p) {  // widen and shift: exact
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  static inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
  static inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static inline V div(V a, V b) { return _mm512_div_ps(a, b); }
  static inline V max(V a, V b) { return _mm512_max_ps(a, b); }  // a NaN a gives b
  static inline V abs(V a) { return _mm512_abs_ps(a); }
  static inline V min(V a, V b) { return _mm512_min_ps(a, b); }  // a NaN a gives b
  static inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }   // a * b + c, one rounding
  static inline V fms(V a, V b, V c) { return _mm512_fmsub_ps(a, b, c); }   // a * b - c, one rounding
  static inline V fnma(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b, one rounding
  static inline V round(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline V floor(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static inline float first(V a) { return _mm512_cvtss_f32(a); }
  static inline float hmax(V a) { return _mm512_reduce_max_ps(a); }  // exact in any order
  // The fixed tree over 16 lanes (one vector here): 16 -> 8 (l + l+8), then sum8_tree.
  static inline float sum16(const V* v) {
    return sum8_tree(_mm256_add_ps(_mm512_castps512_ps256(v[0]),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v[0]), 1))));
  }
  // 2^n for integral n in [-127, 127]; n <= -126 gives +0 (no subnormals).
  static inline V pow2i(V n) {
    const __m512i ni = _mm512_cvtps_epi32(n);
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(ni, _mm512_set1_epi32(127)), 23);
    return _mm512_castsi512_ps(_mm512_maskz_mov_epi32(_mm512_cmpgt_epi32_mask(ni, _mm512_set1_epi32(-126)), e));
  }
  // 16 x 16 transpose in place: r[i][c] -> r[c][i].
  static inline void transpose(V r[16]) {
    V t[16];
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    // t[4a + 0] = rows 4a, 4a+1 interleaved, columns {0, 1} of each 128-bit lane; t[4a + 1]: columns {2, 3}
    for (int a = 0; a < 16; a += 4) {
      r[a + 0] = _mm512_shuffle_ps(t[a + 0], t[a + 2], _MM_SHUFFLE(1, 0, 1, 0));  // column 0 of each lane
      r[a + 1] = _mm512_shuffle_ps(t[a + 0], t[a + 2], _MM_SHUFFLE(3, 2, 3, 2));  // column 1
      r[a + 2] = _mm512_shuffle_ps(t[a + 1], t[a + 3], _MM_SHUFFLE(1, 0, 1, 0));  // column 2
      r[a + 3] = _mm512_shuffle_ps(t[a + 1], t[a + 3], _MM_SHUFFLE(3, 2, 3, 2));  // column 3
    }
    // r[4a + c] = rows 4a..4a+3 at columns c, c+4, c+8, c+12 (one 128-bit lane each)
    for (int c = 0; c < 4; ++c) {
      t[c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);        // rows 0-3, 4-7 at columns c, c+8
      t[4 + c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);    // rows 0-3, 4-7 at columns c+4, c+12
      t[8 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
      t[12 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
    }
    for (int c = 0; c < 4; ++c) {
      r[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88);            // column c
      r[8 + c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xdd);        // column c + 8
      r[4 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0x88);   // column c + 4
      r[12 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0xdd);  // column c + 12
    }
  }

  // int32 lanes (quant_kernel.h): W bytes widened to W lanes
  static inline VI load_u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
  static inline VI load_i8(const uint8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)); }
  static inline VI set1i(int v) { return _mm512_set1_epi32(v); }
  static inline VI iota(int step) {  // lane l holds l * step
    return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), set1i(step));
  }
  static inline VI andi(VI a, VI b) { return _mm512_and_si512(a, b); }
  static inline VI ori(VI a, VI b) { return _mm512_or_si512(a, b); }
  static inline VI subi(VI a, VI b) { return _mm512_sub_epi32(a, b); }
  static inline VI srli4(VI a) { return _mm512_srli_epi32(a, 4); }
  static inline VI slli4(VI a) { return _mm512_slli_epi32(a, 4); }
  static inline VI srlv(VI a, VI n) { return _mm512_srlv_epi32(a, n); }
  static inline V cvt(VI a) { return _mm512_cvtepi32_ps(a); }
  static inline VI cvti(V a) { return _mm512_cvtps_epi32(a); }  // exact for integral values
  static inline void storei(int32_t* p, VI v) { _mm512_storeu_si512(p, v); }
  static inline int32_t hsumi(VI a) { return _mm512_reduce_add_epi32(a); }  // exact in any order
  // 32 int32 lanes (v[0], v[1]) of values in int8's range -> 32 bytes at p, in order
  static inline void store_i8x32(int8_t* p, const VI* v) {
    _mm_storeu_si128((__m128i*)p, _mm512_cvtsepi32_epi8(v[0]));
    _mm_storeu_si128((__m128i*)(p + 16), _mm512_cvtsepi32_epi8(v[1]));
  }

  // int8 dot products (int8_kernel.h; BW + VNNI): a VI holds 64 bytes, 16 columns x 4 k
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
  static inline VI dot4_q8(VI acc, VI w, VI x) { return dot4(acc, w, x); }  // w from q8(): unsigned here
};
#else
struct Isa {
  using V = __m256;
  using VI = __m256i;  // int32 lanes, or 32 bytes for the int8 dot products
  static constexpr int W = 8;

  static inline V zero() { return _mm256_setzero_ps(); }
  static inline V set1(float x) { return _mm256_set1_ps(x); }
  static inline V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static inline V load(const float* p) { return _mm256_loadu_ps(p); }
  static inline V load(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
  static inline V load(const bf16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  }
  static inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static inline V add(V a, V b) { return _mm256_add_ps(a, b); }
  static inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static inline V div(V a, V b) { return _mm256_div_ps(a, b); }
  static inline V max(V a, V b) { return _mm256_max_ps(a, b); }
  static inline V abs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static inline V min(V a, V b) { return _mm256_min_ps(a, b); }
  static inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static inline V fms(V a, V b, V c) { return _mm256_fmsub_ps(a, b, c); }
  static inline V fnma(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static inline V round(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline V floor(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static inline float first(V a) { return _mm256_cvtss_f32(a); }
  static inline float hmax(V a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
  }
  // The same tree over 16 lanes, here two vectors (lanes 0-7 and 8-15): 16 -> 8, then sum8_tree.
  static inline float sum16(const V* v) { return sum8_tree(_mm256_add_ps(v[0], v[1])); }
  static inline V pow2i(V n) {
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23);
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_cmpgt_epi32(ni, _mm256_set1_epi32(-126)), e));
  }
  // 8 x 8 transpose in place.
  static inline void transpose(V r[8]) {
    V t[8], s[8];
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int a = 0; a < 8; a += 4) {
      s[a + 0] = _mm256_shuffle_ps(t[a + 0], t[a + 2], 0x44);
      s[a + 1] = _mm256_shuffle_ps(t[a + 0], t[a + 2], 0xEE);
      s[a + 2] = _mm256_shuffle_ps(t[a + 1], t[a + 3], 0x44);
      s[a + 3] = _mm256_shuffle_ps(t[a + 1], t[a + 3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
      r[c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x20);
      r[4 + c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x31);
    }
  }

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
  static inline VI cvti(V a) { return _mm256_cvtps_epi32(a); }  // exact for integral values
  static inline void storei(int32_t* p, VI v) { _mm256_storeu_si256((__m256i*)p, v); }
  static inline int32_t hsumi(VI a) {  // exact in any order
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
  }
  // 32 int32 lanes (v[0..3]) of values in int8's range -> 32 bytes at p, in order
  static inline void store_i8x32(int8_t* p, const VI* v) {
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256((__m256i*)p, _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }

  // int8 dot products: a VI holds 32 bytes, 8 columns x 4 k
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
};
#endif

// The two exponentials, each in the one form its callers' bits rest on; both scale by pow2i.
//
// exp2: 2^x for x <= 0, the attention's (scores are in base 2): Cephes exp2f, n = round(x), f = x - n (exact),
// a degree-6 polynomial for 2^f on [-0.5, 0.5] in FMAs, ~2 ulp. x < -125.5, -inf or NaN gives +0: an exact zero
// for masked scores, which the attention's row invariance needs (attention_kernel.h).
inline Isa::V exp2(Isa::V x) {
  x = Isa::max(x, Isa::set1(-127.0f));  // NaN -> -127 (max returns its second operand)
  const Isa::V n = Isa::round(x);
  const Isa::V f = Isa::sub(x, n);
  Isa::V p = Isa::set1(1.535336188319500e-4f);
  p = Isa::fma(p, f, Isa::set1(1.339887440266574e-3f));
  p = Isa::fma(p, f, Isa::set1(9.618437357674640e-3f));
  p = Isa::fma(p, f, Isa::set1(5.550332471162809e-2f));
  p = Isa::fma(p, f, Isa::set1(2.402264791363012e-1f));
  p = Isa::fma(p, f, Isa::set1(6.931472028550421e-1f));
  p = Isa::fma(p, f, Isa::set1(1.0f));
  return Isa::mul(p, Isa::pow2i(n));
}

inline float exp2_scalar(float x) { return Isa::first(exp2(Isa::set1(x))); }

// exp: e^x, the SiLU's (decoder.cpp): Cephes expf, n = floor(x log2 e + 1/2), r = x - n ln 2 with ln 2 in two
// parts (Cody-Waite), e^r = 1 + r + r^2 P(r) with a degree-5 P in separate multiplies and adds, ~1 ulp. x is
// clamped to [-87.3, 88.3] (NaN to -87.3), so results stay finite; below e^-87.0 they are +0 (pow2i), where
// 1 + e^x rounds to 1 all the same.
// Why two: e^x through exp2(x log2 e) would round x log2 e first (up to 8 ulp at |x| = 10), and either routine
// in place of the other changes output bits: SiLU through exp2's polynomial (even with this reduction) differs
// in ~6% of its values by an ulp, enough to change SmolLM2's compute="int8" greedy tokens.
inline Isa::V exp(Isa::V x) {
  x = Isa::min(Isa::max(x, Isa::set1(-87.3f)), Isa::set1(88.3f));
  const Isa::V n = Isa::floor(Isa::add(Isa::mul(x, Isa::set1(1.44269504088896341f)), Isa::set1(0.5f)));
  Isa::V r = Isa::sub(x, Isa::mul(n, Isa::set1(0.693359375f)));
  r = Isa::sub(r, Isa::mul(n, Isa::set1(-2.12194440e-4f)));
  Isa::V p = Isa::set1(1.9875691500e-4f);
  p = Isa::add(Isa::mul(p, r), Isa::set1(1.3981999507e-3f));
  p = Isa::add(Isa::mul(p, r), Isa::set1(8.3334519073e-3f));
  p = Isa::add(Isa::mul(p, r), Isa::set1(4.1665795894e-2f));
  p = Isa::add(Isa::mul(p, r), Isa::set1(1.6666665459e-1f));
  p = Isa::add(Isa::mul(p, r), Isa::set1(5.0000001201e-1f));
  const Isa::V y = Isa::add(Isa::add(Isa::mul(p, Isa::mul(r, r)), r), Isa::set1(1.0f));
  return Isa::mul(y, Isa::pow2i(n));
}

// Scalar helpers, on every CPU the build runs on (SSE, and the FMA and F16C of the baseline flags).

inline void spin_pause() { _mm_pause(); }  // in a spin-wait loop

// The MXCSR register holds the rounding mode and the flush-to-zero (FTZ) / denormals-are-zero (DAZ) flags of
// the vector units; it is per thread. MxcsrScope sets it for a scope and restores the thread's own after.
constexpr unsigned int MXCSR_FTZ = 0x8000, MXCSR_DAZ = 0x0040, MXCSR_ROUNDING = 0x6000;
inline unsigned int mxcsr() { return _mm_getcsr(); }
struct MxcsrScope {
  unsigned int saved;
  explicit MxcsrScope(unsigned int csr) : saved(_mm_getcsr()) { _mm_setcsr(csr); }
  ~MxcsrScope() { _mm_setcsr(saved); }
  MxcsrScope(const MxcsrScope&) = delete;
  MxcsrScope& operator=(const MxcsrScope&) = delete;
};

// The 64-byte line at p into every cache level (a software prefetch of a weight stream).
inline void prefetch(const void* p) { _mm_prefetch((const char*)p, _MM_HINT_T0); }

// `bytes` at a 64-byte (cache line) boundary; release with free_aligned. The alignment is fixed, not an
// argument: with a variable one GCC inlines differently around the call (the AVX2 matmul's machine code
// changes), and the kernels' timings rest on that code.
inline void* alloc_aligned(size_t bytes) { return _mm_malloc(bytes, 64); }
inline void free_aligned(void* p) { _mm_free(p); }

// IEEE half (its bits) -> float, exact (F16C, in the baseline flags).
inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

// a * b + c with one rounding.
inline float fma_scalar(float a, float b, float c) {
  return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)));
}

}  // namespace
}  // namespace specedit_cpu
