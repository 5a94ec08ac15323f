// CPU backend of the element-wise multi-tensor ops (NOTE: [element-wise ops] in elementwise_ops.h): the
// gradient factor and the found_inf skip, dtype dispatch, and one parallel loop over the flat element range
// of all tensors (NOTE: [balanced element-wise split]); the element loop of each op comes from the ISA kernel
// table. Registers every op of MRGD_ELEMENTWISE_OPS for the CPU.
#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "mrgd_ext/cpu_chunks.h"
#include "mrgd_ext/cpu_kernel_table.h"
#include "mrgd_ext/elementwise_op.h"

namespace mrgd_ext::cpu {
namespace {

// 64 Ki elements: the longest run one call of the chunk loop takes (large enough to amortise the call).
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
    std::vector<char*> ptrs[N];
    for (int j = 0; j < N; ++j) ptrs[j] = data_pointers<char>(call.lists[j]);
    const int64_t elem = params[0].element_size();
    // starts[t]: flat offset of tensor t's first element; starts.back(): the total.
    std::vector<int64_t> starts(params.size() + 1, 0);
    for (size_t t = 0; t < params.size(); ++t) starts[t + 1] = starts[t] + params[t].numel();
    const int64_t total = starts.back();
    const double* s = call.scalars.data();
    // NOTE: [balanced element-wise split]
    // The threads split the flat element range, not a list of chunks: a thread's share then holds as many
    // elements as any other's whatever the tensor sizes. (A split by chunk count gave one of two threads
    // twelve 64 Ki chunks and the other four plus eight 1000-element biases: a 1M-parameter step took 1.5x
    // its balanced time.) Element-wise results do not depend on the split.
    const int64_t grain = total >= kParallelThreshold ? kElementwiseChunk : total;
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
      size_t t = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin()) - 1;
      void* x[N];
      for (; begin < end; ++t) {
        const int64_t stop = std::min(end, starts[t + 1]);
        for (int64_t i = begin - starts[t], last = stop - starts[t]; i < last; i += kElementwiseChunk) {
          for (int j = 0; j < N; ++j) x[j] = ptrs[j][t] + i * elem;
          fn(x, std::min(kElementwiseChunk, last - i), s);
        }
        begin = stop;
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
