// The pybind11 module `zray._C`. It never sees a torch header: Python passes
// `tensor.data_ptr()` (an int), the element count and a dtype code, so the extension builds in
// seconds and does not depend on the installed torch's C++ ABI. The Python side
// (zray/ops/*.py) checks device, dtype and contiguity and keeps the tensor alive for the call.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "cpu_features.h"
#include "dtype.h"
#include "norm.h"
#include "parallel.h"

namespace py = pybind11;
using namespace pybind11::literals;

// setup.py defines this to the flags it compiled with; a build by other means says so.
#ifndef ZRAY_CXX_FLAGS
#define ZRAY_CXX_FLAGS "unknown (not built by zray's setup.py)"
#endif

namespace {

std::string compiler_name() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

py::dict build_info() {
  py::list compiled, supported;
  for (zray::Isa isa : zray::compiled_isas()) compiled.append(zray::isa_name(isa));
  for (zray::Isa isa : zray::supported_isas()) supported.append(zray::isa_name(isa));
  return py::dict(
      "compiler"_a = compiler_name(), "cxx_standard"_a = static_cast<long>(__cplusplus),
      "cxx_flags"_a = ZRAY_CXX_FLAGS, "openmp"_a = zray::openmp_enabled(),
#ifdef _OPENMP
      "openmp_version"_a = static_cast<int>(_OPENMP),
#else
      "openmp_version"_a = py::none(),
#endif
      "openmp_max_threads"_a = zray::openmp_max_threads(), "isa_compiled"_a = compiled,
      "isa_supported"_a = supported, "isa_selected"_a = zray::isa_name(zray::best_isa()),
      "sumsq_chunk_elements"_a = zray::kSumSqChunk, "sumsq_lanes"_a = zray::kSumSqLanes);
}

py::tuple sumsq_nonfinite(std::uintptr_t ptr, int64_t numel, int dtype, const std::string& isa,
                          int num_threads) {
  const zray::DType d = zray::dtype_from_code(dtype);
  const zray::Isa chosen = zray::resolve_isa(isa);
  zray::SumSqResult r;
  {
    // Pure C++ on memory the caller keeps alive: let other Python threads run meanwhile.
    py::gil_scoped_release nogil;
    r = zray::sumsq_nonfinite(reinterpret_cast<const void*>(ptr), numel, d, chosen, num_threads);
  }
  return py::make_tuple(r.sumsq, r.nonfinite);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "zray's compiled CPU kernels (see zray/ops for the Python face and references).";

  m.attr("DTYPE_CODES") = py::dict("float32"_a = static_cast<int>(zray::DType::kFloat32),
                                   "bfloat16"_a = static_cast<int>(zray::DType::kBFloat16),
                                   "float16"_a = static_cast<int>(zray::DType::kFloat16));

  m.def("build_info", &build_info,
        "How this extension was built and which instruction set its kernels use here.");

  m.def("sumsq_nonfinite", &sumsq_nonfinite, "ptr"_a, "numel"_a, "dtype"_a, "isa"_a = "auto",
        "num_threads"_a = 0,
        R"doc(Sum of squares (float64) of a flat buffer, and whether it holds inf or nan.

ptr: address of `numel` contiguous, element-aligned elements (tensor.data_ptr()).
dtype: a code from DTYPE_CODES. isa: "auto" or a name from build_info()["isa_supported"].
num_threads: OpenMP threads to use (0: OpenMP default). The result is the same for every
isa and thread count. Returns (sumsq: float, nonfinite: bool).)doc");
}
