// Operator schemas of the Lanczos solver (python/mrgd_ext/lanczos.py), a fragment of the mrgd_ext library
// whose main schemas live in csrc/mrgd_ext.cpp. Implementations: csrc/cpu/block_orthogonalize.cpp (CPU) and
// csrc/cuda/block_orthogonalize.cu (CUDA builds).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mrgd_ext, m) {
  // `rounds` rounds of classical Gram-Schmidt of the rows of `vectors` [b, n] against the orthonormal rows of
  // `basis` [m, n], in place, plus the Gram matrix of the result and the squared norms of the input rows, all
  // in as few passes over n as the data dependencies allow (see csrc/include/mrgd_ext/lanczos.h).
  m.def(
      "block_orthogonalize_(Tensor basis, Tensor(a!) vectors, int rounds=2) -> (Tensor coeffs, Tensor gram, "
      "Tensor in_norms_sq)");
}
