#pragma once
// Multi-tensor launches shared by the CUDA kernels: many tensors of one (device, dtype) group per launch.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <climits>
#include <cstdint>

namespace mrgd_ext::cuda {

// NOTE: [multi-tensor launch metadata]
// As in PyTorch's MultiTensorApply, the tensor pointers and sizes travel in a struct passed by value as a
// kernel argument (kernel parameters live in constant memory: no host-to-device copy, no allocation, nothing
// to synchronise). Unlike MultiTensorApply, a block finds its (tensor, chunk) from a per-tensor prefix sum
// of chunk counts instead of a per-block table, so one launch covers any number of chunks of up to
// kMaxTensors tensors: a model with a few huge tensors takes one launch, and the grid is as large as the
// work. The pack holds N tensor lists (params, grads, and any per-parameter state); the number of tensor
// slots shrinks with N so the struct stays under the classic 4 KiB kernel-parameter limit, which every
// architecture and toolkit accepts (96 slots for two lists).
template <int N>
struct TensorPack {
  // Bytes per slot: N pointers, numel, flat_offset, first_block; 128 bytes left for the other arguments.
  static constexpr int kMaxTensors = (4096 - 128 - 8) / (N * 8 + 8 + 8 + 4) < 96
                                         ? (4096 - 128 - 8) / (N * 8 + 8 + 8 + 4)
                                         : 96;
  void* ptr[N][kMaxTensors];         // ptr[j][t]: list j's tensor in slot t
  int64_t numel[kMaxTensors];
  int64_t flat_offset[kMaxTensors];  // position of the tensor's first element in the flat concatenation
  int32_t first_block[kMaxTensors];  // first block of tensor t in this launch; ascending
  int32_t num_tensors;
};
static_assert(sizeof(TensorPack<2>) + 128 <= 4096, "launch metadata must fit the 4 KiB kernel-parameter space");
static_assert(sizeof(TensorPack<4>) + 128 <= 4096, "launch metadata must fit the 4 KiB kernel-parameter space");

struct ChunkWork {
  int t;          // tensor slot
  int64_t begin;  // first element of the chunk within the tensor
  int len;        // elements in the chunk
};

// The chunk of this block: the last tensor slot t with first_block[t] <= blockIdx.x, and the chunk in it.
template <int64_t kChunk, int N>
__device__ __forceinline__ ChunkWork find_chunk(const TensorPack<N>& pack) {
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  int lo = 0, hi = pack.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (pack.first_block[mid] <= block) lo = mid; else hi = mid - 1;
  }
  const int64_t begin = static_cast<int64_t>(block - pack.first_block[lo]) * kChunk;
  return {lo, begin, static_cast<int>(min(kChunk, pack.numel[lo] - begin))};
}

// Packs the non-empty tensors of N equally long lists (element i of each list has the numel of lists[0][i])
// into launches of at most kMaxTensors slots (and fewer than 2^31 blocks) and calls
// launch(pack, blocks, chunk_base) for each; chunk_base is the index of the launch's first chunk among all
// chunks of all tensors.
template <int64_t kChunk, int N, typename Launch>
void for_each_launch(const std::array<at::TensorList, N>& lists, Launch&& launch) {
  constexpr int kMaxTensors = TensorPack<N>::kMaxTensors;
  const at::TensorList params = lists[0];
  TensorPack<N> pack{};
  int64_t blocks = 0, chunk_base = 0, flat = 0;
  auto flush = [&]() {
    if (pack.num_tensors == 0) return;
    launch(pack, blocks, chunk_base);
    chunk_base += blocks;
    pack.num_tensors = 0;
    blocks = 0;
  };
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    if (n == 0) continue;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    TORCH_CHECK(chunks < INT32_MAX, "mrgd_ext: params[", i, "] is too large (", n, " elements)");
    if (pack.num_tensors == kMaxTensors || blocks + chunks >= INT32_MAX) flush();
    const int s = pack.num_tensors++;
    for (int j = 0; j < N; ++j) pack.ptr[j][s] = lists[j][i].data_ptr();
    pack.numel[s] = n;
    pack.flat_offset[s] = flat;
    pack.first_block[s] = static_cast<int32_t>(blocks);
    blocks += chunks;
    flat += n;
  }
  flush();
}

template <int64_t kChunk>
int64_t count_chunks(at::TensorList tensors) {
  int64_t chunks = 0;
  for (const auto& t : tensors) chunks += (t.numel() + kChunk - 1) / kChunk;
  return chunks;
}

}  // namespace mrgd_ext::cuda
