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

__all__ = ["build_info", "has_kernel", "multirate_step_", "subspace_project", "subspace_step_",
           "subspace_momentum_step_"]


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


def _check_coeffs(coeffs: torch.Tensor, basis: torch.Tensor, params: list[torch.Tensor], device: torch.device) -> None:
    """The per-row coefficients of an update pass: [r], the parameters' coefficient dtype, on their device."""
    if params:
        expected = coefficient_dtype(params[0].dtype)
        if coeffs.shape != (basis.shape[0],) or coeffs.dtype != expected or coeffs.device != device:
            raise ValueError(
                f"coeffs must be a {expected} tensor of shape [{basis.shape[0]}] on {device}, got "
                f"{coeffs.dtype} {tuple(coeffs.shape)} on {coeffs.device}"
            )


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
    _check_coeffs(coeffs, basis, params, device)
    check_amp_flags(grad_scale, found_inf, device)
    torch.ops.mrgd_ext.subspace_step_(
        params, grads, basis, coeffs.contiguous(), lr, weight_decay, bool(maximize),
        grad_scale, found_inf,
    )


def subspace_momentum_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    basis: torch.Tensor,
    coeffs: torch.Tensor,
    lr: float,
    momentum: float,
    *,
    weight_decay: float = 0.0,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """In place, with ``d = lr * geff + U^T coeffs`` (the step :func:`subspace_step_` takes):
    ``momentum_buffers <- momentum * momentum_buffers + d`` and ``params <- params - d - momentum *
    momentum_buffers`` (Nesterov momentum in Sutskever's form, as ``torch.optim.SGD(nesterov=True)``), in one pass.

    ``momentum_buffers[i]`` is shaped like ``params[i]``, with its dtype and device, contiguous, and shares no
    memory with the parameters or gradients. ``lr``, ``momentum`` and ``weight_decay`` are finite Python floats.
    """
    lr = check_finite_scalar(lr, "lr")
    momentum = check_finite_scalar(momentum, "momentum")
    weight_decay = check_finite_scalar(weight_decay, "weight_decay")
    params, grads, momentum_buffers = list(params), list(grads), list(momentum_buffers)
    check_param_grad_lists(params, grads)
    if len(momentum_buffers) != len(params):
        raise ValueError(f"momentum_buffers must have one tensor per parameter ({len(params)}), got "
                         f"{len(momentum_buffers)}")
    for i, (p, v) in enumerate(zip(params, momentum_buffers)):
        if not isinstance(v, torch.Tensor) or v.shape != p.shape or v.dtype != p.dtype or v.device != p.device:
            got = f"{v.dtype} {tuple(v.shape)} on {v.device}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"momentum_buffers[{i}] must be a {p.dtype} tensor of shape {tuple(p.shape)} on "
                             f"{p.device} (its parameter's), got {got}")
        if not v.is_contiguous():
            raise ValueError(f"momentum_buffers[{i}] is not contiguous; the fused kernels need contiguous tensors")
        if v.numel() and (v.data_ptr() == p.data_ptr() or v.data_ptr() == grads[i].data_ptr()):
            raise ValueError(f"momentum_buffers[{i}] shares memory with params[{i}] or grads[{i}]")
    device = _device_of(params)
    check_basis(basis, sum(p.numel() for p in params), device)
    _check_coeffs(coeffs, basis, params, device)
    check_amp_flags(grad_scale, found_inf, device)
    torch.ops.mrgd_ext.subspace_momentum_step_(
        params, grads, momentum_buffers, basis, coeffs.contiguous(), lr, momentum, weight_decay, bool(maximize),
        grad_scale, found_inf,
    )
