"""MrGD: multirate gradient descent as a torch optimizer, and MultirateLR for any torch optimizer.

Temporal form: the optimizer walks a plan's cycle of learning rates (small steps first, the large step
last; see :mod:`mrgd_ext.planning.plan`), one rate per step. Subspace (spatial) form: given an orthonormal basis
of eigenvectors of the top eigen-groups, every group takes its own rate at every step,

    p <- p - eta_base * g - U ((eta_col - eta_base) .* U^T g),

evaluated by two fused passes over all parameters (see csrc/ and DESIGN section 1.4).

Reference: J. He, L. Liu, Y.-H. R. Tsai, "Data-induced multiscale losses and efficient multirate gradient
descent schemes", arXiv:2402.03021.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.optimizer import ParamsT

from mrgd_ext._validation import (
    KERNEL_PARAM_DTYPES,
    check_amp_flags,
    check_basis,
    check_float_dtype,
    check_int,
    check_non_negative,
    check_optional_bool,
    check_orthonormal_rows,
    check_param_grad_lists,
    check_positive_rate,
)
from mrgd_ext.ops import reference as _reference
from mrgd_ext.ops import step_ops as _ops
from mrgd_ext.optim import _checkpoint, _dtensor

__all__ = ["MrGD", "MultirateLR", "mrgd", "cycle_of"]

_SUBSPACE_KEY = "multirate_subspace"


def cycle_of(plan: Any, name: str = "plan") -> tuple[float, ...]:
    """The cycle of learning rates of a :class:`~mrgd_ext.planning.plan.MultiratePlan` or a sequence of rates."""
    cycle = getattr(plan, "cycle", plan)
    if isinstance(cycle, (str, bytes)) or not isinstance(cycle, Iterable):
        raise TypeError(f"{name} must be a MultiratePlan or a sequence of learning rates, got {type(plan).__name__}")
    rates = tuple(float(r) for r in cycle)
    if not rates:
        raise ValueError(f"{name} has an empty cycle of learning rates")
    for i, r in enumerate(rates):
        if not math.isfinite(r) or r <= 0.0:
            raise ValueError(f"{name}: learning rate {i} of the cycle must be finite and > 0, got {r}")
    return rates


# (device, dtype) -> (parameters, gradients) of that device and dtype.
_Buckets = dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]]


def _group_by_device_and_dtype(params: list[torch.Tensor], grads: list[torch.Tensor]) -> _Buckets:
    buckets: _Buckets = {}
    for p, g in zip(*_dtensor.local_pairs(params, grads)):  # DTensors: their local shards (NOTE: [local shards])
        ps, gs = buckets.setdefault((p.device, p.dtype), ([], []))
        ps.append(p)
        gs.append(g)
    return buckets


# NOTE: [dispatch choice under torch.compile]
# Whether this build has kernels for a device cannot change while the process runs, but the dispatcher query
# behind it is opaque to Dynamo. Marking it constant lets a compiled step evaluate it once at trace time
# instead of breaking the graph there.
@torch.compiler.assume_constant_result  # type: ignore[untyped-decorator]  # torch leaves it unannotated
def _kernels_for(device_type: str) -> bool:
    return _ops.has_kernel(device_type)


def _fused_supported(params: Sequence[torch.Tensor]) -> bool:
    return all(p.dtype in KERNEL_PARAM_DTYPES and p.is_contiguous() and _kernels_for(p.device.type) for p in params)


def _check_flags_and_kernels(
    buckets: _Buckets, fused: bool | None, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None
) -> None:
    for (device, _), _lists in buckets.items():
        check_amp_flags(grad_scale, found_inf, device)
        if fused and not _kernels_for(device.type):
            raise RuntimeError(f"fused=True but this build of mrgd_ext has no kernel for device {device}")


def _apply_buckets(
    buckets: _Buckets, lr: float | torch.Tensor, weight_decay: float, maximize: bool, foreach: bool | None,
    fused: bool | None, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
) -> None:
    """One temporal step on already validated (device, dtype) buckets.

    ``lr`` is a Python float, or a 0-d tensor in a compiled step (NOTE: [tensor rate]), which always takes
    the multi-tensor path."""
    for (ps, gs) in buckets.values():
        if isinstance(lr, torch.Tensor):
            _foreach_multirate_step(ps, gs, lr, weight_decay, maximize, grad_scale, found_inf)
            continue
        use_fused = fused if fused is not None else (not foreach and _fused_supported(ps))
        if use_fused:
            torch.ops.mrgd_ext.multirate_step_(ps, gs, lr, weight_decay, maximize, grad_scale, found_inf)
        elif foreach or foreach is None:
            _foreach_multirate_step(ps, gs, lr, weight_decay, maximize, grad_scale, found_inf)
        else:
            _reference.multirate_step(
                ps, gs, lr, weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf
            )


def mrgd(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    lr: float,
    *,
    weight_decay: float = 0.0,
    maximize: bool = False,
    foreach: bool | None = None,
    fused: bool | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """Functional form of one MrGD (temporal) step at rate ``lr``: ``p -= lr * (g + weight_decay * p)``.

    ``fused=True`` runs the mrgd_ext kernel (one call per (device, dtype) bucket), ``foreach=True`` torch's
    multi-tensor ops in the storage precision (as torch.optim.SGD does), and both False the single-tensor
    reference. ``None`` for both picks the kernel when it supports every tensor and ``foreach`` otherwise.
    """
    if fused and foreach:
        raise RuntimeError("fused and foreach cannot both be True")
    check_optional_bool(foreach, "foreach")
    check_optional_bool(fused, "fused")
    lr = check_positive_rate(lr, "lr")
    weight_decay = check_non_negative(weight_decay, "weight_decay")
    if len(params) != len(grads):
        raise ValueError(f"params and grads must have the same length, got {len(params)} and {len(grads)}")
    for i, (p, g) in enumerate(zip(params, grads)):
        if not isinstance(p, torch.Tensor) or not isinstance(g, torch.Tensor):
            raise TypeError(f"params[{i}] and grads[{i}] must be tensors")
    # Validate everything first so a rejected call leaves every parameter untouched. Buckets are keyed by
    # the parameters' (device, dtype); the full check then also catches gradients that do not match.
    buckets = _group_by_device_and_dtype(params, grads)
    for ps, gs in buckets.values():
        check_param_grad_lists(ps, gs, require_contiguous=bool(fused))
    _check_flags_and_kernels(buckets, fused, grad_scale, found_inf)
    _apply_buckets(buckets, lr, weight_decay, maximize, foreach, fused, grad_scale, found_inf)


def _foreach_multirate_step(
    params: list[torch.Tensor], grads: list[torch.Tensor] | tuple[torch.Tensor, ...], lr: float | torch.Tensor,
    weight_decay: float, maximize: bool, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
) -> None:
    """``p -= lr * (g * sign / scale + weight_decay * p)`` with torch's multi-tensor ops; ``lr`` a float or a
    0-d tensor."""
    if found_inf is not None and found_inf.item() != 0:
        return
    if grad_scale is not None:
        grads = torch._foreach_div(grads, grad_scale.reshape(()))  # GradScaler's scale has shape [1]
    if isinstance(lr, torch.Tensor) or weight_decay != 0.0:
        # geff = g + wd * p; the sign of maximize applies to g only.
        grads = torch._foreach_neg(grads) if maximize else grads
        if weight_decay != 0.0:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        if isinstance(lr, torch.Tensor):
            torch._foreach_sub_(params, torch._foreach_mul(grads, lr))
        else:
            torch._foreach_add_(params, grads, alpha=-lr)
    else:
        torch._foreach_add_(params, grads, alpha=lr if maximize else -lr)


def _param_name(gi: int, pi: int) -> str:
    return f"param_groups[{gi}]['params'][{pi}]"


def _check_lr(lr: Any, name: str, *, values: bool = True) -> None:
    """The scheduler-driven multiplier: a finite number >= 0 (0 is a warm-up's first value), or a one-element
    floating tensor (torch.optim's convention for compiled steps; its value is checked only when ``values``)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"{name} must be a float or a one-element floating tensor, "
                             f"got {lr.dtype} {tuple(lr.shape)}")
        if not values:
            return
        lr = lr.item()
    if isinstance(lr, bool):
        raise TypeError(f"{name} must be a number, got bool")
    check_non_negative(lr, name)


def _check_position(pos: Any, n: int, name: str) -> int:
    if isinstance(pos, torch.Tensor):
        if pos.numel() != 1 or pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer or a one-element integer tensor, got {pos.dtype}")
        pos = pos.item()
    return check_int(pos, name, 0, n - 1)


def _check_subspace_state(sub: Any, params: list[torch.Tensor], name: str, *, values: bool = True,
                          field_names: dict[str, str] | None = None) -> None:
    """The subspace entry of the state (basis, column_rates, base_lr) against the current parameters (their
    local shards for DTensors). ``values``: also the rates' finiteness (a pass over the data: on loading, not
    before every step, where the entry is the one set_subspace checked; the basis's orthonormality is checked
    by the caller, over all ranks when the basis is sharded). ``field_names``: how to name each field in
    messages (default ``name['field']``)."""
    if not isinstance(sub, dict):
        raise TypeError(f"{name} must be a dict, got {type(sub).__name__}")
    names = {key: f"{name}[{key!r}]" for key in ("basis", "column_rates", "base_lr")}
    names.update(field_names or {})
    for key in names:
        if key not in sub:
            raise KeyError(f"{name} has no {key!r}")
    basis = sub["basis"]
    if not isinstance(basis, torch.Tensor):
        raise TypeError(f"{names['basis']} must be a tensor of shape [r, n_total], got {type(basis).__name__}")
    if not params:
        raise ValueError(f"{name}: the subspace mode needs one param group with parameters")
    check_basis(basis, sum(_dtensor.local(p).numel() for p in params), basis.device, name=names["basis"])
    rates = sub["column_rates"]
    if not isinstance(rates, torch.Tensor) or rates.dim() != 1 or rates.numel() != basis.shape[0]:
        raise ValueError(f"{names['column_rates']} must be a 1-D tensor with {basis.shape[0]} entries "
                         "(one per row)")
    if not rates.is_floating_point():
        raise ValueError(f"{names['column_rates']} must be a floating tensor")
    if values and (not bool(torch.isfinite(rates).all()) or bool((rates <= 0).any())):
        raise ValueError(f"{names['column_rates']} must be finite and > 0")
    check_positive_rate(sub["base_lr"], names["base_lr"])


_GROUP_KEYS = ("cycle", "cycle_position", "lr_scale", "lr", "weight_decay", "maximize", "foreach", "fused")


def _check_group_fields(group: Any, name: str, checked_cycle: Any = None) -> None:
    """Every MrGD field of a param group (``name`` says where it comes from), before anything uses it.

    ``checked_cycle``: a tuple already checked; when ``group["cycle"]`` is that very (immutable) object its
    rates are not checked again (the per-step check stays O(1) in the cycle length)."""
    if not isinstance(group, dict):
        raise TypeError(f"{name} must be a dict, got {type(group).__name__}")
    for key in _GROUP_KEYS:
        if key not in group:
            raise KeyError(f"{name} has no {key!r} field")
    cycle = group["cycle"]
    if isinstance(cycle, tuple) and cycle is checked_cycle:
        _check_rest_of_group(group, name, len(cycle))
        return
    if not isinstance(cycle, (tuple, list)):
        raise TypeError(f"{name}['cycle'] must be a tuple or list of learning rates, got {type(cycle).__name__}")
    for i, r in enumerate(cycle):
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise TypeError(f"{name}['cycle'][{i}] must be a number, got {type(r).__name__}")
    cycle = cycle_of(cycle, f"{name}['cycle']")
    _check_rest_of_group(group, name, len(cycle))


def _check_rest_of_group(group: dict[str, Any], name: str, n: int) -> None:
    _check_position(group["cycle_position"], n, f"{name}['cycle_position']")
    check_positive_rate(group["lr_scale"], f"{name}['lr_scale']")
    _check_lr(group["lr"], f"{name}['lr']")
    check_non_negative(group["weight_decay"], f"{name}['weight_decay']")
    if not isinstance(group["maximize"], bool):
        raise TypeError(f"{name}['maximize'] must be a bool, got {type(group['maximize']).__name__}")
    check_optional_bool(group["foreach"], f"{name}['foreach']")
    check_optional_bool(group["fused"], f"{name}['fused']")
    if group["foreach"] and group["fused"]:
        raise ValueError(f"{name}: 'fused' and 'foreach' cannot both be True")
    if "last_rate" in group:
        last = group["last_rate"]
        if isinstance(last, torch.Tensor):
            if last.numel() != 1 or not last.is_floating_point():
                raise TypeError(f"{name}['last_rate'] must be a float or a one-element floating tensor")
            last = last.item()
        check_non_negative(last, f"{name}['last_rate']")


def _own_group_tensors(group: dict[str, Any]) -> None:
    """Hold ``cycle_position`` and ``last_rate`` as CPU tensors owned by this group (NOTE: [tensor rate])."""
    pos = group["cycle_position"]
    group["cycle_position"] = torch.tensor(int(pos.item() if isinstance(pos, torch.Tensor) else pos), dtype=torch.int64)
    last = group.get("last_rate", 0.0)
    # Shape [1], not 0-d: Dynamo treats a 0-d CPU float tensor of a param group as a Python float and would
    # drop the in-place update of a compiled step.
    group["last_rate"] = torch.tensor([float(last.item() if isinstance(last, torch.Tensor) else last)],
                                      dtype=torch.float64)


class MrGD(Optimizer):
    r"""Multirate gradient descent.

    Args:
        params: iterable of parameters or of param-group dicts (a group may carry its own ``plan``).
            Parameters must be floating point (float32, float64, float16, bfloat16).
        plan: a :class:`~mrgd_ext.planning.plan.MultiratePlan` (from :func:`~mrgd_ext.plan_multirate`) or a
            sequence of learning rates: the cycle walked step by step, in order.
        lr_scale: a fixed factor on every rate of the cycle (and, in subspace mode, every rate). Default 1.
        weight_decay: L2 penalty added to the gradient, as in torch.optim.SGD. Default 0.
        maximize: ascend instead of descend. Default False.
        lr: the multiplier that torch LR schedulers drive (``group["lr"]``). Default 1 (the bare cycle). A
            one-element tensor is accepted, as in torch.optim, so a compiled step does not recompile when a
            scheduler changes it.
        foreach: use torch's multi-tensor ops instead of the fused kernel.
        fused: use the mrgd_ext fused kernel (one call per (device, dtype) bucket); ``None`` picks it when
            it supports every parameter of a bucket (dense, contiguous, float32/float64/float16/bfloat16
            on a device this build has kernels for) and ``foreach`` otherwise.

    The rate a step takes is ``lr * lr_scale * cycle[cycle_position]``. Group fields:

    * ``lr``: the multiplier (what a torch LR scheduler such as ``LambdaLR``, ``OneCycleLR``,
      ``CosineAnnealingLR``, ``SequentialLR`` or ``ChainedScheduler`` sets), so a schedule scales the
      whole cycle: warm-up and decay act on every rate, and the cycle keeps its shape.
    * ``lr_scale``, ``cycle``: fixed by the constructor (or by ``plan`` in a param group).
    * ``cycle_position``: index of the rate the next step uses (a 0-d int64 tensor).
    * ``last_rate``: the rate the last step actually took (a one-element float64 tensor; 0 before the first step;
      in subspace mode the rate of the complement of the basis span).

    ``state_dict()``/``load_state_dict()`` resume in the middle of a cycle bit-exactly; ``load_state_dict``
    checks every field first and leaves the optimizer unchanged when it rejects a state.

    With a :class:`torch.amp.GradScaler`, the kernels read the loss scale on the device; a step whose
    gradients overflowed changes nothing and does not advance the cycle (reading that flag costs one
    device-to-host copy per step while a GradScaler is in use).

    Under ``torch.compile`` the step traces without graph breaks and does not recompile from step to step:
    the position and the rate are tensors (NOTE: [tensor rate]), and the update runs as multi-tensor ops that
    the compiler fuses. The subspace step compiles likewise (NOTE: [compiled subspace step]); a new
    ``base_lr`` from :meth:`set_subspace` compiles once more (it is a Python float, as the cycle's rates are).

    Subspace mode: :meth:`set_subspace` switches to the spatial form, :meth:`clear_subspace` back.

    No loss guard: like ``torch.optim.SGD``, ``step`` takes the update it is told to take. A guard needs what a
    fixed plan does not have: the loss at every step (a closure), a copy of the parameters to roll back to, and
    a measured ``lambda_max`` to fall back to a rate that provably decreases the loss. :class:`mrgd_ext.AutoMrGD`
    is that guarded form (it measures the curvature, plans, and checks every cycle); a plan that is correct for
    the loss it was made for (a quadratic with known groups) needs no guard.
    """

    # The subspace state lives under a string key next to the per-parameter entries.
    state: defaultdict[Any, Any]

    def __init__(
        self,
        params: ParamsT,
        plan: Any,
        lr_scale: float = 1.0,
        weight_decay: float = 0.0,
        maximize: bool = False,
        *,
        lr: float | torch.Tensor = 1.0,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        if fused and foreach:
            raise RuntimeError("fused and foreach cannot both be True")
        check_optional_bool(foreach, "foreach")
        check_optional_bool(fused, "fused")
        cycle = cycle_of(plan)
        _check_lr(lr, "lr")
        defaults = {
            "cycle": cycle,
            "cycle_position": 0,
            "lr_scale": check_positive_rate(lr_scale, "lr_scale"),
            "lr": lr,
            "weight_decay": check_non_negative(weight_decay, "weight_decay"),
            "maximize": bool(maximize),
            "foreach": foreach,
            "fused": fused,
        }
        super().__init__(params, defaults)
        # GradScaler hands grad_scale/found_inf to optimizers that declare this (torch.optim convention).
        self._step_supports_amp_scaling = True
        self.register_state_dict_post_hook(MrGD._detach_group_tensors)  # type: ignore[arg-type]  # torch types the hook's argument as the base Optimizer

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param group must be a dict, got {type(param_group).__name__}")
        param_group = dict(param_group)
        gi = len(self.param_groups)
        if "plan" in param_group:
            param_group["cycle"] = cycle_of(param_group.pop("plan"), "param_group['plan']")
            param_group.setdefault("cycle_position", 0)
        params = param_group.get("params")
        params = [params] if isinstance(params, torch.Tensor) else params
        if params is not None and not isinstance(params, (set, dict)):
            params = list(params)
            for pi, p in enumerate(params):
                if isinstance(p, torch.Tensor) and p.dtype not in KERNEL_PARAM_DTYPES:
                    raise TypeError(
                        f"{_param_name(gi, pi)} has dtype {p.dtype}; MrGD needs floating-point parameters "
                        "(float32, float64, float16, bfloat16)"
                    )
            param_group["params"] = params
        # Fill defaults first (as torch does) and then check the whole group, so a rejected group is not added.
        merged = {**self.defaults, **param_group}
        merged["cycle"] = tuple(merged["cycle"]) if isinstance(merged["cycle"], (tuple, list)) else merged["cycle"]
        _check_group_fields(merged, f"param_groups[{gi}]")
        super().add_param_group(param_group)
        _own_group_tensors(self.param_groups[-1])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            if not isinstance(group.get("cycle_position"), torch.Tensor) or "last_rate" not in group:
                _own_group_tensors(group)

    # ----------------------------------------------------------------------------------------------
    # State

    @staticmethod
    def _detach_group_tensors(optimizer: MrGD, state_dict: dict[str, Any]) -> dict[str, Any]:
        # torch.optim's state_dict shares the group values; the position and the last rate change in place
        # at every step, so a state dict kept in memory gets copies (it must not move on with the optimizer).
        for g in state_dict["param_groups"]:
            for key in ("cycle_position", "last_rate"):
                if isinstance(g.get(key), torch.Tensor):
                    g[key] = g[key].clone()
        return state_dict

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state, as ``torch.optim.Optimizer.state_dict``; a subspace state is written per
        parameter (NOTE: [per-parameter checkpoint form]) so ``torch.distributed.checkpoint`` can save it."""
        state_dict = super().state_dict()
        state = dict(state_dict["state"])
        sub = state.pop(_SUBSPACE_KEY, None)
        if len(state_dict["param_groups"]) == 1:
            group = state_dict["param_groups"][0]
            _checkpoint.pack_subspace(sub, self.param_groups[0]["params"], group["params"], state, group)
        elif sub is not None:  # not reachable through set_subspace (one group); kept as it is in memory
            state[_SUBSPACE_KEY] = sub
        state_dict["state"] = state
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict` (or from ``set_optimizer_state_dict``) after checking all of it
        (group fields, subspace entries).

        Raises TypeError/ValueError/KeyError naming the group and the field; the optimizer is unchanged then.
        With DTensor parameters (FSDP2) loading is collective over their mesh: every rank calls it, and a state
        rejected on one rank raises on every rank (NOTE: [per-parameter checkpoint form]).
        """
        params = [p for g in self.param_groups for p in g["params"]]
        shard_group = getattr(self, "_process_group", None) if self.subspace_enabled else None
        shard_group = shard_group if shard_group is not None else _checkpoint.mesh_group(params)
        error: BaseException | None = None
        sub = None
        try:
            state_dict, sub = self._unpack_state_dict(state_dict)
        except (TypeError, ValueError, KeyError) as exc:
            error = exc
        if shard_group is not None:
            device = _dtensor.local(params[0]).device
            _checkpoint.agree(error, 0 if sub is None else int(sub["basis"].shape[0]), shard_group, device,
                              "load_state_dict")
        elif error is not None:
            raise error
        if sub is not None:
            _checkpoint.check_orthonormal(sub["basis"], shard_group, "state_dict subspace basis")
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["cycle"] = tuple(float(r) for r in group["cycle"])
            _own_group_tensors(group)
        if sub is not None:
            device = self.param_groups[0]["params"][0].device
            self.state[_SUBSPACE_KEY] = {"basis": sub["basis"].to(device),
                                         "column_rates": sub["column_rates"].to(device),
                                         "base_lr": float(sub["base_lr"])}
            if getattr(self, "_process_group", None) is None:
                self._process_group = _checkpoint.mesh_group(self.param_groups[0]["params"])

    def _unpack_state_dict(self, state_dict: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Check a state dict; return it without its subspace fields, and the subspace entry (or None)."""
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict or "state" not in state_dict:
            raise TypeError("state_dict must be a dict with 'state' and 'param_groups' (from MrGD.state_dict())")
        groups = state_dict["param_groups"]
        if not isinstance(groups, (list, tuple)) or len(groups) != len(self.param_groups):
            n = len(groups) if isinstance(groups, (list, tuple)) else type(groups).__name__
            raise ValueError(f"state_dict['param_groups'] has {n} groups but the optimizer has "
                             f"{len(self.param_groups)}")
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            name = f"state_dict['param_groups'][{gi}]"
            _check_group_fields(saved, name)
            if not isinstance(saved.get("params"), (list, tuple)) or len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{name}['params'] does not match the optimizer's group {gi} in size")
        state = state_dict["state"]
        if not isinstance(state, dict):
            raise TypeError(f"state_dict['state'] must be a dict, got {type(state).__name__}")
        params = self.param_groups[0]["params"] if self.param_groups else []
        sub, state = _checkpoint.unpack_subspace(state, list(groups[0]["params"]) if groups else [], params,
                                                 groups[0].get(_checkpoint.ROWS) if groups else None,
                                                 "state_dict")
        field_names = None
        if sub is not None:
            field_names = {"basis": f"state_dict['state'][...][{_checkpoint.BASIS!r}]",
                           "column_rates": f"state_dict['state'][...][{_checkpoint.RATES!r}]",
                           "base_lr": f"state_dict['state'][...][{_checkpoint.BASE_LR!r}]"}
        elif _SUBSPACE_KEY in state:  # the in-memory form, as written before the per-parameter form
            state = dict(state)
            sub = state.pop(_SUBSPACE_KEY)
        if sub is not None:
            if len(self.param_groups) != 1:
                raise ValueError("state_dict['state'] has a subspace entry but the optimizer has several param groups")
            _check_subspace_state(sub, params, f"state_dict['state'][{_SUBSPACE_KEY!r}]", field_names=field_names)
        groups = [{k: v for k, v in g.items() if k != _checkpoint.ROWS} for g in groups]
        return {**state_dict, "state": state, "param_groups": groups}, sub

    # ----------------------------------------------------------------------------------------------
    # Subspace (spatial) mode.

    def set_subspace(
        self,
        basis: torch.Tensor,
        column_rates: torch.Tensor | Sequence[float],
        base_lr: float,
        *,
        process_group: Any = None,
        check: bool = True,
    ) -> None:
        r"""Give each basis column its own rate at every step.

        Args:
            basis: ``[r, n_total]`` orthonormal rows (Ritz vectors of the top eigen-groups) over the flat
                concatenation of all parameters in param-group order; float32, bfloat16 or float64, on the
                parameters' device. Memory: ``r * n_total`` elements.
            column_rates: ``[r]`` rate of each row's eigen-group (e.g. ``2 / (a_k + b_k)``).
            base_lr: rate of the complement of the basis span (the smallest-eigenvalue group; large).
            process_group: when parameters are sharded across ranks (FSDP), the projection ``U^T g`` is a
                partial sum on each rank and is all-reduced over this group; leave ``None`` when every rank
                holds all parameters (DDP: the step is local and identical on every rank). DTensor
                parameters sharded by ``fully_shard``: ``basis`` may span the global flat parameters (each
                rank keeps its shards' columns) and the group defaults to the mesh's.
            check: verify that ``basis`` is finite with orthonormal rows (an ``r x r`` Gram matrix, ``r^2 n``
                flops, one device-to-host copy). Pass False when the basis is known to be orthonormal, or
                when ``basis`` holds only this rank's shard of the columns (FSDP).

        The subspace mode needs a single param group on one device and dtype. It does not walk the cycle.
        """
        if len(self.param_groups) != 1:
            raise ValueError("set_subspace needs an optimizer with exactly one param group")
        params = self.param_groups[0]["params"]
        if not params:
            raise ValueError("set_subspace needs at least one parameter")
        device, dtype = params[0].device, params[0].dtype
        for i, p in enumerate(params):
            if p.device != device or p.dtype != dtype:
                raise ValueError(f"subspace mode needs one device and dtype: params[{i}] is {p.dtype} on {p.device}")
        given = basis
        basis, process_group, n_local = _dtensor.prepare_subspace(params, basis, process_group)
        check_basis(basis, n_local, device)
        if check:
            # On the basis as given: under FSDP a global basis, before it is cut to this rank's columns.
            check_orthonormal_rows(given)
        base_lr = check_positive_rate(base_lr, "base_lr")
        try:
            rates = torch.as_tensor(column_rates, dtype=torch.float64).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError("column_rates must be a sequence of numbers or a tensor, "
                            f"got {type(column_rates).__name__}") from None
        if rates.numel() != basis.shape[0]:
            raise ValueError(f"column_rates has {rates.numel()} entries but basis has {basis.shape[0]} rows")
        if not torch.isfinite(rates).all() or (rates <= 0).any():
            raise ValueError("column_rates must be finite and > 0")
        self.state[_SUBSPACE_KEY] = {
            "basis": basis,
            "column_rates": rates.to(device),
            "base_lr": base_lr,
        }
        self._process_group = process_group

    def clear_subspace(self) -> None:
        """Leave subspace mode; the next step continues the temporal cycle where it stopped."""
        self.state.pop(_SUBSPACE_KEY, None)

    @property
    def subspace_enabled(self) -> bool:
        return _SUBSPACE_KEY in self.state

    # ----------------------------------------------------------------------------------------------

    def _prepare(
        self, compiling: bool, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None
    ) -> list[_Buckets]:
        """Check every group before anything is written (NOTE: [optimizer-side checks]); returns the buckets."""
        # NOTE: [optimizer-side checks]
        # Tensor.grad assignment checks shape, dtype and device against the parameter, but `.data` swaps and
        # in-place dtype changes get around it, and a group may mix parameters the step cannot update. So the
        # step checks everything (dtypes, shapes, layouts, contiguity on the fused path, group fields, AMP
        # flags) for every group first: a rejected step leaves every parameter and the state untouched.
        prepared = []
        for gi, group in enumerate(self.param_groups):
            if not compiling:  # values of the tensors cannot be read inside a trace
                checked = self.__dict__.setdefault("_checked_cycles", {})
                _check_group_fields(group, f"param_groups[{gi}]", checked.get(gi))
                checked[gi] = group["cycle"]
            params, grads = [], []
            need_contiguous = group["fused"] and not compiling
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                # The common case in one expression (this loop runs for every parameter of every step); the
                # checks below then say which condition failed.
                if (g.layout == torch.strided and p.dtype in KERNEL_PARAM_DTYPES and g.dtype == p.dtype
                        and g.shape == p.shape and g.device == p.device
                        and (not need_contiguous or (p.is_contiguous() and g.is_contiguous()))):
                    params.append(p)
                    grads.append(g)
                    continue
                name = _param_name(gi, pi)
                if g.is_sparse or g.layout != torch.strided:
                    raise RuntimeError(f"{name} has a sparse gradient; MrGD supports dense gradients only")
                check_float_dtype(p, name, KERNEL_PARAM_DTYPES)
                if g.dtype != p.dtype:
                    raise TypeError(f"{name}: gradient dtype {g.dtype} differs from the parameter's {p.dtype}")
                if g.shape != p.shape:
                    raise ValueError(f"{name}: gradient shape {tuple(g.shape)} differs from the parameter's "
                                     f"{tuple(p.shape)}")
                if g.device != p.device:
                    raise ValueError(f"{name}: gradient on {g.device} but the parameter on {p.device}")
                raise ValueError(
                    f"{name} is not contiguous; the fused kernel needs contiguous tensors "
                    "(use fused=None or foreach=True for such parameters)"
                )
            buckets = _group_by_device_and_dtype(params, grads)
            _check_flags_and_kernels(buckets, group["fused"] and not compiling, grad_scale, found_inf)
            prepared.append(buckets)
        if self.subspace_enabled and not compiling:
            _check_subspace_state(self.state[_SUBSPACE_KEY], self.param_groups[0]["params"], "subspace state",
                                  values=False)
        return prepared

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step (the next rate of the cycle, or one subspace step). Returns the closure's loss."""
        loss = None
        # NOTE: [checkpoint initialisation step]
        # torch.distributed.checkpoint's get/set_optimizer_state_dict "initialise" an optimizer whose state is
        # empty (temporal MrGD keeps its cycle position in the param groups) by zeroing the gradients, setting
        # every group's "lr" to 0 and calling step(). Without a rule that call would advance the cycle. The rule:
        # a step with every group's "lr" multiplier at 0 takes rate 0 everywhere, so it is no step at all:
        # neither the parameters nor the cycle position move (a warm-up from 0 starts the cycle one step later).
        # The decision reads only "lr", so it is the same on every rank.
        if closure is None and not torch.compiler.is_compiling() and all(
            float(group["lr"]) == 0.0 for group in self.param_groups
        ):
            return None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        compiling = torch.compiler.is_compiling()
        prepared = self._prepare(compiling, grad_scale, found_inf)
        for group in self.param_groups:  # positions set as ints (older checkpoints, AutoMrGD) become tensors
            if not isinstance(group["cycle_position"], torch.Tensor) or "last_rate" not in group:
                _own_group_tensors(group)

        if compiling:
            self._compiled_step(prepared, grad_scale, found_inf)
            return loss
        # NOTE: [skipped steps keep their place]
        # A step that GradScaler skipped (inf/nan gradients) did not happen, so the cycle must not move
        # on: skipping a large step would leave the amplification of the small ones undamped.
        if found_inf is not None and found_inf.item() != 0:
            return loss
        if self.subspace_enabled:
            self._subspace_step(grad_scale)
            return loss
        for group, buckets in zip(self.param_groups, prepared):
            pos = int(group["cycle_position"])
            lr = group["lr"]
            rate = (lr.item() if isinstance(lr, torch.Tensor) else float(lr)) * group["lr_scale"] * group["cycle"][pos]
            _apply_buckets(
                buckets, rate, group["weight_decay"], group["maximize"], group["foreach"], group["fused"],
                grad_scale, None,
            )
            group["last_rate"].fill_(rate)
            group["cycle_position"].fill_((pos + 1) % len(group["cycle"]))
        return loss

    def _compiled_step(
        self, prepared: list[_Buckets], grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None
    ) -> None:
        # NOTE: [tensor rate]
        # Dynamo guards every Python scalar of a param group on its value, so a position or a rate kept as a
        # Python number would recompile the step at every rate of the cycle. The position and the last rate
        # are 0-d tensors updated in place, and the rate enters the traced update as a tensor (as torch's own
        # optimizers take a Tensor lr); the custom kernel takes a float rate, so a compiled temporal step uses
        # multi-tensor ops, which the compiler fuses. A GradScaler's skip is a tensor select, not a branch.
        keep = None if found_inf is None else (found_inf.reshape(()) == 0)
        if self.subspace_enabled:
            self._subspace_step(grad_scale, keep)
            return
        for group, buckets in zip(self.param_groups, prepared):
            n = len(group["cycle"])
            pos = group["cycle_position"]
            cycle = torch.tensor(group["cycle"], dtype=torch.float64)
            # gather, not cycle[pos]: indexing with a tensor would read the position on the host.
            rate = cycle.gather(0, pos.reshape(1)).reshape(()) * group["lr_scale"] * group["lr"]
            if keep is not None:
                rate = torch.where(keep, rate, torch.zeros_like(rate))
            for (device, _), (ps, gs) in buckets.items():
                if keep is not None:  # an overflowed gradient must not reach the parameters, even times 0
                    gs = [torch.where(keep.to(device), g, torch.zeros_like(g)) for g in gs]
                _foreach_multirate_step(ps, gs, rate.to(device), group["weight_decay"], group["maximize"],
                                        grad_scale, None)
            advance = 1 if keep is None else keep.to(torch.int64)
            last = group["last_rate"]
            last.copy_(rate.reshape(1) if keep is None else torch.where(keep, rate, last))
            group["cycle_position"].copy_((pos + advance) % n)

    def _subspace_step(
        self, grad_scale: torch.Tensor | None, keep: torch.Tensor | None = None,
        momentum: tuple[list[torch.Tensor], float] | None = None,
    ) -> None:
        """One subspace step ``p -= P g`` (docs/design.md 1.4). ``keep``: in a compiled step with a GradScaler,
        the device flag "no overflow" (NOTE: [compiled subspace step]). ``momentum`` = (buffers shaped like the
        parameters, mu): the Nesterov form of AutoMrGD's accelerated step instead, ``v <- mu v + P g``,
        ``p <- p - P g - mu v`` (NOTE: [momentum subspace update]); weight decay is part of ``g`` either way."""
        group = self.param_groups[0]
        sub = self.state[_SUBSPACE_KEY]
        params = group["params"]
        if all(p.grad is None for p in params):  # nothing was differentiated: no step, as in torch.optim
            return
        # The basis spans all parameters; a parameter without a gradient contributes a zero gradient.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        params, grads = _dtensor.local_pairs(params, grads)
        basis = sub["basis"]
        check_basis(basis, sum(p.numel() for p in params), params[0].device)
        # NOTE: [compiled subspace step]
        # As in the temporal step (NOTE: [tensor rate]), a compiled step must neither read a tensor on the
        # host (a graph break) nor bake a scheduler's value in (a recompile per value). So when compiling, a
        # tensor ``lr`` stays a tensor and a GradScaler's skip is a select: an overflowed gradient is zeroed
        # and the rates taken are 0. The fused update kernel takes its rate as a float; with a tensor rate
        # the update runs as the torch composition (the projection kernel takes no rate and stays fused).
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and not torch.compiler.is_compiling():
            lr = lr.item()
        scale = group["lr_scale"] * lr
        rate = scale * sub["base_lr"]  # of the complement of the basis span
        base_lr = rate
        if keep is not None:
            grads = [torch.where(keep.to(g.device), g, torch.zeros_like(g)) for g in grads]
            base_lr = torch.where(keep, torch.as_tensor(rate, dtype=torch.float64), 0.0)
            scale = torch.where(keep, torch.as_tensor(scale, dtype=torch.float64), 0.0)
        use_fused = group["fused"] if group["fused"] is not None else _fused_supported(params)
        wd, maximize = group["weight_decay"], group["maximize"]
        kwargs = {"weight_decay": wd, "maximize": maximize}
        if use_fused:  # checked in step(); the raw ops skip the wrappers' per-tensor Python checks
            c = torch.ops.mrgd_ext.subspace_project(params, grads, basis, wd, maximize, grad_scale)
        else:
            c = _reference.subspace_project(params, grads, basis, grad_scale=grad_scale, **kwargs)
        if getattr(self, "_process_group", None) is not None:
            torch.distributed.all_reduce(c, group=self._process_group)
        coeffs = (scale * sub["column_rates"].to(c.dtype) - base_lr) * c

        fused_update = use_fused and not isinstance(base_lr, torch.Tensor)
        if momentum is None and fused_update:
            torch.ops.mrgd_ext.subspace_step_(params, grads, basis, coeffs, base_lr, wd, maximize, grad_scale, None)
        elif momentum is None:
            _reference.subspace_step(params, grads, basis, coeffs, base_lr, grad_scale=grad_scale, **kwargs)
        else:
            # NOTE: [momentum subspace update] (csrc/include/mrgd_ext/update_math.h): v <- mu v + P g and
            # p <- p - P g - mu v in one pass from the same projection; P g is never stored.
            bufs, mu = momentum
            bufs = [_dtensor.local(b) for b in bufs]
            if fused_update:
                torch.ops.mrgd_ext.subspace_momentum_step_(params, grads, bufs, basis, coeffs, base_lr, mu, wd,
                                                           maximize, grad_scale, None)
            else:
                _reference.subspace_momentum_step(params, grads, bufs, basis, coeffs, base_lr, mu,
                                                  grad_scale=grad_scale, **kwargs)
        last = group["last_rate"]
        if isinstance(rate, torch.Tensor) or keep is not None:
            rate = torch.as_tensor(rate, dtype=torch.float64).reshape(1)
            last.copy_(rate if keep is None else torch.where(keep, rate, last))
        else:
            last.fill_(rate)


class MultirateLR(LRScheduler):
    """Make any torch optimizer follow a multirate plan: ``lr = lr_scale * cycle[step % len(cycle)]``.

    Call ``scheduler.step()`` after each ``optimizer.step()``, as with every torch LR scheduler. The
    position in the cycle is ``last_epoch`` and travels with ``state_dict()``.
    """

    def __init__(self, optimizer: Optimizer, plan: Any, lr_scale: float = 1.0, last_epoch: int = -1) -> None:
        self.cycle = cycle_of(plan)
        self.lr_scale = check_positive_rate(lr_scale, "lr_scale")
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float | torch.Tensor]:
        rate = self.lr_scale * self.cycle[self.last_epoch % len(self.cycle)]
        return [rate for _ in self.optimizer.param_groups]

    def _get_closed_form_lr(self) -> list[float | torch.Tensor]:
        return self.get_lr()
