"""Curvature of a loss: the curvature-operator type, Hessian and generalized Gauss-Newton products, block
Lanczos, spectral density, trace and diagonal, scale detection and the estimates AutoMrGD plans from."""

from mrgd_ext.curvature.density import SpectralDensity, spectral_density
from mrgd_ext.curvature.distributed import DistributedOperator
from mrgd_ext.curvature.estimate import (
    CurvatureEstimate,
    default_floor,
    estimate_curvature,
    history_ritz,
    plan_from_estimate,
)
from mrgd_ext.curvature.ggn import GGNOperator
from mrgd_ext.curvature.hessian import HessianOperator
from mrgd_ext.curvature.lanczos import LanczosResult, lanczos
from mrgd_ext.curvature.operator import CurvatureOperator, LinearOperator, as_operator
from mrgd_ext.curvature.scales import detect_scales
from mrgd_ext.curvature.trace import (
    DiagonalEstimate,
    TraceEstimate,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    trace,
    xtrace,
)

__all__ = [
    "LinearOperator",
    "CurvatureOperator",
    "as_operator",
    "HessianOperator",
    "GGNOperator",
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
    "DistributedOperator",
    "history_ritz",
    "default_floor",
]
