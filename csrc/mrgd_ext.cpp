// Every operator schema of the mrgd_ext namespace, the CPU kernels of the operators that are not element-wise
// (the element-wise ones register themselves from MRGD_ELEMENTWISE_OPS, NOTE: [element-wise ops]), and the
// pybind11 module mrgd_ext._C (build information). Importing mrgd_ext._C loads this library, which registers
// the schemas below and the CPU (and, in a CUDA build, CUDA) implementations of csrc/cpu and csrc/cuda. The
// Python side lists the same operators once, in python/mrgd_ext/ops/registry.py (fake implementations,
// references, dtypes); tests/test_registry.py checks that the two agree.
#include <pybind11/pybind11.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "mrgd_ext/cpu_kernel_table.h"

#include "mrgd_ext/lanczos.h"
#include "mrgd_ext/ops.h"

TORCH_LIBRARY(mrgd_ext, m) {
  // Element-wise ops (one functor each in csrc/include/mrgd_ext/elementwise_ops.h):
  // fused multi-tensor multirate (temporal) step: every parameter of one (device, dtype) group in one call.
  m.def(
      "multirate_step_(Tensor(a!)[] params, Tensor[] grads, float lr, float weight_decay, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Pass 1 of the multirate subspace step: c = U^T geff, U = basis [r, n_total] over all parameters.
  m.def(
      "subspace_project(Tensor[] params, Tensor[] grads, Tensor basis, float weight_decay, bool maximize, "
      "Tensor? grad_scale=None) -> Tensor");
  // Pass 2: p <- p - lr * geff - U^T-weighted correction with per-column coefficients.
  m.def(
      "subspace_step_(Tensor(a!)[] params, Tensor[] grads, Tensor basis, Tensor coeffs, float lr, "
      "float weight_decay, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Pass 2 in the momentum form (AutoMrGD's accelerated step): d = lr * geff + U^T-weighted correction,
  // momentum_buffers <- momentum * momentum_buffers + d, params <- params - d - momentum * momentum_buffers.
  m.def(
      "subspace_momentum_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor basis, "
      "Tensor coeffs, float lr, float momentum, float weight_decay, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  // Lanczos: `rounds` rounds of classical Gram-Schmidt of the rows of `vectors` [b, n] against the
  // orthonormal rows of `basis` [m, n], in place, plus the Gram matrix of the result and the squared norms of
  // the input rows, in as few passes over n as the data dependencies allow (csrc/include/mrgd_ext/lanczos.h).
  m.def(
      "block_orthogonalize_(Tensor basis, Tensor(a!) vectors, int rounds=2) -> (Tensor coeffs, Tensor gram, "
      "Tensor in_norms_sq)");
}

TORCH_LIBRARY_IMPL(mrgd_ext, CPU, m) {
  m.impl("subspace_project", &mrgd_ext::subspace_project_cpu);
  m.impl("subspace_step_", &mrgd_ext::subspace_step_cpu);
  m.impl("subspace_momentum_step_", &mrgd_ext::subspace_momentum_step_cpu);
  m.impl("block_orthogonalize_", &mrgd_ext::block_orthogonalize_cpu);
}

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "mrgd_ext compiled extension: loads the mrgd_ext operator registrations and reports build facts";
  m.def(
      "build_info",
      []() {
        py::dict info;
        info["version"] = MRGD_VERSION;
        info["torch_version"] = MRGD_TORCH_VERSION;
#ifdef MRGD_WITH_CUDA
        info["cuda"] = true;
        info["cuda_archs"] = MRGD_CUDA_ARCHS;
        info["torch_cuda_version"] = MRGD_TORCH_CUDA_VERSION;
#else
        info["cuda"] = false;
        info["cuda_archs"] = "";
        info["torch_cuda_version"] = MRGD_TORCH_CUDA_VERSION;
#endif
        // The CPU kernels thread through ATen's parallel_for; it forks OpenMP threads only when torch uses
        // the OpenMP backend and this library was compiled with OpenMP (NOTE: [OpenMP] in CMakeLists.txt).
#if defined(_OPENMP) && AT_PARALLEL_OPENMP
        info["openmp"] = true;
#else
        info["openmp"] = false;
#endif
        info["cpu_isa"] = mrgd_ext::cpu::kernel_table().isa;
        info["cpu_isas_available"] = mrgd_ext::cpu::available_isas();
        return info;
      },
      "Facts about this build: versions, whether CUDA kernels were compiled, CUDA archs, OpenMP, CPU ISA.");
  m.def(
      "_set_cpu_isa",
      [](const std::string& name) {
        if (!mrgd_ext::cpu::set_isa(name.c_str()))
          throw py::value_error("cpu isa '" + name + "' is not available here (have: " +
                                mrgd_ext::cpu::available_isas() + ", or 'auto')");
      },
      "Select the CPU kernel table: 'auto', 'baseline' or 'avx2' (for tests and benchmarks).");
}
