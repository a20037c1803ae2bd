// Row-invariant attention over a KV cache; one copy per instruction set.
//
// Included by attention_avx2.cpp and attention_avx512.cpp, each of which names its instruction set first
// (simd.h); like linear_kernel.h it includes no torch or libstdc++ header, and its vector operations are
// simd.h's Isa.
//
// The bits of a query row must depend only on that row's q and its visible keys: not on T (how many rows
// the call has), on which rows share a tile, on the thread split, or on AVX2 vs AVX-512. Every reduction
// therefore has an order fixed by the key index j and the feature index d alone:
//
//   s_j   = one fp32 FMA chain over d = 0..D-1, starting from +0 (q pre-multiplied by scale * log2(e)).
//           K is transposed to [d][key] tiles so that keys sit in lanes; nothing is summed across lanes.
//   block = keys [256 i, 256 (i + 1)) (ATT_KB), absolute. Per query and block:
//           m_b = max of s_j over the visible keys (exact, order-free),
//           p_j = exp2(s_j - m_b), simd.h's vector routine for every lane (no scalar tail),
//           l_b = 16 partial sums, lane j % 16, in increasing j, then a fixed tree 16 -> 8 -> 4 -> 2 -> 1,
//           o_b = per d, one FMA chain p_j * v_j[d] over the keys of the block in increasing j.
//   out   = with m = max_b m_b and c_b = exp2(m_b - m): sum_b c_b o_b / sum_b c_b l_b, blocks in
//           increasing order (explicit FMAs), then one division.
//
// A tile computes several queries over the union of their ranges; keys outside one query's range get
// s = -inf, so p = +0 exactly, and adding p * v (v finite) or +0 to an accumulator that started at +0
// leaves it unchanged: the same bits as computing that query alone (the one exception: an accumulator
// that is -0 because every earlier product underflowed turns +0; equal as values, harmless downstream).
// Keys outside [0, length) are never read (cache slots past the lengths may hold anything, NaN included).
//
// The 16 lanes of l_b are one zmm on AVX-512 and two ymm on AVX2 (Isa::sum16); every other lane-wise
// operation is correctly rounded IEEE arithmetic, so both paths give the same bits. Scalar float math goes
// through simd.h (fma_scalar, exp2_scalar) and the build uses -ffp-contract=off, so the compiler cannot fuse a
// multiply and an add differently in the two copies.
#include "simd.h"  // first: in an AVX-512 unit it sets the target of everything after it

#include "attention.h"
#include "dispatch.h"

namespace specedit_cpu {
namespace SPECEDIT_ISA_NS {
namespace {

using V = Isa::V;
constexpr int W = Isa::W;
// Queries per tile, from the register file (32 zmm on AVX-512, 16 ymm on AVX2):
constexpr int QS = W == 16 ? 6 : 2;  // score tile: QS x 4 accumulators + 4 keys + 1 broadcast
constexpr int QP = W == 16 ? 4 : 2;  // PV tile: QP x 4 accumulators + 4 values + 1 broadcast
constexpr int N16 = 16 / W;  // vectors per 16 logical lanes (l_b, exp chunks)
constexpr int64_t KB = ATT_KB;
constexpr int64_t SB = ATT_SB;
constexpr int64_t LDS = KB + SB;  // row stride of the score buffer: a block's chunks from an aligned start

// Transpose keys [s0, s0 + SB) of one head, features 0..D-1, into kt[d * SB + key]. Keys outside [ja, jb)
// are not read; their columns are zero.
inline void transpose_keys(const float* k, int64_t sk, int64_t s0, int64_t ja, int64_t jb, int64_t D, float* kt) {
  for (int64_t g = 0; g < SB; g += W) {
    const int64_t j = s0 + g;
    if (j >= jb || j + W <= ja) {
      for (int64_t d = 0; d < D; ++d) Isa::store(kt + d * SB + g, Isa::zero());
      continue;
    }
    const bool full = j >= ja && j + W <= jb;
    for (int64_t d0 = 0; d0 < D; d0 += W) {
      V r[W];
      for (int i = 0; i < W; ++i)
        r[i] = (full || (j + i >= ja && j + i < jb)) ? Isa::load(k + (j + i) * sk + d0) : Isa::zero();
      Isa::transpose(r);
      for (int i = 0; i < W; ++i) Isa::store(kt + (d0 + i) * SB + g, r[i]);
    }
  }
}

// Scores of Q queries (rows of qs at stride D) against the SB keys of kt: s[q * LDS + key].
template <int Q>
inline void score_tile(const float* qs, int64_t D, const float* kt, float* s) {
  constexpr int CV = 4;  // key vectors per pass: 64 keys on AVX-512, 32 on AVX2
  for (int kc = 0; kc < SB / W; kc += CV) {
    V acc[Q][CV];
#pragma GCC unroll 8
    for (int q = 0; q < Q; ++q)
#pragma GCC unroll 4
      for (int c = 0; c < CV; ++c) acc[q][c] = Isa::zero();
    for (int64_t d = 0; d < D; ++d) {
      const float* kd = kt + d * SB + kc * W;
      V kv[CV];
#pragma GCC unroll 4
      for (int c = 0; c < CV; ++c) kv[c] = Isa::load(kd + c * W);
#pragma GCC unroll 8
      for (int q = 0; q < Q; ++q) {
        const V b = Isa::bcast(qs + q * D + d);
#pragma GCC unroll 4
        for (int c = 0; c < CV; ++c) acc[q][c] = Isa::fma(b, kv[c], acc[q][c]);
      }
    }
#pragma GCC unroll 8
    for (int q = 0; q < Q; ++q)
#pragma GCC unroll 4
      for (int c = 0; c < CV; ++c) Isa::store(s + q * LDS + (kc + c) * W, acc[q][c]);
  }
}

template <int Q>
inline void score_tiles(int q, const float* qs, int64_t D, const float* kt, float* s) {
  if (q == Q) {
    score_tile<Q>(qs, D, kt, s);
  } else if constexpr (Q > 1) {
    score_tiles<Q - 1>(q, qs, D, kt, s);
  }
}

// o[q][d0 .. d0 + DV*W) = sum over j in [ja, jb), in increasing j, of p[q][j - c0] * v[j][d]: one FMA
// chain per (q, d) lane, from +0.
template <int Q, int DV>
inline void pv_tile(const float* p, int64_t c0, const float* v, int64_t sv, int64_t ja, int64_t jb, int64_t d0,
                    float* const* o) {
  V acc[Q][DV];
#pragma GCC unroll 8
  for (int q = 0; q < Q; ++q)
#pragma GCC unroll 4
    for (int c = 0; c < DV; ++c) acc[q][c] = Isa::zero();
  for (int64_t j = ja; j < jb; ++j) {
    const float* vj = v + j * sv + d0;
    V vv[DV];
#pragma GCC unroll 4
    for (int c = 0; c < DV; ++c) vv[c] = Isa::load(vj + c * W);
#pragma GCC unroll 8
    for (int q = 0; q < Q; ++q) {
      const V b = Isa::bcast(p + q * LDS + (j - c0));
#pragma GCC unroll 4
      for (int c = 0; c < DV; ++c) acc[q][c] = Isa::fma(b, vv[c], acc[q][c]);
    }
  }
#pragma GCC unroll 8
  for (int q = 0; q < Q; ++q)
#pragma GCC unroll 4
    for (int c = 0; c < DV; ++c) Isa::store(o[q] + d0 + c * W, acc[q][c]);
}

template <int Q, int DV>
inline void pv_dv(int dv, const float* p, int64_t c0, const float* v, int64_t sv, int64_t ja, int64_t jb, int64_t d0,
                  float* const* o) {
  if (dv == DV) {
    pv_tile<Q, DV>(p, c0, v, sv, ja, jb, d0, o);
  } else if constexpr (DV > 1) {
    pv_dv<Q, DV - 1>(dv, p, c0, v, sv, ja, jb, d0, o);
  }
}

template <int Q>
inline void pv_tiles(int q, int dv, const float* p, int64_t c0, const float* v, int64_t sv, int64_t ja, int64_t jb,
                     int64_t d0, float* const* o) {
  if (q == Q) {
    pv_dv<Q, 4>(dv, p, c0, v, sv, ja, jb, d0, o);
  } else if constexpr (Q > 1) {
    pv_tiles<Q - 1>(q, dv, p, c0, v, sv, ja, jb, d0, o);
  }
}

inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Rows of sequence b, and the q/out row of its row 0 (see AttnProblem::rows).
inline int64_t seq_rows(const AttnProblem& P, int64_t b) { return P.rows ? P.rows[b] : P.T; }
inline int64_t row0(const AttnProblem& P, int64_t b) { return P.rows ? P.first[b] : 0; }

// Visible keys [lo, hi] of query row t of sequence b.
inline void row_range(const AttnProblem& P, int64_t b, int64_t t, int64_t* lo, int64_t* hi) {
  const int64_t pos = P.lengths[b] - seq_rows(P, b) + t;
  *hi = pos;
  *lo = P.window > 0 ? imax(0, pos - P.window + 1) : 0;
}

inline float* part_of(const AttnProblem& P, int64_t b, int64_t t, int64_t h, int64_t blk) {
  const int64_t row = (P.rows ? P.first[b] : b * P.T) + t;
  return P.part + ((row * P.H + h) * P.nblk + blk) * (P.D + 2);
}

}  // namespace

// Partials of rows [t0, t1) of sequence b, all heads of kv head g, over key block blk: part_of(...) gets
// o_b (D floats), m_b and l_b for every query. scratch: (t1-t0)*G*(D + LDS) + D*SB floats.
void attn_block(const AttnProblem& P, int64_t b, int64_t g, int64_t t0, int64_t t1, int64_t blk, float* scratch) {
  const int64_t D = P.D, G = P.H / P.Hkv;
  const int nq = (int)((t1 - t0) * G);
  int64_t lo0, hi0, lo1, hi1;
  row_range(P, b, t0, &lo0, &hi0);
  row_range(P, b, t1 - 1, &lo1, &hi1);
  const int64_t ja = imax(lo0, blk * KB), jb = imin(hi1 + 1, (blk + 1) * KB);  // union of the rows, in the block
  const int64_t c0 = ja & ~(int64_t)15, c1 = (jb + 15) & ~(int64_t)15;
  float* qs = scratch;
  float* s = qs + (int64_t)nq * D;
  float* kt = s + (int64_t)nq * LDS;
  const float* kbh = P.k + b * P.sk_b + g * P.sk_h;
  const float* vbh = P.v + b * P.sv_b + g * P.sv_h;

  // queries, pre-scaled: qs[(t - t0) * G + i] = q[b, t, g * G + i] * qscale
  const V qscale = Isa::set1(P.qscale);
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t i = 0; i < G; ++i) {
      const float* src = P.q + b * P.sq_b + (row0(P, b) + t) * P.sq_t + (g * G + i) * P.sq_h;
      float* dst = qs + ((t - t0) * G + i) * D;
      for (int64_t d = 0; d < D; d += W) Isa::store(dst + d, Isa::mul(Isa::load(src + d), qscale));
    }

  // scores over the union, in tiles of SB keys from the aligned start
  for (int64_t s0 = c0; s0 < c1; s0 += SB) {
    transpose_keys(kbh, P.sk_s, s0, ja, jb, D, kt);
    for (int q = 0; q < nq; q += QS) {
      const int n = nq - q < QS ? nq - q : QS;
      score_tiles<QS>(n, qs + (int64_t)q * D, D, kt, s + (int64_t)q * LDS + (s0 - c0));
    }
  }

  // per query: mask to its own range, block max, p = exp2(s - m) in place, l_b
  float* outs[64];  // part rows of the queries of one PV tile (QP <= 64)
  for (int64_t t = t0; t < t1; ++t) {
    int64_t lo, hi;
    row_range(P, b, t, &lo, &hi);
    const int64_t qa = imax(lo, ja), qb = imin(hi + 1, jb);
    for (int64_t i = 0; i < G; ++i) {
      float* sq = s + ((t - t0) * G + i) * LDS - c0;  // sq[j] for j in [c0, c1)
      float* part = part_of(P, b, t, g * G + i, blk);
      if (qa >= qb) {  // no visible key in this block (the combine skips it)
        for (int64_t j = c0; j < c1; ++j) sq[j] = 0.0f;
        part[D] = -__builtin_inff();
        part[D + 1] = 0.0f;
        continue;
      }
      const int64_t ca = qa & ~(int64_t)15, cb = (qb + 15) & ~(int64_t)15;
      for (int64_t j = c0; j < ca; ++j) sq[j] = 0.0f;  // probabilities of keys before the query's chunks
      for (int64_t j = cb; j < c1; ++j) sq[j] = 0.0f;
      for (int64_t j = ca; j < qa; ++j) sq[j] = -__builtin_inff();
      for (int64_t j = qb; j < cb; ++j) sq[j] = -__builtin_inff();
      V mv = Isa::set1(-__builtin_inff());
      for (int64_t j = ca; j < cb; j += W) mv = Isa::max(mv, Isa::load(sq + j));
      const float m = Isa::hmax(mv);
      const V mb = Isa::set1(m);
      V lsum[N16];
      for (int c = 0; c < N16; ++c) lsum[c] = Isa::zero();
      for (int64_t j = ca; j < cb; j += 16)
        for (int c = 0; c < N16; ++c) {
          const V p = exp2(Isa::sub(Isa::load(sq + j + c * W), mb));
          Isa::store(sq + j + c * W, p);
          lsum[c] = Isa::add(lsum[c], p);
        }
      part[D] = m;
      part[D + 1] = Isa::sum16(lsum);
    }
  }

  // o_b = sum_j p_j v_j over the union (p = +0 outside each query's range)
  for (int q = 0; q < nq; q += QP) {
    const int n = nq - q < QP ? nq - q : QP;
    for (int i = 0; i < n; ++i) {
      const int64_t qi = q + i, t = t0 + qi / G, h = g * G + qi % G;
      outs[i] = part_of(P, b, t, h, blk);
    }
    for (int64_t d0 = 0; d0 < D; d0 += 4 * W) {
      const int dv = (int)((D - d0) / W < 4 ? (D - d0) / W : 4);
      pv_tiles<QP>(n, dv, s + (int64_t)q * LDS, c0, vbh, P.sv_s, ja, jb, d0, outs);
    }
  }
}

// out[b, t, g*G .. g*G + G) for t in [t0, t1), from the partials of every block the row sees.
// scratch: nblk floats.
void attn_combine(const AttnProblem& P, int64_t b, int64_t g, int64_t t0, int64_t t1, float* scratch) {
  const int64_t D = P.D, G = P.H / P.Hkv;
  for (int64_t t = t0; t < t1; ++t) {
    int64_t lo, hi;
    row_range(P, b, t, &lo, &hi);
    const int64_t b0 = lo / KB, b1 = hi / KB;
    for (int64_t h = g * G; h < (g + 1) * G; ++h) {
      const float* base = part_of(P, b, t, h, 0);
      const int64_t stride = D + 2;
      float m = -__builtin_inff();
      for (int64_t k = b0; k <= b1; ++k) m = base[k * stride + D] > m ? base[k * stride + D] : m;
      float l = 0.0f;
      for (int64_t k = b0; k <= b1; ++k) {
        const float c = exp2_scalar(base[k * stride + D] - m);
        scratch[k] = c;
        l = fma_scalar(base[k * stride + D + 1], c, l);
      }
      const V lv = Isa::set1(l);
      float* out = P.out + b * P.so_b + (row0(P, b) + t) * P.so_t + h * P.so_h;
      for (int64_t d = 0; d < D; d += W) {
        V acc = Isa::zero();
        for (int64_t k = b0; k <= b1; ++k) acc = Isa::fma(Isa::load(base + k * stride + d), Isa::set1(scratch[k]), acc);
        Isa::store(out + d, Isa::div(acc, lv));
      }
    }
  }
}

}  // namespace SPECEDIT_ISA_NS

AttnBlock::Fn* const AttnBlock::SPECEDIT_ISA_NS = SPECEDIT_ISA_NS::attn_block;
AttnCombine::Fn* const AttnCombine::SPECEDIT_ISA_NS = SPECEDIT_ISA_NS::attn_combine;

}  // namespace specedit_cpu
