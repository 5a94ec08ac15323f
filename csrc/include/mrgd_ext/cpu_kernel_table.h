#pragma once
// NOTE: [CPU instruction-set dispatch]
// The element loops of the CPU kernels are compiled twice: for the baseline ISA of the target, and (on
// x86-64) with AVX2/FMA/F16C. The best table for the running CPU is chosen once, at first use, the way
// ATen's DispatchStub does. This is the one mechanism for every CPU kernel: each ISA-specific translation
// unit (csrc/cpu/chunk_kernels.cpp, csrc/cpu/block_orthogonalize_loops.cpp) is compiled into one object per
// ISA with that ISA's flags (CMakeLists.txt, mrgd_add_isa), inside a namespace named after the ISA, and
// fills that ISA's KernelTable. These units include no torch header and share no inline function with the
// rest of the library (the shared element math has internal linkage, NOTE: [shared element math]), so no
// AVX2 code can leak into a baseline caller through the linker's merging of inline functions (the ODR
// hazard of mixing -m flags). They receive raw pointers, one chunk at a time; threading, dtype dispatch and
// checks stay in the baseline code that calls them. Compiling whole translation units per ISA (rather than
// `#pragma GCC target` regions) also lets the ISA code test __AVX2__ and use intrinsics.
#include <cstdint>

#include "mrgd_ext/elementwise_ops.h"

namespace mrgd_ext::cpu {

// Storage types of parameters and gradients (StorageKind) and of subspace bases (BasisKind).
enum StorageKind : int { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3, kNumStorageKinds = 4 };
enum BasisKind : int { kBasisF32 = 0, kBasisBF16 = 1, kBasisF64 = 2, kNumBasisKinds = 3 };

// Fn::apply on elements [0, len) of every list: x[j] points at list j's first element of the chunk, s at the
// kNumScalars<Fn> scalars (NOTE: [element-wise ops]).
using ElementwiseChunkFn = void (*)(void* const* x, int64_t len, const double* s);

// partial[k] = sum_{i<len} U[k * ld + i] * geff_i, for k < r; U points at this chunk's first column.
// scratch holds at least len values of the accumulation type (double-sized slots suffice for every type).
using ProjectChunkFn = void (*)(const void* p, const void* g, int64_t len, const void* U, int64_t ld, int64_t r,
                                double weight_decay, double factor, void* scratch, double* partial);

// p[i] <- subspace_update(p[i], g[i], sum_k U[k * ld + i] * w[k], lr, wd, factor) for i < len.
using SubspaceStepChunkFn = void (*)(void* p, const void* g, int64_t len, const void* U, int64_t ld, int64_t r,
                                     const double* w, double lr, double weight_decay, double factor, void* scratch);

// p[i], v[i] <- subspace_momentum_update(p[i], v[i], g[i], sum_k U[k * ld + i] * w[k], lr, momentum, wd, factor).
using SubspaceMomentumChunkFn = void (*)(void* p, void* v, const void* g, int64_t len, const void* U, int64_t ld,
                                         int64_t r, const double* w, double lr, double momentum, double weight_decay,
                                         double factor, void* scratch);

// One pass of the block orthogonalisation over the columns [begin, end) of one super-chunk
// (csrc/cpu/block_orthogonalize.cpp describes the passes).
struct BlockOrthogonalizePass {
  const void* basis;  // Q [m, ldq]
  int64_t ldq;
  int64_t m;
  void* vectors;  // V [b, ldv]
  int64_t ldv;
  int64_t b;
  int64_t sub_len;        // columns per sub-chunk of the passes that subtract
  int64_t first_sub_len;  // columns per sub-chunk of the first pass (NOTE: [first pass sub-chunks])
  const void* coef;   // [b, m] coefficients (storage type) to subtract in this pass; nullptr on the first pass
  bool project;       // accumulate the next round's coefficients (otherwise the Gram matrix of the result)
};
using BlockOrthogonalizePassFn = void (*)(const BlockOrthogonalizePass&, int64_t begin, int64_t end, double* proj,
                                          double* gram, double* norms);

struct KernelTable {
  const char* isa;
  ElementwiseChunkFn elementwise[kNumElementwiseOps][kNumStorageKinds];
  ProjectChunkFn project[kNumStorageKinds][kNumBasisKinds];
  SubspaceStepChunkFn subspace_step[kNumStorageKinds][kNumBasisKinds];
  SubspaceMomentumChunkFn subspace_momentum_step[kNumStorageKinds][kNumBasisKinds];
  BlockOrthogonalizePassFn block_orthogonalize[2];  // [0] float32, [1] float64
};

// Per ISA: the table, and the block orthogonalisation passes it points at (block_orthogonalize_loops.cpp).
#define MRGD_DECLARE_ISA(isa)                                                                              \
  namespace isa {                                                                                          \
  const KernelTable& kernel_table();                                                                       \
  void block_orthogonalize_pass_f32(const BlockOrthogonalizePass&, int64_t, int64_t, double*, double*, double*); \
  void block_orthogonalize_pass_f64(const BlockOrthogonalizePass&, int64_t, int64_t, double*, double*, double*); \
  }
MRGD_DECLARE_ISA(baseline)
MRGD_DECLARE_ISA(avx2)
#undef MRGD_DECLARE_ISA

// The table in use: the best one this CPU supports, unless set_isa() chose another.
const KernelTable& kernel_table();
// "auto" (best supported), "baseline" or "avx2"; returns false when that ISA is unavailable here.
bool set_isa(const char* name);
// Names of the tables compiled into this build and runnable on this CPU, best last.
const char* available_isas();

}  // namespace mrgd_ext::cpu
