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

from mrgd_ext._validation import check_count
from mrgd_ext.curvature.density import SpectralDensity, spectral_density
from mrgd_ext.curvature.lanczos import LanczosResult, lanczos
from mrgd_ext.curvature.operator import LinearOperator, as_operator
from mrgd_ext.curvature.scales import detect_scales
from mrgd_ext.planning import MultiratePlan, ScaleGroup, plan_multirate

__all__ = ["CurvatureEstimate", "estimate_curvature", "plan_from_estimate", "history_ritz", "default_floor"]


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
        density_reused: True when the SLQ density was taken over from an earlier estimate (no HVPs spent on it).
        density_lambda_max: the top Ritz value when the density was measured (NaN without Ritz values).
        lanczos: the :class:`mrgd_ext.curvature.LanczosResult` of the run (None when ``num_eigs=0`` or when every
            pair was computed densely).
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
    density_reused: bool = False
    density_lambda_max: float = float("nan")

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable digest (groups, lambda_max, cost)."""
        return {
            "groups": [[g.a, g.b] for g in self.groups],
            "lambda_max": self.lambda_max,
            "top_eigenvalues": [float(v) for v in self.eigenvalues],
            "num_hvps": self.num_hvps,
            "seconds": self.seconds,
        }


def default_floor(dtype: torch.dtype) -> float:
    """The default relative ``floor`` for an operator of ``dtype``: eigenvalues below it are not told apart
    from rounding.

    NOTE: [floor]
    An HVP in a dtype of unit roundoff eps carries an absolute error of about eps * lambda_max, so eigenvalues
    below ~10 eps * lambda_max are indistinguishable from zero and get no rate; everything above gets one.
    A fixed floor (formerly 1e-6 for every dtype) left real groups of float64 problems without a rate: raw
    diabetes least squares has an eigenvalue 2e-8 * lambda_max, which a target gap of 1e-6 needs.
    """
    return 10.0 * float(torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-6


def history_ritz(steps: torch.Tensor, grad_changes: torch.Tensor, *, rcond: float = 1e-10) -> np.ndarray:
    """Ritz values of the Hessian from an optimiser's own history, at zero Hessian-vector products.

    Along a full-batch run, ``y_k = g_{k+1} - g_k`` equals ``H s_k`` for ``s_k = x_{k+1} - x_k`` exactly on a
    quadratic and to first order otherwise (a secant). Rayleigh-Ritz on ``span(s_0..s_{m-1})`` with
    ``S H S^T ~ sym(S Y^T)`` gives Ritz values of ``H`` on that space; the steps of gradient descent span a
    Krylov space of the first gradient, so the extreme values converge as for Lanczos.

    Args:
        steps: ``[m, n]`` the steps ``s_k``.
        grad_changes: ``[m, n]`` the gradient changes ``y_k``.
        rcond: directions of the step Gram matrix with eigenvalue below ``rcond`` times its largest are
            dropped (the steps of a converging run become nearly parallel).

    Returns:
        float64 Ritz values, sorted descending (at most ``m``).
    """
    if steps.dim() != 2 or steps.shape != grad_changes.shape:
        raise ValueError(
            f"steps and grad_changes must both be [m, n] with the same shape, got {tuple(steps.shape)} and "
            f"{tuple(grad_changes.shape)}"
        )
    S = steps.detach().to(torch.float64)
    Y = grad_changes.detach().to(torch.float64)
    if S.shape[0] == 0:
        return np.zeros(0)
    gram = (S @ S.T).cpu().numpy()
    cross = (S @ Y.T).cpu().numpy()
    cross = 0.5 * (cross + cross.T)
    w, V = np.linalg.eigh(gram)
    keep = w > rcond * max(float(w.max()), 1e-300)
    if not keep.any():
        return np.zeros(0)
    W = V[:, keep] / np.sqrt(w[keep])  # S^T W has orthonormal columns
    T = W.T @ cross @ W
    return np.sort(np.linalg.eigvalsh(0.5 * (T + T.T)))[::-1]


def _every_pair(op: LinearOperator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every eigenpair of ``op`` from its dense matrix: ``(values descending [n] float64, vectors [n, n] as rows
    in the operator's dtype, residuals [n] float64)``.

    NOTE: [every pair]
    When every pair is wanted (``num_eigs >= n``: AutoMrGD's small problems, NOTE: [small problems]) a Krylov
    basis spans the whole space anyway, so Lanczos would spend the same n products plus n iterations of
    orthogonalisation and Ritz extraction, which on problems of tens of parameters cost far more than the
    products themselves (a 31-parameter logistic regression: 0.14 ms per product, ~0.9 ms per iteration).
    The dense matrix from n products (blocks of 64, one gradient graph: NOTE: [shared graph]) and one
    symmetric eigendecomposition give the exact pairs instead.
    """
    H = op.to_dense().to(torch.float64)
    H = 0.5 * (H + H.T)
    values, vectors = torch.linalg.eigh(H.cpu())
    values, vectors = values.flip(0), vectors.flip(1)
    residuals = torch.linalg.vector_norm(H.cpu() @ vectors - vectors * values, dim=0)
    return values, vectors.T.contiguous().to(device=op.device, dtype=op.dtype), residuals


def estimate_curvature(
    op: Any,
    *,
    num_eigs: int = 8,
    block_size: int = 4,
    lanczos_tol: float = 1e-2,
    max_lanczos_iters: int | None = None,
    lanczos_verify: bool = True,
    density_probes: int = 2,
    density_order: int = 40,
    min_gap: float = 10.0,
    floor: float | None = None,
    max_groups: int | None = 4,
    weight_floor: float = 1e-3,
    start: torch.Tensor | None = None,
    seed: int = 0,
    previous: CurvatureEstimate | None = None,
    density_reuse_tol: float = 0.25,
) -> CurvatureEstimate:
    """Measure the eigen-groups of ``op`` (module docstring).

    Args:
        op: a :class:`mrgd_ext.HessianOperator` (or anything :func:`mrgd_ext.curvature.lanczos` takes).
        num_eigs: top eigenpairs by block Lanczos (0: none; then ``density_probes`` must be >= 1). When it
            reaches the operator's size ``n``, every pair is computed from the dense matrix instead (``n``
            products, exact pairs; NOTE: [every pair]).
        block_size, lanczos_tol, max_lanczos_iters: passed to :func:`mrgd_ext.curvature.lanczos`. The default
            tolerance (1e-2 of ``|H|``) resolves group edges to about that relative accuracy, which is what a
            plan needs: its rates carry a margin on ``lambda_max`` anyway (NOTE: [estimation cost]).
        lanczos_verify: run Lanczos's verification in the complement of the converged pairs (its ``verify``;
            a caller that measures that complement itself, as AutoMrGD's subspace mode does, can skip it).
        density_probes, density_order: SLQ probes and Lanczos steps per probe (0 probes: no density; then
            the groups come from the Ritz values alone and the smallest group ends at the smallest of them).
            ``density_order`` is capped at ``n``.
        min_gap, floor, max_groups, weight_floor: passed to :func:`mrgd_ext.detect_scales`; ``floor=None``:
            :func:`default_floor` of the operator's dtype (NOTE: [floor]).
        start: warm start for Lanczos (e.g. the previous estimate's ``eigenvectors``).
        seed: seeds both the probes and the Lanczos start block.
        previous, density_reuse_tol: an earlier estimate whose density is taken over (no SLQ run) when the new
            top Ritz value is within ``density_reuse_tol`` (relative) of the top Ritz value at the time that
            density was measured: the spectrum's top has not moved, so its shape is taken to be the same
            (NOTE: [estimation cost]).

    Raises:
        ValueError: naming the argument; or when no positive curvature above ``floor`` is found.
    """
    num_eigs = check_count(num_eigs, "num_eigs", 0)
    density_probes = check_count(density_probes, "density_probes", 0)
    density_order = check_count(density_order, "density_order", 1)
    if num_eigs == 0 and density_probes == 0:
        raise ValueError("num_eigs and density_probes are both 0: nothing would be measured")
    op = as_operator(op)
    n = op.n
    if floor is None:
        floor = default_floor(op.dtype)
    t0 = time.perf_counter()
    hvps = 0
    values: list[np.ndarray] = []
    density = None
    result = None
    eigenvalues = torch.zeros(0, dtype=torch.float64)
    residuals = torch.zeros(0, dtype=torch.float64)
    vectors = None
    # Every product below is at one point: they may share one gradient graph (NOTE: [shared graph]).
    with op.share_graph():
        if num_eigs:
            k = min(num_eigs, n)
            if k == n:
                eigenvalues, vectors, residuals = _every_pair(op)
                hvps += n
            else:
                result = lanczos(
                    op, k, block_size=min(block_size, k), max_iters=max_lanczos_iters, tol=lanczos_tol, seed=seed,
                    start=start, verify=bool(lanczos_verify),
                )
                hvps += result.num_hvps
                eigenvalues, vectors, residuals = result.eigenvalues, result.eigenvectors, result.residuals
            values.append(eigenvalues.numpy())
        # NOTE: [estimation cost]
        # The SLQ density is the expensive part of an estimate (probes x order HVPs) and is needed only for the
        # shape of the spectrum below the top Ritz values. It is re-measured only when it could change the plan:
        # when the top of the spectrum moved by more than density_reuse_tol since the density was taken.
        reused = False
        top_now = float(eigenvalues.max()) if eigenvalues.numel() else float("nan")
        density_top = top_now
        if density_probes:
            if previous is not None and previous.density is not None and eigenvalues.numel():
                top_then = previous.density_lambda_max
                reused = math.isfinite(top_then) and abs(top_now - top_then) <= density_reuse_tol * abs(top_then)
            if reused:
                assert previous is not None and previous.density is not None  # reused implies both
                density = previous.density
                density_top = previous.density_lambda_max
            else:
                order = min(density_order, n)
                density = spectral_density(op, num_probes=density_probes, order=order, seed=seed, grid=200)
                hvps += density.num_hvps
            mask = density.weights > weight_floor
            values.append(density.nodes[mask])
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
            density_reused=reused,
            density_lambda_max=density_top,
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
