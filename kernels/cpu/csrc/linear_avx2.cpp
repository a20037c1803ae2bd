// AVX2 + FMA + F16C instance of the kernel (the build passes -mavx2 -mfma -mf16c).
#define SPECEDIT_ISA_NS avx2
#include "linear_kernel.h"
