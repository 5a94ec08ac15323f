#pragma once
// NOTE: [element-wise ops]
// An element-wise multi-tensor op is one functor here plus one schema line in csrc/mrgd_ext.cpp. The functor
// names the op, says how many tensor lists it takes and their names (the first kUpdated of them are
// updated in place, the rest only read), how many float arguments follow them and their names (each must be
// finite: checked on the host before any kernel runs), and applies the shared element math (update_math.h) to one
// element of every list. Everything else is generic over the functor:
//   - the schema's arguments are unpacked into lists and scalars by ElementwiseOp (elementwise_op.h);
//   - the CPU chunk loops are compiled once per instruction set (chunk_kernels.cpp) into the kernel table's
//     `elementwise` rows (NOTE: [CPU instruction-set dispatch]);
//   - the CUDA kernel packs any number of lists per launch (cuda_multi_tensor.cuh, cuda/elementwise.cu);
//   - both backends register every functor of MRGD_ELEMENTWISE_OPS under its schema.
// kGradFactor adds `bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None` after the floats: the
// gradient factor (NOTE: [gradient factor]) then arrives as the scalar after the op's own floats, and a
// non-zero found_inf skips the whole update (GradScaler saw inf/nan).
//
// apply() is a template over the arithmetic type, evaluated on float/double, on the AVX2 lanes of the CPU
// loops and on the GPU: x[j] is the element of list j (written back for j < kUpdated), s the scalars. Its
// second template argument drops the weight-decay term; kDecayScalar (-1: none) says which scalar decides
// (NOTE: [no decay term]).
#include "mrgd_ext/host_device.h"
#include "mrgd_ext/update_math.h"

namespace mrgd_ext {
// The functors have internal linkage, like the shared element math: the CPU loops instantiate apply() once per
// instruction set, and a shared (COMDAT) copy could otherwise carry AVX2 code into the baseline build.
namespace {

// p <- p - lr * (factor * g + weight_decay * p): one step of the multirate (temporal) schedule.
struct MultirateStep {
  static constexpr const char* kName = "multirate_step_";
  static constexpr int kLists = 2;
  static constexpr int kUpdated = 1;
  static constexpr const char* kListNames[kLists] = {"params", "grads"};
  static constexpr int kScalars = 2;
  static constexpr const char* kScalarNames[kScalars] = {"lr", "weight_decay"};
  static constexpr bool kGradFactor = true;
  // Index of the weight-decay scalar: the loops pick apply<T, false> when it is 0 (NOTE: [no decay term]).
  static constexpr int kDecayScalar = 1;
  template <typename T, bool Decay = true>
  MRGD_HOST_DEVICE_MEMBER void apply(T* x, const T* s) {
    x[0] = multirate_update<T, Decay>(x[0], x[1], s[0], s[1], s[2]);
  }
};

}  // namespace

// Every element-wise op, as X(Functor). Adding an op adds one entry here.
#define MRGD_ELEMENTWISE_OPS(X) X(MultirateStep)

// Row of an op in the CPU kernel table.
enum ElementwiseOpId : int {
#define MRGD_ELEMENTWISE_ID(Fn) kOp##Fn,
  MRGD_ELEMENTWISE_OPS(MRGD_ELEMENTWISE_ID)
#undef MRGD_ELEMENTWISE_ID
  kNumElementwiseOps
};

template <typename Fn>
struct ElementwiseId;
#define MRGD_ELEMENTWISE_ID(Fn) \
  template <>                   \
  struct ElementwiseId<Fn> {    \
    static constexpr int value = kOp##Fn; \
  };
MRGD_ELEMENTWISE_OPS(MRGD_ELEMENTWISE_ID)
#undef MRGD_ELEMENTWISE_ID

// Scalars one call hands to the element loops: the op's floats, then the gradient factor if it has one.
template <typename Fn>
constexpr int kNumScalars = Fn::kScalars + (Fn::kGradFactor ? 1 : 0);

}  // namespace mrgd_ext
