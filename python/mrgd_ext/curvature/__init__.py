"""Curvature of a loss: Hessian-vector products, block Lanczos, spectral density, trace, scale detection
and the estimates AutoMrGD plans from."""

from mrgd_ext.curvature.hessian import HessianOperator
from mrgd_ext.curvature.lanczos import LanczosResult, lanczos
from mrgd_ext.curvature.density import SpectralDensity, TraceEstimate, hutchinson_trace, spectral_density
from mrgd_ext.curvature.scales import detect_scales
from mrgd_ext.curvature.estimate import (
    CurvatureEstimate,
    default_floor,
    estimate_curvature,
    history_ritz,
    plan_from_estimate,
)

__all__ = [
    "HessianOperator",
    "LanczosResult",
    "lanczos",
    "SpectralDensity",
    "TraceEstimate",
    "hutchinson_trace",
    "spectral_density",
    "detect_scales",
    "CurvatureEstimate",
    "estimate_curvature",
    "plan_from_estimate",
    "history_ritz",
    "default_floor",
]
