"""Quadratic test problems and classical baselines, for the Figure 3 reproduction and the planner tests.

He, Liu, Tsai (arXiv:2402.03021, Fig. 3) compare multirate gradient descent with classical methods on
randomly generated 100-dimensional linear regression problems with two scales (m = 1, r = 0.001) and three
scales (m = 2, r = 0.1).  Their generator is described in an appendix that is not available offline, so
:func:`random_multiscale_quadratic` is this project's reconstruction: data with multiscale columns, least
squares loss, Hessian ``X^T X / N`` (DESIGN 1.1).

Reading of ``r``: by default ``ratio`` is the ratio between successive **Hessian eigenvalue groups**
(``ratio_is="hessian"``).  That reading matches DESIGN 1.4's account of the two-scale example (MrGD in about
18 iterations where GD needs about 18,000): with ``r = 1e-3`` as an eigenvalue ratio and a Marchenko-Pastur
bulk per scale, GD at ``2/(lambda_min+lambda_max)`` needs ~2e4 iterations to 1e-6, whereas reading ``r`` as a
data-scale ratio (eigenvalue ratio ``r**2 = 1e-6``) would make GD need ~2e7.  ``ratio_is="data"`` gives the
other reading.

All iteration counters work in float64 and count iterations until the relative error
``||x_k - x*|| / ||x_0 - x*||`` first drops to ``tol`` (the exact minimiser is known).  They stop at
``max_iter`` and then say so (``iterations=None, converged=False``) rather than report the cap as a count.

Starts (``x0``): ``None`` or ``"zero"`` -> ``x0 = 0`` (the usual regression start); a tensor ``[d]`` or
``[d, k]`` (k starts run at once; the relative error is the worst column); ``"worst"`` -> one start per
eigenvector, ``x0 = x* + v_i``.  Every method here is a polynomial in H applied to the initial error (momentum
methods included, with ``x_{-1} = x_0``), so the worst column is the worst case over *all* starts:
``max_i |p_k(lambda_i)| = ||p_k(H)||_2``.  That is the quantity a planner's worst-case prediction bounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mrgd_ext.planning import ScaleGroup

__all__ = [
    "QuadraticProblem",
    "RunResult",
    "random_multiscale_quadratic",
    "quadratic_from_groups",
    "run_gd",
    "run_heavy_ball",
    "run_nesterov",
    "run_cg",
    "run_rate_cycle",
    "run_subspace_rates",
    "heavy_ball_params",
    "nesterov_params",
]

_DTYPE = torch.float64
_DEFAULT_MAX_ITER = 200_000
_MIN_GAP = 1.2  # generated groups must satisfy a_k >= 1.2 * b_{k+1}


@dataclass(frozen=True, eq=False)
class QuadraticProblem:
    """``f(x) = 1/2 x^T H x - b^T x`` with SPD ``H`` (float64), its minimiser and eigen-structure.

    Attributes:
        H: ``[d, d]`` SPD Hessian.
        b: ``[d]`` linear term, ``b = X^T y / N`` for a regression problem.
        x_star: ``[d]`` exact minimiser ``H^{-1} b`` (via the eigendecomposition).
        groups: exact eigenvalue groups (Hessian scale), sorted descending: ``[min, max]`` of each cluster.
        eigenvalues: ``[d]`` eigenvalues of H, descending.
        eigenvectors: ``[d, d]`` orthonormal eigenvectors (columns), same order.
        info: how the problem was generated (for reports).
    """

    H: torch.Tensor
    b: torch.Tensor
    x_star: torch.Tensor
    groups: tuple[ScaleGroup, ...]
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.H.shape[0])

    @property
    def lambda_max(self) -> float:
        return float(self.eigenvalues[0])

    @property
    def lambda_min(self) -> float:
        return float(self.eigenvalues[-1])

    @property
    def condition(self) -> float:
        return self.lambda_max / self.lambda_min

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """``1/2 x^T H x - b^T x`` (for ``x`` of shape ``[d]`` or ``[d, k]``: one value per column)."""
        x = x.to(_DTYPE)
        return 0.5 * (x * (self.H @ x)).sum(0) - (self.b.reshape(-1, *([1] * (x.dim() - 1))) * x).sum(0)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        """``H x - b`` (columnwise for ``[d, k]``)."""
        return self.H @ x - (self.b if x.dim() == 1 else self.b[:, None])


def _finish(
    H: torch.Tensor, b: torch.Tensor, evals_desc: torch.Tensor, evecs: torch.Tensor, dims: Sequence[int],
    info: dict[str, Any], min_gap: float = 1.0,
) -> QuadraticProblem:
    groups = []
    start = 0
    for dk in dims:
        block = evals_desc[start : start + dk]
        groups.append(ScaleGroup(float(block.min()), float(block.max())))
        start += dk
    # Splitting the sorted spectrum always leaves *some* gap; a scale is resolved only if the gap is real.
    # 20% is far above the spacing inside a bulk (~2% for 50 eigenvalues) and far below the gaps of the
    # Figure 3 problems (5x and more).
    for k in range(len(groups) - 1):
        if not (groups[k + 1].b * min_gap <= groups[k].a and groups[k + 1].b < groups[k].a):
            raise ValueError(
                f"the generated eigenvalue groups {k} and {k + 1} overlap or nearly touch ({groups[k]} vs "
                f"{groups[k + 1]}, need a_k >= {min_gap} b_(k+1)): the scales are not separated at this "
                f"ratio; use a smaller ratio or more samples"
            )
    x_star = evecs @ ((evecs.T @ b) / evals_desc)
    return QuadraticProblem(H, b, x_star, tuple(groups), evals_desc, evecs, info)


def random_multiscale_quadratic(
    dim: int = 100,
    num_scales: int = 2,
    ratio: float = 1e-3,
    seed: int = 0,
    *,
    n_samples: int = 1000,
    ratio_is: str = "hessian",
    dims: Sequence[int] | None = None,
    noise: float = 0.1,
) -> QuadraticProblem:
    """A random least-squares problem with multiscale data (Figure 3 of the paper, reconstructed).

    Data ``X = Z diag(e) U^T`` (``[N, d]``): ``Z`` standard normal, ``U`` a random rotation, and ``e`` holds the
    data scale ``e_k = s**k`` on block k of the coordinates (``s = sqrt(ratio)`` for ``ratio_is="hessian"``,
    ``s = ratio`` for ``"data"``); targets ``y = X w + noise * eps``.  The loss ``1/(2N) ||X x - y||^2`` equals
    ``1/2 x^T H x - b^T x`` up to a constant with ``H = X^T X / N`` and ``b = X^T y / N``.  H's eigenvalues form
    ``num_scales`` Marchenko-Pastur bulks near ``ratio_h**k`` (``ratio_h = ratio`` or ``ratio**2``), each of
    condition ``~((1 + sqrt(d_k/N)) / (1 - sqrt(d_k/N)))**2`` (about 2 for the defaults).

    Args:
        dim: dimension d.
        num_scales: number of scales, ``m + 1`` (the paper's two scales are ``m = 1``).
        ratio: ratio between successive scales, in (0, 1); meaning set by ``ratio_is``.
        seed: seed of a dedicated CPU generator (the global RNG is untouched).
        n_samples: N, number of data points.
        ratio_is: ``"hessian"`` (default: ``ratio`` between eigenvalue groups) or ``"data"`` (between data
            scales; eigenvalue ratio ``ratio**2``).
        dims: coordinates per scale (default: as equal as possible, larger blocks first).
        noise: label noise; only moves ``x*``.

    Returns:
        A :class:`QuadraticProblem` whose ``groups`` are the exact eigenvalue clusters (the top ``dims[0]``
        eigenvalues, the next ``dims[1]``, ...).  Raises ValueError if the clusters are not separated
        (``a_k >= 1.2 b_{k+1}``: splitting a sorted spectrum always leaves some gap, this asks for a real one).
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
    if isinstance(num_scales, bool) or not isinstance(num_scales, int) or not 1 <= num_scales <= dim:
        raise ValueError(f"num_scales must be an integer in [1, dim], got {num_scales!r}")
    if ratio_is not in ("hessian", "data"):
        raise ValueError(f"ratio_is must be 'hessian' or 'data', got {ratio_is!r}")
    ratio = float(ratio)
    if not (math.isfinite(ratio) and 0.0 < ratio < 1.0):
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    if n_samples < dim:
        raise ValueError(f"n_samples must be >= dim for an SPD Hessian, got {n_samples} < {dim}")
    if dims is None:
        base, extra = divmod(dim, num_scales)
        dims = [base + (1 if k < extra else 0) for k in range(num_scales)]
    dims = [int(x) for x in dims]
    if len(dims) != num_scales or sum(dims) != dim or min(dims) < 1:
        raise ValueError(f"dims must be {num_scales} positive integers summing to dim={dim}, got {dims}")

    gen = torch.Generator().manual_seed(int(seed))
    data_ratio = math.sqrt(ratio) if ratio_is == "hessian" else ratio
    scales = torch.cat([torch.full((dk,), data_ratio**k, dtype=_DTYPE) for k, dk in enumerate(dims)])
    U, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=_DTYPE))
    Z = torch.randn(n_samples, dim, generator=gen, dtype=_DTYPE)
    X = (Z * scales) @ U.T  # [N, d]
    w = torch.randn(dim, generator=gen, dtype=_DTYPE)
    y = X @ w + noise * torch.randn(n_samples, generator=gen, dtype=_DTYPE)
    H = X.T @ X / n_samples
    H = 0.5 * (H + H.T)
    b = X.T @ y / n_samples
    evals, evecs = torch.linalg.eigh(H)
    evals, evecs = evals.flip(0), evecs.flip(1)
    info = {
        "generator": "random_multiscale_quadratic",
        "dim": dim,
        "num_scales": num_scales,
        "ratio": ratio,
        "ratio_is": ratio_is,
        "hessian_ratio": ratio if ratio_is == "hessian" else ratio**2,
        "data_ratio": data_ratio,
        "n_samples": n_samples,
        "dims": dims,
        "seed": int(seed),
    }
    return _finish(H, b, evals, evecs, dims, info, min_gap=_MIN_GAP)


def quadratic_from_groups(
    groups: Sequence[ScaleGroup], per_group: int = 16, seed: int = 0
) -> QuadraticProblem:
    """A rotated quadratic whose eigenvalues fill the given groups, both endpoints of every group included
    (so the spectrum's extremes are exactly the groups' ends); the interior eigenvalues are log-uniform."""
    if per_group < 2:
        raise ValueError(f"per_group must be >= 2 (both endpoints), got {per_group}")
    gen = torch.Generator().manual_seed(int(seed))
    evals = []
    for g in groups:
        inner = torch.rand(per_group - 2, generator=gen, dtype=_DTYPE)
        inner = torch.exp(math.log(g.a) + inner * (math.log(g.b) - math.log(g.a)))
        evals.append(torch.cat([torch.tensor([g.b, g.a], dtype=_DTYPE), inner]).sort(descending=True).values)
    lam = torch.cat(evals)
    dim = lam.numel()
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=_DTYPE))
    H = (Q * lam) @ Q.T
    H = 0.5 * (H + H.T)
    # x* of norm ~1 (b = H x*), so rounding in the iterates is relative to the same scale as the errors.
    x_star = torch.randn(dim, generator=gen, dtype=_DTYPE) / math.sqrt(dim)
    b = H @ x_star
    info = {"generator": "quadratic_from_groups", "per_group": per_group, "seed": int(seed)}
    return _finish(H, b, lam, Q, [per_group] * len(groups), info)


# --------------------------------------------------------------------------------------------------------
# Iteration counters
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    """Outcome of one iteration counter.

    ``iterations`` is the first k with relative error <= tol (0 if the start already is), or None when
    ``max_iter`` was reached first (``converged`` False, ``relative_error`` the value at the cap).
    """

    method: str
    iterations: int | None
    converged: bool
    relative_error: float
    max_iter: int
    tol: float
    params: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        its = self.iterations if self.converged else f">{self.max_iter} (capped)"
        return f"{self.method}: {its} iterations to {self.tol:g} (final rel. error {self.relative_error:.3g})"


def _start(problem: QuadraticProblem, x0: Any) -> torch.Tensor:
    if x0 is None or (isinstance(x0, str) and x0 == "zero"):
        return torch.zeros_like(problem.x_star)
    if isinstance(x0, str):
        if x0 == "worst":
            return problem.x_star[:, None] + problem.eigenvectors
        raise ValueError(f"x0 must be None, 'zero', 'worst' or a tensor, got {x0!r}")
    x0 = torch.as_tensor(x0, dtype=_DTYPE)
    if x0.shape[0] != problem.dim or x0.dim() not in (1, 2):
        raise ValueError(f"x0 must have shape [{problem.dim}] or [{problem.dim}, k], got {tuple(x0.shape)}")
    return x0.clone()


class _ErrorMeter:
    """Worst relative error over the columns of x (one column for a single start)."""

    def __init__(self, problem: QuadraticProblem, x0: torch.Tensor) -> None:
        self.x_star = problem.x_star if x0.dim() == 1 else problem.x_star[:, None]
        e0 = torch.linalg.vector_norm(x0 - self.x_star, dim=0)
        if torch.any(e0 == 0):
            raise ValueError("x0 equals x_star (in some column): the relative error is undefined")
        self.e0 = e0

    def __call__(self, x: torch.Tensor) -> float:
        return float((torch.linalg.vector_norm(x - self.x_star, dim=0) / self.e0).max())


def _check_run_args(tol: float, max_iter: int) -> None:
    if not (math.isfinite(tol) and 0.0 < tol < 1.0):
        raise ValueError(f"tol must be in (0, 1), got {tol}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an integer >= 0, got {max_iter!r}")


def _result(method: str, k: int | None, err: float, max_iter: int, tol: float, params: dict) -> RunResult:
    return RunResult(method, k, k is not None, err, max_iter, tol, params)


def run_rate_cycle(
    problem: QuadraticProblem,
    cycle: Sequence[float],
    tol: float = 1e-6,
    max_iter: int = _DEFAULT_MAX_ITER,
    x0: Any = None,
) -> RunResult:
    """Gradient descent walking ``cycle`` (e.g. ``MultiratePlan.cycle``), repeating it until converged."""
    _check_run_args(tol, max_iter)
    rates = [float(r) for r in cycle]
    if not rates or not all(math.isfinite(r) and r > 0 for r in rates):
        raise ValueError("cycle must be a non-empty sequence of finite rates > 0")
    x = _start(problem, x0)
    meter = _ErrorMeter(problem, x)
    b = problem.b if x.dim() == 1 else problem.b[:, None]
    H = problem.H
    err = meter(x)
    if err <= tol:
        return _result("rate cycle", 0, err, max_iter, tol, {"cycle_length": len(rates)})
    L = len(rates)
    for k in range(max_iter):
        x = x - rates[k % L] * (H @ x - b)
        err = meter(x)
        if err <= tol:
            return _result("rate cycle", k + 1, err, max_iter, tol, {"cycle_length": L})
    return _result("rate cycle", None, err, max_iter, tol, {"cycle_length": L})


def run_gd(
    problem: QuadraticProblem, lr: float, tol: float = 1e-6, max_iter: int = _DEFAULT_MAX_ITER, x0: Any = None
) -> RunResult:
    """Gradient descent with a constant rate (the best constant rate is ``2/(lambda_min+lambda_max)``)."""
    res = run_rate_cycle(problem, [lr], tol, max_iter, x0)
    return RunResult("gd", res.iterations, res.converged, res.relative_error, max_iter, tol, {"lr": float(lr)})


def heavy_ball_params(lam_min: float, lam_max: float) -> tuple[float, float]:
    """Polyak's optimal heavy-ball step and momentum for eigenvalues in [lam_min, lam_max]:
    ``alpha = 4/(sqrt(L)+sqrt(mu))**2``, ``beta = ((sqrt(L)-sqrt(mu))/(sqrt(L)+sqrt(mu)))**2``;
    asymptotic rate ``(sqrt(kappa)-1)/(sqrt(kappa)+1)`` per iteration."""
    _check_interval(lam_min, lam_max)
    sl, sm = math.sqrt(lam_max), math.sqrt(lam_min)
    return 4.0 / (sl + sm) ** 2, ((sl - sm) / (sl + sm)) ** 2


def nesterov_params(lam_min: float, lam_max: float) -> tuple[float, float]:
    """Constant Nesterov parameters that minimise the worst-case linear rate on quadratics with eigenvalues
    in [lam_min, lam_max]: ``alpha = 4/(3L+mu)``, ``beta = (sqrt(3 kappa+1)-2)/(sqrt(3 kappa+1)+2)``, rate
    ``1 - 2/sqrt(3 kappa+1)`` (Lessard, Recht & Packard, 2016).  They beat the textbook ``1/L``,
    ``(sqrt(kappa)-1)/(sqrt(kappa)+1)`` tuning on quadratics (tests check the rate on the 2x2 iteration)."""
    _check_interval(lam_min, lam_max)
    kappa = lam_max / lam_min
    q = math.sqrt(3.0 * kappa + 1.0)
    return 4.0 / (3.0 * lam_max + lam_min), (q - 2.0) / (q + 2.0)


def _check_interval(lam_min: float, lam_max: float) -> None:
    if not (math.isfinite(lam_min) and math.isfinite(lam_max) and 0.0 < lam_min <= lam_max):
        raise ValueError(f"need 0 < lam_min <= lam_max (finite), got lam_min={lam_min}, lam_max={lam_max}")


def run_heavy_ball(
    problem: QuadraticProblem, lam_min: float, lam_max: float, tol: float = 1e-6,
    max_iter: int = _DEFAULT_MAX_ITER, x0: Any = None,
) -> RunResult:
    """Polyak heavy ball ``x+ = x - alpha grad(x) + beta (x - x_prev)`` with optimal constant parameters."""
    _check_run_args(tol, max_iter)
    alpha, beta = heavy_ball_params(lam_min, lam_max)
    params = {"alpha": alpha, "beta": beta}
    x = _start(problem, x0)
    meter = _ErrorMeter(problem, x)
    x_prev = x
    err = meter(x)
    if err <= tol:
        return _result("heavy ball", 0, err, max_iter, tol, params)
    for k in range(max_iter):
        x, x_prev = x - alpha * problem.grad(x) + beta * (x - x_prev), x
        err = meter(x)
        if err <= tol:
            return _result("heavy ball", k + 1, err, max_iter, tol, params)
    return _result("heavy ball", None, err, max_iter, tol, params)


def run_nesterov(
    problem: QuadraticProblem, lam_min: float, lam_max: float, tol: float = 1e-6,
    max_iter: int = _DEFAULT_MAX_ITER, x0: Any = None,
) -> RunResult:
    """Nesterov ``y = x + beta (x - x_prev); x+ = y - alpha grad(y)`` with :func:`nesterov_params`."""
    _check_run_args(tol, max_iter)
    alpha, beta = nesterov_params(lam_min, lam_max)
    params = {"alpha": alpha, "beta": beta}
    x = _start(problem, x0)
    meter = _ErrorMeter(problem, x)
    x_prev = x
    err = meter(x)
    if err <= tol:
        return _result("nesterov", 0, err, max_iter, tol, params)
    for k in range(max_iter):
        y = x + beta * (x - x_prev)
        x, x_prev = y - alpha * problem.grad(y), x
        err = meter(x)
        if err <= tol:
            return _result("nesterov", k + 1, err, max_iter, tol, params)
    return _result("nesterov", None, err, max_iter, tol, params)


def run_cg(
    problem: QuadraticProblem, tol: float = 1e-6, max_iter: int = _DEFAULT_MAX_ITER, x0: Any = None
) -> RunResult:
    """Conjugate gradients (Hestenes-Stiefel) on ``H x = b``, float64, stopped on the error to ``x*``.

    With several start columns each column runs its own CG (coefficients per column).  A CG run that has
    reached the exact solution (zero residual) stays there.
    """
    _check_run_args(tol, max_iter)
    x = _start(problem, x0)
    meter = _ErrorMeter(problem, x)
    single = x.dim() == 1
    if single:
        x = x[:, None]
    H, b = problem.H, problem.b[:, None]
    r = b - H @ x
    p = r.clone()
    rr = (r * r).sum(0)
    err = meter(x[:, 0] if single else x)
    if err <= tol:
        return _result("cg", 0, err, max_iter, tol, {})
    for k in range(max_iter):
        Hp = H @ p
        pHp = (p * Hp).sum(0)
        alpha = torch.where(pHp > 0, rr / torch.where(pHp > 0, pHp, 1.0), 0.0)
        x = x + alpha * p
        r = r - alpha * Hp
        rr_new = (r * r).sum(0)
        beta = torch.where(rr > 0, rr_new / torch.where(rr > 0, rr, 1.0), 0.0)
        p = r + beta * p
        rr = rr_new
        err = meter(x[:, 0] if single else x)
        if err <= tol:
            return _result("cg", k + 1, err, max_iter, tol, {})
    return _result("cg", None, err, max_iter, tol, {})


def run_subspace_rates(
    problem: QuadraticProblem,
    rates: Sequence[float],
    tol: float = 1e-6,
    max_iter: int = _DEFAULT_MAX_ITER,
    x0: Any = None,
) -> RunResult:
    """The spatial (subspace) form of MrGD with *exact* eigenbases (DESIGN 1.4): every group takes its own
    rate at every step, ``x <- x - eta_m g - sum_{k<m} (eta_k - eta_m) U_k U_k^T g``, with ``U_k`` the
    eigenvectors of ``problem.groups[k]`` and ``rates[k]`` its rate (e.g. ``MultiratePlan.subspace_rates()``
    of an unmerged plan).  The ideal the fused subspace kernel approaches when its bases are accurate."""
    _check_run_args(tol, max_iter)
    if len(rates) != len(problem.groups):
        raise ValueError(f"need one rate per group ({len(problem.groups)}), got {len(rates)}")
    lam = problem.eigenvalues
    per_dir = torch.empty_like(lam)
    for g, r in zip(problem.groups, rates):
        per_dir[(lam >= g.a) & (lam <= g.b)] = float(r)
    # Preconditioner V diag(eta) V^T: identical to eta_m I + sum_k (eta_k - eta_m) U_k U_k^T.
    V = problem.eigenvectors
    M = (V * per_dir) @ V.T
    x = _start(problem, x0)
    meter = _ErrorMeter(problem, x)
    params = {f"eta_{k}": float(r) for k, r in enumerate(rates)}
    err = meter(x)
    if err <= tol:
        return _result("subspace", 0, err, max_iter, tol, params)
    for k in range(max_iter):
        x = x - M @ problem.grad(x)
        err = meter(x)
        if err <= tol:
            return _result("subspace", k + 1, err, max_iter, tol, params)
    return _result("subspace", None, err, max_iter, tol, params)


def worst_case_iterations_from_eigenvalues(
    eigenvalues: Any, cycle: Sequence[float], tol: float = 1e-6, max_iter: int = _DEFAULT_MAX_ITER
) -> int | None:
    """First k with ``max_i |prod_{j<k} (1 - eta_j lambda_i)| <= tol`` by direct float64 products at the
    given eigenvalues (no matrix): a cheap cross-check of ``run_rate_cycle(..., x0="worst")``."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    rates = [float(r) for r in cycle]
    logp = np.zeros_like(lam)
    log_tol = math.log(tol)
    with np.errstate(divide="ignore"):
        for k in range(max_iter):
            logp = logp + np.log(np.abs(1.0 - rates[k % len(rates)] * lam))
            if logp.max() <= log_tol:
                return k + 1
    return None


__all__.append("worst_case_iterations_from_eigenvalues")
