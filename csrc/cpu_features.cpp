#include "cpu_features.h"

#include <algorithm>
#include <stdexcept>

namespace zray {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512f";
  }
  return "unknown";
}

std::vector<Isa> compiled_isas() {
#if ZRAY_X86_DISPATCH
  return {Isa::kScalar, Isa::kAvx2, Isa::kAvx512};
#else
  return {Isa::kScalar};
#endif
}

static bool cpu_supports(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return true;
#if ZRAY_X86_DISPATCH
    // __builtin_cpu_supports also checks that the OS saves the wide registers (XGETBV): a VM
    // or OS that leaves AVX-512 state disabled reports no AVX-512 even on a capable CPU.
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2");
#else
    default:
      return false;
#endif
  }
  return false;
}

const std::vector<Isa>& supported_isas() {
  // Probed once: CPUID does not change while the process runs, and kernels ask on every call.
  static const std::vector<Isa> supported = [] {
#if ZRAY_X86_DISPATCH
    __builtin_cpu_init();  // idempotent; makes the CPUID data valid even before constructors ran
#endif
    std::vector<Isa> out;
    for (Isa isa : compiled_isas()) {
      if (cpu_supports(isa)) out.push_back(isa);
    }
    return out;
  }();
  return supported;
}

Isa best_isa() {
  return supported_isas().back();  // never empty: scalar is always supported
}

static std::string join_names(const std::vector<Isa>& isas) {
  std::string out = "auto";
  for (Isa isa : isas) out += std::string(", ") + isa_name(isa);
  return out;
}

Isa resolve_isa(const std::string& name) {
  if (name == "auto") return best_isa();
  const std::vector<Isa>& supported = supported_isas();
  for (Isa isa : compiled_isas()) {
    if (name != isa_name(isa)) continue;
    if (std::find(supported.begin(), supported.end(), isa) == supported.end()) {
      throw std::invalid_argument("isa: got '" + name +
                                  "', which this CPU does not support; supported here: " +
                                  join_names(supported));
    }
    return isa;
  }
  throw std::invalid_argument("isa: got '" + name + "'; allowed: " + join_names(compiled_isas()));
}

}  // namespace zray
