// Thread-count policy shared by the kernels (OpenMP when the build found it, else serial).
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace zray {

inline bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

inline int openmp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// `requested` > 0 is what Python passes (torch.get_num_threads(), so zray honours
// torch.set_num_threads and does not oversubscribe cores torch already uses); 0 means the
// OpenMP default. Never more threads than work items: an idle thread still costs a wake-up.
inline int resolve_threads(int requested, int64_t work_items) {
  const int want = requested > 0 ? requested : openmp_max_threads();
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, work_items)));
}

}  // namespace zray
