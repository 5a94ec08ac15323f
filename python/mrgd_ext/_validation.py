"""Argument validation shared by the op wrappers and the optimizer.

Every check runs before anything is written, so a rejected call leaves parameters and optimizer state
untouched, and every message names the offending argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: Parameter dtypes the fused kernels accept (low precisions are computed in float32).
KERNEL_PARAM_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: Storage dtypes accepted for a subspace basis.
BASIS_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def check_positive_rate(value: float, name: str) -> float:
    """A learning rate: a finite number > 0."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python float, got a tensor")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_non_negative(value: float, name: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def check_param_grad_lists(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], *, require_contiguous: bool = True
) -> None:
    """params[i] and grads[i] pair up: dense, same shape, one dtype and one device for the whole list."""
    if len(params) != len(grads):
        raise ValueError(f"params and grads must have the same length, got {len(params)} and {len(grads)}")
    if not params:
        return
    dtype, device = params[0].dtype, params[0].device
    for i, (p, g) in enumerate(zip(params, grads)):
        if not isinstance(p, torch.Tensor) or not isinstance(g, torch.Tensor):
            raise TypeError(f"params[{i}] and grads[{i}] must be tensors")
        if g.is_sparse or p.is_sparse or g.layout != torch.strided or p.layout != torch.strided:
            raise RuntimeError(f"grads[{i}]: sparse gradients are not supported by MrGD (dense tensors only)")
        if p.dtype not in KERNEL_PARAM_DTYPES:
            raise TypeError(f"params[{i}] has dtype {p.dtype}; supported: float32, float64, float16, bfloat16")
        if p.dtype != dtype:
            raise TypeError(f"params[{i}] has dtype {p.dtype} but params[0] has {dtype}: one dtype per call")
        if g.dtype != p.dtype:
            raise TypeError(f"grads[{i}] has dtype {g.dtype} but params[{i}] has {p.dtype}")
        if p.device != device:
            raise ValueError(f"params[{i}] is on {p.device} but params[0] is on {device}: one device per call")
        if g.device != p.device:
            raise ValueError(f"grads[{i}] is on {g.device} but params[{i}] is on {p.device}")
        if g.shape != p.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but params[{i}] has {tuple(p.shape)}")
        if require_contiguous and not (p.is_contiguous() and g.is_contiguous()):
            which = f"params[{i}]" if not p.is_contiguous() else f"grads[{i}]"
            raise ValueError(f"{which} is not contiguous; the fused kernels need contiguous tensors")


def check_amp_flags(
    grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None, device: torch.device
) -> None:
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype != torch.float32:
            raise ValueError(f"{name} must be a float32 tensor with one element")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the parameters are on {device}")


def check_basis(basis: torch.Tensor, n_total: int, device: torch.device, name: str = "basis") -> None:
    if not isinstance(basis, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape [r, n_total]")
    if basis.dim() != 2:
        raise ValueError(f"{name} must be 2-D [r, n_total], got shape {tuple(basis.shape)}")
    if basis.shape[1] != n_total:
        raise ValueError(
            f"{name} has {basis.shape[1]} columns but the parameters have {n_total} elements in all"
        )
    if basis.dtype not in BASIS_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float64, got {basis.dtype}")
    if not basis.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if basis.device != device:
        raise ValueError(f"{name} is on {basis.device} but the parameters are on {device}")


def coefficient_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Projections and coefficients are float64 for float64 parameters and float32 otherwise."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32
