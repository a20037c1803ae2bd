// Codes shared by the C++ kernels and Python (which reads them from the extension: DTYPE_CODES, ISA_CODES).
#pragma once

namespace specedit_cpu {

// Storage of a packed weight (see specedit.kernels.cpu.linear.pack_weight).
enum WeightDtype : int { W_F32 = 0, W_F16 = 1, W_BF16 = 2, W_I8 = 3, W_NUM_DTYPES };

// Instruction set of a kernel call: ISA_AUTO resolves to the best one this CPU runs.
enum IsaCode : int { ISA_AUTO = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

}  // namespace specedit_cpu
