// CPU kernels of the fused multirate subspace step (two passes over all parameters).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <vector>

#include "mrgd_ext/checks.h"
#include "mrgd_ext/cpu_chunks.h"
#include "mrgd_ext/ops.h"
#include "mrgd_ext/update_math.h"

namespace mrgd_ext {
namespace {

// 8 Ki elements: the chunk's effective gradient (or correction) buffer stays in L1/L2 while the r basis
// rows stream past it, so the gradient is read from memory once however large r is.
constexpr int64_t kSubspaceChunk = 1 << 13;

// NOTE: [projection accuracy]
// Each chunk's dot products run in acc_t (float for float/half/bfloat16 parameters) over at most
// kSubspaceChunk terms, and the per-chunk partial sums are added in double. The rounding error therefore
// grows with the chunk length, not with n_total, so the projection of a 64M-element gradient is as
// accurate as that of a 8K-element one.
template <typename scalar_t, typename basis_t>
at::Tensor subspace_project_kernel(at::TensorList params, at::TensorList grads, const at::Tensor& basis,
                                   double weight_decay, bool maximize, const float* grad_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = basis.size(0);
  const int64_t n_total = basis.size(1);
  const auto chunks = cpu::split_into_chunks(grads, kSubspaceChunk);
  const auto p_ptrs = cpu::data_pointers<const scalar_t>(params);
  const auto g_ptrs = cpu::data_pointers<const scalar_t>(grads);
  const basis_t* U = basis.data_ptr<basis_t>();  // [r, n_total]
  const acc_t wd_a = static_cast<acc_t>(weight_decay);
  const acc_t factor = gradient_factor<acc_t>(maximize, grad_scale);
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  std::vector<double> partial(static_cast<size_t>(num_chunks * r));  // [num_chunks, r]
  [[maybe_unused]] const bool parallel = n_total * (r + 1) >= cpu::kParallelThreshold;
#pragma omp parallel if (parallel)
  {
    std::vector<acc_t> geff(kSubspaceChunk);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < num_chunks; ++c) {
      const cpu::Chunk ch = chunks[c];
      const int64_t len = ch.end - ch.begin;
      const scalar_t* __restrict__ p = p_ptrs[ch.tensor] + ch.begin;
      const scalar_t* __restrict__ g = g_ptrs[ch.tensor] + ch.begin;
      acc_t* __restrict__ ge = geff.data();
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        ge[i] = effective_gradient<acc_t>(static_cast<acc_t>(p[i]), static_cast<acc_t>(g[i]), wd_a, factor);
      }
      for (int64_t k = 0; k < r; ++k) {
        const basis_t* __restrict__ u = U + k * n_total + ch.flat_offset + ch.begin;
        acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < len; ++i) sum += static_cast<acc_t>(u[i]) * ge[i];
        partial[c * r + k] = static_cast<double>(sum);
      }
    }
  }
  const at::ScalarType out_dtype = coefficient_dtype(params[0].scalar_type());
  at::Tensor out = at::empty({r}, basis.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t k = 0; k < r; ++k) o[k] = 0.0;
  for (int64_t c = 0; c < num_chunks; ++c)
    for (int64_t k = 0; k < r; ++k) o[k] += partial[c * r + k];
  return out.to(out_dtype);
}

template <typename scalar_t, typename basis_t>
void subspace_step_kernel(at::TensorList params, at::TensorList grads, const at::Tensor& basis,
                          const at::Tensor& coeffs, double lr, double weight_decay, bool maximize,
                          const float* grad_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  using coeff_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t r = basis.size(0);
  const int64_t n_total = basis.size(1);
  const auto chunks = cpu::split_into_chunks(params, kSubspaceChunk);
  const auto p_ptrs = cpu::data_pointers<scalar_t>(params);
  const auto g_ptrs = cpu::data_pointers<const scalar_t>(grads);
  const basis_t* U = basis.data_ptr<basis_t>();  // [r, n_total]
  std::vector<acc_t> w(static_cast<size_t>(r));
  for (int64_t k = 0; k < r; ++k) w[k] = static_cast<acc_t>(coeffs.data_ptr<coeff_t>()[k]);
  const acc_t lr_a = static_cast<acc_t>(lr);
  const acc_t wd_a = static_cast<acc_t>(weight_decay);
  const acc_t factor = gradient_factor<acc_t>(maximize, grad_scale);
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  [[maybe_unused]] const bool parallel = n_total * (r + 1) >= cpu::kParallelThreshold;
#pragma omp parallel if (parallel)
  {
    std::vector<acc_t> correction(kSubspaceChunk);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < num_chunks; ++c) {
      const cpu::Chunk ch = chunks[c];
      const int64_t len = ch.end - ch.begin;
      acc_t* __restrict__ corr = correction.data();
      for (int64_t i = 0; i < len; ++i) corr[i] = 0;
      for (int64_t k = 0; k < r; ++k) {
        const basis_t* __restrict__ u = U + k * n_total + ch.flat_offset + ch.begin;
        const acc_t wk = w[k];
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) corr[i] += static_cast<acc_t>(u[i]) * wk;
      }
      scalar_t* __restrict__ p = p_ptrs[ch.tensor] + ch.begin;
      const scalar_t* __restrict__ g = g_ptrs[ch.tensor] + ch.begin;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        p[i] = static_cast<scalar_t>(subspace_update<acc_t>(static_cast<acc_t>(p[i]), static_cast<acc_t>(g[i]),
                                                            corr[i], lr_a, wd_a, factor));
      }
    }
  }
}

// Dispatch over the parameter dtype and the basis storage dtype (float32, bfloat16, float64).
template <typename Fn>
void dispatch_param_and_basis(at::ScalarType param_dtype, at::ScalarType basis_dtype, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param_dtype, "mrgd_ext_subspace_params", [&] {
    using param_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, basis_dtype, "mrgd_ext_subspace_basis", [&] {
      fn(param_t{}, scalar_t{});
    });
  });
}

}  // namespace

at::Tensor subspace_project_cpu(at::TensorList params, at::TensorList grads, const at::Tensor& basis,
                                double weight_decay, bool maximize, const std::optional<at::Tensor>& grad_scale) {
  check_param_grad_lists(params, grads);
  if (params.empty()) {  // nothing to project: U^T g over zero elements is the zero vector
    TORCH_CHECK(basis.dim() == 2 && basis.size(1) == 0, "mrgd_ext: basis must be [r, 0] for an empty parameter list");
    return at::zeros({basis.size(0)}, basis.options().dtype(at::kFloat));
  }
  const at::Device device = params[0].device();
  check_basis(basis, total_numel(params), device);
  check_scalar_flag(grad_scale, "grad_scale", device);
  const float scale = grad_scale.has_value() ? grad_scale->item<float>() : 1.0f;
  const float* scale_ptr = grad_scale.has_value() ? &scale : nullptr;
  at::Tensor out;
  dispatch_param_and_basis(params[0].scalar_type(), basis.scalar_type(),
                           [&](auto param_tag, auto basis_tag) {
                             using param_t = decltype(param_tag);
                             using basis_t = decltype(basis_tag);
                             out = subspace_project_kernel<param_t, basis_t>(params, grads, basis, weight_decay,
                                                                             maximize, scale_ptr);
                           });
  return out;
}

void subspace_step_cpu(at::TensorList params, at::TensorList grads, const at::Tensor& basis,
                       const at::Tensor& coeffs, double lr, double weight_decay, bool maximize,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  check_param_grad_lists(params, grads);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  check_basis(basis, total_numel(params), device);
  check_coeffs(coeffs, basis.size(0), params[0].scalar_type(), device);
  check_scalar_flag(grad_scale, "grad_scale", device);
  check_scalar_flag(found_inf, "found_inf", device);
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) return;
  const float scale = grad_scale.has_value() ? grad_scale->item<float>() : 1.0f;
  const float* scale_ptr = grad_scale.has_value() ? &scale : nullptr;
  dispatch_param_and_basis(params[0].scalar_type(), basis.scalar_type(),
                           [&](auto param_tag, auto basis_tag) {
                             using param_t = decltype(param_tag);
                             using basis_t = decltype(basis_tag);
                             subspace_step_kernel<param_t, basis_t>(params, grads, basis, coeffs, lr, weight_decay,
                                                                    maximize, scale_ptr);
                           });
}

}  // namespace mrgd_ext
