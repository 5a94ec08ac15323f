// CPU kernel of mrgd_ext::block_orthogonalize_ (schema and semantics: csrc/include/mrgd_ext/lanczos.h):
// `rounds` rounds of classical Gram-Schmidt of the rows of V [b, n] against the orthonormal rows of Q [m, n],
// the Gram matrix of the result and the squared norms of the input, in rounds + 1 passes over n.
//
// NOTE: [fused passes]
// Round r needs every coefficient C_r = V Q^T before it can subtract C_r Q, so each round is one reduction
// over all of n followed by an update; what can be fused is the update of round r with the reduction of round
// r + 1 (or with the final Gram matrix): per sub-chunk of columns, subtract, then project the fresh result
// while the sub-chunk of Q is still in cache. CGS2 therefore reads Q three times (the pure-torch composition
// V Q^T, V -= C Q, twice, reads it four times, plus a pass for the Gram matrix) and V once per pass.
//
// NOTE: [orthogonalisation accuracy]
// Dot products run in the storage type (float for float rows) within one sub-chunk of at most 32 Ki columns
// spread over the SIMD lanes (at most 4 Ki terms per lane); sub-chunk sums are added in double, per
// super-chunk of a fixed 32 Ki columns, and the super-chunk sums in double in a fixed order. The error of a
// coefficient therefore grows with the sub-chunk length rather than with n, and the result is bitwise
// reproducible whatever the number of threads. Coefficients are returned in double; the subtraction uses
// them rounded to the storage type, as the pure-torch reference does. Unlike the optimizer kernels this op
// promises no bitwise agreement across instruction sets (the AVX2 loops may fuse multiply-adds): the
// solver needs accuracy and run-to-run reproducibility, which tests/test_block_orthogonalize.py checks.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "mrgd_ext/cpu_chunks.h"
#include "mrgd_ext/cpu_kernel_table.h"
#include "mrgd_ext/lanczos.h"

namespace mrgd_ext {
namespace {

// Fixed column ranges whose partial sums are kept separately (threads take whole super-chunks); fixed so
// that the summation order does not depend on the thread count (NOTE: [orthogonalisation accuracy]).
constexpr int64_t kSuperChunk = 1 << 15;
// Bytes of Q and V columns one sub-chunk may touch: small enough to stay in a core's L2 cache between the
// subtraction and the projection of the same sub-chunk (NOTE: [fused passes]).
constexpr int64_t kSubChunkBytes = 256 << 10;

// Columns per sub-chunk such that `rows` rows of them fit the cache budget, a multiple of 64, at least 256.
int64_t sub_chunk_length(int64_t rows, int64_t elem) {
  const int64_t cols = kSubChunkBytes / (std::max<int64_t>(rows, 1) * elem);
  return std::clamp<int64_t>(cols / 64 * 64, 256, kSuperChunk);
}

template <typename T>
void store_coefficients(const std::vector<double>& c, std::vector<double>& storage) {
  // The subtraction reads coefficients in the storage type; a double buffer holds either kind.
  T* out = reinterpret_cast<T*>(storage.data());
  for (size_t i = 0; i < c.size(); ++i) out[i] = static_cast<T>(c[i]);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_orthogonalize_cpu(const at::Tensor& basis,
                                                                       const at::Tensor& vectors, int64_t rounds) {
  check_block_orthogonalize_args(basis, vectors, rounds);
  TORCH_CHECK(vectors.device().is_cpu(), "mrgd_ext: the CPU block_orthogonalize_ got tensors on ",
              vectors.device());
  const int64_t m = basis.size(0), b = vectors.size(0), n = vectors.size(1);
  const auto opts = vectors.options().dtype(at::kDouble);
  at::Tensor coeffs = at::zeros({b, m}, opts);  // [b, m]
  at::Tensor gram = at::zeros({b, b}, opts);    // [b, b]
  at::Tensor norms = at::zeros({b}, opts);      // [b]
  if (b == 0 || n == 0) return {coeffs, gram, norms};

  const bool f64 = vectors.scalar_type() == at::kDouble;
  // The element loops of the selected CPU kernel table (NOTE: [CPU instruction-set dispatch]).
  const cpu::BlockOrthogonalizePassFn fn = cpu::kernel_table().block_orthogonalize[f64 ? 1 : 0];
  // Projecting against an empty basis changes nothing: only the Gram/norm pass is needed.
  const int64_t eff_rounds = m == 0 ? 0 : rounds;
  const int64_t num_super = (n + kSuperChunk - 1) / kSuperChunk;
  const int64_t grain = n * (m + b) >= cpu::kParallelThreshold ? 1 : num_super;

  cpu::BlockOrthogonalizePass a{};
  a.basis = basis.data_ptr();
  a.ldq = leading_dim(basis);
  a.m = m;
  a.vectors = vectors.data_ptr();
  a.ldv = leading_dim(vectors);
  a.b = b;
  a.sub_len = sub_chunk_length(m + b, vectors.element_size());
  a.first_sub_len = sub_chunk_length(b, vectors.element_size());

  std::vector<double> proj(static_cast<size_t>(num_super * b * m));      // [num_super, b, m]
  std::vector<double> gram_part(static_cast<size_t>(num_super * b * b));  // [num_super, b, b]
  std::vector<double> norm_part(static_cast<size_t>(num_super * b));      // [num_super, b]
  std::vector<double> round_coef(static_cast<size_t>(b * m));             // C_r in double, [b, m]
  std::vector<double> coef_storage(static_cast<size_t>(b * m));           // C_r in the storage type
  double* total = coeffs.data_ptr<double>();

  for (int64_t pass = 0; pass <= eff_rounds; ++pass) {
    a.coef = pass > 0 ? static_cast<const void*>(coef_storage.data()) : nullptr;
    a.project = pass < eff_rounds;
    const bool last = pass == eff_rounds;
    if (a.project) std::fill(proj.begin(), proj.end(), 0.0);
    at::parallel_for(0, num_super, grain, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        fn(a, c * kSuperChunk, std::min(n, (c + 1) * kSuperChunk), proj.data() + c * b * m,
           last ? gram_part.data() + c * b * b : nullptr, pass == 0 ? norm_part.data() + c * b : nullptr);
      }
    });
    // Super-chunk partial sums in double, in super-chunk order (NOTE: [orthogonalisation accuracy]).
    if (a.project) {
      std::fill(round_coef.begin(), round_coef.end(), 0.0);
      for (int64_t c = 0; c < num_super; ++c)
        for (int64_t i = 0; i < b * m; ++i) round_coef[i] += proj[c * b * m + i];
      for (int64_t i = 0; i < b * m; ++i) total[i] += round_coef[i];
      if (f64) store_coefficients<double>(round_coef, coef_storage);
      else store_coefficients<float>(round_coef, coef_storage);
    }
    if (pass == 0) {
      double* nr = norms.data_ptr<double>();
      for (int64_t c = 0; c < num_super; ++c)
        for (int64_t j = 0; j < b; ++j) nr[j] += norm_part[c * b + j];
    }
    if (last) {
      double* g = gram.data_ptr<double>();
      for (int64_t c = 0; c < num_super; ++c)
        for (int64_t j = 0; j < b; ++j)
          for (int64_t l = j; l < b; ++l) g[j * b + l] += gram_part[c * b * b + j * b + l];
      for (int64_t j = 0; j < b; ++j)
        for (int64_t l = 0; l < j; ++l) g[j * b + l] = g[l * b + j];
    }
  }
  return {coeffs, gram, norms};
}

}  // namespace mrgd_ext
