// Every decoder layer of a Llama-family model in one call, for CPU decoding and verify passes.
//
// Per layer, on M = B * T rows:  h = rms_norm(x) -> qkv = h W_qkv^T (+b) -> [q/k head norms] -> RoPE on q, k
// -> K/V rows into the cache -> attention -> x += o W_o^T (+b) -> h = rms_norm(x) -> gu = h W_gu^T
// -> a = silu(gate) * up -> x += a W_down^T.
//
// Why in C++: at batch 1 a SmolLM2 step reads 538 MB of fp32 weights in ~8 ms, and the ~20 small torch ops
// per layer around the matmuls (norms, RoPE, cache writes, residuals, SiLU) cost ~3 ms more in dispatch
// alone. Here they are loops over a few hundred floats.
//
// Row invariance (DESIGN.md): every elementwise step and every reduction below works on one row at a time in
// an order fixed by the feature index, and the matmul and attention kernels are row-invariant themselves, so
// row i of a T-row call equals the 1-row call at that position bit for bit. Compiled with
// -ffp-contract=off: each multiply and add rounds as written.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "decoder.h"
#include "dispatch.h"
#include "pool.h"
#include "simd.h"

namespace specedit_cpu {

void linear_run(const float* x, int64_t M, const Packed& w, float* y, int64_t isa) {
  if (M == 0 || w.N == 0) return;
  LinearCols::Fn* const fn = kernel<LinearCols>(isa);
  const int64_t N = w.N, K = w.K;
  // Threads split the columns in groups of 32 (numbered across the parts); each streams its own contiguous
  // slice of the weights. A chunk should carry at least ~64K weights, so small layers are not split into slivers.
  int64_t first[MAX_PARTS + 1] = {0}, col[MAX_PARTS + 1] = {0};
  for (int p = 0; p < w.nparts; ++p) {
    first[p + 1] = first[p] + (w.part[p].N + 31) / 32;
    col[p + 1] = col[p] + w.part[p].N;
  }
  // compute="int8" parts read x quantized once per call, row by row (quant.h); float parts read x itself
  QRows xq{};
  thread_local std::vector<int64_t> qbuf;  // 8-byte units
  bool int8 = false;
  for (int p = 0; p < w.nparts; ++p) int8 |= w.part[p].dtype >= W_I8_Q8_0;
  if (int8) {
    const int64_t nb = K / 32, per_row = K + 4 * (3 * nb + 2 * nb);  // bytes: q, then d, sx, s32, s16
    qbuf.resize((M * per_row + 7) / 8 + 1);
    char* base = (char*)qbuf.data();
    xq.K = K;
    xq.d = (float*)base;
    xq.sx = xq.d + M * nb;
    xq.s32 = (int32_t*)(xq.sx + M * nb);
    xq.s16 = xq.s32 + M * nb;
    xq.q = (int8_t*)(xq.s16 + M * 2 * nb);
    parallel_for(0, M, std::max<int64_t>(1, 65536 / K), [&](int64_t r0, int64_t r1) { quantize_rows(x, K, xq, r0, r1); });
  }
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, 32 * K));
  parallel_for(0, first[w.nparts], grain, [&](int64_t g0, int64_t g1) {
    for (int p = 0; p < w.nparts; ++p) {
      const int64_t a = std::max(g0, first[p]) - first[p], b = std::min(g1, first[p + 1]) - first[p];
      const Part& part = w.part[p];
      if (a < b)
        fn(x, &xq, M, K, part.data, part.dtype, y + col[p], N, a * 32, std::min(b * 32, part.N));
    }
  });
  if (w.bias)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) y[m * N + n] += w.bias[n];
}

namespace {

// Rows [0, M) split over threads when there is enough work (a prefill); a decode or verify step stays on
// the calling thread. `per_row` is a rough count of floats touched per row.
template <class F>
void for_rows(int64_t M, int64_t per_row, const F& f) {
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, per_row));
  parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) f(r);
  });
}

// out[i] = w[i] * (x[i] * rsqrt(mean(x^2) + eps)), as transformers' LlamaRMSNorm in float32. The sum of
// squares runs in 16 lanes (i % 16) then a fixed tree, so the compiler may vectorize it without changing it.
void rms_norm(const float* x, const float* w, int64_t n, float eps, float* out) {
  float lane[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) lane[l] += x[i + l] * x[i + l];
  for (int l = 0; i < n; ++i, ++l) lane[l] += x[i] * x[i];
  for (int w2 = 8; w2 >= 1; w2 /= 2)
    for (int l = 0; l < w2; ++l) lane[l] += lane[l + w2];
  const float r = 1.0f / std::sqrt(lane[0] / (float)n + eps);
  for (i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

// HF rotate-half RoPE on one head in place: x * cos + rotate_half(x) * sin.
void rope(float* x, const float* cos, const float* sin, int64_t D) {
  const int64_t half = D / 2;
  float r[512];  // D <= 512 (checked by the bindings)
  for (int64_t d = 0; d < half; ++d) r[d] = -x[d + half];
  for (int64_t d = half; d < D; ++d) r[d] = x[d - half];
  for (int64_t d = 0; d < D; ++d) x[d] = x[d] * cos[d] + r[d] * sin[d];
}

// a[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + e^-g), in vectors (simd.h; this unit's Isa is the baseline
// AVX2 on every CPU). A tail of fewer than Isa::W goes through a padded copy, so every element takes the same
// vector path.
void silu_mul(const float* gate, const float* up, int64_t n, float* a) {
  constexpr int W = Isa::W;
  const Isa::V one = Isa::set1(1.0f);
  auto vec = [&](const float* g, const float* u, float* out) {
    const Isa::V gv = Isa::load(g);
    const Isa::V sig = Isa::div(gv, Isa::add(one, exp(Isa::sub(Isa::zero(), gv))));
    Isa::store(out, Isa::mul(sig, Isa::load(u)));
  };
  int64_t i = 0;
  for (; i + W <= n; i += W) vec(gate + i, up + i, a + i);
  if (i < n) {
    float g[W] = {0}, u[W] = {0}, out[W];
    std::memcpy(g, gate + i, (n - i) * sizeof(float));
    std::memcpy(u, up + i, (n - i) * sizeof(float));
    vec(g, u, out);
    std::memcpy(a + i, out, (n - i) * sizeof(float));
  }
}

}  // namespace

void decoder_forward(const DecoderDims& d, const Layer* layers, float* x, int64_t B, const int64_t* counts,
                     const int64_t* starts, float* cache, int64_t S, const DecoderScratch& s, int64_t isa) {
  const int64_t dim = d.dim, H = d.H, Hkv = d.Hkv, D = d.D, I = d.I;
  const int64_t nqkv = (H + 2 * Hkv) * D;
  const int64_t kv_plane = B * Hkv * S * D;  // one of K or V of one layer
  std::vector<int64_t> lengths(B), first(B + 1, 0), row_seq, row_pos;
  for (int64_t b = 0; b < B; ++b) {
    lengths[b] = starts[b] + counts[b];
    first[b + 1] = first[b] + counts[b];
    for (int64_t t = 0; t < counts[b]; ++t) row_seq.push_back(b), row_pos.push_back(starts[b] + t);
  }
  const int64_t M = first[B];

  for (int64_t l = 0; l < d.n_layers; ++l) {
    const Layer& L = layers[l];
    float* kc = cache + 2 * l * kv_plane;
    float* vc = kc + kv_plane;

    for_rows(M, dim, [&](int64_t r) { rms_norm(x + r * dim, L.attn_norm, dim, d.eps, s.h + r * dim); });
    linear_run(s.h, M, L.qkv, s.qkv, isa);
    for_rows(M, nqkv, [&](int64_t r) {
      const int64_t b = row_seq[r], pos = row_pos[r];
      float* row = s.qkv + r * nqkv;
      for (int64_t h = 0; h < H + Hkv; ++h) {
        float* head = row + h * D;
        const float* norm = h < H ? L.q_norm : L.k_norm;
        if (norm) rms_norm(head, norm, D, d.eps, head);
        rope(head, d.cos + pos * D, d.sin + pos * D, D);
      }
      for (int64_t g = 0; g < Hkv; ++g) {
        const int64_t at = ((b * Hkv + g) * S + pos) * D;
        std::memcpy(kc + at, row + (H + g) * D, D * sizeof(float));
        std::memcpy(vc + at, row + (H + Hkv + g) * D, D * sizeof(float));
      }
    });

    // Every sequence's rows in one attention problem (ragged): one parallel region per layer, not B.
    AttnProblem P{};
    P.q = s.qkv;
    P.sq_b = 0, P.sq_t = nqkv, P.sq_h = D;
    P.k = kc;
    P.sk_b = Hkv * S * D, P.sk_h = S * D, P.sk_s = D;
    P.v = vc;
    P.sv_b = P.sk_b, P.sv_h = P.sk_h, P.sv_s = P.sk_s;
    P.out = s.o;
    P.so_b = 0, P.so_t = H * D, P.so_h = D;
    P.lengths = lengths.data();
    P.rows = counts, P.first = first.data();
    P.B = B, P.H = H, P.Hkv = Hkv, P.D = D;
    P.window = d.window;
    P.qscale = (float)(d.scale * 1.4426950408889634);  // scores in base 2, as the attention binding does
    attention_run(P, isa);

    linear_run(s.o, M, L.o, s.y, isa);
    for_rows(M, dim, [&](int64_t r) {
      for (int64_t i = 0; i < dim; ++i) x[r * dim + i] += s.y[r * dim + i];
      rms_norm(x + r * dim, L.mlp_norm, dim, d.eps, s.h + r * dim);
    });
    linear_run(s.h, M, L.gate_up, s.gu, isa);
    for_rows(M, 3 * I, [&](int64_t r) { silu_mul(s.gu + r * 2 * I, s.gu + r * 2 * I + I, I, s.a + r * I); });
    linear_run(s.a, M, L.down, s.y, isa);
    for_rows(M, dim, [&](int64_t r) {
      for (int64_t i = 0; i < dim; ++i) x[r * dim + i] += s.y[r * dim + i];
    });
  }
}

}  // namespace specedit_cpu
