"""Python front of the Lanczos orthogonalisation operator ``torch.ops.mrgd_ext.block_orthogonalize_``.

The kernels (csrc/cpu/block_orthogonalize.cpp, csrc/cuda/block_orthogonalize.cu; schema in
csrc/mrgd_ext.cpp) fuse the per-iteration vector
work of block Lanczos with full reorthogonalisation: ``rounds`` rounds of classical Gram-Schmidt of a block of
new vectors against the basis, the Gram matrix of the result and the norms of the input, in ``rounds + 1``
passes over the vectors' length. This module validates arguments (exceptions name the argument) and reports
whether a device has a kernel; the fake (meta) implementation is in :mod:`mrgd_ext.ops.registry`.
"""

from __future__ import annotations

import torch

from mrgd_ext._validation import check_count
from mrgd_ext.ops.registry import OPS, has_kernel

_OP = OPS["block_orthogonalize_"]
#: Most rows of ``vectors`` one call of the CUDA kernel takes (each thread keeps a column of them in
#: registers; csrc/cuda/block_orthogonalize.cu).
CUDA_MAX_VECTORS = 32


def has_block_orthogonalize_kernel(device_type: str) -> bool:
    """Whether this build registered a ``block_orthogonalize_`` kernel for ``device_type`` ("cpu"/"cuda")."""
    return has_kernel(device_type, _OP.name)


def _check_rows(t: torch.Tensor, name: str, shape_name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape {shape_name}, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D {shape_name}, got shape {tuple(t.shape)}")
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor")
    if t.dtype not in _OP.dtypes:
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    # NOTE: [row strides] in csrc/include/mrgd_ext/lanczos.h: unit stride along n, any row stride >= n.
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dimension (rows of contiguous elements)")
    if t.shape[0] > 1 and t.stride(0) < t.shape[1]:
        raise ValueError(f"{name} has overlapping rows (row stride {t.stride(0)} < {t.shape[1]})")


def block_orthogonalize_(
    basis: torch.Tensor, vectors: torch.Tensor, rounds: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place: ``rounds`` rounds of classical Gram-Schmidt of the rows of ``vectors`` [b, n] against the
    orthonormal rows of ``basis`` [m, n], with the fused kernel.

    Returns float64 ``(coeffs [b, m], gram [b, b], in_norms_sq [b])``: the summed projection coefficients,
    the Gram matrix of the orthogonalised rows and the squared norms of the input rows (see
    :func:`mrgd_ext.ops.lanczos_reference.block_orthogonalize`, which defines the result). Both tensors share
    one dtype (float32 or float64) and device; rows must be unit-stride (a row slice of a larger buffer is
    fine); ``vectors`` must not share memory with ``basis``. On CUDA at most ``CUDA_MAX_VECTORS`` rows of
    ``vectors`` per call.
    """
    _check_rows(basis, "basis", "[m, n]")
    _check_rows(vectors, "vectors", "[b, n]")
    if basis.shape[1] != vectors.shape[1]:
        raise ValueError(f"basis has {basis.shape[1]} columns but vectors has {vectors.shape[1]}")
    if basis.dtype != vectors.dtype:
        raise TypeError(f"basis ({basis.dtype}) and vectors ({vectors.dtype}) must share one dtype")
    if basis.device != vectors.device:
        raise ValueError(f"basis is on {basis.device} but vectors is on {vectors.device}")
    rounds = check_count(rounds, "rounds", 0)
    if vectors.numel() and basis.numel() and vectors.untyped_storage().data_ptr() == basis.untyped_storage().data_ptr():
        raise ValueError("vectors must not share memory with basis (it is written in place)")
    if vectors.device.type == "cuda" and vectors.shape[0] > CUDA_MAX_VECTORS:
        raise ValueError(
            f"vectors has {vectors.shape[0]} rows; the CUDA kernel takes at most {CUDA_MAX_VECTORS} per call"
        )
    if not has_block_orthogonalize_kernel(vectors.device.type):
        raise RuntimeError(
            f"this mrgd_ext build has no block_orthogonalize_ kernel for {vectors.device.type}; use "
            "mrgd_ext.ops.lanczos_reference.block_orthogonalize"
        )
    result: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = torch.ops.mrgd_ext.block_orthogonalize_(
        basis, vectors, rounds
    )
    return result
