"""The Krylov core shared by :func:`mrgd_ext.curvature.lanczos` and
:func:`mrgd_ext.curvature.spectral_density`.

* :func:`orthogonalizer` picks the implementation of the per-iteration vector work (CGS2 of a block against
  a basis): the fused ``mrgd_ext::block_orthogonalize_`` kernel or the pure-torch composition;
* :class:`BlockKrylov` is one block Krylov basis (rows of an ``[capacity, n]`` matrix), its block structure
  and the projected matrix ``T = Q H Q^T`` (float64, host), with deflation of rank-deficient blocks and
  thick restart (:meth:`BlockKrylov.restart`);
* :func:`probe_tridiagonals` runs many independent single-vector Lanczos recurrences side by side (one
  operator call on a ``[p, n]`` block per step; SLQ's probes);
* :class:`CountingApply` applies an operator, checks its output and counts products and seconds;
* :func:`breakdown_threshold` is the one rule for "this new direction is numerically zero".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mrgd_ext.ops import lanczos_reference as _lanczos_reference
from mrgd_ext.ops.lanczos_ops import CUDA_MAX_VECTORS, has_block_orthogonalize_kernel
from mrgd_ext.ops.lanczos_ops import block_orthogonalize_ as _kernel_block_orthogonalize_

__all__ = ["ORTHOGONALIZERS", "orthogonalizer", "BlockKrylov", "CountingApply", "probe_tridiagonals",
           "breakdown_threshold", "host_eigh"]

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


def host_eigh(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition (ascending) of a small symmetric float64 host matrix, through torch's LAPACK.

    The projected matrices here are at most a few hundred rows, decomposed once per block step: numpy's
    OpenBLAS starts its own thread pool for them, which on a busy machine cost ~10x a single-threaded call
    (measured 1.8 ms vs 0.14 ms for 42 x 42 on a shared 2-core machine); torch honours torch.set_num_threads.
    """
    evals, evecs = torch.linalg.eigh(torch.from_numpy(np.ascontiguousarray(M, dtype=np.float64)))
    return evals.numpy(), evecs.numpy()


# (basis, vectors, rounds) -> (coeffs, gram of the orthogonalised rows, squared norms of the input rows)
_Orthogonalizer = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def orthogonalizer(
    choice: str, device: torch.device, dtype: torch.dtype, block_size: int
) -> tuple[str, _Orthogonalizer]:
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


class BlockKrylov:
    """The basis, its block structure and the block tridiagonal matrix of one run."""

    def __init__(self, op: Any, capacity: int, orth: _Orthogonalizer, gen: torch.Generator,
                 keep_products: bool = False):
        self.op = op
        self.capacity = capacity
        self.Q = torch.empty((capacity, op.n), dtype=op.dtype, device=op.device)  # rows: basis vectors
        # NOTE: [stored products]
        # With keep_products, HQ[i] holds the operator's output for basis row i once that row has been
        # multiplied (record_products), and restarts combine HQ with the same coefficients as Q. Then
        # H y for any Ritz vector y = c^T Q[:m] of multiplied rows is c^T HQ[:m]: the operator's own products,
        # not the Krylov relation, so residuals computed from it are honest (loss of orthogonality or a
        # broken relation shows up in them) at no extra operator application, for twice the basis memory.
        self.HQ = torch.empty_like(self.Q) if keep_products else None
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
        fills = self._fill_random(b - kept)
        self.deflations += fills
        if fills:
            S = np.concatenate([S, np.zeros((b, fills))], axis=1)
        if self.m > start:
            self.blocks.append((start, self.m))
        return coeffs, S

    def record_products(self, rows: tuple[int, int], W: torch.Tensor) -> None:
        """Store ``W = H Q[rows]`` (before :meth:`extend` overwrites it); NOTE: [stored products]."""
        if self.HQ is not None:
            self.HQ[rows[0] : rows[1]] = W

    def apply_combination(self, C: np.ndarray, rows: int) -> torch.Tensor:
        """``H (C^T Q[:rows])`` from the stored products: ``C^T HQ[:rows]`` (``C`` [rows, p])."""
        if self.HQ is None:
            raise RuntimeError("the basis keeps no products (keep_products=False)")
        return self._combine(C.T, self.HQ[:rows])

    def widen_last_block(self, rows: int) -> int:
        """Append up to ``rows`` seeded random vectors, orthonormal to the basis, to the last (not yet
        multiplied) block with coupling zero: the Krylov relation is unchanged and the next block product
        grows the space in those directions too. Returns how many were appended."""
        s, _ = self.blocks[-1]
        added = self._fill_random(rows)
        self.blocks[-1] = (s, self.m)
        return added

    def _combine(self, M: np.ndarray, W: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``M @ W`` with the float64 host matrix ``M`` [r, b] rounded to the dtype of ``W`` [b, n]."""
        Mt = torch.from_numpy(np.ascontiguousarray(M)).to(device=W.device, dtype=W.dtype)
        return torch.matmul(Mt, W, out=out) if out is not None else Mt @ W

    def _reorthonormalize(self, X: torch.Tensor, threshold: float = 0.5) -> tuple[torch.Tensor, np.ndarray]:
        """CGS2 of the rows of ``X`` (already nearly orthonormal, or fresh random rows) against the basis,
        then orthonormalisation; rows that lose more than ``1 - threshold`` of their norm are dropped."""
        _, gram, _ = self.orth(self.Q[: self.m], X, 2)
        g = gram.cpu().numpy()
        ref = math.sqrt(max(float(np.diag(g).max()), 0.0)) if g.size else 0.0
        M = self._normalizer(g, ref, max_rows=X.shape[0], threshold=threshold)
        return self._combine(M, X), M

    def _normalizer(self, gram: np.ndarray, ref: float, *, max_rows: int, threshold: float | None = None) -> np.ndarray:
        """Rows ``M`` [r, b] with ``M W`` orthonormal (``gram = W W^T``), from the eigen-decomposition of
        the Gram matrix: directions with singular value ``sigma <= threshold * ref`` are dropped (default
        threshold ``100 eps``, NOTE: [deflation]); at most ``max_rows`` rows, largest first."""
        if gram.shape[0] == 0 or max_rows <= 0:
            return np.zeros((0, gram.shape[0]))
        evals, U = host_eigh(0.5 * (gram + gram.T))
        evals, U = evals[::-1], U[:, ::-1]
        sigma = np.sqrt(np.maximum(evals, 0.0))
        thr = (100.0 * self.eps if threshold is None else threshold) * ref
        keep = sigma > thr
        keep[np.cumsum(keep) > max_rows] = False
        rows: np.ndarray = (U[:, keep] / sigma[keep]).T
        return rows

    def restart(self, keep: np.ndarray, theta: np.ndarray, coupling: np.ndarray | None) -> None:
        """Thick restart: replace the basis by the Ritz vectors ``Y = keep^T Q`` (``keep`` [m, p], orthonormal
        columns: eigenvectors of ``T``) followed by the last block, with ``T = [[diag(theta), C], [C^T, 0]]``.

        NOTE: [thick restart]
        With ``H Q^T = Q^T T + Q_next^T S^T E_last^T`` (the block Krylov relation, exact up to rounding with
        full reorthogonalisation), the Ritz vectors satisfy ``H Y^T = Y^T diag(theta) + Q_next^T C^T`` with
        ``C = keep[last block]^T S``: the relation survives the restart with ``Q_next`` (the last block, not
        yet multiplied) as the next block and ``C`` as its coupling. The diagonal block of ``Q_next`` is filled
        by the next iteration as usual, so Lanczos goes on in a basis of bounded size that keeps the wanted
        directions. ``coupling=None`` drops the last block instead (the kept vectors are locked: their
        residuals are treated as zero) and the basis ends with the kept vectors.
        """
        p = keep.shape[1]
        s, e = self.blocks[-1]
        tail = self.Q[s:e].clone() if coupling is not None else None
        Y = self._combine(keep.T, self.Q[: keep.shape[0]])  # keep's rows: the basis T was built on
        if self.HQ is not None:
            self.HQ[:p] = self._combine(keep.T, self.HQ[: keep.shape[0]])
        self.Q[:p] = Y
        self.T[:] = 0.0
        self.T[:p, :p] = np.diag(theta)
        self.blocks = [(0, p)] if p else []
        self.m = p
        if tail is not None and coupling is not None:  # tail exists exactly when coupling does
            b = tail.shape[0]
            self.Q[p : p + b] = tail
            self.m = p + b
            self.blocks.append((p, p + b))
            self.set_coupling((0, p), (p, p + b), coupling)

    def append_random(self, rows: int) -> int:
        """Append up to ``rows`` random vectors orthonormal to the basis as a new block with coupling zero
        (a fresh start inside the orthogonal complement); returns how many were appended."""
        start = self.m
        added = self._fill_random(rows)
        if added:
            self.blocks.append((start, self.m))
        return added

    def _fill_random(self, rows: int) -> int:
        """Append up to ``rows`` seeded random vectors, orthonormalised against the basis (no block entry)."""
        added = 0
        missing = min(rows, self.capacity - self.m)
        while missing > 0:
            R = self.random_block(missing)
            self.orth(self.Q[: self.m], R, 2)
            rnew, _ = self._reorthonormalize(R, threshold=1e-3)
            r = rnew.shape[0]
            if r == 0:
                break
            self.Q[self.m : self.m + r] = rnew
            self.m += r
            added += r
            missing -= r
        return added

    def set_coupling(self, rows: tuple[int, int], cols: tuple[int, int], S: np.ndarray) -> None:
        (a, b), (c, d) = rows, cols
        self.T[a:b, c:d] = S
        self.T[c:d, a:b] = S.T


def breakdown_threshold(eps: float, scale: float, steps: int) -> float:
    """A new Krylov direction of norm below this is rounding noise: ``100 eps |H| sqrt(steps)`` (the
    rounding of ``steps`` reorthogonalised products of an operator of norm ``scale``)."""
    return 100.0 * eps * max(scale, 1e-300) * math.sqrt(max(steps, 1))


class CountingApply:
    """``apply(V)``: the operator on the rows of ``V`` [b, n], checked for shape, cast to the operator's
    dtype/device; counts products (one per row) and the seconds spent inside the operator (CUDA
    synchronised so the time is the operator's own)."""

    def __init__(self, op: Any):
        self.op = op
        self.num_hvps = 0
        self.seconds = 0.0
        self._cuda = op.device.type == "cuda"

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        if self._cuda:
            torch.cuda.synchronize(self.op.device)
        t0 = time.perf_counter()
        out = self.op.matmat(V)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(V.shape):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"op returned {got} for a block of shape {tuple(V.shape)}")
        out = out.to(dtype=self.op.dtype, device=self.op.device)
        if self._cuda:
            torch.cuda.synchronize(self.op.device)
        self.seconds += time.perf_counter() - t0
        self.num_hvps += V.shape[0]
        return out


def probe_tridiagonals(apply: Callable[[torch.Tensor], torch.Tensor], Z: torch.Tensor,
                       order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Single-vector Lanczos from each row of ``Z`` [p, n] independently, side by side: one operator call on
    a ``[p, n]`` block per step, full reorthogonalisation of each probe against its own basis (batched CGS2).

    Returns alphas [p, order], betas [p, order] (beta_j couples steps j and j + 1) and lengths [p]: a probe
    whose space closes early (:func:`breakdown_threshold`, an invariant subspace: its quadrature is exact)
    stops there; its later entries are zeros and never read.
    """
    p, n = Z.shape
    eps = torch.finfo(Z.dtype).eps
    basis = torch.empty((p, order, n), dtype=Z.dtype, device=Z.device)  # per-probe basis, rows
    basis[:, 0] = Z / torch.linalg.vector_norm(Z, dim=1, keepdim=True)
    alphas = np.zeros((p, order))
    betas = np.zeros((p, order))
    lengths = np.full(p, order)
    active = np.ones(p, dtype=bool)
    scale = 0.0
    for j in range(order):
        W = apply(basis[:, j])  # [p, n]
        Qj = basis[:, : j + 1]  # [p, j+1, n]
        # Full reorthogonalisation, CGS2 (the plain three-term recurrence loses orthogonality and then
        # produces spurious copies of converged nodes).
        coef = torch.zeros((p, j + 1), dtype=torch.float64, device=Z.device)
        for _ in range(2):
            c = torch.bmm(Qj, W.unsqueeze(2)).squeeze(2)  # [p, j+1]
            W -= torch.bmm(c.unsqueeze(1), Qj).squeeze(1)
            coef += c.double()
        alphas[:, j] = coef[:, j].cpu().numpy()
        beta = torch.linalg.vector_norm(W.double(), dim=1).cpu().numpy()
        scale = max(scale, float(np.abs(alphas[:, j]).max()), float(beta.max()))
        if j + 1 == order:
            break
        dead = active & (beta <= breakdown_threshold(eps, scale, j + 1))
        lengths[dead] = j + 1
        active &= ~dead
        betas[:, j] = np.where(active, beta, 0.0)
        inv = torch.from_numpy(np.where(active, 1.0 / np.maximum(beta, 1e-300), 0.0)).to(W.device, W.dtype)
        basis[:, j + 1] = W * inv[:, None]
    return alphas, betas, lengths
