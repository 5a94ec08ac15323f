"""The one list of mrgd_ext's compiled operators (``torch.ops.mrgd_ext.*``).

Each :class:`OpInfo` names an operator and holds what the Python side needs of it: the fake (meta)
implementation torch.compile traces through, the pure-torch reference that defines its result, the parameter
dtypes it supports and a small sample call for tests. The schema itself is written once, in C++
(csrc/mrgd_ext.cpp), and read back from the dispatcher (:attr:`OpInfo.schema`). Kernel availability
(:func:`has_kernel`), the CUDA build check and the GPU suite read the names here; tests/test_registry.py checks
that this list, the dispatcher and the references agree.

``python -m mrgd_ext.ops.registry`` prints the operator names, one per line (for shell scripts).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import mrgd_ext._C  # noqa: F401  (loading the library registers the operators)
from mrgd_ext._validation import KERNEL_PARAM_DTYPES, coefficient_dtype
from mrgd_ext.ops import lanczos_reference, reference

NAMESPACE = "mrgd_ext"
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


@dataclass(frozen=True)
class OpInfo:
    """One compiled operator.

    ``fake`` and ``reference`` take the operator's schema arguments in schema order, as
    ``torch.ops.mrgd_ext.<name>`` does; the reference computes in the kernel's own precision and mutates or
    returns exactly what the kernel does. ``sample(device, dtype)`` returns one small argument tuple.
    """

    name: str
    fake: Callable[..., Any]
    reference: Callable[..., Any]
    dtypes: tuple[torch.dtype, ...]
    sample: Callable[[torch.device, torch.dtype], tuple[Any, ...]]

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    @property
    def packet(self) -> Any:
        """``torch.ops.mrgd_ext.<name>``."""
        return getattr(getattr(torch.ops, NAMESPACE), self.name)

    @property
    def schema(self) -> str:
        """The schema as the compiled library defined it (csrc/mrgd_ext.cpp)."""
        return str(self.packet.default._schema)

    def has_kernel(self, device_type: str) -> bool:
        """Whether this build registered a kernel of this operator for ``device_type`` ("cpu" or "cuda")."""
        key = _DISPATCH_KEYS.get(device_type)
        return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(self.qualname, key)


# ---------------------------------------------------------------------------------------------------------
# Fake implementations (shapes and dtypes only) and schema-ordered adapters of the references.


def _no_output_fake(*args: Any) -> None:
    return None


def _subspace_project_fake(
    params: list[torch.Tensor], grads: list[torch.Tensor], basis: torch.Tensor, weight_decay: float, maximize: bool,
    grad_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    dtype = coefficient_dtype(params[0].dtype) if len(params) else torch.float32
    return basis.new_empty((basis.shape[0],), dtype=dtype)


def _block_orthogonalize_fake(
    basis: torch.Tensor, vectors: torch.Tensor, rounds: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, m = vectors.shape[0], basis.shape[0]
    return (
        vectors.new_empty((b, m), dtype=torch.float64),
        vectors.new_empty((b, b), dtype=torch.float64),
        vectors.new_empty((b,), dtype=torch.float64),
    )


def _multirate_step_reference(
    params: list[torch.Tensor], grads: list[torch.Tensor], lr: float, weight_decay: float, maximize: bool,
    grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
) -> None:
    reference.multirate_step(
        params, grads, lr, weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf
    )


def _subspace_project_reference(
    params: list[torch.Tensor], grads: list[torch.Tensor], basis: torch.Tensor, weight_decay: float, maximize: bool,
    grad_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    return reference.subspace_project(
        params, grads, basis, weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale
    )


def _subspace_step_reference(
    params: list[torch.Tensor], grads: list[torch.Tensor], basis: torch.Tensor, coeffs: torch.Tensor, lr: float,
    weight_decay: float, maximize: bool,
    grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
) -> None:
    reference.subspace_step(
        params, grads, basis, coeffs, lr, weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale,
        found_inf=found_inf,
    )


def _subspace_momentum_step_reference(
    params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor], basis: torch.Tensor,
    coeffs: torch.Tensor, lr: float, momentum: float, weight_decay: float, maximize: bool,
    grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
) -> None:
    reference.subspace_momentum_step(
        params, grads, momentum_buffers, basis, coeffs, lr, momentum, weight_decay=weight_decay, maximize=maximize,
        grad_scale=grad_scale, found_inf=found_inf,
    )


# ---------------------------------------------------------------------------------------------------------
# Sample calls: odd sizes (vector loops plus scalar tails), several tensors, every optional feature used.


def _param_grads(
    device: torch.device, dtype: torch.dtype, sizes: tuple[tuple[int, ...], ...] = ((7, 3), (1000,), (33,))
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in sizes]
    grads = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in sizes]
    return params, grads


def _basis(params: list[torch.Tensor], rank: int = 3) -> torch.Tensor:
    n = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(n, rank, generator=gen, dtype=torch.float64))
    basis: torch.Tensor = q.T.contiguous().to(device=params[0].device, dtype=torch.float32)
    return basis


def _multirate_step_sample(device: torch.device, dtype: torch.dtype) -> tuple[Any, ...]:
    params, grads = _param_grads(device, dtype)
    grad_scale = torch.tensor([4.0], device=device)
    return params, grads, 0.1, 0.01, True, grad_scale, torch.tensor([0.0], device=device)


def _subspace_project_sample(device: torch.device, dtype: torch.dtype) -> tuple[Any, ...]:
    params, grads = _param_grads(device, dtype)
    return params, grads, _basis(params), 0.01, False, torch.tensor([2.0], device=device)


def _subspace_step_sample(device: torch.device, dtype: torch.dtype) -> tuple[Any, ...]:
    params, grads = _param_grads(device, dtype)
    basis = _basis(params)
    coeffs = torch.tensor([0.5, -0.25, 0.125], dtype=coefficient_dtype(dtype), device=device)
    return params, grads, basis, coeffs, 0.1, 0.01, False, None, torch.tensor([0.0], device=device)


def _subspace_momentum_step_sample(device: torch.device, dtype: torch.dtype) -> tuple[Any, ...]:
    params, grads = _param_grads(device, dtype)
    buffers, _ = _param_grads(device, dtype, sizes=tuple(tuple(p.shape) for p in params))
    basis = _basis(params)
    coeffs = torch.tensor([0.5, -0.25, 0.125], dtype=coefficient_dtype(dtype), device=device)
    return (params, grads, [b * 0.5 for b in buffers], basis, coeffs, 0.1, 0.9, 0.01, True,
            torch.tensor([2.0], device=device), torch.tensor([0.0], device=device))


def _block_orthogonalize_sample(device: torch.device, dtype: torch.dtype) -> tuple[Any, ...]:
    gen = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(1001, 5, generator=gen, dtype=torch.float64))
    basis = q.T.contiguous().to(device=device, dtype=dtype)
    vectors = torch.randn(3, 1001, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return basis, vectors, 2


# ---------------------------------------------------------------------------------------------------------
# The operators.

OPS: dict[str, OpInfo] = {}


def _register(info: OpInfo) -> None:
    OPS[info.name] = info
    torch.library.register_fake(info.qualname)(info.fake)


_register(OpInfo("multirate_step_", _no_output_fake, _multirate_step_reference, KERNEL_PARAM_DTYPES,
                 _multirate_step_sample))
_register(OpInfo("subspace_project", _subspace_project_fake, _subspace_project_reference, KERNEL_PARAM_DTYPES,
                 _subspace_project_sample))
_register(OpInfo("subspace_step_", _no_output_fake, _subspace_step_reference, KERNEL_PARAM_DTYPES,
                 _subspace_step_sample))
_register(OpInfo("subspace_momentum_step_", _no_output_fake, _subspace_momentum_step_reference, KERNEL_PARAM_DTYPES,
                 _subspace_momentum_step_sample))
_register(OpInfo("block_orthogonalize_", _block_orthogonalize_fake, lanczos_reference.block_orthogonalize,
                 (torch.float32, torch.float64), _block_orthogonalize_sample))


def op_names() -> list[str]:
    """Names of every registered operator (without the ``mrgd_ext::`` namespace)."""
    return list(OPS)


@functools.cache
def has_kernel(device_type: str, name: str | None = None) -> bool:
    """Whether this build has a ``device_type`` ("cpu" or "cuda") kernel for operator ``name``, or for every
    mrgd_ext operator when ``name`` is None."""
    infos = OPS.values() if name is None else (OPS[name],)
    return all(info.has_kernel(device_type) for info in infos)


if __name__ == "__main__":
    print("\n".join(op_names()))
