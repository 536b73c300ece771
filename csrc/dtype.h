// Element types the kernels accept, as the integer codes Python passes, and exact scalar
// conversions to float used by the portable kernel bodies and by the SIMD bodies' tails.
#pragma once

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

// bfloat16 is the top half of a float32, so widening is a 16-bit shift and exact.
inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

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
