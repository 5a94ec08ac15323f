#pragma once
// Work splitting for the multi-tensor CPU kernels: one parallel loop over fixed-size chunks of all tensors,
// so many small parameters and a few huge ones both keep every thread busy with one fork/join per call.
#include <ATen/core/Tensor.h>
#include <vector>

namespace mrgd_ext::cpu {

struct Chunk {
  int64_t tensor;       // index into the tensor list
  int64_t begin;        // first element within that tensor
  int64_t end;          // one past the last element
  int64_t flat_offset;  // offset of the tensor's first element in the flat concatenation
};

inline std::vector<Chunk> split_into_chunks(at::TensorList tensors, int64_t chunk_size) {
  std::vector<Chunk> chunks;
  int64_t offset = 0;
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t b = 0; b < n; b += chunk_size) chunks.push_back({t, b, std::min(n, b + chunk_size), offset});
    offset += n;
  }
  return chunks;
}

template <typename T>
std::vector<T*> data_pointers(at::TensorList tensors) {
  std::vector<T*> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(static_cast<T*>(t.data_ptr()));
  return out;
}

// Forking threads costs microseconds; below this many elements a single thread is faster.
constexpr int64_t kParallelThreshold = 1 << 15;

}  // namespace mrgd_ext::cpu
