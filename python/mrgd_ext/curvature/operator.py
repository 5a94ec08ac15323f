"""The curvature-operator type: symmetric linear operators on flat parameter vectors.

Two levels:

* :class:`LinearOperator`: what the Krylov solvers (``lanczos``, ``spectral_density``, ``hutchinson_trace``)
  apply: ``n``, ``dtype``, ``device``, ``matmat`` on blocks ``V [b, n]`` (rows in, rows out), ``matvec``,
  ``@``, ``to_dense``, ``unflatten`` and the product counter ``num_hvps``. Subclasses implement
  ``_matmat``. :func:`as_operator` wraps matrices and callables into one.
* :class:`CurvatureOperator`: a curvature matrix of ``L(theta) = sum_B (|B| / N) loss_fn(model(X_B), y_B)``
  at the current parameters over a fixed list of batches. It owns the parameter selection, the batches and
  their weights, the evaluation mode (eval, or train with every buffer restored), the determinism check and
  the flat <-> per-parameter views; a subclass (:class:`mrgd_ext.HessianOperator`,
  :class:`mrgd_ext.GGNOperator`) implements only :meth:`CurvatureOperator._block_product`, the product of
  one batch's curvature with a block of tangents.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import nn

from mrgd_ext._validation import check_not_sharded

__all__ = ["LinearOperator", "CurvatureOperator", "as_operator"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------------
# Generic linear operator


class LinearOperator(abc.ABC):
    """A symmetric linear operator on flat vectors of length ``n``.

    Attributes:
        n: length of the vectors.
        dtype, device: of the vectors it returns; inputs are converted to them.
        num_hvps: operator-vector products computed so far (one per row of every block, including those of
            internal checks such as :meth:`CurvatureOperator.check_determinism`).
        on_products: ``None`` or a callable called with the number of rows after every block product (e.g. a
            progress bar's ``update``).
    """

    n: int
    dtype: torch.dtype
    device: torch.device

    def _init_counter(self) -> None:
        self.num_hvps = 0
        self.on_products: Callable[[int], Any] | None = None

    def _count(self, rows: int) -> None:
        self.num_hvps += rows
        if self.on_products is not None:
            self.on_products(rows)

    @abc.abstractmethod
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """The operator applied to every row of ``V [b, n]`` (already in dtype/device, ``b >= 1``)."""

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """The operator applied to every row of ``V`` [b, n]: returns ``[b, n]`` (``V @ A``, A symmetric)."""
        if not isinstance(V, torch.Tensor) or V.dim() != 2 or V.shape[1] != self.n:
            shape = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise ValueError(f"matmat needs a block of shape [b, {self.n}], got {shape}")
        V = V.to(device=self.device, dtype=self.dtype)
        if V.shape[0] == 0:
            return torch.zeros_like(V)
        return self._matmat(V)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for a flat vector ``v`` [n]."""
        if not isinstance(v, torch.Tensor) or v.dim() != 1:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"matvec needs a vector of shape [{self.n}], got {shape}")
        return self.matmat(v.unsqueeze(0))[0]

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.matvec(other) if isinstance(other, torch.Tensor) and other.dim() == 1 else self.matmat(other)

    def to_dense(self, block_size: int = 64) -> torch.Tensor:
        """The full matrix [n, n] (n products; for small problems and tests)."""
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        eye = torch.eye(self.n, dtype=self.dtype, device=self.device)
        return torch.cat([self.matmat(eye[i : i + block_size]) for i in range(0, self.n, block_size)])

    def unflatten(self, vec: torch.Tensor) -> list[torch.Tensor]:
        """A flat vector (or block) -> its per-parameter parts; a plain operator has one part, the vector."""
        return [vec]

    def share_graph(self) -> contextlib.AbstractContextManager[None]:
        """A context in which the caller promises the operator does not change (NOTE: [shared graph]); an
        operator that can save work from that promise does (:class:`mrgd_ext.HessianOperator`), the others
        ignore it."""
        return contextlib.nullcontext()


class _Operator(LinearOperator):
    """A :class:`LinearOperator` around a block product ``matmat(V [b, n]) -> [b, n]``."""

    def __init__(self, matmat: Callable[[torch.Tensor], torch.Tensor], n: int, dtype: torch.dtype,
                 device: torch.device, unflatten: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
                 share_graph: Callable[[], contextlib.AbstractContextManager[None]] | None = None):
        self._product = matmat
        self.n = int(n)
        self.dtype = dtype
        self.device = torch.device(device)
        # Instance attributes replace the methods (callables of the same signature, without self).
        if unflatten is not None:
            self.unflatten = unflatten  # type: ignore[assignment]
        if share_graph is not None:
            self.share_graph = share_graph  # type: ignore[method-assign]
        self._init_counter()

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self._product(V)
        self._count(V.shape[0])
        return out

    def __repr__(self) -> str:
        return f"LinearOperator(n={self.n}, dtype={self.dtype}, device={self.device}, hvps={self.num_hvps})"


_F = TypeVar("_F", bound=Callable[..., Any])


def at_one_point(fn: _F) -> _F:
    """Run ``fn(op, ...)`` inside ``op.share_graph()`` when ``op`` has one: every product a Krylov routine
    makes is at the same parameters (NOTE: [shared graph])."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        op = args[0] if args else kwargs.get("op")
        share = getattr(op, "share_graph", None)
        with share() if callable(share) else contextlib.nullcontext():
            return fn(*args, **kwargs)

    return cast(_F, wrapper)


def as_operator(op: Any, *, n: int | None = None, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None, name: str = "op") -> LinearOperator:
    """``op`` as a :class:`LinearOperator`, for the Krylov solvers.

    ``op`` is a :class:`LinearOperator` (returned as is: a :class:`mrgd_ext.HessianOperator` or
    :class:`mrgd_ext.GGNOperator`), an object with ``matmat``, ``n``, ``dtype`` and ``device``, a symmetric
    matrix (tensor or numpy array ``[n, n]``, converted to ``dtype``/``device`` when given), or a callable
    ``f(V [b, n]) -> [b, n]`` applying the operator to every row of a block (then ``n`` is required;
    ``dtype`` defaults to float64, ``device`` to CPU).
    """
    if isinstance(op, LinearOperator):
        return op
    if hasattr(op, "matmat") and hasattr(op, "n") and hasattr(op, "dtype") and hasattr(op, "device"):
        return _Operator(op.matmat, int(op.n), op.dtype, torch.device(op.device), getattr(op, "unflatten", None),
                         getattr(op, "share_graph", None))
    if isinstance(op, np.ndarray):
        op = torch.from_numpy(op)
    if isinstance(op, torch.Tensor):
        if op.dim() != 2 or op.shape[0] != op.shape[1]:
            raise ValueError(f"{name}: a matrix operator must be square [n, n], got shape {tuple(op.shape)}")
        if not op.dtype.is_floating_point:
            raise TypeError(f"{name}: a matrix operator must be floating point, got {op.dtype}")
        a = op.to(dtype=dtype or op.dtype, device=device or op.device)
        if a.shape[0] > 0:
            scale = float(a.abs().max())
            asym = float((a - a.T).abs().max())
            if asym > 100 * torch.finfo(a.dtype).eps * max(scale, 1e-300) * math.sqrt(a.shape[0]):
                raise ValueError(f"{name}: the matrix is not symmetric (max |A - A^T| = {asym:.3g})")
        # V @ A = (A V^T)^T for symmetric A: rows in, rows out.
        return _Operator(lambda V: V @ a, int(a.shape[0]), a.dtype, a.device)
    if callable(op):
        if n is None:
            raise ValueError(f"{name}: a callable operator needs n= (the length of the vectors it acts on)")
        dt = dtype or torch.float64
        dev = torch.device(device) if device is not None else torch.device("cpu")

        def matmat(V: torch.Tensor) -> torch.Tensor:
            out = op(V)
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(V.shape):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(
                    f"{name}: the callable must map a block [b, n] to [b, n]; for {tuple(V.shape)} it returned {got}"
                )
            return out.to(dtype=dt, device=dev)

        return _Operator(matmat, int(n), dt, dev)
    raise TypeError(
        f"{name} must be a LinearOperator (HessianOperator, GGNOperator, or an object with matmat/n/dtype/device), "
        f"a symmetric matrix or a callable on [b, n] blocks, got {type(op).__name__}"
    )


# ----------------------------------------------------------------------------------------------------------
# Data: a fixed list of batches


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
        raise ValueError("data is empty: the operator needs at least one batch")
    return batches


def _select(model: nn.Module, params: Iterable[torch.Tensor] | Iterable[str] | None) -> list[tuple[str, torch.Tensor]]:
    """``params=`` (None, parameters or names) -> ``[(name, parameter)]`` in the given order."""
    named: dict[str, torch.Tensor] = dict(model.named_parameters())
    if params is None:
        selected = [(name, p) for name, p in named.items() if p.requires_grad]
        if not selected:
            raise ValueError("params is empty: the model has no parameter with requires_grad=True")
        return selected
    items: Iterable[torch.Tensor | str] = [params] if isinstance(params, (torch.Tensor, str)) else params
    by_id = {id(p): name for name, p in named.items()}
    selected = []
    for i, p in enumerate(items):
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
    return selected


# ----------------------------------------------------------------------------------------------------------
# Model-based curvature operators


class CurvatureOperator(LinearOperator):
    """Base of the curvature matrices of a fixed loss at the current parameters (module docstring).

    Args (shared by the subclasses' constructors):
        model: the ``nn.Module``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (mean over the batch, as ``nn.CrossEntropyLoss()``).
        data: one ``(inputs, targets)`` pair or an iterable of pairs (e.g. a ``DataLoader``), read once at
            construction and moved to the parameters' device: the operator always uses this fixed subset.
            ``inputs`` is a tensor or a tuple of tensors (positional arguments of ``model``; wrap a single
            batch with tuple inputs in a list, ``[((x1, x2), y)]``, so it is not read as two batches). Batch ``B``
            enters with weight ``|B| / N`` (``N`` = total samples), so for a mean-reduced loss the operator
            is the curvature of the mean loss over the subset however it is split into batches.
        params: the parameters to differentiate with respect to: ``None`` (all parameters with
            ``requires_grad``), or an iterable of the model's parameters or of their names.
        train_mode: evaluate the model in ``eval()`` mode (default) or, when True, in ``train()`` mode.
            In train mode BatchNorm normalises with batch statistics; its running statistics are not updated
            (every buffer is snapshot before and restored after each application, exactly). Either way the
            model's own train/eval flags are restored afterwards.
        allow_nondeterministic: do not raise when two applications to the same vector differ (dropout in
            train mode, nondeterministic GPU kernels); see :meth:`check_determinism`.
        check_determinism: run :meth:`check_determinism` automatically on first use (two extra products, once).

    Attributes:
        n, dtype, device, num_hvps, on_products: see :class:`LinearOperator`.
        names, shapes: of the selected parameters, in flat order.
        num_samples: ``N``, the number of samples in ``data`` (None for a closure).
        model, loss_fn, train_mode, allow_nondeterministic: as given.
    """

    #: Name used in messages ("HessianOperator", ...).
    _kind = "CurvatureOperator"

    def _init_model(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        data: Any,
        params: Iterable[torch.Tensor] | Iterable[str] | None,
        *,
        train_mode: bool,
        allow_nondeterministic: bool,
        check_determinism: bool,
    ) -> None:
        """Set up the model, loss, selection and batches (for subclass constructors)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        selected = _select(model, params)
        self._init_params([p for _, p in selected], [name for name, _ in selected], "params")
        self.model: nn.Module | None = model
        self.loss_fn: Callable[[Any, Any], torch.Tensor] | None = loss_fn
        self.train_mode = bool(train_mode)
        chosen = {name for name, _ in selected}
        # Parameters outside the selection enter as constants (detached, so no graph reaches them).
        self._frozen = {name: p.detach() for name, p in model.named_parameters() if name not in chosen}
        batches = _as_batches(data)
        sizes = [_batch_size(x) for x, _ in batches]
        total = sum(sizes)
        if total == 0:
            raise ValueError("data has no samples")
        self._batches: list[tuple[Any, Any]] = [
            (_to_device(x, self.device), _to_device(y, self.device)) for x, y in batches
        ]
        self._weights = [s / total for s in sizes]
        self.num_samples: int | None = total
        self.allow_nondeterministic = bool(allow_nondeterministic)
        self._auto_check = bool(check_determinism)

    def _init_params(self, params: list[torch.Tensor], names: list[str], arg: str) -> None:
        """Record the parameters (one floating dtype and device), their names and shapes."""
        check_not_sharded(params, self._kind)  # NOTE: [no FSDP2 curvature]
        dtype, device = params[0].dtype, params[0].device
        for name, p in zip(names, params):
            if not p.dtype.is_floating_point or p.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{arg}: {name} has dtype {p.dtype}; the {self._kind} needs floating-point parameters")
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
            raise ValueError(f"{arg} has no elements: the {self._kind} of zero parameters is empty")
        self.dtype = dtype
        self.device = device
        self._checked = False
        self._sharing = 0  # depth of share_graph() contexts
        self._shared: Any = None  # what a subclass keeps while sharing (NOTE: [shared graph])
        self._init_counter()

    @staticmethod
    def _check_loss(loss: Any, what: str, depends_on: str) -> None:
        """``loss`` (evaluated with grad enabled) must be a real scalar tensor with an autograd graph."""
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
                f"{what}'s loss does not depend on {depends_on} (no autograd graph: was it detached, or computed "
                "without the given tensors?); the curvature is undefined"
            )

    @property
    def sample_shapes(self) -> tuple[tuple[int, ...], ...] | None:
        """Per-sample shapes (all but the leading batch dimension) of every tensor of the first probe batch,
        inputs then targets; None for a closure operator. :class:`mrgd_ext.DistributedOperator` compares them
        across ranks."""
        if self.model is None:
            return None
        leaves = torch.utils._pytree.tree_leaves(self._batches[0])
        return tuple(tuple(int(d) for d in t.shape[1:]) for t in leaves if isinstance(t, torch.Tensor))

    @property
    def params(self) -> list[torch.Tensor]:
        """The selected parameters, in flat order (a new list; the tensors are the model's own)."""
        return list(self._params)

    def _parameter_dict(self, plist: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's parameters for ``functional_call``: the selection replaced by ``plist``."""
        tensors = dict(self._frozen)
        tensors.update(zip(self.names, plist))
        return tensors

    def _forward(self, plist: Sequence[torch.Tensor], batch: int) -> Any:
        """The model's outputs on one batch at the parameters ``plist``."""
        inputs = self._batches[batch][0]
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        assert self.model is not None
        return torch.func.functional_call(self.model, self._parameter_dict(plist), args)

    def _targets(self, batch: int) -> Any:
        return self._batches[batch][1]

    @contextlib.contextmanager
    def _evaluation_mode(self) -> Iterator[None]:
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
        return [part.reshape(*lead, *shape) for part, shape in zip(torch.split(vec, self._numels, dim=-1), self.shapes)]

    # ------------------------------------------------------------------------------------------------
    # Application

    @contextlib.contextmanager
    def share_graph(self) -> Iterator[None]:
        """Products inside this context may share work that depends only on the parameters' values.

        NOTE: [shared graph]
        A measurement (Lanczos, the complement's top, SLQ) applies the operator tens of times at one point.
        The double-backward Hessian product rebuilds the loss and its gradient graph for every block; inside
        this context it builds them once and differentiates the same graph again for each block (one backward
        pass per vector instead of a forward, a backward and a backward per vector: a first measurement's
        product took 2.8-3.4 ms instead of 4.1-4.6 on the suite's multiscale MLP, whose training step takes
        ~2.4 ms, and 33-34 ms instead of 52-55 on its CNN, step ~13.5 ms). The results are the same, bit for
        bit. The saved graph is checked against the parameters' version counters at every product and
        rebuilt if they were written in place; it is kept only for an operator of one batch (several batches
        are how a caller bounds the memory of one graph, and keeping all of them would defeat that) and not
        when ``allow_nondeterministic`` (dropout would keep one mask for every product). It is released when
        the outermost context exits. The caller promises that nothing else the loss reads (a closure's
        captured state, the model's buffers) changes inside the context.
        """
        self._sharing += 1
        try:
            yield
        finally:
            self._sharing -= 1
            if self._sharing == 0:
                self._shared = None

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self._auto_check and not self._checked:
            self._checked = True
            self.check_determinism()
        return self._apply(V)

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        """``sum_B w_B C_B V`` over the batches in the evaluation mode, counted (no determinism check)."""
        tangents = self.unflatten(V)  # [b, *shape] views
        out = torch.zeros_like(V)
        with self._evaluation_mode():
            for batch, weight in enumerate(self._weights):
                out.add_(self._block_product(batch, tangents), alpha=weight)
        self._count(V.shape[0])
        return out

    @abc.abstractmethod
    def _block_product(self, batch: int, tangents: list[torch.Tensor]) -> torch.Tensor:
        """Batch ``batch``'s curvature applied to the tangents (``[b, *shape]`` per parameter): ``[b, n]``.

        Runs inside the evaluation mode; the parameters' current values are ``self._params``.
        """

    def check_determinism(self, rtol: float | None = None, seed: int = 0) -> float:
        """Apply the operator twice to one random vector and compare.

        Returns the relative difference ``|Av - Av'| / |Av|``. Raises ``RuntimeError`` when it exceeds
        ``rtol`` (default ``sqrt(eps)`` of the dtype: bitwise-identical results pass, and so do the
        last-bit differences of GPU kernels that add in a varying order; dropout does not), unless the
        operator was built with ``allow_nondeterministic=True``. Costs two products.
        """
        self._checked = True
        tol = math.sqrt(torch.finfo(self.dtype).eps) if rtol is None else float(rtol)
        gen = torch.Generator().manual_seed(int(seed))
        v = torch.randn(1, self.n, generator=gen, dtype=torch.float64).to(device=self.device, dtype=self.dtype)
        sharing, shared = self._sharing, self._shared
        self._sharing, self._shared = 0, None  # two independent evaluations, not one graph differentiated twice
        try:
            first = self._apply(v)
            second = self._apply(v)
        finally:
            self._sharing, self._shared = sharing, shared
        scale = float(torch.linalg.vector_norm(first.double()))
        diff = float(torch.linalg.vector_norm((first - second).double()))
        rel = diff / scale if scale > 0 else diff
        if rel > tol and not self.allow_nondeterministic:
            raise RuntimeError(
                f"{self._kind} is not deterministic: two applications to the same vector differ by "
                f"{rel:.3g} (relative) > {tol:.3g}. Krylov methods need one fixed operator; remove the source "
                "of randomness (dropout: use train_mode=False; nondeterministic GPU kernels) or pass "
                "allow_nondeterministic=True"
            )
        return rel

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self.n}, dtype={self.dtype}, device={self.device}, "
            f"params={len(self.shapes)}, batches={len(self._weights)}, hvps={self.num_hvps})"
        )
