"""Spectral density by stochastic Lanczos quadrature (SLQ).

``spectral_density`` draws Rademacher probes ``z`` (entries +-1, from a seeded CPU generator) and only applies
the operator: for each probe, ``order`` steps of Lanczos (with full reorthogonalisation; the shared Krylov
core's :func:`mrgd_ext.curvature.krylov.probe_tridiagonals`, all probes of a batch side by side) started
at ``z / |z|`` give a tridiagonal ``T``; its eigenvalues ``theta_i`` (nodes) and the squared first
components ``tau_i`` of its eigenvectors (weights, summing to 1) form the Gauss quadrature of the probe's
spectral measure. Averaged over probes, ``sum_i tau_i f(theta_i)`` estimates ``(1/n) tr f(H)``; with ``f`` a
Gaussian of width ``sigma`` it is the smoothed spectral density (integrating to 1; multiply by ``n`` for
eigenvalues per unit). Ghorbani, Krishnan, Xiao (ICML 2019) and PyHessian use the same estimator for
neural-network Hessians. The trace estimators are in :mod:`mrgd_ext.curvature.trace`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mrgd_ext._validation import check_int
from mrgd_ext.curvature.krylov import CountingApply, host_eigh, probe_tridiagonals
from mrgd_ext.curvature.operator import as_operator, at_one_point

# Re-exported: the trace estimators used to live here.
from mrgd_ext.curvature.trace import TraceEstimate, _rademacher, hutchinson_trace

__all__ = ["spectral_density", "SpectralDensity", "hutchinson_trace", "TraceEstimate"]


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


def _gaussian_mixture(grid: np.ndarray, nodes: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    out = np.zeros_like(grid)
    norm = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    # Chunks of nodes keep the [grid, nodes] temporary small for fine grids and many probes.
    for i in range(0, nodes.shape[0], 256):
        d = (grid[:, None] - nodes[None, i : i + 256]) / sigma
        out += (np.exp(-0.5 * d * d) * weights[None, i : i + 256]).sum(axis=1)
    return out * norm


@at_one_point
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
    num_probes = check_int(num_probes, "num_probes", 1)
    order = check_int(order, "order", 1)
    if order > A.n:
        raise ValueError(f"order={order} exceeds the operator size n={A.n} (a Krylov space has at most n dimensions)")
    if A.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"op: SLQ needs a float32 or float64 operator, got {A.dtype}")
    if sigma is not None and not (math.isfinite(float(sigma)) and float(sigma) > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
    if probe_batch is None:
        elem = torch.finfo(A.dtype).bits // 8
        probe_batch = max(1, min(num_probes, (1 << 30) // max(order * A.n * elem, 1)))
    probe_batch = check_int(probe_batch, "probe_batch", 1)
    gen = torch.Generator().manual_seed(int(seed))
    apply = CountingApply(A)
    alpha_parts, beta_parts, length_parts = [], [], []
    for start in range(0, num_probes, probe_batch):
        rows = min(probe_batch, num_probes - start)
        a, b, ln = probe_tridiagonals(apply, _rademacher(gen, rows, A.n, A.dtype, A.device), order)
        alpha_parts.append(a)
        beta_parts.append(b)
        length_parts.append(ln)
    alphas, betas = np.concatenate(alpha_parts), np.concatenate(beta_parts)
    lengths = np.concatenate(length_parts)
    nodes = np.full((num_probes, order), np.nan)
    weights = np.zeros((num_probes, order))
    for p in range(num_probes):
        L = int(lengths[p])
        T = np.diag(alphas[p, :L]) + np.diag(betas[p, : L - 1], 1) + np.diag(betas[p, : L - 1], -1)
        theta, S = host_eigh(T)
        nodes[p, :L] = theta
        weights[p, :L] = S[0] ** 2
    valid = weights > 0
    lo, hi = float(np.nanmin(nodes)), float(np.nanmax(nodes))
    if sigma is None:
        span = hi - lo
        sigma = 0.01 * span if span > 0 else 1e-3 * max(abs(hi), 1.0)
    sigma = float(sigma)
    if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        points = check_int(grid, "grid", 2)
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
        num_hvps=apply.num_hvps,
    )
