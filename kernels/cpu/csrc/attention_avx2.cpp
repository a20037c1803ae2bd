// AVX2 + FMA instance of the attention kernel (the build passes -mavx2 -mfma -mf16c).
#define SPECEDIT_ISA_NS avx2
#include "attention_kernel.h"
