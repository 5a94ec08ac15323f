"""Argument validation shared by the op wrappers and the optimizer.

Every check runs before anything is written, so a rejected call leaves parameters and optimizer state
untouched, and every message names the offending argument.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeGuard

import torch

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

#: Floating-point dtypes the package computes with (parameters, probes, data).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Parameter dtypes the fused kernels accept (low precisions are computed in float32).
KERNEL_PARAM_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: Storage dtypes accepted for a subspace basis.
BASIS_DTYPES = (torch.float32, torch.bfloat16, torch.float64)

#: Planning strategies accepted by ``plan_multirate`` (``"auto"`` picks among the other three).
STRATEGIES: tuple[str, ...] = ("auto", "nested", "chebyshev-nested", "chebyshev")
#: Rules that turn an eigen-group's interval into a rate.
RATE_RULES: tuple[str, ...] = ("optimal", "safe")
#: Hessian-vector-product backends of ``HessianOperator``.
HVP_BACKENDS: tuple[str, ...] = ("auto", "func", "double_backward")
#: AutoMrGD modes.
AUTO_MODES: tuple[str, ...] = ("temporal", "subspace")


def is_dtensor(t: Any) -> TypeGuard[DTensor]:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 / tensor-parallel parameters)."""
    # No DTensor can exist before torch.distributed.tensor is imported; checking sys.modules keeps
    # `import mrgd_ext` from importing it and costs a dict lookup per tensor.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def check_not_sharded(params: Sequence[Any], who: str) -> None:
    """Refuse DTensor parameters where curvature is measured (NOTE: [no FSDP2 curvature]).

    NOTE: [no FSDP2 curvature]
    A Hessian-vector product evaluates the model at parameter tensors the operator substitutes for the
    module's own (torch.func.functional_call, then two derivatives). FSDP2 all-gathers only the sharded
    parameters it owns, in its forward hooks: the substituted shards never get gathered and meet plain
    activations ("mixed torch.Tensor and DTensor"). Products through a sharded model would also need each
    rank's full parameters at once, which is what FSDP avoids. So curvature (and AutoMrGD, which measures it)
    is refused for DTensor parameters, with the same error on every rank (every rank's parameters are
    DTensors), at construction, before any collective.
    """
    for i, p in enumerate(params):
        if is_dtensor(p):
            raise NotImplementedError(
                f"{who} does not support DTensor parameters (params[{i}] is one: FSDP2/fully_shard or tensor "
                "parallel): Hessian-vector products evaluate the model at substituted parameters, which FSDP2 "
                "does not all-gather. Measure curvature on a DDP (or unsharded) copy of the model, with a "
                "DistributedOperator over the ranks' probe shards; MrGD itself runs on FSDP2 parameters"
            )


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """One of ``choices`` (an enum tuple of this module)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return value


def check_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (Python or numpy; not bool) within ``[minimum, maximum]``; TypeError for a non-integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    number = int(value)
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {number}")
    return number


def check_count(value: Any, name: str, minimum: int) -> int:
    """A count or size: an integer (Python or numpy; not bool) >= ``minimum``; one ValueError for anything else."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_bool(value: Any, name: str) -> bool:
    """A Python bool (not an int or a tensor)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_optional_bool(value: Any, name: str) -> bool | None:
    """``None`` or a Python bool (the ``foreach``/``fused`` convention of torch.optim)."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be None or a bool, got {type(value).__name__}")
    return value


def check_float_dtype(tensor: torch.Tensor, name: str, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    """``tensor`` has one of the floating-point ``dtypes``."""
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {tensor.dtype}; supported: {allowed}")


def check_orthonormal_rows(basis: torch.Tensor, name: str = "basis") -> None:
    """Rows of ``basis`` ([r, n]) are finite and orthonormal up to the rounding of its dtype.

    An r x r Gram check in float64 (cost r^2 n); see :func:`check_orthonormal_gram` for the tolerance.
    """
    if not bool(torch.isfinite(basis).all()):
        raise ValueError(f"{name} has non-finite entries")
    if basis.shape[0] == 0:
        return
    b = basis.detach().to(torch.float64)
    check_orthonormal_gram(b @ b.T, basis.dtype, name)


def check_orthonormal_gram(gram: torch.Tensor, dtype: torch.dtype, name: str = "basis") -> None:
    """The float64 Gram matrix ``B B^T`` of a basis stored in ``dtype`` is the identity up to that rounding.

    Rounding orthonormal rows to storage moves each Gram entry by at most about eps(dtype); a basis computed in
    float64 (Ritz vectors) loses orthogonality at the 1e-14 level. The tolerance ``max(16 * eps(dtype), 1e-8)``
    admits both and rejects bases that are not orthonormal (unnormalized rows, random or merely nearly
    orthogonal directions).
    """
    r = gram.shape[0]
    if r == 0:
        return
    err = (gram - torch.eye(r, dtype=gram.dtype, device=gram.device)).abs().max().item()
    tol = max(16 * torch.finfo(dtype).eps, 1e-8)
    if not err <= tol:
        raise ValueError(
            f"{name} rows are not orthonormal: max |B B^T - I| = {err:.3g} > {tol:.3g} "
            "(orthonormalize it, e.g. with torch.linalg.qr, or pass check=False)"
        )


def check_finite_scalar(value: Any, name: str) -> float:
    """A finite real number given as a Python (or numpy) scalar: the float arguments of the raw operators.

    Tensors are refused (reading one would synchronise with its device; the operators take floats) and so are
    bools. NaN or inf would be written into every parameter the operator updates.
    """
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    return number


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
