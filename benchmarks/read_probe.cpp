// Read-bandwidth probe for the benchmarks: the sum of a contiguous float32 CPU tensor, threads splitting it,
// with the same software prefetch distance as the packed matmul, so the limit it measures is not below what a
// kernel gets. Not part of the shipped runtime.
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>
#include <xmmintrin.h>

#include <vector>

static double read_probe(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
                    "read_probe: x must be a contiguous float32 CPU tensor");
  const float* p = x.data_ptr<float>();
  constexpr int64_t LANES = 64;  // 64 independent sums: vectorized by the compiler, no latency chain
  const int64_t n = x.numel() / LANES;
  std::vector<double> part(at::get_num_threads(), 0.0);
  at::parallel_for(0, n, 4096, [&](int64_t b0, int64_t b1) {
    float acc[LANES] = {0};
    for (int64_t b = b0; b < b1; ++b) {
      _mm_prefetch((const char*)(p + b * LANES) + 16384, _MM_HINT_T0);
      for (int l = 0; l < LANES; ++l) acc[l] += p[b * LANES + l];
    }
    double s = 0;
    for (float a : acc) s += a;
    part[at::get_thread_num()] += s;
  });
  double s = 0;
  for (double v : part) s += v;
  return s;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("read_probe", &read_probe, "sum of a float32 tensor (a bandwidth probe)"); }
