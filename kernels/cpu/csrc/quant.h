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

// The same numbers indexed by dtype code (0 for the float formats), for the bindings' size checks.
constexpr int QK_OF[W_NUM_DTYPES] = {0, 0, 0, 0, 32, 32, 32, 32, 32, 256, 256, 256};
constexpr int GGUF_BYTES_OF[W_NUM_DTYPES] = {0, 0, 0, 0, 34, 18, 20, 22, 24, 144, 176, 210};
constexpr int PACKED_BYTES_OF[W_NUM_DTYPES] = {
    0, 0, 0, 0, QFmt<W_Q8_0>::BYTES, QFmt<W_Q4_0>::BYTES, QFmt<W_Q4_1>::BYTES, QFmt<W_Q5_0>::BYTES,
    QFmt<W_Q5_1>::BYTES, QFmt<W_Q4_K>::BYTES, QFmt<W_Q5_K>::BYTES, QFmt<W_Q6_K>::BYTES};

}  // namespace specedit_cpu
