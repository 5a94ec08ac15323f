"""Hessian-vector products as a linear operator over a flat parameter vector.

:class:`HessianOperator` is the operator the spectrum tools (``mrgd_ext.curvature.lanczos``, ``spectral_density``,
``hutchinson_trace``) apply: ``H = d^2 L / d theta^2`` of one fixed loss ``L`` at the current parameters,
acting on blocks of flat vectors ``V [b, n]`` (``n`` = number of parameter elements in the selection).

Two ways to build it:

* ``HessianOperator(model, loss_fn, data, params=None)``: ``L(theta) = sum_batches (|B| / N) *
  loss_fn(model(X_B), y_B)`` over a fixed list of batches (``data`` is one ``(X, y)`` pair or an iterable of
  pairs, materialised once: every application sees the same data). ``params`` selects the parameters to
  differentiate (default: all with ``requires_grad``); the rest stay constants.
* ``HessianOperator.from_closure(closure, params)``: ``L = closure(params)``, ``params`` a list of tensors.

Backends (``backend=``):

* ``"func"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad`` (over
  ``torch.func.functional_call`` for models), vectorised over the ``b`` tangents of a block with
  ``torch.func.vmap``; the forward and backward pass of the primal are shared by the whole block.
* ``"double_backward"``: ``torch.autograd.grad`` with ``create_graph=True`` and one backward pass of the
  gradient per tangent; works for models ``torch.func`` cannot transform (in-place tricks, hooks, custom
  ``autograd.Function`` without ``setup_context``).
* ``"auto"`` (default): ``"double_backward"`` for parameters on the CPU (measured 3-5x faster there than
  ``"func"`` per product on small networks and linear models, and without ``"func"``'s first-call cost of up
  to seconds: benchmarks/results/training_cpu.md); elsewhere ``"func"``, falling back to
  ``"double_backward"`` with a warning the first time the functional transform fails.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["HessianOperator", "BACKENDS"]

#: Values accepted for ``backend=``.
BACKENDS: tuple[str, ...] = ("auto", "func", "double_backward")

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _TransformFailure(Exception):
    """Raised inside the functional backend when torch.func cannot transform the loss."""


class _NoSecondDerivative(Exception):
    """Raised inside the double-backward backend when no gradient has an autograd graph."""


def _batch_size(inputs: Any) -> int:
    first = inputs
    while isinstance(first, (tuple, list)):
        if not first:
            raise ValueError("data: a batch's inputs are an empty tuple")
        first = first[0]
    if isinstance(first, dict):
        first = next(iter(first.values()))
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise ValueError("data: each batch's inputs must be a tensor (or tuple of tensors) with a batch dimension")
    return int(first.shape[0])


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def _as_batches(data: Any) -> list[tuple[Any, Any]]:
    """``(X, y)`` or an iterable of ``(X, y)`` pairs -> a list of pairs (materialised once)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return [(data[0], data[1])]
    if isinstance(data, torch.Tensor):
        raise TypeError("data must be an (inputs, targets) pair or an iterable of such pairs, got a single tensor")
    try:
        items = list(data)
    except TypeError:
        raise TypeError(
            f"data must be an (inputs, targets) pair or an iterable of such pairs, got {type(data).__name__}"
        ) from None
    batches = []
    for i, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"data: batch {i} must be an (inputs, targets) pair, got {type(item).__name__}")
        batches.append((item[0], item[1]))
    if not batches:
        raise ValueError("data is empty: the Hessian needs at least one batch")
    return batches


class HessianOperator:
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
        num_hvps: Hessian-vector products computed so far (one per vector of every block).
    """

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
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        named = dict(model.named_parameters())
        if params is None:
            selected = [(name, p) for name, p in named.items() if p.requires_grad]
            if not selected:
                raise ValueError("params is empty: the model has no parameter with requires_grad=True")
        else:
            by_id = {id(p): name for name, p in named.items()}
            selected = []
            for i, p in enumerate(params):
                if isinstance(p, str):
                    if p not in named:
                        raise ValueError(f"params[{i}]: the model has no parameter named {p!r}")
                    selected.append((p, named[p]))
                elif isinstance(p, torch.Tensor):
                    if id(p) not in by_id:
                        raise ValueError(f"params[{i}] is not a parameter of the model")
                    selected.append((by_id[id(p)], p))
                else:
                    raise TypeError(f"params[{i}] must be a parameter of the model or its name, got {type(p).__name__}")
            if not selected:
                raise ValueError("params is empty: select at least one parameter")
            if len({name for name, _ in selected}) != len(selected):
                raise ValueError("params lists the same parameter twice")
        self._setup([p for _, p in selected], [name for name, _ in selected], "params", backend)
        self.model = model
        self.loss_fn = loss_fn
        self.train_mode = bool(train_mode)
        chosen = {name for name, _ in selected}
        # Parameters outside the selection enter as constants (detached, so no graph reaches them).
        self._frozen = {name: p.detach() for name, p in named.items() if name not in chosen}
        batches = _as_batches(data)
        sizes = [_batch_size(x) for x, _ in batches]
        total = sum(sizes)
        if total == 0:
            raise ValueError("data has no samples")
        self._batches = [(_to_device(x, self.device), _to_device(y, self.device)) for x, y in batches]
        self._weights = [s / total for s in sizes]
        self.num_samples = total
        self._what = "model/loss_fn"
        self._closure = None
        self.allow_nondeterministic = bool(allow_nondeterministic)
        self._auto_check = bool(check_determinism)
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
        self._setup(params, [f"params[{i}]" for i in range(len(params))], "params", backend)
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

    def _setup(self, params: list[torch.Tensor], names: list[str], arg: str, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        dtype, device = params[0].dtype, params[0].device
        for name, p in zip(names, params):
            if not p.dtype.is_floating_point or p.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{arg}: {name} has dtype {p.dtype}; the Hessian needs floating-point parameters")
            if p.dtype != dtype:
                raise TypeError(f"{arg}: {name} has dtype {p.dtype} but {names[0]} has {dtype}: one dtype per operator")
            if p.device != device:
                raise ValueError(
                    f"{arg}: {name} is on {p.device} but {names[0]} is on {device}: one device per operator"
                )
        self._params = list(params)
        self.names = list(names)
        self.shapes = [tuple(p.shape) for p in params]
        self._numels = [p.numel() for p in params]
        self.n = int(sum(self._numels))
        if self.n == 0:
            raise ValueError(f"{arg} has no elements: the Hessian of zero parameters is empty")
        self.dtype = dtype
        self.device = device
        self.backend = backend
        self._resolved = None if backend == "auto" else backend
        self.num_hvps = 0
        self._checked = False

    def _loss(self, plist: Sequence[torch.Tensor], batch: int) -> torch.Tensor:
        """The loss of one batch (or the closure's loss) at the parameters ``plist``."""
        if self._closure is not None:
            return self._closure(list(plist))
        inputs, targets = self._batches[batch]
        tensors = dict(self._frozen)
        tensors.update(zip(self.names, plist))
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        out = torch.func.functional_call(self.model, tensors, args)
        return self.loss_fn(out, targets)

    def _validate(self) -> None:
        leaves = [p.detach().requires_grad_(True) for p in self._params]
        with self._evaluation_mode(), torch.enable_grad():
            loss = self._loss(leaves, 0)
        what = "closure" if self._closure is not None else "loss_fn"
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"{what} must return a tensor, got {type(loss).__name__}")
        if loss.numel() != 1 or loss.dim() > 1:
            raise ValueError(
                f"{what} must return a scalar loss, got shape {tuple(loss.shape)} (reduce it, e.g. reduction='mean')"
            )
        if not loss.dtype.is_floating_point:
            raise TypeError(f"{what} must return a real floating-point loss, got {loss.dtype}")
        if not loss.requires_grad:
            raise ValueError(
                f"{what}'s loss does not depend on params (no autograd graph: was it detached, or computed "
                "without the given tensors?); the Hessian is undefined"
            )

    @contextlib.contextmanager
    def _evaluation_mode(self):
        """eval() (or train() with frozen BatchNorm statistics) for the duration; everything restored."""
        if self.model is None:
            yield
            return
        flags = [(m, m.training) for m in self.model.modules()]
        saved_buffers = []
        bn_flags = []
        try:
            self.model.train(self.train_mode)
            if self.train_mode:
                # NOTE: [train-mode buffers]
                # Train-mode BatchNorm would update its running statistics in place on every forward pass
                # (and an in-place write of a batched tangent is illegal under vmap). With
                # track_running_stats off it normalises with batch statistics and touches no buffer; the
                # snapshot-and-restore below guarantees the buffers end exactly as they were even for
                # modules that update other buffers.
                for m in self.model.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        bn_flags.append((m, m.track_running_stats))
                        m.track_running_stats = False
                saved_buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
            yield
        finally:
            with torch.no_grad():
                for buf, copy in saved_buffers:
                    buf.copy_(copy)
            for m, flag in bn_flags:
                m.track_running_stats = flag
            for m, training in flags:
                m.training = training

    # ------------------------------------------------------------------------------------------------
    # Flat <-> per-parameter views

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-parameter tensors -> one flat vector [n] (or [b, n] when each has a leading batch dimension
        of size b), in this operator's parameter order."""
        tensors = list(tensors)
        if len(tensors) != len(self.shapes):
            raise ValueError(f"flatten needs {len(self.shapes)} tensors (one per parameter), got {len(tensors)}")
        batched = tensors[0].dim() == len(self.shapes[0]) + 1
        parts = []
        for i, (t, shape) in enumerate(zip(tensors, self.shapes)):
            expected = t.shape[1:] if batched else t.shape
            if tuple(expected) != shape or (batched and t.shape[0] != tensors[0].shape[0]):
                raise ValueError(
                    f"flatten: tensors[{i}] has shape {tuple(t.shape)}, parameter {self.names[i]} has {shape}"
                )
            parts.append(t.reshape(t.shape[0], -1) if batched else t.reshape(-1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, vec: torch.Tensor) -> list[torch.Tensor]:
        """A flat vector [n] (or block [b, n]) -> views shaped like the parameters ([b, *shape] for a block)."""
        if vec.shape[-1] != self.n or vec.dim() not in (1, 2):
            raise ValueError(f"unflatten needs a tensor of shape [{self.n}] or [b, {self.n}], got {tuple(vec.shape)}")
        lead = () if vec.dim() == 1 else (vec.shape[0],)
        return [part.reshape(*lead, *shape) for part, shape in zip(vec.split(self._numels, dim=-1), self.shapes)]

    # ------------------------------------------------------------------------------------------------
    # Application

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector ``v`` [n]."""
        if v.dim() != 1:
            raise ValueError(f"matvec needs a vector of shape [{self.n}], got {tuple(v.shape)}")
        return self.matmat(v.unsqueeze(0))[0]

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.matvec(other) if other.dim() == 1 else self.matmat(other)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H`` applied to every row of ``V`` [b, n]: returns ``[b, n]`` (``V @ H``, H symmetric)."""
        if not isinstance(V, torch.Tensor) or V.dim() != 2 or V.shape[1] != self.n:
            shape = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise ValueError(f"matmat needs a block of shape [b, {self.n}], got {shape}")
        V = V.to(device=self.device, dtype=self.dtype)
        if self._auto_check and not self._checked:
            self._checked = True
            self.check_determinism()
        if V.shape[0] == 0:
            return torch.zeros_like(V)
        return self._apply(V)

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        if self._resolved is None and self._params[0].device.type == "cpu":
            self._resolved = "double_backward"  # "auto" on the CPU (module docstring)
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
                    stacklevel=3,
                )
                self._resolved = "double_backward"
        if self._resolved == "func":
            try:
                return self._apply_func(V)
            except _TransformFailure as exc:  # worked before, fails now: report, do not switch mid-run
                raise self._not_twice_differentiable(exc.__cause__) from exc.__cause__
        return self._apply_double_backward(V)

    def _not_twice_differentiable(self, exc: BaseException) -> ValueError:
        return ValueError(
            f"the {self._what} is not twice differentiable with respect to params as written "
            f"({type(exc).__name__}: {exc})"
        )

    def _apply_func(self, V: torch.Tensor) -> torch.Tensor:
        primals = tuple(p.detach() for p in self._params)
        tangents = tuple(self.unflatten(V))  # [b, *shape] views
        out = torch.zeros_like(V)
        try:
            with self._evaluation_mode():
                for batch, weight in enumerate(self._weights):

                    def loss(*plist, batch=batch):
                        return self._loss(plist, batch)

                    grad = torch.func.grad(loss, argnums=tuple(range(len(primals))))

                    def hvp(*tangent, grad=grad):
                        return torch.func.jvp(grad, primals, tangent)[1]

                    # randomness="same": a random op (dropout in train mode) then draws one mask for the
                    # whole block instead of failing; the determinism check reports it.
                    parts = torch.func.vmap(hvp, randomness="same")(*tangents)
                    out.add_(torch.cat([p.reshape(V.shape[0], -1) for p in parts], dim=1), alpha=weight)
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            if self.backend == "func":
                raise self._not_twice_differentiable(exc) from exc
            raise _TransformFailure() from exc
        self.num_hvps += V.shape[0]
        return out

    def _apply_double_backward(self, V: torch.Tensor) -> torch.Tensor:
        tangents = self.unflatten(V)
        out = torch.zeros_like(V)
        b = V.shape[0]
        try:
            with self._evaluation_mode(), torch.enable_grad():
                for batch, weight in enumerate(self._weights):
                    leaves = [p.detach().requires_grad_(True) for p in self._params]
                    loss = self._loss(leaves, batch)
                    grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
                    # NOTE: [constant gradients]
                    # A gradient without a graph is constant in the parameters as far as autograd can
                    # tell: its Hessian rows are zero (a loss linear in those parameters). When that holds
                    # for every parameter, the far likelier cause is a backward that cannot be
                    # differentiated (once_differentiable, a detach inside backward), which would otherwise
                    # pass silently as a zero Hessian, so it is an error.
                    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                    if not live:
                        raise _NoSecondDerivative()
                    for r in range(b):
                        hv = torch.autograd.grad(
                            [grads[i] for i in live],
                            leaves,
                            grad_outputs=[tangents[i][r] for i in live],
                            retain_graph=r < b - 1,
                            allow_unused=True,
                        )
                        row = torch.cat(
                            [(h if h is not None else torch.zeros_like(p)).reshape(-1) for h, p in zip(hv, leaves)]
                        )
                        out[r].add_(row, alpha=weight)
        except _NoSecondDerivative:
            raise ValueError(
                f"the {self._what} is not twice differentiable with respect to params as written: its gradient "
                "has no autograd graph (a backward marked once_differentiable or detached, or a loss linear in "
                "every parameter, whose Hessian is zero)"
            ) from None
        except (RuntimeError, NotImplementedError) as exc:
            raise self._not_twice_differentiable(exc) from exc
        self.num_hvps += b
        return out

    # ------------------------------------------------------------------------------------------------
    # Checks and helpers

    def check_determinism(self, rtol: float | None = None, seed: int = 0) -> float:
        """Apply the operator twice to one random vector and compare.

        Returns the relative difference ``|Hv - Hv'| / |Hv|``. Raises ``RuntimeError`` when it exceeds
        ``rtol`` (default ``sqrt(eps)`` of the dtype: bitwise-identical results pass, and so do the
        last-bit differences of GPU kernels that add in a varying order; dropout does not), unless the
        operator was built with ``allow_nondeterministic=True``. Costs two Hessian-vector products.
        """
        self._checked = True
        tol = math.sqrt(torch.finfo(self.dtype).eps) if rtol is None else float(rtol)
        gen = torch.Generator().manual_seed(int(seed))
        v = torch.randn(1, self.n, generator=gen, dtype=torch.float64).to(device=self.device, dtype=self.dtype)
        first = self._apply(v)
        second = self._apply(v)
        scale = float(torch.linalg.vector_norm(first.double()))
        diff = float(torch.linalg.vector_norm((first - second).double()))
        rel = diff / scale if scale > 0 else diff
        if rel > tol and not self.allow_nondeterministic:
            raise RuntimeError(
                f"HessianOperator is not deterministic: two applications to the same vector differ by "
                f"{rel:.3g} (relative) > {tol:.3g}. Krylov methods need one fixed operator; remove the source "
                "of randomness (dropout: use train_mode=False; nondeterministic GPU kernels) or pass "
                "allow_nondeterministic=True"
            )
        return rel

    def to_dense(self, block_size: int = 64) -> torch.Tensor:
        """The full Hessian [n, n] (n Hessian-vector products; for small problems and tests)."""
        eye = torch.eye(self.n, dtype=self.dtype, device=self.device)
        return torch.cat([self.matmat(eye[i : i + block_size]) for i in range(0, self.n, block_size)])

    @property
    def resolved_backend(self) -> str | None:
        """The backend in use: ``"func"``/``"double_backward"``, or None while ``"auto"`` has not run yet."""
        return self._resolved

    def __repr__(self) -> str:
        return (
            f"HessianOperator(n={self.n}, dtype={self.dtype}, device={self.device}, backend={self.backend!r}"
            f"{'' if self._resolved in (None, self.backend) else f' -> {self._resolved!r}'}, "
            f"params={len(self.shapes)}, batches={len(self._weights)}, hvps={self.num_hvps})"
        )
