"""AutoMrGD: data-informed multirate gradient descent that measures its own rates.

MrGD needs the eigen-groups of the Hessian (docs/design.md 1.2-1.4). :class:`AutoMrGD` measures them from the model
and a fixed probe batch (a :class:`mrgd_ext.HessianOperator`) at the start and every ``refresh_every`` steps,
plans (:func:`mrgd_ext.curvature.plan_from_estimate`) and trains with the fused kernels of :class:`MrGD`:

* ``mode="temporal"``: the plan's cycle of rates, small steps first, the large steps last (the paper's scheme);
* ``mode="subspace"``: the top Ritz vectors and their groups' rates feed the fused subspace step, so the
  stiff directions take their own small rate while the rest of the space takes the large one at every step.

NOTE: [safety]
Large rates are safe only while the measured groups describe the current Hessian. The loss is watched (the
``closure`` is required): at every check point (each cycle start in temporal mode, every ``check_every``
steps in subspace mode) the loss must not exceed the lowest check-point loss so far by more than
``loss_slack`` (relative; so the loss cannot creep up interval by interval), and inside a cycle it must stay
finite and below ``max_loss_growth`` times the last check point's loss (by default 10 times the square of
the plan's predicted peak amplification: a quadratic's loss grows with the square of its error, and inside a
cycle the plan itself lets the error grow by that much). In temporal mode the check points are the cycle ends:
inside a cycle the loss may rise by what the plan predicts, and only a cycle as a whole has to decrease it. A
violation restores the parameters of the last check point (one copy of the parameters is kept), backs the rates
off (``lr_scale *= backoff`` or the secant factor, rate rule ``"safe"``), re-measures the curvature there and goes
on, with a :class:`RuntimeWarning`. After ``max_backoffs`` violations in a row the optimizer degrades to the safe
schedule: one rate ``1 / (lambda_max_margin * lambda_max)`` from the measured ``lambda_max``, which decreases the loss
of any function whose curvature along the path stays below ``lambda_max_margin * lambda_max`` (gradient
descent below ``2 / L``); further violations there shrink that rate (by ``backoff``, or by the secant factor when
the violation came one step after the check point: NOTE: [secant back-off]), and each step that passes its check
doubles it again, up to the safe rate; a blow-up that repeats right after a back-off is cut by the chord
instead (NOTE: [secant back-off]). A back-off rolled back to the point the current estimate was measured at
keeps that estimate (measuring again would return the same groups) and, when the step's own secant saw more
curvature than it holds, re-measures at the next check point passed; a measurement that finds ``lambda_max``
larger gives back the rate shrink that growth explains (NOTE: [scale recovery]). Every check allows the loss's
rounding floor ``eps(dtype) * |L_0|`` on top of its slack (NOTE: [loss floor]). The
multirate plan is tried again at the next refresh. :class:`RuntimeError` is raised only for a broken closure:
a non-finite loss at the restored parameters, or a loss that keeps rising at a rate ``2**-40`` times the safe
one. Nothing diverges silently.

NOTE: [estimation cost]
Curvature is measured at the start, after a back-off and at refreshes, and each measurement is kept cheap:
four Ritz pairs by single-vector Lanczos (on the training suite, 2 seeds, 4 problems, four pairs with b = 1 reached
tuned GD's final loss soonest among 4/8/16 pairs and b = 1/4: 23-60 HVPs per measurement where eight pairs with
b = 4 took 46-124, and the deflated remainder is accelerated anyway); Lanczos stops at a relative residual of
1e-2 (group edges to about that accuracy; the plan carries a margin on ``lambda_max``, and in subspace mode the
residuals cap the base rate: NOTE: [basis accuracy]), warm-started from the previous Ritz vectors; the SLQ density is
re-measured only when the top of the spectrum has moved (:func:`mrgd_ext.curvature.estimate_curvature`);
all products of one measurement differentiate one gradient graph (NOTE: [shared graph]: on the suite's
networks a measurement took 27-41% less time, with the same numbers).
The complement's top (subspace mode) is warm-started from its previous Ritz vector. Refreshes are adaptive:
the interval starts at ``refresh_every`` and doubles (up to ``max_refresh_interval``) each time a refresh finds
the same groups or the loss is below its rounding floor (NOTE: [loss floor]); and in temporal mode the optimisation's
own history triggers an early one at zero HVP cost: each small step (rate at most ``1 / lambda_max``) gives
the secant Rayleigh quotient ``s^T (g_{k+1} - g_k) / s^T s`` of the Hessian along the step
(:func:`mrgd_ext.curvature.history_ritz` in its one-step form); when it exceeds the planned top
``lambda_max_margin * lambda_max``, the curvature has grown past the plan and is re-measured at the next cycle
end. A stochastic closure skips the watch: minibatch gradient differences carry noise (NOTE: [stochastic
closure]).

NOTE: [default mode]
Subspace mode (Ritz rates, restarted Nesterov momentum on the preconditioned step) is the default: on the
training suite (benchmarks/results/training_cpu.md, full budgets) it ends lower than temporal mode on six of seven
problems (not on the raw-diabetes MLP: 2838 against 2701) with fewer HVPs on all seven (11-200 against 66-755;
its Lanczos measures no SLQ density), and it meets targets there that temporal mode misses (gap 1e-6 on raw least
squares and logistic regression; 0.06-0.14x GD's time on logistic and softmax regression, the wine MLP and the
CNN; the multiscale MLP in 0.76x heavy ball's time).

NOTE: [gradient noise]
With minibatch gradients every step also injects noise, and a large step multiplies the noise that the small
steps then have to damp; the plan's ``perturbation_amplification`` says by how much at most. The defaults
are the conservative choice for that case: rates by the ``"safe"`` rule (``1/b``: each step non-expansive
on its own group), a 10% margin on ``lambda_max`` and rollback on any loss increase beyond ``loss_slack``.
With minibatches the loss seen by the check differs from batch to batch: a closure built on a fresh batch per
step is detected and judged by interval means (NOTE: [stochastic closure]); a closure that steps on a minibatch
but returns the loss of a fixed batch stays deterministic to the checks. Full-batch (deterministic) training
may use ``rate_rule="optimal"``.

NOTE: [stochastic closure]
A training loop that builds each step's closure on a fresh minibatch (or a model with dropout) gives losses that
differ from step to step by the batch-to-batch spread, often far more than ``loss_slack``: judged one by one
they read as rises, every check backs off, and the rates shrink to a few percent (the minibatch CNN of
benchmarks/bench_minibatch.py: 5 back-offs, lr_scale 0.04, final loss 0.04 against tuned SGD-momentum's 9e-4).
So AutoMrGD finds out: the second step evaluates its closure also at the first step's parameters (one
evaluation more, once per run; ``stochastic=True``/``False`` declares it instead), and a loss that differs there
by more than 1024 loss floors (NOTE: [loss floor]) marks the closure stochastic. Deterministic closures keep
every decision described above, bit for bit. A stochastic closure is judged by interval means: at each check
point (every ``check_every`` steps; in temporal mode or on the safe schedule, the first cycle start after that)
the mean of the closure's losses since the last check point must not exceed the lowest accepted interval mean by
more than ``loss_slack`` plus three times sqrt(2) times that interval's standard error (the spread of the
accepted interval, not of the judged one, whose spread grows with a blow-up and would hide it); inside an
interval, one batch loss beyond the growth bound times the last accepted interval mean (a blow-up, not noise)
backs off at once. A back-off halves the rates (one batch's loss after one step carries no secant information).
An interval mean judges a path, not its end point, so an accepted interval may end where the loss has already
risen; restored there, no interval gets back under the old best. So once the violations in a row pass
``max_backoffs`` (the safe schedule), the restored point's own intervals set the reference again (with a
momentum warm-up k/(k+3), tried on the minibatch MLP, two of three seeds otherwise backed off 21-23 times and
ended at lr_scale 1e-6).
The accelerated subspace step keeps a constant momentum ``STOCHASTIC_MOMENTUM`` = 0.9 (torch.optim.SGD's
customary value; it averages the gradient noise over ~10 steps) instead of restarting on a rising loss, which
between two batches says nothing about momentum's overshoot. And a refresh raises the rates by at most a factor
of 2: with noisy gradients a rate k times larger leaves a noise floor about k times higher, and the minibatch CNN's
lambda_max, measured 30 times smaller at its first refresh (a nearly interpolating fit), took rates 30 times
larger and blew up within seven steps in all three seeds (two back-offs each); capped, a lambda_max that keeps
falling lets the rates double at every refresh, and one that grows again gives the cap back (NOTE: [scale
recovery]). Measured on benchmarks/bench_minibatch.py (3 seeds): the CNN's final loss 0.041 -> 0.00086 (tuned
SGD-momentum: 0.00091), the multiscale MLP's 1.31 -> 0.54 (0.74).
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any, TypedDict

import torch

from mrgd_ext._validation import (
    RATE_RULES,
    STRATEGIES,
    check_bool,
    check_choice,
    check_count,
    check_finite_scalar,
    check_int,
    check_not_sharded,
    check_positive_rate,
)
from mrgd_ext.curvature.distributed import DistributedOperator
from mrgd_ext.curvature.estimate import (
    CurvatureEstimate,
    default_floor,
    estimate_curvature,
    plan_from_estimate,
    widen_top,
)
from mrgd_ext.curvature.lanczos import lanczos
from mrgd_ext.curvature.operator import CurvatureOperator, as_operator
from mrgd_ext.optim._ddp import global_closure
from mrgd_ext.optim.mrgd import MrGD
from mrgd_ext.planning import MultiratePlan, ScaleGroup, plan_multirate

__all__ = ["AutoMrGD", "MODES"]

#: Values accepted for ``mode=``.
MODES: tuple[str, ...] = ("temporal", "subspace")
#: Values accepted for ``acceleration=`` (subspace mode; NOTE: [accelerated subspace step]).
ACCELERATIONS: tuple[str | None, ...] = ("nesterov", None)
#: Largest eta * lambda_top * eps_b a subspace step may have, eps_b the basis's rounding error (NOTE: [basis
#: rounding]). On quadratics with groups 1e4 apart and a bfloat16 basis (three seeds) 1.0 still converged
#: without a back-off and 2.0 diverged; 0.5 keeps a factor of 4 (tests/test_auto.py).
BASIS_ROUNDING_MARGIN = 0.5
#: Up to this many parameters the default basis spans all of them (NOTE: [small problems]).
SMALL_PROBLEM = 32
#: Largest norm of the coupling between the basis and its complement in the preconditioned Hessian
#: (NOTE: [basis accuracy]).
RESIDUAL_COUPLING = 0.25
_AUTO_KEY = "multirate_auto"
#: Below this multiple of the safe rate a still-rising loss means a broken closure, not curvature (2**-40).
_SAFE_SCALE_LIMIT = 2.0 ** -40
#: A refresh whose group edges all lie within this factor of the previous ones found "the same groups".
_SAME_GROUPS = 1.25
#: Momentum of the accelerated subspace step on a stochastic closure (NOTE: [stochastic closure]).
STOCHASTIC_MOMENTUM = 0.9
#: Two evaluations at the same parameters that differ by more than this many loss floors (eps(dtype) |L_0|) mark
#: a stochastic closure (NOTE: [stochastic closure]).
_STOCHASTIC_RESOLUTION = 1024.0
#: A stochastic closure's interval mean counts as a rise beyond this many standard errors (NOTE: [stochastic
#: closure]).
_STOCHASTIC_SIGMAS = 3.0
#: Largest factor by which one refresh may raise a stochastic closure's rates (NOTE: [stochastic closure]).
_STOCHASTIC_RATE_GROWTH = 2.0


class _MeasureKwargs(TypedDict):
    """What :func:`estimate_curvature` measures (the constructor's choices)."""

    num_eigs: int
    block_size: int
    lanczos_tol: float
    lanczos_verify: bool
    density_probes: int
    density_order: int
    min_gap: float
    floor: float
    max_groups: int | None


class _PlanKwargs(TypedDict):
    """How a plan is made from an estimate (the rule and strategy change when the rates back off)."""

    tol: float
    strategy: str
    rate_rule: str


def _rate(group: ScaleGroup, rule: str) -> float:
    return 1.0 / group.b if rule == "safe" else 2.0 / (group.a + group.b)


def _orthonormal_rows(U: torch.Tensor) -> torch.Tensor:
    """``U`` [r, n] with its rows made orthonormal (float64 QR, each row keeping its direction).

    Ritz vectors of a float32 Lanczos run stopped at a loose tolerance are orthonormal only to ~1e-4, while the
    subspace step projects as if ``U U^T = I``: the departure would leak the stiff rates into the complement."""
    Q, R = torch.linalg.qr(U.to(torch.float64).T)  # Q [n, r]
    signs = torch.sign(torch.diagonal(R))
    signs[signs == 0] = 1.0
    rows: torch.Tensor = (Q * signs).T.to(U.dtype).contiguous()
    return rows


def _as_float(loss: Any) -> float:
    """The closure's loss as a float: a one-element tensor or a real number, anything else is a broken closure."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise TypeError(
                f"the closure must return a scalar loss tensor or float, got a tensor of shape {tuple(loss.shape)}"
            )
        return float(loss.detach())
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return float(loss)
    raise TypeError(f"the closure must return a scalar loss tensor or float, got {type(loss).__name__}")


def _positive(value: Any, name: str, *, upper: float | None = None) -> float:
    v = float(value)
    if not math.isfinite(v) or v <= 0.0 or (upper is not None and v > upper):
        bound = f" and <= {upper}" if upper is not None else ""
        raise ValueError(f"{name} must be a finite number > 0{bound}, got {value!r}")
    return v


# The "multirate_auto" entry of the optimizer state: field -> (required, check).  Counts are integers >= 0 (the
# refresh interval >= 1), losses None (before the first check point) or finite, the scale to return to a
# finite rate multiplier > 0.
_AUTO_STATE_FIELDS: dict[str, tuple[bool, Callable[[Any, str], Any]]] = {
    "step": (True, lambda v, n: check_int(v, n, 0)),
    "last_estimate": (True, lambda v, n: check_int(v, n, 0)),
    "since_check": (True, lambda v, n: check_int(v, n, 0)),
    "backoffs": (True, lambda v, n: check_int(v, n, 0)),
    "interval": (True, lambda v, n: check_int(v, n, 1)),
    "safe_entries": (False, lambda v, n: check_int(v, n, 0)),
    "ref_loss": (True, lambda v, n: None if v is None else check_finite_scalar(v, n)),
    "best_loss": (False, lambda v, n: None if v is None else check_finite_scalar(v, n)),
    "remeasure": (True, check_bool),
    "normal_lr_scale": (True, check_positive_rate),
    # The accelerated subspace step's momentum counter and last loss (NOTE: [accelerated subspace step]).
    "momentum_steps": (False, lambda v, n: check_int(v, n, 0)),
    "previous_loss": (False, lambda v, n: None if v is None else check_finite_scalar(v, n)),
    # The secant back-off's probe (NOTE: [secant back-off]) and whether the estimate belongs to the check point.
    "probe_slope": (False, lambda v, n: None if v is None else check_finite_scalar(v, n)),
    "estimate_at_snapshot": (False, check_bool),
    # The batch-to-batch spread of the closure's loss, learned at rollbacks (NOTE: [loss noise]).
    "loss_noise": (False, lambda v, n: _nonnegative(check_finite_scalar(v, n), n)),
    # The rounding resolution of the closure's loss, set at the first step (NOTE: [loss floor]).
    "loss_floor": (False, lambda v, n: _nonnegative(check_finite_scalar(v, n), n)),
    # Whether the closure is stochastic (None: not known yet), the running sums of its losses since the last
    # check point and the standard error of the lowest interval mean (NOTE: [stochastic closure]).
    "stochastic": (False, lambda v, n: None if v is None else check_bool(v, n)),
    "interval_sum": (False, check_finite_scalar),
    "interval_sumsq": (False, lambda v, n: _nonnegative(check_finite_scalar(v, n), n)),
    "interval_count": (False, lambda v, n: check_int(v, n, 0)),
    "best_error": (False, lambda v, n: _nonnegative(check_finite_scalar(v, n), n)),
}


def _nonnegative(value: float, name: str) -> float:
    if value < 0.0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _checked_auto_state(auto: Any, name: str) -> dict[str, Any]:
    """The AutoMrGD state entry with every field checked (types, finiteness, ranges), as plain Python values;
    TypeError/ValueError/KeyError naming the field otherwise."""
    if not isinstance(auto, dict):
        raise TypeError(f"{name} must be a dict, got {type(auto).__name__}")
    unknown = sorted(str(k) for k in auto if k not in _AUTO_STATE_FIELDS)
    if unknown:
        raise ValueError(f"{name} has unknown fields {', '.join(unknown)}")
    out = {}
    for field, (required, check) in _AUTO_STATE_FIELDS.items():
        if field not in auto:
            if required:
                raise KeyError(f"{name} has no {field!r} field")
            continue
        out[field] = check(auto[field], f"{name}[{field!r}]")
    if out["last_estimate"] > out["step"]:
        raise ValueError(f"{name}['last_estimate'] = {out['last_estimate']} is after {name}['step'] = {out['step']}")
    return out


_STATE_GROUP_KEY = "auto"
_ROLLBACK = "rollback_point"
#: Fields of AutoMrGD's checkpoint that live outside state[_AUTO_KEY] in memory (NOTE: [AutoMrGD checkpoint]).
_AUTO_EXTRAS = ("measurements", "safe_plan", "rate_rule", "strategy", "growth_bound", "complement_top", "groups",
                "lambda_max")


def _check_auto_state(saved: Any, name: str) -> dict[str, Any]:
    """A copy of a saved AutoMrGD state after checking every field (``name`` says where it comes from): the
    in-memory entry's fields (:data:`_AUTO_STATE_FIELDS`) and, in the checkpoint form, the decision fields that
    live outside it in memory (:data:`_AUTO_EXTRAS`)."""
    if not isinstance(saved, dict):
        raise TypeError(f"{name} must be a dict, got {type(saved).__name__}")
    auto = _checked_auto_state({k: v for k, v in saved.items() if k not in _AUTO_EXTRAS}, name)
    auto.setdefault("safe_entries", 0)  # written lazily by older versions
    auto.setdefault("best_loss", None)
    auto.update({k: saved[k] for k in _AUTO_EXTRAS if k in saved})
    present = [k for k in _AUTO_EXTRAS if k in auto]
    if present and len(present) != len(_AUTO_EXTRAS):
        missing = next(k for k in _AUTO_EXTRAS if k not in auto)
        raise KeyError(f"{name} has no {missing!r}")
    if present:
        auto["measurements"] = check_int(auto["measurements"], f"{name}['measurements']", 0)
        if not isinstance(auto["safe_plan"], bool):
            raise TypeError(f"{name}['safe_plan'] must be a bool")
        check_choice(auto["rate_rule"], f"{name}['rate_rule']", RATE_RULES)
        check_choice(auto["strategy"], f"{name}['strategy']", STRATEGIES)
        auto["growth_bound"] = _positive(auto["growth_bound"], f"{name}['growth_bound']")
        if auto["complement_top"] is not None:
            auto["complement_top"] = float(auto["complement_top"])
        groups = auto["groups"]
        if not isinstance(groups, (list, tuple)) or not all(
                isinstance(g, (list, tuple)) and len(g) == 2 and all(isinstance(x, numbers.Real) for x in g)
                for g in groups):
            raise TypeError(f"{name}['groups'] must be a list of [a, b] pairs")
        auto["groups"] = [[float(a), float(b)] for a, b in groups]
        lam = auto["lambda_max"]
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam):
            raise ValueError(f"{name}['lambda_max'] must be a finite number")
        auto["lambda_max"] = float(lam)
    return auto


_COMPLEMENT = "complement_vector"


def _pop_per_parameter(
    state: dict[Any, Any], keys: list[Any], params: list[torch.Tensor], field: str, *, param_dtype: bool = True
) -> list[torch.Tensor] | None:
    """Remove the per-parameter entries ``field`` from ``state`` (in place) and return them, checked (each a finite
    tensor of its parameter's shape, and dtype when ``param_dtype``), or None when no parameter has one."""
    entries = [state.get(k) for k in keys]
    present = [isinstance(e, dict) and field in e for e in entries]
    if not any(present):
        return None
    if not all(present) or len(keys) != len(params):
        k = next((k for k, has in zip(keys, present) if not has), None)
        raise KeyError(f"state_dict['state'][{k!r}] has no {field!r}, but other parameters' entries do")
    out = []
    for k, e, p in zip(keys, entries, params):
        assert isinstance(e, dict)  # checked above
        value = e[field]
        if (not isinstance(value, torch.Tensor) or value.shape != p.shape
                or (value.dtype != p.dtype if param_dtype else not value.is_floating_point())):
            what = f"a {p.dtype}" if param_dtype else "a floating-point"
            raise ValueError(f"state_dict['state'][{k!r}][{field!r}] must be {what} tensor of shape "
                             f"{tuple(p.shape)} (its parameter's)")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"state_dict['state'][{k!r}][{field!r}] has non-finite entries")
        out.append(value.detach().to(p.device).clone())
    for k in keys:
        rest = {f: v for f, v in state[k].items() if f != field}
        if rest:
            state[k] = rest
        else:
            del state[k]
    return out


class AutoMrGD(MrGD):
    r"""MrGD whose rates come from the measured Hessian spectrum (module docstring).

    Args:
        params: the parameters (one group; tensors, not dicts), all on one device with one dtype.
        hessian: a :class:`mrgd_ext.HessianOperator` (or :class:`mrgd_ext.GGNOperator`) over exactly these
            parameters, in the same order, on a fixed probe batch. It is applied at the parameters' current values
            whenever a measurement runs.
            Under DDP: a :class:`mrgd_ext.DistributedOperator` over each rank's probe shard; then the
            closure's loss is averaged over the ranks too, so every rank takes the same decisions.
        mode: ``"subspace"`` (default: Ritz vectors + fused subspace step) or ``"temporal"`` (cycle of rates).
            On the training suite (benchmarks/results/training_cpu.md: raw-feature least squares, logistic and
            softmax regression, three MLPs and a CNN) subspace mode ended lower than temporal mode on six of seven
            problems (NOTE: [default mode]).
        refresh_every: re-measure after this many steps (temporal: at the next cycle start); the interval
            doubles while refreshes find the same groups, up to ``max_refresh_interval`` steps (default 16
            ``refresh_every``; NOTE: [estimation cost]).
        gradient_history: temporal mode: watch the secant curvature of the small steps and re-measure early
            when it exceeds the plan's ``lambda_max`` (NOTE: [estimation cost]; skipped for a stochastic closure).
        lanczos_tol: relative residual tolerance of the Lanczos solve (default 1e-2; in subspace mode the
            measured residuals cap the base rate, so a loose basis costs speed, not stability: NOTE: [basis
            accuracy]). Subspace mode skips Lanczos's own verification (it measures the complement instead).
        num_eigs, block_size, density_probes, density_order, min_gap, floor, max_groups: what to measure,
            see :func:`mrgd_ext.curvature.estimate_curvature` (``num_eigs=None``: 4, or all ``n`` parameters up to
            ``SMALL_PROBLEM`` = 32: NOTE: [small problems]; ``density_probes=None``: 2, or 0 in subspace mode with
            ``subspace_rates="ritz"``, which needs no density: NOTE: [subspace density]; ``floor=None``: ten times the
            unit roundoff of the operator's dtype, :func:`mrgd_ext.curvature.default_floor`). Subspace mode needs
            ``num_eigs >= 1``; the basis costs ``num_eigs * n`` elements of ``basis_dtype`` (float32, bfloat16 or
            float64; default float64 for float64 parameters, float32 otherwise). A bfloat16 basis halves that memory but
            its rounding error (~2e-3) caps every rate at ``0.5 / (lambda_max * error)`` (NOTE: [basis rounding]), so it
            pays only while the measured groups are less than ~250x apart.
        subspace_rates: ``"ritz"`` (default) -- each Ritz vector takes the rate of its own Ritz value
            (``1 / (lambda_max_margin theta)`` by the safe rule): a preconditioner on the basis;
            ``"group"`` -- each takes its measured group's rate (docs/design.md 1.4; needs the SLQ density).
        acceleration: ``"nesterov"`` (default) -- subspace mode adds restarted Nesterov momentum to the
            preconditioned step (NOTE: [accelerated subspace step]; one more parameter-sized buffer); ``None``
            -- plain subspace steps. Temporal mode ignores it (its cycle is its acceleration).
        warm_start: start each re-measurement's Lanczos from the previous Ritz vectors.
        tol, strategy, rate_rule, lambda_max_margin: how to plan, see
            :func:`mrgd_ext.curvature.plan_from_estimate`. Defaults are conservative (NOTE: [gradient noise]).
        max_cycle_length: longest cycle of rates a plan may have (default ``refresh_every``; NOTE: [cycle length]).
        lr_scale: multiplies every rate.
        loss_slack, max_loss_growth, check_every, backoff, max_backoffs, rollback: NOTE: [safety].
        weight_decay, maximize, foreach, fused: as for :class:`MrGD`.
        seed: seeds the probes and start blocks (a re-measurement uses ``seed + number of measurements``).
        stochastic: whether the closure's loss varies at fixed parameters (a fresh minibatch per step, dropout):
            ``None`` (default) finds out at the second step with one extra closure evaluation; ``True``/``False``
            declares it. Stochastic closures are judged by interval means and keep a constant momentum (NOTE:
            [stochastic closure]).

    Attributes:
        plan: the current :class:`mrgd_ext.MultiratePlan`.
        estimate: the latest :class:`mrgd_ext.curvature.CurvatureEstimate`.
        events: one dict per measurement or back-off (step, kind, reason, HVPs, seconds, groups, rates).
        estimation_hvps, estimation_seconds: the total cost of all measurements so far.
        stochastic: whether the closure was found (or declared) stochastic; None before the second step.
        basis_rounding_error: subspace mode: the largest row norm of (stored basis - Ritz vectors), 0 when the
            basis keeps the precision it was computed in.

    ``step(closure)`` needs the closure (it returns the loss, after ``backward``), as for ``torch.optim.LBFGS``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        hessian: Any,
        *,
        mode: str = "subspace",
        refresh_every: int = 200,
        max_refresh_interval: int | None = None,
        gradient_history: bool = True,
        num_eigs: int | None = None,
        block_size: int = 1,
        lanczos_tol: float | None = None,
        density_probes: int | None = None,
        density_order: int = 40,
        min_gap: float = 10.0,
        floor: float | None = None,
        max_groups: int | None = 4,
        warm_start: bool = True,
        tol: float = 1e-6,
        strategy: str = "nested",
        rate_rule: str = "safe",
        lambda_max_margin: float = 1.1,
        max_cycle_length: int | None = None,
        lr_scale: float = 1.0,
        loss_slack: float = 0.05,
        max_loss_growth: float | None = None,
        check_every: int = 10,
        backoff: float = 0.5,
        max_backoffs: int = 2,
        rollback: bool = True,
        basis_dtype: torch.dtype | None = None,
        subspace_rates: str = "ritz",
        acceleration: str | None = "nesterov",
        weight_decay: float = 0.0,
        maximize: bool = False,
        seed: int = 0,
        stochastic: bool | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors, got a single tensor (wrap it in a list)")
        params = list(params)
        if not params:
            raise ValueError("params is empty")
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(
                    f"params[{i}] must be a tensor (AutoMrGD takes one param group), got {type(p).__name__}"
                )
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_not_sharded(params, "AutoMrGD")  # NOTE: [no FSDP2 curvature]
        if not (
            isinstance(hessian, CurvatureOperator)
            or (isinstance(hessian, DistributedOperator) and isinstance(hessian.op, CurvatureOperator))
        ):
            raise TypeError(
                "hessian must be a HessianOperator or GGNOperator (a CurvatureOperator), or a DistributedOperator "
                f"over one, got {type(hessian).__name__}"
            )
        if floor is None:
            floor = default_floor(hessian.dtype)
        floor = float(floor)
        if not (math.isfinite(floor) and 0.0 <= floor < 1.0):
            raise ValueError(f"floor must be in [0, 1) (relative to lambda_max) or None, got {floor!r}")
        if [id(p) for p in hessian.params] != [id(p) for p in params]:
            raise ValueError(
                "hessian must be built over exactly the optimizer's parameters, in the same order "
                f"({type(hessian).__name__}(model, loss_fn, probe_batch, params=<the same list>))"
            )
        if int(hessian.n) != sum(p.numel() for p in params):
            raise ValueError(f"hessian acts on n={hessian.n} but the parameters have {sum(p.numel() for p in params)}")
        if num_eigs is None:
            # NOTE: [small problems]
            # Up to SMALL_PROBLEM parameters the basis spans the whole space: Lanczos then costs at most n
            # products and the subspace step is Newton's step in the measured metric (no complement left to
            # crawl along; on 11-parameter raw least squares four pairs left a complement of condition 1e5).
            num_eigs = int(hessian.n) if int(hessian.n) <= SMALL_PROBLEM else 4
        if mode == "subspace" and num_eigs < 1:
            raise ValueError("mode='subspace' needs num_eigs >= 1 (the Ritz vectors are its basis)")
        if basis_dtype is None:
            # A basis rounded below the parameters' precision leaks (1 - U^T U ~ its eps) into the
            # complement, which takes the largest rate: keep float64 parameters' basis in float64.
            basis_dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
        if basis_dtype not in (torch.float32, torch.bfloat16, torch.float64):
            raise ValueError(f"basis_dtype must be torch.float32, torch.bfloat16 or torch.float64, got {basis_dtype}")
        if rate_rule not in ("safe", "optimal"):
            raise ValueError(f"rate_rule must be 'safe' or 'optimal', got {rate_rule!r}")
        if stochastic is not None and not isinstance(stochastic, bool):
            raise TypeError(
                f"stochastic must be True, False or None (found out at the second step), got {stochastic!r}")
        self._stochastic_setting = stochastic
        self._noise_reference: tuple[list[torch.Tensor], float] | None = None  # (parameters, loss) of step 0
        self.hessian = hessian
        self.mode = mode
        self.refresh_every = check_count(refresh_every, "refresh_every", 1)
        self.max_refresh_interval = (16 * self.refresh_every if max_refresh_interval is None
                                     else check_count(max_refresh_interval, "max_refresh_interval", self.refresh_every))
        self.gradient_history = bool(gradient_history) and mode == "temporal"
        self.check_every = check_count(check_every, "check_every", 1)
        self.max_backoffs = check_count(max_backoffs, "max_backoffs", 0)
        self.backoff = _positive(backoff, "backoff", upper=1.0)
        if self.backoff >= 1.0:
            raise ValueError(f"backoff must be < 1 (the factor rates shrink by after a violation), got {backoff}")
        self.loss_slack = float(loss_slack)
        if not (math.isfinite(self.loss_slack) and self.loss_slack >= 0.0):
            raise ValueError(f"loss_slack must be a finite number >= 0, got {loss_slack!r}")
        self.max_loss_growth = None if max_loss_growth is None else _positive(max_loss_growth, "max_loss_growth")
        self.lambda_max_margin = float(lambda_max_margin)
        widen_top([ScaleGroup(1.0, 1.0)], self.lambda_max_margin)  # validates the margin
        self.rollback = bool(rollback)
        self.warm_start = bool(warm_start)
        self.basis_dtype = basis_dtype
        if subspace_rates not in ("group", "ritz"):
            raise ValueError(f"subspace_rates must be 'group' or 'ritz', got {subspace_rates!r}")
        self.subspace_rates = subspace_rates
        if acceleration not in ACCELERATIONS:
            raise ValueError(f"acceleration must be one of {ACCELERATIONS}, got {acceleration!r}")
        self.acceleration = acceleration if mode == "subspace" else None
        self.seed = int(seed)
        self._measure_kwargs: _MeasureKwargs = {
            "num_eigs": check_count(num_eigs, "num_eigs", 0),
            "block_size": check_count(block_size, "block_size", 1),
            "lanczos_tol": self._lanczos_tol(lanczos_tol, mode, params[0].dtype),
            # Subspace mode checks the complement of its basis itself (NOTE: [complement curvature]), so
            # Lanczos's own verification would measure the same thing twice.
            "lanczos_verify": mode == "temporal",
            # NOTE: [subspace density]
            # The SLQ density gives the shape of the spectrum below the Ritz values: temporal mode plans its
            # cycle on it, and subspace mode needs it only for group rates; with rates per Ritz value the
            # complement's top (measured directly) is all the base rate needs.
            "density_probes": (check_count(density_probes, "density_probes", 0) if density_probes is not None
                               else 0 if mode == "subspace" and subspace_rates == "ritz" else 2),
            "density_order": check_count(density_order, "density_order", 1),
            "min_gap": min_gap,
            "floor": floor,
            "max_groups": max_groups,
        }
        self._plan_kwargs: _PlanKwargs = {"tol": tol, "strategy": strategy, "rate_rule": rate_rule}
        self.events: list[dict[str, Any]] = []
        self.estimate: CurvatureEstimate | None = None
        self.plan: MultiratePlan | None = None
        self._snapshot: list[torch.Tensor] | None = None
        self._measurements = 0  # measurements so far: each one seeds its probes with seed + this count
        self._groups: list[ScaleGroup] | None = None  # the groups and lambda_max of the latest measurement
        self._lambda_max = 0.0
        self._growth_bound = 0.0
        self._complement_top: float | None = None
        self._complement_vector: torch.Tensor | None = None  # warm start of the next complement run
        self._safe_plan = False  # True while the safe single-rate schedule runs (NOTE: [safety])
        self._estimate_is_current = False  # the estimate was measured at the current parameters
        self._history: tuple[torch.Tensor, torch.Tensor] | None = None  # (params, grad) before a small step
        self.history_max_curvature = 0.0  # largest secant curvature of small steps since the last measurement
        self.basis_rounding_error = 0.0
        self.basis_rounding_margin = BASIS_ROUNDING_MARGIN
        self.max_cycle_length = self.refresh_every if max_cycle_length is None else check_count(
            max_cycle_length, "max_cycle_length", 1)

        estimate, plan = self._measure(params, step=0, reason="start")
        super().__init__(
            params, plan=plan, lr_scale=lr_scale, weight_decay=weight_decay, maximize=maximize,
            foreach=foreach, fused=fused,
        )
        self._initial_lr_scale = float(self.param_groups[0]["lr_scale"])  # validated by MrGD
        self.state[_AUTO_KEY] = {"step": 0, "last_estimate": 0, "since_check": 0, "ref_loss": None,
                                 "best_loss": None, "backoffs": 0, "interval": self.refresh_every,
                                 "remeasure": False, "normal_lr_scale": lr_scale, "safe_entries": 0,
                                 # Every field from the start (a checkpoint template names all of them):
                                 # momentum (NOTE: [accelerated subspace step]), the secant probe (NOTE:
                                 # [secant back-off]) and the loss spread (NOTE: [loss noise]).
                                 "momentum_steps": 0, "previous_loss": None, "probe_slope": None,
                                 "estimate_at_snapshot": False, "loss_noise": 0.0, "loss_floor": 0.0,
                                 "stochastic": stochastic, "interval_sum": 0.0, "interval_sumsq": 0.0,
                                 "interval_count": 0, "best_error": 0.0}
        if self.rollback:
            # The first step is a check point and overwrites it; held from the start so that every state dict
            # has the same entries (a checkpoint template from a fresh optimizer matches a saved one).
            self._snapshot = [p.detach().clone() for p in params]
        if self.acceleration is not None:
            # Held from the start for the same reason: a checkpoint template from a fresh optimizer (what
            # torch.distributed.checkpoint loads into) must name every entry a saved state has.
            for p in params:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        self._install(estimate, plan)

    # ----------------------------------------------------------------------------------------------
    # Measuring and planning

    @staticmethod
    def _lanczos_tol(tol: float | None, mode: str, dtype: torch.dtype) -> float:
        # Group edges (temporal mode) and Ritz rates (subspace mode) are needed to about 1e-2 of each value:
        # the rates carry a margin, and in subspace mode the base rate is capped by the pairs' measured
        # residuals (NOTE: [basis accuracy]), so a looser basis costs speed, never stability.
        if tol is not None:
            return _positive(tol, "lanczos_tol")
        return 1e-2

    @property
    def estimation_hvps(self) -> int:
        return sum(e["num_hvps"] for e in self.events)

    @property
    def estimation_seconds(self) -> float:
        seconds: float = sum(e["seconds"] for e in self.events)
        return seconds

    def _measure(
        self, params: list[torch.Tensor], *, step: int, reason: str
    ) -> tuple[CurvatureEstimate, MultiratePlan]:
        start = None
        if self.warm_start and self.estimate is not None and self.estimate.eigenvectors is not None:
            start = self.estimate.eigenvectors
        t0 = time.perf_counter()
        # The estimate and the complement's top share one gradient graph (NOTE: [shared graph]).
        with as_operator(self.hessian).share_graph():
            estimate = estimate_curvature(
                self.hessian, start=start, seed=self.seed + self._measurements, previous=self.estimate,
                **self._measure_kwargs
            )
            self.history_max_curvature = 0.0
            self._estimate_is_current = True
            plan = self._plan(estimate)
            extra_hvps = 0
            if self.mode == "subspace":
                self._complement_top, extra_hvps = self._measure_complement(estimate)
        if self._groups is not None and 0.0 < self._lambda_max < float(estimate.lambda_max):
            self._recover_scale(float(estimate.lambda_max) / self._lambda_max)
        self.estimate, self.plan = estimate, plan
        self._groups, self._lambda_max = list(estimate.groups), float(estimate.lambda_max)
        self._measurements += 1
        self.events.append({
            "step": step,
            "kind": "estimate" if reason in ("start", "refresh") else "backoff",
            "reason": reason,
            "num_hvps": estimate.num_hvps + extra_hvps,
            "seconds": time.perf_counter() - t0,
            "groups": [[g.a, g.b] for g in estimate.groups],
            "lambda_max": estimate.lambda_max,
            "cycle_length": plan.cycle_length,
            "rates": list(plan.rates),
            "density_reused": estimate.density_reused,
        })
        return estimate, plan

    def _recover_scale(self, growth: float) -> None:
        # NOTE: [scale recovery]
        # A back-off shrinks lr_scale because the rates were too large for the curvature along the path: the
        # measured lambda_max was too small (a saturated start, curvature that grew). A new measurement that
        # finds lambda_max larger by ``growth`` lowers every planned rate by that much itself, so the shrink
        # it explains is undone (up to the constructor's lr_scale, or the safe rate itself): otherwise the two
        # corrections multiply, and a start measured 1e8 times too flat would keep rates 1e8 times too small
        # for good. A shrink the new curvature does not explain stays.
        group = self.param_groups[0]
        auto = self.state[_AUTO_KEY]
        cap = 1.0 if self._safe_plan else self._initial_lr_scale
        group["lr_scale"] = min(max(cap, group["lr_scale"]), group["lr_scale"] * growth)
        if self._safe_plan:
            auto["normal_lr_scale"] = min(max(self._initial_lr_scale, auto["normal_lr_scale"]),
                                          auto["normal_lr_scale"] * growth)

    def _plan(self, estimate: CurvatureEstimate) -> MultiratePlan:
        if self._safe_plan:
            # The safe schedule: one rate 1 / (margin * lambda_max) (NOTE: [safety]).
            top = widen_top(estimate.groups, self.lambda_max_margin)[0].b
            return plan_multirate([ScaleGroup(top, top)], tol=self._plan_kwargs["tol"], strategy="nested",
                                  rate_rule="safe", max_cycle_length=self.max_cycle_length)
        # NOTE: [cycle length]
        # A cycle damps what its large steps amplify only when it completes, and loss checks and
        # re-measurements wait for cycle starts; so no cycle may be longer than max_cycle_length (default
        # refresh_every). When no multirate plan fits, the groups are merged into one interval (a cycle
        # of one rate, or a short Chebyshev cycle): slower, never unchecked.
        try:
            return plan_from_estimate(estimate, lambda_max_margin=self.lambda_max_margin,
                                      max_cycle_length=self.max_cycle_length, **self._plan_kwargs)
        except ValueError:
            groups = widen_top(estimate.groups, self.lambda_max_margin)
            merged = [ScaleGroup(groups[-1].a, groups[0].b)]
            return plan_multirate(merged, max_cycle_length=self.max_cycle_length, **self._plan_kwargs)

    def _measure_complement(self, estimate: CurvatureEstimate) -> tuple[float | None, int]:
        # NOTE: [complement curvature]
        # The largest eigenvalue outside the basis decides the base rate, and it is not known from the
        # groups: the density's nodes just below the Ritz values often fall under its weight floor, so a
        # group "closed" by the smallest Ritz value may continue below it. It is measured instead, by a short
        # Lanczos run on the deflated operator (I - U^T U) H (I - U^T U) (tolerance 1e-2, at most 20 products),
        # and raised by lambda_max_margin plus its residual estimate: Krylov values approach from below.
        # It starts from the previous run's Ritz vector when there is one: the complement's top direction
        # moves little between measurements, so a refresh needs a few products instead of up to 20.
        U = estimate.eigenvectors
        if U is None or U.shape[0] >= U.shape[1]:
            return None, 0
        op = as_operator(self.hessian)

        def deflated(V: torch.Tensor) -> torch.Tensor:
            V = V - (V @ U.T) @ U
            W = op.matmat(V)
            return W - (W @ U.T) @ U

        start = self._complement_vector
        if start is not None and (start.shape[1] != op.n or start.dtype != op.dtype or start.device != op.device):
            start = None
        res = lanczos(deflated, 1, block_size=1, n=op.n, dtype=op.dtype, device=op.device, tol=1e-2,
                      max_iters=min(20, op.n - U.shape[0]), seed=self.seed + self._measurements,
                      recompute_residuals=False, start=start)
        self._complement_vector = res.eigenvectors[:1].detach().clone()
        top = float(res.eigenvalues[0]) * self.lambda_max_margin + float(res.residual_estimates[0])
        return top, res.num_hvps

    def _subspace_arguments(self, estimate: CurvatureEstimate) -> tuple[torch.Tensor, list[float], float]:
        """Basis (top Ritz vectors), their groups' rates and the rate of the rest (NOTE: [subspace rates])."""
        # NOTE: [subspace rates]
        # Each Ritz vector takes the rate of the measured group its Ritz value lies in (top group widened by
        # the margin). The complement of the basis takes the rate of [a_min, top], top = its own largest
        # eigenvalue, measured (NOTE: [complement curvature]); by the safe rule 1/top, a rate far beyond
        # 2/lambda_max when the basis holds the stiff groups.
        rule = self._plan_kwargs["rate_rule"]
        groups = widen_top(estimate.groups, self.lambda_max_margin)
        thetas = [float(t) for t in estimate.eigenvalues]
        rates = []
        for t in thetas:
            g = next((g for g in groups if t >= g.a), groups[-1])
            if self.subspace_rates == "ritz" and t > 0:
                # Its own Ritz value as a one-point group, widened by the margin like lambda_max.
                g = ScaleGroup(t, t * self.lambda_max_margin)
            rates.append(_rate(g, rule))
        # Curvature below floor * lambda_max forms no group (estimate_curvature), so no rate beyond
        # 1 / (floor * lambda_max) is aimed at it, here either.
        lowest = self._measure_kwargs["floor"] * estimate.lambda_max
        positive = [t for t in thetas if t > 0]
        top_rest = max(min(positive), lowest) if positive else groups[-1].b
        if self._complement_top is not None:
            top_rest = max(self._complement_top, lowest)
        low = min(groups[-1].a, top_rest)
        base = _rate(ScaleGroup(low, top_rest), rule)
        assert estimate.eigenvectors is not None  # subspace mode measures num_eigs >= 1 Ritz vectors
        U = _orthonormal_rows(estimate.eigenvectors)
        basis = U.to(self.basis_dtype)
        # NOTE: [basis rounding]
        # A basis stored below the precision it was computed in carries a rounding error E (rows of norm
        # up to eps_b: about 2e-3 for bfloat16, 3e-8 for float32). The step's rate along a stiff direction
        # v_i is then eta_i + O(eta_base * eps_b) instead of eta_i, so its contraction factor is off by about
        # eta_base * lambda_i * eps_b, and the stiff direction diverges once that exceeds its margin
        # (NOTE: [basis accuracy] makes the same argument for the Lanczos error). eps_b is measured here,
        # exactly, and every rate is capped at basis_rounding_margin / (lambda_top * eps_b): a basis in
        # bfloat16 buys a rate ratio of at most ~1/eps_b, however far apart the measured groups are.
        eps_b = float((basis.to(U.dtype) - U).norm(dim=1).max()) if basis.dtype != U.dtype else 0.0
        self.basis_rounding_error = eps_b
        if eps_b > 0.0:
            cap = self.basis_rounding_margin / (groups[0].b * eps_b)
            base = min(base, cap)
            rates = [min(r, cap) for r in rates]
        base = self._residual_cap(estimate, thetas, rates, base)
        # Ritz values at or below zero (negative curvature) get the base rate: no rate is aimed at them.
        rates = [r if t > 0 else base for r, t in zip(rates, thetas)]
        return basis, rates, base

    @staticmethod
    def _residual_cap(estimate: CurvatureEstimate, thetas: list[float], rates: list[float], base: float) -> float:
        # NOTE: [basis accuracy]
        # The subspace step x -= P g is gradient descent in the metric of P = U^T D U + base (I - U^T U)
        # (D: the Ritz rates); it is stable while the preconditioned Hessian P^1/2 H P^1/2 has its top
        # eigenvalue below 2 (4/3 with momentum near 1). In the basis [U; W] (W: the complement) its diagonal
        # blocks are D Theta (Ritz pairs: u_i^T H u_j = theta_i delta_ij) and base W H W^T, both at most
        # 1/lambda_max_margin by construction; its off-diagonal block is base^1/2 R D^1/2, R the residuals
        # H u_i - theta_i u_i (orthogonal to U), of 2-norm at most sqrt(base * sum_i rate_i |r_i|^2). Capping
        # base so that this coupling stays below RESIDUAL_COUPLING = 0.25 keeps the top eigenvalue below
        # 1/1.1 + 0.25 < 4/3 whatever the Lanczos tolerance was: an unconverged pair costs base rate, never
        # stability. (Ritz values <= 0 take the base rate themselves: their terms are base * |r_i|^2.)
        r2 = [float(r) ** 2 for r in estimate.residuals]
        if len(r2) != len(thetas):
            return base
        s_pos = sum(rate * r for rate, r, t in zip(rates, r2, thetas) if t > 0)
        s_neg = sum(r for r, t in zip(r2, thetas) if t <= 0)
        c2 = RESIDUAL_COUPLING ** 2
        if s_pos * base + s_neg * base * base <= c2:
            return base
        if s_neg == 0.0:
            return c2 / s_pos
        # The positive root of s_neg x^2 + s_pos x - c2 = 0 in the form without cancellation: (-b + sqrt(b^2 +
        # 4ac)) / 2a rounds to 0 once s_pos^2 dwarfs 4 s_neg c2 (a base rate of 0 is no rate at all).
        return 2.0 * c2 / (s_pos + math.sqrt(s_pos * s_pos + 4.0 * s_neg * c2))

    def _install(self, estimate: CurvatureEstimate, plan: MultiratePlan) -> None:
        group = self.param_groups[0]
        group["cycle"] = tuple(plan.cycle)
        group["cycle_position"].fill_(0)  # kept a tensor (NOTE: [tensor rate]): a checkpoint's layout never changes
        if self.mode == "subspace" and not self._safe_plan:
            basis, rates, base = self._subspace_arguments(estimate)
            self.set_subspace(basis, rates, base)
        elif self.subspace_enabled:
            self.clear_subspace()
        self._reset_momentum()
        peak = plan.peak_amplification if self.mode == "temporal" or self._safe_plan else 1.0
        self._growth_bound = self.max_loss_growth or min(10.0 * peak * peak, 1e30)

    # ----------------------------------------------------------------------------------------------
    # The accelerated subspace step

    def _reset_momentum(self) -> None:
        """Forget the momentum (a new basis or rates, a rollback, a rise of the loss)."""
        auto = self.state.get(_AUTO_KEY)
        if auto is not None:
            auto["momentum_steps"] = 0
            auto["previous_loss"] = None
        for p in self.param_groups[0]["params"] if self.param_groups else ():
            buf = self.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                buf.zero_()

    def _momentum_active(self) -> bool:
        return bool(self.acceleration is not None and self.subspace_enabled and not self._safe_plan
                    and self.state[_AUTO_KEY].get("momentum_steps", 0) > 1)

    def _accelerated_step(self, loss: float) -> None:
        # NOTE: [accelerated subspace step]
        # The subspace step x -= P g (P: each Ritz vector's rate on its direction, the base rate 1/top on the
        # complement) is gradient descent in the metric of P, where the preconditioned Hessian P^1/2 H P^1/2 has
        # its eigenvalues in (0, ~1]: the stiff groups are resolved, but the complement keeps its own condition
        # number top / lambda_min, and plain steps need ~that many iterations. Nesterov's momentum
        # (Sutskever's form, as torch.optim.SGD(nesterov=True)) needs ~its square root:
        #     v <- mu_k v + P g,   x <- x - P g - mu_k v,   mu_k = k / (k + 3),
        # with the function restart of O'Donoghue and Candes (2015): k and v return to 0 whenever the loss
        # rises, which keeps the accelerated rate without knowing lambda_min and stops momentum from carrying
        # the iterate uphill on nonconvex losses. On a Ritz direction with P H = 1 the look-ahead gradient step
        # is exact, so momentum costs the resolved groups nothing. One extra vector of the parameters' size (the
        # momentum; the step P g is never stored: NOTE: [momentum subspace update]); measured on
        # benchmarks/bench_training.py.
        auto = self.state[_AUTO_KEY]
        group = self.param_groups[0]
        params = group["params"]
        if all(p.grad is None for p in params):
            return
        k = auto.get("momentum_steps", 0)
        if auto.get("stochastic"):
            # Losses of different batches say nothing about momentum's overshoot: a constant coefficient that
            # averages the gradient noise over ~10 steps (NOTE: [stochastic closure]).
            mu = STOCHASTIC_MOMENTUM
        else:
            previous = auto.get("previous_loss")
            if previous is not None and loss > previous:
                self._reset_momentum()
                k = 0
            mu = k / (k + 3.0)
        auto["momentum_steps"] = k + 1
        auto["previous_loss"] = loss
        bufs = []
        for p in params:
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(st["momentum_buffer"])
        with torch.no_grad():
            self._subspace_step(None, momentum=(bufs, mu))  # v = mu v + P g, x = x - P g - mu v

    # ----------------------------------------------------------------------------------------------
    # State
    #
    # NOTE: [AutoMrGD checkpoint]
    # Besides MrGD's state (the cycle and its position, lr_scale, the subspace), a resumed run needs what its
    # decisions read: the counters and losses of the checks, whether the safe schedule runs and the rate rule
    # a back-off left, the growth bound, the complement's curvature, the latest groups and lambda_max, the
    # number of measurements (it seeds the next one) and the rollback point. The scalars travel as
    # param_groups[0]["auto"] (one dict: torch.distributed.checkpoint saves param-group values as they are),
    # the rollback point and the complement run's warm start per parameter (state[i]["rollback_point"],
    # state[i]["complement_vector"]: the complement run stops at 1e-2, so its start shows in the base rate), as
    # MrGD's subspace does (NOTE:
    # [per-parameter checkpoint form]). Not saved: the last estimate's Ritz vectors and density, which only
    # warm-start and shortcut the next measurement (a resumed run's next measurement starts from the
    # estimate its constructor made and agrees with the uninterrupted one to the Lanczos tolerance), the
    # one-step gradient history (the secant watch restarts at the next small step), ``plan`` and ``events``
    # (the cycle itself is restored; the events are a log of this process).

    def state_dict(self) -> dict[str, Any]:
        """MrGD's state dict plus what AutoMrGD's decisions read (NOTE: [AutoMrGD checkpoint])."""
        state_dict = super().state_dict()
        state = dict(state_dict["state"])
        auto = dict(state.pop(_AUTO_KEY))
        auto.update({
            "measurements": self._measurements, "safe_plan": self._safe_plan,
            "rate_rule": self._plan_kwargs["rate_rule"], "strategy": self._plan_kwargs["strategy"],
            "growth_bound": self._growth_bound, "complement_top": self._complement_top,
            "groups": [[g.a, g.b] for g in self._groups or []], "lambda_max": self._lambda_max,
        })
        group = state_dict["param_groups"][0]
        group[_STATE_GROUP_KEY] = auto
        if self._snapshot is not None:
            for key, snap in zip(group["params"], self._snapshot):
                state[key] = {**state.get(key, {}), _ROLLBACK: snap.clone()}
        vec = self._complement_vector
        params = self.param_groups[0]["params"]
        if vec is not None and vec.shape[1] == sum(p.numel() for p in params):
            # The complement run's warm start, per parameter like the rollback point: a resumed run's next
            # complement measurement then starts where the uninterrupted one would (it stops at 1e-2, so its
            # start shows in the base rate).
            offset = 0
            for key, p in zip(group["params"], params):
                part = vec[0, offset:offset + p.numel()].reshape(p.shape).clone()
                state[key] = {**state.get(key, {}), _COMPLEMENT: part}
                offset += p.numel()
        state_dict["state"] = state
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict` after checking all of it; the optimizer is unchanged when it
        raises (TypeError/ValueError/KeyError naming the field). A resumed run takes the uninterrupted run's
        decisions (NOTE: [AutoMrGD checkpoint])."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), (list, tuple)) \
                or not state_dict["param_groups"] or not isinstance(state_dict.get("state"), dict):
            raise TypeError("state_dict must be a dict with 'state' and 'param_groups' (from AutoMrGD.state_dict())")
        group = state_dict["param_groups"][0]
        state = dict(state_dict["state"])
        if isinstance(group, dict) and _STATE_GROUP_KEY in group:
            auto = group[_STATE_GROUP_KEY]
            name = f"state_dict['param_groups'][0][{_STATE_GROUP_KEY!r}]"
            groups = [{k: v for k, v in group.items() if k != _STATE_GROUP_KEY}, *state_dict["param_groups"][1:]]
        elif _AUTO_KEY in state:  # the in-memory form, as written before the param-group form
            auto = state.pop(_AUTO_KEY)
            name = f"state_dict['state'][{_AUTO_KEY!r}]"
            groups = list(state_dict["param_groups"])
        else:
            raise KeyError(f"state_dict has no AutoMrGD state (param_groups[0][{_STATE_GROUP_KEY!r}])")
        auto = _check_auto_state(auto, name)
        params = self.param_groups[0]["params"]
        keys = group.get("params", []) if isinstance(group, dict) else []
        snapshot = _pop_per_parameter(state, list(keys), params, _ROLLBACK)
        complement = _pop_per_parameter(state, list(keys), params, _COMPLEMENT, param_dtype=False)
        super().load_state_dict({**state_dict, "state": state, "param_groups": groups})
        # Checked above: nothing below can fail.
        extras = {k: auto.pop(k) for k in _AUTO_EXTRAS if k in auto}
        self.state[_AUTO_KEY] = auto
        if snapshot is not None:
            self._snapshot = snapshot
        if complement is not None:
            self._complement_vector = torch.cat([c.reshape(-1) for c in complement])[None]
        if extras:
            self._measurements = extras["measurements"]
            self._safe_plan = extras["safe_plan"]
            self._plan_kwargs["rate_rule"] = extras["rate_rule"]
            self._plan_kwargs["strategy"] = extras["strategy"]
            self._growth_bound = extras["growth_bound"]
            self._complement_top = extras["complement_top"]
            self._groups = [ScaleGroup(a, b) for a, b in extras["groups"]] or None
            self._lambda_max = extras["lambda_max"]
        self._history = None
        self._noise_reference = None  # an undecided resumed run keeps a new reference at its next step

    # ----------------------------------------------------------------------------------------------
    # Stepping with the safety checks

    def _at_check_point(self) -> bool:
        auto = self.state[_AUTO_KEY]
        at_cycle_start = self.param_groups[0]["cycle_position"] == 0
        if auto.get("stochastic"):
            # An interval mean needs several batches: every check_every steps, at a cycle start when a cycle
            # is being judged (NOTE: [stochastic closure]).
            due = auto["since_check"] >= self.check_every or auto["ref_loss"] is None
            return bool(due and (at_cycle_start or not (self.mode == "temporal" or self._safe_plan)))
        if self.mode == "temporal" or self._safe_plan:
            return bool(at_cycle_start)
        return auto["since_check"] >= self.check_every or auto["ref_loss"] is None

    def _violation(self, loss: float, check_point: bool) -> str | None:
        ref = self.state[_AUTO_KEY]["ref_loss"]
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if ref is None:
            return None
        # A loss near zero has no meaningful relative increase; the absolute floor avoids false alarms there
        # (NOTE: [loss floor]).
        floor = max(self.state[_AUTO_KEY].get("loss_floor", 0.0), 1e-12)
        allowance = abs(ref) * self.loss_slack + floor
        # Check points compare with the lowest check-point loss so far, not the previous one: against the
        # previous one a loss could creep up by loss_slack per interval forever without a violation.
        best = self.state[_AUTO_KEY].get("best_loss")
        best = ref if best is None else best
        slack = self.loss_slack + 2.0 * self.state[_AUTO_KEY].get("loss_noise", 0.0)  # NOTE: [loss noise]
        if check_point and loss > best + abs(best) * slack + floor:
            if best < ref:
                return f"the loss rose to {loss:.6g}, above the lowest check-point loss {best:.6g}"
            return f"the loss rose from {ref:.6g} to {loss:.6g} over one check interval"
        if loss > abs(ref) * self._growth_bound + allowance:
            return f"the loss grew from {ref:.6g} to {loss:.6g}, beyond {self._growth_bound:.3g}x"
        return None

    def _interval_statistics(self) -> tuple[int, float, float]:
        """(count, mean, standard error of the mean) of the closure's losses since the last check point."""
        auto = self.state[_AUTO_KEY]
        count = int(auto.get("interval_count", 0))
        if count == 0:
            return 0, 0.0, 0.0
        mean = float(auto["interval_sum"]) / count
        if count < 2:
            return count, mean, 0.0
        variance = max(0.0, (float(auto["interval_sumsq"]) - count * mean * mean) / (count - 1))
        return count, mean, math.sqrt(variance / count)

    def _stochastic_violation(self, loss: float, check_point: bool) -> str | None:
        """The check of a stochastic closure: interval means, not single batches (NOTE: [stochastic closure])."""
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        auto = self.state[_AUTO_KEY]
        best = auto.get("best_loss")
        floor = max(auto.get("loss_floor", 0.0), 1e-12)
        ref = auto.get("ref_loss")
        if ref is not None and loss > abs(ref) * self._growth_bound + abs(ref) * self.loss_slack + floor:
            # A blow-up shows in single batches long before an interval mean: one batch beyond the growth
            # bound times the last accepted interval mean.
            return f"the loss grew from {ref:.6g} (interval mean) to {loss:.6g}, beyond {self._growth_bound:.3g}x"
        count, mean, _ = self._interval_statistics()
        if not check_point or best is None or count < 2:
            return None
        # The spread is the accepted lowest interval's: a diverging interval's own spread grows with its mean
        # and would hide the rise it should reveal.
        noise = _STOCHASTIC_SIGMAS * math.sqrt(2.0) * float(auto.get("best_error", 0.0))
        if mean > best + abs(best) * self.loss_slack + floor + noise:
            return (f"the mean loss of the last {count} steps rose to {mean:.6g}, above the lowest interval mean "
                    f"{best:.6g} by more than loss_slack and {_STOCHASTIC_SIGMAS:g} standard errors ({noise:.3g})")
        return None

    def _close_interval(self, loss: float, violated: bool) -> None:
        """Check-point bookkeeping of a stochastic closure: the interval mean becomes the reference (the lowest
        one the best) unless the interval was rejected; the next interval starts empty."""
        auto = self.state[_AUTO_KEY]
        count, mean, error = self._interval_statistics()
        if not violated and count >= 2:
            auto["ref_loss"] = mean
            best = auto.get("best_loss")
            if best is None or mean < best:
                auto["best_loss"], auto["best_error"] = mean, error
        elif auto["ref_loss"] is None:
            auto["ref_loss"] = loss  # the first check point: no interval yet
        auto["interval_sum"], auto["interval_sumsq"], auto["interval_count"] = 0.0, 0.0, 0

    def _detect_noise(self, closure: Callable[[], Any]) -> None:
        """Evaluate this step's closure at the previous step's parameters: a different loss there marks a
        stochastic closure (NOTE: [stochastic closure])."""
        auto = self.state[_AUTO_KEY]
        assert self._noise_reference is not None
        previous_params, previous_loss = self._noise_reference
        self._noise_reference = None
        params = self.param_groups[0]["params"]
        with torch.no_grad():
            current = [p.detach().clone() for p in params]
            for p, q in zip(params, previous_params):
                p.copy_(q)
        try:
            with torch.enable_grad():
                again = _as_float(closure())
        finally:
            with torch.no_grad():
                for p, q in zip(params, current):
                    p.copy_(q)
            for p in params:
                # The step's gradients are the next evaluation's alone, also for a closure that does not zero
                # them itself (a loop that calls zero_grad() before step()).
                p.grad = None
        resolution = _STOCHASTIC_RESOLUTION * auto.get("loss_floor", 0.0)
        stochastic = math.isfinite(again) and math.isfinite(previous_loss) and abs(again - previous_loss) > resolution
        auto["stochastic"] = bool(stochastic)
        if stochastic:
            # The checks so far judged single losses: start the interval statistics at the previous step.
            auto["best_loss"], auto["best_error"] = None, 0.0
            auto["interval_sum"], auto["interval_sumsq"] = previous_loss, previous_loss * previous_loss
            auto["interval_count"] = 1

    @property
    def stochastic(self) -> bool | None:
        """Whether the closure is treated as stochastic (None before the second step; NOTE: [stochastic closure])."""
        value = self.state[_AUTO_KEY].get("stochastic")
        return None if value is None else bool(value)

    def _loss_floor(self, loss: Any) -> float:
        # NOTE: [loss floor]
        # A loss computed in a dtype with unit roundoff eps from terms of the size of its initial value carries
        # rounding errors of about eps |L_0| whatever its own value: a float32 cross-entropy that has fallen
        # to 1e-8 (log(1 + tiny) rounds to 0 or to a multiple of 1.2e-7 per sample) moves by 1e-9..1e-8 from
        # step to step with no change of the true loss. Without a floor those movements count as rises at the
        # check points: every one rolls back and re-measures the curvature (tens of HVPs) for nothing. So
        # the checks allow an absolute eps(dtype) |L_0| beyond their relative slack, eps of the loss tensor's
        # dtype (of the parameters' for a Python float): 2.7e-7 for a float32 loss starting at 2.3, 5e-16 for
        # a float64 one -- a loss judged to within a relative 1e-7 (float32) of where it began.
        if isinstance(loss, torch.Tensor) and loss.is_floating_point():
            dtype = loss.dtype
        else:
            dtype = self.param_groups[0]["params"][0].dtype
        value = abs(_as_float(loss))
        return torch.finfo(dtype).eps * value if math.isfinite(value) else 0.0

    def _slope_from_snapshot(self) -> float | None:
        """g0^T d of the step just taken from the check point (g0: its gradient; NOTE: [secant back-off])."""
        if not self.rollback or self._snapshot is None:
            return None
        with torch.no_grad():
            slope = sum(float(torch.sum((p.detach() - s) * p.grad)) for p, s in zip(self.param_groups[0]["params"],
                                                                              self._snapshot) if p.grad is not None)
        return float(slope)

    def _secant_factor(self, loss: float) -> float:
        """How much to shrink the rates after a violation (NOTE: [secant back-off])."""
        # NOTE: [secant back-off]
        # When the violation comes one step after the check point x0, that step d = x1 - x0 and the two losses
        # give the curvature along it: on the model f(x0 + t d) = f0 + t s + t^2 C / 2 (s = g0^T d, recorded
        # at the step) the value f1 at t = 1 fixes C = 2 (f1 - f0 - s), exact on a quadratic, and the model's
        # minimiser t* = -s / C is the factor the step should have had. Shrinking by min(backoff, t*) instead of
        # halving alone saves the ~log2(1/t*) rejected steps of repeated halvings when the curvature along the
        # path is orders of magnitude above the measured one (raw-feature logistic regression leaving its
        # saturated start, say).
        #
        # A loss that grows only linearly along the step (logistic or softmax regression whose margins the step
        # flips: f ~ K t for large t) fools the quadratic model: t* then shrinks by about the same factor at
        # every retry, and a start whose measured curvature is 1e8 times too small takes a dozen rejected
        # steps. So when the loss blew up (beyond the growth bound) again right after a back-off -- the
        # quadratic model failed once -- the factor is also capped by the chord: along a line where f is
        # convex, f(t) <= f0 + t (f1 - f0), so at t_c = f0 / (f1 - f0) the loss at most doubles, one retry
        # below the growth bound however far the step overshot. Not at the first blow-up: on a quadratic
        # t* is exact and t_c can be orders of magnitude smaller.
        auto = self.state[_AUTO_KEY]
        slope, f0 = auto.get("probe_slope"), auto.get("ref_loss")
        if (not self.rollback or self._snapshot is None or auto["since_check"] != 1 or slope is None or f0 is None
                or not slope < 0.0 or not math.isfinite(loss)):
            return self.backoff
        factor = self.backoff
        curvature = 2.0 * (float(loss) - float(f0) - float(slope))
        if curvature > 0.0:
            factor = min(factor, -float(slope) / curvature)
        if auto["backoffs"] >= 2 and f0 > 0.0 and loss > abs(f0) * self._growth_bound:
            factor = min(factor, float(f0) / (float(loss) - float(f0)))
        return max(factor, _SAFE_SCALE_LIMIT)

    def _back_off(self, reason: str, closure: Callable[[], Any], loss: float) -> Any:
        auto = self.state[_AUTO_KEY]
        auto["backoffs"] += 1
        group = self.param_groups[0]
        params = group["params"]
        # One batch's loss after one step carries no secant information on a stochastic closure.
        factor = self.backoff if auto.get("stochastic") else self._secant_factor(loss)
        if self.rollback and self._snapshot is not None:
            with torch.no_grad():
                for p, s in zip(params, self._snapshot):
                    p.copy_(s)
        auto["interval"] = self.refresh_every
        self._history = None
        self._reset_momentum()
        if self._safe_plan:
            # Already on the safe schedule: its rate came from a lambda_max that no longer holds; halve it.
            if group["lr_scale"] < _SAFE_SCALE_LIMIT:
                restored = " (parameters restored to the last check point)" if self.rollback else ""
                raise RuntimeError(
                    f"AutoMrGD: {reason} at step {auto['step']}, even at {group['lr_scale']:.3g} times the safe rate "
                    f"1/lambda_max{restored}: the closure's loss does not decrease along its own gradient (is the "
                    "closure computing the loss and its gradient at the current parameters?)"
                )
            group["lr_scale"] *= factor
            what = f"safe rate 1/lambda_max x {group['lr_scale']:.3g}"
        elif auto["backoffs"] > self.max_backoffs:
            self._safe_plan = True
            auto["normal_lr_scale"] = group["lr_scale"]
            group["lr_scale"] = 1.0
            # Each failed return to the multirate plan doubles the time on the safe schedule.
            auto["safe_entries"] += 1
            auto["interval"] = min(self.refresh_every * 2 ** (auto["safe_entries"] - 1), self.max_refresh_interval)
            what = "safe rate 1/lambda_max until the next refresh"
        else:
            group["lr_scale"] *= factor
            self._plan_kwargs["rate_rule"] = "safe"
            if self._plan_kwargs["strategy"] != "nested":
                self._plan_kwargs["strategy"] = "nested"  # the safe rule is a single-rate (nested) rule
            what = f"lr_scale now {group['lr_scale']:.3g} with safe rates"
        if auto.get("stochastic") and auto["backoffs"] > self.max_backoffs:
            # Interval means judge a path, not its end point: an accepted interval may end where the loss has
            # already risen, and every interval from that restored point then compares with a best it cannot
            # reach -- back-offs without end (NOTE: [stochastic closure]). With the rates at the safe schedule,
            # the restored point's own intervals set the reference again.
            auto["best_loss"], auto["best_error"] = None, 0.0
        at_snapshot = self.rollback and self._snapshot is not None and auto.get("estimate_at_snapshot")
        if at_snapshot and self.estimate is not None:
            # Restored to the point the current estimate was measured at: measuring again would return the
            # same groups, so only the plan changes (no HVPs spent).
            estimate, plan = self.estimate, self._plan(self.estimate)
            self.events.append({
                "step": auto["step"], "kind": "backoff", "reason": reason, "num_hvps": 0, "seconds": 0.0,
                "groups": [[g.a, g.b] for g in estimate.groups], "lambda_max": estimate.lambda_max,
                "cycle_length": plan.cycle_length, "rates": list(plan.rates), "density_reused": True,
            })
            self.plan = plan
            measured = "curvature kept (measured at that point)"
            if factor < self.backoff:
                # The step's own secant saw curvature the estimate does not hold (NOTE: [secant back-off]): it
                # lies along the path, not at the check point, so measure again at the next check point passed.
                auto["remeasure"] = True
        else:
            estimate, plan = self._measure(params, step=auto["step"], reason=reason)
            auto["last_estimate"] = auto["step"]
            measured = "curvature re-measured"
        self._install(estimate, plan)
        self._estimate_is_current = True
        warnings.warn(
            f"AutoMrGD: {reason} at step {auto['step']}; "
            + ("parameters restored to the last check point, " if self.rollback else "")
            + f"{measured}, {what}",
            RuntimeWarning,
            stacklevel=3,
        )
        with torch.enable_grad():
            restored = closure()
        if not auto.get("stochastic"):
            self._learn_loss_noise(restored)  # a stochastic closure's checks carry their own spread
        return restored

    def _learn_loss_noise(self, restored: Any) -> None:
        # NOTE: [loss noise]
        # After a rollback the closure is evaluated again at the parameters of the check point whose loss is
        # ref_loss. A deterministic closure returns the same value; a minibatch closure returns another batch's
        # loss, and the relative difference is a sample of the batch-to-batch spread. Check points then allow
        # loss_slack plus twice the largest spread seen (loss_noise): otherwise a minibatch loss above the best
        # one seen so far would count as a rise forever, and the rates would shrink to nothing.
        auto = self.state[_AUTO_KEY]
        ref = auto.get("ref_loss")
        value = _as_float(restored)
        if not self.rollback or ref is None or ref == 0.0 or not math.isfinite(value):
            return
        spread = abs(value - ref) / abs(ref)
        if spread > auto.get("loss_noise", 0.0):
            auto["loss_noise"] = spread

    def _refresh(self, params: list[torch.Tensor]) -> None:
        """Re-measure at a check point; lengthen the interval when the groups did not move."""
        auto = self.state[_AUTO_KEY]
        old = self._groups
        if self._safe_plan:  # try the multirate plan again (NOTE: [safety])
            self._safe_plan = False
            self.param_groups[0]["lr_scale"] = auto["normal_lr_scale"]
        old_top = self._lambda_max
        estimate, plan = self._measure(params, step=auto["step"], reason="refresh")
        new_top = float(estimate.lambda_max)
        if auto.get("stochastic") and 0.0 < new_top and old_top > _STOCHASTIC_RATE_GROWTH * new_top:
            # A stochastic closure's rates grow by at most _STOCHASTIC_RATE_GROWTH per refresh (NOTE: [stochastic
            # closure]); a later measurement that finds lambda_max grown again gives the shrink back (NOTE:
            # [scale recovery]).
            self.param_groups[0]["lr_scale"] *= _STOCHASTIC_RATE_GROWTH * new_top / old_top
        self._install(estimate, plan)
        auto["last_estimate"] = auto["step"]
        same = old is not None and len(old) == len(estimate.groups) and all(
            max(g.a / h.a, h.a / g.a, g.b / h.b, h.b / g.b) <= _SAME_GROUPS for g, h in zip(old, estimate.groups))
        auto["interval"] = min(2 * auto["interval"], self.max_refresh_interval) if same else self.refresh_every
        auto["remeasure"] = False

    def _watch_history(self) -> None:
        """Secant curvature of the step just taken, if it was a small one (NOTE: [estimation cost])."""
        group = self.param_groups[0]
        params = group["params"]
        if self._history is not None:
            x_prev, g_prev = self._history
            self._history = None
            x = torch.cat([p.detach().reshape(-1) for p in params])
            g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
                           for p in params])
            s = x - x_prev
            ss = float(torch.dot(s, s))
            if ss > 0.0:
                curvature = float(torch.dot(s, g - g_prev)) / ss
                if group["maximize"]:
                    curvature = -curvature
                self.history_max_curvature = max(self.history_max_curvature, curvature)
                if self._groups is not None and curvature > self.lambda_max_margin * self._lambda_max:
                    self.state[_AUTO_KEY]["remeasure"] = True
        lr = group["lr_scale"] * group["cycle"][group["cycle_position"]]
        if self._groups is not None and lr * self._lambda_max <= 1.0 + 1e-12:
            self._history = (torch.cat([p.detach().reshape(-1) for p in params]),
                             torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
                                        for p in params]))

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Evaluate ``closure`` (loss + gradients), check the loss (NOTE: [safety]), take one MrGD step.

        Returns the closure's loss at the parameters the step was taken from."""
        if closure is None:
            raise ValueError("AutoMrGD.step needs a closure that computes the loss and its gradients (NOTE: [safety])")
        auto = self.state[_AUTO_KEY]
        closure = global_closure(closure, self.hessian)  # DistributedOperator probe: the ranks' mean loss
        if auto.get("stochastic") is None and self._stochastic_setting is not None:
            auto["stochastic"] = self._stochastic_setting
        if auto.get("stochastic") is None and self._noise_reference is not None:
            self._detect_noise(closure)
        with torch.enable_grad():
            loss = closure()
        if auto["step"] == 0:
            auto["loss_floor"] = self._loss_floor(loss)
        if auto.get("stochastic") is None:
            # Undecided (the first step): keep where this step starts, so that the next step's closure can be
            # evaluated here as well (NOTE: [stochastic closure]).
            self._noise_reference = ([p.detach().clone() for p in self.param_groups[0]["params"]], _as_float(loss))
        stochastic = bool(auto.get("stochastic"))
        check_point = self._at_check_point()
        if stochastic:
            reason = self._stochastic_violation(_as_float(loss), check_point)
        else:
            reason = self._violation(_as_float(loss), check_point)
        if reason is not None and not stochastic and check_point and self._momentum_active() and self._violation(
                _as_float(loss), False) is None:
            # A rise at a check point while momentum is on may be momentum's own overshoot, which the restart
            # removes (NOTE: [accelerated subspace step]): restart, and judge the loss after one plain step
            # (since_check stays past check_every, so the next step is a check point again).
            self._reset_momentum()
            reason, check_point = None, False
        if reason is not None:
            loss = self._back_off(reason, closure, _as_float(loss))
            check_point = True
            if not math.isfinite(_as_float(loss)):
                raise RuntimeError(f"AutoMrGD: the loss is {_as_float(loss)} at the restored parameters")
        elif check_point and auto["ref_loss"] is not None:
            auto["backoffs"] = 0
            group = self.param_groups[0]
            if self._safe_plan and group["lr_scale"] < 1.0:
                # The safe schedule checks every step, so a halving that proved too much is undone step by step
                # (a failed doubling costs one step), never beyond the safe rate itself (NOTE: [safety]).
                group["lr_scale"] = min(1.0, 2.0 * group["lr_scale"])
        if check_point:
            due = auto["step"] - auto["last_estimate"] >= auto["interval"] or auto["remeasure"]
            if reason is None and due and not auto["remeasure"] and abs(_as_float(loss)) <= auto.get("loss_floor", 0.0):
                # NOTE: [loss floor]: a loss below its rounding floor shows no progress that new rates could
                # improve or that a check could judge; the refresh waits (interval doubled) instead of spending
                # tens of products on a converged run.
                auto["last_estimate"] = auto["step"]
                auto["interval"] = min(2 * auto["interval"], self.max_refresh_interval)
            elif reason is None and due:
                self._refresh(self.param_groups[0]["params"])
            if self.rollback:
                params = self.param_groups[0]["params"]
                auto["estimate_at_snapshot"] = self._estimate_is_current
                assert self._snapshot is not None  # taken at construction
                with torch.no_grad():
                    for s, p in zip(self._snapshot, params):
                        s.copy_(p)
            if stochastic:
                self._close_interval(_as_float(loss), violated=reason is not None)
            else:
                auto["ref_loss"] = _as_float(loss)
                best = auto.get("best_loss")
                auto["best_loss"] = auto["ref_loss"] if best is None else min(best, auto["ref_loss"])
            auto["since_check"] = 0
        if stochastic:
            value = _as_float(loss)
            auto["interval_sum"] += value
            auto["interval_sumsq"] += value * value
            auto["interval_count"] += 1
        if self.gradient_history and not stochastic:  # minibatch gradient differences are mostly noise
            self._watch_history()
        if self.acceleration is not None and self.subspace_enabled and not self._safe_plan:
            self._accelerated_step(_as_float(loss))
        else:
            super().step()
        self._estimate_is_current = False
        if check_point:
            auto["probe_slope"] = self._slope_from_snapshot()
        auto["step"] += 1
        auto["since_check"] += 1
        return loss
