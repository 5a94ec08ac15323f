// CUDA kernel of mrgd_ext::block_orthogonalize_ (schema and semantics: csrc/include/mrgd_ext/lanczos.h):
// `rounds` rounds of classical Gram-Schmidt of the rows of V [b, n] against the orthonormal rows of Q [m, n],
// the Gram matrix of the result and the squared norms of the input, in rounds + 1 passes over n, as the CPU
// kernel does (NOTE: [fused passes] in csrc/cpu/block_orthogonalize.cpp). The per-element arithmetic is
// shared with the CPU loops (lanczos_math.h); only the tiling, the reductions and the launches live here.
//
// NOTE: [CUDA orthogonalisation tiling]
// One pass = one launch of a fixed grid of at most kMaxBlocks blocks; block g takes the column chunks
// g, g + grid, g + 2 grid, ... A chunk holds L columns of all b rows of V in shared memory (L chosen so that
// b * L elements fill at most kSharedBytes): the threads first bring the chunk in, subtracting the previous
// round's coefficients column by column (each thread keeps its column's b values in registers and reads Q
// once), write the updated columns back, and then reduce against the chunk in shared memory: warp w owns
// basis rows w, w + 8, ... for the projections (Q rows read once more, coalesced, usually from L2 right
// after the subtraction read them) and pairs (j, l) for the Gram matrix and norms. So V is read and written
// once per pass and Q is read once per pass for the subtraction and once for the projection; the rows of V
// never leave shared memory in between.
//
// NOTE: [CUDA orthogonalisation floor]
// Bytes per call with s-byte elements: the subtraction passes read Q (m n s) and V (b n s) and write V, the
// projection re-reads Q, mostly from L2; the floor is about (rounds + 1) (m + 2 b) n s from DRAM plus rounds
// L2 re-reads of Q. The cuBLAS composition (two rounds of V Q^T and V -= C Q, then V V^T) reads Q four times
// from DRAM and V about seven times. Expected: up to ~1.3x for m >> b, where reading Q dominates, more
// for small m, where the composition's five launches and split-K reductions dominate. Not yet measured;
// "auto" keeps the composition until benchmarks/bench_lanczos_step.py --device cuda says otherwise.
//
// NOTE: [CUDA orthogonalisation determinism]
// No atomics: each warp adds its sums into its block's own slot of a [grid, ...] double workspace (one
// owner per slot), and a second kernel adds the grid's slots in a fixed order. Per-lane sums (L / 32 terms)
// run in the storage type, as the CPU sub-chunk sums do, and everything after in double; the grid, L and
// every order depend only on the shapes, so two calls on the same inputs agree bitwise. The subtraction uses
// the coefficients rounded to the storage type, summed over k = 0.. in order, as the CPU kernel does (and
// nvcc's --fmad=false keeps v - c q from contracting, NOTE: [CUDA rounding] in CMakeLists.txt).
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "mrgd_ext/lanczos.h"
#include "mrgd_ext/lanczos_math.h"

namespace mrgd_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Shared memory per block for the V chunk: small enough for several resident blocks per SM and under the
// 48 KiB that needs no opt-in.
constexpr int64_t kSharedBytes = 32 << 10;
// Grid size cap: enough resident blocks to fill an H100/H200 (132 SMs x 4-7 blocks), and it bounds the
// workspace of partial sums to kMaxBlocks * b * (m + b + 1) doubles.
constexpr int64_t kMaxBlocks = 1024;
// Rows of V a thread keeps in registers during the subtraction (compile-time buckets below).
constexpr int kMaxRows = 32;

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

struct PassParams {
  const void* basis;  // Q [m, ldq]
  int64_t ldq;
  int m;
  void* vectors;  // V [b, ldv]
  int64_t ldv;
  int b;
  int64_t n;
  int64_t chunk;      // L: columns per chunk
  int64_t num_chunks;
  const void* coef;   // [b, m] coefficients in the storage type to subtract first; nullptr: none
  bool project;       // accumulate V Q^T of the (updated) chunk into proj_part [grid, b, m]
  bool gram;          // accumulate V V^T (upper triangle) into gram_part [grid, b, b]
  bool norms;         // accumulate |rows of V|^2 (as read, before any subtraction) into norm_part [grid, b]
  double* proj_part;
  double* gram_part;
  double* norm_part;
};

// Index (j, l), j <= l, of the p-th entry of the upper triangle of a b x b matrix, row by row.
__device__ __forceinline__ void upper_pair(int p, int b, int& j, int& l) {
  j = 0;
  while (p >= b - j) {
    p -= b - j;
    ++j;
  }
  l = j + p;
}

template <typename scalar_t, int B>
__global__ void __launch_bounds__(kThreads) orthogonalize_pass_kernel(const PassParams a) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  scalar_t* vs = reinterpret_cast<scalar_t*>(shared_raw);  // [b, L]
  const scalar_t* __restrict__ Q = static_cast<const scalar_t*>(a.basis);
  scalar_t* __restrict__ V = static_cast<scalar_t*>(a.vectors);
  const scalar_t* __restrict__ coef = static_cast<const scalar_t*>(a.coef);
  const int b = a.b, m = a.m;
  const int64_t L = a.chunk;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  double* proj = a.proj_part + static_cast<int64_t>(blockIdx.x) * b * m;
  double* gram = a.gram_part + static_cast<int64_t>(blockIdx.x) * b * b;
  double* norm = a.norm_part + static_cast<int64_t>(blockIdx.x) * b;

  for (int64_t chunk = blockIdx.x; chunk < a.num_chunks; chunk += gridDim.x) {
    const int64_t c0 = chunk * L;
    const int len = static_cast<int>(min(L, a.n - c0));
    // 1. Bring the chunk in; subtract sum_k coef[j, k] q_k first when this pass has coefficients.
    for (int i = threadIdx.x; i < len; i += kThreads) {
      scalar_t v[B];
#pragma unroll
      for (int j = 0; j < B; ++j) {
        if (j < b) v[j] = V[j * a.ldv + c0 + i];
      }
      if (coef != nullptr) {
        for (int k = 0; k < m; ++k) {
          const scalar_t q = Q[k * a.ldq + c0 + i];
#pragma unroll
          for (int j = 0; j < B; ++j) {
            if (j < b) v[j] = orthogonalize_update<scalar_t>(v[j], __ldg(coef + j * m + k), q);
          }
        }
#pragma unroll
        for (int j = 0; j < B; ++j) {
          if (j < b) V[j * a.ldv + c0 + i] = v[j];
        }
      }
#pragma unroll
      for (int j = 0; j < B; ++j) {
        if (j < b) vs[j * L + i] = v[j];
      }
    }
    __syncthreads();

    // 2. Reductions against the chunk in shared memory; every slot has one owning warp (NOTE: [CUDA
    // orthogonalisation determinism]), and the loop bounds are uniform within a warp, so the shuffles see
    // all 32 lanes.
    if (a.project) {
      for (int k = warp; k < m; k += kWarps) {
        scalar_t acc[B];
#pragma unroll
        for (int j = 0; j < B; ++j) acc[j] = scalar_t(0);
        for (int i = lane; i < len; i += 32) {
          const scalar_t q = Q[k * a.ldq + c0 + i];
#pragma unroll
          for (int j = 0; j < B; ++j) {
            if (j < b) acc[j] = dot_update<scalar_t>(acc[j], vs[j * L + i], q);
          }
        }
#pragma unroll
        for (int j = 0; j < B; ++j) {
          if (j < b) {
            const double s = warp_sum(static_cast<double>(acc[j]));
            if (lane == 0) proj[j * m + k] += s;
          }
        }
      }
    }
    if (a.norms) {
      for (int j = warp; j < b; j += kWarps) {
        scalar_t acc = scalar_t(0);
        for (int i = lane; i < len; i += 32) acc = dot_update<scalar_t>(acc, vs[j * L + i], vs[j * L + i]);
        const double s = warp_sum(static_cast<double>(acc));
        if (lane == 0) norm[j] += s;
      }
    }
    if (a.gram) {
      const int pairs = b * (b + 1) / 2;
      for (int p = warp; p < pairs; p += kWarps) {
        int j, l;
        upper_pair(p, b, j, l);
        scalar_t acc = scalar_t(0);
        for (int i = lane; i < len; i += 32) acc = dot_update<scalar_t>(acc, vs[j * L + i], vs[l * L + i]);
        const double s = warp_sum(static_cast<double>(acc));
        if (lane == 0) gram[j * b + l] += s;
      }
    }
    __syncthreads();  // the next chunk overwrites the shared rows
  }
}

// out[idx] (+)= sum over g of part[g * count + idx], g in order (NOTE: [CUDA orthogonalisation determinism]).
template <typename out_t>
__global__ void __launch_bounds__(kThreads)
    sum_blocks_kernel(const double* __restrict__ part, int64_t grid, int64_t count, out_t* __restrict__ out,
                      double* __restrict__ accumulate) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= count) return;
  double s = 0.0;
  for (int64_t g = 0; g < grid; ++g) s += part[g * count + idx];
  if (out != nullptr) out[idx] = static_cast<out_t>(s);
  if (accumulate != nullptr) accumulate[idx] += s;
}

// gram [b, b]: the lower triangle from the upper one.
__global__ void mirror_upper_kernel(double* __restrict__ gram, int b) {
  const int idx = blockIdx.x * kThreads + threadIdx.x;
  if (idx >= b * b) return;
  const int j = idx / b, l = idx % b;
  if (l < j) gram[idx] = gram[l * b + j];
}

unsigned blocks_for(int64_t count) { return static_cast<unsigned>((count + kThreads - 1) / kThreads); }

template <typename scalar_t>
void launch_pass(const PassParams& a, int64_t grid, size_t shared, cudaStream_t stream) {
  auto go = [&](auto bucket) {
    constexpr int B = decltype(bucket)::value;
    orthogonalize_pass_kernel<scalar_t, B><<<static_cast<unsigned>(grid), kThreads, shared, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (a.b <= 1) go(std::integral_constant<int, 1>{});
  else if (a.b <= 4) go(std::integral_constant<int, 4>{});
  else if (a.b <= 8) go(std::integral_constant<int, 8>{});
  else if (a.b <= 16) go(std::integral_constant<int, 16>{});
  else go(std::integral_constant<int, kMaxRows>{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_orthogonalize_cuda(const at::Tensor& basis,
                                                                        const at::Tensor& vectors, int64_t rounds) {
  check_block_orthogonalize_args(basis, vectors, rounds);
  TORCH_CHECK(vectors.device().is_cuda(), "mrgd_ext: the CUDA block_orthogonalize_ got tensors on ",
              vectors.device());
  const int64_t m = basis.size(0), b = vectors.size(0), n = vectors.size(1);
  TORCH_CHECK(b <= kMaxRows, "mrgd_ext: the CUDA block_orthogonalize_ takes at most ", kMaxRows,
              " vectors per call, got ", b);
  TORCH_CHECK(m <= INT32_MAX, "mrgd_ext: basis has too many rows");
  const c10::cuda::CUDAGuard guard(vectors.device());
  const auto opts = vectors.options().dtype(at::kDouble);
  at::Tensor coeffs = at::zeros({b, m}, opts);
  at::Tensor gram = at::zeros({b, b}, opts);
  at::Tensor norms = at::zeros({b}, opts);
  if (b == 0 || n == 0) return {coeffs, gram, norms};

  const int64_t elem = vectors.element_size();
  // L: the most columns of b rows that fit kSharedBytes, a multiple of 32 (whole warps), at most 8 Ki.
  const int64_t chunk = std::clamp<int64_t>(kSharedBytes / (b * elem) / 32 * 32, 32, 8192);
  const int64_t num_chunks = (n + chunk - 1) / chunk;
  const int64_t grid = std::min(num_chunks, kMaxBlocks);
  const size_t shared = static_cast<size_t>(b * chunk * elem);
  const int64_t eff_rounds = m == 0 ? 0 : rounds;  // nothing to project against an empty basis
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor proj_part = at::empty({grid, b, m}, opts);
  at::Tensor gram_part = at::zeros({grid, b, b}, opts);
  at::Tensor norm_part = at::zeros({grid, b}, opts);
  at::Tensor coef_storage = at::empty({b, m}, vectors.options());

  PassParams a{};
  a.basis = basis.data_ptr();
  a.ldq = leading_dim(basis);
  a.m = static_cast<int>(m);
  a.vectors = vectors.data_ptr();
  a.ldv = leading_dim(vectors);
  a.b = static_cast<int>(b);
  a.n = n;
  a.chunk = chunk;
  a.num_chunks = num_chunks;
  a.proj_part = proj_part.data_ptr<double>();
  a.gram_part = gram_part.data_ptr<double>();
  a.norm_part = norm_part.data_ptr<double>();

  const bool f64 = vectors.scalar_type() == at::kDouble;
  for (int64_t pass = 0; pass <= eff_rounds; ++pass) {
    a.coef = pass > 0 ? coef_storage.data_ptr() : nullptr;
    a.project = pass < eff_rounds;
    a.gram = pass == eff_rounds;
    a.norms = pass == 0;
    if (a.project) proj_part.zero_();
    if (f64) launch_pass<double>(a, grid, shared, stream);
    else launch_pass<float>(a, grid, shared, stream);
    if (a.project) {
      // This round's coefficients: in the storage type for the next pass's subtraction, and added in double
      // to the returned total.
      const int64_t count = b * m;
      if (f64) {
        sum_blocks_kernel<double><<<blocks_for(count), kThreads, 0, stream>>>(
            a.proj_part, grid, count, coef_storage.data_ptr<double>(), coeffs.data_ptr<double>());
      } else {
        sum_blocks_kernel<float><<<blocks_for(count), kThreads, 0, stream>>>(
            a.proj_part, grid, count, coef_storage.data_ptr<float>(), coeffs.data_ptr<double>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  sum_blocks_kernel<double><<<blocks_for(b), kThreads, 0, stream>>>(a.norm_part, grid, b, norms.data_ptr<double>(),
                                                                    nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_blocks_kernel<double><<<blocks_for(b * b), kThreads, 0, stream>>>(a.gram_part, grid, b * b,
                                                                        gram.data_ptr<double>(), nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  mirror_upper_kernel<<<blocks_for(b * b), kThreads, 0, stream>>>(gram.data_ptr<double>(), static_cast<int>(b));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {coeffs, gram, norms};
}

}  // namespace
}  // namespace mrgd_ext

TORCH_LIBRARY_IMPL(mrgd_ext, CUDA, m) { m.impl("block_orthogonalize_", &mrgd_ext::block_orthogonalize_cuda); }
