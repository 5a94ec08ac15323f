#pragma once
// Argument checks shared by the CPU and CUDA implementations. The Python wrappers validate first and raise
// ValueError/TypeError naming the argument; these TORCH_CHECKs guard direct torch.ops calls.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <optional>

namespace mrgd_ext {

inline void check_param_grad_lists(at::TensorList params, at::TensorList grads) {
  TORCH_CHECK(params.size() == grads.size(), "mrgd_ext: params and grads must have the same length, got ",
              params.size(), " and ", grads.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(p.layout() == at::kStrided && g.layout() == at::kStrided,
                "mrgd_ext: params[", i, "] and grads[", i, "] must be dense (strided) tensors");
    TORCH_CHECK(p.is_contiguous() && g.is_contiguous(), "mrgd_ext: params[", i, "] and grads[", i,
                "] must be contiguous");
    TORCH_CHECK(p.numel() == g.numel(), "mrgd_ext: params[", i, "] has ", p.numel(), " elements but grads[", i,
                "] has ", g.numel());
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type() && g.scalar_type() == params[0].scalar_type(),
                "mrgd_ext: all params and grads must share one dtype (", params[0].scalar_type(), "), params[",
                i, "] is ", p.scalar_type(), " and grads[", i, "] is ", g.scalar_type());
    TORCH_CHECK(p.device() == params[0].device() && g.device() == params[0].device(),
                "mrgd_ext: all params and grads must be on one device (", params[0].device(), ")");
  }
}

inline void check_scalar_flag(const std::optional<at::Tensor>& t, const char* name, const at::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat, "mrgd_ext: ", name,
              " must be a float32 tensor with one element");
  TORCH_CHECK(t->device() == device, "mrgd_ext: ", name, " must be on ", device, ", got ", t->device());
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

}  // namespace mrgd_ext
