"""Spectral density by stochastic Lanczos quadrature (SLQ) and Hutchinson's trace estimator.

Both draw Rademacher probes ``z`` (entries +-1, from a seeded CPU generator) and only apply the operator.

* ``spectral_density``: for each probe, ``order`` steps of Lanczos (with full reorthogonalisation) started
  at ``z / |z|`` give a tridiagonal ``T``; its eigenvalues ``theta_i`` (nodes) and the squared first
  components ``tau_i`` of its eigenvectors (weights, summing to 1) form the Gauss quadrature of the
  probe's spectral measure. Averaged over probes, ``sum_i tau_i f(theta_i)`` estimates
  ``(1/n) tr f(H)``; with ``f`` a Gaussian of width ``sigma`` it is the smoothed spectral density
  (integrating to 1; multiply by ``n`` for eigenvalues per unit). Ghorbani, Krishnan, Xiao (ICML 2019) and
  PyHessian use the same estimator for neural-network Hessians.
* ``hutchinson_trace``: ``tr H ~ mean(z^T H z)``, with the standard error of that mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mrgd_ext.curvature.lanczos import as_operator

__all__ = ["spectral_density", "hutchinson_trace", "SpectralDensity", "TraceEstimate"]


@dataclass
class SpectralDensity:
    """Result of :func:`spectral_density` (host float64 arrays).

    Attributes:
        nodes: [num_probes, order] Ritz values per probe; a probe whose Krylov space closed early
            (breakdown: its start vector lies in an invariant subspace) has fewer; the rest of its row is
            NaN with weight 0.
        weights: [num_probes, order], each row sums to 1.
        lengths: [num_probes] Lanczos steps each probe took.
        grid: [g] points where the smoothed density is evaluated.
        density: [g] Gaussian-smoothed spectral density on ``grid``, integrating to about 1.
        sigma: the Gaussian width.
        num_hvps: operator applications used.
    """

    nodes: np.ndarray
    weights: np.ndarray
    lengths: np.ndarray
    grid: np.ndarray
    density: np.ndarray
    sigma: float
    num_hvps: int

    def quadrature(self) -> tuple[np.ndarray, np.ndarray]:
        """All probes' nodes and weights as one discrete measure (weights sum to 1)."""
        mask = self.weights > 0
        return self.nodes[mask], self.weights[mask] / self.weights.shape[0]

    def smoothed(self, grid: Any, sigma: float) -> np.ndarray:
        """The density on another grid or with another width, from the same quadrature."""
        nodes, weights = self.quadrature()
        return _gaussian_mixture(np.asarray(grid, dtype=np.float64), nodes, weights, float(sigma))


@dataclass
class TraceEstimate:
    """Result of :func:`hutchinson_trace`: ``trace`` +- ``stderr`` (standard error of the mean of
    ``samples = z^T H z`` over ``num_probes`` Rademacher probes)."""

    trace: float
    stderr: float
    samples: np.ndarray
    num_probes: int
    num_hvps: int


def _gaussian_mixture(grid: np.ndarray, nodes: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    out = np.zeros_like(grid)
    norm = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    # Chunks of nodes keep the [grid, nodes] temporary small for fine grids and many probes.
    for i in range(0, nodes.shape[0], 256):
        d = (grid[:, None] - nodes[None, i : i + 256]) / sigma
        out += (np.exp(-0.5 * d * d) * weights[None, i : i + 256]).sum(axis=1)
    return out * norm


def _check_count(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _rademacher(gen: torch.Generator, rows: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    z = torch.randint(0, 2, (rows, n), generator=gen, dtype=torch.int8)
    return (2 * z.to(dtype) - 1).to(device)


def _probe_tridiagonals(A, Z: torch.Tensor, order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lanczos on each row of ``Z`` [p, n] independently (batched: one block operator call per step).

    Returns alphas [p, order], betas [p, order] (beta_j couples steps j and j + 1) and lengths [p].
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
        W = A.matmat(basis[:, j])  # [p, n]
        Qj = basis[:, : j + 1]  # [p, j+1, n]
        # Full reorthogonalisation against the probe's own basis, CGS2 (the classical three-term recurrence
        # loses orthogonality and then produces spurious copies of converged nodes).
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
        # Breakdown (beta ~ 0): the probe's Krylov space is invariant and its quadrature is exact with
        # j + 1 nodes; the probe stops (its later rows are zeros and never read).
        dead = active & (beta <= 100.0 * eps * max(scale, 1e-300) * math.sqrt(j + 1))
        lengths[dead] = j + 1
        active &= ~dead
        betas[:, j] = np.where(active, beta, 0.0)
        inv = torch.from_numpy(np.where(active, 1.0 / np.maximum(beta, 1e-300), 0.0)).to(W.device, W.dtype)
        basis[:, j + 1] = W * inv[:, None]
    return alphas, betas, lengths


def spectral_density(
    op: Any,
    num_probes: int = 10,
    order: int = 80,
    seed: int = 0,
    *,
    grid: int | Any = 1000,
    sigma: float | None = None,
    probe_batch: int | None = None,
    n: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> SpectralDensity:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature (module docstring).

    Args:
        op: a :class:`mrgd_ext.HessianOperator`, a symmetric matrix or a block callable (as for
            :func:`mrgd_ext.curvature.lanczos`; a callable needs ``n=``).
        num_probes: Rademacher probes (the variance of the estimate falls as 1/num_probes).
        order: Lanczos steps per probe, ``<= n``; resolution of the quadrature (``order`` nodes per probe).
        seed: seed of the CPU generator that draws the probes.
        grid: number of evenly spaced points spanning the nodes +- 5 sigma, or the points themselves.
        sigma: Gaussian width; default 1% of the span of the nodes.
        probe_batch: probes run side by side (one operator call on a ``[probe_batch, n]`` block per step);
            default as many as fit a 1 GiB basis. Memory: ``probe_batch * order * n`` elements.

    Returns:
        :class:`SpectralDensity`.
    """
    A = as_operator(op, n=n, dtype=dtype, device=device)
    num_probes = _check_count(num_probes, "num_probes")
    order = _check_count(order, "order")
    if order > A.n:
        raise ValueError(f"order={order} exceeds the operator size n={A.n} (a Krylov space has at most n dimensions)")
    if A.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"op: SLQ needs a float32 or float64 operator, got {A.dtype}")
    if sigma is not None and not (math.isfinite(float(sigma)) and float(sigma) > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
    if probe_batch is None:
        elem = torch.finfo(A.dtype).bits // 8
        probe_batch = max(1, min(num_probes, (1 << 30) // max(order * A.n * elem, 1)))
    probe_batch = _check_count(probe_batch, "probe_batch")
    gen = torch.Generator().manual_seed(int(seed))
    alphas, betas, lengths = [], [], []
    for start in range(0, num_probes, probe_batch):
        rows = min(probe_batch, num_probes - start)
        a, b, ln = _probe_tridiagonals(A, _rademacher(gen, rows, A.n, A.dtype, A.device), order)
        alphas.append(a)
        betas.append(b)
        lengths.append(ln)
    alphas, betas, lengths = np.concatenate(alphas), np.concatenate(betas), np.concatenate(lengths)
    nodes = np.full((num_probes, order), np.nan)
    weights = np.zeros((num_probes, order))
    for p in range(num_probes):
        L = int(lengths[p])
        T = np.diag(alphas[p, :L]) + np.diag(betas[p, : L - 1], 1) + np.diag(betas[p, : L - 1], -1)
        theta, S = np.linalg.eigh(T)
        nodes[p, :L] = theta
        weights[p, :L] = S[0] ** 2
    valid = weights > 0
    lo, hi = float(np.nanmin(nodes)), float(np.nanmax(nodes))
    if sigma is None:
        span = hi - lo
        sigma = 0.01 * span if span > 0 else 1e-3 * max(abs(hi), 1.0)
    sigma = float(sigma)
    if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        points = _check_count(grid, "grid", 2)
        grid_arr = np.linspace(lo - 5 * sigma, hi + 5 * sigma, points)
    else:
        grid_arr = np.asarray(grid, dtype=np.float64).reshape(-1)
        if grid_arr.size == 0 or not np.all(np.isfinite(grid_arr)):
            raise ValueError("grid must be a number of points or a non-empty array of finite points")
    density = _gaussian_mixture(grid_arr, nodes[valid], weights[valid] / num_probes, sigma)
    return SpectralDensity(
        nodes=nodes,
        weights=weights,
        lengths=lengths,
        grid=grid_arr,
        density=density,
        sigma=sigma,
        num_hvps=int(num_probes * order),
    )


def hutchinson_trace(
    op: Any,
    num_probes: int = 100,
    seed: int = 0,
    *,
    batch_size: int = 8,
    n: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """Hutchinson's estimate of ``tr H`` from ``num_probes`` Rademacher probes, with its standard error.

    For Rademacher probes ``Var(z^T H z) = 2 sum_{i != j} H_ij^2`` (the diagonal contributes nothing), so a
    diagonally dominant operator needs few probes. ``batch_size`` probes share one operator call.
    ``num_probes >= 2`` (the standard error needs two samples).
    """
    A = as_operator(op, n=n, dtype=dtype, device=device)
    num_probes = _check_count(num_probes, "num_probes", 2)
    batch_size = _check_count(batch_size, "batch_size")
    gen = torch.Generator().manual_seed(int(seed))
    samples = []
    for start in range(0, num_probes, batch_size):
        rows = min(batch_size, num_probes - start)
        Z = _rademacher(gen, rows, A.n, A.dtype, A.device)
        HZ = A.matmat(Z)
        samples.append((Z.double() * HZ.double()).sum(dim=1).cpu().numpy())
    s = np.concatenate(samples)
    return TraceEstimate(
        trace=float(s.mean()),
        stderr=float(s.std(ddof=1) / math.sqrt(num_probes)),
        samples=s,
        num_probes=num_probes,
        num_hvps=num_probes,
    )
