"""Multirate learning-rate planner: eigen-groups in, a cycle of learning rates out.

Multiscale data give the loss a Hessian whose eigenvalues fall into groups of very different size
(He, Liu, Tsai, "Data-induced multiscale losses and efficient multirate gradient descent schemes",
arXiv:2402.03021).  Plain gradient descent is limited by the ratio lambda_max / lambda_min over the whole
spectrum; multirate gradient descent (MrGD) instead cycles through learning rates matched to the groups, so
its cost is governed by the conditioning *within* groups.  This module turns a list of eigenvalue groups
into such a cycle and predicts, from the cycle polynomial, how many iterations it needs.

Terms used throughout (see also docs/design.md section 1.3):

* A group ``G_k = [a_k, b_k]`` is an interval of **Hessian eigenvalues** (not of data scales: a data scale
  ``e`` gives Hessian eigenvalues near ``e**2`` for least squares).  Groups are sorted descending,
  ``b_0 = lambda_max``, with gaps ``b_{k+1} < a_k``.  Group 0 holds the largest eigenvalues (the "finest"
  scale in the sense that it needs the smallest steps).
* A cycle ``(eta_1, ..., eta_L)`` is walked by gradient descent one rate per step.  On a quadratic the
  error along an eigenvector with eigenvalue ``lam`` is multiplied per cycle by the cycle polynomial
  ``P(lam) = prod_i (1 - eta_i * lam)``.  Its sup over the groups, ``rho``, is the contraction per cycle,
  and ``cycle_length * ceil(ln(tol) / ln(rho))`` iterations reduce every error component by ``tol`` -- a
  worst-case bound over starting points that the tests check against measured iterations.

Strategies (``plan_multirate``):

* ``"nested"`` -- the reference form of the paper's Algorithm 1: one rate per group
  (``2/(a_k+b_k)`` or ``1/b_k``), ``C_0 = [eta_0]`` and ``C_k = C_{k-1}`` repeated ``n_{k-1}`` times followed by
  one large step ``eta_k``; ``n_{k-1}`` is the least count for which every finer group is damped by the
  cycle at least as much as the large step damps its own group.
* ``"chebyshev-nested"`` (beyond the paper) -- the same nesting, but level ``k`` takes ``d_k`` large steps at
  the reciprocals of the Chebyshev nodes of ``G_k`` and the block of smaller steps is repeated before *each*
  of them: ``C_k = [B, s_1, B, s_2, ..., B, s_{d_k}]`` with ``B = C_{k-1}`` repeated ``n_{k-1}`` times.  The
  degrees are searched to minimise predicted iterations.  A Chebyshev cycle of degree ``d`` on a group of
  condition ``kappa`` contracts it by ``1/T_d((kappa+1)/(kappa-1))``, about ``2 ((sqrt(kappa)-1)/(sqrt(kappa)+1))**d``,
  i.e. it needs ~sqrt(kappa) steps per digit where one repeated rate needs ~kappa.
* ``"chebyshev"`` -- one Chebyshev cycle over ``[lambda_min, lambda_max]`` (the right answer when the groups
  are not separated).
* ``"auto"`` -- all of the above, with and without merging adjacent groups, and returns the plan with the
  fewest predicted iterations.

Within a Chebyshev level the order of the steps does not change the cycle polynomial but does change what
floating point sees: an unlucky order (e.g. ascending rates) lets a rounding error injected mid-cycle grow by
1e100 and more before the rest of the cycle damps it, and the iteration stalls far above the predicted
accuracy.  The planner uses the fractal (Lebedev-Finogenov type) order, generalised to degrees ``q * 2**p``
with odd ``q <= 13`` (see NOTE [stable order]), and reports two measures per plan:
``peak_amplification`` (largest partial product from the start of a cycle) and
``perturbation_amplification`` (largest product over any run of consecutive steps).  Warm-up order is kept
at every level: the block of small steps always precedes the large step it protects, which is why nested
plans never amplify the error inside a cycle (peak amplification 1).  A perturbation arriving just before a
large step is still amplified by it -- and, at the end of a nested cycle, by the large steps of the coarser
levels that follow it directly -- so the perturbation amplification of a multirate plan is about
lambda_max/lambda_min for two groups and can reach the product of the level ratios for deep nests.  Float64
iterations then stall near 1e-16 times that value (e.g. four groups spanning 5e7 reach ~1e12: no 1e-6).

All sups are evaluated numerically on a dense grid per group (cosine-spaced, so Chebyshev oscillations near
the ends are resolved, plus log-spaced, plus both endpoints) by summing ``log|1 - eta*lam|``, so nothing
overflows however long the cycle.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "ScaleGroup",
    "MultiratePlan",
    "groups_from_scales",
    "plan_multirate",
    "STRATEGIES",
    "RATE_RULES",
]

#: Values accepted for ``plan_multirate(strategy=...)``.
STRATEGIES: tuple[str, ...] = ("auto", "nested", "chebyshev-nested", "chebyshev")
#: Values accepted for ``plan_multirate(rate_rule=...)``.
RATE_RULES: tuple[str, ...] = ("optimal", "safe")

_WARMUP_ORDER = (
    "warm-up: small steps first (each large step follows the block of small steps that damps what it amplifies)"
)
_PLAN_FORMAT = "mrgd_ext.MultiratePlan/1"

# Grid resolution. Fine grids decide every reported number; coarse grids only rank candidates in the search
# and order Chebyshev steps (the result is then re-evaluated on the fine grid).
# NOTE: [grid] Chebyshev oscillations of degree d are equally spaced in theta = arccos(mu); 2049 cosine-spaced
# points give about 4 points per half-oscillation up to degree 512, so an interior sup is underestimated by
# at most ~1 - cos(pi/8) ~ 8% (the sup of a Chebyshev cycle sits at the group ends, which are always in the
# grid); an 8% error in rho changes ln(tol)/ln(rho) by well under one cycle.
_FINE_COS, _FINE_LOG = 2049, 1025
_COARSE_COS, _COARSE_LOG = 161, 64
_MAX_EXHAUSTIVE_GAPS = 5  # 2**5 merge patterns; beyond that merging is greedy


# --------------------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleGroup:
    """A closed interval ``[a, b]`` of Hessian eigenvalues (Hessian scale, not data scale).

    Validated on construction: both ends finite real numbers with ``0 < a <= b``; anything else raises
    ``ValueError`` naming the offending end.  ``a == b`` (a single eigenvalue) is allowed.
    """

    a: float
    b: float

    def __post_init__(self) -> None:
        for name in ("a", "b"):
            value = getattr(self, name)
            if isinstance(value, bool):
                raise ValueError(f"ScaleGroup.{name} must be a real number, got a bool")
            try:
                as_float = float(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"ScaleGroup.{name} must be a real number, got {type(value).__name__}"
                ) from None
            if not math.isfinite(as_float):
                raise ValueError(f"ScaleGroup.{name} must be finite, got {as_float}")
            object.__setattr__(self, name, as_float)
        if self.a <= 0.0:
            raise ValueError(f"ScaleGroup.a must be > 0 (eigenvalues of an SPD Hessian), got a={self.a}")
        if self.b < self.a:
            raise ValueError(f"ScaleGroup needs a <= b, got a={self.a} > b={self.b}")

    @property
    def width(self) -> float:
        """Absolute width ``b - a``."""
        return self.b - self.a

    @property
    def center(self) -> float:
        """Midpoint ``(a + b) / 2``; ``1/center`` is the group's optimal single rate ``2/(a+b)``."""
        return 0.5 * (self.a + self.b)

    @property
    def condition(self) -> float:
        """Condition number within the group, ``b / a``."""
        return self.b / self.a

    def __str__(self) -> str:
        return f"[{self.a:.4g}, {self.b:.4g}]"


def _as_group(item: Any, index: int) -> ScaleGroup:
    if isinstance(item, ScaleGroup):
        return item
    if isinstance(item, Mapping) and "a" in item and "b" in item:
        return ScaleGroup(item["a"], item["b"])
    if isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) == 2:
        return ScaleGroup(item[0], item[1])
    raise ValueError(
        f"groups[{index}] must be a ScaleGroup or an (a, b) pair, got {type(item).__name__}"
    )


def _validate_groups(groups: Iterable[Any]) -> tuple[ScaleGroup, ...]:
    """Groups as a tuple, sorted descending with strict gaps, or ValueError naming the problem."""
    if isinstance(groups, ScaleGroup):
        raise ValueError("groups must be a list of ScaleGroup, got a single ScaleGroup (wrap it in a list)")
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Iterable):
        raise ValueError(f"groups must be a list of ScaleGroup, got {type(groups).__name__}")
    out = tuple(_as_group(g, i) for i, g in enumerate(groups))
    if not out:
        raise ValueError("groups is empty: give at least one ScaleGroup")
    for k in range(len(out) - 1):
        hi, lo = out[k], out[k + 1]
        if lo.center > hi.center:
            raise ValueError(
                f"groups must be sorted descending (largest eigenvalues first): groups[{k + 1}]={lo} "
                f"lies above groups[{k}]={hi}"
            )
        if lo.b >= hi.a:
            raise ValueError(
                f"groups[{k}]={hi} and groups[{k + 1}]={lo} overlap or touch: need b_{k + 1} < a_{k}, got "
                f"{lo.b} >= {hi.a}; merge them into one group"
            )
    return out


def _check_tol(tol: Any, name: str = "tol") -> float:
    try:
        value = float(tol)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1), got {type(tol).__name__}") from None
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise ValueError(f"{name} must be in (0, 1) (a relative error), got {value}")
    return value


def groups_from_scales(
    num_scales: int,
    ratio: float,
    width: float = 1.0,
    top: float = 1.0,
    *,
    ratio_is: str = "hessian",
) -> list[ScaleGroup]:
    """Synthetic eigenvalue groups for ``num_scales`` well-separated scales.

    Args:
        num_scales: number of groups, ``m + 1`` in the paper's notation (two scales is ``m = 1``).
        ratio: ratio between successive scales, in (0, 1).  What it measures is set by ``ratio_is``.
        width: relative width of every group, ``(b_k - a_k) / center_k``, in (0, 2).  The default 1.0 gives
            a within-group condition number of 3 (a Marchenko-Pastur bulk for ~15 samples per dimension).
        top: center of the largest group (Hessian scale).
        ratio_is: ``"hessian"`` -- ``ratio`` is the ratio between successive *eigenvalue* groups, so group
            ``k`` is centered at ``top * ratio**k``; ``"data"`` -- ``ratio`` is the ratio between successive
            *data* scales ``e_{k+1}/e_k`` (DESIGN 1.1), and since least-squares Hessians scale as ``e**2`` the
            eigenvalue ratio is ``ratio**2``.

    Returns:
        ``num_scales`` groups, sorted descending, each ``[c_k (1 - width/2), c_k (1 + width/2)]``.

    Raises:
        ValueError: naming the bad argument, or if ``width`` is too large for ``ratio`` (groups would touch).
    """
    if isinstance(num_scales, bool) or not isinstance(num_scales, (int, np.integer)) or num_scales < 1:
        raise ValueError(f"num_scales must be an integer >= 1 (the number of groups), got {num_scales!r}")
    if ratio_is not in ("hessian", "data"):
        raise ValueError(f"ratio_is must be 'hessian' or 'data', got {ratio_is!r}")
    ratio = float(ratio)
    if not (math.isfinite(ratio) and 0.0 < ratio < 1.0):
        raise ValueError(f"ratio must be in (0, 1) (successive scales shrink), got {ratio}")
    width = float(width)
    if not (math.isfinite(width) and 0.0 < width < 2.0):
        raise ValueError(f"width (relative group width) must be in (0, 2), got {width}")
    top = float(top)
    if not (math.isfinite(top) and top > 0.0):
        raise ValueError(f"top must be a finite number > 0, got {top}")
    hessian_ratio = ratio**2 if ratio_is == "data" else ratio
    if num_scales > 1 and hessian_ratio * (1.0 + width / 2) >= 1.0 - width / 2:
        raise ValueError(
            f"width={width} is too wide for a Hessian ratio of {hessian_ratio:g}: adjacent groups would "
            f"overlap (need ratio * (1 + width/2) < 1 - width/2)"
        )
    groups = []
    for k in range(int(num_scales)):
        c = top * hessian_ratio**k
        groups.append(ScaleGroup(c * (1.0 - width / 2), c * (1.0 + width / 2)))
    return groups


# --------------------------------------------------------------------------------------------------------
# Numerics: grids, log|P|, Chebyshev nodes, step ordering
# --------------------------------------------------------------------------------------------------------


def _interval_grid(g: ScaleGroup, n_cos: int, n_log: int) -> np.ndarray:
    if g.b == g.a:
        return np.array([g.a])
    theta = np.linspace(0.0, np.pi, n_cos)
    cos_pts = g.center - 0.5 * g.width * np.cos(theta)
    log_pts = np.geomspace(g.a, g.b, n_log)
    pts = np.clip(np.concatenate(([g.a, g.b], cos_pts, log_pts)), g.a, g.b)
    return np.unique(pts)


@dataclass(frozen=True)
class _Grid:
    """Evaluation points over the spectrum, with the merged-group index of every point."""

    points: np.ndarray
    owner: np.ndarray  # merged group index per point
    n_groups: int

    @staticmethod
    def build(spectrum: Sequence[ScaleGroup], members: Sequence[Sequence[int]], fine: bool) -> _Grid:
        n_cos, n_log = (_FINE_COS, _FINE_LOG) if fine else (_COARSE_COS, _COARSE_LOG)
        pts, own = [], []
        for k, idx in enumerate(members):
            for i in idx:
                p = _interval_grid(spectrum[i], n_cos, n_log)
                pts.append(p)
                own.append(np.full(p.shape, k, dtype=np.int64))
        return _Grid(np.concatenate(pts), np.concatenate(own), len(members))


def _log_abs_factor(rate: float, lam: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(np.abs(1.0 - rate * lam))


def _log_abs_poly(rates: Iterable[float], lam: np.ndarray, counts: Iterable[int] | None = None) -> np.ndarray:
    """sum_i c_i log|1 - r_i lam|: log of |prod (1 - r_i lam)^c_i|, -inf at exact roots."""
    out = np.zeros_like(lam, dtype=np.float64)
    counts = itertools.repeat(1) if counts is None else counts
    for r, c in zip(rates, counts):
        out += c * _log_abs_factor(r, lam)
    return out


def _log_abs_chebyshev_T(d: int, mu: np.ndarray) -> np.ndarray:
    """log|T_d(mu)| without overflow (cosh form outside [-1, 1])."""
    mu = np.asarray(mu, dtype=np.float64)
    out = np.empty_like(mu)
    inside = np.abs(mu) <= 1.0
    with np.errstate(divide="ignore"):
        out[inside] = np.log(np.abs(np.cos(d * np.arccos(mu[inside]))))
    t = np.arccosh(np.abs(mu[~inside]))
    out[~inside] = d * t + np.log1p(np.exp(-2.0 * d * t)) - math.log(2.0)
    return out


def _chebyshev_log_poly(d: int, g: ScaleGroup, lam: np.ndarray) -> np.ndarray:
    """Closed form of sum_i log|1 - lam/x_i| over the d Chebyshev nodes x_i of g.

    prod_i (1 - lam/x_i) = T_d(mu(lam)) / T_d(mu(0)) with mu(lam) = (a + b - 2 lam)/(b - a).  Used only to rank
    candidates in the search; every reported number sums the actual rates.
    """
    mu = (g.a + g.b - 2.0 * lam) / (g.b - g.a)
    mu0 = np.array([(g.a + g.b) / (g.b - g.a)])
    return _log_abs_chebyshev_T(d, mu) - _log_abs_chebyshev_T(d, mu0)[0]


def _chebyshev_rates(g: ScaleGroup, d: int) -> np.ndarray:
    """Reciprocals of the d Chebyshev nodes of g, nodes ascending (rates descending); their polynomial is
    T_d(mu)/T_d(mu(0))."""
    if g.b == g.a:
        return np.full(d, 1.0 / g.a)
    i = np.arange(d)
    nodes = g.center - 0.5 * g.width * np.cos((2 * i + 1) * np.pi / (2 * d))
    return 1.0 / nodes


# NOTE: [stable order] A Chebyshev cycle's polynomial does not depend on the order of its steps, but floating
# point does.  Two things can grow inside a cycle: the error itself (prefix products: `peak_amplification`)
# and anything injected at one step -- a rounding error, gradient noise -- which is multiplied by the product
# of the steps that follow (any contiguous run of steps: `perturbation_amplification`).  Ordering greedily
# for small prefixes alone is a trap: prefixes stay <= 1 while runs starting mid-cycle reach 1e100 and the
# float64 iteration stalls far above the predicted accuracy.  The fractal order of Agarwal, Goel & Zhang
# ("Acceleration via fractal learning rate schedules", 2021; Lebedev & Finogenov's ordering in numerical
# analysis) keeps both near the unavoidable single-step factor ~kappa.  It is defined by doubling,
# sigma_{2n} = interleave(sigma_n, 2n - 1 - sigma_n): the pair (i, 2n-1-i) holds two nodes symmetric about the
# center, and the product of their factors is one factor of a degree-n Chebyshev polynomial in T_2(mu), so
# the doubling recursion is itself a stable order of that polynomial.  It therefore works from any stable
# base order of odd degree q; we allow q <= 13 (base orders by Leja and zig-zag rules, the best one measured
# per level), i.e. degrees q * 2**p.  Allowed degrees are at most ~14% apart, which the degree search
# accounts for.
_MAX_ODD_BASE = 13


def _odd_part(d: int) -> int:
    while d % 2 == 0:
        d //= 2
    return d


def _allowed_degree(d: int) -> bool:
    """Degrees with a stable fractal order: odd part <= 13."""
    return d >= 1 and _odd_part(d) <= _MAX_ODD_BASE


def _base_orders(q: int) -> list[np.ndarray]:
    """Candidate orders of the q (odd) Chebyshev nodes indexed 0..q-1 by ascending node value."""
    if q == 1:
        return [np.array([0])]
    zig, zag = [], []
    lo, hi = 0, q - 1
    while lo <= hi:
        zig += [lo] if lo == hi else [lo, hi]
        zag += [hi] if lo == hi else [hi, lo]
        lo, hi = lo + 1, hi - 1
    # Leja order of the nodes on [-1, 1]: each next node maximises the product of distances to those taken.
    x = -np.cos((2 * np.arange(q) + 1) * np.pi / (2 * q))
    leja = [int(np.argmax(np.abs(x)))]
    logd = np.log(np.abs(x - x[leja[0]]) + 1e-300)
    while len(leja) < q:
        rest = [i for i in range(q) if i not in leja]
        j = max(rest, key=lambda i: logd[i])
        leja.append(j)
        logd = logd + np.log(np.abs(x - x[j]) + 1e-300)
    return [np.array(leja), np.array(zig), np.array(zag)]


def _fractal_orders(d: int) -> list[np.ndarray]:
    """Candidate stable orders for d = q * 2**p Chebyshev nodes (indices by ascending node value)."""
    q, p = _odd_part(d), 0
    while q * 2**p != d:
        p += 1
    out = []
    for perm in _base_orders(q):
        for _ in range(p):
            n = len(perm)
            perm = np.stack([perm, 2 * n - 1 - perm], axis=1).reshape(-1)
        out.append(perm)
    return out


@dataclass
class _Runs:
    """Pointwise (over a grid) log-products of a sequence of steps, closed under concatenation.

    total: whole sequence; prefix / suffix: best (largest) prefix / suffix including the empty one (>= 0);
    run: best contiguous run including the empty one (>= 0).  This is the max-subarray monoid in log space.
    """

    total: np.ndarray
    prefix: np.ndarray
    suffix: np.ndarray
    run: np.ndarray

    @staticmethod
    def empty(n: int) -> _Runs:
        z = np.zeros(n)
        return _Runs(z, z, z, z)

    @staticmethod
    def step(log_factor: np.ndarray) -> _Runs:
        pos = np.maximum(0.0, log_factor)
        return _Runs(log_factor, pos, pos, pos)

    def then(self, other: _Runs) -> _Runs:
        return _Runs(
            self.total + other.total,
            np.maximum(self.prefix, self.total + other.prefix),
            np.maximum(other.suffix, self.suffix + other.total),
            np.maximum(np.maximum(self.run, other.run), self.suffix + other.prefix),
        )

    def repeat(self, n: int) -> _Runs:
        if n == 1:
            return self
        # total <= 0 on the support, so the growth terms are usually 0; -inf (an exact root) stays -inf.
        grow = np.maximum(0.0, (n - 1) * self.total)
        inner = self.suffix + self.prefix
        if n > 2:
            inner = inner + np.maximum(0.0, (n - 2) * self.total)
        return _Runs(n * self.total, self.prefix + grow, self.suffix + grow, np.maximum(self.run, inner))


def _level_runs(block: _Runs | None, log_factors: Sequence[np.ndarray], npts: int) -> _Runs:
    acc = _Runs.empty(npts)
    for f in log_factors:
        if block is not None:
            acc = acc.then(block)
        acc = acc.then(_Runs.step(f))
    return acc


def _least_count(log_p: np.ndarray, s: np.ndarray, reps_per_count: int, log_target: float) -> int | None:
    """Least n >= 1 with reps_per_count * n * log_p + s <= log_target at every point, or None if none exists.

    log_p is log|P_{C_{k-1}}| on the finer groups (negative there: C_{k-1} contracts them), s the large
    steps' log-factor on the same points.
    """
    if log_p.size == 0:
        return 1
    excess = s - log_target
    need = excess > 0
    if not np.any(need):
        return 1
    lp = log_p[need]
    if np.any(lp >= 0.0):
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        req = excess[need] / (-reps_per_count * lp)
    req = req[np.isfinite(req)]
    if req.size == 0:
        return 1
    n = max(1, math.ceil(float(req.max()) * (1.0 - 1e-12)))
    # Guard against a ceil landing one short by rounding: verify and bump (a few times at most).
    for _ in range(8):
        if np.max(reps_per_count * n * log_p + s) <= log_target + 1e-12 * abs(log_target):
            return n
        n += 1
    return None


def _cycles_needed(log_rho: float, tol: float) -> int:
    if log_rho == -math.inf:
        return 1
    if log_rho >= 0.0:
        raise ValueError("the cycle does not contract every group (contraction >= 1)")
    # A hair below exact integers so ln(tol)/ln(rho) = 3.0000000001 from rounding does not cost a cycle.
    return max(1, math.ceil(math.log(tol) / log_rho * (1.0 - 1e-12)))


# --------------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MultiratePlan:
    """A cycle of learning rates for gradient descent on a spectrum made of eigenvalue groups.

    Build it with :func:`plan_multirate` (or :meth:`from_dict`); the fields are consistent only as produced
    there.  ``cycle`` is what an optimizer walks, one rate per step, in order, repeating.

    Attributes:
        groups: the groups the cycle is designed on, after merging, sorted descending.
        spectrum: the groups as given (where eigenvalues lie); sups are taken over these intervals, so a
            merged group is not charged for the empty gap inside it.
        members: for each entry of ``groups``, the indices into ``spectrum`` merged into it.
        strategy: ``"nested"``, ``"chebyshev-nested"`` or ``"chebyshev"`` (never ``"auto"``: auto resolves).
        rate_rule: ``"optimal"`` (``2/(a+b)``) or ``"safe"`` (``1/b``) -- the single-rate rule of ``rates``.
        degrees: large steps per level (1 for nested; Chebyshev degree otherwise).
        counts: ``counts[k-1]`` = how many copies of the level-(k-1) cycle precede each large step of level k
            (``n_{k-1}`` in DESIGN 1.3); length ``len(groups) - 1``.
        level_rates: the distinct rates of each level in the order they appear in the cycle.
        cycle: the full cycle of learning rates, in order.
        contraction_per_group: sup of ``|P_cycle|`` over each group's support.
        peak_amplification: max over every prefix of the cycle and over every group of the sup of the
            partial product ``|prod (1 - eta_i lam)|`` -- how much any error component can grow inside a cycle
            (>= 1 because the empty prefix counts).
        perturbation_amplification: max over every contiguous run of steps (also across the boundary of two
            cycles) of the sup of its product: how much a perturbation injected at one step -- rounding
            error, gradient noise -- can grow before the cycle damps it.  At least the largest single-step
            factor ``max |1 - eta lam|`` (~ lambda_max / lambda_min for multirate plans: large steps are the
            point); a badly ordered Chebyshev cycle exceeds that by many orders of magnitude.
        tol: the relative error the plan was optimised for.
        order: how the steps are ordered (warm-up).
    """

    groups: tuple[ScaleGroup, ...]
    spectrum: tuple[ScaleGroup, ...]
    members: tuple[tuple[int, ...], ...]
    strategy: str
    rate_rule: str
    degrees: tuple[int, ...]
    counts: tuple[int, ...]
    level_rates: tuple[tuple[float, ...], ...]
    cycle: tuple[float, ...]
    contraction_per_group: tuple[float, ...]
    peak_amplification: float
    perturbation_amplification: float
    tol: float
    order: str = _WARMUP_ORDER
    _distinct: tuple[tuple[float, ...], tuple[int, ...]] = field(default=((), ()), repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self._distinct[0]:
            rates, counts = np.unique(np.asarray(self.cycle, dtype=np.float64), return_counts=True)
            object.__setattr__(
                self, "_distinct", (tuple(float(r) for r in rates), tuple(int(c) for c in counts))
            )

    # -- derived quantities -------------------------------------------------------------------------------
    @property
    def rates(self) -> tuple[float, ...]:
        """One nominal rate per group by ``rate_rule``: ``2/(a_k+b_k)`` (optimal) or ``1/b_k`` (safe).

        For ``"nested"`` these are exactly the rates in the cycle; the Chebyshev strategies use
        ``level_rates`` (Chebyshev nodes of each group), whose degree-1 case is ``2/(a+b)``.
        """
        return self.subspace_rates()

    @property
    def cycle_length(self) -> int:
        return len(self.cycle)

    @property
    def contraction(self) -> float:
        """rho: sup of ``|P_cycle|`` over all groups -- the worst-case error reduction per cycle."""
        return max(self.contraction_per_group)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def cycles_needed(self, tol: float | None = None) -> int:
        """Whole cycles to reduce every error component by ``tol``: ``ceil(ln(tol)/ln(rho))``."""
        tol = self.tol if tol is None else _check_tol(tol)
        rho = self.contraction
        return _cycles_needed(-math.inf if rho == 0.0 else math.log(rho), tol)

    def predicted_iterations(self, tol: float | None = None) -> int:
        """``cycle_length * ceil(ln(tol)/ln(rho))`` -- iterations after which the relative error
        ``||x_k - x*|| / ||x_0 - x*||`` is at most ``tol`` from every start (quadratic, eigenvalues in the
        groups).  Defaults to the plan's own ``tol``."""
        return self.cycle_length * self.cycles_needed(tol)

    def log_cycle_polynomial(self, lam: Any) -> np.ndarray:
        """``log|P_cycle(lam)|`` (float64, -inf at roots), summed factor by factor so it never overflows."""
        lam = np.asarray(lam, dtype=np.float64)
        rates, counts = self._distinct
        return _log_abs_poly(rates, lam, counts)

    def cycle_polynomial(self, lam: Any) -> np.ndarray:
        """``|P_cycle(lam)| = |prod_i (1 - eta_i lam)|`` on an array, computed as ``exp(sum log)``.

        Overflows to ``inf`` only where the true value exceeds the float64 range (far outside the groups).
        """
        with np.errstate(over="ignore"):
            return np.exp(self.log_cycle_polynomial(lam))

    def subspace_rates(self) -> tuple[float, ...]:
        """Per-group rates for the spatial (subspace) form, DESIGN 1.4: ``2/(a_k+b_k)`` or ``1/b_k``.

        In the subspace form every group takes its own rate at every step, so there is no cycle; group k
        contracts by ``(kappa_k-1)/(kappa_k+1)`` (optimal) or ``1 - 1/kappa_k`` (safe) per step.
        """
        if self.rate_rule == "safe":
            return tuple(1.0 / g.b for g in self.groups)
        return tuple(2.0 / (g.a + g.b) for g in self.groups)

    # -- serialisation --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description; :meth:`from_dict` rebuilds the identical plan from it."""
        return {
            "format": _PLAN_FORMAT,
            "strategy": self.strategy,
            "rate_rule": self.rate_rule,
            "tol": self.tol,
            "groups": [[g.a, g.b] for g in self.groups],
            "spectrum": [[g.a, g.b] for g in self.spectrum],
            "members": [list(m) for m in self.members],
            "degrees": list(self.degrees),
            "counts": list(self.counts),
            "order": self.order,
            "cycle_length": self.cycle_length,
            "contraction": self.contraction,
            "contraction_per_group": list(self.contraction_per_group),
            "predicted_iterations": self.predicted_iterations(),
            "peak_amplification": self.peak_amplification,
            "perturbation_amplification": self.perturbation_amplification,
            "cycle": list(self.cycle),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MultiratePlan:
        """Rebuild a plan from :meth:`to_dict` output (the cycle is recomputed and checked if present)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"from_dict needs a mapping, got {type(data).__name__}")
        fmt = data.get("format", _PLAN_FORMAT)
        if fmt != _PLAN_FORMAT:
            raise ValueError(f"unknown plan format {fmt!r}, expected {_PLAN_FORMAT!r}")
        for key in ("strategy", "rate_rule", "tol", "spectrum", "members", "degrees", "counts"):
            if key not in data:
                raise ValueError(f"plan dict is missing {key!r}")
        strategy = data["strategy"]
        if strategy not in ("nested", "chebyshev-nested", "chebyshev"):
            raise ValueError(f"plan dict has unknown strategy {strategy!r}")
        rate_rule = data["rate_rule"]
        if rate_rule not in RATE_RULES:
            raise ValueError(f"plan dict has unknown rate_rule {rate_rule!r}")
        spectrum = _validate_groups(data["spectrum"])
        members = tuple(tuple(int(i) for i in m) for m in data["members"])
        if any(not m for m in members) or [i for m in members for i in m] != list(range(len(spectrum))):
            raise ValueError("plan dict 'members' must partition the spectrum into consecutive runs")
        degrees = tuple(int(d) for d in data["degrees"])
        counts = tuple(int(c) for c in data["counts"])
        if len(degrees) != len(members) or len(counts) != len(members) - 1:
            raise ValueError("plan dict: need one degree per group and one count per level above the first")
        if any(d < 1 for d in degrees) or any(c < 1 for c in counts):
            raise ValueError("plan dict: degrees and counts must be >= 1")
        if strategy == "nested" and any(d != 1 for d in degrees):
            raise ValueError("plan dict: a nested plan takes one large step per level (degrees all 1)")
        if strategy == "chebyshev" and len(members) != 1:
            raise ValueError("plan dict: a chebyshev plan is one cycle over all groups (members must be one run)")
        plan = _assemble(spectrum, members, strategy, rate_rule, degrees, counts, _check_tol(data["tol"]))
        if "cycle" in data and tuple(float(x) for x in data["cycle"]) != plan.cycle:
            raise ValueError("plan dict 'cycle' does not match the cycle rebuilt from its structure")
        return plan

    # -- display ---------------------------------------------------------------------------------------------
    def __str__(self) -> str:
        lines = [
            f"MultiratePlan  strategy={self.strategy}  rate_rule={self.rate_rule}  groups={self.num_groups}",
            f"  order: {self.order}",
            f"  {'group':>5}  {'interval [a, b]':<25} {'kappa':>9} {'degree':>6} {'reps':>6}  "
            f"{'rates (min..max)':<23} {'sup|P| on group':>15}",
        ]
        for k, g in enumerate(self.groups):
            rates = self.level_rates[k]
            rate_txt = f"{min(rates):.4g}" if len(rates) == 1 else f"{min(rates):.4g}..{max(rates):.4g}"
            reps = "-" if k == 0 else str(self.counts[k - 1])
            merged = "" if len(self.members[k]) == 1 else f"  (merged {list(self.members[k])})"
            lines.append(
                f"  {k:>5}  {'[%.4g, %.4g]' % (g.a, g.b):<25} {g.condition:>9.4g} {self.degrees[k]:>6} "
                f"{reps:>6}  {rate_txt:<23} {self.contraction_per_group[k]:>15.4g}{merged}"
            )
        lines += [
            f"  cycle length {self.cycle_length}, contraction per cycle rho = {self.contraction:.4g}",
            f"  predicted iterations to tol={self.tol:g}: {self.predicted_iterations()} "
            f"({self.cycles_needed()} cycles)",
            f"  peak amplification within a cycle: {self.peak_amplification:.4g}; "
            f"perturbation amplification (any run of steps): {self.perturbation_amplification:.4g}",
        ]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Assembly: structure (degrees, counts) -> cycle and verified numbers
# --------------------------------------------------------------------------------------------------------


def _hulls(spectrum: Sequence[ScaleGroup], members: Sequence[Sequence[int]]) -> tuple[ScaleGroup, ...]:
    return tuple(ScaleGroup(spectrum[m[-1]].a, spectrum[m[0]].b) for m in members)


def _level_rates_unordered(kind: str, rate_rule: str, g: ScaleGroup, d: int) -> np.ndarray:
    if kind == "nested":
        return np.array([1.0 / g.b if rate_rule == "safe" else 2.0 / (g.a + g.b)])
    return _chebyshev_rates(g, d)


def _fine_counts(
    spectrum: Sequence[ScaleGroup], members: Sequence[Sequence[int]], kind: str, rate_rule: str,
    degrees: Sequence[int], tol: float,
) -> tuple[int, ...] | None:
    """The count rule evaluated on the fine grid (the search used the coarse one)."""
    groups = _hulls(spectrum, members)
    grid = _Grid.build(spectrum, members, fine=True)
    lam, owner = grid.points, grid.owner
    counts: list[int] = []
    log_p = None
    for k, g in enumerate(groups):
        rates = _level_rates_unordered(kind, rate_rule, g, degrees[k])
        s = _log_abs_poly(rates, lam)
        if k == 0:
            log_p = s
            continue
        log_t = max(float(s[owner == k].max()), math.log(tol))
        fin = owner < k
        n = _least_count(log_p[fin], s[fin], len(rates), log_t)
        if n is None:
            return None
        counts.append(n)
        log_p = n * len(rates) * log_p + s
    return tuple(counts)


def _cycle_length(degrees: Sequence[int], counts: Sequence[int]) -> int:
    length = degrees[0]
    for d, n in zip(degrees[1:], counts):
        length = d * (n * length + 1)
    return length


def _assemble(
    spectrum: tuple[ScaleGroup, ...], members: tuple[tuple[int, ...], ...], strategy: str, rate_rule: str,
    degrees: tuple[int, ...], counts: tuple[int, ...], tol: float,
) -> MultiratePlan:
    """Build the ordered cycle for a given structure and evaluate everything on the fine grid."""
    kind = "nested" if strategy == "nested" else "chebyshev"
    groups = _hulls(spectrum, members)
    fine = _Grid.build(spectrum, members, fine=True)
    coarse = _Grid.build(spectrum, members, fine=False)
    lam, owner = fine.points, fine.owner

    # Order each Chebyshev level: among the candidate fractal orders take the one whose runs of steps grow
    # least (coarse grid, all groups; a unit of level k >= 1 is a block of inner cycles then a large step).
    ordered_levels: list[np.ndarray] = []
    block_c: _Runs | None = None
    npts_c = coarse.points.size
    for k, g in enumerate(groups):
        rates = _level_rates_unordered(kind, rate_rule, g, degrees[k])
        if len(rates) > 1 and g.b > g.a:
            if not _allowed_degree(len(rates)):
                raise ValueError(
                    f"Chebyshev degree {len(rates)} of level {k} has no stable order: use degrees q * 2**p with "
                    f"odd q <= {_MAX_ODD_BASE}"
                )
            factors = [_log_abs_factor(r, coarse.points) for r in rates]
            candidates = _fractal_orders(len(rates))
            best_perm, best_score = candidates[0], math.inf
            for perm in candidates:
                runs = _level_runs(block_c, [factors[i] for i in perm], npts_c)
                score = float(np.max(np.maximum(runs.run, runs.suffix + runs.prefix)))
                if score < best_score - 1e-12:
                    best_perm, best_score = perm, score
            rates = rates[best_perm]
        ordered_levels.append(rates)
        level = _level_runs(block_c, [_log_abs_factor(r, coarse.points) for r in rates], npts_c)
        block_c = level.repeat(counts[k]) if k < len(groups) - 1 else None

    # Cycle: C_0 = level-0 rates; C_k = [B, s_1, B, s_2, ...] with B = C_{k-1} * n_{k-1}.
    cycle: list[float] = [float(r) for r in ordered_levels[0]]
    for k in range(1, len(groups)):
        block = cycle * counts[k - 1]
        nxt: list[float] = []
        for s in ordered_levels[k]:
            nxt.extend(block)
            nxt.append(float(s))
        cycle = nxt

    # Everything reported: log|P| and the growth of prefixes and of runs, on the fine grid, from the actual
    # ordered rates, by the same recursion (no need to walk cycles of 1e5 steps point by point).
    block_f: _Runs | None = None
    runs = _Runs.empty(lam.size)
    for k, rates in enumerate(ordered_levels):
        runs = _level_runs(block_f, [_log_abs_factor(r, lam) for r in rates], lam.size)
        if k < len(groups) - 1:
            block_f = runs.repeat(counts[k])
    log_p = runs.total
    # A run may straddle the boundary between two cycles (suffix of one, prefix of the next); runs over
    # more cycles only add whole cycles, which contract.
    perturbation = np.maximum(runs.run, runs.suffix + runs.prefix)

    contraction = tuple(float(np.exp(log_p[owner == k].max())) for k in range(len(groups)))
    return MultiratePlan(
        groups=groups,
        spectrum=spectrum,
        members=members,
        strategy=strategy,
        rate_rule=rate_rule,
        degrees=tuple(int(d) for d in degrees),
        counts=tuple(int(c) for c in counts),
        level_rates=tuple(tuple(float(r) for r in rates) for rates in ordered_levels),
        cycle=tuple(cycle),
        contraction_per_group=contraction,
        peak_amplification=float(np.exp(runs.prefix.max())),
        perturbation_amplification=float(np.exp(perturbation.max())),
        tol=tol,
    )


# --------------------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    predicted: int
    cycle_length: int
    degrees: tuple[int, ...]
    counts: tuple[int, ...]

    @property
    def key(self) -> tuple[int, int]:
        return (self.predicted, self.cycle_length)


def _degree_candidates(g: ScaleGroup, log_damping: float, max_degree: int) -> list[int]:
    """Degrees worth trying for an inner level: every allowed degree up to 16, then about four per octave,
    up to the degree whose Chebyshev cycle alone damps by exp(log_damping) (never more is needed)."""
    if g.b == g.a:
        return [1]
    t = math.acosh((g.a + g.b) / (g.b - g.a))
    cap = min(max_degree, max(1, math.ceil((log_damping + math.log(2.0)) / t)))
    out: list[int] = []
    for d in range(1, cap + 1):
        if _allowed_degree(d) and (d <= 16 or d >= out[-1] * 1.19 or d == cap):
            out.append(d)
    if not _allowed_degree(cap) and (not out or out[-1] < cap):
        nxt = cap + 1
        while not _allowed_degree(nxt):
            nxt += 1
        if nxt <= max_degree:
            out.append(nxt)
    return out


def _top_degree_candidates(g: ScaleGroup, tol: float, max_degree: int, keep: int = 8) -> list[int]:
    """Allowed degrees for the outermost level ranked by the single-group cost d * ceil(ln tol / ln(1/T_d))."""
    if g.b == g.a:
        return [1]
    t = math.acosh((g.a + g.b) / (g.b - g.a))
    d_one = max(1, math.ceil((math.log(1.0 / tol) + math.log(2.0)) / t))
    while not _allowed_degree(d_one):
        d_one += 1
    ds = np.array([d for d in range(1, min(max_degree, d_one) + 1) if _allowed_degree(d)], dtype=np.float64)
    log_t = ds * t + np.log1p(np.exp(-2.0 * ds * t)) - math.log(2.0)  # log T_d(mu0), mu0 > 1
    cost = ds * np.ceil(math.log(1.0 / tol) / log_t * (1.0 - 1e-12))
    order = np.lexsort((ds, cost))
    return [int(ds[i]) for i in order[:keep]]


def _least_counts(log_p: np.ndarray, s: np.ndarray, reps: np.ndarray, log_t: np.ndarray) -> np.ndarray:
    """Vectorised :func:`_least_count` over candidate degrees (rows of s); 0 marks "no count works"."""
    ncand = s.shape[0]
    if log_p.size == 0:
        return np.ones(ncand, dtype=np.int64)
    excess = s - log_t[:, None]  # [ncand, npts]
    with np.errstate(divide="ignore", invalid="ignore"):
        req = np.where(excess > 0, excess / (-reps[:, None] * log_p[None, :]), 0.0)
    req = np.where(np.isnan(req), 0.0, req)
    bad = np.any((excess > 0) & (log_p[None, :] >= 0.0), axis=1) | np.any(np.isinf(req) & (req > 0), axis=1)
    with np.errstate(invalid="ignore"):
        n = np.maximum(1, np.ceil(req.max(axis=1) * (1.0 - 1e-12))).astype(np.int64)
    n[bad] = 0
    return n


def _search(
    spectrum: tuple[ScaleGroup, ...], members: tuple[tuple[int, ...], ...], kind: str, rate_rule: str,
    tol: float, max_degree: int, max_cycle_length: int,
) -> _Candidate | None:
    """Best (degrees, counts) for one merge pattern, ranked on the coarse grid. None if nothing fits.

    NOTE: [degree search] Up to three levels the search is exhaustive over the candidate degrees (the last
    level vectorised); deeper nests use coordinate descent from a few starts, which keeps planning well
    under a second for any number of groups.  Every candidate is scored by its predicted iterations, so the
    search can only pick among plans whose cost it has actually computed.
    """
    groups = _hulls(spectrum, members)
    m = len(groups) - 1
    grid = _Grid.build(spectrum, members, fine=False)
    lam, owner = grid.points, grid.owner
    in_group = [owner == k for k in range(m + 1)]
    finer = [owner < k for k in range(m + 1)]
    log_tol = math.log(tol)
    log_spread = math.log(4.0 * groups[0].b / groups[-1].a) + math.log(1.0 / tol)

    if kind == "nested":
        cands = [[1] for _ in groups]
    else:
        cands = [_degree_candidates(g, log_spread, max_degree) for g in groups[:-1]]
        cands.append(_top_degree_candidates(groups[-1], tol, max_degree))

    # Large-step log-factors of every (level, candidate degree) on the grid: rows of S[k].
    S: list[np.ndarray] = []
    for k, g in enumerate(groups):
        rows = []
        for d in cands[k]:
            if kind == "nested" or g.b == g.a:
                rows.append(_log_abs_poly(_level_rates_unordered(kind, rate_rule, g, d), lam))
            else:
                rows.append(_chebyshev_log_poly(d, g, lam))
        S.append(np.stack(rows))
    T = [np.maximum(Sk[:, in_group[k]].max(axis=1), log_tol) for k, Sk in enumerate(S)]
    D = [np.asarray(c, dtype=np.int64) for c in cands]

    def extend(k: int, log_p: np.ndarray | None, length: int, idx: np.ndarray):
        """Level k for candidate rows idx, given C_{k-1}: (counts, new log_p rows, lengths), bad rows dropped."""
        d = D[k][idx]
        if k == 0:
            return np.zeros(idx.size, dtype=np.int64), S[0][idx], d.copy(), idx
        n = _least_counts(log_p[finer[k]], S[k][idx][:, finer[k]], d, T[k][idx])
        ok = n > 0
        new_len = d * (n * length + 1)
        ok &= new_len <= max_cycle_length
        idx, n, d, new_len = idx[ok], n[ok], d[ok], new_len[ok]
        new_p = (n * d)[:, None] * log_p[None, :] + S[k][idx]
        return n, new_p, new_len, idx

    def score_top(new_p: np.ndarray, new_len: np.ndarray) -> np.ndarray:
        log_rho = new_p.max(axis=1)
        with np.errstate(divide="ignore"):
            cyc = np.where(
                log_rho < 0, np.maximum(1, np.ceil(log_tol / np.where(log_rho < 0, log_rho, -1.0) * (1 - 1e-12))), 0
            )
        cyc = np.where(np.isneginf(log_rho), 1, cyc)
        return np.where(cyc > 0, new_len * cyc, np.iinfo(np.int64).max).astype(np.int64)

    def evaluate(choice: Sequence[int]) -> _Candidate | None:
        log_p, length, counts = None, 0, []
        for k, i in enumerate(choice):
            n, new_p, new_len, idx = extend(k, log_p, length, np.array([i]))
            if idx.size == 0:
                return None
            if k > 0:
                counts.append(int(n[0]))
            log_p, length = new_p[0], int(new_len[0])
        pred = int(score_top(log_p[None, :], np.array([length]))[0])
        if pred == np.iinfo(np.int64).max:
            return None
        return _Candidate(pred, length, tuple(int(D[k][i]) for k, i in enumerate(choice)), tuple(counts))

    best: list[_Candidate | None] = [None]

    def consider(c: _Candidate | None) -> None:
        if c is not None and (best[0] is None or c.key < best[0].key):
            best[0] = c

    if m <= 2:
        def rec(k: int, log_p, length: int, choice: tuple[int, ...], cnts: tuple[int, ...]) -> None:
            idx = np.arange(len(cands[k]))
            n, new_p, new_len, idx = extend(k, log_p, length, idx)
            if k == m:
                if idx.size == 0:
                    return
                pred = score_top(new_p, new_len)
                j = int(np.lexsort((new_len, pred))[0])
                if pred[j] == np.iinfo(np.int64).max:
                    return
                rows = choice + (int(idx[j]),)
                degrees = tuple(int(D[i][x]) for i, x in enumerate(rows))
                consider(_Candidate(int(pred[j]), int(new_len[j]), degrees, cnts + ((int(n[j]),) if k > 0 else ())))
                return
            for r in range(idx.size):
                if best[0] is not None and new_len[r] >= best[0].predicted:
                    continue
                rec(k + 1, new_p[r], int(new_len[r]), choice + (int(idx[r]),), cnts + ((int(n[r]),) if k > 0 else ()))

        rec(0, None, 0, (), ())
        return best[0]

    # Coordinate descent for deep nests.
    def nearest(k: int, d: int) -> int:
        return int(np.argmin(np.abs(D[k] - d)))

    starts = [[nearest(k, d) for k in range(m)] + [0] for d in (1, 4, 8)]
    for start in starts:
        choice = list(start)
        cur = evaluate(choice)
        for _ in range(6):
            improved = False
            for k in range(m + 1):
                for i in range(len(cands[k])):
                    if i == choice[k]:
                        continue
                    trial = choice.copy()
                    trial[k] = i
                    c = evaluate(trial)
                    if c is not None and (cur is None or c.key < cur.key):
                        cur, choice, improved = c, trial, True
            if not improved:
                break
        consider(cur)
    return best[0]


def _merge_patterns(num: int) -> Iterable[tuple[tuple[int, ...], ...]]:
    """All partitions of range(num) into consecutive runs (2**(num-1) of them)."""
    for mask in range(2 ** (num - 1)):
        runs, cur = [], [0]
        for i in range(1, num):
            if mask >> (i - 1) & 1:
                cur.append(i)
            else:
                runs.append(tuple(cur))
                cur = [i]
        runs.append(tuple(cur))
        yield tuple(runs)


def _best_over_merges(
    spectrum: tuple[ScaleGroup, ...], kind: str, rate_rule: str, tol: float, max_degree: int,
    max_cycle_length: int, merge: bool,
) -> list[tuple[_Candidate, tuple[tuple[int, ...], ...]]]:
    """Best candidate per merge pattern (all patterns for few gaps, greedy pairwise merging otherwise)."""
    n = len(spectrum)
    unmerged = tuple((i,) for i in range(n))
    results = []
    if not merge or n == 1:
        patterns: Iterable[tuple[tuple[int, ...], ...]] = [unmerged]
    elif n - 1 <= _MAX_EXHAUSTIVE_GAPS:
        patterns = _merge_patterns(n)
    else:
        patterns = None  # greedy below
    if patterns is not None:
        for members in patterns:
            cand = _search(spectrum, members, kind, rate_rule, tol, max_degree, max_cycle_length)
            if cand is not None:
                results.append((cand, members))
        return results
    # Greedy: merge the adjacent pair that lowers predicted iterations most, until nothing improves.
    members = unmerged
    cur = _search(spectrum, members, kind, rate_rule, tol, max_degree, max_cycle_length)
    if cur is not None:
        results.append((cur, members))
    while len(members) > 1:
        trials = []
        for i in range(len(members) - 1):
            trial = members[:i] + (members[i] + members[i + 1],) + members[i + 2:]
            cand = _search(spectrum, trial, kind, rate_rule, tol, max_degree, max_cycle_length)
            if cand is not None:
                trials.append((cand, trial))
        if not trials:
            break
        cand, trial = min(trials, key=lambda ct: ct[0].key)
        if cur is not None and cand.predicted >= cur.predicted:
            break
        results.append((cand, trial))
        cur, members = cand, trial
    return results


def plan_multirate(
    groups: Sequence[ScaleGroup] | Iterable[Any],
    tol: float = 1e-6,
    strategy: str = "auto",
    rate_rule: str = "optimal",
    merge: bool = True,
    *,
    max_degree: int = 512,
    max_cycle_length: int = 1_000_000,
) -> MultiratePlan:
    """Plan a cycle of learning rates for eigenvalue groups (Hessian scale), DESIGN 1.3.

    Args:
        groups: eigenvalue intervals sorted descending (``groups[0].b = lambda_max``) with gaps
            ``b_{k+1} < a_k``; ``ScaleGroup`` or ``(a, b)`` pairs.
        tol: relative error the plan is optimised for (predicted iterations are reported for it), in (0, 1).
        strategy: ``"nested"`` (paper Algorithm 1, reference form), ``"chebyshev-nested"``, ``"chebyshev"``
            (one Chebyshev cycle on ``[lambda_min, lambda_max]``) or ``"auto"`` (least predicted iterations).
        rate_rule: ``"optimal"`` -- ``eta_k = 2/(a_k+b_k)``; ``"safe"`` -- ``eta_k = 1/b_k``, every step
            non-expansive on its own group, robust to a ``b_k`` underestimated by up to 2x.  ``"safe"`` is a
            single-rate rule: it applies to ``"nested"`` (and ``"auto"`` then only considers nested plans);
            combining it with a Chebyshev strategy is an error.
        merge: let adjacent groups be merged when the gap between them is too small to pay for a separate
            level (decided by predicted iterations over all merge patterns; greedily beyond 6 groups).
        max_degree: largest Chebyshev degree per level.  Chebyshev degrees are of the form ``q * 2**p`` with odd
            ``q <= 13`` (the ones with a stable step order).
        max_cycle_length: plans with longer cycles are not considered.

    Returns:
        The :class:`MultiratePlan` with the fewest predicted iterations to ``tol`` among those considered
        (ties: smaller perturbation amplification, then shorter cycle).

    Raises:
        ValueError: naming the problem -- empty, unsorted or overlapping groups, a bad group end, ``tol``
            outside (0, 1), unknown ``strategy`` or ``rate_rule``, or no plan within the limits.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if rate_rule not in RATE_RULES:
        raise ValueError(f"unknown rate_rule {rate_rule!r}; choose one of {', '.join(RATE_RULES)}")
    spectrum = _validate_groups(groups)
    tol = _check_tol(tol)
    if rate_rule == "safe" and strategy in ("chebyshev", "chebyshev-nested"):
        raise ValueError(
            f"rate_rule='safe' is a single-rate rule (eta_k = 1/b_k) and applies to strategy='nested' only, "
            f"not to strategy={strategy!r}"
        )
    if isinstance(max_degree, bool) or not isinstance(max_degree, (int, np.integer)) or max_degree < 1:
        raise ValueError(f"max_degree must be an integer >= 1, got {max_degree!r}")
    if (
        isinstance(max_cycle_length, bool)
        or not isinstance(max_cycle_length, (int, np.integer))
        or max_cycle_length < 1
    ):
        raise ValueError(f"max_cycle_length must be an integer >= 1, got {max_cycle_length!r}")
    if not isinstance(merge, (bool, np.bool_)):
        raise ValueError(f"merge must be True or False, got {merge!r}")

    n = len(spectrum)
    all_merged = (tuple(range(n)),)
    options: list[tuple[str, _Candidate, tuple[tuple[int, ...], ...]]] = []

    def add(label: str, found: list[tuple[_Candidate, tuple[tuple[int, ...], ...]]]) -> None:
        for cand, members in found:
            # Under "auto", a Chebyshev-nested plan over one merged group *is* the plain Chebyshev cycle.
            lab = "chebyshev" if (strategy == "auto" and label != "nested" and members == all_merged) else label
            options.append((lab, cand, members))

    if strategy in ("nested", "auto"):
        add("nested", _best_over_merges(spectrum, "nested", rate_rule, tol, max_degree, max_cycle_length, merge))
    if strategy == "chebyshev-nested" or (strategy == "auto" and rate_rule == "optimal"):
        add(
            "chebyshev-nested",
            _best_over_merges(spectrum, "chebyshev", rate_rule, tol, max_degree, max_cycle_length, merge),
        )
    if strategy == "chebyshev" or (strategy == "auto" and rate_rule == "optimal" and not merge and n > 1):
        cand = _search(spectrum, all_merged, "chebyshev", rate_rule, tol, max_degree, max_cycle_length)
        if cand is not None:
            options.append(("chebyshev", cand, all_merged))
    if not options:
        raise ValueError(
            f"no {strategy} plan with cycle length <= {max_cycle_length} and degree <= {max_degree} "
            f"contracts every group; raise the limits or merge groups"
        )

    # Re-evaluate the most promising few on the fine grid (counts may grow by one there) and pick the best.
    options.sort(key=lambda o: (o[1].predicted, o[1].cycle_length))
    finalists = options[:3]
    plans = []
    for label, cand, members in finalists:
        kind = "nested" if label == "nested" else "chebyshev"
        counts = _fine_counts(spectrum, members, kind, rate_rule, cand.degrees, tol)
        if counts is None or _cycle_length(cand.degrees, counts) > max_cycle_length:
            continue
        plans.append(_assemble(spectrum, members, label, rate_rule, cand.degrees, counts, tol))
    if not plans:
        raise ValueError(f"no {strategy} plan contracts every group on the fine grid; merge groups")
    rank = {"nested": 0, "chebyshev-nested": 1, "chebyshev": 2}
    return min(
        plans,
        key=lambda p: (
            p.predicted_iterations(), p.perturbation_amplification, p.cycle_length, rank[p.strategy]
        ),
    )
