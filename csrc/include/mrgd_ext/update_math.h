#pragma once
#include "mrgd_ext/host_device.h"

namespace mrgd_ext {

// NOTE: [gradient factor]
// `maximize` (ascend instead of descend) and GradScaler's loss scale both act on the raw gradient as one
// multiplicative factor: sign / scale. Folding them keeps one multiply per element, and lets the CUDA
// kernels read the scale from device memory without a host synchronisation.
template <typename acc_t>
MRGD_HOST_DEVICE acc_t gradient_factor(bool maximize, const float* grad_scale) {
  const acc_t sign = maximize ? acc_t(-1) : acc_t(1);
  return grad_scale == nullptr ? sign : sign / static_cast<acc_t>(*grad_scale);
}

// The gradient the update descends along: the unscaled (and possibly negated) loss gradient plus the
// L2 weight-decay term, as in torch.optim.SGD. The subspace step projects this same vector.
// NOTE: [no decay term]
// With weight_decay == 0 the term is not added at all (Decay = false), as torch.optim.SGD and this
// project's foreach path do: 0 * p would turn an infinite parameter into NaN, and the element loop would
// spend two of its five operations on nothing (float32 out of cache: 0.64 -> 0.52-0.57 ns per element, the
// difference between the fused step and torch's fused SGD). Loops choose Decay once per call
// (decays(weight_decay)), never per element on the CPU.
template <typename acc_t, bool Decay = true>
MRGD_HOST_DEVICE acc_t effective_gradient(acc_t param, acc_t grad, acc_t weight_decay, acc_t grad_factor) {
  if constexpr (Decay) {
    return grad * grad_factor + weight_decay * param;
  } else {
    (void)param;
    (void)weight_decay;
    return grad * grad_factor;
  }
}

// Whether a weight decay adds its term (NOTE: [no decay term]).
MRGD_HOST_DEVICE bool decays(double weight_decay) { return weight_decay != 0.0; }

// One multirate (temporal) step: plain gradient descent at this step's rate of the cycle.
template <typename acc_t, bool Decay = true>
MRGD_HOST_DEVICE acc_t multirate_update(acc_t param, acc_t grad, acc_t lr, acc_t weight_decay,
                                        acc_t grad_factor) {
  return param - lr * effective_gradient<acc_t, Decay>(param, grad, weight_decay, grad_factor);
}

// One multirate subspace (spatial) step for one element i:
//   p_i <- p_i - lr * geff_i - correction_i,   correction_i = sum_k U[k, i] * coeffs[k],
// where coeffs[k] = (eta_k - lr) * (U^T geff)_k gives column k its own rate eta_k.
template <typename acc_t, bool Decay = true>
MRGD_HOST_DEVICE acc_t subspace_update(acc_t param, acc_t grad, acc_t correction, acc_t lr, acc_t weight_decay,
                                       acc_t grad_factor) {
  return param - lr * effective_gradient<acc_t, Decay>(param, grad, weight_decay, grad_factor) - correction;
}

// NOTE: [momentum subspace update]
// The momentum form of the subspace step (AutoMrGD's accelerated step; Sutskever's form of Nesterov momentum, as
// torch.optim.SGD(nesterov=True)), with d_i = lr * geff_i + correction_i the preconditioned gradient (P geff)_i:
//   v_i <- momentum * v_i + d_i,   p_i <- p_i - d_i - momentum * v_i   (v_i the updated buffer, unrounded).
// One pass reads g, v, p and the basis columns and writes v and p: with the projection, (6 + 2 r) element
// accesses per parameter for r basis rows, where the composition of element-wise ops (scale v, two update passes,
// one add) needs (12 + 3 r).
template <typename acc_t, bool Decay = true>
MRGD_HOST_DEVICE void subspace_momentum_update(acc_t& param, acc_t& buf, acc_t grad, acc_t correction, acc_t lr,
                                               acc_t momentum, acc_t weight_decay, acc_t grad_factor) {
  const acc_t d = lr * effective_gradient<acc_t, Decay>(param, grad, weight_decay, grad_factor) + correction;
  buf = momentum * buf + d;
  param = param - d - momentum * buf;
}

}  // namespace mrgd_ext
