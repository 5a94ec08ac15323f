// CUDA kernel of the fused multi-tensor multirate step: p <- multirate_update(p, g, lr, wd, factor) for every
// element of every tensor of one (device, dtype) group, in one launch per kMaxTensors tensors.
// The per-element arithmetic is mrgd_ext::multirate_update (update_math.h), shared with the CPU kernels.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "mrgd_ext/checks.h"
#include "mrgd_ext/cuda_multi_tensor.cuh"
#include "mrgd_ext/update_math.h"

namespace mrgd_ext {
namespace {

// NOTE: [step chunk size]
// 16 Ki elements per block (64 per thread): small enough that a 10 M-parameter model yields ~600 blocks,
// several per SM for latency hiding, large enough that the per-block setup (search, factor) is negligible.
constexpr int64_t kChunk = 1 << 14;
constexpr int kThreads = 256;
constexpr int kVecBytes = 16;

// A 16-byte group of elements, so one load/store instruction moves it (ld.global.v4).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

__device__ __forceinline__ bool aligned16(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % kVecBytes == 0;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    multirate_step_kernel(const cuda::TensorPack meta, at::opmath_type<scalar_t> lr, at::opmath_type<scalar_t> weight_decay,
                          bool maximize, const float* __restrict__ grad_scale, const float* __restrict__ found_inf) {
  using opmath_t = at::opmath_type<scalar_t>;
  // GradScaler found inf/nan in this step's gradients: leave every parameter untouched. Read on the device,
  // so the host never waits for the flag.
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const opmath_t factor = gradient_factor<opmath_t>(maximize, grad_scale);

  const cuda::ChunkWork w = cuda::find_chunk<kChunk>(meta);
  const int len = w.len;
  scalar_t* __restrict__ p = static_cast<scalar_t*>(meta.p[w.t]) + w.begin;
  const scalar_t* __restrict__ g = static_cast<const scalar_t*>(meta.g[w.t]) + w.begin;

  // NOTE: [vector path and scalar tail]
  // Chunk starts are multiples of kChunk elements, so a chunk is 16-byte aligned when its tensor's storage
  // is. Aligned chunks move 16 bytes per load/store and finish the last len % V elements one by one;
  // a misaligned tensor (a view at an odd storage offset) takes the scalar loop throughout. The arithmetic
  // is identical on both paths.
  constexpr int V = kVecBytes / sizeof(scalar_t);
  using pack_t = Pack<scalar_t, V>;
  int scalar_begin = 0;
  if (aligned16(p) && aligned16(g)) {
    const int num_packs = len / V;
    for (int j = threadIdx.x; j < num_packs; j += kThreads) {
      pack_t pp = reinterpret_cast<const pack_t*>(p)[j];
      const pack_t gp = reinterpret_cast<const pack_t*>(g)[j];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        pp.v[e] = static_cast<scalar_t>(multirate_update<opmath_t>(
            static_cast<opmath_t>(pp.v[e]), static_cast<opmath_t>(gp.v[e]), lr, weight_decay, factor));
      }
      reinterpret_cast<pack_t*>(p)[j] = pp;
    }
    scalar_begin = num_packs * V;
  }
  for (int i = scalar_begin + threadIdx.x; i < len; i += kThreads) {
    p[i] = static_cast<scalar_t>(multirate_update<opmath_t>(static_cast<opmath_t>(p[i]),
                                                            static_cast<opmath_t>(g[i]), lr, weight_decay, factor));
  }
}

template <typename scalar_t>
void launch_multirate_step(at::TensorList params, at::TensorList grads, double lr, double weight_decay,
                           bool maximize, const float* grad_scale, const float* found_inf) {
  using opmath_t = at::opmath_type<scalar_t>;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cuda::for_each_launch<kChunk>(params, grads, [&](const cuda::TensorPack& pack, int64_t blocks, int64_t) {
    multirate_step_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        pack, static_cast<opmath_t>(lr), static_cast<opmath_t>(weight_decay), maximize, grad_scale, found_inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void multirate_step_cuda(at::TensorList params, at::TensorList grads, double lr, double weight_decay,
                         bool maximize, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf) {
  check_param_grad_lists(params, grads);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "mrgd_ext: the CUDA multirate_step_ got tensors on ", device);
  check_scalar_flag(grad_scale, "grad_scale", device);
  check_scalar_flag(found_inf, "found_inf", device);
  const c10::cuda::CUDAGuard guard(device);
  const float* scale_ptr = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
  const float* inf_ptr = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  switch (params[0].scalar_type()) {
    case at::kFloat:
      return launch_multirate_step<float>(params, grads, lr, weight_decay, maximize, scale_ptr, inf_ptr);
    case at::kDouble:
      return launch_multirate_step<double>(params, grads, lr, weight_decay, maximize, scale_ptr, inf_ptr);
    case at::kHalf:
      return launch_multirate_step<at::Half>(params, grads, lr, weight_decay, maximize, scale_ptr, inf_ptr);
    case at::kBFloat16:
      return launch_multirate_step<at::BFloat16>(params, grads, lr, weight_decay, maximize, scale_ptr, inf_ptr);
    default:
      TORCH_CHECK(false, "mrgd_ext: unsupported parameter dtype ", params[0].scalar_type(),
                  " (float32, float64, bfloat16, float16)");
  }
}

}  // namespace
}  // namespace mrgd_ext

TORCH_LIBRARY_IMPL(mrgd_ext, CUDA, m) {
  m.impl("multirate_step_", &mrgd_ext::multirate_step_cuda);
}
