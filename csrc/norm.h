// Sum of squares and non-finite detection over one flat buffer: the building block of global
// gradient-norm clipping and of the fp16 overflow check (one read of the gradients, not two).
#pragma once

#include <cstdint>

#include "cpu_features.h"
#include "dtype.h"

namespace zray {

struct SumSqResult {
  double sumsq;    // sum of x*x in float64; inf or nan when the buffer holds inf or nan
  bool nonfinite;  // true iff some element is +-inf or nan
};

// Elements are reduced in chunks of this many (a multiple of kSumSqLanes); chunk partial sums
// are added in chunk order, so the result does not depend on the thread count.
constexpr int64_t kSumSqChunk = int64_t{1} << 16;
// Each chunk is accumulated in this many float64 lanes (element i goes to lane i % 32) and the
// lanes are combined by one fixed pairwise tree, identical in the scalar, AVX2 and AVX-512
// bodies, so every ISA returns bit-identical results.
constexpr int64_t kSumSqLanes = 32;

// `data` points at `numel` contiguous elements of `dtype` (element-aligned, as torch storage
// is). Reads the buffer once; runs on up to `num_threads` OpenMP threads (0: OpenMP default).
// Throws std::invalid_argument for a negative numel or a null pointer with numel > 0.
SumSqResult sumsq_nonfinite(const void* data, int64_t numel, DType dtype, Isa isa,
                            int num_threads);

}  // namespace zray
