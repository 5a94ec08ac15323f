"""Generalized Gauss-Newton products as a linear operator over a flat parameter vector.

For ``L(theta) = sum_B (|B| / N) loss_fn(f(theta, X_B), y_B)`` the Hessian splits into
``J^T H_L J + sum_k (dL/df_k) d^2 f_k / d theta^2`` (``J = df/dtheta`` the Jacobian of the model outputs,
``H_L = d^2 loss_fn / df^2`` the Hessian of the loss in output space). :class:`GGNOperator` applies the first
term, the generalized Gauss-Newton matrix

    ``G = sum_B (|B| / N) J_B^T H_{L,B} J_B``,

which is positive semi-definite whenever ``loss_fn`` is convex in the outputs (mean squared error,
cross-entropy on logits) and equals the Hessian when the model is linear in its parameters. It is the usual
curvature for training: it needs no second derivative of the model, and a PSD operator has no negative
eigenvalues for Lanczos or SLQ to resolve.

Each block ``V [b, n]`` is applied per batch with ``torch.func``, vectorised over the ``b`` tangents:
``J v`` by ``jvp`` through the model, ``H_L u`` by the ``vjp`` of the loss's output-space gradient (one
backward graph per batch, shared by the block), ``J^T w`` by the ``vjp`` of the model outputs (one forward
pass per batch, shared by the block).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from mrgd_ext.curvature.operator import CurvatureOperator

__all__ = ["GGNOperator"]


class GGNOperator(CurvatureOperator):
    """The generalized Gauss-Newton matrix ``J^T H_L J`` of a fixed loss at the current parameters.

    Args:
        model: the ``nn.Module``; its output (for the inputs of a batch) must be one floating-point tensor.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (mean over the batch, as ``nn.CrossEntropyLoss()``),
            twice differentiable in ``outputs``. The operator is positive semi-definite when ``loss_fn`` is
            convex in the outputs.
        data, params, train_mode, allow_nondeterministic, check_determinism: as for
            :class:`mrgd_ext.HessianOperator` (see :class:`mrgd_ext.curvature.operator.CurvatureOperator`).
        validate: evaluate the model and loss once at construction to check the output is a floating-point
            tensor and the loss a real scalar that depends on it.

    Attributes:
        n, dtype, device, names, shapes, params, num_samples: as for :class:`mrgd_ext.HessianOperator`.
        num_hvps: GGN-vector products computed so far (one per vector of every block).
    """

    _kind = "GGNOperator"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        data: Any,
        params: Iterable[torch.Tensor] | Iterable[str] | None = None,
        *,
        train_mode: bool = False,
        allow_nondeterministic: bool = False,
        check_determinism: bool = True,
        validate: bool = True,
    ) -> None:
        self._init_model(model, loss_fn, data, params, train_mode=train_mode,
                         allow_nondeterministic=allow_nondeterministic, check_determinism=check_determinism)
        if validate:
            self._validate()

    def _validate(self) -> None:
        with self._evaluation_mode(), torch.enable_grad():
            leaves = [p.detach().requires_grad_(True) for p in self._params]
            out = self._forward(leaves, 0)
            if not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point:
                got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
                raise TypeError(f"model must return one floating-point tensor for the GGN, got {got}")
            if not out.requires_grad:
                raise ValueError("model's output does not depend on params: the GGN is undefined")
            outputs = out.detach().requires_grad_(True)
            assert self.loss_fn is not None  # set by the constructor
            loss = self.loss_fn(outputs, self._targets(0))
        self._check_loss(loss, "loss_fn", "the model's outputs")

    def _block_product(self, batch: int, tangents: list[torch.Tensor]) -> torch.Tensor:
        primals = tuple(p.detach() for p in self._params)
        targets = self._targets(batch)
        b = tangents[0].shape[0]

        def outputs_of(*plist: torch.Tensor) -> torch.Tensor:
            outputs: torch.Tensor = self._forward(plist, batch)
            return outputs

        loss_fn = self.loss_fn
        assert loss_fn is not None  # set by the constructor

        def loss_of(outputs: torch.Tensor) -> torch.Tensor:
            return loss_fn(outputs, targets)

        try:
            # J^T w, one forward pass
            outputs, pull_params = torch.func.vjp(outputs_of, *primals)  # type: ignore[misc]  # torch.func.vjp's annotation adds has_aux=True's 3-tuple
            # H_L u as the vjp of the output-space gradient (reverse over reverse): forward-mode AD of some
            # loss backwards fails (F.mse_loss's writes into a zero tangent), reverse mode does not.
            _, pull_loss = torch.func.vjp(torch.func.grad(loss_of), outputs.detach())  # type: ignore[misc]  # torch.func.vjp's annotation adds has_aux=True's 3-tuple

            def ggn(*tangent: torch.Tensor) -> tuple[torch.Tensor, ...]:
                jv = torch.func.jvp(outputs_of, primals, tangent)[1]
                (hjv,) = pull_loss(jv)
                products: tuple[torch.Tensor, ...] = pull_params(hjv)
                return products

            # randomness="same" as in HessianOperator: dropout in train mode draws one mask per block and the
            # determinism check reports it.
            parts = torch.func.vmap(ggn, randomness="same")(*tangents)
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            raise ValueError(
                f"GGNOperator: torch.func could not transform the model/loss_fn ({type(exc).__name__}: {exc}); "
                "the GGN needs a model torch.func can differentiate and a loss_fn twice differentiable in the "
                "outputs"
            ) from exc
        return torch.cat([p.reshape(b, -1) for p in parts], dim=1)
