// AVX-512 instance of the kernel, used only when the CPU reports avx512f at run time. The pragma must
// come before any include (see linear_kernel.h for why nothing else is included).
#pragma GCC target("avx512f,avx2,fma,f16c")
#define SPECEDIT_ISA_NS avx512
#define SPECEDIT_AVX512 1
#include "linear_kernel.h"
