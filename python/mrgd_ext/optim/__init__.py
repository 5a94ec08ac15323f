"""Optimizers: MrGD (a planned cycle of rates, or per-group rates in a subspace), its functional form, the
MultirateLR scheduler for other optimizers, and AutoMrGD (MrGD planned from measured curvature)."""

from mrgd_ext.optim.auto import AutoMrGD
from mrgd_ext.optim.mrgd import MrGD, MultirateLR, mrgd

__all__ = ["MrGD", "MultirateLR", "mrgd", "AutoMrGD"]
