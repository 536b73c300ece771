// sumsq_nonfinite: scalar, AVX2 and AVX-512 bodies of one algorithm.
//
// [Note: why float64 and why no separate isfinite pass]
// Every float32, bfloat16 and float16 value x is exactly representable in float64 and so is
// x*x (at most 2*24 = 48 significant bits <= 53; exponents stay within float64's range). So:
//   * each term is exact; only the additions round (relative error ~ log2(n) * 2^-53 for the
//     pairwise lane tree, ~ n_chunks * 2^-53 for the chunk sum): far inside 1e-6;
//   * FMA and separate multiply + add give the same bits, so the bodies agree bit for bit;
//   * a finite buffer can never overflow (n * (3.4e38)^2 < 1.8e308 for n < 1e231), so the sum is
//     non-finite exactly when some element is inf or nan: `!isfinite(sum)` is the detection and
//     costs no extra compare per element.
// The last point needs IEEE inf/nan semantics, hence the -ffast-math guard below.

#include "norm.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "parallel.h"

#if ZRAY_X86_DISPATCH
// GCC 12's avx512fintrin.h trips a false -Wmaybe-uninitialized (GCC PR 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#ifdef __FAST_MATH__
#error "norm.cpp relies on IEEE inf/nan propagation: do not build zray._C with -ffast-math"
#endif

namespace zray {
namespace {

constexpr int64_t kLanes = kSumSqLanes;
static_assert(kSumSqChunk % kLanes == 0, "chunks must start on a lane boundary");

// Loads element i and widens it to double (exact, see the note above).
template <DType D>
inline double load_double(const void* p, int64_t i) {
  if constexpr (D == DType::kFloat32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (D == DType::kBFloat16) {
    return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  } else {
    return fp16_to_float(static_cast<const uint16_t*>(p)[i]);
  }
}

// Shared by every body: add the tail (elements [start, n), fewer than kLanes) into lanes 0..,
// then combine the 32 lanes by a fixed pairwise tree. Returns the chunk's sum of squares.
template <DType D>
inline double finish_lanes(double* lanes, const void* p, int64_t start, int64_t n) {
  for (int64_t j = 0; start + j < n; ++j) {
    const double x = load_double<D>(p, start + j);
    lanes[j] += x * x;
  }
  for (int64_t width = kLanes / 2; width >= 1; width /= 2) {
    for (int64_t j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  return lanes[0];
}

// ---- portable body ----------------------------------------------------------------------

template <DType D>
double chunk_scalar(const void* p, int64_t n) {
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const double x = load_double<D>(p, i + j);
      lanes[j] += x * x;
    }
  }
  return finish_lanes<D>(lanes, p, i, n);
}

#if ZRAY_X86_DISPATCH

// ---- AVX2 + F16C body: 8 accumulators x 4 doubles = 32 lanes ------------------------------

// Elements i..i+7 as two vectors of doubles (lo: i..i+3, hi: i+4..i+7).
template <DType D>
ZRAY_TARGET_AVX2 inline void load8_avx2(const void* p, int64_t i, __m256d& lo, __m256d& hi) {
  __m256 v;
  if constexpr (D == DType::kFloat32) {
    v = _mm256_loadu_ps(static_cast<const float*>(p) + i);
  } else {
    const __m128i h =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    if constexpr (D == DType::kBFloat16) {
      v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
      v = _mm256_cvtph_ps(h);
    }
  }
  lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
  hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
}

template <DType D>
ZRAY_TARGET_AVX2 double chunk_avx2(const void* p, int64_t n) {
  __m256d acc[8];  // acc[k] holds lanes 4k..4k+3
  for (auto& a : acc) a = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < 4; ++k) {
      __m256d lo, hi;
      load8_avx2<D>(p, i + 8 * k, lo, hi);
      // mul + add, not FMA: the product is exact either way and this body then needs no FMA.
      acc[2 * k] = _mm256_add_pd(acc[2 * k], _mm256_mul_pd(lo, lo));
      acc[2 * k + 1] = _mm256_add_pd(acc[2 * k + 1], _mm256_mul_pd(hi, hi));
    }
  }
  double lanes[kLanes];
  for (int k = 0; k < 8; ++k) _mm256_storeu_pd(lanes + 4 * k, acc[k]);
  return finish_lanes<D>(lanes, p, i, n);
}

// ---- AVX-512F body: 4 accumulators x 8 doubles = 32 lanes ---------------------------------

// Elements i..i+15 as two vectors of doubles (lo: i..i+7, hi: i+8..i+15).
template <DType D>
ZRAY_TARGET_AVX512 inline void load16_avx512(const void* p, int64_t i, __m512d& lo, __m512d& hi) {
  __m512 v;
  if constexpr (D == DType::kFloat32) {
    v = _mm512_loadu_ps(static_cast<const float*>(p) + i);
  } else {
    const __m256i h =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
    if constexpr (D == DType::kBFloat16) {
      v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      v = _mm512_cvtph_ps(h);
    }
  }
  lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  // extractf64x4 (AVX-512F) rather than extractf32x8, which would need AVX-512DQ.
  hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

template <DType D>
ZRAY_TARGET_AVX512 double chunk_avx512(const void* p, int64_t n) {
  __m512d acc[4];  // acc[k] holds lanes 8k..8k+7
  for (auto& a : acc) a = _mm512_setzero_pd();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < 2; ++k) {
      __m512d lo, hi;
      load16_avx512<D>(p, i + 16 * k, lo, hi);
      acc[2 * k] = _mm512_fmadd_pd(lo, lo, acc[2 * k]);
      acc[2 * k + 1] = _mm512_fmadd_pd(hi, hi, acc[2 * k + 1]);
    }
  }
  double lanes[kLanes];
  for (int k = 0; k < 4; ++k) _mm512_storeu_pd(lanes + 8 * k, acc[k]);
  return finish_lanes<D>(lanes, p, i, n);
}

#endif  // ZRAY_X86_DISPATCH

using ChunkFn = double (*)(const void*, int64_t);

template <DType D>
ChunkFn chunk_fn_for(Isa isa) {
  switch (isa) {
#if ZRAY_X86_DISPATCH
    case Isa::kAvx512:
      return &chunk_avx512<D>;
    case Isa::kAvx2:
      return &chunk_avx2<D>;
#endif
    default:
      return &chunk_scalar<D>;
  }
}

ChunkFn chunk_fn(DType dtype, Isa isa) {
  switch (dtype) {
    case DType::kFloat32:
      return chunk_fn_for<DType::kFloat32>(isa);
    case DType::kBFloat16:
      return chunk_fn_for<DType::kBFloat16>(isa);
    case DType::kFloat16:
      return chunk_fn_for<DType::kFloat16>(isa);
  }
  throw std::invalid_argument("dtype: unknown");
}

}  // namespace

SumSqResult sumsq_nonfinite(const void* data, int64_t numel, DType dtype, Isa isa,
                            int num_threads) {
  if (numel < 0) {
    throw std::invalid_argument("numel: got " + std::to_string(numel) + "; must be >= 0");
  }
  if (numel == 0) return {0.0, false};
  if (data == nullptr) throw std::invalid_argument("ptr: got a null pointer with numel > 0");

  const ChunkFn fn = chunk_fn(dtype, isa);
  const int64_t nchunks = (numel + kSumSqChunk - 1) / kSumSqChunk;
  double total = 0.0;
  if (nchunks == 1) {
    total = fn(data, numel);  // below 64K elements a thread team costs more than it saves
  } else {
    const auto* bytes = static_cast<const char*>(data);
    const int64_t esize = element_size(dtype);
    std::vector<double> partial(static_cast<size_t>(nchunks));  // 8 bytes per 64K elements
    const int threads = resolve_threads(num_threads, nchunks);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#else
    (void)threads;
#endif
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t begin = c * kSumSqChunk;
      const int64_t len = std::min(kSumSqChunk, numel - begin);
      partial[static_cast<size_t>(c)] = fn(bytes + begin * esize, len);
    }
    for (double s : partial) total += s;  // fixed order: same bits for any thread count
  }
  return {total, !std::isfinite(total)};
}

}  // namespace zray
