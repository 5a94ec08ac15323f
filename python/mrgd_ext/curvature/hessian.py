"""Hessian-vector products as a linear operator over a flat parameter vector.

:class:`HessianOperator` is the operator the spectrum tools (``mrgd_ext.curvature.lanczos``, ``spectral_density``,
``hutchinson_trace``) apply: ``H = d^2 L / d theta^2`` of one fixed loss ``L`` at the current parameters,
acting on blocks of flat vectors ``V [b, n]`` (``n`` = number of parameter elements in the selection). It is a
:class:`mrgd_ext.curvature.operator.CurvatureOperator`: parameter selection, batches, evaluation mode,
determinism check and flattening are shared with :class:`mrgd_ext.GGNOperator`; this module holds the
Hessian product.

Two ways to build it:

* ``HessianOperator(model, loss_fn, data, params=None)``: ``L(theta) = sum_batches (|B| / N) *
  loss_fn(model(X_B), y_B)`` over a fixed list of batches (``data`` is one ``(X, y)`` pair or an iterable of
  pairs, materialised once: every application sees the same data). ``params`` selects the parameters to
  differentiate (default: all with ``requires_grad``); the rest stay constants.
* ``HessianOperator.from_closure(closure, params)``: ``L = closure(params)``, ``params`` a list of tensors.

Backends (``backend=``):

* ``"func"``: ``torch.func`` transforms of ``torch.func.grad`` (over ``torch.func.functional_call`` for
  models), vectorised over the ``b`` tangents of a block with ``torch.func.vmap``; the forward and backward
  pass of the primal are shared by the whole block. Forward-over-reverse (``jvp`` of ``grad``) is tried first;
  where forward-mode AD of some backward formula fails (``F.mse_loss``'s backward writes into a zero
  tangent: "ZeroTensors are immutable"), reverse-over-reverse (``vjp`` of ``grad``) is used instead
  (:attr:`HessianOperator.func_transform` says which).
* ``"double_backward"``: ``torch.autograd.grad`` with ``create_graph=True`` and one backward pass of the
  gradient per tangent; works for models ``torch.func`` cannot transform (in-place tricks, hooks, custom
  ``autograd.Function`` without ``setup_context``).
* ``"auto"`` (default): ``"double_backward"`` for parameters on the CPU (measured 2-5x faster there than
  ``"func"`` per product on small networks and linear models, and without ``"func"``'s first-call cost of
  seconds); elsewhere ``"func"`` (forward-over-reverse, or reverse-over-reverse for losses whose backward
  forward-mode AD rejects), falling back to ``"double_backward"`` with a warning the first time both
  functional transforms fail.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from mrgd_ext.curvature.operator import CurvatureOperator

__all__ = ["HessianOperator", "BACKENDS"]

#: Values accepted for ``backend=``.
BACKENDS: tuple[str, ...] = ("auto", "func", "double_backward")
#: What ``backend="auto"`` runs on each device type before trying ``"func"`` (module docstring: double backward
#: measured faster per product on the CPU). Device types not listed try ``"func"`` first.
AUTO_BACKEND_BY_DEVICE: dict[str, str] = {"cpu": "double_backward"}

# The two torch.func formulations of the Hessian-vector product, in the order they are tried.
_FUNC_TRANSFORMS: tuple[str, ...] = ("forward_over_reverse", "reverse_over_reverse")

# What a failed torch.func transform raises.
_TRANSFORM_ERRORS = (RuntimeError, NotImplementedError, TypeError)


class _TransformFailure(Exception):
    """Raised inside the functional backend when torch.func cannot transform the loss."""


class _NoSecondDerivative(Exception):
    """Raised inside the double-backward backend when no gradient has an autograd graph."""


class HessianOperator(CurvatureOperator):
    """The Hessian of a fixed loss at the current parameters, as a linear operator on flat vectors.

    Args:
        model: the ``nn.Module``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (mean over the batch, as ``nn.CrossEntropyLoss()``).
        data: one ``(inputs, targets)`` pair or an iterable of pairs (e.g. a ``DataLoader``), read once at
            construction and moved to the parameters' device: the operator always uses this fixed subset.
            ``inputs`` is a tensor or a tuple of tensors (positional arguments of ``model``; wrap a single
            batch with tuple inputs in a list, ``[((x1, x2), y)]``, so it is not read as two batches). Batch ``B``
            enters with weight ``|B| / N`` (``N`` = total samples), so for a mean-reduced loss the operator
            is the Hessian of the mean loss over the subset however it is split into batches.
        params: the parameters to differentiate with respect to: ``None`` (all parameters with
            ``requires_grad``), or an iterable of the model's parameters or of their names.
        backend: ``"auto"``, ``"func"`` or ``"double_backward"`` (module docstring).
        train_mode: evaluate the model in ``eval()`` mode (default) or, when True, in ``train()`` mode.
            In train mode BatchNorm normalises with batch statistics; its running statistics are not updated
            (every buffer is snapshot before and restored after each application, exactly). Either way the
            model's own train/eval flags are restored afterwards.
        allow_nondeterministic: do not raise when two applications to the same vector differ (dropout in
            train mode, nondeterministic GPU kernels); see :meth:`check_determinism`.
        check_determinism: run :meth:`check_determinism` automatically on first use (two extra Hessian-vector
            products, once).
        validate: evaluate the loss once at construction to check it is a real scalar that depends on the
            parameters, so bad input fails early with a message naming the argument.

    Attributes:
        n: number of scalar parameters (length of the flat vectors).
        dtype, device: of the parameters; vectors are converted to them.
        names, shapes: of the selected parameters, in flat order.
        params: the selected parameters (read-only property).
        num_hvps: Hessian-vector products computed so far (one per vector of every block).
        backend_used: the backend that ran (``"func"``/``"double_backward"``; None before the first product
            under ``"auto"``).
    """

    _kind = "HessianOperator"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        data: Any,
        params: Iterable[torch.Tensor] | Iterable[str] | None = None,
        *,
        backend: str = "auto",
        train_mode: bool = False,
        allow_nondeterministic: bool = False,
        check_determinism: bool = True,
        validate: bool = True,
    ) -> None:
        self._set_backend(backend)
        self._init_model(model, loss_fn, data, params, train_mode=train_mode,
                         allow_nondeterministic=allow_nondeterministic, check_determinism=check_determinism)
        self._what = "model/loss_fn"
        self._closure: Callable[[list[torch.Tensor]], torch.Tensor] | None = None
        if validate:
            self._validate()

    @classmethod
    def from_closure(
        cls,
        closure: Callable[[list[torch.Tensor]], torch.Tensor],
        params: torch.Tensor | Sequence[torch.Tensor],
        *,
        backend: str = "auto",
        allow_nondeterministic: bool = False,
        check_determinism: bool = True,
        validate: bool = True,
    ) -> HessianOperator:
        """The Hessian of ``closure(params) -> scalar`` at ``params``.

        ``closure`` receives a list of tensors shaped like ``params`` (one tensor is taken as a list of one)
        and must be twice differentiable with respect to them and side-effect free (it is called under
        ``torch.func`` transforms). The other arguments are as for the constructor.
        """
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        if isinstance(params, torch.Tensor):
            params = [params]
        params = list(params)
        if not params:
            raise ValueError("params is empty: the closure needs at least one tensor to differentiate")
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params[{i}] must be a tensor, got {type(p).__name__}")
        self = cls.__new__(cls)
        self._set_backend(backend)
        self._init_params(params, [f"params[{i}]" for i in range(len(params))], "params")
        self.model = None
        self.loss_fn = None
        self.train_mode = False
        self._frozen = {}
        self._batches = [(None, None)]
        self._weights = [1.0]
        self.num_samples = None
        self._what = "closure"
        self._closure = closure
        self.allow_nondeterministic = bool(allow_nondeterministic)
        self._auto_check = bool(check_determinism)
        if validate:
            self._validate()
        return self

    # ------------------------------------------------------------------------------------------------
    # Set-up and validation

    def _set_backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self._resolved: str | None = None if backend == "auto" else backend
        # The torch.func formulation in use; None until the first functional product picks one.
        self._transform: str | None = None

    def _loss(self, plist: Sequence[torch.Tensor], batch: int) -> torch.Tensor:
        """The loss of one batch (or the closure's loss) at the parameters ``plist``."""
        if self._closure is not None:
            return self._closure(list(plist))
        assert self.loss_fn is not None  # only a closure operator has none
        return self.loss_fn(self._forward(plist, batch), self._targets(batch))

    def _validate(self) -> None:
        leaves = [p.detach().requires_grad_(True) for p in self._params]
        with self._evaluation_mode(), torch.enable_grad():
            loss = self._loss(leaves, 0)
        self._check_loss(loss, "closure" if self._closure is not None else "loss_fn", "params")

    # ------------------------------------------------------------------------------------------------
    # Application

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        if self._resolved is None:
            self._resolved = AUTO_BACKEND_BY_DEVICE.get(self._params[0].device.type)
        if self._resolved is None:  # "auto", first use
            try:
                out = self._apply_func(V)
                self._resolved = "func"
                return out
            except _TransformFailure as exc:
                warnings.warn(
                    f"HessianOperator: torch.func could not transform the {self._what} ({exc.__cause__}); "
                    "falling back to the double-backward backend (slower: one backward pass per vector)",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self._resolved = "double_backward"
        if self._resolved == "func":
            try:
                return self._apply_func(V)
            except _TransformFailure as exc:  # worked before, fails now: report, do not switch mid-run
                raise self._not_twice_differentiable(exc.__cause__) from exc.__cause__
        return super()._apply(V)

    def _not_twice_differentiable(self, exc: BaseException | None) -> ValueError:
        return ValueError(
            f"the {self._what} is not twice differentiable with respect to params as written "
            f"({type(exc).__name__}: {exc})"
        )

    def _apply_func(self, V: torch.Tensor) -> torch.Tensor:
        """The functional backend: the transform chosen before, or the first of ``_FUNC_TRANSFORMS`` that works."""
        candidates = _FUNC_TRANSFORMS if self._transform is None else (self._transform,)
        error: BaseException | None = None
        for transform in candidates:
            self._transform = transform
            try:
                return super()._apply(V)
            except _TRANSFORM_ERRORS as exc:
                error = exc
        self._transform = None if len(candidates) > 1 else candidates[0]
        assert error is not None
        if self.backend == "func":
            raise self._not_twice_differentiable(error) from error
        raise _TransformFailure() from error

    def _block_product(self, batch: int, tangents: list[torch.Tensor]) -> torch.Tensor:
        """One batch's Hessian applied to a block, by the backend (and torch.func transform) in use."""
        if self._resolved == "double_backward":
            return self._double_backward_product(batch, tangents)
        assert self._transform is not None
        return self._func_product(batch, tangents, self._transform)

    def _func_product(self, batch: int, tangents: list[torch.Tensor], transform: str) -> torch.Tensor:
        primals = tuple(p.detach() for p in self._params)
        b = tangents[0].shape[0]

        def loss(*plist: torch.Tensor) -> torch.Tensor:
            return self._loss(plist, batch)

        grad = torch.func.grad(loss, argnums=tuple(range(len(primals))))
        if transform == "forward_over_reverse":

            def hvp(*tangent: torch.Tensor) -> tuple[torch.Tensor, ...]:
                products: tuple[torch.Tensor, ...] = torch.func.jvp(grad, primals, tangent)[1]
                return products

        else:
            # H v = d/dtheta <grad(theta), v>: the vjp of the gradient (H symmetric). The gradient's graph is
            # built once, outside vmap, and every tangent of the block backpropagates through it.
            _, pullback = torch.func.vjp(grad, *primals)  # type: ignore[misc]  # torch.func.vjp's annotation adds has_aux=True's 3-tuple

            def hvp(*tangent: torch.Tensor) -> tuple[torch.Tensor, ...]:
                products: tuple[torch.Tensor, ...] = pullback(tangent)
                return products

        # randomness="same": a random op (dropout in train mode) then draws one mask for the whole block
        # instead of failing; the determinism check reports it.
        parts = torch.func.vmap(hvp, randomness="same")(*tangents)
        return torch.cat([p.reshape(b, -1) for p in parts], dim=1)

    def _gradient_graph(self, batch: int) -> tuple[list[torch.Tensor], tuple[Any, ...], list[int], bool]:
        """Leaves, gradients with their graph, the indices of the gradients that have one, and whether the
        graph is kept for later products (NOTE: [shared graph])."""
        keep = self._sharing > 0 and len(self._weights) == 1 and not self.allow_nondeterministic
        version = tuple((p._version, p.data_ptr()) for p in self._params) if keep else ()
        if keep and self._shared is not None and self._shared[0] == (batch, version):
            _, leaves, grads, live = self._shared
            return leaves, grads, live, True
        self._shared = None
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(True) for p in self._params]
            loss = self._loss(leaves, batch)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        # NOTE: [constant gradients]
        # A gradient without a graph is constant in the parameters as far as autograd can tell: its
        # Hessian rows are zero (a loss linear in those parameters). When that holds for every parameter,
        # the far likelier cause is a backward that cannot be differentiated (once_differentiable, a detach
        # inside backward), which would otherwise pass silently as a zero Hessian, so it is an error.
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not live:
            raise _NoSecondDerivative()
        if keep:
            self._shared = ((batch, version), leaves, grads, live)
        return leaves, grads, live, keep

    def _double_backward_product(self, batch: int, tangents: list[torch.Tensor]) -> torch.Tensor:
        b = tangents[0].shape[0]
        out = torch.empty(b, self.n, dtype=self.dtype, device=self.device)
        try:
            leaves, grads, live, kept = self._gradient_graph(batch)
            with torch.enable_grad():
                for r in range(b):
                    hv = torch.autograd.grad(
                        [grads[i] for i in live],
                        leaves,
                        grad_outputs=[tangents[i][r] for i in live],
                        retain_graph=kept or r < b - 1,
                        allow_unused=True,
                    )
                    out[r] = torch.cat(
                        [(h if h is not None else torch.zeros_like(p)).reshape(-1) for h, p in zip(hv, leaves)]
                    )
        except _NoSecondDerivative:
            raise ValueError(
                f"the {self._what} is not twice differentiable with respect to params as written: its gradient "
                "has no autograd graph (a backward marked once_differentiable or detached, or a loss linear in "
                "every parameter, whose Hessian is zero)"
            ) from None
        except (RuntimeError, NotImplementedError) as exc:
            raise self._not_twice_differentiable(exc) from exc
        return out

    # ------------------------------------------------------------------------------------------------
    # Introspection

    @property
    def backend_used(self) -> str | None:
        """The backend that runs: ``"func"``/``"double_backward"``, or None while ``"auto"`` has not run yet."""
        return self._resolved

    @property
    def resolved_backend(self) -> str | None:
        """Same as :attr:`backend_used`."""
        return self._resolved

    @property
    def func_transform(self) -> str | None:
        """The torch.func formulation of the functional backend: ``"forward_over_reverse"`` (jvp of grad) or
        ``"reverse_over_reverse"`` (vjp of grad); None when the functional backend has not run."""
        return self._transform if self._resolved == "func" else None

    def __repr__(self) -> str:
        return (
            f"HessianOperator(n={self.n}, dtype={self.dtype}, device={self.device}, backend={self.backend!r}"
            f"{'' if self._resolved in (None, self.backend) else f' -> {self._resolved!r}'}, "
            f"params={len(self.shapes)}, batches={len(self._weights)}, hvps={self.num_hvps})"
        )
