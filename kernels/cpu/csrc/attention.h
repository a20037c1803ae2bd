// What the attention binding (attention.cpp) and the two kernel instances (attention_avx2.cpp,
// attention_avx512.cpp) share: a plain struct and constants. No functions here: an inline function in a
// header compiled under two instruction sets could be merged (ODR) into the copy that needs AVX-512.
#pragma once
#include <stdint.h>

#include "codes.h"

namespace specedit_cpu {

// Keys are reduced in absolute blocks [ATT_KB * i, ATT_KB * (i + 1)): a query's partial softmax over one
// block depends only on that query and its visible keys inside the block, and blocks are combined in
// increasing order. Fixed (never derived from T, the lengths or the thread count): row invariance rests on it.
constexpr int64_t ATT_KB = 256;
// Keys transposed at a time for the scores (a [D][ATT_SB] tile of K in L1); a multiple of 16.
constexpr int64_t ATT_SB = 64;

struct AttnProblem {
  const float* q;  // q[b, t, h, d] at q + b*sq_b + t*sq_t + h*sq_h + d
  int64_t sq_b, sq_t, sq_h;
  const float* k;  // k[b, g, s, d] at k + b*sk_b + g*sk_h + s*sk_s + d
  int64_t sk_b, sk_h, sk_s;
  const float* v;
  int64_t sv_b, sv_h, sv_s;
  float* out;  // out[b, t, h, d] at out + b*so_b + t*so_t + h*so_h + d
  int64_t so_b, so_t, so_h;
  const int64_t* lengths;  // [B] valid positions per sequence, its new rows included
  int64_t B, T, H, Hkv, D;
  // Ragged rows (null: every sequence has T rows). Sequence b has rows[b] rows; its row t is q/out row
  // first[b] + t (sq_b and so_b still apply) and partials row first[b] + t: the sequences' row ranges must
  // not overlap. T is unused then. One problem for a whole batched step: one parallel region, not B.
  const int64_t* rows;
  const int64_t* first;
  int64_t window;  // 0: none; else key j is visible from position p iff p - window < j <= p
  float qscale;    // scale * log2(e): scores are in base 2
  int64_t nblk;    // block slots per query in part
  float* part;     // partials [rows, H, nblk, D + 2]: o (D), block max, block sum (rows: B * T or ragged)
};

}  // namespace specedit_cpu
