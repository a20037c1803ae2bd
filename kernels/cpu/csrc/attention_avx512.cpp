// AVX-512 copy of the attention kernel, run only on a CPU with the AVX-512 features simd.h compiles for
// (dispatch.h). SPECEDIT_AVX512 must come before any include (simd.h).
#define SPECEDIT_AVX512 1
#define SPECEDIT_ISA_NS avx512
#include "attention_kernel.h"
