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
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from mrgd_ext.ops import reference as _reference
from mrgd_ext.optim import _dtensor
from mrgd_ext.ops import step_ops as _ops
from mrgd_ext._validation import (
    KERNEL_PARAM_DTYPES,
    check_amp_flags,
    check_basis,
    check_non_negative,
    check_param_grad_lists,
    check_positive_rate,
)

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


def _group_by_device_and_dtype(params: list[torch.Tensor], grads: list[torch.Tensor]):
    buckets: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = defaultdict(lambda: ([], []))
    for p, g in zip(*_dtensor.local_pairs(params, grads)):  # DTensors: their local shards (NOTE: [local shards])
        ps, gs = buckets[(p.device, p.dtype)]
        ps.append(p)
        gs.append(g)
    return buckets


def _fused_supported(params: Sequence[torch.Tensor]) -> bool:
    return all(
        p.dtype in KERNEL_PARAM_DTYPES and p.is_contiguous() and _ops.has_kernel(p.device.type) for p in params
    )


def _check_flags_and_kernels(buckets, fused, grad_scale, found_inf) -> None:
    for (device, _), _lists in buckets.items():
        check_amp_flags(grad_scale, found_inf, device)
        if fused and not _ops.has_kernel(device.type):
            raise RuntimeError(f"fused=True but this build of mrgd_ext has no kernel for device {device}")


def _apply_buckets(buckets, lr, weight_decay, maximize, foreach, fused, grad_scale, found_inf) -> None:
    """One temporal step on already validated (device, dtype) buckets."""
    for (ps, gs) in buckets.values():
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
    lr = check_positive_rate(lr, "lr")
    weight_decay = check_non_negative(weight_decay, "weight_decay")
    if len(params) != len(grads):
        raise ValueError(f"params and grads must have the same length, got {len(params)} and {len(grads)}")
    # Validate everything first so a rejected call leaves every parameter untouched. Buckets are keyed by
    # the parameters' (device, dtype); the full check then also catches gradients that do not match.
    buckets = _group_by_device_and_dtype(params, grads)
    for ps, gs in buckets.values():
        check_param_grad_lists(ps, gs, require_contiguous=bool(fused))
    _check_flags_and_kernels(buckets, fused, grad_scale, found_inf)
    _apply_buckets(buckets, lr, weight_decay, maximize, foreach, fused, grad_scale, found_inf)


def _foreach_multirate_step(params, grads, lr, weight_decay, maximize, grad_scale, found_inf) -> None:
    if found_inf is not None and found_inf.item() != 0:
        return
    if grad_scale is not None:
        grads = torch._foreach_div(grads, grad_scale)
    if weight_decay != 0.0:
        # geff = g + wd * p; the sign of maximize applies to g only.
        grads = torch._foreach_neg(grads) if maximize else grads
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
        torch._foreach_add_(params, grads, alpha=-lr)
    else:
        torch._foreach_add_(params, grads, alpha=lr if maximize else -lr)


class MrGD(Optimizer):
    r"""Multirate gradient descent.

    Args:
        params: iterable of parameters or of param-group dicts (a group may carry its own ``plan``).
        plan: a :class:`~mrgd_ext.planning.plan.MultiratePlan` (from :func:`~mrgd_ext.plan_multirate`) or a
            sequence of learning rates: the cycle walked step by step, in order.
        lr_scale: multiplies every rate of the cycle (and, in subspace mode, every rate). Default 1.
        weight_decay: L2 penalty added to the gradient, as in torch.optim.SGD. Default 0.
        maximize: ascend instead of descend. Default False.
        foreach: use torch's multi-tensor ops instead of the fused kernel.
        fused: use the mrgd_ext fused kernel (one call per (device, dtype) bucket); ``None`` picks it when
            it supports every parameter of a bucket (dense, contiguous, float32/float64/float16/bfloat16
            on a device this build has kernels for) and ``foreach`` otherwise.

    State: each param group keeps ``cycle`` (the rates) and ``cycle_position`` (the index of the rate the
    next step uses), so ``state_dict()``/``load_state_dict()`` resume in the middle of a cycle bit-exactly.
    ``group["lr"]`` always shows the rate (times ``lr_scale``) that the next step will use.

    With a :class:`torch.amp.GradScaler`, the kernels read the loss scale and the inf flag on the device;
    a step whose gradients overflowed changes nothing and does not advance the cycle (reading that flag
    costs one device-to-host copy per step while a GradScaler is in use).

    Subspace mode: :meth:`set_subspace` switches to the spatial form, :meth:`clear_subspace` back.
    """

    def __init__(
        self,
        params,
        plan: Any,
        lr_scale: float = 1.0,
        weight_decay: float = 0.0,
        maximize: bool = False,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        if fused and foreach:
            raise RuntimeError("fused and foreach cannot both be True")
        cycle = cycle_of(plan)
        lr_scale = check_positive_rate(lr_scale, "lr_scale")
        defaults = {
            "cycle": cycle,
            "cycle_position": 0,
            "lr_scale": lr_scale,
            "lr": lr_scale * cycle[0],
            "weight_decay": check_non_negative(weight_decay, "weight_decay"),
            "maximize": bool(maximize),
            "foreach": foreach,
            "fused": fused,
        }
        super().__init__(params, defaults)
        # GradScaler hands grad_scale/found_inf to optimizers that declare this (torch.optim convention).
        self._step_supports_amp_scaling = True
        self.register_load_state_dict_post_hook(MrGD._move_subspace_to_params)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "plan" in param_group:
            param_group = dict(param_group)
            cycle = cycle_of(param_group.pop("plan"), "param_group['plan']")
            param_group["cycle"] = cycle
            param_group.setdefault("cycle_position", 0)
            scale = param_group.get("lr_scale", self.defaults["lr_scale"])
            param_group["lr"] = check_positive_rate(scale, "param_group['lr_scale']") * cycle[0]
        elif "lr_scale" in param_group:
            param_group = dict(param_group)
            scale = check_positive_rate(param_group["lr_scale"], "param_group['lr_scale']")
            param_group["lr"] = scale * self.defaults["cycle"][param_group.get("cycle_position", 0)]
        if "weight_decay" in param_group:
            check_non_negative(param_group["weight_decay"], "param_group['weight_decay']")
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)

    # ----------------------------------------------------------------------------------------------
    # Subspace (spatial) mode.

    def set_subspace(
        self,
        basis: torch.Tensor,
        column_rates: torch.Tensor | Sequence[float],
        base_lr: float,
        *,
        process_group: Any = None,
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
        basis, process_group, n_local = _dtensor.prepare_subspace(params, basis, process_group)
        check_basis(basis, n_local, device)
        base_lr = check_positive_rate(base_lr, "base_lr")
        rates = torch.as_tensor(column_rates, dtype=torch.float64).reshape(-1)
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

    @staticmethod
    def _move_subspace_to_params(optimizer: "MrGD") -> None:
        sub = optimizer.state.get(_SUBSPACE_KEY)
        if sub is None or not optimizer.param_groups[0]["params"]:
            return
        device = optimizer.param_groups[0]["params"][0].device
        sub["basis"] = sub["basis"].to(device)
        sub["column_rates"] = sub["column_rates"].to(device)

    # ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Take one step (the next rate of the cycle, or one subspace step). Returns the closure's loss."""
        loss = None
        # NOTE: [checkpoint initialisation step]
        # torch.distributed.checkpoint's get/set_optimizer_state_dict "initialise" an optimizer whose state is
        # empty (temporal MrGD keeps its cycle position in the param groups) by zeroing the gradients, setting
        # every group's "lr" to 0 and calling step(). MrGD's rate comes from its cycle, "lr" only reports it, so
        # that call would advance the cycle and apply weight decay: a step with every "lr" at 0 is no step.
        if closure is None and all(group.get("lr") == 0 for group in self.param_groups):
            return None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)

        # NOTE: [optimizer-side checks]
        # Tensor.grad can only be assigned a tensor of the parameter's shape, dtype and device (torch checks
        # on assignment), so per step only what assignment allows remains to be refused: sparse gradients,
        # and non-contiguous tensors on the fused path. Everything is checked before anything is written.
        prepared = []
        for gi, group in enumerate(self.param_groups):
            params, grads = [], []
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse or g.layout != torch.strided:
                    raise RuntimeError(
                        f"param_groups[{gi}]['params'][{pi}] has a sparse gradient; MrGD supports dense gradients only"
                    )
                if group["fused"] and not (p.is_contiguous() and g.is_contiguous()):
                    raise ValueError(
                        f"param_groups[{gi}]['params'][{pi}] is not contiguous; the fused kernel needs contiguous "
                        "tensors (use fused=None or foreach=True for such parameters)"
                    )
                params.append(p)
                grads.append(g)
            buckets = _group_by_device_and_dtype(params, grads)
            _check_flags_and_kernels(buckets, group["fused"], grad_scale, found_inf)
            prepared.append(buckets)

        if self.subspace_enabled:
            self._subspace_step(grad_scale, found_inf)
        else:
            for group, buckets in zip(self.param_groups, prepared):
                lr = group["lr_scale"] * group["cycle"][group["cycle_position"]]
                _apply_buckets(
                    buckets, lr, group["weight_decay"], group["maximize"], group["foreach"], group["fused"],
                    grad_scale, found_inf,
                )
            # NOTE: [skipped steps keep their place]
            # A step that GradScaler skipped (inf/nan gradients) did not happen, so the cycle must not move
            # on: skipping a large step would leave the amplification of the small ones undamped.
            if found_inf is None or found_inf.item() == 0:
                for group in self.param_groups:
                    group["cycle_position"] = (group["cycle_position"] + 1) % len(group["cycle"])
                    group["lr"] = group["lr_scale"] * group["cycle"][group["cycle_position"]]
        return loss

    def _subspace_step(self, grad_scale, found_inf) -> None:
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
        scale = group["lr_scale"]
        base_lr = scale * sub["base_lr"]
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
        if use_fused:
            torch.ops.mrgd_ext.subspace_step_(
                params, grads, basis, coeffs, base_lr, wd, maximize, grad_scale, found_inf
            )
        else:
            _reference.subspace_step(
                params, grads, basis, coeffs, base_lr, grad_scale=grad_scale, found_inf=found_inf, **kwargs
            )


class MultirateLR(LRScheduler):
    """Make any torch optimizer follow a multirate plan: ``lr = lr_scale * cycle[step % len(cycle)]``.

    Call ``scheduler.step()`` after each ``optimizer.step()``, as with every torch LR scheduler. The
    position in the cycle is ``last_epoch`` and travels with ``state_dict()``.
    """

    def __init__(self, optimizer: Optimizer, plan: Any, lr_scale: float = 1.0, last_epoch: int = -1) -> None:
        self.cycle = cycle_of(plan)
        self.lr_scale = check_positive_rate(lr_scale, "lr_scale")
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        rate = self.lr_scale * self.cycle[self.last_epoch % len(self.cycle)]
        return [rate for _ in self.optimizer.param_groups]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()
