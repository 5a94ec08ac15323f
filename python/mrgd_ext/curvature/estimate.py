"""Curvature estimates for data-informed MrGD: the eigen-groups of a Hessian, measured, and a plan from them.

:func:`estimate_curvature` measures what a multirate plan needs from a :class:`mrgd_ext.HessianOperator`
(docs/design.md 1.5):

* the whole spectrum's shape by stochastic Lanczos quadrature (:func:`mrgd_ext.spectral_density`): where the
  eigenvalue mass lies, hence the groups, including the many-eigenvalue groups of small scale that a top-k
  solver never reaches;
* the top ``num_eigs`` eigenpairs by block Lanczos (:func:`mrgd_ext.curvature.lanczos`, warm-started from an earlier
  estimate): an accurate ``lambda_max`` for the safety of the smallest rate, outliers that carry too little
  mass for the density, and the Ritz vectors the subspace form needs.

Groups are read from the union of the density's nodes and the Ritz values by :func:`mrgd_ext.detect_scales`.
Eigenvalues at or below ``floor * lambda_max`` (the near-zero and negative bulk of a neural-network Hessian)
form no group: no rate is aimed at them.

:func:`plan_from_estimate` turns the groups into a :class:`mrgd_ext.MultiratePlan` with a margin on
``lambda_max`` (Krylov estimates approach it from below).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mrgd_ext.curvature.density import SpectralDensity, spectral_density
from mrgd_ext.curvature.lanczos import LanczosResult, as_operator, lanczos
from mrgd_ext.curvature.scales import detect_scales
from mrgd_ext.planning import MultiratePlan, ScaleGroup, plan_multirate

__all__ = ["CurvatureEstimate", "estimate_curvature", "plan_from_estimate"]


@dataclass
class CurvatureEstimate:
    """What :func:`estimate_curvature` measured.

    Attributes:
        groups: eigenvalue groups (Hessian scale), sorted descending, ready for :func:`plan_multirate`.
        lambda_max: the largest eigenvalue found (Ritz value or density node).
        eigenvalues: ``[k]`` float64 top Ritz values (empty when ``num_eigs=0``).
        eigenvectors: ``[k, n]`` Ritz vectors in the operator's dtype and device (``None`` when ``num_eigs=0``).
        residuals: ``[k]`` float64 ``|H y - theta y|`` of the Ritz pairs.
        density: the SLQ density (``None`` when ``density_probes=0``).
        num_hvps: Hessian-vector products spent (density and Lanczos).
        seconds: wall time of the estimate.
    """

    groups: list[ScaleGroup]
    lambda_max: float
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    residuals: torch.Tensor
    density: SpectralDensity | None
    num_hvps: int
    seconds: float
    lanczos: LanczosResult | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable digest (groups, lambda_max, cost)."""
        return {
            "groups": [[g.a, g.b] for g in self.groups],
            "lambda_max": self.lambda_max,
            "top_eigenvalues": [float(v) for v in self.eigenvalues],
            "num_hvps": self.num_hvps,
            "seconds": self.seconds,
        }


def _count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def estimate_curvature(
    op: Any,
    *,
    num_eigs: int = 8,
    block_size: int = 4,
    lanczos_tol: float = 1e-3,
    max_lanczos_iters: int | None = None,
    density_probes: int = 2,
    density_order: int = 40,
    min_gap: float = 10.0,
    floor: float = 1e-6,
    max_groups: int | None = 4,
    weight_floor: float = 1e-3,
    start: torch.Tensor | None = None,
    seed: int = 0,
) -> CurvatureEstimate:
    """Measure the eigen-groups of ``op`` (module docstring).

    Args:
        op: a :class:`mrgd_ext.HessianOperator` (or anything :func:`mrgd_ext.curvature.lanczos` takes).
        num_eigs: top eigenpairs by block Lanczos (0: none; then ``density_probes`` must be >= 1).
        block_size, lanczos_tol, max_lanczos_iters: passed to :func:`mrgd_ext.curvature.lanczos`. The default
            tolerance (1e-3 of ``|H|``) is ample for choosing rates, which carry a margin anyway.
        density_probes, density_order: SLQ probes and Lanczos steps per probe (0 probes: no density; then
            the groups come from the Ritz values alone and the smallest group ends at the smallest of them).
            ``density_order`` is capped at ``n``.
        min_gap, floor, max_groups, weight_floor: passed to :func:`mrgd_ext.detect_scales`.
        start: warm start for Lanczos (e.g. the previous estimate's ``eigenvectors``).
        seed: seeds both the probes and the Lanczos start block.

    Raises:
        ValueError: naming the argument; or when no positive curvature above ``floor`` is found.
    """
    num_eigs = _count(num_eigs, "num_eigs", 0)
    density_probes = _count(density_probes, "density_probes", 0)
    density_order = _count(density_order, "density_order", 1)
    if num_eigs == 0 and density_probes == 0:
        raise ValueError("num_eigs and density_probes are both 0: nothing would be measured")
    op = as_operator(op)
    n = op.n
    t0 = time.perf_counter()
    hvps = 0
    values: list[np.ndarray] = []
    density = None
    if density_probes:
        order = min(density_order, n)
        density = spectral_density(op, num_probes=density_probes, order=order, seed=seed, grid=200)
        hvps += density.num_hvps
        mask = density.weights > weight_floor
        values.append(density.nodes[mask])
    result = None
    eigenvalues = torch.zeros(0, dtype=torch.float64)
    residuals = torch.zeros(0, dtype=torch.float64)
    vectors = None
    if num_eigs:
        k = min(num_eigs, n)
        result = lanczos(
            op, k, block_size=min(block_size, k), max_iters=max_lanczos_iters, tol=lanczos_tol, seed=seed,
            start=start,
        )
        hvps += result.num_hvps
        eigenvalues, vectors, residuals = result.eigenvalues, result.eigenvectors, result.residuals
        values.append(eigenvalues.numpy())
    allv = np.concatenate(values) if values else np.zeros(0)
    allv = allv[np.isfinite(allv)]
    if allv.size == 0 or allv.max() <= 0:
        raise ValueError("op has no positive curvature: the Hessian estimate is not positive anywhere")
    groups = detect_scales(allv, min_gap=min_gap, floor=floor, max_groups=max_groups)
    return CurvatureEstimate(
        groups=groups,
        lambda_max=float(allv.max()),
        eigenvalues=eigenvalues,
        eigenvectors=vectors,
        residuals=residuals,
        density=density,
        num_hvps=hvps,
        seconds=time.perf_counter() - t0,
        lanczos=result,
    )


def widen_top(groups: list[ScaleGroup], margin: float) -> list[ScaleGroup]:
    """The groups with ``lambda_max`` raised by ``margin`` (>= 1): Krylov estimates approach it from below,
    and a rate aimed past the true top would make the smallest step expand the stiffest direction."""
    if not (math.isfinite(margin) and margin >= 1.0):
        raise ValueError(f"lambda_max_margin must be a finite number >= 1, got {margin}")
    top = groups[0]
    return [ScaleGroup(top.a, top.b * margin), *groups[1:]]


def plan_from_estimate(
    estimate: CurvatureEstimate,
    *,
    tol: float = 1e-6,
    strategy: str = "nested",
    rate_rule: str = "safe",
    lambda_max_margin: float = 1.1,
    max_cycle_length: int = 1_000_000,
) -> MultiratePlan:
    """A :class:`mrgd_ext.MultiratePlan` for the measured groups (``lambda_max`` widened by the margin).

    ``max_cycle_length`` is passed to :func:`mrgd_ext.plan_multirate` (which raises ``ValueError`` when no plan
    fits)."""
    return plan_multirate(widen_top(estimate.groups, float(lambda_max_margin)), tol=tol, strategy=strategy,
                          rate_rule=rate_rule, max_cycle_length=max_cycle_length)
