// CPU backend of the element-wise multi-tensor ops (NOTE: [element-wise ops] in elementwise_ops.h): the
// gradient factor and the found_inf skip, dtype dispatch, and one parallel loop over fixed-size chunks of
// all tensors; the element loop of each op comes from the ISA kernel table. Registers every op of
// MRGD_ELEMENTWISE_OPS for the CPU.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "mrgd_ext/cpu_chunks.h"
#include "mrgd_ext/cpu_kernel_table.h"
#include "mrgd_ext/elementwise_op.h"

namespace mrgd_ext::cpu {
namespace {

// 64 Ki elements: large enough to amortise the per-chunk call, small enough to balance the threads
// across a few large tensors.
constexpr int64_t kElementwiseChunk = 1 << 16;

struct CpuBackend {
  template <typename Fn>
  static void run(ElementwiseCall<Fn>& call) {
    constexpr int N = Fn::kLists;
    const at::TensorList params = call.lists[0];
    if (call.found_inf != nullptr && call.found_inf->template item<float>() != 0.0f) return;  // GradScaler saw inf/nan
    const at::ScalarType dtype = params[0].scalar_type();
    if constexpr (Fn::kGradFactor) {
      const std::optional<at::Tensor> scale =
          call.grad_scale ? std::optional<at::Tensor>(*call.grad_scale) : std::nullopt;
      call.scalars[Fn::kScalars] = host_gradient_factor(dtype, call.maximize, scale);
    }
    const ElementwiseChunkFn fn = kernel_table().elementwise[ElementwiseId<Fn>::value][storage_kind(dtype)];
    const auto chunks = split_into_chunks(params, kElementwiseChunk);
    std::vector<char*> ptrs[N];
    for (int j = 0; j < N; ++j) ptrs[j] = data_pointers<char>(call.lists[j]);
    const int64_t elem = params[0].element_size();
    const int64_t num_chunks = static_cast<int64_t>(chunks.size());
    const int64_t grain = total_numel(params) >= kParallelThreshold ? 1 : num_chunks;
    const double* s = call.scalars.data();
    at::parallel_for(0, num_chunks, grain, [&](int64_t begin, int64_t end) {
      void* x[N];
      for (int64_t c = begin; c < end; ++c) {
        const Chunk& ch = chunks[c];
        for (int j = 0; j < N; ++j) x[j] = ptrs[j][ch.tensor] + ch.begin * elem;
        fn(x, ch.end - ch.begin, s);
      }
    });
  }
};

}  // namespace
}  // namespace mrgd_ext::cpu

TORCH_LIBRARY_IMPL(mrgd_ext, CPU, m) {
#define MRGD_REGISTER_CPU(Fn) m.impl(mrgd_ext::Fn::kName, mrgd_ext::ElementwiseOp<mrgd_ext::Fn, mrgd_ext::cpu::CpuBackend>::fn());
  MRGD_ELEMENTWISE_OPS(MRGD_REGISTER_CPU)
#undef MRGD_REGISTER_CPU
}
