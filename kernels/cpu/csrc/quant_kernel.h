// The matmul over GGUF block-quantized weights repacked by repack() (layout: quant.h). Included by
// linear_kernel.h inside its per-ISA anonymous namespace, after Tiles, GROUP and PREFETCH.
//
// Exactness: for each k the 32 columns' quants are widened to int32 lanes and turned into float32 weights with
// the operations gguf's numpy dequantizer writes, in its order (QFmt::FORM), where a product followed by a sum
// is one FMA only because the product is exact (see qweight), then fed to the same fma(x[m, k], w[n, k], acc)
// chain over k = 0..K-1 from +0 as the float formats. So every output equals the float32 kernel's on the
// dequantized weight bit for bit, whatever M, the thread split or the ISA (AVX2 and AVX-512 compute each lane
// identically).
//
// Speed: a tile decodes each k's weights once and uses them for all its rows (up to Tiles::QRMAX), so a verify
// forward of 65 rows dequantizes each weight ceil(65 / QRMAX) times, not 65; the bytes streamed are the
// quantized ones (Q4_1: 5 bits per weight instead of 32).

// The columns a tile covers: AVX-512 all 32 of a group as 2 x 16 lanes; AVX2 one half (16) as 2 x 8 lanes.
// Vector c of pass `half` starts at column qcol(c, half) of the group.
inline int qcol(int c, int half) { return Isa::W == 16 ? 16 * c : 16 * half + 8 * c; }

// The int32 quants of vector c (columns qcol(c, half) ...) at one k's record.
template <int DT>
inline Isa::VI qdecode(const uint8_t* rec, int c, int half, Isa::VI lanes) {
  using F = QFmt<DT>;
  const int col = qcol(c, half);
  Isa::VI q;
  if constexpr (F::Q8) {
    q = Isa::load_i8(rec + col);
  } else {
    // byte j holds column j (low nibble) and j + 16 (high nibble): AVX-512 reads bytes 0..15 for both vectors,
    // AVX2 bytes 8c .. 8c + 7 for either half
    const Isa::VI b = Isa::load_u8(rec + (Isa::W == 16 ? 0 : 8 * c));
    q = col >= 16 ? Isa::srli4(b) : Isa::andi(b, Isa::set1i(15));
  }
  if constexpr (F::HI == 1) {
    uint32_t hb;
    __builtin_memcpy(&hb, rec + 16, 4);
    const Isa::VI bit = Isa::andi(Isa::srlv(Isa::set1i((int)(hb >> col)), lanes), Isa::set1i(1));
    q = Isa::ori(q, Isa::slli4(bit));
  } else if constexpr (F::HI == 2) {
    uint64_t hb;
    __builtin_memcpy(&hb, rec + 16, 8);
    const Isa::VI two = Isa::andi(Isa::srlv(Isa::set1i((int)(uint32_t)(hb >> (2 * col))), lanes), Isa::set1i(3));
    q = Isa::ori(q, Isa::slli4(two));
  }
  if constexpr (F::OFF != 0) q = Isa::subi(q, Isa::set1i(F::OFF));
  return q;
}

// The float32 weights of one k (vector c of pass `half`) from its quants and the sub-block's scale and offset.
// s * qf is exact in float32 (s has at most 11 + 7 significant bits, q at most 6), so the one rounding of an FMA
// equals gguf's rounded product then rounded sum: fma(s, q, o) == (s * q) + o bit for bit.
template <int DT>
inline Isa::V qweight(const uint8_t* rec, int c, int half, Isa::VI lanes, Isa::V s, Isa::V o) {
  using F = QFmt<DT>;
  const Isa::V qf = Isa::cvt(qdecode<DT>(rec, c, half, lanes));
  if constexpr (F::Q8) return Isa::mul(qf, s);  // numpy: x * d
  else if constexpr (F::FORM == QF_MUL) return Isa::mul(s, qf);
  else if constexpr (F::FORM == QF_MULADD) return Isa::fma(s, qf, o);
  else return Isa::fms(s, qf, o);
}

// A super-block's per-column f16 scale d and min m (zero for formats without one), widened, for vector c of pass
// `half`: what qscales then turns into each sub-block's scale and offset.
template <int DT>
inline void qsuper(const uint8_t* blk, int c, int half, Isa::V& d, Isa::V& m) {
  d = Isa::load((const f16_t*)blk + qcol(c, half));
  m = QFmt<DT>::HAS_MIN ? Isa::load((const f16_t*)(blk + 64) + qcol(c, half)) : Isa::zero();
}

// Scale and offset of sub-block j of a super-block (d, m: its per-column f16 scales, widened).
template <int DT>
inline void qscales(const uint8_t* blk, int j, int c, int half, Isa::V d, Isa::V m, Isa::V& s, Isa::V& o) {
  using F = QFmt<DT>;
  const uint8_t* sc = blk + 64 + 64 * F::HAS_MIN;
  if constexpr (F::FORM == QF_MULSUB) {  // Q4_K, Q5_K: s = d * sc, o = dmin * mn
    s = Isa::mul(d, Isa::cvt(Isa::load_u8(sc + 32 * j + qcol(c, half))));
    o = Isa::mul(m, Isa::cvt(Isa::load_u8(sc + 256 + 32 * j + qcol(c, half))));
  } else if constexpr (F::SC_BYTES > 0) {  // Q6_K: s = d * int8 sc
    s = Isa::mul(d, Isa::cvt(Isa::load_i8(sc + 32 * j + qcol(c, half))));
    o = Isa::zero();
  } else {
    s = d;
    o = m;
  }
}

// Group g dequantized into buf [K][32] float32 (the float32 kernel's layout of one group).
template <int DT>
inline void qdequant_group(const uint8_t* g, int64_t K, float* buf) {
  using F = QFmt<DT>;
  constexpr int NSUB = F::QK / F::SUB;
  const Isa::VI lanes = Isa::iota(F::HI == 2 ? 2 : 1);
  for (int64_t sb = 0; sb < K / F::QK; ++sb) {
    const uint8_t* blk = g + sb * F::BYTES;
    for (int half = 0; half < (Isa::W == 16 ? 1 : 2); ++half) {
      Isa::V d[2], m[2];
#pragma GCC unroll 2
      for (int c = 0; c < 2; ++c) qsuper<DT>(blk, c, half, d[c], m[c]);
      for (int j = 0; j < NSUB; ++j) {
        Isa::V s[2], o[2];
#pragma GCC unroll 2
        for (int c = 0; c < 2; ++c) qscales<DT>(blk, j, c, half, d[c], m[c], s[c], o[c]);
        const uint8_t* rec = blk + F::HDR + (int64_t)j * F::SUB * F::REC;
        float* out = buf + (sb * F::QK + j * F::SUB) * GROUP;
#pragma GCC unroll 2
        for (int kk = 0; kk < F::SUB; ++kk)
#pragma GCC unroll 2
          for (int c = 0; c < 2; ++c)
            Isa::store(out + kk * GROUP + qcol(c, half), qweight<DT>(rec + kk * F::REC, c, half, lanes, s[c], o[c]));
      }
    }
  }
}

// R rows x the pass's 16 (AVX2) or 32 (AVX-512) columns of G groups (g, g + gstride, ...; their K / QK
// super-blocks each). G = 2 for one or two rows on AVX-512: a column's FMA chain waits 4 cycles per k, so one
// group's 2 chains would leave the core idle; two groups' 4 chains keep it busy decoding.
template <int DT, int R, int G>
inline void qtile(const float* x, int64_t K, const uint8_t* g, int64_t gstride, int half, float* y, int64_t ldy,
                  int ncols) {
  using F = QFmt<DT>;
  constexpr int NSUB = F::QK / F::SUB;
  constexpr int CHUNK = (F::BYTES / NSUB + 63) / 64;  // cache lines prefetched per sub-block
  const Isa::VI lanes = Isa::iota(F::HI == 2 ? 2 : 1);  // bit position of each lane's high bits, minus col
  Isa::V acc[R][G][2];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int gi = 0; gi < G; ++gi) acc[r][gi][0] = acc[r][gi][1] = Isa::zero();
  const int64_t nsb = K / F::QK;
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* blk[G];
    Isa::V d[G][2], m[G][2];
#pragma GCC unroll 2
    for (int gi = 0; gi < G; ++gi) {
      blk[gi] = g + gi * gstride + sb * F::BYTES;
#pragma GCC unroll 2
      for (int c = 0; c < 2; ++c) qsuper<DT>(blk[gi], c, half, d[gi][c], m[gi][c]);
    }
    for (int j = 0; j < NSUB; ++j) {
      Isa::V s[G][2], o[G][2];
      const uint8_t* rec[G];
#pragma GCC unroll 2
      for (int gi = 0; gi < G; ++gi) {
#pragma GCC unroll 4
        for (int l = 0; l < CHUNK; ++l)
          prefetch((const char*)blk[gi] + PREFETCH + 64 * (j * CHUNK + l));
#pragma GCC unroll 2
        for (int c = 0; c < 2; ++c) qscales<DT>(blk[gi], j, c, half, d[gi][c], m[gi][c], s[gi][c], o[gi][c]);
        rec[gi] = blk[gi] + F::HDR + (int64_t)j * F::SUB * F::REC;
      }
      const float* xk = x + sb * F::QK + j * F::SUB;
#pragma GCC unroll 2
      for (int kk = 0; kk < F::SUB; ++kk) {
        Isa::V w[G][2];
#pragma GCC unroll 2
        for (int gi = 0; gi < G; ++gi)
#pragma GCC unroll 2
          for (int c = 0; c < 2; ++c) w[gi][c] = qweight<DT>(rec[gi] + kk * F::REC, c, half, lanes, s[gi][c], o[gi][c]);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const Isa::V xb = Isa::bcast(xk + r * K + kk);
#pragma GCC unroll 2
          for (int gi = 0; gi < G; ++gi) {
            acc[r][gi][0] = Isa::fma(xb, w[gi][0], acc[r][gi][0]);
            acc[r][gi][1] = Isa::fma(xb, w[gi][1], acc[r][gi][1]);
          }
        }
      }
    }
  }
  constexpr int COLS = 2 * Isa::W;
  if (ncols == G * COLS) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
      for (int gi = 0; gi < G; ++gi) {
        Isa::store(y + r * ldy + gi * COLS, acc[r][gi][0]);
        Isa::store(y + r * ldy + gi * COLS + Isa::W, acc[r][gi][1]);
      }
  } else {  // the last, partial group of columns
    float tmp[G * COLS];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
      for (int gi = 0; gi < G; ++gi) {
        Isa::store(tmp + gi * COLS, acc[r][gi][0]);
        Isa::store(tmp + gi * COLS + Isa::W, acc[r][gi][1]);
      }
      for (int j = 0; j < ncols; ++j) y[r * ldy + j] = tmp[j];
    }
  }
}

template <int DT, int R>
inline void qtile_rows(int r, const float* x, int64_t K, const uint8_t* g, int half, float* y, int64_t ldy,
                       int ncols) {
  if (r == R) {
    qtile<DT, R, 1>(x, K, g, 0, half, y, ldy, ncols);
  } else if constexpr (R > 1) {
    qtile_rows<DT, R - 1>(r, x, K, g, half, y, ldy, ncols);
  }
}

// Columns [col0, col1) (col0 a multiple of 32, col1 too unless it is N), all M rows.
template <int DT>
void run_q(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t ldy, float* y, int64_t col0,
           int64_t col1) {
  using F = QFmt<DT>;
  const int64_t gbytes = K / F::QK * F::BYTES;  // one group of 32 columns
  for (int64_t b = 0; b < PREFETCH; b += 64) prefetch((const char*)(w + col0 / GROUP * gbytes) + b);
  constexpr int COLS = 2 * Isa::W;  // columns per pass
  int64_t n0 = col0;
  if (M > 2 * Tiles::QRMAX) {
    // Many rows (a verify or prefill forward): dequantize each group once into a [K][32] float32 buffer (L2)
    // and run the float32 tiles over it, rather than once per row tile. Same FMA chains, so the same bits.
    float* buf = (float*)alloc_aligned(K * GROUP * sizeof(float));
    for (; n0 < col1; n0 += GROUP) {
      qdequant_group<DT>(w + n0 / GROUP * gbytes, K, buf);
      run(x, M, K, buf, ldy, y + n0, 0, col1 - n0 < GROUP ? col1 - n0 : GROUP);
    }
    free_aligned(buf);
    return;
  }
  if constexpr (Isa::W == 16) {  // one or two rows: two groups at a time
    if (M <= 2) {
      for (; n0 + GROUP < col1; n0 += 2 * GROUP) {
        const uint8_t* g = w + n0 / GROUP * gbytes;
        const int ncols = (int)(col1 - n0 < 2 * GROUP ? col1 - n0 : 2 * GROUP);
        if (M == 1) qtile<DT, 1, 2>(x, K, g, gbytes, 0, y + n0, ldy, ncols);
        else qtile<DT, 2, 2>(x, K, g, gbytes, 0, y + n0, ldy, ncols);
      }
    }
  }
  for (; n0 < col1; n0 += GROUP) {
    const uint8_t* g = w + n0 / GROUP * gbytes;
    for (int half = 0; half * COLS < GROUP && n0 + half * COLS < col1; ++half) {
      const int64_t c0 = n0 + half * COLS;
      const int ncols = (int)(col1 - c0 < COLS ? col1 - c0 : COLS);
      for (int64_t m0 = 0; m0 < M; m0 += Tiles::QRMAX) {
        const int r = (int)(M - m0 < Tiles::QRMAX ? M - m0 : Tiles::QRMAX);
        qtile_rows<DT, Tiles::QRMAX>(r, x + m0 * K, K, g, half, y + m0 * ldy + c0, ldy, ncols);
      }
    }
  }
}
