// CPU kernel of the fused multi-tensor multirate step.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include "mrgd_ext/checks.h"
#include "mrgd_ext/cpu_chunks.h"
#include "mrgd_ext/ops.h"
#include "mrgd_ext/update_math.h"

namespace mrgd_ext {
namespace {

// 64 Ki elements: large enough to amortise the per-chunk bookkeeping, small enough to balance two to
// dozens of threads on a few tensors.
constexpr int64_t kStepChunk = 1 << 16;

template <typename scalar_t>
void multirate_step_kernel(at::TensorList params, at::TensorList grads, double lr, double weight_decay,
                           bool maximize, const float* grad_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto chunks = cpu::split_into_chunks(params, kStepChunk);
  const auto p_ptrs = cpu::data_pointers<scalar_t>(params);
  const auto g_ptrs = cpu::data_pointers<const scalar_t>(grads);
  const acc_t lr_a = static_cast<acc_t>(lr);
  const acc_t wd_a = static_cast<acc_t>(weight_decay);
  const acc_t factor = gradient_factor<acc_t>(maximize, grad_scale);
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  [[maybe_unused]] const bool parallel = total_numel(params) >= cpu::kParallelThreshold;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t c = 0; c < num_chunks; ++c) {
    const cpu::Chunk ch = chunks[c];
    scalar_t* __restrict__ p = p_ptrs[ch.tensor];
    const scalar_t* __restrict__ g = g_ptrs[ch.tensor];
#pragma omp simd
    for (int64_t i = ch.begin; i < ch.end; ++i) {
      p[i] = static_cast<scalar_t>(
          multirate_update<acc_t>(static_cast<acc_t>(p[i]), static_cast<acc_t>(g[i]), lr_a, wd_a, factor));
    }
  }
}

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
  const float scale = grad_scale.has_value() ? grad_scale->item<float>() : 1.0f;
  const float* scale_ptr = grad_scale.has_value() ? &scale : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "multirate_step_cpu", [&] {
    multirate_step_kernel<scalar_t>(params, grads, lr, weight_decay, maximize, scale_ptr);
  });
}

}  // namespace mrgd_ext
