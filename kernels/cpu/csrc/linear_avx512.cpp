// AVX-512 copy of the matmul kernels (F, BW, VL and VNNI: the int8 kernel's byte ops and vpdpbusd), run only on a
// CPU that reports all four (dispatch.h). SPECEDIT_AVX512 must come before any include (simd.h).
#define SPECEDIT_AVX512 1
#define SPECEDIT_ISA_NS avx512
#include "linear_kernel.h"
