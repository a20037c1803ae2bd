// Codes shared by the C++ kernels and Python (which reads them from the extension: DTYPE_CODES, ISA_CODES).
#pragma once

namespace specedit_cpu {

// Storage of a packed weight (see specedit.kernels.cpu.linear). W_F32..W_BF16: one value per weight, packed by
// pack_weight(). W_Q8_0..W_Q6_K: GGUF's block formats of the same names, repacked once by repack() (quant.h:
// the quantized bytes kept, 32 output columns side by side) and dequantized in registers to the float32 values
// gguf's own dequantize() gives. W_I8_Q8_0..W_I8_Q6_K: the same blocks repacked for integer dot products
// (compute="int8": quant.h's int8 layout, int8_kernel.h), each W_I8_<T> = W_<T> + I8_SHIFT.
enum WeightDtype : int {
  W_F32 = 0, W_F16 = 1, W_BF16 = 2,
  W_Q8_0 = 3, W_Q4_0 = 4, W_Q4_1 = 5, W_Q5_0 = 6, W_Q5_1 = 7, W_Q4_K = 8, W_Q5_K = 9, W_Q6_K = 10,
  W_I8_Q8_0 = 11, W_I8_Q4_0 = 12, W_I8_Q4_1 = 13, W_I8_Q5_0 = 14, W_I8_Q5_1 = 15, W_I8_Q4_K = 16, W_I8_Q5_K = 17,
  W_I8_Q6_K = 18,
  W_NUM_DTYPES
};
constexpr int I8_SHIFT = W_I8_Q8_0 - W_Q8_0;

// Instruction set of a kernel call: ISA_AUTO resolves to the best one this CPU runs.
enum IsaCode : int { ISA_AUTO = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

}  // namespace specedit_cpu
