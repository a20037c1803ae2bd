// Which copy of a kernel runs: the instruction set, resolved once per process, and one stub per kernel entry
// point holding its AVX2 and AVX-512 copies (the idea of PyTorch's DispatchStub).
//
// Declarations and plain structs only (no inline function): the per-ISA units include this header to define
// their stub pointers, and an inline function compiled there for AVX-512 could be merged (ODR) with the copy
// other units run on any CPU. kernel<Stub>() below is a template that only the baseline units instantiate.
#pragma once
#include <stdint.h>

#include "attention.h"
#include "codes.h"
#include "quant.h"

namespace specedit_cpu {

// A stub per entry point. Each per-ISA unit defines its own pointer as a constant initialized with the address
// of its copy (linear_kernel.h, attention_kernel.h): filled in by the loader, no code runs at load time, so a
// CPU without AVX-512 never executes an instruction of the AVX-512 units.

// Columns [col0, col1) of y[M, ldy] = x[M, K] @ W^T for one part of a packed weight (linear_kernel.h).
struct LinearCols {
  using Fn = void(const float* x, const QRows* xq, int64_t M, int64_t K, const void* w, int dtype, float* y,
                  int64_t ldy, int64_t col0, int64_t col1);
  static Fn* const avx2;
  static Fn* const avx512;
};

// Partials of a tile of query rows over one key block (attention_kernel.h).
struct AttnBlock {
  using Fn = void(const AttnProblem& P, int64_t b, int64_t g, int64_t t0, int64_t t1, int64_t blk, float* scratch);
  static Fn* const avx2;
  static Fn* const avx512;
};

// A tile's rows from the partials of every block they see (attention_kernel.h).
struct AttnCombine {
  using Fn = void(const AttnProblem& P, int64_t b, int64_t g, int64_t t0, int64_t t1, float* scratch);
  static Fn* const avx2;
  static Fn* const avx512;
};

// An IsaCode (codes.h) -> the instruction set to run, ISA_AVX2 or ISA_AVX512; -1 when this CPU cannot run it
// (ISA_AVX512 without AVX-512, or an unknown code). ISA_AUTO is AVX-512 where the CPU has F, BW, VL and VNNI
// (what the AVX-512 units are compiled for, simd.h), else AVX2; $SPECEDIT_ISA=avx2 makes it AVX2, so a whole
// run takes the path an AVX2-only machine takes (build.py checks the variable's value when it loads the
// extension). Both are read once, at the first call.
int64_t resolve_isa(int64_t isa);

// The copy of Stub's entry point to call for a resolved instruction set (ISA_AVX2 or ISA_AVX512).
template <class Stub>
typename Stub::Fn* kernel(int64_t isa) {
  return isa == ISA_AVX512 ? Stub::avx512 : Stub::avx2;
}

}  // namespace specedit_cpu
