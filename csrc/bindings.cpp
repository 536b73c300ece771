// The pybind11 module `zray._C`. It never sees a torch header: Python passes
// `tensor.data_ptr()` (an int), the element count and a dtype code, so the extension builds in
// seconds and does not depend on the installed torch's C++ ABI. The Python side
// (zray/ops/*.py) checks device, dtype and contiguity and keeps the tensor alive for the call.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu_adam.h"
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
      "sumsq_chunk_elements"_a = zray::kSumSqChunk, "sumsq_lanes"_a = zray::kSumSqLanes,
      "adam_chunk_elements"_a = zray::kAdamChunk);
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

void adam_step(std::uintptr_t param, std::uintptr_t grad, int grad_dtype, std::uintptr_t exp_avg,
               std::uintptr_t exp_avg_sq, int64_t numel, double step, double lr, double beta1,
               double beta2, double eps, double weight_decay, bool adamw, float grad_scale,
               std::uintptr_t out, int out_dtype, const std::string& isa, int num_threads) {
  const zray::DType g = zray::dtype_from_code(grad_dtype);
  // out_dtype -1: no 16-bit copy. Otherwise a 16-bit dtype and, when there is work, a pointer.
  const bool has_out = out_dtype != -1;
  const zray::DType o = has_out ? zray::dtype_from_code(out_dtype) : zray::DType::kBFloat16;
  if (has_out && o == zray::DType::kFloat32) {
    throw std::invalid_argument(
        "out_dtype: got 0 (float32); allowed: -1 (none), 1 (bfloat16), 2 (float16)");
  }
  if (has_out && out == 0 && numel > 0) {
    throw std::invalid_argument("out: got a null pointer with out_dtype set and numel > 0");
  }
  const zray::Isa chosen = zray::resolve_isa(isa);
  const zray::AdamBuffers buffers{
      reinterpret_cast<float*>(param), reinterpret_cast<const void*>(grad),
      reinterpret_cast<float*>(exp_avg), reinterpret_cast<float*>(exp_avg_sq),
      has_out ? reinterpret_cast<void*>(out) : nullptr};
  const zray::AdamHyper hyper{lr, beta1, beta2, eps, weight_decay, adamw, step, grad_scale};
  // Pure C++ on memory the caller keeps alive: let other Python threads run meanwhile.
  py::gil_scoped_release nogil;
  zray::adam_step(buffers, numel, g, o, hyper, chosen, num_threads);
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

  m.def("adam_step", &adam_step, "param"_a, "grad"_a, "grad_dtype"_a, "exp_avg"_a, "exp_avg_sq"_a,
        "numel"_a, "step"_a, "lr"_a, "beta1"_a, "beta2"_a, "eps"_a, "weight_decay"_a, "adamw"_a,
        "grad_scale"_a = 1.0f, "out"_a = 0, "out_dtype"_a = -1, "isa"_a = "auto",
        "num_threads"_a = 0,
        R"doc(One Adam / AdamW step over flat buffers, in place, in one pass over memory.

param, exp_avg, exp_avg_sq: addresses of `numel` contiguous float32 elements, updated in place.
grad: address of `numel` elements of `grad_dtype` (a DTYPE_CODES value), multiplied by
`grad_scale` before use. step: the step count after incrementing (>= 1). adamw: decoupled weight
decay if true, else L2 (added to the gradient). out / out_dtype: where to also write the updated
parameter rounded (nearest-even) to bfloat16 or float16; out_dtype -1 (the default): nowhere.
isa: "auto" or a name from build_info()["isa_supported"]; every isa gives the same bits.
num_threads: OpenMP threads (0: OpenMP default). Arithmetic: see csrc/cpu_adam.h.)doc");
}
