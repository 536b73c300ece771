// adam_step: per-call scalars, dispatch to the scalar / AVX2 / AVX-512 body, OpenMP chunks.
//
// [Note: no FMA contraction in this file]
// The bodies promise the same bits on every ISA (cpu_adam.h). GCC contracts a*b + c into one
// fused multiply-add whenever the target has FMA (here: the AVX-512 body; on aarch64, the
// scalar one) unless told not to, even in -std=c++17 mode and even across separate
// _mm512_mul_ps / _mm512_add_ps intrinsics. That would round once where the other bodies round
// twice. The pragma below (before every include, so it covers every inlined helper) turns
// contraction off for this translation unit only; norm.cpp is unaffected. FMA would buy no
// speed anyway: the step moves 28 bytes per ~12 flops and waits on memory, not on arithmetic.
// no-math-errno lets the scalar body's sqrt vectorise (errno is never read here, and sqrt's
// argument is >= 0 or nan).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off", "no-math-errno")
#endif

#include "cpu_adam.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "parallel.h"
#include "simd.h"

#ifdef __FAST_MATH__
#error "cpu_adam.cpp must round every operation as IEEE says: do not build with -ffast-math"
#endif

namespace zray {
namespace {

// Which weight decay a call applies; kNone also when weight_decay == 0 (as torch skips it).
enum class Decay : int { kNone, kDecoupled, kL2 };
// Whether and in which 16-bit type the updated parameter is also written out.
enum class Out : int { kNone, kBFloat16, kFloat16 };

// The float32 scalars of one call. Each is computed in double from the hyperparameters and
// rounded to float32 once, as torch does when it passes a Python float to a float32 kernel.
struct AdamCoeffs {
  float grad_scale;             // gradient multiplier (unscale x clip x 1/world, the caller's)
  float decay_factor;           // 1 - lr * wd (AdamW)
  float weight_decay;           // wd (Adam, L2)
  float lerp_weight;            // w = 1 - beta1
  float one_minus_lerp_weight;  // 1 - w, in float32 as torch's lerp computes it
  bool lerp_from_grad;          // !(|w| < 0.5): torch's lerp then works from the far end
  float beta2;
  float one_minus_beta2;
  float bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  float eps;
  float neg_step_size;          // -(lr / (1 - beta1^t))
};

using SpanFn = void (*)(const AdamBuffers&, int64_t, int64_t, const AdamCoeffs&);

// ---- the one body, compiled three times (see cpu_adam_body.h) ------------------------------

namespace scalar_body {
using V = simd::Scalar;
#define ZRAY_BODY_TARGET
#include "cpu_adam_body.h"
#undef ZRAY_BODY_TARGET
}  // namespace scalar_body

#if ZRAY_X86_DISPATCH
namespace avx2_body {
using V = simd::Avx2;
#define ZRAY_BODY_TARGET ZRAY_TARGET_AVX2
#include "cpu_adam_body.h"
#undef ZRAY_BODY_TARGET
}  // namespace avx2_body

namespace avx512_body {
using V = simd::Avx512;
#define ZRAY_BODY_TARGET ZRAY_TARGET_AVX512
#include "cpu_adam_body.h"
#undef ZRAY_BODY_TARGET
}  // namespace avx512_body
#endif

SpanFn span_fn(Isa isa, DType grad, Out out, Decay decay) {
  switch (isa) {
#if ZRAY_X86_DISPATCH
    case Isa::kAvx512:
      return avx512_body::select_span(grad, out, decay);
    case Isa::kAvx2:
      return avx2_body::select_span(grad, out, decay);
#endif
    default:
      return scalar_body::select_span(grad, out, decay);
  }
}

AdamCoeffs coefficients(const AdamHyper& h) {
  // Bias corrections in double, once per call (torch: Python floats from step.item()).
  const double bias_correction1 = 1.0 - std::pow(h.beta1, h.step);
  const double bias_correction2 = 1.0 - std::pow(h.beta2, h.step);
  AdamCoeffs c{};
  c.grad_scale = h.grad_scale;
  c.decay_factor = static_cast<float>(1.0 - h.lr * h.weight_decay);
  c.weight_decay = static_cast<float>(h.weight_decay);
  c.lerp_weight = static_cast<float>(1.0 - h.beta1);
  c.one_minus_lerp_weight = 1.0f - c.lerp_weight;
  c.lerp_from_grad = !(std::fabs(c.lerp_weight) < 0.5f);
  c.beta2 = static_cast<float>(h.beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  c.bias_correction2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
  c.eps = static_cast<float>(h.eps);
  c.neg_step_size = static_cast<float>(-(h.lr / bias_correction1));
  return c;
}

void check_pointer(const void* p, const char* name) {
  if (p == nullptr) {
    throw std::invalid_argument(std::string(name) + ": got a null pointer with numel > 0");
  }
}

}  // namespace

void adam_step(const AdamBuffers& buffers, int64_t numel, DType grad_dtype, DType out_dtype,
               const AdamHyper& hyper, Isa isa, int num_threads) {
  if (numel < 0) {
    throw std::invalid_argument("numel: got " + std::to_string(numel) + "; must be >= 0");
  }
  if (!(hyper.step >= 1.0)) {  // also rejects nan; step 0 would divide by 1 - beta1^0 = 0
    throw std::invalid_argument("step: got " + std::to_string(hyper.step) +
                                "; must be >= 1 (the count after incrementing)");
  }
  Out out = Out::kNone;
  if (buffers.out != nullptr) {
    if (out_dtype == DType::kFloat32) {
      throw std::invalid_argument(
          "out_dtype: got float32; allowed: bfloat16, float16 (param already is the float32)");
    }
    out = out_dtype == DType::kBFloat16 ? Out::kBFloat16 : Out::kFloat16;
  }
  if (numel == 0) return;
  check_pointer(buffers.param, "param");
  check_pointer(buffers.grad, "grad");
  check_pointer(buffers.exp_avg, "exp_avg");
  check_pointer(buffers.exp_avg_sq, "exp_avg_sq");

  Decay decay = Decay::kNone;
  if (hyper.weight_decay != 0.0) decay = hyper.adamw ? Decay::kDecoupled : Decay::kL2;
  const SpanFn fn = span_fn(isa, grad_dtype, out, decay);
  const AdamCoeffs coeffs = coefficients(hyper);

  const int64_t nchunks = (numel + kAdamChunk - 1) / kAdamChunk;
  if (nchunks == 1) {
    fn(buffers, 0, numel, coeffs);  // below 64K elements a thread team costs more than it saves
    return;
  }
  const int threads = resolve_threads(num_threads, nchunks);
#ifdef _OPENMP
  // static: each thread takes one contiguous run of chunks, so the hardware prefetchers see
  // long sequential streams. Elementwise work: the result is the same for any split.
#pragma omp parallel for schedule(static) num_threads(threads)
#else
  (void)threads;
#endif
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t begin = c * kAdamChunk;
    fn(buffers, begin, std::min(begin + kAdamChunk, numel), coeffs);
  }
}

}  // namespace zray
