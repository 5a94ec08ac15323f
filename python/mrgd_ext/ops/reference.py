"""Pure-torch reference implementations of every mrgd_ext kernel.

They define what the kernels compute. Each takes ``compute_dtype``: by default the kernels' own arithmetic
precision (float32 for float32/float16/bfloat16 storage, float64 for float64), or ``torch.float64`` to get
a high-precision truth to compare kernels and references against. They are also the optimizer's
single-tensor (``foreach=False, fused=False``) path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _compute_dtype(storage: torch.dtype, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    return torch.float64 if storage == torch.float64 else torch.float32


def _skipped(found_inf: torch.Tensor | None) -> bool:
    return found_inf is not None and bool(found_inf.item() != 0)


def _gradient_factor(
    maximize: bool, grad_scale: torch.Tensor | None, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    sign = -1.0 if maximize else 1.0
    factor = torch.tensor(sign, dtype=dtype, device=device)
    if grad_scale is not None:
        factor = factor / grad_scale.to(dtype).reshape(())
    return factor


def effective_gradient(
    param: torch.Tensor, grad: torch.Tensor, weight_decay: float, factor: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``grad * factor + weight_decay * param`` in ``dtype`` (factor = sign / grad scale); with
    ``weight_decay == 0`` no term at all, as torch.optim.SGD (``0 * inf`` would be NaN: NOTE: [no decay term])."""
    scaled = grad.to(dtype) * factor
    return scaled + weight_decay * param.to(dtype) if weight_decay != 0 else scaled


def multirate_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    lr: float,
    *,
    weight_decay: float = 0.0,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> None:
    """In place: ``p <- p - lr * (g * sign / scale + weight_decay * p)`` for every (p, g)."""
    if _skipped(found_inf):
        return
    for p, g in zip(params, grads):
        dtype = _compute_dtype(p.dtype, compute_dtype)
        factor = _gradient_factor(maximize, grad_scale, dtype, p.device)
        new = p.to(dtype) - lr * effective_gradient(p, g, weight_decay, factor, dtype)
        p.copy_(new)


def _flat(tensors: Sequence[torch.Tensor], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    if len(tensors) == 0:
        return torch.zeros(0, dtype=dtype, device=device)
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


def subspace_project(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    basis: torch.Tensor,
    *,
    weight_decay: float = 0.0,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``U^T geff`` over the flat concatenation of the parameters, ``U = basis`` of shape [r, n_total].

    Returns float32 (float64 for float64 parameters) unless ``compute_dtype`` is given.
    """
    storage = params[0].dtype if len(params) else torch.float32
    dtype = _compute_dtype(storage, compute_dtype)
    device = basis.device
    factor = _gradient_factor(maximize, grad_scale, dtype, device)
    geff = effective_gradient(_flat(params, dtype, device), _flat(grads, dtype, device), weight_decay, factor, dtype)
    return basis.to(dtype) @ geff


def subspace_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    basis: torch.Tensor,
    coeffs: torch.Tensor,
    lr: float | torch.Tensor,
    *,
    weight_decay: float = 0.0,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> None:
    """In place: ``p <- p - lr * geff - U^T coeffs`` (element i of the flat parameters gets
    ``sum_k basis[k, i] * coeffs[k]``). ``lr`` a float or a 0-d tensor (a compiled step's rate)."""
    if _skipped(found_inf) or len(params) == 0:
        return
    dtype = _compute_dtype(params[0].dtype, compute_dtype)
    correction = coeffs.to(dtype) @ basis.to(dtype)  # [n_total]
    offset = 0
    for p, g in zip(params, grads):
        n = p.numel()
        factor = _gradient_factor(maximize, grad_scale, dtype, p.device)
        geff = effective_gradient(p, g, weight_decay, factor, dtype)
        new = p.to(dtype) - lr * geff - correction[offset : offset + n].reshape(p.shape)
        p.copy_(new)
        offset += n


def subspace_momentum_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    basis: torch.Tensor,
    coeffs: torch.Tensor,
    lr: float | torch.Tensor,
    momentum: float,
    *,
    weight_decay: float = 0.0,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> None:
    """In place, with ``d = lr * geff + U^T coeffs`` (the step :func:`subspace_step` takes):
    ``v <- momentum * v + d`` and ``p <- p - d - momentum * v`` (``v`` the updated buffer, before rounding to
    storage; NOTE: [momentum subspace update] in csrc/include/mrgd_ext/update_math.h)."""
    if _skipped(found_inf) or len(params) == 0:
        return
    dtype = _compute_dtype(params[0].dtype, compute_dtype)
    correction = coeffs.to(dtype) @ basis.to(dtype)  # [n_total]
    offset = 0
    for p, g, v in zip(params, grads, momentum_buffers):
        n = p.numel()
        factor = _gradient_factor(maximize, grad_scale, dtype, p.device)
        geff = effective_gradient(p, g, weight_decay, factor, dtype)
        d = lr * geff + correction[offset : offset + n].reshape(p.shape)
        v_new = momentum * v.to(dtype) + d
        p_new = p.to(dtype) - d - momentum * v_new
        v.copy_(v_new)
        p.copy_(p_new)
        offset += n


def multirate_subspace_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    basis: torch.Tensor,
    column_rates: torch.Tensor,
    base_lr: float,
    *,
    weight_decay: float = 0.0,
    maximize: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> None:
    """The whole spatial MrGD step, both passes: ``p <- p - base_lr*geff - U (s .* U^T geff)``,
    ``s = column_rates - base_lr``."""
    c = subspace_project(
        params, grads, basis, weight_decay=weight_decay, maximize=maximize, compute_dtype=compute_dtype
    )
    coeffs = (column_rates.to(c.dtype) - base_lr) * c
    subspace_step(
        params, grads, basis, coeffs, base_lr, weight_decay=weight_decay, maximize=maximize,
        compute_dtype=compute_dtype,
    )
