"""Multirate learning-rate planner: eigen-groups in, a cycle of learning rates out.

Multiscale data give the loss a Hessian whose eigenvalues fall into groups of very different size
(He, Liu, Tsai, "Data-induced multiscale losses and efficient multirate gradient descent schemes",
arXiv:2402.03021).  Plain gradient descent is limited by the ratio lambda_max / lambda_min over the whole
spectrum; multirate gradient descent (MrGD) instead cycles through learning rates matched to the groups, so
its cost is governed by the conditioning *within* groups.  This module turns a list of eigenvalue groups
into such a cycle and predicts, from the cycle polynomial, how many iterations it needs.

Terms used throughout (see also docs/design.md section 1.3):

* A group ``G_k = [a_k, b_k]`` is an interval of **Hessian eigenvalues** (not of data scales: a data scale
  ``e`` gives Hessian eigenvalues near ``e**2`` for least squares).  Groups are sorted descending,
  ``b_0 = lambda_max``, with gaps ``b_{k+1} < a_k``.  Group 0 holds the largest eigenvalues (the "finest"
  scale in the sense that it needs the smallest steps).
* A cycle ``(eta_1, ..., eta_L)`` is walked by gradient descent one rate per step.  On a quadratic the
  error along an eigenvector with eigenvalue ``lam`` is multiplied per cycle by the cycle polynomial
  ``P(lam) = prod_i (1 - eta_i * lam)``.  Its sup over the groups, ``rho``, is the contraction per cycle,
  and ``cycle_length * ceil(ln(tol) / ln(rho))`` iterations reduce every error component by ``tol`` -- a
  worst-case bound over starting points that the tests check against measured iterations.

Strategies (``plan_multirate``):

* ``"nested"`` -- the reference form of the paper's Algorithm 1: one rate per group
  (``2/(a_k+b_k)`` or ``1/b_k``), ``C_0 = [eta_0]`` and ``C_k = C_{k-1}`` repeated ``n_{k-1}`` times followed by
  one large step ``eta_k``; ``n_{k-1}`` is the least count for which every finer group is damped by the
  cycle at least as much as the large step damps its own group.
* ``"chebyshev-nested"`` (beyond the paper) -- the same nesting, but level ``k`` takes ``d_k`` large steps at
  the reciprocals of the Chebyshev nodes of ``G_k`` and the block of smaller steps is repeated before *each*
  of them: ``C_k = [B, s_1, B, s_2, ..., B, s_{d_k}]`` with ``B = C_{k-1}`` repeated ``n_{k-1}`` times.  The
  degrees are searched to minimise predicted iterations.  A Chebyshev cycle of degree ``d`` on a group of
  condition ``kappa`` contracts it by ``1/T_d((kappa+1)/(kappa-1))``, about ``2 ((sqrt(kappa)-1)/(sqrt(kappa)+1))**d``,
  i.e. it needs ~sqrt(kappa) steps per digit where one repeated rate needs ~kappa.
* ``"chebyshev"`` -- one Chebyshev cycle over ``[lambda_min, lambda_max]`` (the right answer when the groups
  are not separated).
* ``"auto"`` -- all of the above, with and without merging adjacent groups, and returns the plan with the
  fewest predicted iterations.

Within a Chebyshev level the order of the steps does not change the cycle polynomial but does change what
floating point sees: an unlucky order (e.g. ascending rates) lets a rounding error injected mid-cycle grow by
1e100 and more before the rest of the cycle damps it, and the iteration stalls far above the predicted
accuracy.  The planner uses the fractal (Lebedev-Finogenov type) order, generalised to degrees ``q * 2**p``
with odd ``q <= 13`` (see NOTE [stable order]), and reports two measures per plan:
``peak_amplification`` (largest partial product from the start of a cycle) and
``perturbation_amplification`` (largest product over any run of consecutive steps).  Warm-up order is kept
at every level: the block of small steps always precedes the large step it protects, which is why nested
plans never amplify the error inside a cycle (peak amplification 1).  A perturbation arriving just before a
large step is still amplified by it -- and, at the end of a nested cycle, by the large steps of the coarser
levels that follow it directly -- so the perturbation amplification of a multirate plan is about
lambda_max/lambda_min for two groups and can reach the product of the level ratios for deep nests.  Float64
iterations then stall near 1e-16 times that value (e.g. four groups spanning 5e7 reach ~1e12: no 1e-6).

All sups are evaluated numerically on a dense grid per group (cosine-spaced, so Chebyshev oscillations near
the ends are resolved, plus log-spaced, plus both endpoints) by summing ``log|1 - eta*lam|``, so nothing
overflows however long the cycle.
"""

from mrgd_ext.planning.groups import ScaleGroup, groups_from_scales
from mrgd_ext.planning.plan import RATE_RULES, STRATEGIES, MultiratePlan
from mrgd_ext.planning.search import plan_multirate

__all__ = ["MultiratePlan", "ScaleGroup", "groups_from_scales", "plan_multirate", "STRATEGIES", "RATE_RULES"]
