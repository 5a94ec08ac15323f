#pragma once
// Argument checks shared by the CPU and CUDA implementations. The Python wrappers validate first and raise
// ValueError/TypeError naming the argument; these TORCH_CHECKs guard direct torch.ops calls.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cmath>
#include <optional>

namespace mrgd_ext {

// n tensor lists of one op (params, grads, state...): equal lengths, and element i of every list dense,
// contiguous, with the numel of params[i]; every tensor of one dtype and one device.
inline void check_tensor_lists(const at::TensorList* lists, const char* const* names, int n) {
  const at::TensorList params = lists[0];
  for (int j = 1; j < n; ++j)
    TORCH_CHECK(lists[j].size() == params.size(), "mrgd_ext: ", names[0], " and ", names[j],
                " must have the same length, got ", params.size(), " and ", lists[j].size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    for (int j = 0; j < n; ++j) {
      const at::Tensor& t = lists[j][i];
      TORCH_CHECK(t.layout() == at::kStrided, "mrgd_ext: ", names[j], "[", i, "] must be a dense (strided) tensor");
      TORCH_CHECK(t.is_contiguous(), "mrgd_ext: ", names[j], "[", i, "] must be contiguous");
      TORCH_CHECK(t.numel() == p.numel(), "mrgd_ext: ", names[0], "[", i, "] has ", p.numel(), " elements but ",
                  names[j], "[", i, "] has ", t.numel());
      TORCH_CHECK(t.scalar_type() == params[0].scalar_type(), "mrgd_ext: all tensors must share one dtype (",
                  params[0].scalar_type(), "), ", names[j], "[", i, "] is ", t.scalar_type());
      TORCH_CHECK(t.device() == params[0].device(), "mrgd_ext: all tensors must be on one device (",
                  params[0].device(), "), ", names[j], "[", i, "] is on ", t.device());
    }
  }
}

inline void check_param_grad_lists(at::TensorList params, at::TensorList grads) {
  const at::TensorList lists[] = {params, grads};
  const char* const names[] = {"params", "grads"};
  check_tensor_lists(lists, names, 2);
}

inline void check_scalar_flag(const at::Tensor* t, const char* name, const at::Device& device) {
  if (t == nullptr) return;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat, "mrgd_ext: ", name,
              " must be a float32 tensor with one element");
  TORCH_CHECK(t->device() == device, "mrgd_ext: ", name, " must be on ", device, ", got ", t->device());
}

inline void check_scalar_flag(const std::optional<at::Tensor>& t, const char* name, const at::Device& device) {
  check_scalar_flag(t.has_value() ? &*t : nullptr, name, device);
}

// A rate or coefficient given as a float argument: NaN or inf would be written into every parameter. Checked on
// the host before any kernel runs (a ValueError naming the argument); costs nothing on the device.
inline void check_finite_scalar(double value, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(value), "mrgd_ext: ", name, " must be finite, got ", value);
}

inline int64_t total_numel(at::TensorList tensors) {
  int64_t n = 0;
  for (const auto& t : tensors) n += t.numel();
  return n;
}

inline void check_basis(const at::Tensor& basis, int64_t n_total, const at::Device& device) {
  TORCH_CHECK(basis.dim() == 2, "mrgd_ext: basis must be 2-D [r, n_total], got ", basis.dim(), " dims");
  TORCH_CHECK(basis.size(1) == n_total, "mrgd_ext: basis has ", basis.size(1),
              " columns but the parameters have ", n_total, " elements");
  TORCH_CHECK(basis.scalar_type() == at::kFloat || basis.scalar_type() == at::kBFloat16 ||
                  basis.scalar_type() == at::kDouble,
              "mrgd_ext: basis must be float32, bfloat16 or float64, got ", basis.scalar_type());
  TORCH_CHECK(basis.is_contiguous(), "mrgd_ext: basis must be contiguous");
  TORCH_CHECK(basis.device() == device, "mrgd_ext: basis must be on ", device, ", got ", basis.device());
}

// Reductions and coefficients are carried in float64 for float64 parameters and float32 otherwise.
inline at::ScalarType coefficient_dtype(at::ScalarType param_dtype) {
  return param_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_coeffs(const at::Tensor& coeffs, int64_t r, at::ScalarType param_dtype,
                         const at::Device& device) {
  TORCH_CHECK(coeffs.dim() == 1 && coeffs.size(0) == r, "mrgd_ext: coeffs must have shape [", r, "], got ",
              coeffs.sizes());
  TORCH_CHECK(coeffs.scalar_type() == coefficient_dtype(param_dtype), "mrgd_ext: coeffs must be ",
              coefficient_dtype(param_dtype), " for ", param_dtype, " parameters, got ", coeffs.scalar_type());
  TORCH_CHECK(coeffs.is_contiguous() && coeffs.device() == device, "mrgd_ext: coeffs must be contiguous on ",
              device);
}

// subspace_momentum_step_'s scalars and tensor lists, on every device.
inline void check_momentum_step_lists(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                                      double lr, double momentum, double weight_decay) {
  check_finite_scalar(lr, "lr");
  check_finite_scalar(momentum, "momentum");
  check_finite_scalar(weight_decay, "weight_decay");
  const at::TensorList lists[] = {params, grads, momentum_buffers};
  const char* const names[] = {"params", "grads", "momentum_buffers"};
  check_tensor_lists(lists, names, 3);
}

// The checks both subspace update passes (subspace_step_, subspace_momentum_step_) share on every device, after
// their tensor lists' (non-empty params).
inline void check_update_args(at::TensorList params, const at::Tensor& basis, const at::Tensor& coeffs,
                              const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf) {
  const at::Device device = params[0].device();
  check_basis(basis, total_numel(params), device);
  check_coeffs(coeffs, basis.size(0), params[0].scalar_type(), device);
  check_scalar_flag(grad_scale, "grad_scale", device);
  check_scalar_flag(found_inf, "found_inf", device);
}

}  // namespace mrgd_ext
