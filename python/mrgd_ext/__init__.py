"""mrgd_ext: multirate gradient descent (MrGD) for multiscale problems in PyTorch.

Multiscale data give multiscale Hessians: eigenvalues fall into groups of very different size. MrGD cycles
learning rates aligned to those groups (He, Liu, Tsai, "Data-induced multiscale losses and efficient
multirate gradient descent schemes", arXiv:2402.03021); this package plans such cycles, runs them with
fused C++/CUDA kernels, and gives each eigen-group its own rate at once in a subspace form.
"""

from mrgd_ext._version import __version__
from mrgd_ext import _ops  # noqa: F401  (loads the compiled operators)
from mrgd_ext._ops import build_info
from mrgd_ext.schedule import MultiratePlan, ScaleGroup, groups_from_scales, plan_multirate
from mrgd_ext.optim import MrGD, MultirateLR, mrgd
from mrgd_ext.hvp import HessianOperator
from mrgd_ext.lanczos import LanczosResult, lanczos
from mrgd_ext.density import SpectralDensity, TraceEstimate, hutchinson_trace, spectral_density
from mrgd_ext.scales import detect_scales
from mrgd_ext.curvature import CurvatureEstimate, estimate_curvature, plan_from_estimate
from mrgd_ext.auto import AutoMrGD
from mrgd_ext import data, diagnostics  # noqa: E402  (submodules: mrgd_ext.data.load_digits(), ...)

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
    "HessianOperator",
    "lanczos",
    "LanczosResult",
    "spectral_density",
    "SpectralDensity",
    "hutchinson_trace",
    "TraceEstimate",
    "detect_scales",
    "CurvatureEstimate",
    "estimate_curvature",
    "plan_from_estimate",
    "AutoMrGD",
]
