// CPU kernel of the fused multi-tensor multirate step: checks, dtype dispatch, and one parallel loop over
// fixed-size chunks of all tensors; the element loop comes from the ISA kernel table.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include "mrgd_ext/checks.h"
#include "mrgd_ext/cpu_chunks.h"
#include "mrgd_ext/cpu_kernel_table.h"
#include "mrgd_ext/ops.h"

namespace mrgd_ext {
namespace {

// 64 Ki elements: large enough to amortise the per-chunk call, small enough to balance the threads
// across a few large tensors.
constexpr int64_t kStepChunk = 1 << 16;

}  // namespace

void multirate_step_cpu(at::TensorList params, at::TensorList grads, double lr, double weight_decay,
                        bool maximize, const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf) {
  check_param_grad_lists(params, grads);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  check_scalar_flag(grad_scale, "grad_scale", device);
  check_scalar_flag(found_inf, "found_inf", device);
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) return;  // GradScaler saw inf/nan: skip
  const double factor = cpu::host_gradient_factor(params[0].scalar_type(), maximize, grad_scale);
  const cpu::StepChunkFn fn = cpu::kernel_table().step[cpu::storage_kind(params[0].scalar_type())];
  const auto chunks = cpu::split_into_chunks(params, kStepChunk);
  const auto p_ptrs = cpu::data_pointers<char>(params);
  const auto g_ptrs = cpu::data_pointers<const char>(grads);
  const int64_t elem = params[0].element_size();
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  const int64_t grain = total_numel(params) >= cpu::kParallelThreshold ? 1 : num_chunks;
  at::parallel_for(0, num_chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const cpu::Chunk& ch = chunks[c];
      fn(p_ptrs[ch.tensor] + ch.begin * elem, g_ptrs[ch.tensor] + ch.begin * elem, ch.end - ch.begin, lr,
         weight_decay, factor);
    }
  });
}

}  // namespace mrgd_ext
