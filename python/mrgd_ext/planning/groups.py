"""Eigenvalue groups: :class:`ScaleGroup`, their validation, and synthetic groups for separated scales."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Largest supported lambda_max / lambda_min of a spectrum, as a power of ten (NOTE [spread]).
_MAX_LOG10_SPREAD = 150.0
_MIN_EIGENVALUE = sys.float_info.min

__all__ = ["ScaleGroup", "groups_from_scales", "validate_groups", "check_tol", "hulls"]


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


def validate_groups(groups: Iterable[Any]) -> tuple[ScaleGroup, ...]:
    """Groups as a tuple, sorted descending with strict gaps, or ValueError naming the problem."""
    if isinstance(groups, ScaleGroup):
        raise ValueError("groups must be a list of ScaleGroup, got a single ScaleGroup (wrap it in a list)")
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Iterable):
        raise ValueError(f"groups must be a list of ScaleGroup, got {type(groups).__name__}")
    out = tuple(_as_group(g, i) for i, g in enumerate(groups))
    if not out:
        raise ValueError("groups is empty: give at least one ScaleGroup")
    # NOTE: [spread] Rates are reciprocals of eigenvalues and every factor is 1 - eta * lam, so eta * lam
    # reaches lambda_max / lambda_min; keeping that spread <= 1e150 keeps every product (and its square in
    # the Chebyshev forms) finite in float64, and normal floats keep every reciprocal finite.
    for i, g in enumerate(out):
        if g.a < _MIN_EIGENVALUE:
            raise ValueError(
                f"groups[{i}].a={g.a:g} is below the supported range: eigenvalues must be >= {_MIN_EIGENVALUE:g} "
                f"(normal float64) so that their reciprocals are finite"
            )
    spread = math.log10(max(g.b for g in out)) - math.log10(min(g.a for g in out))
    if spread > _MAX_LOG10_SPREAD:
        raise ValueError(
            f"groups span lambda_max / lambda_min = 1e{spread:.0f}; the planner supports a spread up to "
            f"1e{_MAX_LOG10_SPREAD:.0f} (rate * eigenvalue products must stay finite in float64): rescale the "
            f"problem or plan for a part of the spectrum"
        )
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


def check_tol(tol: Any, name: str = "tol") -> float:
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


def hulls(spectrum: Sequence[ScaleGroup], members: Sequence[Sequence[int]]) -> tuple[ScaleGroup, ...]:
    """One group per run of ``members``: the interval from the run's smallest to its largest eigenvalue."""
    return tuple(ScaleGroup(spectrum[m[-1]].a, spectrum[m[0]].b) for m in members)
