#pragma once
// Signatures of the CPU subspace-step kernels; schemas are defined once in csrc/mrgd_ext.cpp. (The
// element-wise ops need no declaration: NOTE: [element-wise ops] in elementwise_ops.h.)
#include <ATen/core/Tensor.h>
#include <optional>

namespace mrgd_ext {

// c = U^T geff over the flat concatenation of all parameters; U = basis [r, n_total]. Returns [r].
at::Tensor subspace_project_cpu(at::TensorList params, at::TensorList grads, const at::Tensor& basis,
                                double weight_decay, bool maximize, const std::optional<at::Tensor>& grad_scale);

// p <- p - lr * geff - U coeffs (column-wise), skipped entirely when found_inf is non-zero.
void subspace_step_cpu(at::TensorList params, at::TensorList grads, const at::Tensor& basis,
                       const at::Tensor& coeffs, double lr, double weight_decay, bool maximize,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf);

// The momentum form (NOTE: [momentum subspace update]): d = lr * geff + U coeffs, v <- momentum v + d,
// p <- p - d - momentum v; skipped entirely when found_inf is non-zero.
void subspace_momentum_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                                const at::Tensor& basis, const at::Tensor& coeffs, double lr, double momentum,
                                double weight_decay, bool maximize, const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& found_inf);

}  // namespace mrgd_ext
