// Vector traits: the few operations a kernel body needs, once per instruction set, so that a
// body written once (see cpu_adam_body.h) compiles to scalar, AVX2 and AVX-512 code.
//
// Every trait struct has the same static functions over its own register type F holding
// kWidth floats. The arithmetic ones (add, sub, mul, div, sqrt) are single IEEE operations,
// each correctly rounded, and no trait offers a fused multiply-add: a body that uses only these
// computes the same bits in every trait, whatever the width. (The translation unit that
// instantiates a body must also keep the compiler from contracting mul + add into FMA itself;
// cpu_adam.cpp says how.)
//
// Conversions: loads of bfloat16 / float16 widen exactly; stores (plain or streaming) round
// to nearest, ties to even, with the same bits as dtype.h's scalar float_to_bf16 /
// float_to_fp16 (tested for every ISA this CPU runs).
#pragma once

#include <cmath>
#include <cstdint>

#include "cpu_features.h"
#include "dtype.h"

#if ZRAY_X86_DISPATCH
// GCC 12's avx512fintrin.h trips a false -Wmaybe-uninitialized (GCC PR 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

namespace zray::simd {

// ---- portable: one float per "vector"; the compiler may auto-vectorise the loops ---------

struct Scalar {
  using F = float;
  static constexpr int64_t kWidth = 1;

  static F set1(float x) { return x; }
  static F load(const float* p) { return *p; }
  static void store(float* p, F x) { *p = x; }
  static F load_bf16(const uint16_t* p) { return bf16_to_float(*p); }
  static F load_fp16(const uint16_t* p) { return fp16_to_float(*p); }
  static void store_bf16(uint16_t* p, F x) { *p = float_to_bf16(x); }
  static void store_fp16(uint16_t* p, F x) { *p = float_to_fp16(x); }
  // No non-temporal stores here (kStreamAlign 0: never taken); see Avx2.
  static constexpr uintptr_t kStreamAlign = 0;
  static void stream_bf16(uint16_t* p, F x) { store_bf16(p, x); }
  static void stream_fp16(uint16_t* p, F x) { store_fp16(p, x); }
  static void stream_fence() {}

  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F div(F a, F b) { return a / b; }
  static F sqrt(F a) { return std::sqrt(a); }
};

#if ZRAY_X86_DISPATCH

// ---- AVX2 + F16C: 8 floats -----------------------------------------------------------------

struct Avx2 {
  using F = __m256;
  static constexpr int64_t kWidth = 8;

  ZRAY_TARGET_AVX2 static F set1(float x) { return _mm256_set1_ps(x); }
  ZRAY_TARGET_AVX2 static F load(const float* p) { return _mm256_loadu_ps(p); }
  ZRAY_TARGET_AVX2 static void store(float* p, F x) { _mm256_storeu_ps(p, x); }

  ZRAY_TARGET_AVX2 static F load_bf16(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  ZRAY_TARGET_AVX2 static F load_fp16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }

  ZRAY_TARGET_AVX2 static __m128i to_bf16(F x) {
    // float_to_bf16 on 8 lanes: bits + 0x7fff + lsb, keep the top half; nan -> 0x7fc0.
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
    const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
    // Every lane is <= 0xffff, so the saturating pack is exact. It packs within 128-bit halves
    // ([r0..3 r0..3 | r4..7 r4..7] as 64-bit words q0 q1 q2 q3), so gather q0 and q2.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xd8);
    return _mm256_castsi256_si128(packed);
  }
  ZRAY_TARGET_AVX2 static __m128i to_fp16(F x) {
    return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
  }
  ZRAY_TARGET_AVX2 static void store_bf16(uint16_t* p, F x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16(x));
  }
  ZRAY_TARGET_AVX2 static void store_fp16(uint16_t* p, F x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_fp16(x));
  }

  // Non-temporal ("streaming") stores, for the offload step's 16-bit copy: it is written once
  // and next read by a copy engine bound for the GPU, not by this CPU, so bypassing the cache
  // saves the read-for-ownership of each line it would otherwise do (2 of the 30 bytes per
  // element the step would move) and does not evict data still being read. Need
  // kStreamAlign-byte aligned addresses; weakly ordered, so stream_fence() after a run of them.
  static constexpr uintptr_t kStreamAlign = 16;
  ZRAY_TARGET_AVX2 static void stream_bf16(uint16_t* p, F x) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_bf16(x));
  }
  ZRAY_TARGET_AVX2 static void stream_fp16(uint16_t* p, F x) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_fp16(x));
  }
  ZRAY_TARGET_AVX2 static void stream_fence() { _mm_sfence(); }

  ZRAY_TARGET_AVX2 static F add(F a, F b) { return _mm256_add_ps(a, b); }
  ZRAY_TARGET_AVX2 static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  ZRAY_TARGET_AVX2 static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  ZRAY_TARGET_AVX2 static F div(F a, F b) { return _mm256_div_ps(a, b); }
  ZRAY_TARGET_AVX2 static F sqrt(F a) { return _mm256_sqrt_ps(a); }
};

// ---- AVX-512F: 16 floats (only AVX-512F instructions: Skylake-SP, Zen 4 and later) --------

struct Avx512 {
  using F = __m512;
  static constexpr int64_t kWidth = 16;

  ZRAY_TARGET_AVX512 static F set1(float x) { return _mm512_set1_ps(x); }
  ZRAY_TARGET_AVX512 static F load(const float* p) { return _mm512_loadu_ps(p); }
  ZRAY_TARGET_AVX512 static void store(float* p, F x) { _mm512_storeu_ps(p, x); }

  ZRAY_TARGET_AVX512 static F load_bf16(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  ZRAY_TARGET_AVX512 static F load_fp16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }

  ZRAY_TARGET_AVX512 static __m256i to_bf16(F x) {
    // Same arithmetic as Avx2::to_bf16; vpmovdw (AVX-512F) truncates each lane to 16 bits.
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(r);
  }
  ZRAY_TARGET_AVX512 static __m256i to_fp16(F x) {
    return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
  }
  ZRAY_TARGET_AVX512 static void store_bf16(uint16_t* p, F x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(x));
  }
  ZRAY_TARGET_AVX512 static void store_fp16(uint16_t* p, F x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_fp16(x));
  }

  // As Avx2's (a 32-byte vmovntdq, AVX; its alignment is 32).
  static constexpr uintptr_t kStreamAlign = 32;
  ZRAY_TARGET_AVX512 static void stream_bf16(uint16_t* p, F x) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bf16(x));
  }
  ZRAY_TARGET_AVX512 static void stream_fp16(uint16_t* p, F x) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_fp16(x));
  }
  ZRAY_TARGET_AVX512 static void stream_fence() { _mm_sfence(); }

  ZRAY_TARGET_AVX512 static F add(F a, F b) { return _mm512_add_ps(a, b); }
  ZRAY_TARGET_AVX512 static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  ZRAY_TARGET_AVX512 static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  ZRAY_TARGET_AVX512 static F div(F a, F b) { return _mm512_div_ps(a, b); }
  ZRAY_TARGET_AVX512 static F sqrt(F a) { return _mm512_sqrt_ps(a); }
};

#endif  // ZRAY_X86_DISPATCH

}  // namespace zray::simd
