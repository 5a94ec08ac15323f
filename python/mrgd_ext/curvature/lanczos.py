"""Block Lanczos with full reorthogonalisation, for extreme eigenpairs of a symmetric operator.

``lanczos(op, k)`` finds the ``k`` largest (or smallest, or both ends) eigenpairs of a symmetric operator
given as a :class:`mrgd_ext.HessianOperator`, a symmetric matrix, or a callable on blocks of vectors. It is the
spectrum estimator of docs/design.md section 1.5:

* block Krylov space from a seeded random start block (CPU generator, moved to the device: same seed, same
  result);
* every new block is orthogonalised against the whole basis by classical Gram-Schmidt done twice (CGS2),
  as matrix products over the basis kept as one ``[m, n]`` matrix; the per-iteration vector work is the fused
  ``mrgd_ext::block_orthogonalize_`` kernel where it is the faster choice, the pure-torch composition
  otherwise (``orthogonalize=``);
* the block tridiagonal matrix ``T = Q H Q^T`` lives in float64 on the host; its eigenpairs (``eigh``) are the
  Ritz pairs; the residual of Ritz pair ``i`` is estimated for free as ``|S_j^T s_i|`` (``S_j`` the coupling
  to the next block, ``s_i`` the last block of the eigenvector of T) and the iteration stops when every wanted
  estimate is below ``tol * |theta|_max``;
* at the end the residuals ``|H y_i - theta_i y_i|`` are recomputed with ``k`` more operator applications
  (``recompute_residuals=True``, the default) and the ``converged`` flags use those honest values;
* rank deficiency of a new block and breakdown (a coupling ``beta ~ 0``, i.e. an invariant subspace) are
  handled by deflation: the dead directions get coupling zero and are replaced by fresh random vectors
  orthogonal to the basis, so the space keeps growing (NOTE: [deflation]).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mrgd_ext.curvature.operator import _Operator, as_operator
from mrgd_ext.ops import lanczos_reference as _lanczos_reference
from mrgd_ext.ops.lanczos_ops import CUDA_MAX_VECTORS, has_block_orthogonalize_kernel
from mrgd_ext.ops.lanczos_ops import block_orthogonalize_ as _kernel_block_orthogonalize_

__all__ = ["lanczos", "LanczosResult", "WHICH", "ORTHOGONALIZERS"]

#: Values accepted for ``which=``.
WHICH: tuple[str, ...] = ("largest", "smallest", "both")
#: Values accepted for ``orthogonalize=``.
ORTHOGONALIZERS: tuple[str, ...] = ("auto", "kernel", "torch")

# NOTE: [orthogonaliser choice]
# benchmarks/bench_lanczos_step.py times the fused kernel against the pure-torch composition (V Q^T,
# V -= C Q twice, V V^T) on the CPU (benchmarks/results/lanczos_step_cpu.md): the kernel was faster in all
# 30 measured shapes (n 1e5..4e6, m 16/64, b 1/4/8, float32 and float64; 1.0-1.5x at b = 1, 1.3-4.6x for
# b >= 4, where BLAS handles the short-and-wide products poorly), so "auto" takes it on CPU. The CUDA
# kernel (csrc/cuda/block_orthogonalize.cu) has not yet been timed against cuBLAS on a GPU
# (`bench_lanczos_step.py --device cuda`, part of benchmarks/gpu_suite.sh), so on CUDA "auto" keeps the torch
# composition and the kernel runs only when asked for (orthogonalize="kernel"), as the design asks until a
# kernel beats the composition on the same device.
_AUTO_KERNEL_DEVICES = ("cpu",)


# ----------------------------------------------------------------------------------------------------------
# Result


@dataclass
class LanczosResult:
    """Ritz pairs and bookkeeping of one :func:`lanczos` run.

    Attributes:
        eigenvalues: [k] float64 (CPU), sorted descending.
        eigenvectors: [k, n] in the operator's dtype and device; orthonormal rows.
        residuals: [k] float64, ``|H y_i - theta_i y_i|`` recomputed with ``k`` extra operator applications
            when ``recompute_residuals=True`` (the default), else equal to ``residual_estimates``.
        residual_estimates: [k] float64, the Lanczos estimates ``|S^T s_i|`` at the last iteration.
        converged: [k] bool, ``residuals <= tol * scale``.
        scale: ``max |theta|`` over all Ritz values of the final basis (an estimate of ``|H|_2``); the
            convergence threshold is ``tol * scale``.
        num_hvps: operator applications requested, one per vector (including the ``k`` of the
            recomputation; a HessianOperator's own first-use determinism check, two products, is not counted).
        num_iterations: block iterations (each applies the operator to one block).
        basis_size: rows of the final Krylov basis.
        hvp_time: seconds inside the operator; other_time: everything else (orthogonalisation, Ritz pairs,
            bookkeeping); total_time = hvp_time + other_time.
        history: per iteration, ``(basis_size, num_hvps, max wanted residual estimate / scale, seconds)``.
        orthogonalizer: "kernel" or "torch", the implementation of the vector work that was used.
        deflations: directions replaced by random vectors after rank deficiency or breakdown.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    residual_estimates: torch.Tensor
    converged: torch.Tensor
    scale: float
    tol: float
    which: str
    block_size: int
    num_hvps: int
    num_iterations: int
    basis_size: int
    hvp_time: float
    other_time: float
    orthogonalizer: str
    deflations: int = 0
    history: list[tuple[int, int, float, float]] = field(default_factory=list)
    _unflatten: Callable[[torch.Tensor], list[torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def total_time(self) -> float:
        return self.hvp_time + self.other_time

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def eigenvector_params(self, i: int) -> list[torch.Tensor]:
        """Eigenvector ``i`` as views shaped like the operator's parameters (one view for matrices)."""
        return self._unflatten(self.eigenvectors[i]) if self._unflatten else [self.eigenvectors[i]]

    def eigenvectors_params(self) -> list[torch.Tensor]:
        """All eigenvectors as per-parameter views ``[k, *shape]``."""
        return self._unflatten(self.eigenvectors) if self._unflatten else [self.eigenvectors]


# ----------------------------------------------------------------------------------------------------------
# Orthogonalisation


def _orthogonalizer(
    choice: str, device: torch.device, dtype: torch.dtype, block_size: int
) -> tuple[str, Callable]:
    if choice not in ORTHOGONALIZERS:
        raise ValueError(f"orthogonalize must be one of {ORTHOGONALIZERS}, got {choice!r}")
    kernel_ok = dtype in (torch.float32, torch.float64) and has_block_orthogonalize_kernel(device.type)
    if choice == "kernel":
        if not kernel_ok:
            raise ValueError(
                f"orthogonalize='kernel': no block_orthogonalize_ kernel for {device.type}/{dtype} in this build"
            )
        if device.type == "cuda" and block_size > CUDA_MAX_VECTORS:
            raise ValueError(
                f"orthogonalize='kernel': the CUDA kernel takes blocks of at most {CUDA_MAX_VECTORS} vectors, "
                f"got block_size={block_size}"
            )
        return "kernel", _kernel_block_orthogonalize_
    if choice == "auto" and kernel_ok and device.type in _AUTO_KERNEL_DEVICES:
        return "kernel", _kernel_block_orthogonalize_
    return "torch", _lanczos_reference.block_orthogonalize


class _Krylov:
    """The basis, its block structure and the block tridiagonal matrix of one run."""

    def __init__(self, op: _Operator, capacity: int, orth: Callable, gen: torch.Generator):
        self.op = op
        self.capacity = capacity
        self.Q = torch.empty((capacity, op.n), dtype=op.dtype, device=op.device)  # rows: basis vectors
        self.T = np.zeros((capacity, capacity))
        self.m = 0
        self.blocks: list[tuple[int, int]] = []
        self.orth = orth
        self.gen = gen
        self.eps = torch.finfo(op.dtype).eps
        self.deflations = 0

    def random_block(self, rows: int) -> torch.Tensor:
        # Drawn on the CPU generator in the operator's dtype (the stream depends only on the seed), then
        # moved: the same seed gives the same start block on every device.
        x = torch.randn((rows, self.op.n), generator=self.gen, dtype=self.op.dtype)
        return x.to(device=self.op.device)

    def extend(self, W: torch.Tensor, scale: float) -> tuple[torch.Tensor, np.ndarray]:
        """Orthogonalise the rows of ``W`` [b, n] against the whole basis (CGS2), orthonormalise them and
        append them as the next block.

        Returns the projection coefficients ``coeffs`` [b, m] (float64) of ``W`` on the basis as it was,
        and the coupling ``S`` [b, rows appended] with ``W_orth = S Q_new`` (zero columns for the random
        vectors of a deflation). ``W`` is overwritten. ``scale`` (an estimate of ``|H|``) sets the breakdown
        threshold.
        """
        b = W.shape[0]
        coeffs, gram_t, in_sq = self.orth(self.Q[: self.m], W, 2)
        gram = gram_t.cpu().numpy()
        ref = max(scale, math.sqrt(float(in_sq.max())) if b else 0.0)
        M = self._normalizer(gram, ref, max_rows=self.capacity - self.m)
        kept = M.shape[0]
        if kept:
            new = self._combine(M, W, out=self.Q[self.m : self.m + kept])  # [kept, n], in place in the basis
            # NOTE: [orthogonality amplification]
            # After CGS2 each row of W is orthogonal to the basis to ~eps of its own norm, but a new basis
            # vector is a combination sum_j U_ji w_j / sigma_i, whose error is amplified by
            # sum_j |U_ji| |w_j| / sigma_i: large only when the rows of W are nearly dependent, not merely of
            # different sizes. Then one more CGS2 pass and re-normalisation restore orthogonality; in practice
            # the extra pass is rare.
            amp = float((np.abs(M) @ np.sqrt(np.maximum(np.diag(gram), 0.0))).max())
            if amp > 100.0:
                new, M2 = self._reorthonormalize(new.clone())
                M = M2 @ M
                kept = M.shape[0]
                self.Q[self.m : self.m + kept] = new
        S = gram @ M.T  # [b, kept]: W = S Q_new, because Q_new = M W and W W^T = gram
        start = self.m
        self.m += kept
        # NOTE: [deflation]
        # Directions of W below the breakdown threshold carry no information (an invariant subspace was
        # found, or the block is rank deficient). They are replaced by random vectors orthogonal to the
        # basis, with coupling zero, so the Krylov relation H Q^T = Q^T T + Q_next^T S^T stays exact up to the
        # dropped noise and the space keeps growing toward the rest of the spectrum (the block size stays b).
        fills = 0
        missing = min(b - kept, self.capacity - self.m)
        while missing > 0:
            R = self.random_block(missing)
            self.orth(self.Q[: self.m], R, 2)
            rnew, _ = self._reorthonormalize(R, threshold=1e-3)
            r = rnew.shape[0]
            if r == 0:
                break
            self.Q[self.m : self.m + r] = rnew
            self.m += r
            fills += r
            missing -= r
        self.deflations += fills
        if fills:
            S = np.concatenate([S, np.zeros((b, fills))], axis=1)
        if self.m > start:
            self.blocks.append((start, self.m))
        return coeffs, S

    def _combine(self, M: np.ndarray, W: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``M @ W`` with the float64 host matrix ``M`` [r, b] rounded to the dtype of ``W`` [b, n]."""
        Mt = torch.from_numpy(np.ascontiguousarray(M)).to(device=W.device, dtype=W.dtype)
        return torch.matmul(Mt, W, out=out) if out is not None else Mt @ W

    def _reorthonormalize(self, X: torch.Tensor, threshold: float = 0.5) -> tuple[torch.Tensor, np.ndarray]:
        """CGS2 of the rows of ``X`` (already nearly orthonormal, or fresh random rows) against the basis,
        then orthonormalisation; rows that lose more than ``1 - threshold`` of their norm are dropped."""
        _, g, _ = self.orth(self.Q[: self.m], X, 2)
        g = g.cpu().numpy()
        ref = math.sqrt(max(float(np.diag(g).max()), 0.0)) if g.size else 0.0
        M = self._normalizer(g, ref, max_rows=X.shape[0], threshold=threshold)
        return self._combine(M, X), M

    def _normalizer(self, gram: np.ndarray, ref: float, *, max_rows: int, threshold: float | None = None) -> np.ndarray:
        """Rows ``M`` [r, b] with ``M W`` orthonormal (``gram = W W^T``), from the eigen-decomposition of
        the Gram matrix: directions with singular value ``sigma <= threshold * ref`` are dropped (default
        threshold ``100 eps``, NOTE: [deflation]); at most ``max_rows`` rows, largest first."""
        if gram.shape[0] == 0 or max_rows <= 0:
            return np.zeros((0, gram.shape[0]))
        evals, U = np.linalg.eigh(0.5 * (gram + gram.T))
        evals, U = evals[::-1], U[:, ::-1]
        sigma = np.sqrt(np.maximum(evals, 0.0))
        thr = (100.0 * self.eps if threshold is None else threshold) * ref
        keep = sigma > thr
        keep[np.cumsum(keep) > max_rows] = False
        return (U[:, keep] / sigma[keep]).T

    def set_coupling(self, rows: tuple[int, int], cols: tuple[int, int], S: np.ndarray) -> None:
        (a, b), (c, d) = rows, cols
        self.T[a:b, c:d] = S
        self.T[c:d, a:b] = S.T


def _wanted(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices (into ascending ``theta``) of the wanted Ritz values, ordered by descending value."""
    m = theta.shape[0]
    if which == "largest":
        idx = np.arange(max(m - k, 0), m)
    elif which == "smallest":
        idx = np.arange(0, min(k, m))
    else:
        top, bottom = (k + 1) // 2, k // 2
        idx = np.union1d(np.arange(max(m - top, 0), m), np.arange(0, min(bottom, m)))
    return idx[::-1].copy()


# ----------------------------------------------------------------------------------------------------------
# Driver


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _start_block(K: _Krylov, start: torch.Tensor | None, block_size: int, A: _Operator) -> torch.Tensor:
    # NOTE: [warm start]
    # Ritz vectors of a nearby operator span most of the wanted invariant subspace; a Krylov space grown from
    # combinations of them reaches small residuals in fewer iterations than one grown from noise. Random
    # combinations (not the first ``block_size`` vectors) keep every start direction in the block; where
    # they happen to span an invariant subspace exactly, deflation fills in random directions
    # (NOTE: [deflation]), so a warm start never stalls the space.
    if start is None:
        return K.random_block(block_size)
    if not isinstance(start, torch.Tensor):
        raise TypeError(f"start must be a tensor [s, n], got {type(start).__name__}")
    if start.dim() == 1:
        start = start[None]
    if start.dim() != 2 or start.shape[1] != A.n or start.shape[0] == 0:
        raise ValueError(f"start must have shape [s, n] with s >= 1 and n = {A.n}, got {tuple(start.shape)}")
    if not start.dtype.is_floating_point:
        raise TypeError(f"start must be floating point, got {start.dtype}")
    S = start.detach().to(device=A.device, dtype=A.dtype)
    if not bool(torch.isfinite(S).all()):
        raise ValueError("start has non-finite entries")
    s = S.shape[0]
    if s >= block_size:
        G = torch.randn((block_size, s), generator=K.gen, dtype=torch.float64)
        return G.to(device=A.device, dtype=A.dtype) @ S
    return torch.cat([S, K.random_block(block_size - s)])


def lanczos(
    op: Any,
    k: int,
    block_size: int = 1,
    max_iters: int | None = None,
    tol: float = 1e-6,
    which: str = "largest",
    seed: int = 0,
    *,
    n: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    orthogonalize: str = "auto",
    recompute_residuals: bool = True,
    start: torch.Tensor | None = None,
) -> LanczosResult:
    """The ``k`` extreme eigenpairs of a symmetric operator by block Lanczos (module docstring).

    Args:
        op: a :class:`mrgd_ext.HessianOperator` (or any object with ``matmat``, ``n``, ``dtype``, ``device``),
            a symmetric matrix ``[n, n]`` (tensor or numpy array), or a callable mapping a block ``[b, n]`` to
            ``[b, n]`` (then pass ``n=``; ``dtype``/``device`` default to float64/CPU).
        k: number of eigenpairs, ``1 <= k <= n``.
        block_size: vectors per block (``b``); larger blocks apply the operator to several vectors at once
            (one vmapped Hessian-vector product) and resolve clusters and multiplicities better.
        max_iters: most block iterations; default enough for a basis of ``min(n, max(10 k + 20, 100))``
            vectors. The basis is preallocated: it takes ``max_iters * block_size * n`` elements.
        tol: stop when every wanted Ritz pair has an estimated residual ``<= tol * max|theta|``; also the
            threshold of the final ``converged`` flags. About ``1e-5`` is the floor for float32 operators.
        which: ``"largest"`` / ``"smallest"`` (algebraically) or ``"both"``: ``ceil(k/2)`` largest and
            ``floor(k/2)`` smallest.
        seed: seed of the CPU generator that draws the start block (and any deflation fill).
        orthogonalize: ``"auto"`` (the fused kernel where it was measured faster, NOTE: [orthogonaliser
            choice]), ``"kernel"`` (on CUDA: ``block_size`` <= 32) or ``"torch"``.
        recompute_residuals: recompute ``|H y - theta y|`` for the returned pairs (``k`` more applications).
        start: warm start, ``[s, n]`` vectors the first block is built from (e.g. the ``eigenvectors`` of
            an earlier run on a nearby operator). With ``s >= block_size`` the start block is ``block_size``
            seeded random combinations of them (so every start vector is represented), with ``s <
            block_size`` it is the vectors themselves completed by random rows (NOTE: [warm start]).

    Returns:
        :class:`LanczosResult` (eigenvalues descending).
    """
    A = as_operator(op, n=n, dtype=dtype, device=device)
    k = _check_int(k, "k", 1)
    block_size = _check_int(block_size, "block_size", 1)
    if k > A.n:
        raise ValueError(f"k={k} exceeds the operator size n={A.n}")
    if block_size > A.n:
        raise ValueError(f"block_size={block_size} exceeds the operator size n={A.n}")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    tol = float(tol)
    if not (math.isfinite(tol) and tol > 0.0):
        raise ValueError(f"tol must be a finite number > 0, got {tol}")
    if max_iters is None:
        max_iters = max(1, math.ceil(min(A.n, max(10 * k + 20, 100)) / block_size))
    max_iters = _check_int(max_iters, "max_iters", 1)
    if A.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"op: Lanczos needs a float32 or float64 operator, got {A.dtype}")
    kind, orth = _orthogonalizer(orthogonalize, A.device, A.dtype, block_size)
    cuda = A.device.type == "cuda"

    t_start = time.perf_counter()
    hvp_time = 0.0
    num_hvps = 0
    capacity = min(A.n, (max_iters + 1) * block_size)
    gen = torch.Generator().manual_seed(int(seed))
    K = _Krylov(A, capacity, orth, gen)

    def apply(V: torch.Tensor) -> torch.Tensor:
        nonlocal hvp_time, num_hvps
        if cuda:
            torch.cuda.synchronize(A.device)
        t0 = time.perf_counter()
        out = A.matmat(V)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(V.shape):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"op returned {got} for a block of shape {tuple(V.shape)}")
        out = out.to(dtype=A.dtype, device=A.device)
        if cuda:
            torch.cuda.synchronize(A.device)
        hvp_time += time.perf_counter() - t0
        num_hvps += V.shape[0]
        return out

    K.extend(_start_block(K, start, block_size, A), scale=0.0)
    scale = 0.0
    history: list[tuple[int, int, float, float]] = []
    iterations = 0
    while True:
        s, e = K.blocks[-1]
        W = apply(K.Q[s:e])
        iterations += 1
        coeffs, S = K.extend(W, scale)
        # The alpha block Q_j H Q_j^T is the projection of W on Q_j (both CGS rounds), symmetrised: T is
        # symmetric by construction and eigh reads one triangle.
        alpha = coeffs[:, s:e].cpu().numpy()
        K.T[s:e, s:e] = 0.5 * (alpha + alpha.T)
        if S.shape[1]:
            K.set_coupling((s, e), K.blocks[-1], S)
        theta, svec = np.linalg.eigh(K.T[:e, :e])
        scale = max(scale, float(np.abs(theta).max()))
        idx = _wanted(theta, k, which)
        # Residual estimates |S^T s_i|, s_i = rows of block j of the eigenvector of T.
        estimates = np.linalg.norm(S.T @ svec[s:e][:, idx], axis=0) if S.shape[1] else np.zeros(len(idx))
        worst = float(estimates.max()) / scale if len(idx) and scale > 0 else 0.0
        history.append((e, num_hvps, worst, time.perf_counter() - t_start))
        if len(idx) >= k and worst <= tol:
            break
        if S.shape[1] == 0 or iterations >= max_iters:
            # No new direction (the basis spans the whole space: the Ritz pairs are exact) or out of budget.
            break
    m_used = e
    theta_w = theta[idx]
    Y = K._combine(svec[:, idx].T, K.Q[:m_used])  # Ritz vectors [k, n]
    res_est = torch.from_numpy(estimates.copy())
    if recompute_residuals:
        R = torch.empty_like(Y)
        for i in range(0, Y.shape[0], block_size):
            R[i : i + block_size] = apply(Y[i : i + block_size])
        lam = torch.from_numpy(theta_w.copy()).to(device=A.device, dtype=A.dtype)
        R -= lam[:, None] * Y
        residuals = torch.linalg.vector_norm(R.double(), dim=1).cpu()
    else:
        residuals = res_est.clone()
    total = time.perf_counter() - t_start
    return LanczosResult(
        eigenvalues=torch.from_numpy(theta_w.copy()),
        eigenvectors=Y,
        residuals=residuals,
        residual_estimates=res_est,
        converged=residuals <= tol * scale,
        scale=scale,
        tol=tol,
        which=which,
        block_size=block_size,
        num_hvps=num_hvps,
        num_iterations=iterations,
        basis_size=m_used,
        hvp_time=hvp_time,
        other_time=total - hvp_time,
        orthogonalizer=kind,
        deflations=K.deflations,
        history=history,
        _unflatten=A.unflatten,
    )
