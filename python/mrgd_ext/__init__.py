"""mrgd_ext: multirate gradient descent (MrGD) for multiscale problems in PyTorch.

Multiscale data give multiscale Hessians: eigenvalues fall into groups of very different size. MrGD cycles
learning rates aligned to those groups (He, Liu, Tsai, "Data-induced multiscale losses and efficient
multirate gradient descent schemes", arXiv:2402.03021); this package plans such cycles, runs them with
fused C++/CUDA kernels, and gives each eigen-group its own rate at once in a subspace form.
"""

from mrgd_ext._version import __version__
from mrgd_ext.curvature import (
    CurvatureEstimate,
    CurvatureOperator,
    DiagonalEstimate,
    DistributedOperator,
    GGNOperator,
    HessianOperator,
    LanczosResult,
    SpectralDensity,
    TraceEstimate,
    detect_scales,
    estimate_curvature,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    plan_from_estimate,
    spectral_density,
    trace,
    xtrace,
)
from mrgd_ext.ops import build_info  # loads the compiled operators
from mrgd_ext.optim import AutoMrGD, MrGD, MultirateLR, mrgd
from mrgd_ext.planning import MultiratePlan, ScaleGroup, groups_from_scales, plan_multirate

__all__ = [
    "__version__",
    "build_info",
    "ScaleGroup",
    "MultiratePlan",
    "plan_multirate",
    "groups_from_scales",
    "MrGD",
    "MultirateLR",
    "mrgd",
    "CurvatureOperator",
    "HessianOperator",
    "GGNOperator",
    "DistributedOperator",
    "lanczos",
    "LanczosResult",
    "spectral_density",
    "SpectralDensity",
    "hutchinson_trace",
    "hutchpp_trace",
    "xtrace",
    "trace",
    "TraceEstimate",
    "hutchinson_diagonal",
    "DiagonalEstimate",
    "detect_scales",
    "CurvatureEstimate",
    "estimate_curvature",
    "plan_from_estimate",
    "AutoMrGD",
]
