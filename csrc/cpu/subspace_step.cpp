// CPU kernels of the fused multirate subspace step (two passes over all parameters): checks, chunking and
// threading; the element loops come from the ISA kernel table.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <vector>

#include "mrgd_ext/checks.h"
#include "mrgd_ext/cpu_chunks.h"
#include "mrgd_ext/cpu_kernel_table.h"
#include "mrgd_ext/ops.h"

namespace mrgd_ext {
namespace {

// 8 Ki elements: the chunk's effective gradient (or correction) buffer stays in L1/L2 while the r basis
// rows stream past it, so the gradient is read from memory once however large r is.
constexpr int64_t kSubspaceChunk = 1 << 13;

int64_t grain_for(int64_t n_total, int64_t r, int64_t num_chunks) {
  return n_total * (r + 1) >= cpu::kParallelThreshold ? 1 : std::max<int64_t>(num_chunks, 1);
}

}  // namespace

at::Tensor subspace_project_cpu(at::TensorList params, at::TensorList grads, const at::Tensor& basis,
                                double weight_decay, bool maximize, const std::optional<at::Tensor>& grad_scale) {
  check_finite_scalar(weight_decay, "weight_decay");
  check_param_grad_lists(params, grads);
  if (params.empty()) {  // nothing to project: U^T g over zero elements is the zero vector
    TORCH_CHECK(basis.dim() == 2 && basis.size(1) == 0, "mrgd_ext: basis must be [r, 0] for an empty parameter list");
    return at::zeros({basis.size(0)}, basis.options().dtype(at::kFloat));
  }
  const at::Device device = params[0].device();
  check_basis(basis, total_numel(params), device);
  check_scalar_flag(grad_scale, "grad_scale", device);
  const at::ScalarType dtype = params[0].scalar_type();
  const double factor = cpu::host_gradient_factor(dtype, maximize, grad_scale);
  const cpu::ProjectChunkFn fn =
      cpu::kernel_table().project[cpu::storage_kind(dtype)][cpu::basis_kind(basis.scalar_type())];
  const int64_t r = basis.size(0);
  const int64_t n_total = basis.size(1);
  const auto chunks = cpu::split_into_chunks(grads, kSubspaceChunk);
  const auto p_ptrs = cpu::data_pointers<const char>(params);
  const auto g_ptrs = cpu::data_pointers<const char>(grads);
  const char* U = static_cast<const char*>(basis.data_ptr());  // [r, n_total]
  const int64_t elem = params[0].element_size();
  const int64_t basis_elem = basis.element_size();
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  std::vector<double> partial(static_cast<size_t>(num_chunks * r));  // [num_chunks, r]
  at::parallel_for(0, num_chunks, grain_for(n_total, r, num_chunks), [&](int64_t begin, int64_t end) {
    std::vector<double> scratch(kSubspaceChunk);
    for (int64_t c = begin; c < end; ++c) {
      const cpu::Chunk& ch = chunks[c];
      fn(p_ptrs[ch.tensor] + ch.begin * elem, g_ptrs[ch.tensor] + ch.begin * elem, ch.end - ch.begin,
         U + (ch.flat_offset + ch.begin) * basis_elem, n_total, r, weight_decay, factor, scratch.data(),
         partial.data() + c * r);
    }
  });
  // Chunk partial sums in double, in chunk order: the result does not depend on the thread count.
  at::Tensor out = at::zeros({r}, basis.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t c = 0; c < num_chunks; ++c)
    for (int64_t k = 0; k < r; ++k) o[k] += partial[c * r + k];
  return out.to(coefficient_dtype(dtype));
}

namespace {

// The chunked, threaded loop both update passes share (after check_update_args): `update(list_ptrs, offset, len, U_chunk, w,
// factor, scratch)` updates one chunk, given the N lists' data pointers (params first; list_ptrs[j][t] + offset *
// element size is the chunk's first element in list j), the chunk's first basis column, the coefficients
// widened to double and the gradient factor. Writes nothing when found_inf is non-zero.
template <size_t N, typename Update>
void run_update(const std::array<at::TensorList, N>& lists, const at::Tensor& basis, const at::Tensor& coeffs,
                bool maximize, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf, Update&& update) {
  const at::TensorList params = lists[0];
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) return;
  const double factor = cpu::host_gradient_factor(params[0].scalar_type(), maximize, grad_scale);
  const at::Tensor w = coeffs.to(at::kDouble).contiguous();  // exact widening of float32 coefficients
  const double* w_ptr = w.data_ptr<double>();
  std::array<std::vector<char*>, N> ptrs;
  for (size_t j = 0; j < N; ++j) ptrs[j] = cpu::data_pointers<char>(lists[j]);
  const char* U = static_cast<const char*>(basis.data_ptr());  // [r, n_total]
  const int64_t elem = params[0].element_size(), basis_elem = basis.element_size();
  const auto chunks = cpu::split_into_chunks(params, kSubspaceChunk);
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  at::parallel_for(0, num_chunks, grain_for(basis.size(1), basis.size(0), num_chunks), [&](int64_t begin, int64_t end) {
    std::vector<double> scratch(kSubspaceChunk);
    for (int64_t c = begin; c < end; ++c) {
      const cpu::Chunk& ch = chunks[c];
      std::array<char*, N> x;
      for (size_t j = 0; j < N; ++j) x[j] = ptrs[j][ch.tensor] + ch.begin * elem;
      update(x, ch.end - ch.begin, U + (ch.flat_offset + ch.begin) * basis_elem, w_ptr, factor, scratch.data());
    }
  });
}

}  // namespace

void subspace_step_cpu(at::TensorList params, at::TensorList grads, const at::Tensor& basis,
                       const at::Tensor& coeffs, double lr, double weight_decay, bool maximize,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  check_finite_scalar(lr, "lr");
  check_finite_scalar(weight_decay, "weight_decay");
  check_param_grad_lists(params, grads);
  if (params.empty()) return;
  check_update_args(params, basis, coeffs, grad_scale, found_inf);  // before the basis dtype picks the kernel
  const cpu::SubspaceStepChunkFn fn = cpu::kernel_table().subspace_step[cpu::storage_kind(params[0].scalar_type())]
                                                                       [cpu::basis_kind(basis.scalar_type())];
  const int64_t r = basis.size(0), n_total = basis.size(1);
  run_update<2>({params, grads}, basis, coeffs, maximize, grad_scale, found_inf,
                [&](const std::array<char*, 2>& x, int64_t len, const char* U, const double* w, double factor,
                    double* scratch) { fn(x[0], x[1], len, U, n_total, r, w, lr, weight_decay, factor, scratch); });
}

void subspace_momentum_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                                const at::Tensor& basis, const at::Tensor& coeffs, double lr, double momentum,
                                double weight_decay, bool maximize, const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& found_inf) {
  check_momentum_step_lists(params, grads, momentum_buffers, lr, momentum, weight_decay);
  if (params.empty()) return;
  check_update_args(params, basis, coeffs, grad_scale, found_inf);  // before the basis dtype picks the kernel
  const cpu::SubspaceMomentumChunkFn fn =
      cpu::kernel_table().subspace_momentum_step[cpu::storage_kind(params[0].scalar_type())]
                                                [cpu::basis_kind(basis.scalar_type())];
  const int64_t r = basis.size(0), n_total = basis.size(1);
  run_update<3>({params, grads, momentum_buffers}, basis, coeffs, maximize, grad_scale, found_inf,
                [&](const std::array<char*, 3>& x, int64_t len, const char* U, const double* w, double factor,
                    double* scratch) {
                  fn(x[0], x[2], x[1], len, U, n_total, r, w, lr, momentum, weight_decay, factor, scratch);
                });
}

}  // namespace mrgd_ext
