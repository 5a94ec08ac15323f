#pragma once
// Per-element arithmetic of the block orthogonalisation kernel (mrgd_ext::block_orthogonalize_), shared by
// the CPU and CUDA implementations (NOTE: [shared element math] in host_device.h). The functions are
// templates over the arithmetic type so the CPU loops can also evaluate them on SIMD vector types: a GCC
// vector of floats behaves like a float under +, - and *, lane by lane.
#include "mrgd_ext/host_device.h"

namespace mrgd_ext {

// One term of a projection coefficient or Gram entry: sum <- sum + a * b.
template <typename acc_t>
MRGD_HOST_DEVICE acc_t dot_update(acc_t sum, acc_t a, acc_t b) {
  return sum + a * b;
}

// One term of the classical Gram-Schmidt subtraction v_j <- v_j - sum_k c[j, k] q_k, for one k.
template <typename acc_t>
MRGD_HOST_DEVICE acc_t orthogonalize_update(acc_t v, acc_t coeff, acc_t q) {
  return v - coeff * q;
}

}  // namespace mrgd_ext
