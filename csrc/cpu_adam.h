// Adam / AdamW step over flat float32 buffers on the CPU, and its fused ZeRO-Offload form.
//
// One call reads each element of (grad, param, exp_avg, exp_avg_sq) once and writes (param,
// exp_avg, exp_avg_sq) and, optionally, a bfloat16 / float16 copy of the updated parameter once:
// 28 bytes per element for a float32 gradient, 28 also for a 16-bit gradient with a 16-bit copy
// out (written with streaming stores when aligned, so the CPU does not first read the lines it
// overwrites). That single pass is the point: the step is bound by memory bandwidth, and the
// unfused sequence (widen the gradient, scale it, step, narrow the parameter) moves 44-48.
//
// The arithmetic is torch.optim.Adam / AdamW's (single-tensor, non-capturable), operation for
// operation, in float32 with per-call scalars computed in double:
//   g  = grad * grad_scale                       (grad widened exactly from bf16 / fp16)
//   AdamW (decoupled), wd != 0:   p = p * (1 - lr * wd)
//   Adam  (L2),        wd != 0:   g = g + p * wd
//   m  = lerp(m, g, 1 - beta1)                   (torch's two-sided lerp formula)
//   v  = v * beta2 + ((1 - beta2) * g) * g
//   p  = p + (-(lr / bc1) * m) / (sqrt(v) / sqrt(bc2) + eps),  bc_i = 1 - beta_i^step
//   out = round_to_nearest_even(p)               (optional bf16 / fp16 copy)
// Each operation is one correctly rounded float32 operation, with no fused multiply-add, so the
// scalar, AVX2 and AVX-512 bodies give the same bits (see simd.h). Against torch itself the
// difference is a few float32 ulps: torch's CPU kernels may use FMA for lerp and addcmul.
#pragma once

#include <cstdint>

#include "cpu_features.h"
#include "dtype.h"

namespace zray {

// Elements per unit of work for the OpenMP threads (a multiple of every vector width, so only
// the last chunk has a ragged tail). 64K elements = 1.75 MB of traffic: large enough that the
// scheduling cost is noise, small enough that 2-128 threads all get balanced shares.
constexpr int64_t kAdamChunk = int64_t{1} << 16;

// Hyperparameters of one step, as the Python side passes them (doubles, like torch's).
struct AdamHyper {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool adamw;         // true: decoupled decay (AdamW); false: L2 decay added to the gradient
  double step;        // the step count t after incrementing (1 for the first step); >= 1
  float grad_scale;   // every gradient element is multiplied by this first (1: no scaling)
};

// The buffers of one step: `numel` contiguous elements each, element-aligned, no overlap.
struct AdamBuffers {
  float* param;           // float32 master parameter, updated in place
  const void* grad;       // gradient in `grad_dtype`; read only
  float* exp_avg;         // float32 first moment, updated in place
  float* exp_avg_sq;      // float32 second moment, updated in place
  void* out;              // nullptr, or where the bf16 / fp16 copy of the new param goes
};

// One Adam step. `grad_dtype` is any DType; `out_dtype` must be kBFloat16 or kFloat16 when
// `buffers.out` is set (ignored otherwise). Runs on up to `num_threads` OpenMP threads (0: the
// OpenMP default); the result does not depend on the thread count or (see above) the ISA.
// Throws std::invalid_argument naming the bad value (negative numel, null pointer, step < 1,
// float32 out dtype).
void adam_step(const AdamBuffers& buffers, int64_t numel, DType grad_dtype, DType out_dtype,
               const AdamHyper& hyper, Isa isa, int num_threads);

}  // namespace zray
