// Compute probe for the benchmarks: float32 FMAs on values held in registers, on every thread, with the widest
// vectors the CPU has (built with -march=native): the peak FLOP rate a kernel cannot beat. Not part of the
// shipped runtime.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

#if defined(__AVX512F__)
using V = __m512;
static inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
static inline V splat(float x) { return _mm512_set1_ps(x); }
#else
using V = __m256;
static inline V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
static inline V splat(float x) { return _mm256_set1_ps(x); }
#endif
constexpr int LANES = sizeof(V) / sizeof(float);
constexpr int CHAINS = 12;  // independent FMA chains: more than latency x FMA ports, fewer than the registers

// Runs `iters` rounds of CHAINS vector FMAs on each of at::get_num_threads() threads; returns the FLOPs done.
static double fma_probe(int64_t iters) {
  const int64_t threads = at::get_num_threads();
  std::vector<float> sink(threads, 0.f);
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      V acc[CHAINS];
      for (int c = 0; c < CHAINS; ++c) acc[c] = splat(float(c));
      const V a = splat(0.999999f), b = splat(1e-7f);
      for (int64_t i = 0; i < iters; ++i)
        for (int c = 0; c < CHAINS; ++c) acc[c] = fmadd(acc[c], a, b);
      alignas(64) float out[LANES];
      V s = acc[0];
      for (int c = 1; c < CHAINS; ++c) s = s + acc[c];
      std::memcpy(out, &s, sizeof(out));
      for (float x : out) sink[t] += x;
    }
  });
  float s = 0;
  for (float x : sink) s += x;
  TORCH_CHECK(s == s, "fma_probe: NaN");  // uses the result, so the loop is not optimized away
  return 2.0 * LANES * CHAINS * double(iters) * double(threads);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("fma_probe", &fma_probe, "FLOPs of a register-only FMA loop"); }
