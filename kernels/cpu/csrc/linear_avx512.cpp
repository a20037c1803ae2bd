// AVX-512 instance of the kernel (F, BW, VL and VNNI: the int8 kernel's byte ops and vpdpbusd), used only when
// the CPU reports all four at run time (bindings.cpp, has_avx512). The pragma must
// come before any include (see linear_kernel.h for why nothing else is included).
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
#define SPECEDIT_ISA_NS avx512
#define SPECEDIT_AVX512 1
#include "linear_kernel.h"
