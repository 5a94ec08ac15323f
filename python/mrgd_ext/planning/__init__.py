"""The planner: eigenvalue groups in, a multirate cycle of learning rates out."""

from mrgd_ext.planning.plan import MultiratePlan, ScaleGroup, groups_from_scales, plan_multirate

__all__ = ["MultiratePlan", "ScaleGroup", "groups_from_scales", "plan_multirate"]
