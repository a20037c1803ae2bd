// Torch binding of the small-M CPU matmul: checks, ISA choice, and the split over threads.
// Narrow includes on purpose: <torch/extension.h> alone takes ~19 s to compile here, these ~5 s.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

namespace specedit_cpu {
namespace avx2 {
void linear_cols(const float*, int64_t, int64_t, const void*, int, int64_t, float*, int64_t, int64_t);
}
namespace avx512 {
void linear_cols(const float*, int64_t, int64_t, const void*, int, int64_t, float*, int64_t, int64_t);
}
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y[M, N] = x[M, K] @ W^T (+ bias) with packed W (see specedit.cpu_linear)");
  m.def("best_isa", &best_isa, "instruction set chosen by isa=0 on this CPU");
}
