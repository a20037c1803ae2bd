"""CPU kernels in a C++ extension (csrc/, built on first use): the packed small-M matmul (linear), the
row-invariant attention over the KV cache (attention) and every decoder layer in one call (decoder). Each output
row is bit-identical whatever the number of rows, the thread count or the instruction set (AVX2 or AVX-512)."""
