// Element types the kernels accept, as the integer codes Python passes, and scalar conversions
// between them and float (exact widening; round-to-nearest-even narrowing) used by the portable
// kernel bodies and by norm.cpp's SIMD tails.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace zray {

// The codes are part of the Python <-> C++ contract; bindings.cpp exports them as
// `zray._C.DTYPE_CODES` so Python never hard-codes them.
enum class DType : int {
  kFloat32 = 0,
  kBFloat16 = 1,
  kFloat16 = 2,
};

inline DType dtype_from_code(int code) {
  switch (code) {
    case 0:
      return DType::kFloat32;
    case 1:
      return DType::kBFloat16;
    case 2:
      return DType::kFloat16;
  }
  throw std::invalid_argument("dtype: got code " + std::to_string(code) +
                              "; allowed: 0 (float32), 1 (bfloat16), 2 (float16)");
}

inline int64_t element_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);  // the defined way to reinterpret bits; compiles to a move
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// bfloat16 is the top half of a float32, so widening is a 16-bit shift and exact.
inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// float32 -> bfloat16, rounded to nearest, ties to even: the same bits as torch's
// `tensor.to(torch.bfloat16)` for every non-nan input (finite values that round past the
// largest bfloat16 become +-inf). Adding 0x7fff plus the lowest kept bit carries into the kept
// half exactly when the dropped half is above one half, or equal to it with the kept half odd.
// nan -> 0x7fc0 (a quiet nan; c10's scalar conversion gives the same, its AVX2 path 0xffff).
inline uint16_t float_to_bf16(float f) {
  if (f != f) return 0x7fc0;
  const uint32_t bits = float_to_bits(f);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// float32 -> IEEE binary16, rounded to nearest, ties to even, with subnormals, overflow to
// +-inf and nan (sign kept, 0x7e00 payload): bit-identical to F16C `vcvtps2ph` with
// _MM_FROUND_TO_NEAREST_INT, which the SIMD bodies use, and to torch's `.to(torch.float16)`.
// The algorithm is the FP16 library's (Marat Dukhan), which c10::Half also uses: the float
// additions below do the rounding in hardware, so no rounding logic is written out by hand.
inline uint16_t float_to_fp16(float f) {
  // |f| * 2^112 * 2^-110 brings values that overflow binary16 to inf and keeps the others.
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_to_bits(f);
  const uint32_t shl1_w = w + w;  // the sign shifted out
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xff000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;  // below binary16's normal range: subnormal
  // Adding 2^(e+13)-ish rounds away exactly the mantissa bits binary16 cannot hold.
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007c00u;
  const uint32_t mantissa_bits = bits & 0x00000fffu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign));
}

// IEEE binary16 -> binary32, exact for every input (normals, subnormals, +-0, +-inf, nan).
// The SIMD bodies use F16C / AVX-512 `vcvtph2ps`, which computes the same values.
inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // inf, nan
  if (exponent == 0) {
    // Zero or subnormal: value = mantissa * 2^-24, exactly representable in float32.
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return sign ? -magnitude : magnitude;
  }
  // Normal: rebias the exponent from 15 to 127 and widen the mantissa from 10 to 23 bits.
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

}  // namespace zray
