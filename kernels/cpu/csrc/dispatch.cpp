// The instruction-set resolution of dispatch.h.
#include "dispatch.h"

#include <cstdlib>
#include <string>

namespace specedit_cpu {
namespace {

bool has_avx512() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }();
  return yes;
}

int64_t auto_isa() {
  static const int64_t isa = [] {
    const char* env = std::getenv("SPECEDIT_ISA");
    const bool avx2 = env != nullptr && std::string(env) == "avx2";
    return (int64_t)(has_avx512() && !avx2 ? ISA_AVX512 : ISA_AVX2);
  }();
  return isa;
}

}  // namespace

int64_t resolve_isa(int64_t isa) {
  if (isa == ISA_AUTO) return auto_isa();
  if (isa == ISA_AVX2 || (isa == ISA_AVX512 && has_avx512())) return isa;
  return -1;
}

}  // namespace specedit_cpu
