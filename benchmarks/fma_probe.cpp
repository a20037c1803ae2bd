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

// The integer counterpart for compute="int8": u8 x s8 dot products of 4 into int32 lanes on registers, the way
// the int8 kernel multiplies (AVX-512 VNNI vpdpbusd; else AVX2 pmaddubsw + pmaddwd + add). Returns the ops
// done (2 per multiply-add, as FLOPs count them).
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
using VI = __m512i;
static inline VI dot4(VI acc, VI a, VI b) { return _mm512_dpbusd_epi32(acc, a, b); }
static inline VI isplat(int x) { return _mm512_set1_epi32(x); }
#else
using VI = __m256i;
static inline VI dot4(VI acc, VI a, VI b) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
}
static inline VI isplat(int x) { return _mm256_set1_epi32(x); }
#endif

static double int8_probe(int64_t iters) {
  const int64_t threads = at::get_num_threads();
  std::vector<int> sink(threads, 0);
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      VI acc[CHAINS];
      for (int c = 0; c < CHAINS; ++c) acc[c] = isplat(c);
      const VI a = isplat(0x01020304), b = isplat(0x01ff01ff);
      for (int64_t i = 0; i < iters; ++i)
        for (int c = 0; c < CHAINS; ++c) acc[c] = dot4(acc[c], a, b);
      alignas(64) int out[sizeof(VI) / 4];
      std::memcpy(out, &acc[CHAINS - 1], sizeof(out));
      for (int c = 0; c < CHAINS - 1; ++c) {
        alignas(64) int o2[sizeof(VI) / 4];
        std::memcpy(o2, &acc[c], sizeof(o2));
        for (size_t j = 0; j < sizeof(VI) / 4; ++j) out[j] += o2[j];
      }
      for (int x : out) sink[t] += x;
    }
  });
  int s = 0;
  for (int x : sink) s += x;
  TORCH_CHECK(s != 0x7fffffff, "int8_probe");  // uses the result
  return 2.0 * (sizeof(VI) / 4) * 4 * CHAINS * double(iters) * double(threads);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fma_probe", &fma_probe, "FLOPs of a register-only FMA loop");
  m.def("int8_probe", &int8_probe, "int8 multiply-add ops (x2) of a register-only dot-product loop");
}
