// AVX2 + FMA + F16C copy of the matmul kernels (the build's baseline flags).
#define SPECEDIT_ISA_NS avx2
#include "linear_kernel.h"
