// Runtime choice of the CPU kernel table (see NOTE: [CPU instruction-set dispatch]).
#include <atomic>
#include <cstring>

#include "mrgd_ext/cpu_kernel_table.h"

namespace mrgd_ext::cpu {
namespace {

bool cpu_has_avx2() {
#if defined(MRGD_HAVE_AVX2_KERNELS) && (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

const KernelTable* best_table() {
#if defined(MRGD_HAVE_AVX2_KERNELS)
  if (cpu_has_avx2()) return &avx2::kernel_table();
#endif
  return &baseline::kernel_table();
}

std::atomic<const KernelTable*>& active() {
  static std::atomic<const KernelTable*> table{best_table()};
  return table;
}

}  // namespace

const KernelTable& kernel_table() { return *active().load(std::memory_order_acquire); }

bool set_isa(const char* name) {
  if (std::strcmp(name, "auto") == 0) {
    active().store(best_table(), std::memory_order_release);
    return true;
  }
  if (std::strcmp(name, "baseline") == 0) {
    active().store(&baseline::kernel_table(), std::memory_order_release);
    return true;
  }
#if defined(MRGD_HAVE_AVX2_KERNELS)
  if (std::strcmp(name, "avx2") == 0 && cpu_has_avx2()) {
    active().store(&avx2::kernel_table(), std::memory_order_release);
    return true;
  }
#endif
  return false;
}

const char* available_isas() { return cpu_has_avx2() ? "baseline,avx2" : "baseline"; }

}  // namespace mrgd_ext::cpu
