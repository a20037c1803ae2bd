// The repacked layout of GGUF block-quantized weights (W_Q8_0 .. W_Q6_K in codes.h). Constants only: this
// header is included by the per-ISA kernels too (see attention.h on why no functions live in such headers).
//
// A GGUF weight [N, K] is N rows of K/QK blocks, each block QK consecutive k of one output column. The kernel
// wants, for each k, the values of 32 output columns side by side (like the [K][32] groups of pack_weight),
// so repack() (quant.cpp) moves the bytes, once at load, into groups of 32 columns:
//
//   packed = [ceil(N / 32) groups][K / QK super-blocks][BYTES]   (columns past N: zero bytes, so w = 0)
//   one super-block of a group, BYTES in all:
//     d     32 x f16          per-column block scale (GGUF's d)
//     m     32 x f16          per-column min (Q4_1, Q5_1: m; Q4_K, Q5_K: dmin), when HAS_MIN
//     sc    NSUB x 32 x u8    per-sub-block scales (K-quants: Q4_K/Q5_K 6-bit sc, then NSUB x 32 6-bit mins;
//                             Q6_K int8 scales), when SC_BYTES > 0
//     rec   QK x REC bytes    per k: the 32 columns' quants. Byte j of the first 16 holds column j in its low
//                             nibble and column j + 16 in its high nibble (Q8_0: 32 int8, one per column);
//                             then, for 5-bit types, a u32 whose bit j is column j's bit 4; for Q6_K a u64
//                             whose bits 2j, 2j + 1 are column j's bits 4, 5.
//
// Sizes equal GGUF's bits per weight except for Q4_K/Q5_K (their 6-bit scales/mins take a byte each here:
// +1/8 bit per weight). The stored q is GGUF's unsigned integer; the kernel forms w exactly as
// gguf.quants.<TYPE>.dequantize_blocks does, one float32 rounding per written operation:
//   Q8_0  w = float(q) * d                      Q4_0 / Q5_0  w = d * float(q - 8 / q - 16)
//   Q4_1 / Q5_1  w = (d * float(q)) + m
//   Q4_K / Q5_K  w = (s * float(q)) - o,  s = d * float(sc[j]), o = dmin * float(mn[j])  (32-k sub-block j)
//   Q6_K  w = s * float(q - 32),  s = d * float(int8 sc[j])                           (16-k sub-block j)
//
// The int8 layout (W_I8_<T>, compute="int8", int8_kernel.h) is the same but for the order of the quants: a
// super-block's records are grouped by 4 consecutive k ("k-quads", kq = 0 .. QK/4 - 1), 4 * REC bytes each, so
// that one 32-bit lane holds 4 k of one column, as vpdpbusd / pmaddubsw want:
//   nib    64 bytes           byte 4l + i (lane l = 0..15, i = 0..3): column l's q at k = 4 kq + i in its low
//                             nibble, column l + 16's in its high nibble (Q8_0: 128 bytes, columns 0..15 as
//                             the 64 bytes, then columns 16..31 the same way; int8 as stored)
//   planes HI x 2 x u64       for high bit h (q's bit 4 + h) and column half p (0: columns 0..15, 1: 16..31),
//                             bit 4l + i is that bit of the quant in nibble byte 4l + i
// An AVX-512 register takes the 64 nibble bytes (16 columns x 4 k); an AVX2 one bytes 32s .. 32s + 31
// (columns 8s .. 8s + 7 of a half) and the 32 mask bits 32s .. of each plane.
#pragma once
#include <stdint.h>

#include "codes.h"

namespace specedit_cpu {

enum QForm : int { QF_MUL = 0, QF_MULADD = 1, QF_MULSUB = 2 };

template <int DT>
struct QFmt;

#define SPECEDIT_QFMT(DT, QK_, SUB_, GGUF_, HAS_MIN_, SC_, REC_, HI_, Q8_, OFF_, FORM_)                    \
  template <>                                                                                              \
  struct QFmt<DT> {                                                                                        \
    static constexpr int QK = QK_;             /* k per GGUF block */                                      \
    static constexpr int SUB = SUB_;           /* k sharing one scale (and offset) */                      \
    static constexpr int GGUF_BYTES = GGUF_;   /* bytes of one GGUF block */                               \
    static constexpr int HAS_MIN = HAS_MIN_;   /* a second f16 per column (m or dmin) */                   \
    static constexpr int SC_BYTES = SC_;       /* bytes of sub-block scales per super-block (32 columns) */ \
    static constexpr int REC = REC_;           /* bytes per k for 32 columns */                            \
    static constexpr int HI = HI_;             /* high bits per quant beyond the nibble: 0, 1 or 2 */      \
    static constexpr int Q8 = Q8_;             /* one int8 per quant instead of nibbles */                 \
    static constexpr int OFF = OFF_;           /* subtracted from q before the float conversion */         \
    static constexpr int FORM = FORM_;                                                                     \
    static constexpr int HDR = 64 + 64 * HAS_MIN_ + SC_;                                                  \
    static constexpr int BYTES = HDR + QK_ * REC_;                                                        \
  };
SPECEDIT_QFMT(W_Q8_0, 32, 32, 34, 0, 0, 32, 0, 1, 0, QF_MUL)
SPECEDIT_QFMT(W_Q4_0, 32, 32, 18, 0, 0, 16, 0, 0, 8, QF_MUL)
SPECEDIT_QFMT(W_Q4_1, 32, 32, 20, 1, 0, 16, 0, 0, 0, QF_MULADD)
SPECEDIT_QFMT(W_Q5_0, 32, 32, 22, 0, 0, 20, 1, 0, 16, QF_MUL)
SPECEDIT_QFMT(W_Q5_1, 32, 32, 24, 1, 0, 20, 1, 0, 0, QF_MULADD)
SPECEDIT_QFMT(W_Q4_K, 256, 32, 144, 1, 512, 16, 0, 0, 0, QF_MULSUB)
SPECEDIT_QFMT(W_Q5_K, 256, 32, 176, 1, 512, 20, 1, 0, 0, QF_MULSUB)
SPECEDIT_QFMT(W_Q6_K, 256, 16, 210, 0, 512, 24, 2, 0, 32, QF_MUL)
#undef SPECEDIT_QFMT

// The same numbers indexed by dtype code (0 for the float formats), for the bindings' size checks. The int8
// layout of a format (W_I8_<T>) has the same sizes as its exact one.
constexpr int QK_OF[W_NUM_DTYPES] = {0, 0, 0, 32, 32, 32, 32, 32, 256, 256, 256, 32, 32, 32, 32, 32, 256, 256, 256};
constexpr int GGUF_BYTES_OF[W_NUM_DTYPES] = {0,   0,   0,  34, 18, 20, 22, 24, 144, 176,
                                             210, 34, 18, 20, 22, 24, 144, 176, 210};
constexpr int PACKED_BYTES_OF[W_NUM_DTYPES] = {
    0, 0, 0, QFmt<W_Q8_0>::BYTES, QFmt<W_Q4_0>::BYTES, QFmt<W_Q4_1>::BYTES, QFmt<W_Q5_0>::BYTES,
    QFmt<W_Q5_1>::BYTES, QFmt<W_Q4_K>::BYTES, QFmt<W_Q5_K>::BYTES, QFmt<W_Q6_K>::BYTES,
    QFmt<W_Q8_0>::BYTES, QFmt<W_Q4_0>::BYTES, QFmt<W_Q4_1>::BYTES, QFmt<W_Q5_0>::BYTES,
    QFmt<W_Q5_1>::BYTES, QFmt<W_Q4_K>::BYTES, QFmt<W_Q5_K>::BYTES, QFmt<W_Q6_K>::BYTES};

// compute="int8": activation rows quantized on their own (quantize_rows, quant.cpp), Q8_0-style: every 32
// consecutive k of a row share one float32 scale dx = max|x| / 127 and q = round-half-even(x * (1 / dx)),
// |q| <= 127. Why per 32 and not Q8_K's per 256: every weight format here has (sub-)blocks of 32 k or fewer
// (Q6_K: 16), so a 32-k activation block lines up with each, and its scale follows the activations' local
// magnitude (outlier features cost one block, not eight); the price is one float step per 32 k (Q8_K's 256
// would need int32 sums of 8 sub-blocks scaled by 6-bit integers first, which only the K-quants allow).
// Row r's data: q [K] int8; d [K / 32] its scales; sx [K / 32] = d * float(s32) (the block's sum as float);
// s32 [K / 32] and s16 [K / 16] the int32 sums of its q per 32 and per 16 k (the offset terms of q - OFF).
struct QRows {
  const int8_t* q;
  const float* d;
  const float* sx;
  const int32_t* s32;
  const int32_t* s16;
  int64_t K;
};

}  // namespace specedit_cpu
