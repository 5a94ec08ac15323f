// CUDA kernels of the fused multirate subspace step (docs/design.md 1.4), two passes over all parameters at once:
//   subspace_project: c = U^T geff              U = basis [r, n_total], geff = effective_gradient(p, g)
//   subspace_step_:   p <- subspace_update(p, g, sum_k U[k, i] * coeffs[k], lr, wd, factor)
//   subspace_momentum_step_: the same with a momentum buffer (subspace_momentum_update)
// over the flat concatenation of the parameters. The per-element arithmetic is shared with the CPU kernels
// (update_math.h); only the chunking, the reductions and the launches live here.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <type_traits>

#include "mrgd_ext/checks.h"
#include "mrgd_ext/cuda_multi_tensor.cuh"
#include "mrgd_ext/update_math.h"

namespace mrgd_ext {
namespace {

// 8 Ki elements per block (32 per thread), as the CPU chunks: enough blocks to fill the GPU for a model of a
// few million parameters, and few enough partial sums ([r, num_chunks]) that the second stage is cheap.
constexpr int64_t kChunk = 1 << 13;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// NOTE: [subspace_project rank limit]
// Each thread keeps one running sum per basis row in registers, so the gradient chunk is read once for
// all r rows; the number of registers is a compile-time bucket (4, 16 or 64 sums). 64 doubles per thread
// still fits the 255-register budget of a 256-thread block. Larger ranks are refused here rather than
// silently re-reading the gradients; this is the only place that knows the limit.
constexpr int kMaxProjectRank = 64;

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// NOTE: [deterministic projection]
// No floating-point atomics anywhere: every block writes its r partial sums to its own column of a
// [r, num_chunks] workspace, and a second kernel adds each row in a fixed order. The chunk -> block
// assignment, the per-thread element order and both reduction trees depend only on the tensor sizes, so two
// calls on the same inputs give bitwise equal results. Per-thread sums (32 terms) run in the arithmetic type
// of the parameters, as the CPU chunk loops do; everything after that is in double.
template <typename scalar_t, typename basis_t, int R>
__global__ void __launch_bounds__(kThreads)
    subspace_project_kernel(const cuda::TensorPack<2> meta, const basis_t* __restrict__ U, int64_t ld, int r,
                            at::opmath_type<scalar_t> weight_decay, bool maximize, const float* __restrict__ grad_scale,
                            double* __restrict__ partial, int64_t num_chunks, int64_t chunk_base) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t factor = gradient_factor<opmath_t>(maximize, grad_scale);
  const bool decay = decays(static_cast<double>(weight_decay));  // NOTE: [no decay term]
  const cuda::ChunkWork w = cuda::find_chunk<kChunk>(meta);
  const scalar_t* __restrict__ p = static_cast<const scalar_t*>(meta.ptr[0][w.t]) + w.begin;
  const scalar_t* __restrict__ g = static_cast<const scalar_t*>(meta.ptr[1][w.t]) + w.begin;
  const basis_t* __restrict__ u = U + meta.flat_offset[w.t] + w.begin;  // column of this chunk's first element

  opmath_t acc[R];
#pragma unroll
  for (int k = 0; k < R; ++k) acc[k] = opmath_t(0);
  // Consecutive threads take consecutive elements: every load of p, g and each basis row is coalesced.
  for (int i = threadIdx.x; i < w.len; i += kThreads) {
    const opmath_t pi = static_cast<opmath_t>(p[i]), gi = static_cast<opmath_t>(g[i]);
    const opmath_t geff = decay ? effective_gradient<opmath_t, true>(pi, gi, weight_decay, factor)
                                : effective_gradient<opmath_t, false>(pi, gi, weight_decay, factor);
#pragma unroll
    for (int k = 0; k < R; ++k) {
      if (k < r) acc[k] += static_cast<opmath_t>(u[k * ld + i]) * geff;
    }
  }

  __shared__ double warp_partial[kWarps][R];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < R; ++k) {
    if (k < r) {
      const double s = warp_sum(static_cast<double>(acc[k]));
      if (lane == 0) warp_partial[warp][k] = s;
    }
  }
  __syncthreads();
  for (int k = threadIdx.x; k < r; k += kThreads) {
    double s = 0.0;
#pragma unroll
    for (int j = 0; j < kWarps; ++j) s += warp_partial[j][k];
    partial[k * num_chunks + chunk_base + blockIdx.x] = s;  // [r, num_chunks]
  }
}

// out[k] = sum over chunks of partial[k, :], one block per row, fixed order (NOTE: [deterministic projection]).
template <typename out_t>
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const double* __restrict__ partial, int64_t num_chunks, out_t* __restrict__ out) {
  const double* row = partial + blockIdx.x * num_chunks;
  double s = 0.0;
  for (int64_t j = threadIdx.x; j < num_chunks; j += kThreads) s += row[j];
  __shared__ double warp_partial[kWarps];
  s = warp_sum(s);
  if (threadIdx.x % 32 == 0) warp_partial[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
#pragma unroll
    for (int j = 0; j < kWarps; ++j) total += warp_partial[j];
    out[blockIdx.x] = static_cast<out_t>(total);
  }
}

template <typename scalar_t, typename basis_t>
__global__ void __launch_bounds__(kThreads)
    subspace_step_kernel(const cuda::TensorPack<2> meta, const basis_t* __restrict__ U, int64_t ld, int r,
                         const at::opmath_type<scalar_t>* __restrict__ coeffs, at::opmath_type<scalar_t> lr,
                         at::opmath_type<scalar_t> weight_decay, bool maximize, const float* __restrict__ grad_scale,
                         const float* __restrict__ found_inf) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // GradScaler skipped this step
  const opmath_t factor = gradient_factor<opmath_t>(maximize, grad_scale);
  const bool decay = decays(static_cast<double>(weight_decay));  // NOTE: [no decay term]
  const cuda::ChunkWork w = cuda::find_chunk<kChunk>(meta);
  scalar_t* __restrict__ p = static_cast<scalar_t*>(meta.ptr[0][w.t]) + w.begin;
  const scalar_t* __restrict__ g = static_cast<const scalar_t*>(meta.ptr[1][w.t]) + w.begin;
  const basis_t* __restrict__ u = U + meta.flat_offset[w.t] + w.begin;
  for (int i = threadIdx.x; i < w.len; i += kThreads) {
    // Summed from k = 0 upwards in the arithmetic type, as the CPU kernel does, so both round alike.
    opmath_t correction = opmath_t(0);
    for (int k = 0; k < r; ++k) correction += static_cast<opmath_t>(u[k * ld + i]) * __ldg(coeffs + k);
    const opmath_t pi = static_cast<opmath_t>(p[i]), gi = static_cast<opmath_t>(g[i]);
    p[i] = static_cast<scalar_t>(decay ? subspace_update<opmath_t, true>(pi, gi, correction, lr, weight_decay, factor)
                                       : subspace_update<opmath_t, false>(pi, gi, correction, lr, weight_decay, factor));
  }
}

// The momentum form (NOTE: [momentum subspace update]): one pass over params, grads and momentum buffers.
template <typename scalar_t, typename basis_t>
__global__ void __launch_bounds__(kThreads)
    subspace_momentum_kernel(const cuda::TensorPack<3> meta, const basis_t* __restrict__ U, int64_t ld, int r,
                             const at::opmath_type<scalar_t>* __restrict__ coeffs, at::opmath_type<scalar_t> lr,
                             at::opmath_type<scalar_t> momentum, at::opmath_type<scalar_t> weight_decay, bool maximize,
                             const float* __restrict__ grad_scale, const float* __restrict__ found_inf) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // GradScaler skipped this step
  const opmath_t factor = gradient_factor<opmath_t>(maximize, grad_scale);
  const bool decay = decays(static_cast<double>(weight_decay));  // NOTE: [no decay term]
  const cuda::ChunkWork w = cuda::find_chunk<kChunk>(meta);
  scalar_t* __restrict__ p = static_cast<scalar_t*>(meta.ptr[0][w.t]) + w.begin;
  const scalar_t* __restrict__ g = static_cast<const scalar_t*>(meta.ptr[1][w.t]) + w.begin;
  scalar_t* __restrict__ v = static_cast<scalar_t*>(meta.ptr[2][w.t]) + w.begin;
  const basis_t* __restrict__ u = U + meta.flat_offset[w.t] + w.begin;
  for (int i = threadIdx.x; i < w.len; i += kThreads) {
    opmath_t correction = opmath_t(0);  // from k = 0 upwards, as the CPU kernel
    for (int k = 0; k < r; ++k) correction += static_cast<opmath_t>(u[k * ld + i]) * __ldg(coeffs + k);
    opmath_t pi = static_cast<opmath_t>(p[i]), vi = static_cast<opmath_t>(v[i]);
    const opmath_t gi = static_cast<opmath_t>(g[i]);
    if (decay) {
      subspace_momentum_update<opmath_t, true>(pi, vi, gi, correction, lr, momentum, weight_decay, factor);
    } else {
      subspace_momentum_update<opmath_t, false>(pi, vi, gi, correction, lr, momentum, weight_decay, factor);
    }
    v[i] = static_cast<scalar_t>(vi);
    p[i] = static_cast<scalar_t>(pi);
  }
}

// Calls f(scalar_t{}, basis_t{}) for the parameter and basis dtypes (the CPU kernels' dtype sets).
template <typename F>
void dispatch_dtypes(at::ScalarType param_dtype, at::ScalarType basis_dtype, F&& f) {
  auto with_basis = [&](auto scalar_tag) {
    switch (basis_dtype) {
      case at::kFloat: return f(scalar_tag, float{});
      case at::kBFloat16: return f(scalar_tag, at::BFloat16{});
      case at::kDouble: return f(scalar_tag, double{});
      default:
        TORCH_CHECK(false, "mrgd_ext: unsupported basis dtype ", basis_dtype, " (float32, bfloat16, float64)");
    }
  };
  switch (param_dtype) {
    case at::kFloat: return with_basis(float{});
    case at::kDouble: return with_basis(double{});
    case at::kHalf: return with_basis(at::Half{});
    case at::kBFloat16: return with_basis(at::BFloat16{});
    default:
      TORCH_CHECK(false, "mrgd_ext: unsupported parameter dtype ", param_dtype, " (float32, float64, bfloat16, float16)");
  }
}

const float* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

at::Tensor subspace_project_cuda(at::TensorList params, at::TensorList grads, const at::Tensor& basis,
                                 double weight_decay, bool maximize, const std::optional<at::Tensor>& grad_scale) {
  check_finite_scalar(weight_decay, "weight_decay");
  check_param_grad_lists(params, grads);
  if (params.empty()) {  // as the CPU kernel: U^T g over zero elements is the zero vector
    TORCH_CHECK(basis.dim() == 2 && basis.size(1) == 0, "mrgd_ext: basis must be [r, 0] for an empty parameter list");
    return at::zeros({basis.size(0)}, basis.options().dtype(at::kFloat));
  }
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "mrgd_ext: the CUDA subspace_project got tensors on ", device);
  check_basis(basis, total_numel(params), device);
  check_scalar_flag(grad_scale, "grad_scale", device);
  const at::ScalarType dtype = params[0].scalar_type();
  const int64_t r = basis.size(0);
  const int64_t n_total = basis.size(1);
  TORCH_CHECK(r <= kMaxProjectRank, "mrgd_ext: the CUDA subspace_project supports bases of at most ",
              kMaxProjectRank, " rows, got ", r);
  const c10::cuda::CUDAGuard guard(device);
  const int64_t num_chunks = cuda::count_chunks<kChunk>(params);
  const auto out_options = basis.options().dtype(coefficient_dtype(dtype));
  if (r == 0 || num_chunks == 0) return at::zeros({r}, out_options);  // only zero-size parameters
  at::Tensor out = at::empty({r}, out_options);  // every entry written by sum_partials_kernel

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor partial = at::empty({r, num_chunks}, basis.options().dtype(at::kDouble));
  double* partial_ptr = partial.data_ptr<double>();
  const float* scale_ptr = optional_ptr(grad_scale);
  const int ri = static_cast<int>(r);
  dispatch_dtypes(dtype, basis.scalar_type(), [&](auto scalar_tag, auto basis_tag) {
    using scalar_t = decltype(scalar_tag);
    using basis_t = decltype(basis_tag);
    using opmath_t = at::opmath_type<scalar_t>;
    const basis_t* U = static_cast<const basis_t*>(basis.data_ptr());
    auto launch_with = [&](auto bucket) {
      constexpr int R = decltype(bucket)::value;
      cuda::for_each_launch<kChunk, 2>({params, grads}, [&](const cuda::TensorPack<2>& meta, int64_t blocks, int64_t chunk_base) {
        subspace_project_kernel<scalar_t, basis_t, R><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            meta, U, n_total, ri, static_cast<opmath_t>(weight_decay), maximize, scale_ptr, partial_ptr, num_chunks,
            chunk_base);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    if (r <= 4) launch_with(std::integral_constant<int, 4>{});
    else if (r <= 16) launch_with(std::integral_constant<int, 16>{});
    else launch_with(std::integral_constant<int, kMaxProjectRank>{});
    using out_t = opmath_t;  // float32, or float64 for float64 parameters (coefficient_dtype)
    sum_partials_kernel<out_t><<<static_cast<unsigned>(r), kThreads, 0, stream>>>(partial_ptr, num_chunks,
                                                                                   out.data_ptr<out_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// The checks (check_update_args in checks.h, shared with the CPU) and the launches both update passes share:
// `launch(scalar_tag, basis_tag, meta, blocks, stream, U, n_total, rows, coeffs, grad_scale, found_inf)` starts
// one kernel over a pack of the N lists (params first).
template <int N, typename Launch>
void launch_update(const std::array<at::TensorList, N>& lists, const at::Tensor& basis, const at::Tensor& coeffs,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                   const char* op, Launch&& launch) {
  const at::TensorList params = lists[0];
  TORCH_CHECK(params[0].device().is_cuda(), "mrgd_ext: the CUDA ", op, " got tensors on ", params[0].device());
  check_update_args(params, basis, coeffs, grad_scale, found_inf);
  // The update loops over the rows at run time (one running sum per element), so it has no rank limit.
  TORCH_CHECK(basis.size(0) <= INT32_MAX, "mrgd_ext: basis has too many rows");
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int rows = static_cast<int>(basis.size(0));
  const float* scale_ptr = optional_ptr(grad_scale);
  const float* inf_ptr = optional_ptr(found_inf);
  dispatch_dtypes(params[0].scalar_type(), basis.scalar_type(), [&](auto scalar_tag, auto basis_tag) {
    using scalar_t = decltype(scalar_tag);
    using basis_t = decltype(basis_tag);
    using opmath_t = at::opmath_type<scalar_t>;
    const basis_t* U = static_cast<const basis_t*>(basis.data_ptr());
    // coeffs has the arithmetic type of the parameters (coefficient_dtype == opmath type), checked above.
    const opmath_t* w = static_cast<const opmath_t*>(coeffs.data_ptr());
    cuda::for_each_launch<kChunk, N>(lists, [&](const cuda::TensorPack<N>& meta, int64_t blocks, int64_t) {
      launch(scalar_tag, basis_tag, meta, static_cast<unsigned>(blocks), stream, U, basis.size(1), rows, w, scale_ptr,
             inf_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void subspace_step_cuda(at::TensorList params, at::TensorList grads, const at::Tensor& basis,
                        const at::Tensor& coeffs, double lr, double weight_decay, bool maximize,
                        const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  check_finite_scalar(lr, "lr");
  check_finite_scalar(weight_decay, "weight_decay");
  check_param_grad_lists(params, grads);
  if (params.empty()) return;
  launch_update<2>({params, grads}, basis, coeffs, grad_scale, found_inf, "subspace_step_",
                   [&](auto scalar_tag, auto basis_tag, const cuda::TensorPack<2>& meta, unsigned blocks,
                       cudaStream_t stream, const auto* U, int64_t ld, int rows, const auto* w, const float* scale,
                       const float* inf) {
                     using scalar_t = decltype(scalar_tag);
                     using opmath_t = at::opmath_type<scalar_t>;
                     subspace_step_kernel<scalar_t, decltype(basis_tag)><<<blocks, kThreads, 0, stream>>>(
                         meta, U, ld, rows, w, static_cast<opmath_t>(lr), static_cast<opmath_t>(weight_decay),
                         maximize, scale, inf);
                   });
}

void subspace_momentum_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                                 const at::Tensor& basis, const at::Tensor& coeffs, double lr, double momentum,
                                 double weight_decay, bool maximize, const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& found_inf) {
  check_momentum_step_lists(params, grads, momentum_buffers, lr, momentum, weight_decay);
  if (params.empty()) return;
  launch_update<3>({params, grads, momentum_buffers}, basis, coeffs, grad_scale, found_inf, "subspace_momentum_step_",
                   [&](auto scalar_tag, auto basis_tag, const cuda::TensorPack<3>& meta, unsigned blocks,
                       cudaStream_t stream, const auto* U, int64_t ld, int rows, const auto* w, const float* scale,
                       const float* inf) {
                     using scalar_t = decltype(scalar_tag);
                     using opmath_t = at::opmath_type<scalar_t>;
                     subspace_momentum_kernel<scalar_t, decltype(basis_tag)><<<blocks, kThreads, 0, stream>>>(
                         meta, U, ld, rows, w, static_cast<opmath_t>(lr), static_cast<opmath_t>(momentum),
                         static_cast<opmath_t>(weight_decay), maximize, scale, inf);
                   });
}

}  // namespace
}  // namespace mrgd_ext

TORCH_LIBRARY_IMPL(mrgd_ext, CUDA, m) {
  m.impl("subspace_momentum_step_", &mrgd_ext::subspace_momentum_step_cuda);
  m.impl("subspace_project", &mrgd_ext::subspace_project_cuda);
  m.impl("subspace_step_", &mrgd_ext::subspace_step_cuda);
}
