#pragma once
// Work splitting for the multi-tensor CPU kernels: one parallel loop over fixed-size chunks of all tensors,
// so many small parameters and a few huge ones both keep every thread busy with one fork/join per call.
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "mrgd_ext/cpu_kernel_table.h"
#include "mrgd_ext/update_math.h"

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

inline StorageKind storage_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK(false, "mrgd_ext: unsupported parameter dtype ", t, " (float32, float64, bfloat16, float16)");
  }
}

inline BasisKind basis_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kBasisF32;
    case at::kBFloat16: return kBasisBF16;
    case at::kDouble: return kBasisF64;
    default: TORCH_CHECK(false, "mrgd_ext: unsupported basis dtype ", t, " (float32, bfloat16, float64)");
  }
}

// The gradient factor (sign / loss scale, NOTE: [gradient factor]) evaluated on the host in the arithmetic
// type of the parameters, so the chunk loops reproduce exactly what the device code computes.
inline double host_gradient_factor(at::ScalarType param_dtype, bool maximize,
                                   const std::optional<at::Tensor>& grad_scale) {
  const float scale = grad_scale.has_value() ? grad_scale->item<float>() : 1.0f;
  const float* scale_ptr = grad_scale.has_value() ? &scale : nullptr;
  return param_dtype == at::kDouble ? gradient_factor<double>(maximize, scale_ptr)
                                    : static_cast<double>(gradient_factor<float>(maximize, scale_ptr));
}

// Forking threads costs microseconds; below this many elements a single thread is faster.
constexpr int64_t kParallelThreshold = 1 << 15;

}  // namespace mrgd_ext::cpu
