// Torch bindings of the CPU kernels: the small-M matmul (checks, ISA choice, split over threads) and the
// row-invariant attention (checks here; work split in attention.cpp). One file holds every binding because
// the torch and pybind headers are what takes time to compile.
// Narrow includes on purpose: <torch/extension.h> alone takes ~19 s to compile here, these ~5 s.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include "attention.h"

namespace specedit_cpu {
namespace avx2 {
void linear_cols(const float*, int64_t, int64_t, const void*, int, int64_t, float*, int64_t, int64_t);
}
namespace avx512 {
void linear_cols(const float*, int64_t, int64_t, const void*, int, int64_t, float*, int64_t, int64_t);
}
void attention_run(AttnProblem P, int64_t isa);  // attention.cpp
}  // namespace specedit_cpu

static bool has_avx512() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return yes;
}

// "avx512" or "avx2": what isa=0 (auto) picks on this CPU.
static std::string best_isa() { return has_avx512() ? "avx512" : "avx2"; }

// x [M, K] float32; packed: the integer view made by pack_weight() for an [N, K] weight;
// dtype 0/1/2 = f32/f16/bf16; bias [N] float32 or None; isa 0 = auto, 1 = avx2, 2 = avx512.
// Returns y [M, N] float32.
static at::Tensor linear(const at::Tensor& x_, const at::Tensor& packed, int64_t N, int64_t K,
                            int64_t dtype, const std::optional<at::Tensor>& bias, int64_t isa) {
  TORCH_CHECK(x_.device().is_cpu(), "cpu_linear: x must be on the CPU, got ", x_.device());
  TORCH_CHECK(x_.scalar_type() == at::kFloat, "cpu_linear: x must be float32, got ", x_.scalar_type());
  TORCH_CHECK(x_.dim() == 2 && x_.size(1) == K, "cpu_linear: x must be [M, ", K, "], got ", x_.sizes());
  TORCH_CHECK(dtype >= 0 && dtype <= 2, "cpu_linear: dtype code must be 0, 1 or 2, got ", dtype);
  const int64_t Np = (N + 31) / 32 * 32;
  const int64_t esize = dtype == 0 ? 4 : 2;
  TORCH_CHECK(packed.device().is_cpu() && packed.is_contiguous() && packed.nbytes() == (size_t)(Np * K * esize),
              "cpu_linear: packed weight must be a contiguous CPU tensor of ", Np * K * esize,
              " bytes for N=", N, " K=", K, " dtype code ", dtype, ", got ", packed.nbytes(), " bytes on ",
              packed.device());
  if (isa == 0) isa = has_avx512() ? 2 : 1;
  TORCH_CHECK(isa == 1 || (isa == 2 && has_avx512()), "cpu_linear: isa code ", isa, " is not available here");
  const at::Tensor x = x_.contiguous();
  const int64_t M = x.size(0);
  auto y = at::empty({M, N}, x.options());
  if (M > 0 && N > 0) {
    auto fn = isa == 2 ? specedit_cpu::avx512::linear_cols : specedit_cpu::avx2::linear_cols;
    const float* xp = x.data_ptr<float>();
    const void* wp = packed.data_ptr();
    float* yp = y.data_ptr<float>();
    // Threads split the columns in groups of 32; each streams its own contiguous slice of the weights.
    // A chunk should carry at least ~64K weights, so small layers are not split into slivers.
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, 32 * K));
    at::parallel_for(0, Np / 32, grain, [&](int64_t g0, int64_t g1) {
      fn(xp, M, K, wp, (int)dtype, N, yp, g0 * 32, std::min(g1 * 32, N));
    });
  }
  if (bias.has_value() && bias->defined()) y.add_(*bias);  // elementwise: same bits for every row split
  return y;
}

// q [B, T, H, D] float32 (d contiguous, else copied); k, v [B, Hkv, S, D] float32 views (d contiguous,
// other strides free; not copied); lengths [B]: valid positions per row including the T new rows;
// window 0 = none; isa 0 = auto, 1 = avx2, 2 = avx512. Returns out [B, T, H, D] float32, contiguous.
// Errors are ValueError (TORCH_CHECK_VALUE) naming the values.
static at::Tensor attention(const at::Tensor& q_, const at::Tensor& k, const at::Tensor& v,
                            const std::vector<int64_t>& lengths, double scale, int64_t window, int64_t isa) {
  for (const at::Tensor* x : {&q_, &k, &v}) {
    TORCH_CHECK_VALUE(x->device().is_cpu() && x->scalar_type() == at::kFloat && x->dim() == 4,
                      "cpu_attention: q, k and v must be 4-d float32 CPU tensors, got ", x->scalar_type(), " ",
                      x->sizes(), " on ", x->device());
  }
  const int64_t B = q_.size(0), T = q_.size(1), H = q_.size(2), D = q_.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "cpu_attention: k ", k.sizes(), " and v ", v.sizes(), " differ");
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(3) == D, "cpu_attention: cache ", k.sizes(), " does not match q ",
                    q_.sizes());
  TORCH_CHECK_VALUE(D > 0 && D % 16 == 0, "cpu_attention: head dim must be a positive multiple of 16, got ", D);
  TORCH_CHECK_VALUE(Hkv > 0 && H % Hkv == 0, "cpu_attention: ", H, " heads not divisible by ", Hkv, " kv heads");
  TORCH_CHECK_VALUE(k.stride(3) == 1 && v.stride(3) == 1, "cpu_attention: cache rows must be contiguous in d");
  TORCH_CHECK_VALUE((int64_t)lengths.size() == B, "cpu_attention: ", lengths.size(), " lengths for batch ", B);
  for (int64_t n : lengths)
    TORCH_CHECK_VALUE(n >= T && n <= S, "cpu_attention: length ", n, " outside [T=", T, ", S_max=", S, "]");
  TORCH_CHECK_VALUE(scale > 0 && scale < 1e300, "cpu_attention: scale must be positive and finite, got ", scale);
  TORCH_CHECK_VALUE(window >= 0, "cpu_attention: window must be >= 0 (0 = none), got ", window);
  if (isa == 0) isa = has_avx512() ? 2 : 1;
  TORCH_CHECK_VALUE(isa == 1 || (isa == 2 && has_avx512()), "cpu_attention: isa code ", isa, " is not available here");
  const at::Tensor q = q_.stride(3) == 1 ? q_ : q_.contiguous();
  at::Tensor out = at::empty({B, T, H, D}, q.options());
  specedit_cpu::AttnProblem P{};
  P.q = q.data_ptr<float>();
  P.sq_b = q.stride(0), P.sq_t = q.stride(1), P.sq_h = q.stride(2);
  P.k = k.data_ptr<float>();
  P.sk_b = k.stride(0), P.sk_h = k.stride(1), P.sk_s = k.stride(2);
  P.v = v.data_ptr<float>();
  P.sv_b = v.stride(0), P.sv_h = v.stride(1), P.sv_s = v.stride(2);
  P.out = out.data_ptr<float>();
  P.so_b = out.stride(0), P.so_t = out.stride(1), P.so_h = out.stride(2);
  P.lengths = lengths.data();
  P.B = B, P.T = T, P.H = H, P.Hkv = Hkv, P.D = D;
  P.window = window;
  P.qscale = (float)(scale * 1.4426950408889634);  // scores in base 2: exp(x * scale) = exp2(x * qscale)
  specedit_cpu::attention_run(P, isa);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y[M, N] = x[M, K] @ W^T (+ bias) with packed W (see specedit.cpu_linear)");
  m.def("best_isa", &best_isa, "instruction set chosen by isa=0 on this CPU");
  m.def("attention", &attention,
        "row-invariant attention of q [B, T, H, D] over k/v [B, Hkv, S, D] (see specedit.cpu_attention)");
}
