#pragma once
// The block orthogonalisation operator of the Lanczos solver (python/mrgd_ext/lanczos.py):
//
//   mrgd_ext::block_orthogonalize_(Tensor basis, Tensor(a!) vectors, int rounds=2) -> (Tensor, Tensor, Tensor)
//
// basis Q [m, n] (rows orthonormal), vectors V [b, n], updated in place by `rounds` rounds of classical
// Gram-Schmidt (rounds = 2 is CGS2, "twice is enough"):   C_r = V Q^T;  V <- V - C_r Q.
// Returns (coeffs [b, m] = sum_r C_r, gram [b, b] = V_out V_out^T, in_norms_sq [b] = |rows of V_in|^2), all
// float64. The schema is defined in csrc/mrgd_ext.cpp; CPU and CUDA implementations register under it.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <tuple>

namespace mrgd_ext {

// Argument checks shared by the CPU and CUDA implementations (the Python wrapper checks first and raises
// exceptions naming the argument; these guard direct torch.ops calls).
inline void check_block_orthogonalize_args(const at::Tensor& basis, const at::Tensor& vectors, int64_t rounds) {
  TORCH_CHECK(basis.dim() == 2, "mrgd_ext: basis must be 2-D [m, n], got ", basis.dim(), " dims");
  TORCH_CHECK(vectors.dim() == 2, "mrgd_ext: vectors must be 2-D [b, n], got ", vectors.dim(), " dims");
  TORCH_CHECK(basis.size(1) == vectors.size(1), "mrgd_ext: basis has ", basis.size(1),
              " columns but vectors has ", vectors.size(1));
  TORCH_CHECK(basis.scalar_type() == vectors.scalar_type(), "mrgd_ext: basis (", basis.scalar_type(),
              ") and vectors (", vectors.scalar_type(), ") must share one dtype");
  TORCH_CHECK(vectors.scalar_type() == at::kFloat || vectors.scalar_type() == at::kDouble,
              "mrgd_ext: block_orthogonalize_ supports float32 and float64, got ", vectors.scalar_type());
  TORCH_CHECK(basis.device() == vectors.device(), "mrgd_ext: basis is on ", basis.device(), " but vectors on ",
              vectors.device());
  TORCH_CHECK(rounds >= 0, "mrgd_ext: rounds must be >= 0, got ", rounds);
  // NOTE: [row strides]
  // Rows must be unit-stride, but their leading dimension may exceed n: the solver passes row slices
  // Q[:m] of a preallocated basis and blocks of a larger buffer without copies. Anything else (transposed or
  // strided columns) is refused rather than copied, since `vectors` is written in place.
  for (const at::Tensor* t : {&basis, &vectors}) {
    const char* name = t == &basis ? "basis" : "vectors";
    TORCH_CHECK(t->layout() == at::kStrided, "mrgd_ext: ", name, " must be a dense (strided) tensor");
    TORCH_CHECK(t->size(1) <= 1 || t->stride(1) == 1, "mrgd_ext: ", name,
                " must have unit stride along its last dimension");
    TORCH_CHECK(t->size(0) <= 1 || t->stride(0) >= t->size(1), "mrgd_ext: ", name,
                " rows must not overlap (row stride ", t->stride(0), " < ", t->size(1), ")");
  }
  // In-place update of rows that alias the basis would race with the reads of the basis.
  TORCH_CHECK(!vectors.is_alias_of(basis) || vectors.numel() == 0 || basis.numel() == 0,
              "mrgd_ext: vectors must not share memory with basis");
}

// Leading dimension (row stride, in elements) of a [rows, n] tensor accepted by the checks above.
inline int64_t leading_dim(const at::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_orthogonalize_cpu(const at::Tensor& basis,
                                                                       const at::Tensor& vectors, int64_t rounds);

}  // namespace mrgd_ext
