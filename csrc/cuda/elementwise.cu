// CUDA backend of the element-wise multi-tensor ops (NOTE: [element-wise ops] in elementwise_ops.h): one
// kernel template, Fn::apply on every element of every tensor of N lists of one (device, dtype) group, in
// one launch per TensorPack<N>::kMaxTensors tensors. The per-element arithmetic is the functor's, shared
// with the CPU kernels. Registers every op of MRGD_ELEMENTWISE_OPS for CUDA.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "mrgd_ext/cuda_multi_tensor.cuh"
#include "mrgd_ext/elementwise_op.h"
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

// The scalars of one launch, by value; with a gradient factor, the kernel computes it from maximize and the
// device-resident grad_scale into s[Fn::kScalars], and skips the update when found_inf is non-zero.
template <typename Fn, typename opmath_t>
struct ScalarArgs {
  opmath_t s[kNumScalars<Fn> + 1];  // + 1: an op may take no scalars
  bool maximize;
  const float* grad_scale;
  const float* found_inf;
};

template <typename Fn, typename opmath_t>
__device__ __forceinline__ void apply_element(opmath_t* x, const opmath_t* s, bool decay) {
  if (decay) {
    Fn::template apply<opmath_t, true>(x, s);
  } else {
    Fn::template apply<opmath_t, false>(x, s);
  }
}

template <typename Fn, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    elementwise_kernel(const cuda::TensorPack<Fn::kLists> meta, ScalarArgs<Fn, at::opmath_type<scalar_t>> args) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int N = Fn::kLists;
  if constexpr (Fn::kGradFactor) {
    // GradScaler found inf/nan in this step's gradients: leave every tensor untouched. Read on the device,
    // so the host never waits for the flag.
    if (args.found_inf != nullptr && *args.found_inf != 0.0f) return;
    args.s[Fn::kScalars] = gradient_factor<opmath_t>(args.maximize, args.grad_scale);
  }

  // Uniform across the launch, so the branch in apply_element never diverges (NOTE: [no decay term]).
  const bool decay = Fn::kDecayScalar < 0 || decays(static_cast<double>(args.s[Fn::kDecayScalar]));
  const cuda::ChunkWork w = cuda::find_chunk<kChunk>(meta);
  const int len = w.len;
  scalar_t* ptr[N];
  bool aligned = true;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    ptr[j] = static_cast<scalar_t*>(meta.ptr[j][w.t]) + w.begin;
    aligned = aligned && aligned16(ptr[j]);
  }

  // NOTE: [vector path and scalar tail]
  // Chunk starts are multiples of kChunk elements, so a chunk is 16-byte aligned when its tensors' storage
  // is. Aligned chunks move 16 bytes per load/store and finish the last len % V elements one by one;
  // a misaligned tensor (a view at an odd storage offset) takes the scalar loop throughout. The arithmetic
  // is identical on both paths.
  constexpr int V = kVecBytes / sizeof(scalar_t);
  using pack_t = Pack<scalar_t, V>;
  int scalar_begin = 0;
  if (aligned) {
    const int num_packs = len / V;
    for (int i = threadIdx.x; i < num_packs; i += kThreads) {
      pack_t packs[N];
#pragma unroll
      for (int j = 0; j < N; ++j) packs[j] = reinterpret_cast<const pack_t*>(ptr[j])[i];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        opmath_t x[N];
#pragma unroll
        for (int j = 0; j < N; ++j) x[j] = static_cast<opmath_t>(packs[j].v[e]);
        apply_element<Fn>(x, args.s, decay);
#pragma unroll
        for (int j = 0; j < Fn::kUpdated; ++j) packs[j].v[e] = static_cast<scalar_t>(x[j]);
      }
#pragma unroll
      for (int j = 0; j < Fn::kUpdated; ++j) reinterpret_cast<pack_t*>(ptr[j])[i] = packs[j];
    }
    scalar_begin = num_packs * V;
  }
  for (int i = scalar_begin + threadIdx.x; i < len; i += kThreads) {
    opmath_t x[N];
#pragma unroll
    for (int j = 0; j < N; ++j) x[j] = static_cast<opmath_t>(ptr[j][i]);
    apply_element<Fn>(x, args.s, decay);
#pragma unroll
    for (int j = 0; j < Fn::kUpdated; ++j) ptr[j][i] = static_cast<scalar_t>(x[j]);
  }
}

template <typename Fn, typename scalar_t>
void launch(const ElementwiseCall<Fn>& call) {
  using opmath_t = at::opmath_type<scalar_t>;
  ScalarArgs<Fn, opmath_t> args{};
  for (int k = 0; k < Fn::kScalars; ++k) args.s[k] = static_cast<opmath_t>(call.scalars[k]);
  args.maximize = call.maximize;
  args.grad_scale = call.grad_scale ? call.grad_scale->template data_ptr<float>() : nullptr;
  args.found_inf = call.found_inf ? call.found_inf->template data_ptr<float>() : nullptr;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cuda::for_each_launch<kChunk, Fn::kLists>(
      call.lists, [&](const cuda::TensorPack<Fn::kLists>& pack, int64_t blocks, int64_t) {
        elementwise_kernel<Fn, scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(pack, args);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

struct CudaBackend {
  template <typename Fn>
  static void run(ElementwiseCall<Fn>& call) {
    const at::Device device = call.lists[0][0].device();
    TORCH_CHECK(device.is_cuda(), "mrgd_ext: the CUDA ", Fn::kName, " got tensors on ", device);
    const c10::cuda::CUDAGuard guard(device);
    switch (call.lists[0][0].scalar_type()) {
      case at::kFloat: return launch<Fn, float>(call);
      case at::kDouble: return launch<Fn, double>(call);
      case at::kHalf: return launch<Fn, at::Half>(call);
      case at::kBFloat16: return launch<Fn, at::BFloat16>(call);
      default:
        TORCH_CHECK(false, "mrgd_ext: unsupported parameter dtype ", call.lists[0][0].scalar_type(),
                    " (float32, float64, bfloat16, float16)");
    }
  }
};

}  // namespace
}  // namespace mrgd_ext

TORCH_LIBRARY_IMPL(mrgd_ext, CUDA, m) {
#define MRGD_REGISTER_CUDA(Fn) m.impl(mrgd_ext::Fn::kName, mrgd_ext::ElementwiseOp<mrgd_ext::Fn, mrgd_ext::CudaBackend>::fn());
  MRGD_ELEMENTWISE_OPS(MRGD_REGISTER_CUDA)
#undef MRGD_REGISTER_CUDA
}
