// Repacking GGUF blocks into the kernel's layout (quant.h), and dequantizing columns of it (token embeddings,
// tests). Scalar code: it runs once per weight at load, or on a few rows per step.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "decoder.h"
#include "quant.h"
#include "simd.h"

namespace specedit_cpu {
namespace {

// One GGUF block, unpacked: f16 bits of d and m (dmin), sub-block scales and mins, unsigned quants.
struct QBlock {
  uint16_t d = 0, m = 0;
  uint8_t sc[16] = {0}, mn[8] = {0};
  uint8_t q[256] = {0};
};

inline uint16_t u16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
inline uint32_t u32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }

// Q4_0/Q4_1/Q5_*: element e = s * 16 + i is nibble s of qs[i].
inline void nibbles32(const uint8_t* qs, uint8_t* q) {
  for (int i = 0; i < 16; ++i) q[i] = qs[i] & 15, q[i + 16] = qs[i] >> 4;
}

// Q4_K/Q5_K 6-bit scales and mins (gguf Q4_K.get_scale_min).
inline void scale_min_k4(const uint8_t* s, uint8_t* sc, uint8_t* mn) {
  for (int i = 0; i < 4; ++i) {
    sc[i] = s[i] & 63;
    mn[i] = s[4 + i] & 63;
    sc[4 + i] = (s[8 + i] & 15) | ((s[i] >> 2) & 48);
    mn[4 + i] = (s[8 + i] >> 4) | ((s[4 + i] >> 2) & 48);
  }
}

// Q4_K/Q5_K: element e = j * 64 + s * 32 + i is nibble s of qs[j * 32 + i].
inline void nibbles256(const uint8_t* qs, uint8_t* q) {
  for (int j = 0; j < 4; ++j)
    for (int i = 0; i < 32; ++i) q[j * 64 + i] = qs[j * 32 + i] & 15, q[j * 64 + 32 + i] = qs[j * 32 + i] >> 4;
}

template <int DT>
void unpack(const uint8_t* b, QBlock& o) {
  if constexpr (DT == W_Q8_0) {
    o.d = u16(b);
    std::memcpy(o.q, b + 2, 32);
  } else if constexpr (DT == W_Q4_0) {
    o.d = u16(b);
    nibbles32(b + 2, o.q);
  } else if constexpr (DT == W_Q4_1) {
    o.d = u16(b), o.m = u16(b + 2);
    nibbles32(b + 4, o.q);
  } else if constexpr (DT == W_Q5_0 || DT == W_Q5_1) {
    const int at = DT == W_Q5_0 ? 2 : 4;
    o.d = u16(b);
    if (DT == W_Q5_1) o.m = u16(b + 2);
    const uint32_t qh = u32(b + at);
    nibbles32(b + at + 4, o.q);
    for (int e = 0; e < 32; ++e) o.q[e] |= ((qh >> e) & 1) << 4;
  } else if constexpr (DT == W_Q4_K || DT == W_Q5_K) {
    o.d = u16(b), o.m = u16(b + 2);
    scale_min_k4(b + 4, o.sc, o.mn);
    if constexpr (DT == W_Q4_K) {
      nibbles256(b + 16, o.q);
    } else {
      const uint8_t* qh = b + 16;
      nibbles256(b + 48, o.q);
      for (int e = 0; e < 256; ++e) o.q[e] |= ((qh[e % 32] >> (e / 32)) & 1) << 4;
    }
  } else {  // Q6_K: ql[128] qh[64] scales[16] d
    const uint8_t *ql = b, *qh = b + 128;
    for (int e = 0; e < 256; ++e) {
      const int h = e / 128, r = e % 128;
      const int lo = (ql[h * 64 + r % 64] >> (4 * (r / 64))) & 15;
      const int hi = (qh[h * 32 + r % 32] >> (2 * (r / 32))) & 3;
      o.q[e] = (uint8_t)(lo | (hi << 4));
    }
    std::memcpy(o.sc, b + 192, 16);
    o.d = u16(b + 208);
  }
}

// Byte offset, inside a super-block's records, of the quant of column c at k (0 <= k < QK), and the bit at
// which its nibble starts; I8: the int8 layout (quant.h), else the exact one.
template <int DT, bool I8>
inline int64_t qbyte(int k, int c, int& shift) {
  using F = QFmt<DT>;
  shift = F::Q8 ? 0 : 4 * (c / 16);
  if (!I8) return (int64_t)k * F::REC + (F::Q8 ? c : c % 16);
  return (int64_t)(k / 4) * 4 * F::REC + (F::Q8 ? 64 * (c / 16) : 0) + 4 * (c % 16) + k % 4;
}

// Byte offset (from the record's start) of high-bit plane h's bit for column c at k, and the bit's index there.
template <int DT, bool I8>
inline int64_t hibyte(int k, int c, int h, int& bit) {
  using F = QFmt<DT>;
  if (!I8) {  // bit HI * c + h of the u32 / u64 after the nibbles
    const int at = F::HI * c + h;
    bit = at % 8;
    return (int64_t)k * F::REC + 16 + at / 8;
  }
  const int at = 4 * (c % 16) + k % 4;
  bit = at % 8;
  return (int64_t)(k / 4) * 4 * F::REC + 64 + 8 * (2 * h + c / 16) + at / 8;
}

// Writes the 32 columns' blocks o[0..32) as one super-block `out` (quant.h), in the exact (I8 false) or the
// int8 layout.
template <int DT, bool I8>
void put(const QBlock* o, uint8_t* out) {
  using F = QFmt<DT>;
  std::memset(out, 0, F::BYTES);
  for (int c = 0; c < 32; ++c) {
    std::memcpy(out + 2 * c, &o[c].d, 2);
    if (F::HAS_MIN) std::memcpy(out + 64 + 2 * c, &o[c].m, 2);
  }
  uint8_t* sc = out + 64 + 64 * F::HAS_MIN;
  if constexpr (F::FORM == QF_MULSUB) {
    for (int j = 0; j < 8; ++j)
      for (int c = 0; c < 32; ++c) sc[32 * j + c] = o[c].sc[j], sc[256 + 32 * j + c] = o[c].mn[j];
  } else if constexpr (F::SC_BYTES > 0) {
    for (int j = 0; j < 16; ++j)
      for (int c = 0; c < 32; ++c) sc[32 * j + c] = o[c].sc[j];
  }
  uint8_t* rec = out + F::HDR;
  for (int k = 0; k < F::QK; ++k)
    for (int c = 0; c < 32; ++c) {
      int shift, bit;
      const int q = o[c].q[k];
      rec[qbyte<DT, I8>(k, c, shift)] |= (uint8_t)((F::Q8 ? q : q & 15) << shift);
      for (int h = 0; h < F::HI; ++h) rec[hibyte<DT, I8>(k, c, h, bit)] |= (uint8_t)(((q >> (4 + h)) & 1) << bit);
    }
}

template <int DT, bool I8>
void repack_groups(const uint8_t* raw, int64_t N, int64_t K, uint8_t* out, int64_t g0, int64_t g1) {
  using F = QFmt<DT>;
  const int64_t nsb = K / F::QK, row_bytes = nsb * F::GGUF_BYTES;
  QBlock o[32];
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t sb = 0; sb < nsb; ++sb) {
      for (int c = 0; c < 32; ++c) {
        if (g * 32 + c < N) unpack<DT>(raw + (g * 32 + c) * row_bytes + sb * F::GGUF_BYTES, o[c]);
        else o[c] = QBlock();  // padding columns: zero bytes, w = 0
      }
      put<DT, I8>(o, out + (g * nsb + sb) * F::BYTES);
    }
  }
}

inline float f16(const uint8_t* p) { return f16_to_f32(u16(p)); }

// Column n of a repacked weight (exact or int8 layout) -> out[K] float32, the way gguf dequantizes it.
template <int DT, bool I8>
void dequant_col(const uint8_t* w, int64_t K, int64_t n, float* out) {
  using F = QFmt<DT>;
  const int64_t nsb = K / F::QK;
  const int c = (int)(n % 32);
  const uint8_t* g = w + n / 32 * nsb * F::BYTES;
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* blk = g + sb * F::BYTES;
    const float d = f16(blk + 2 * c), m = F::HAS_MIN ? f16(blk + 64 + 2 * c) : 0.0f;
    const uint8_t* sc = blk + 64 + 64 * F::HAS_MIN;
    for (int k = 0; k < F::QK; ++k) {
      const uint8_t* rec = blk + F::HDR;
      int shift, bit;
      const uint8_t b = rec[qbyte<DT, I8>(k, c, shift)];
      int q = F::Q8 ? (int)(int8_t)b : (b >> shift) & 15;
      for (int h = 0; h < F::HI; ++h) q |= ((rec[hibyte<DT, I8>(k, c, h, bit)] >> bit) & 1) << (4 + h);
      const float qf = (float)(q - F::OFF);
      const int j = k / F::SUB;
      float v;
      if constexpr (F::FORM == QF_MULSUB) {
        const float s = d * (float)sc[32 * j + c], o = m * (float)sc[256 + 32 * j + c];
        v = s * qf - o;
      } else if constexpr (F::SC_BYTES > 0) {
        v = (d * (float)(int8_t)sc[32 * j + c]) * qf;
      } else if constexpr (F::FORM == QF_MULADD) {
        v = d * qf + m;  // -ffp-contract=off: a rounded product, then a rounded sum
      } else {
        v = d * qf;
      }
      out[sb * F::QK + k] = v;
    }
  }
}

// fn(integral_constant<DT>, integral_constant<I8>) for a GGUF block dtype code of either layout.
template <class Fn>
void dispatch(int dtype, Fn&& fn) {
  using std::integral_constant;
  const bool i8 = dtype >= W_I8_Q8_0;
  auto go = [&](auto dt) {
    if (i8) fn(dt, integral_constant<bool, true>());
    else fn(dt, integral_constant<bool, false>());
  };
  switch (i8 ? dtype - I8_SHIFT : dtype) {
    case W_Q8_0: return go(integral_constant<int, W_Q8_0>());
    case W_Q4_0: return go(integral_constant<int, W_Q4_0>());
    case W_Q4_1: return go(integral_constant<int, W_Q4_1>());
    case W_Q5_0: return go(integral_constant<int, W_Q5_0>());
    case W_Q5_1: return go(integral_constant<int, W_Q5_1>());
    case W_Q4_K: return go(integral_constant<int, W_Q4_K>());
    case W_Q5_K: return go(integral_constant<int, W_Q5_K>());
    case W_Q6_K: return go(integral_constant<int, W_Q6_K>());
  }
}

}  // namespace

void repack(const uint8_t* raw, int64_t N, int64_t K, int dtype, uint8_t* out, int64_t g0, int64_t g1) {
  dispatch(dtype, [&](auto dt, auto i8) {
    repack_groups<decltype(dt)::value, decltype(i8)::value>(raw, N, K, out, g0, g1);
  });
}

void dequant_cols(const uint8_t* w, int64_t K, int dtype, const int64_t* cols, int64_t n, float* out) {
  dispatch(dtype, [&](auto dt, auto i8) {
    for (int64_t i = 0; i < n; ++i) dequant_col<decltype(dt)::value, decltype(i8)::value>(w, K, cols[i], out + i * K);
  });
}

// Rows [r0, r1) of x [M, K] (K a multiple of 32) quantized as quant.h's QRows says, into the buffers of `o`
// (row r at the offsets QRows describes). In vectors of this unit's baseline Isa (simd.h), every step the
// lane-wise IEEE operation of linear.py's quantize_rows_ref: max|x| (exact in any order; a NaN is skipped, as
// std::max skips it), one float division for the scale, x * (1 / d) rounded half to even, clamped to +-127.
void quantize_rows(const float* x, int64_t K, const QRows& o, int64_t r0, int64_t r1) {
  constexpr int W = Isa::W;  // 8 or 16: 32 / W vectors per block
  int8_t* q = const_cast<int8_t*>(o.q);
  float* d = const_cast<float*>(o.d);
  float* sx = const_cast<float*>(o.sx);
  int32_t* s32 = const_cast<int32_t*>(o.s32);
  int32_t* s16 = const_cast<int32_t*>(o.s16);
  const Isa::V lo = Isa::set1(-127.0f), hi = Isa::set1(127.0f);
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t b = 0; b < K / 32; ++b) {
      const float* xb = x + r * K + 32 * b;
      Isa::V m = Isa::zero();
      for (int i = 0; i < 32; i += W) m = Isa::max(Isa::abs(Isa::load(xb + i)), m);
      const float db = Isa::hmax(m) / 127.0f;
      const Isa::V inv = Isa::set1(db != 0.0f ? 1.0f / db : 0.0f);
      Isa::VI qi[32 / W];
      for (int i = 0; i < 32 / W; ++i)  // max(v, lo) keeps lo for a NaN v, as std::max(-127.0f, v) does
        qi[i] = Isa::cvti(Isa::min(Isa::max(Isa::round(Isa::mul(Isa::load(xb + W * i), inv)), lo), hi));
      Isa::store_i8x32(q + r * K + 32 * b, qi);
      int32_t sum[2] = {0, 0};  // per 16 k: integer sums, exact in any order
      for (int i = 0; i < 32 / W; ++i) sum[i * W / 16] += Isa::hsumi(qi[i]);
      const int64_t at = r * (K / 32) + b;
      d[at] = db;
      s32[at] = sum[0] + sum[1];
      sx[at] = db * (float)s32[at];
      s16[2 * at] = sum[0], s16[2 * at + 1] = sum[1];
    }
  }
}

}  // namespace specedit_cpu
