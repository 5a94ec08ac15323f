"""Python front of the mrgd_ext custom operators (torch.ops.mrgd_ext.*).

The kernels are registered as torch custom ops by the compiled library (csrc/), so the dispatcher picks the
CPU or CUDA implementation and torch.compile can trace them through the fake (meta) implementations of
:mod:`mrgd_ext.ops.registry`. The wrappers validate arguments with Python exceptions that name the argument
before any kernel runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

import mrgd_ext._C as _C
from mrgd_ext._validation import (
    check_amp_flags,
    check_basis,
    check_finite_scalar,
    check_param_grad_lists,
    coefficient_dtype,
)
from mrgd_ext.ops.registry import has_kernel

__all__ = ["build_info", "has_kernel", "multirate_step_", "subspace_project", "subspace_step_"]


def build_info() -> dict[str, Any]:
    """Facts about the compiled extension.

    Keys: ``version``, ``torch_version`` (torch the extension was built against), ``cuda`` (whether CUDA
    kernels were compiled), ``cuda_archs``, ``torch_cuda_version``, ``openmp``.
    """
    return dict(_C.build_info())


# ---------------------------------------------------------------------------------------------------------
# Validated wrappers.


def _device_of(params: Sequence[torch.Tensor]) -> torch.device:
    return params[0].device if len(params) else torch.device("cpu")


def multirate_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    lr: float,
    *,
    weight_decay: float = 0.0,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """In place, for every i: ``params[i] -= lr * (g_i + weight_decay * params[i])``.

    ``g_i = grads[i] / grad_scale`` (negated when ``maximize``); nothing changes when ``found_inf`` is
    non-zero. All tensors share one device and dtype (float32/float64/float16/bfloat16; the low precisions
    are computed in float32) and are contiguous. ``lr`` and ``weight_decay`` are finite Python floats.
    """
    lr = check_finite_scalar(lr, "lr")
    weight_decay = check_finite_scalar(weight_decay, "weight_decay")
    params, grads = list(params), list(grads)
    check_param_grad_lists(params, grads)
    check_amp_flags(grad_scale, found_inf, _device_of(params))
    if not params:  # nothing to update, and no tensor for the dispatcher to pick a device from
        return
    torch.ops.mrgd_ext.multirate_step_(
        params, grads, lr, weight_decay, bool(maximize), grad_scale, found_inf
    )


def subspace_project(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    basis: torch.Tensor,
    *,
    weight_decay: float = 0.0,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``U^T geff`` for the basis ``U = basis`` of shape [r, n_total] over the flat concatenation of params.

    ``geff = grads / grad_scale (negated when maximize) + weight_decay * params``. Returns shape [r] in
    float32 (float64 for float64 parameters). ``weight_decay`` is a finite Python float.
    """
    weight_decay = check_finite_scalar(weight_decay, "weight_decay")
    params, grads = list(params), list(grads)
    check_param_grad_lists(params, grads)
    check_basis(basis, sum(p.numel() for p in params), _device_of(params))
    check_amp_flags(grad_scale, None, _device_of(params))
    coeffs: torch.Tensor = torch.ops.mrgd_ext.subspace_project(
        params, grads, basis, weight_decay, bool(maximize), grad_scale
    )
    return coeffs


def subspace_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    basis: torch.Tensor,
    coeffs: torch.Tensor,
    lr: float,
    *,
    weight_decay: float = 0.0,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """In place: ``p -= lr * geff + U^T coeffs`` (element i gets ``sum_k basis[k, i] * coeffs[k]``).

    ``lr`` and ``weight_decay`` are finite Python floats.
    """
    lr = check_finite_scalar(lr, "lr")
    weight_decay = check_finite_scalar(weight_decay, "weight_decay")
    params, grads = list(params), list(grads)
    check_param_grad_lists(params, grads)
    device = _device_of(params)
    check_basis(basis, sum(p.numel() for p in params), device)
    if params:
        expected = coefficient_dtype(params[0].dtype)
        if coeffs.shape != (basis.shape[0],) or coeffs.dtype != expected or coeffs.device != device:
            raise ValueError(
                f"coeffs must be a {expected} tensor of shape [{basis.shape[0]}] on {device}, got "
                f"{coeffs.dtype} {tuple(coeffs.shape)} on {coeffs.device}"
            )
    check_amp_flags(grad_scale, found_inf, device)
    torch.ops.mrgd_ext.subspace_step_(
        params, grads, basis, coeffs.contiguous(), lr, weight_decay, bool(maximize),
        grad_scale, found_inf,
    )
