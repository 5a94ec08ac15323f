"""Eigen-groups (scales) of a spectrum, from the gaps in its log-spectrum.

A multiscale Hessian has eigenvalues in groups of very different size (docs/design.md 1.1-1.2). On a log scale
the groups are runs of closely spaced values separated by wide gaps; :func:`detect_scales` splits the
sorted positive eigenvalues wherever two neighbours differ by at least a factor ``min_gap`` and returns one
:class:`mrgd_ext.ScaleGroup` ``[a, b]`` (Hessian scale) per run, sorted descending, which
:func:`mrgd_ext.plan_multirate` takes as is.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import torch

from mrgd_ext.planning.groups import ScaleGroup

__all__ = ["detect_scales"]


def _values_and_weights(spectrum: Any, weight_floor: float) -> np.ndarray:
    # Lazy imports: density/lanczos import torch-heavy modules this one does not otherwise need.
    from mrgd_ext.curvature.density import SpectralDensity
    from mrgd_ext.curvature.lanczos import LanczosResult

    if isinstance(spectrum, LanczosResult):
        return spectrum.eigenvalues.double().numpy()
    if isinstance(spectrum, SpectralDensity):
        # NOTE: [density nodes]
        # Gauss quadrature nodes always lie inside the spectrum's hull but some fall in the gaps between
        # groups, with small weight; nodes below weight_floor (per probe, weights summing to 1) are
        # ignored so they do not bridge a gap. A group holding a smaller fraction of the eigenvalues than
        # weight_floor can be lost this way: use Lanczos eigenvalues to resolve a few outliers.
        mask = spectrum.weights > weight_floor
        return spectrum.nodes[mask]
    if isinstance(spectrum, torch.Tensor):
        return spectrum.detach().double().cpu().numpy().reshape(-1)
    try:
        return np.asarray(spectrum, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise TypeError(
            "eigenvalues_or_density must be eigenvalues (tensor, array, sequence), a LanczosResult or a "
            f"SpectralDensity, got {type(spectrum).__name__}"
        ) from None


def detect_scales(
    eigenvalues_or_density: Any,
    min_gap: float = 10.0,
    *,
    floor: float = 1e-10,
    max_groups: int | None = None,
    weight_floor: float = 1e-3,
) -> list[ScaleGroup]:
    """Eigenvalue groups from gaps in the log-spectrum.

    Args:
        eigenvalues_or_density: Hessian eigenvalues (tensor, array or sequence; e.g. ``lanczos(...)``'s
            ``eigenvalues``), a :class:`mrgd_ext.LanczosResult`, or a :class:`mrgd_ext.SpectralDensity`
            (its quadrature nodes, NOTE: [density nodes]).
        min_gap: a new group starts where two neighbouring eigenvalues differ by at least this factor
            (> 1; the default 10 is one decade).
        floor: eigenvalues ``<= floor * lambda_max`` (and all non-positive ones) are ignored: a
            ``ScaleGroup`` is an interval of positive curvature, and the near-zero bulk of a neural-network
            Hessian has no scale of its own.
        max_groups: keep at most this many groups, splitting only at the widest gaps.
        weight_floor: for a density, ignore quadrature nodes lighter than this.

    Returns:
        ``ScaleGroup(a, b)`` per group, sorted descending (``groups[0].b`` = the largest eigenvalue kept).

    Raises:
        ValueError: naming the bad argument, or when no eigenvalue is above the floor.
    """
    min_gap = float(min_gap)
    if not (math.isfinite(min_gap) and min_gap > 1.0):
        raise ValueError(f"min_gap must be a finite ratio > 1 (e.g. 10 for one decade), got {min_gap}")
    floor = float(floor)
    if not (math.isfinite(floor) and 0.0 <= floor < 1.0):
        raise ValueError(f"floor must be in [0, 1) (relative to the largest eigenvalue), got {floor}")
    if max_groups is not None and (isinstance(max_groups, bool) or not isinstance(max_groups, int) or max_groups < 1):
        raise ValueError(f"max_groups must be an integer >= 1 or None, got {max_groups!r}")
    vals = _values_and_weights(eigenvalues_or_density, float(weight_floor))
    vals = vals[np.isfinite(vals)]
    if vals.size == 0 or vals.max() <= 0.0:
        raise ValueError("eigenvalues_or_density has no positive finite eigenvalue: there is no scale to detect")
    top = float(vals.max())
    vals = np.sort(vals[vals > floor * top])[::-1]
    logs = np.log(vals)
    gaps = logs[:-1] - logs[1:]  # >= 0, gap i lies between vals[i] and vals[i + 1]
    cuts = np.flatnonzero(gaps >= math.log(min_gap))
    if max_groups is not None and cuts.size > max_groups - 1:
        widest = np.argsort(gaps[cuts], kind="stable")[::-1][: max_groups - 1]
        cuts = np.sort(cuts[widest])
    bounds = np.concatenate([[0], cuts + 1, [vals.size]])
    return [ScaleGroup(float(vals[e - 1]), float(vals[s])) for s, e in itertools.pairwise(bounds)]
