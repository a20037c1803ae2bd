// compute="int8": integer dot products over the int8 layout of GGUF blocks (quant.h) and activation rows
// quantized on their own (QRows, quantize_rows in quant.cpp). Included by linear_kernel.h inside its per-ISA
// anonymous namespace, after Tiles, GROUP, PREFETCH and quant_kernel.h (qcol, qscales).
//
// The arithmetic, the same for every row, row count, thread split and ISA (linear.py's linear_int8_ref is the
// same in numpy): for output (row m, column n), acc = +0, then for each sub-block of SUB k (32; Q6_K: 16) in
// k order
//   I   = sum over its k of (q[n, k] - OFF) * xq[m, k]        int32, exact (|I| < 2^24)
//   acc = fma(s * dx, float(I), acc)                         s: the sub-block's weight scale (qscales: d,
//                                                            or d * sc), dx: the row's scale of that 32-k block
//   acc = fma(o, sx, acc)    Q4_1, Q5_1 (o = m)              sx: dx * float(the block's sum of xq)
//   acc = fnma(o, sx, acc)   Q4_K, Q5_K (o = dmin * mn)      (acc - o * sx, one rounding)
// The integer sums are exact, so AVX-512 VNNI (vpdpbusd, unsigned weights: Q8_0 enters as q + 128 and the
// offset is taken back) and AVX2 (pmaddubsw: its int16 pair sums cannot saturate, q <= 63 unsigned, Q8_0
// through sign flips, |xq| <= 127) give the same I, and the float steps are the same per-lane operations in the
// same order: the same bits.
//
// Speed: each weight vector (16 or 8 columns x 4 k) is decoded once per tile and feeds R rows' dot products;
// the float steps run once per sub-block, not per k.

// The 4-k record's quants of vector c of pass `half` (columns qcol(c, half) ...), as unsigned bytes (Q8_0:
// whatever Isa::q8 makes of the signed ones).
template <int DT>
inline Isa::VI idecode(const uint8_t* rec, int c, int half) {
  using F = QFmt<DT>;
  const int plane = Isa::W == 16 ? c : half, seg = Isa::W == 16 ? 0 : c;
  if constexpr (F::Q8) return Isa::q8(rec + 64 * plane + 32 * seg);
  const Isa::VI b = Isa::loadb(rec + 32 * seg);
  Isa::VI q = plane ? Isa::hi4(b) : Isa::lo4(b);
#pragma GCC unroll 2
  for (int h = 0; h < F::HI; ++h) q = Isa::addbits(q, rec + 64 + 8 * (2 * h + plane) + 4 * seg, 16 << h);
  return q;
}

// R rows (m0 ..) x the pass's columns of one group g (its K / QK super-blocks).
template <int DT, int R>
inline void itile(const QRows& xa, int64_t m0, const uint8_t* g, int half, float* y, int64_t ldy, int ncols) {
  using F = QFmt<DT>;
  constexpr int NSUB = F::QK / F::SUB;
  constexpr int CHUNK = (F::BYTES / NSUB + 63) / 64;  // cache lines prefetched per sub-block
  constexpr int OFF = F::Q8 ? Isa::Q8_OFF : F::OFF;
  const int64_t K = xa.K, nb = K / 32, nsub = K / F::SUB;
  const int8_t* xq = xa.q + m0 * K;
  const float* dx = xa.d + m0 * nb;
  const float* sx = xa.sx + m0 * nb;
  const int32_t* xs = F::SUB == 16 ? xa.s16 + m0 * nsub : xa.s32 + m0 * nsub;  // per sub-block sums of xq
  Isa::V acc[R][2];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = Isa::zero();
  for (int64_t sb = 0; sb < K / F::QK; ++sb) {
    const uint8_t* blk = g + sb * F::BYTES;
    Isa::V d[2], m[2];
#pragma GCC unroll 2
    for (int c = 0; c < 2; ++c) qsuper<DT>(blk, c, half, d[c], m[c]);
    for (int j = 0; j < NSUB; ++j) {
#pragma GCC unroll 4
      for (int l = 0; l < CHUNK; ++l) prefetch((const char*)blk + PREFETCH + 64 * (j * CHUNK + l));
      const int64_t k0 = sb * F::QK + j * F::SUB, b32 = k0 / 32;
      Isa::VI ia[R][2];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) ia[r][0] = ia[r][1] = Isa::set1i(-OFF * xs[r * nsub + k0 / F::SUB]);
      const uint8_t* rec = blk + F::HDR + (int64_t)j * F::SUB * F::REC;
#pragma GCC unroll 8
      for (int kq = 0; kq < F::SUB / 4; ++kq) {
        Isa::VI w[2];
#pragma GCC unroll 2
        for (int c = 0; c < 2; ++c) w[c] = idecode<DT>(rec + kq * 4 * F::REC, c, half);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const Isa::VI xb = Isa::bcast4(xq + r * K + k0 + 4 * kq);
#pragma GCC unroll 2
          for (int c = 0; c < 2; ++c) ia[r][c] = F::Q8 ? Isa::dot4_q8(ia[r][c], w[c], xb) : Isa::dot4(ia[r][c], w[c], xb);
        }
      }
      Isa::V s[2], o[2];
#pragma GCC unroll 2
      for (int c = 0; c < 2; ++c) qscales<DT>(blk, j, c, half, d[c], m[c], s[c], o[c]);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const Isa::V dxb = Isa::bcast(dx + r * nb + b32);
#pragma GCC unroll 2
        for (int c = 0; c < 2; ++c) {
          acc[r][c] = Isa::fma(Isa::mul(s[c], dxb), Isa::cvt(ia[r][c]), acc[r][c]);
          if constexpr (F::FORM == QF_MULADD) acc[r][c] = Isa::fma(o[c], Isa::bcast(sx + r * nb + b32), acc[r][c]);
          if constexpr (F::FORM == QF_MULSUB) acc[r][c] = Isa::fnma(o[c], Isa::bcast(sx + r * nb + b32), acc[r][c]);
        }
      }
    }
  }
  constexpr int COLS = 2 * Isa::W;
  float tmp[COLS];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    float* out = ncols == COLS ? y + r * ldy : tmp;  // the last, partial group of columns goes through tmp
    Isa::store(out, acc[r][0]);
    Isa::store(out + Isa::W, acc[r][1]);
    if (ncols != COLS)
      for (int j = 0; j < ncols; ++j) y[r * ldy + j] = tmp[j];
  }
}

template <int DT, int R>
inline void itile_rows(int r, const QRows& xa, int64_t m0, const uint8_t* g, int half, float* y, int64_t ldy,
                       int ncols) {
  if (r == R) {
    itile<DT, R>(xa, m0, g, half, y, ldy, ncols);
  } else if constexpr (R > 1) {
    itile_rows<DT, R - 1>(r, xa, m0, g, half, y, ldy, ncols);
  }
}

// Columns [col0, col1) (col0 a multiple of 32, col1 too unless it is N), all M rows of xa.
template <int DT>
void run_i8(const QRows& xa, int64_t M, const uint8_t* w, int64_t ldy, float* y, int64_t col0, int64_t col1) {
  using F = QFmt<DT>;
  const int64_t gbytes = xa.K / F::QK * F::BYTES;  // one group of 32 columns
  for (int64_t b = 0; b < PREFETCH; b += 64) prefetch((const char*)(w + col0 / GROUP * gbytes) + b);
  constexpr int COLS = 2 * Isa::W;  // columns per pass
  for (int64_t n0 = col0; n0 < col1; n0 += GROUP) {
    const uint8_t* g = w + n0 / GROUP * gbytes;
    for (int half = 0; half * COLS < GROUP && n0 + half * COLS < col1; ++half) {
      const int64_t c0 = n0 + half * COLS;
      const int ncols = (int)(col1 - c0 < COLS ? col1 - c0 : COLS);
      for (int64_t m0 = 0; m0 < M; m0 += Tiles::IRMAX) {
        const int r = (int)(M - m0 < Tiles::IRMAX ? M - m0 : Tiles::IRMAX);
        itile_rows<DT, Tiles::IRMAX>(r, xa, m0, g, half, y + m0 * ldy + c0, ldy, ncols);
      }
    }
  }
}
