"""The result of planning: :class:`MultiratePlan`, and its assembly from a structure (degrees, counts) into an
ordered cycle with every reported number evaluated on the fine grid."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mrgd_ext.planning.groups import ScaleGroup, check_tol, hulls, validate_groups
from mrgd_ext.planning.polynomials import (
    MAX_ODD_BASE,
    Grid,
    Runs,
    allowed_degree,
    cycles_needed,
    fractal_orders,
    level_rates_unordered,
    level_runs,
    log_abs_factor,
    log_abs_poly,
)

__all__ = ["MultiratePlan", "STRATEGIES", "RATE_RULES", "assemble"]

#: Values accepted for ``plan_multirate(strategy=...)``.
STRATEGIES: tuple[str, ...] = ("auto", "nested", "chebyshev-nested", "chebyshev")
#: Values accepted for ``plan_multirate(rate_rule=...)``.
RATE_RULES: tuple[str, ...] = ("optimal", "safe")

_WARMUP_ORDER = (
    "warm-up: small steps first (each large step follows the block of small steps that damps what it amplifies)"
)
_PLAN_FORMAT = "mrgd_ext.MultiratePlan/1"


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
        tol = self.tol if tol is None else check_tol(tol)
        rho = self.contraction
        return cycles_needed(-math.inf if rho == 0.0 else math.log(rho), tol)

    def predicted_iterations(self, tol: float | None = None) -> int:
        """``cycle_length * ceil(ln(tol)/ln(rho))`` -- iterations after which the relative error
        ``||x_k - x*|| / ||x_0 - x*||`` is at most ``tol`` from every start (quadratic, eigenvalues in the
        groups).  Defaults to the plan's own ``tol``."""
        return self.cycle_length * self.cycles_needed(tol)

    def log_cycle_polynomial(self, lam: Any) -> np.ndarray:
        """``log|P_cycle(lam)|`` (float64, -inf at roots), summed factor by factor so it never overflows."""
        lam = np.asarray(lam, dtype=np.float64)
        rates, counts = self._distinct
        return log_abs_poly(rates, lam, counts)

    def cycle_polynomial(self, lam: Any) -> np.ndarray:
        """``|P_cycle(lam)| = |prod_i (1 - eta_i lam)|`` on an array, computed as ``exp(sum log)``.

        Overflows to ``inf`` only where the true value exceeds the float64 range (far outside the groups).
        """
        with np.errstate(over="ignore"):
            values: np.ndarray = np.exp(self.log_cycle_polynomial(lam))
        return values

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
        spectrum = validate_groups(data["spectrum"])
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
        plan = assemble(spectrum, members, strategy, rate_rule, degrees, counts, check_tol(data["tol"]))
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
                f"  {k:>5}  {f'[{g.a:.4g}, {g.b:.4g}]':<25} {g.condition:>9.4g} {self.degrees[k]:>6} "
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


def assemble(
    spectrum: tuple[ScaleGroup, ...], members: tuple[tuple[int, ...], ...], strategy: str, rate_rule: str,
    degrees: tuple[int, ...], counts: tuple[int, ...], tol: float,
) -> MultiratePlan:
    """Build the ordered cycle for a given structure and evaluate everything on the fine grid."""
    kind = "nested" if strategy == "nested" else "chebyshev"
    groups = hulls(spectrum, members)
    fine = Grid.build(spectrum, members, fine=True)
    coarse = Grid.build(spectrum, members, fine=False)
    lam, owner = fine.points, fine.owner

    # Order each Chebyshev level: among the candidate fractal orders take the one whose runs of steps grow
    # least (coarse grid, all groups; a unit of level k >= 1 is a block of inner cycles then a large step).
    ordered_levels: list[np.ndarray] = []
    block_c: Runs | None = None
    npts_c = coarse.points.size
    for k, g in enumerate(groups):
        rates = level_rates_unordered(kind, rate_rule, g, degrees[k])
        if len(rates) > 1 and g.b > g.a:
            if not allowed_degree(len(rates)):
                raise ValueError(
                    f"Chebyshev degree {len(rates)} of level {k} has no stable order: use degrees q * 2**p with "
                    f"odd q <= {MAX_ODD_BASE}"
                )
            factors = [log_abs_factor(r, coarse.points) for r in rates]
            candidates = fractal_orders(len(rates))
            best, best_score, tried = 0, math.inf, []
            for i, perm in enumerate(candidates):
                tried.append(level_runs(block_c, [factors[j] for j in perm], npts_c))
                score = float(np.max(np.maximum(tried[-1].run, tried[-1].suffix + tried[-1].prefix)))
                if score < best_score - 1e-12:
                    best, best_score = i, score
            rates = rates[candidates[best]]
            level = tried[best]  # the runs of the chosen order, already computed
        else:
            level = level_runs(block_c, [log_abs_factor(r, coarse.points) for r in rates], npts_c)
        ordered_levels.append(rates)
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
    block_f: Runs | None = None
    runs = Runs.empty(lam.size)
    for k, rates in enumerate(ordered_levels):
        runs = level_runs(block_f, [log_abs_factor(r, lam) for r in rates], lam.size)
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
