"""Curvature of a loss: Hessian-vector products, block Lanczos, spectral density, trace and diagonal, scale detection
and the estimates AutoMrGD plans from."""

from mrgd_ext.curvature.hessian import HessianOperator
from mrgd_ext.curvature.lanczos import LanczosResult, lanczos
from mrgd_ext.curvature.density import SpectralDensity, spectral_density
from mrgd_ext.curvature.trace import (
    DiagonalEstimate,
    TraceEstimate,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    trace,
    xtrace,
)
from mrgd_ext.curvature.scales import detect_scales
from mrgd_ext.curvature.estimate import CurvatureEstimate, estimate_curvature, plan_from_estimate

__all__ = [
    "HessianOperator",
    "LanczosResult",
    "lanczos",
    "SpectralDensity",
    "TraceEstimate",
    "hutchinson_trace",
    "hutchpp_trace",
    "xtrace",
    "trace",
    "DiagonalEstimate",
    "hutchinson_diagonal",
    "spectral_density",
    "detect_scales",
    "CurvatureEstimate",
    "estimate_curvature",
    "plan_from_estimate",
]
