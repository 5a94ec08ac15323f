"""Numerics of cycle polynomials: evaluation grids, ``log|P|`` without overflow, Chebyshev nodes, the stable
(fractal) step orders, and the run/prefix growth of a sequence of steps."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from mrgd_ext.planning.groups import ScaleGroup

# Grid resolution. Fine grids decide every reported number; coarse grids only rank candidates in the search
# and order Chebyshev steps (the result is then re-evaluated on the fine grid).
# NOTE: [grid] Chebyshev oscillations of degree d are equally spaced in theta = arccos(mu); 2049 cosine-spaced
# points give about 4 points per half-oscillation up to degree 512, so an interior sup is underestimated by
# at most ~1 - cos(pi/8) ~ 8% (the sup of a Chebyshev cycle sits at the group ends, which are always in the
# grid); an 8% error in rho changes ln(tol)/ln(rho) by well under one cycle.
_FINE_COS, _FINE_LOG = 2049, 1025
_COARSE_COS, _COARSE_LOG = 161, 64



def interval_grid(g: ScaleGroup, n_cos: int, n_log: int) -> np.ndarray:
    if g.b == g.a:
        return np.array([g.a])
    theta = np.linspace(0.0, np.pi, n_cos)
    cos_pts = g.center - 0.5 * g.width * np.cos(theta)
    log_pts = np.geomspace(g.a, g.b, n_log)
    pts = np.clip(np.concatenate(([g.a, g.b], cos_pts, log_pts)), g.a, g.b)
    return np.unique(pts)


@dataclass(frozen=True)
class Grid:
    """Evaluation points over the spectrum, with the merged-group index of every point."""

    points: np.ndarray
    owner: np.ndarray  # merged group index per point
    n_groups: int

    @staticmethod
    def build(spectrum: Sequence[ScaleGroup], members: Sequence[Sequence[int]], fine: bool) -> Grid:
        n_cos, n_log = (_FINE_COS, _FINE_LOG) if fine else (_COARSE_COS, _COARSE_LOG)
        pts, own = [], []
        for k, idx in enumerate(members):
            for i in idx:
                p = interval_grid(spectrum[i], n_cos, n_log)
                pts.append(p)
                own.append(np.full(p.shape, k, dtype=np.int64))
        return Grid(np.concatenate(pts), np.concatenate(own), len(members))


def log_abs_factor(rate: float, lam: np.ndarray) -> np.ndarray:
    # In place on one buffer: 1 + lam * (-rate) is bit-for-bit 1 - rate * lam, without three temporaries.
    out: np.ndarray = np.multiply(lam, -rate)
    out += 1.0
    np.abs(out, out=out)
    with np.errstate(divide="ignore"):
        np.log(out, out=out)
    return out


def log_abs_poly(rates: Iterable[float], lam: np.ndarray, counts: Iterable[int] | None = None) -> np.ndarray:
    """sum_i c_i log|1 - r_i lam|: log of |prod (1 - r_i lam)^c_i|, -inf at exact roots."""
    out = np.zeros_like(lam, dtype=np.float64)
    if counts is None:  # every count 1: no multiplication pass (1 * x is x, bit for bit)
        for r in rates:
            out += log_abs_factor(r, lam)
        return out
    for r, c in zip(rates, counts):
        out += c * log_abs_factor(r, lam)
    return out


def log_abs_chebyshev_T(d: int, mu: np.ndarray) -> np.ndarray:
    """log|T_d(mu)| without overflow (cosh form outside [-1, 1])."""
    mu = np.asarray(mu, dtype=np.float64)
    out = np.empty_like(mu)
    inside = np.abs(mu) <= 1.0
    with np.errstate(divide="ignore"):
        out[inside] = np.log(np.abs(np.cos(d * np.arccos(mu[inside]))))
    t = np.arccosh(np.abs(mu[~inside]))
    out[~inside] = d * t + np.log1p(np.exp(-2.0 * d * t)) - math.log(2.0)
    return out


def chebyshev_log_poly(d: int, g: ScaleGroup, lam: np.ndarray) -> np.ndarray:
    """Closed form of sum_i log|1 - lam/x_i| over the d Chebyshev nodes x_i of g.

    prod_i (1 - lam/x_i) = T_d(mu(lam)) / T_d(mu(0)) with mu(lam) = (a + b - 2 lam)/(b - a).  Used only to rank
    candidates in the search and to count on the fine grid (:func:`~mrgd_ext.planning.search.fine_counts`);
    every number a plan reports sums the actual rates.
    """
    mu = (g.a + g.b - 2.0 * lam) / (g.b - g.a)
    mu0 = np.array([(g.a + g.b) / (g.b - g.a)])
    values: np.ndarray = log_abs_chebyshev_T(d, mu) - log_abs_chebyshev_T(d, mu0)[0]
    return values


def chebyshev_growth(g: ScaleGroup) -> float:
    """``acosh(mu(0))`` with ``mu(0) = (a + b) / (b - a)``: ``log T_d(mu(0)) ~ d * chebyshev_growth(g)``.

    Written as ``log1p(x + sqrt(x (x + 2)))`` with ``x = 2a / (b - a)`` so a wide group (``a << b``, where
    ``mu(0)`` rounds to 1) still gets its small positive growth rate instead of 0.
    """
    x = 2.0 * g.a / (g.b - g.a)
    return math.log1p(x + math.sqrt(x * (x + 2.0)))


def chebyshev_rates(g: ScaleGroup, d: int) -> np.ndarray:
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
MAX_ODD_BASE = 13


def _odd_part(d: int) -> int:
    while d % 2 == 0:
        d //= 2
    return d


def allowed_degree(d: int) -> bool:
    """Degrees with a stable fractal order: odd part <= 13."""
    return d >= 1 and _odd_part(d) <= MAX_ODD_BASE


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


def fractal_orders(d: int) -> list[np.ndarray]:
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
class Runs:
    """Pointwise (over a grid) log-products of a sequence of steps, closed under concatenation.

    total: whole sequence; prefix / suffix: best (largest) prefix / suffix including the empty one (>= 0);
    run: best contiguous run including the empty one (>= 0).  This is the max-subarray monoid in log space.
    """

    total: np.ndarray
    prefix: np.ndarray
    suffix: np.ndarray
    run: np.ndarray

    @staticmethod
    def empty(n: int) -> Runs:
        z = np.zeros(n)
        return Runs(z, z, z, z)

    @staticmethod
    def step(log_factor: np.ndarray) -> Runs:
        pos = np.maximum(0.0, log_factor)
        return Runs(log_factor, pos, pos, pos)

    def then(self, other: Runs) -> Runs:
        out = Runs(self.total.copy(), self.prefix.copy(), self.suffix.copy(), self.run.copy())
        out.absorb(other, np.empty_like(out.total))
        return out

    def absorb(self, other: Runs, tmp: np.ndarray, holds_other_run: bool = False) -> None:
        """``self`` becomes ``self.then(other)`` in place (``tmp``: scratch of the same shape).  Its four arrays
        must be its own (not shared with each other or ``other``, unlike :meth:`step`'s).  ``holds_other_run``:
        the caller knows ``self.run >= other.run`` already (``self`` absorbed ``other`` before: a run never
        shrinks), which saves one pass and changes no bit."""
        # Each field from the old values of the others: run, then prefix, then suffix, total last.
        np.add(self.suffix, other.prefix, out=tmp)
        if not holds_other_run:
            np.maximum(self.run, other.run, out=self.run)
        np.maximum(self.run, tmp, out=self.run)
        np.add(self.total, other.prefix, out=tmp)
        np.maximum(self.prefix, tmp, out=self.prefix)
        np.add(self.suffix, other.total, out=self.suffix)
        np.maximum(other.suffix, self.suffix, out=self.suffix)
        np.add(self.total, other.total, out=self.total)

    def absorb_step(self, log_factor: np.ndarray, tmp: np.ndarray, pos: np.ndarray) -> None:
        """``self.absorb(Runs.step(log_factor), tmp)`` in fewer passes (``pos``: scratch too): a step's prefix,
        suffix and run are all ``pos = max(0, f)``, and ``suffix + pos >= pos`` (suffix >= 0), so the run needs
        one maximum, not two.  Same results, bit for bit."""
        np.maximum(0.0, log_factor, out=pos)  # operand order as in step(): signed zeros alike
        np.add(self.suffix, pos, out=tmp)
        np.maximum(self.run, tmp, out=self.run)
        np.add(self.total, pos, out=tmp)
        np.maximum(self.prefix, tmp, out=self.prefix)
        np.add(self.suffix, log_factor, out=self.suffix)
        np.maximum(pos, self.suffix, out=self.suffix)
        np.add(self.total, log_factor, out=self.total)

    def repeat(self, n: int) -> Runs:
        if n == 1:
            return self
        # total <= 0 on the support, so the growth terms are usually 0; -inf (an exact root) stays -inf.
        grow = np.maximum(0.0, (n - 1) * self.total)
        inner = self.suffix + self.prefix
        if n > 2:
            inner = inner + np.maximum(0.0, (n - 2) * self.total)
        return Runs(n * self.total, self.prefix + grow, self.suffix + grow, np.maximum(self.run, inner))


def level_runs(block: Runs | None, log_factors: Sequence[np.ndarray], npts: int) -> Runs:
    """``block, step(f_0), block, step(f_1), ...`` (no blocks if ``block`` is None), accumulated in place (a
    level of a long cycle chains thousands of steps over tens of thousands of points)."""
    acc = Runs(*(np.zeros(npts) for _ in range(4)))
    tmp, pos = np.empty(npts), np.empty(npts)
    for j, f in enumerate(log_factors):
        if block is not None:
            acc.absorb(block, tmp, holds_other_run=j > 0)
        acc.absorb_step(f, tmp, pos)
    return acc


def least_count(log_p: np.ndarray, s: np.ndarray, reps_per_count: int, log_target: float) -> int | None:
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


def cycles_needed(log_rho: float, tol: float) -> int:
    if log_rho == -math.inf:
        return 1
    if log_rho >= 0.0:
        raise ValueError("the cycle does not contract every group (contraction >= 1)")
    # A hair below exact integers so ln(tol)/ln(rho) = 3.0000000001 from rounding does not cost a cycle.
    return max(1, math.ceil(math.log(tol) / log_rho * (1.0 - 1e-12)))


def level_rates_unordered(kind: str, rate_rule: str, g: ScaleGroup, d: int) -> np.ndarray:
    if kind == "nested":
        return np.array([1.0 / g.b if rate_rule == "safe" else 2.0 / (g.a + g.b)])
    return chebyshev_rates(g, d)
