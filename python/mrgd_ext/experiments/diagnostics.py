"""Multiscale structure of gradients and row Hessians of MLPs: the paper's Figures 1, 2 and 4.

He, Liu, Tsai (arXiv:2402.03021) show that multiscale data imprint their scales on the loss (DESIGN 1.1):
the gradient with respect to a row of the first layer's weight has components of size ``O(e_k)`` along the
data's scale-k directions (Fig. 1), and the Hessian with respect to one weight row has a spectrum that
mirrors the spectrum of the layer's input (Figs. 2 and 4; 3-layer MLPs trained full-batch with lr 0.1 and
cross-entropy, examined at several training stages). This module makes those observations measurable:

* :func:`mlp`, :func:`train_full_batch`: the paper's model and training, with snapshots when the (test)
  accuracy first reaches given milestones;
* :func:`gradient_row_magnitudes`: the gradient of the full-batch loss with respect to rows of a Linear
  layer's weight, its magnitudes raw and sorted, the principal values of the layer's input scaled onto them,
  and the rank (Spearman) and log (Pearson) correlation between the gradient's components in the principal
  basis and the principal values: the paper's Fig. 1 claim as a number;
* :func:`row_hessian_eigenvalues`: eigenvalues of the Hessian with respect to single weight rows
  (NOTE: [row Hessian]) and the spectrum of the layer's input to compare them with;
* :func:`figure1`, :func:`figure2`, :func:`figure4` run the experiments on scikit-learn's digits (or on a
  multiscale generator) and return JSON-ready dicts; ``figure*_plot`` write the figures (matplotlib, lazily
  imported), natural-log y axis as in the paper, data spectrum in red.

Everything the diagnostics compute is float64 on the CPU (a float64 copy of the model), so that eigenvalues
spanning ten or more orders of magnitude are resolved; training itself runs in the model's dtype.

NOTE: [row Hessian]
For a network that treats samples independently (a ``nn.Sequential`` of Linear layers and elementwise
activations; no batch statistics), the full-batch loss ``L = (1/N) sum_n l_n`` depends on row ``w_i`` of a
Linear layer only through the pre-activations ``z_{n,i} = a_n . w_i + b_i`` (``a_n`` the layer's input for
sample n). Hence, exactly,

    grad_{w_i} L = sum_n delta_{n,i} a_n,        hess_{w_i} L = sum_n c_{n,i} a_n a_n^T = A^T diag(c_i) A,

with ``delta_{n,i} = dL/dz_{n,i}`` and ``c_{n,i} = d^2 L / dz_{n,i}^2`` (the 1/N included). ``c`` for many
rows at once is one Hessian-vector product of ``L(z)`` per row, with the tangent ``1`` on column i of every
sample (the Hessian in z is block diagonal over samples, so ``(H T)_{n,i} = c_{n,i}``); these run under
``torch.func.vmap`` over the rows. What remains is one ``[fan_in, fan_in]`` matrix product and one symmetric
eigensolve per row: ~0.4 s for a 1024-wide row (digits, N = 1348) on one CPU thread, instead of 1024
Hessian-vector products through the network. The formula also says what the figures show: ``hess_{w_i} L``
is the second moment of the layer's input weighted by ``c_i``, so its spectrum follows the input's
(Courant-Fischer:
``lambda_j(H) <= N max_n c_{n,i} lambda_j(A^T A / N)``).
"""

from __future__ import annotations

import copy
import datetime as _dt
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mrgd_ext.experiments.data import principal_values

__all__ = [
    "DATASETS",
    "DEFAULT_MAX_STEPS",
    "GradientRows",
    "RowHessians",
    "TrainResult",
    "figure1",
    "figure1_plot",
    "figure2",
    "figure2_plot",
    "figure4",
    "figure4_plot",
    "figure_text_summary",
    "gradient_row_magnitudes",
    "mlp",
    "row_hessian_eigenvalues",
    "train_full_batch",
]

#: Data sets the figure functions run on: name -> description.
DATASETS = {
    "digits": "scikit-learn digits, 1797 images 8x8, pixels divided by 16 (range [0, 1]), 75/25 train/test split",
    "multiscale": "mrgd_ext.experiments.data.multiscale_classification: 2000 samples, d = 64 in blocks "
                  "(32, 16, 16) with data scales (1, 0.1, 0.01), 10 classes from a teacher on the unscaled blocks, "
                  "75/25 split",
}
#: Default training budget per data set. NOTE: [multiscale budget]: on the multiscale set the test accuracy
#: climbs slowly past ~0.4 (the labels depend on the small scales, which gradient descent learns at rates
#: e_k**2 times smaller: the effect the paper is about), so its budget is short and a milestone not reached
#: in it is shown at the final weights (``reached: false``).
DEFAULT_MAX_STEPS = {"digits": 3000, "multiscale": 500}
#: Relative floor below which a principal value or eigenvalue counts as zero in the correlations (float64
#: rounding of the data matrix leaves ~1e-16 relative; digits has constant pixels with exactly zero variance).
RELATIVE_FLOOR = 1e-10
#: Stage colours of the plots (the paper: blue, then yellow; a third stage in green).
STAGE_COLORS = ("tab:blue", "gold", "tab:green", "tab:purple")

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------------------
# Model and training


def mlp(
    in_dim: int,
    hidden: Sequence[int] = (1024, 128),
    out_dim: int = 10,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """The paper's MLP: ``Linear(in_dim, hidden[0]), ReLU, ..., Linear(hidden[-1], out_dim)``.

    Layer l's weight is ``W^{l+1}`` of the paper (``[hidden[l], fan_in]``; ``W^1 = [hidden[0], in_dim]``).
    Weights and biases are drawn from PyTorch's default ``nn.Linear`` distribution ``U(-1/sqrt(fan_in),
    1/sqrt(fan_in))`` with a dedicated CPU generator seeded with ``seed`` (the global RNG is untouched).
    """
    if isinstance(in_dim, bool) or not isinstance(in_dim, int) or in_dim < 1:
        raise ValueError(f"in_dim must be an integer >= 1, got {in_dim!r}")
    if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim < 1:
        raise ValueError(f"out_dim must be an integer >= 1, got {out_dim!r}")
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence) or any(
        isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden
    ):
        raise ValueError(f"hidden must be a sequence of integer widths >= 1, got {hidden!r}")
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}")
    gen = torch.Generator().manual_seed(int(seed))
    widths = [in_dim, *hidden, out_dim]
    layers: list[nn.Module] = []
    for k in range(len(widths) - 1):
        lin = nn.Linear(widths[k], widths[k + 1], dtype=dtype)
        bound = 1.0 / math.sqrt(widths[k])
        with torch.no_grad():
            for p in (lin.weight, lin.bias):
                p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64).mul_(2 * bound).sub_(bound))
        layers.append(lin)
        if k < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclass
class TrainResult:
    """What :func:`train_full_batch` did.

    Attributes:
        snapshots: one dict per milestone reached, in order: ``milestone``, ``step`` (updates made before the
            snapshot), ``accuracy`` (the one the milestones refer to), ``train_accuracy``, ``loss`` and
            ``state_dict`` (a detached copy of the weights at that step).
        steps: updates made.
        accuracy: accuracy of the final weights (eval data if given, else training data).
        reached: whether every milestone was reached.
        history: per evaluated step: ``loss`` (training), ``train_accuracy``, ``accuracy``.
        wall_s: seconds spent.
    """

    snapshots: list[dict[str, Any]]
    steps: int
    accuracy: float
    reached: bool
    history: dict[str, list[float]] = field(default_factory=dict)
    wall_s: float = 0.0


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).double().mean())


def _check_xy(x: Any, y: Any, name_x: str = "x", name_y: str = "y") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] < 1 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name_x} must be a floating tensor [N, d] with N >= 1, got {shape}")
    if (not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]
            or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8)):
        got = (tuple(y.shape), y.dtype) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{name_y} must be an integer class-label tensor [N] with N = {x.shape[0]}, got {got}")


def train_full_batch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float = 0.1,
    steps: int,
    stop_at_accuracy: float | Sequence[float] | None = None,
    eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """Full-batch gradient descent on the mean cross-entropy, ``p <- p - lr * grad``, in place.

    Deterministic (one fixed batch, no momentum, no randomness). Before every update the loss and accuracy
    of the current weights are recorded; the accuracy is measured on ``eval_data`` (inputs, labels) when
    given, else on the training data.

    Args:
        model: maps ``x [N, d]`` to logits ``[N, C]``; trained in place.
        x, y: training inputs and integer labels.
        lr: learning rate (> 0).
        steps: the most updates to make (>= 0).
        stop_at_accuracy: an accuracy milestone or a sequence of them in (0, 1]. The weights are copied
            into ``snapshots`` the first time the accuracy reaches each milestone (several milestones can be
            reached at the same step), and training stops once the last one is reached. ``None``: no
            snapshots, run all ``steps``.
        eval_data: ``(x_test, y_test)`` for the accuracy (the paper's milestones are test accuracies).
        progress: called with a short label each time a milestone is reached.

    Returns:
        A :class:`TrainResult`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_xy(x, y)
    if eval_data is not None:
        if not isinstance(eval_data, (tuple, list)) or len(eval_data) != 2:
            raise ValueError("eval_data must be a pair (x_test, y_test)")
        _check_xy(eval_data[0], eval_data[1], "eval_data[0]", "eval_data[1]")
    lr = float(lr)
    if not (math.isfinite(lr) and lr > 0.0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if stop_at_accuracy is None:
        milestones: list[float] = []
    else:
        raw = [stop_at_accuracy] if isinstance(stop_at_accuracy, (int, float)) else list(stop_at_accuracy)
        milestones = sorted(float(m) for m in raw)
        if not milestones or any(not (0.0 < m <= 1.0) for m in milestones):
            raise ValueError(f"stop_at_accuracy must be accuracies in (0, 1], got {stop_at_accuracy!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    y = y.long()
    start = time.perf_counter()
    history: dict[str, list[float]] = {"loss": [], "train_accuracy": [], "accuracy": []}
    snapshots: list[dict[str, Any]] = []
    pending = list(milestones)
    step = 0
    accuracy = float("nan")
    while True:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        train_acc = _accuracy(logits.detach(), y)
        if eval_data is not None:
            with torch.no_grad():
                accuracy = _accuracy(model(eval_data[0]), eval_data[1].long())
        else:
            accuracy = train_acc
        history["loss"].append(float(loss.detach()))
        history["train_accuracy"].append(train_acc)
        history["accuracy"].append(accuracy)
        while pending and accuracy >= pending[0]:
            milestone = pending.pop(0)
            snapshots.append({
                "milestone": milestone, "step": step, "accuracy": accuracy, "train_accuracy": train_acc,
                "loss": float(loss.detach()),
                "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
            })
            if progress is not None:
                progress(f"accuracy {accuracy:.2f} at step {step}")
        if (milestones and not pending) or step == steps or not math.isfinite(history["loss"][-1]):
            break
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(g, alpha=lr)
        step += 1
    return TrainResult(snapshots=snapshots, steps=step, accuracy=accuracy, reached=not pending, history=history,
                       wall_s=time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------------
# Splitting a Sequential at one Linear layer


def _linear_positions(model: Any) -> list[int]:
    if not isinstance(model, nn.Sequential):
        # A ValueError like the other layout mistakes below: the argument is a Module, of the wrong layout.
        raise ValueError(  # noqa: TRY004
            f"model must be an nn.Sequential of nn.Linear layers and elementwise activations, got "
            f"{type(model).__name__}"
        )
    # Batch statistics couple the samples (NOTE: [row Hessian] needs them independent); per-sample
    # normalisations (LayerNorm, GroupNorm) do not.
    coupled = [type(child).__name__ for child in model if isinstance(child, nn.modules.batchnorm._BatchNorm)]
    if coupled:
        raise ValueError(f"model contains {coupled[0]}: the row diagnostics need layers that treat samples "
                         "independently")
    positions = [k for k, child in enumerate(model) if isinstance(child, nn.Linear)]
    if not positions:
        raise ValueError("model has no nn.Linear layer")
    return positions


def _check_layer(model: Any, layer: Any) -> tuple[int, list[int]]:
    positions = _linear_positions(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(positions):
        raise ValueError(f"layer must be the index of one of the model's {len(positions)} nn.Linear layers "
                         f"(0 .. {len(positions) - 1}), got {layer!r}")
    return layer, positions


def _check_rows(rows: Any, out_features: int) -> tuple[int, ...]:
    if isinstance(rows, int) and not isinstance(rows, bool):
        rows = (rows,)
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or len(rows) == 0:
        raise ValueError(f"rows must be a non-empty sequence of row indices, got {rows!r}")
    out = []
    for r in rows:
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 0 <= r < out_features:
            raise ValueError(f"rows must be indices in [0, {out_features}) (the layer's output features), got {r!r}")
        out.append(int(r))
    return tuple(out)


@dataclass
class _Split:
    inputs: torch.Tensor  # [N, fan_in]: the layer's input activations a_n (float64)
    z: torch.Tensor  # [N, out]: its pre-activations
    loss_of_z: Callable[[torch.Tensor], torch.Tensor]  # mean cross-entropy as a function of z


def _split(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, layer: int, positions: list[int]) -> _Split:
    model64 = copy.deepcopy(model).to(device="cpu", dtype=torch.float64)
    children = list(model64)
    k = positions[layer]
    prefix, lin, suffix = nn.Sequential(*children[:k]), children[k], nn.Sequential(*children[k + 1:])
    x64 = x.detach().to(device="cpu", dtype=torch.float64)
    y = y.detach().to("cpu").long()
    with torch.no_grad():
        a = prefix(x64)
        z = lin(a)
    if z.shape[1] == 0 or a.dim() != 2:
        raise ValueError("model: the selected layer must map [N, fan_in] to [N, out]")
    params = {name: p.detach() for name, p in suffix.named_parameters()}
    buffers = {name: b.detach() for name, b in suffix.named_buffers()}

    def loss_of_z(zz: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(suffix, (params, buffers), (zz,)), y)

    with torch.no_grad():
        logits = suffix(z)
    if logits.dim() != 2 or int(y.max()) >= logits.shape[1] or int(y.min()) < 0:
        raise ValueError(f"y must hold class indices in [0, {logits.shape[-1]}) for the model's logits")
    return _Split(inputs=a, z=z, loss_of_z=loss_of_z)


def _diag_curvature(split: _Split, rows: tuple[int, ...], chunk: int | None = None) -> torch.Tensor:
    """``c [R, N]``: ``d^2 L / dz_{n,i}^2`` for each row i (NOTE: [row Hessian]), vmapped over rows."""
    z = split.z
    n, out = z.shape
    grad = torch.func.grad(split.loss_of_z)

    def column_hvp(tangent: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(grad, (z,), (tangent,))[1]

    # A chunk of rows holds R tangents [N, out] and their jvp intermediates: keep them near 2**22 elements.
    chunk = chunk or max(1, min(len(rows), (1 << 22) // max(1, n * out)))
    out_c = []
    for s in range(0, len(rows), chunk):
        idx = torch.tensor(rows[s:s + chunk])
        tangents = torch.zeros(len(idx), n, out, dtype=z.dtype)
        tangents[torch.arange(len(idx)), :, idx] = 1.0
        hv = torch.func.vmap(column_hvp)(tangents)  # [R, N, out]
        out_c.append(hv[torch.arange(len(idx)), :, idx])
    return torch.cat(out_c)


# --------------------------------------------------------------------------------------------------------
# Correlations


def _ranks(v: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]  # average ranks for ties


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _log_fit(values: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """How ``values`` follow ``reference`` (both positive on the used entries) on the natural-log scale.

    ``scale``: the single factor ``k`` minimising ``sum (ln values - ln(k reference))^2``, i.e.
    ``ln k = mean(ln values - ln reference)``; ``slope``: least-squares slope of ln values against
    ln reference; ``spearman``: rank correlation; ``pearson_log``: correlation of the logs; ``used``: how many
    entries (those with both above ``RELATIVE_FLOOR`` times their largest) entered.
    """
    values, reference = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    m = min(values.size, reference.size)
    values, reference = values[:m], reference[:m]
    vmax = values.max() if m else 0.0
    rmax = reference.max() if m else 0.0
    keep = (values > RELATIVE_FLOOR * vmax) & (reference > RELATIVE_FLOOR * rmax) & (values > 0) & (reference > 0)
    lv, lr = np.log(values[keep]), np.log(reference[keep])
    if lv.size == 0:
        return {"scale": None, "slope": None, "spearman": None, "pearson_log": None, "used": 0}
    slope = float(np.polyfit(lr, lv, 1)[0]) if lv.size >= 2 and np.ptp(lr) > 0 else None
    return {
        "scale": float(np.exp(np.mean(lv - lr))),
        "slope": slope,
        "spearman": _corr(_ranks(lv), _ranks(lr)),
        "pearson_log": _corr(lv, lr),
        "used": int(lv.size),
    }


# --------------------------------------------------------------------------------------------------------
# Figure 1: gradient rows


@dataclass
class GradientRows:
    """Gradient of the full-batch loss with respect to rows of one Linear layer's weight (float64).

    Attributes:
        layer, rows: which layer (index among the model's Linear layers) and rows.
        gradients: ``[R, fan_in]`` the gradient rows ``dL/dW[i, :]`` (signed).
        magnitudes: ``[R, fan_in]`` their absolute values, raw (input-feature) order.
        sorted_magnitudes: ``[R, fan_in]`` the same sorted descending.
        principal_values: ``[r]`` principal values of the layer's input (for layer 0: the data), descending,
            ``r = min(N, fan_in)``; centred as chosen by ``center``.
        principal_components: ``[R, r]`` ``|v_j . g_i|``: each gradient row in the principal basis ``v_j``
            (right singular vectors of the layer's input), in the order of the principal values (not sorted).
        fit_sorted: per row, a log-scale fit (keys ``scale``, ``slope``, ``spearman``, ``pearson_log``,
            ``used``; see ``_log_fit``) of ``sorted_magnitudes`` against ``principal_values``: ``scale``
            is the factor that aligns the (red) principal-value curve with the sorted gradient magnitudes
            (least squares on the log scale), as in the paper's Fig. 1.
        fit_components: per row, the same fit of ``principal_components`` against ``principal_values``:
            ``spearman`` and ``pearson_log`` measure the claim that the gradient's component along scale k has
            size ``O(e_k)`` (both in principal order; sorting them would make the correlation trivially 1).
        center: whether the principal basis came from the centred input.
    """

    layer: int
    rows: tuple[int, ...]
    gradients: torch.Tensor
    magnitudes: torch.Tensor
    sorted_magnitudes: torch.Tensor
    principal_values: torch.Tensor
    principal_components: torch.Tensor
    fit_sorted: list[dict[str, Any]]
    fit_components: list[dict[str, Any]]
    center: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: lists and numbers."""
        return {
            "layer": self.layer,
            "rows": list(self.rows),
            "center": self.center,
            "principal_values": self.principal_values.tolist(),
            "per_row": {
                str(i): {
                    "magnitudes": self.magnitudes[r].tolist(),
                    "sorted_magnitudes": self.sorted_magnitudes[r].tolist(),
                    "principal_components": self.principal_components[r].tolist(),
                    "fit_sorted": self.fit_sorted[r],
                    "fit_components": self.fit_components[r],
                }
                for r, i in enumerate(self.rows)
            },
        }


def gradient_row_magnitudes(
    model: nn.Sequential,
    x: torch.Tensor,
    y: torch.Tensor,
    layer: int = 0,
    rows: Sequence[int] | int = (0, 1),
    *,
    center: bool = True,
) -> GradientRows:
    """Gradient of the mean cross-entropy with respect to rows ``W[i, :]`` of a Linear layer (paper Fig. 1).

    Computed in float64 on a copy of the model through the exact formula of NOTE: [row Hessian]:
    ``g_i = sum_n delta_{n,i} a_n`` with ``delta = dL/dz`` from one backward pass.

    NOTE: [gradient in the principal basis]
    With ``A = P S V^T`` (the layer's input, centred or not) the component of ``g_i`` along the principal
    direction ``v_j`` is ``v_j . g_i = sum_n delta_{n,i} (A v_j)_n = sqrt(N) s_j (p_j . delta_i)`` plus, when
    centred, ``(v_j . mean) sum_n delta_{n,i}``. Without centring, ``|v_j . g_i| <= s_j sqrt(N) ||delta_i||``
    exactly: the gradient's size along scale k is ``O(e_k)``, and ``fit_components`` tests how tightly. The
    centred basis (the default, principal component analysis as in the paper's red curve) adds the mean term,
    which is small when the data's mean is small or the gradient is nearly balanced over samples.

    Args:
        model: an ``nn.Sequential`` of ``nn.Linear`` layers and elementwise activations, returning logits.
        x, y: the (full) batch of inputs and integer labels.
        layer: index among the model's ``nn.Linear`` layers (0: the first layer, the paper's ``W^1``).
        rows: row indices of that layer's weight (or one index).
        center: principal basis and values of the centred layer input (default) or of the raw one.

    Raises:
        ValueError: naming the argument (model not such a Sequential, layer or a row out of range, bad x/y).
    """
    _check_xy(x, y)
    layer, positions = _check_layer(model, layer)
    lin = cast(nn.Linear, model[positions[layer]])
    rows = _check_rows(rows, lin.out_features)
    split = _split(model, x, y, layer, positions)
    delta = torch.func.grad(split.loss_of_z)(split.z)  # [N, out]
    idx = torch.tensor(rows)
    gradients = delta[:, idx].T @ split.inputs  # [R, fan_in]
    a = split.inputs - split.inputs.mean(0) if center else split.inputs
    _, s, vh = torch.linalg.svd(a, full_matrices=False)  # vh [r, fan_in]
    pv = s / math.sqrt(a.shape[0])
    components = (gradients @ vh.T).abs()  # [R, r]
    magnitudes = gradients.abs()
    sorted_magnitudes = magnitudes.sort(dim=1, descending=True).values
    return GradientRows(
        layer=layer, rows=rows, gradients=gradients, magnitudes=magnitudes, sorted_magnitudes=sorted_magnitudes,
        principal_values=pv, principal_components=components,
        fit_sorted=[_log_fit(sorted_magnitudes[r].numpy(), pv.numpy()) for r in range(len(rows))],
        fit_components=[_log_fit(components[r].numpy(), pv.numpy()) for r in range(len(rows))],
        center=center,
    )


# --------------------------------------------------------------------------------------------------------
# Figures 2 and 4: row Hessians


@dataclass
class RowHessians:
    """Hessians of the full-batch loss with respect to single rows of a Linear layer's weight (float64).

    Attributes:
        layer, rows: which layer (index among the model's Linear layers) and rows.
        eigenvalues: ``[R, fan_in]`` eigenvalues of each row's ``[fan_in, fan_in]`` Hessian, sorted by
            magnitude, descending.
        input_spectrum: ``[min(N, fan_in)]`` eigenvalues of the layer input's uncentred second moment
            ``A^T A / N`` (principal values squared of the raw input, descending): by NOTE: [row Hessian]
            every row Hessian is ``A^T diag(c_i) A``, so this is the spectrum to compare against.
        curvature_weights: ``[R, N]`` the weights ``c_{n,i} = d^2 L / dz_{n,i}^2`` (1/N included).
        fits: per row, a log-scale fit (keys ``scale``, ``slope``, ``spearman``, ``pearson_log``, ``used``; see
            ``_log_fit``) of ``|eigenvalues|`` against ``input_spectrum`` (``scale`` aligns the
            red input-spectrum curve; ``slope`` near 1 and ``pearson_log`` near 1 mean the Hessian mirrors it).
        hessians: ``[R, fan_in, fan_in]`` the matrices, when asked for (``return_hessians=True``).
    """

    layer: int
    rows: tuple[int, ...]
    eigenvalues: torch.Tensor
    input_spectrum: torch.Tensor
    curvature_weights: torch.Tensor
    fits: list[dict[str, Any]]
    hessians: torch.Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: lists and numbers (without the matrices and the per-sample weights)."""
        return {
            "layer": self.layer,
            "rows": list(self.rows),
            "input_spectrum": self.input_spectrum.tolist(),
            "per_row": {
                str(i): {"eigenvalues": self.eigenvalues[r].tolist(), "fit": self.fits[r]}
                for r, i in enumerate(self.rows)
            },
        }


def row_hessian_eigenvalues(
    model: nn.Sequential,
    x: torch.Tensor,
    y: torch.Tensor,
    layer: int,
    rows: Sequence[int] | int,
    *,
    return_hessians: bool = False,
    chunk_rows: int | None = None,
) -> RowHessians:
    """Eigenvalues of ``d^2 L / dW[i, :]^2`` (the mean cross-entropy's Hessian restricted to one weight row).

    Exact, in float64 on a copy of the model (NOTE: [row Hessian]): the curvature weights ``c_i`` of all
    selected rows come from ``torch.func.vmap`` over one Hessian-vector product per row (in chunks of
    ``chunk_rows``; by default sized to keep each chunk near 2**22 elements), each Hessian is
    ``A^T diag(c_i) A`` and its eigenvalues come from ``torch.linalg.eigvalsh``.

    Args:
        model: an ``nn.Sequential`` of ``nn.Linear`` layers and elementwise activations, returning logits.
        x, y: the full batch of inputs and integer labels.
        layer: index among the model's ``nn.Linear`` layers (0: ``W^1``; 1: ``W^2``, the second hidden layer's
            weight of the paper's Figs. 2 and 4).
        rows: row indices of that layer's weight (or one index).
        return_hessians: also return the ``[R, fan_in, fan_in]`` matrices.
        chunk_rows: rows per vmapped batch of Hessian-vector products.

    Raises:
        ValueError: naming the argument (model not such a Sequential, layer or a row out of range, bad x/y).
    """
    _check_xy(x, y)
    layer, positions = _check_layer(model, layer)
    lin = cast(nn.Linear, model[positions[layer]])
    rows = _check_rows(rows, lin.out_features)
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be an integer >= 1 or None, got {chunk_rows!r}")
    split = _split(model, x, y, layer, positions)
    c = _diag_curvature(split, rows, chunk_rows)  # [R, N]
    a = split.inputs  # [N, fan_in]
    eigenvalues, hessians = [], []
    for r in range(len(rows)):
        h = (a * c[r][:, None]).T @ a  # [fan_in, fan_in]
        h = 0.5 * (h + h.T)
        ev = torch.linalg.eigvalsh(h)
        eigenvalues.append(ev[ev.abs().argsort(descending=True, stable=True)])
        if return_hessians:
            hessians.append(h)
    eig = torch.stack(eigenvalues)
    spectrum = principal_values(a, center=False) ** 2
    return RowHessians(
        layer=layer, rows=rows, eigenvalues=eig, input_spectrum=spectrum, curvature_weights=c,
        fits=[_log_fit(eig[r].abs().numpy(), spectrum.numpy()) for r in range(len(rows))],
        hessians=torch.stack(hessians) if return_hessians else None,
    )


# --------------------------------------------------------------------------------------------------------
# The experiments


def _dataset(dataset: str, num_samples: int | None, seed: int) -> tuple[torch.Tensor, ...]:
    """``x_train, y_train, x_test, y_test`` (float32), a seeded 75/25 split."""
    if dataset == "digits":
        from mrgd_ext.experiments.data import load_digits

        # NOTE: [digits pixels]
        # Pixels 0..16 divided by 16 land in [0, 1], the range MNIST pixels are usually given in, for which
        # the paper's learning rate 0.1 is meant. A uniform rescaling leaves the principal values' relative
        # sizes (the multiscale structure) unchanged.
        x, y = load_digits()
        x = x / 16.0
    elif dataset == "multiscale":
        from mrgd_ext.experiments.data import multiscale_classification

        x, y, _ = multiscale_classification(2000, (32, 16, 16), (1.0, 0.1, 0.01), 10, seed=seed)
    else:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    if num_samples is not None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or not 8 <= num_samples <= x.shape[0]:
            raise ValueError(f"num_samples must be an integer in [8, {x.shape[0]}] for {dataset!r}, got "
                             f"{num_samples!r}")
        perm = perm[:num_samples]
    n_test = max(1, len(perm) // 4)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def _pick_rows(model: nn.Sequential, x: torch.Tensor, layer: int, positions: list[int], seed: int) -> tuple[int, int]:
    """Row 0 and a random row ``i > 0`` whose unit is active on some training sample (the paper's ``W_{1,:}``
    and ``W_{i,:}``): a unit that is never active has a zero gradient row and no curvature."""
    lin = cast(nn.Linear, model[positions[layer]])
    if lin.out_features < 2:
        return (0, 0)
    with torch.no_grad():
        z = model[: positions[layer] + 1](x)
    active = (z > 0).any(0)
    active[0] = False
    gen = torch.Generator().manual_seed(seed + 17)
    order = torch.randperm(lin.out_features - 1, generator=gen) + 1
    alive = [int(i) for i in order if bool(active[i])]
    return (0, alive[0] if alive else int(order[0]))


def _check_milestones(milestones: Sequence[float], count: int | None = None) -> list[float]:
    try:
        values = [float(m) for m in milestones]
    except (TypeError, ValueError):
        raise ValueError(f"milestones must be accuracies in (0, 1], got {milestones!r}") from None
    if not values or any(not 0.0 < m <= 1.0 for m in values) or values != sorted(values):
        raise ValueError(f"milestones must be ascending accuracies in (0, 1], got {milestones!r}")
    return values


def _run(
    figure: str, dataset: str, hidden: Sequence[int], milestones: Sequence[float], lr: float,
    max_steps: int | None, num_samples: int | None, seed: int, progress: Callable[[str], None] | None,
) -> tuple[dict[str, Any], nn.Sequential, tuple[torch.Tensor, ...], TrainResult, list[int]]:
    milestones = _check_milestones(milestones)
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    if max_steps is None:
        max_steps = DEFAULT_MAX_STEPS[dataset]
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
    data = _dataset(dataset, num_samples, seed)
    x_train, y_train, x_test, y_test = data
    model = mlp(x_train.shape[1], tuple(hidden), 10, seed=seed)
    positions = _linear_positions(model)
    train = train_full_batch(model, x_train, y_train, lr=lr, steps=max_steps, stop_at_accuracy=milestones,
                             eval_data=(x_test, y_test), progress=progress)
    if progress is not None:
        for m in milestones[len(train.snapshots):]:
            progress(f"accuracy {m:g} not reached in {max_steps} steps")
    from mrgd_ext.experiments.figures import machine_info

    meta = {
        "figure": figure,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "dataset": dataset,
        "dataset_description": DATASETS[dataset],
        "n_train": int(x_train.shape[0]),
        "n_test": int(x_test.shape[0]),
        "model": "-".join(str(w) for w in [x_train.shape[1], *hidden, 10]) + " MLP (ReLU), PyTorch default init",
        "training": f"full-batch gradient descent, lr {lr:g}, mean cross-entropy, float32; snapshots when the "
                    "test accuracy first reaches each milestone",
        "lr": lr,
        "milestones": milestones,
        "max_steps": max_steps,
        "steps_trained": train.steps,
        "all_milestones_reached": train.reached,
        "training_seconds": train.wall_s,
        "seed": seed,
        "diagnostics": "float64, exact (mrgd_ext.experiments.diagnostics NOTE: [row Hessian])",
    }
    return meta, model, data, train, positions


def _stages(
    train: TrainResult, model: nn.Sequential, milestones: list[float]
) -> list[tuple[dict[str, Any], nn.Sequential]]:
    """One (info, model) per milestone reached, then, if some were not, one stage at the final weights."""
    out = []
    for snap in train.snapshots:
        m = copy.deepcopy(model)
        m.load_state_dict(snap["state_dict"])
        info = {k: snap[k] for k in ("milestone", "step", "accuracy", "train_accuracy", "loss")}
        info["test_accuracy"] = info.pop("accuracy")
        out.append(({**info, "reached": True}, m))
    if not train.reached:
        h = train.history
        out.append(({"milestone": milestones[len(train.snapshots)], "step": train.steps,
                     "train_accuracy": h["train_accuracy"][-1], "loss": h["loss"][-1],
                     "test_accuracy": h["accuracy"][-1], "reached": False}, model))
    return out


def _summary(values: list[float | None]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"min": None, "mean": None, "max": None}
    return {"min": min(vals), "mean": float(np.mean(vals)), "max": max(vals)}


def figure1(
    *,
    dataset: str = "digits",
    hidden: Sequence[int] = (1024, 128),
    milestones: Sequence[float] = (0.3, 0.5),
    lr: float = 0.1,
    max_steps: int | None = None,
    num_samples: int | None = None,
    rows: Sequence[int] | None = None,
    center: bool = True,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Figure 1: magnitudes of the gradient with respect to first-layer rows ``W^1_{0,:}``, ``W^1_{i,:}``.

    Trains :func:`mlp` (``in_dim-hidden-10``, seeded with ``seed``) full-batch with rate ``lr`` on ``dataset``
    (see ``DATASETS``; ``num_samples`` limits it to a seeded subset, split 75/25 into train/test) and, at each
    training stage (the first step the test accuracy reaches each of ``milestones``; the paper: 30% and
    50%), computes :func:`gradient_row_magnitudes` on the training data for ``rows`` (default: 0 and a random
    active row) with the principal basis centred or not (``center``). Training stops at the last milestone
    or after ``max_steps`` (default ``DEFAULT_MAX_STEPS[dataset]``); milestones not reached by then are
    represented by one stage at the final weights, marked ``reached: false``. ``progress`` is called once per
    milestone (reached or not) and once per stage analysed: ``2 * len(milestones)`` times at most.

    Returns a JSON-ready dict: ``meta`` (settings, machine, training), ``principal_values`` of the training
    data, ``stages`` (per stage: milestone, step, accuracies and the :class:`GradientRows` as a dict) and
    ``summary`` (``spearman``/``pearson_log`` of the principal-basis components against the principal
    values, min and mean over stages and rows; ``scale_factors`` of the red curve).
    """
    meta, model, (x_train, y_train, _, _), train, positions = _run(
        "fig1", dataset, hidden, milestones, lr, max_steps, num_samples, seed, progress)
    first = cast(nn.Linear, model[positions[0]])
    chosen = _check_rows(rows, first.out_features) if rows is not None else _pick_rows(
        model, x_train, 0, positions, seed)
    meta.update(rows=list(chosen), layer=0, center=center)
    stages = []
    for info, m in _stages(train, model, meta["milestones"]):
        g = gradient_row_magnitudes(m, x_train, y_train, 0, chosen, center=center)
        stages.append({**info, **g.to_dict()})
        if progress is not None:
            progress(f"stage {info['milestone']:g}")
    fits = [s["per_row"][str(i)]["fit_components"] for s in stages for i in chosen]
    return {
        "meta": meta,
        "principal_values": principal_values(x_train, center=center).tolist(),
        "stages": stages,
        "summary": {
            "spearman": _summary([f["spearman"] for f in fits]),
            "pearson_log": _summary([f["pearson_log"] for f in fits]),
            "scale_factors": [s["per_row"][str(i)]["fit_sorted"]["scale"] for s in stages for i in chosen],
            "note": "correlations of |v_j . g| (gradient row in the principal basis of the data, principal order) "
                    "with the principal values s_j; scale_factors: the red curve's factor k fitted by least "
                    "squares of ln|g|_sorted - ln(k s) per stage and row",
        },
    }


def _hessian_figure(
    figure: str, layers: Sequence[int], *, dataset: str, hidden: Sequence[int], milestones: Sequence[float],
    lr: float, max_steps: int | None, num_samples: int | None, rows: Sequence[int] | None, seed: int,
    progress: Callable[[str], None] | None,
) -> dict[str, Any]:
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence) or len(hidden) < max(layers) + 1:
        raise ValueError(f"hidden must have at least {max(layers) + 1} hidden widths for {figure} (it looks at "
                         f"hidden layer {max(layers) + 1}), got {hidden!r}")
    meta, model, (x_train, y_train, _, _), train, positions = _run(
        figure, dataset, hidden, milestones, lr, max_steps, num_samples, seed, progress)
    chosen = {}
    for layer in layers:
        out_features = cast(nn.Linear, model[positions[layer]]).out_features
        chosen[layer] = (_check_rows(rows, out_features) if rows is not None
                         else _pick_rows(model, x_train, layer, positions, seed))
    meta.update(layers=list(layers), rows={str(k): list(v) for k, v in chosen.items()})
    stages = []
    for info, m in _stages(train, model, meta["milestones"]):
        per_layer = {}
        start = time.perf_counter()
        for layer in layers:
            per_layer[str(layer)] = row_hessian_eigenvalues(m, x_train, y_train, layer, chosen[layer]).to_dict()
        stages.append({**info, "layers": per_layer, "seconds": time.perf_counter() - start})
        if progress is not None:
            progress(f"stage {info['milestone']:g}")
    fits = [s["layers"][str(layer)]["per_row"][str(i)]["fit"] for s in stages for layer in layers
            for i in chosen[layer]]
    return {
        "meta": meta,
        "stages": stages,
        "summary": {
            "pearson_log": _summary([f["pearson_log"] for f in fits]),
            "slope": _summary([f["slope"] for f in fits]),
            "note": "fits of ln|eigenvalue| (row Hessian, sorted by magnitude) against ln of the layer input's "
                    "second-moment spectrum (A^T A / N), same index: pearson_log near 1 and slope near 1 mean "
                    "the Hessian spectrum mirrors the input's",
        },
    }


def figure2(
    *,
    dataset: str = "digits",
    hidden: Sequence[int] = (1024, 128),
    milestones: Sequence[float] = (0.3, 0.5),
    lr: float = 0.1,
    max_steps: int | None = None,
    num_samples: int | None = None,
    rows: Sequence[int] | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Figure 2: eigenvalues of the Hessians with respect to rows of ``W^1`` and ``W^2`` at two stages.

    Same training and arguments as :func:`figure1`; at each stage :func:`row_hessian_eigenvalues` for layers 0 and 1
    (rows: 0 and a random active row per layer, or ``rows`` for both), compared with the spectrum of each
    layer's input (the data for ``W^1``, the first hidden activations for ``W^2``).

    Returns a JSON-ready dict: ``meta``, ``stages`` (per stage: milestone, step, accuracies, ``layers`` ->
    :class:`RowHessians` as a dict) and ``summary`` (``pearson_log`` and ``slope`` of the log-log fits, min
    and mean over stages, layers and rows).
    """
    return _hessian_figure("fig2", (0, 1), dataset=dataset, hidden=hidden, milestones=milestones, lr=lr,
                           max_steps=max_steps, num_samples=num_samples, rows=rows, seed=seed, progress=progress)


def figure4(
    *,
    dataset: str = "digits",
    hidden: Sequence[int] = (1024, 128),
    milestones: Sequence[float] = (0.2, 0.5, 0.8),
    lr: float = 0.1,
    max_steps: int | None = None,
    num_samples: int | None = None,
    rows: Sequence[int] | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Figure 4: eigenvalues of the Hessian with respect to rows of the second hidden layer's weight ``W^2``
    at three training stages (the paper: MNIST, test accuracy 20%, 50%, 80%).

    As :func:`figure2` for layer 1 only; same return layout.
    """
    return _hessian_figure("fig4", (1,), dataset=dataset, hidden=hidden, milestones=milestones, lr=lr,
                           max_steps=max_steps, num_samples=num_samples, rows=rows, seed=seed, progress=progress)


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def figure_text_summary(results: dict[str, Any]) -> str:
    """A few lines for a terminal: stages reached and the summary numbers of a ``figure*`` result."""
    meta = results["meta"]
    lines = [(f"{meta['figure']}: {meta['model']} on {meta['dataset']} ({meta['n_train']} train / "
              f"{meta['n_test']} test), lr {meta['lr']:g}, {meta['steps_trained']} full-batch steps")]
    if not meta["all_milestones_reached"]:
        lines.append(f"  not every milestone was reached within {meta['max_steps']} steps")
    for s in results["stages"]:
        reached = "" if s["reached"] else ", not reached: final weights"
        lines.append(f"  stage: test accuracy {s['test_accuracy']:.3f} (milestone {s['milestone']:g}{reached}) at "
                     f"step {s['step']}, train accuracy {s['train_accuracy']:.3f}")
        if meta["figure"] == "fig1":
            for i, row in s["per_row"].items():
                f = row["fit_components"]
                lines.append(f"    W1 row {i}: gradient in the principal basis vs principal values: Spearman "
                             f"{_fmt(f['spearman'])}, Pearson (logs) {_fmt(f['pearson_log'])}; red curve "
                             f"factor {_fmt(row['fit_sorted']['scale'], '.3g')}")
        else:
            for layer, entry in s["layers"].items():
                for i, row in entry["per_row"].items():
                    f, ev = row["fit"], np.abs(row["eigenvalues"])
                    kept = ev[ev > RELATIVE_FLOOR * ev[0]] if ev[0] > 0 else ev[:1]
                    lines.append(f"    W{int(layer) + 1} row {i}: |eigenvalues| {kept[0]:.3g} .. {kept[-1]:.3g} "
                                 f"({kept.size} of {ev.size} above {RELATIVE_FLOOR:g} x max); vs input spectrum: "
                                 f"Pearson (logs) {_fmt(f['pearson_log'])}, slope {_fmt(f['slope'])}")
    summ = results["summary"]
    keys = ("spearman", "pearson_log") if meta["figure"] == "fig1" else ("pearson_log", "slope")
    lines.append("  summary: " + "; ".join(f"{k} min {_fmt(summ[k]['min'])} mean {_fmt(summ[k]['mean'])}"
                                           for k in keys))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Plots (the object API on an Agg canvas, as mrgd_ext.experiments.reproduce's plots)


def _ln(values: Sequence[float] | np.ndarray, floor: float = 0.0) -> np.ndarray:
    """ln|values|, NaN (a gap in the curve) at zero and at or below ``floor`` times the largest magnitude."""
    v = np.abs(np.asarray(values, dtype=np.float64))
    keep = v > floor * (v.max() if v.size else 0.0)
    keep &= v > 0
    return np.where(keep, np.log(np.where(keep, v, 1.0)), np.nan)


def _red(ax: Any, reference: Sequence[float], scales: list[float | None], length: int, label: str) -> None:
    """The reference spectrum times the geometric mean of the fitted factors, truncated where it vanishes."""
    factors = [s for s in scales if s]
    if not factors:
        return
    ref = np.asarray(reference, dtype=np.float64)[:length]
    ax.plot(np.arange(1, ref.size + 1), _ln(ref, RELATIVE_FLOOR) + float(np.mean(np.log(factors))), color="red",
            linewidth=1.2, label=label)


def _stage_label(s: dict[str, Any]) -> str:
    missed = "" if s.get("reached", True) else f", {s['milestone']:g} not reached"
    return f"test acc. {s['test_accuracy']:.0%} (step {s['step']}{missed})"


def figure1_plot(results: dict[str, Any], path: str | os.PathLike) -> None:
    """Figure 1 layout, one column per row of ``W^1``: ln|gradient| in input-feature order (top), sorted
    (middle, with the data's principal values in red, scaled by the fitted factor, as in the paper), and the
    gradient's components in the data's principal basis in principal order (bottom, with the principal values:
    the comparison the summary correlations measure)."""
    from mrgd_ext.experiments.figures import new_figure

    rows = results["meta"]["rows"]
    fig = new_figure(5.0 * len(rows), 10.0)
    axes = fig.subplots(3, len(rows), squeeze=False)
    for col, i in enumerate(rows):
        top, middle, bottom = axes[0, col], axes[1, col], axes[2, col]
        sorted_scales, component_scales = [], []
        for s, color in zip(results["stages"], STAGE_COLORS):
            row = s["per_row"][str(i)]
            n, r = len(row["magnitudes"]), len(row["principal_components"])
            top.plot(np.arange(1, n + 1), _ln(row["magnitudes"]), color=color, linewidth=1, label=_stage_label(s))
            middle.plot(np.arange(1, n + 1), _ln(row["sorted_magnitudes"]), color=color, linewidth=1.2,
                        label=_stage_label(s))
            bottom.plot(np.arange(1, r + 1), _ln(row["principal_components"]), color=color, linewidth=1,
                        label=_stage_label(s))
            sorted_scales.append(row["fit_sorted"]["scale"])
            component_scales.append(row["fit_components"]["scale"])
        n = len(results["stages"][0]["per_row"][str(i)]["magnitudes"])
        _red(middle, results["principal_values"], sorted_scales, n, "principal values of the data (scaled)")
        _red(bottom, results["principal_values"], component_scales, n, "principal values of the data (scaled)")
        top.set_title(f"W1 row {i}: |dL/dW1[{i}, :]|, input order", fontsize=9)
        middle.set_title(f"W1 row {i}: sorted by magnitude", fontsize=9)
        bottom.set_title(f"W1 row {i}: |v_j . g| in the data's principal basis", fontsize=9)
        for ax in (top, middle, bottom):
            ax.set_ylabel("ln |gradient|")
            ax.grid(alpha=0.3)
        top.set_xlabel("input feature")
        middle.set_xlabel("index (descending)")
        bottom.set_xlabel("principal direction j (descending principal value)")
    axes[1, 0].legend(fontsize=7)
    meta = results["meta"]
    fig.suptitle(f"Figure 1 (He, Liu, Tsai, arXiv:2402.03021), {meta['dataset']}, {meta['model'].split()[0]} MLP\n"
                 f"gradient in the data's principal basis vs principal values: Spearman min "
                 f"{_fmt(results['summary']['spearman']['min'], '.2f')}, Pearson (logs) min "
                 f"{_fmt(results['summary']['pearson_log']['min'], '.2f')}", fontsize=9)
    fig.savefig(os.fspath(path), dpi=110)


def _hessian_plot(results: dict[str, Any], path: str | os.PathLike, title: str) -> None:
    from mrgd_ext.experiments.figures import new_figure

    panels = [(int(layer), int(i)) for layer, rows in results["meta"]["rows"].items() for i in rows]
    fig = new_figure(4.6 * len(panels), 4.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (layer, i) in zip(axes, panels):
        scales: list[float | None] = []
        spectrum: Any = None
        n = 0
        for s, color in zip(results["stages"], STAGE_COLORS):
            entry = s["layers"][str(layer)]
            row = entry["per_row"][str(i)]
            n = len(row["eigenvalues"])
            # NOTE: [rank of a row Hessian]
            # A^T diag(c_i) A has rank at most the number of samples with c_{n,i} != 0 (for a ReLU layer: those
            # on which unit i is active); the rest of its eigenvalues are rounding noise (~1e-16 of the largest),
            # cut at RELATIVE_FLOOR as the correlations are.
            ax.plot(np.arange(1, n + 1), _ln(row["eigenvalues"], RELATIVE_FLOOR), color=color, linewidth=1.2,
                    label=_stage_label(s))
            scales.append(row["fit"]["scale"])
            spectrum = entry["input_spectrum"]
        what = "data" if layer == 0 else f"layer-{layer} input, last stage"
        _red(ax, spectrum, scales, n, f"spectrum of the {what} (scaled)")
        ax.set_title(f"Hessian w.r.t. W{layer + 1}[{i}, :]", fontsize=9)
        ax.set_xlabel("index (sorted by magnitude)")
        ax.set_ylabel("ln |eigenvalue|")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    meta = results["meta"]
    fig.suptitle(f"{title}, {meta['dataset']}, {meta['model'].split()[0]} MLP: ln|eigenvalue| vs ln(input "
                 f"spectrum): Pearson min {_fmt(results['summary']['pearson_log']['min'], '.2f')}, slope "
                 f"{_fmt(results['summary']['slope']['min'], '.2f')} .. "
                 f"{_fmt(results['summary']['slope']['max'], '.2f')}",
                 fontsize=9)
    fig.savefig(os.fspath(path), dpi=110)


def figure2_plot(results: dict[str, Any], path: str | os.PathLike) -> None:
    """Figure 2 layout: one panel per (layer, row); eigenvalues of the row Hessian sorted by magnitude on the
    natural-log scale, one curve per stage, the layer input's spectrum in red (scaled by the fitted factor)."""
    _hessian_plot(results, path, "Figure 2 (He, Liu, Tsai, arXiv:2402.03021)")


def figure4_plot(results: dict[str, Any], path: str | os.PathLike) -> None:
    """Figure 4 layout: as :func:`figure2_plot`, for the second hidden layer at three stages."""
    _hessian_plot(results, path, "Figure 4 (He, Liu, Tsai, arXiv:2402.03021)")
