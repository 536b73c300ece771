// Instruction sets zray's kernels are compiled for, and the one chosen on this CPU.
//
// Why per-function target attributes and not -march=native: a wheel built here may run on a
// CPU without AVX-512, so the extension is compiled for baseline x86-64 and only the kernel
// bodies marked ZRAY_TARGET_AVX2 / ZRAY_TARGET_AVX512 use wider instructions. Which body runs
// is decided once per process from CPUID (`best_isa`), or forced per call (tests compare them).
#pragma once

#include <string>
#include <vector>

// Dispatch needs GCC/Clang's `target` attribute and `__builtin_cpu_supports` on x86; every
// other compiler or architecture gets the portable scalar bodies only.
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define ZRAY_X86_DISPATCH 1
#define ZRAY_TARGET_AVX2 __attribute__((target("avx2,f16c")))
#define ZRAY_TARGET_AVX512 __attribute__((target("avx512f")))
#else
#define ZRAY_X86_DISPATCH 0
#endif

namespace zray {

// Ordered from least to most capable; `best_isa` picks the last one the CPU supports.
enum class Isa : int {
  kScalar = 0,  // portable C++ (auto-vectorised for baseline SSE2 on x86-64)
  kAvx2 = 1,    // AVX2 + F16C (Haswell and later, Zen)
  kAvx512 = 2,  // AVX-512F (Skylake-SP and later, Zen 4)
};

const char* isa_name(Isa isa);

// ISAs this build carries code for (a property of the compiler and target, not of the CPU).
std::vector<Isa> compiled_isas();

// Compiled-in ISAs that this CPU and OS can run (CPUID + XGETBV, via __builtin_cpu_supports);
// probed once per process, then cached.
const std::vector<Isa>& supported_isas();

// The most capable supported ISA.
Isa best_isa();

// "auto" -> best_isa(); "scalar" / "avx2" / "avx512f" -> that ISA if supported.
// Throws std::invalid_argument (Python: ValueError) naming the value and what is allowed.
Isa resolve_isa(const std::string& name);

}  // namespace zray
