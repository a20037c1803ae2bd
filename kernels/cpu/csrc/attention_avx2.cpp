// AVX2 + FMA copy of the attention kernel (the build's baseline flags).
#define SPECEDIT_ISA_NS avx2
#include "attention_kernel.h"
