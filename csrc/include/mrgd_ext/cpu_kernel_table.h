#pragma once
// NOTE: [CPU instruction-set dispatch]
// The element loops of the CPU kernels are compiled twice: for the baseline ISA of the target, and (on
// x86-64) with AVX2/FMA/F16C. The best table for the running CPU is chosen once, at first use, the way
// ATen's DispatchStub does. The ISA-specific translation units include no torch header and share no inline
// function with the rest of the library, so no AVX2 code can leak into a baseline caller through the
// linker's merging of inline functions (the ODR hazard of mixing -m flags). They receive raw pointers, one
// chunk at a time; threading, dtype dispatch and checks stay in the baseline code that calls them.
#include <cstdint>

namespace mrgd_ext::cpu {

// Storage types of parameters and gradients (StorageKind) and of subspace bases (BasisKind).
enum StorageKind : int { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3, kNumStorageKinds = 4 };
enum BasisKind : int { kBasisF32 = 0, kBasisBF16 = 1, kBasisF64 = 2, kNumBasisKinds = 3 };

// p[i] <- multirate_update(p[i], g[i], lr, wd, factor) for i < len.
using StepChunkFn = void (*)(void* p, const void* g, int64_t len, double lr, double weight_decay, double factor);

// partial[k] = sum_{i<len} U[k * ld + i] * geff_i, for k < r; U points at this chunk's first column.
// scratch holds at least len values of the accumulation type (double-sized slots suffice for every type).
using ProjectChunkFn = void (*)(const void* p, const void* g, int64_t len, const void* U, int64_t ld, int64_t r,
                                double weight_decay, double factor, void* scratch, double* partial);

// p[i] <- subspace_update(p[i], g[i], sum_k U[k * ld + i] * w[k], lr, wd, factor) for i < len.
using SubspaceStepChunkFn = void (*)(void* p, const void* g, int64_t len, const void* U, int64_t ld, int64_t r,
                                     const double* w, double lr, double weight_decay, double factor, void* scratch);

struct KernelTable {
  const char* isa;
  StepChunkFn step[kNumStorageKinds];
  ProjectChunkFn project[kNumStorageKinds][kNumBasisKinds];
  SubspaceStepChunkFn subspace_step[kNumStorageKinds][kNumBasisKinds];
};

namespace baseline {
const KernelTable& kernel_table();
}
namespace avx2 {
const KernelTable& kernel_table();
}

// The table in use: the best one this CPU supports, unless set_isa() chose another.
const KernelTable& kernel_table();
// "auto" (best supported), "baseline" or "avx2"; returns false when that ISA is unavailable here.
bool set_isa(const char* name);
// Names of the tables compiled into this build and runnable on this CPU, best last.
const char* available_isas();

}  // namespace mrgd_ext::cpu
