"""Trace and diagonal of a symmetric operator from operator products only.

All estimators draw Rademacher probes (entries +-1, from a seeded CPU generator: the same seed gives the
same probes on every device) and report an error estimate beside the value.

* :func:`hutchinson_trace`: ``tr H ~ mean(z^T H z)``; error ``~ sqrt(2 / m) |H|_F`` off the diagonal after
  ``m`` products.
* :func:`hutchpp_trace` (Hutch++, Meyer, Musco, Musco, Woodruff 2021): a third of the budget sketches the
  range of ``H`` (``Q = orth(H S)``), a third computes ``tr(Q^T H Q)`` exactly, the rest runs Hutchinson on
  the deflated remainder ``(I - Q Q^T) H (I - Q Q^T)``; error ``~ 1 / m`` for decaying spectra.
* :func:`xtrace` (XTrace, Epperly, Tropp, Webber 2024): every probe both sketches and estimates, by leaving
  it out of the sketch in turn (NOTE: [xtrace downdating]); ``m / 2`` probes and ``m`` products in all.
  Usually the most accurate per product; :func:`trace` uses it by default.
* :func:`hutchinson_diagonal`: ``diag H ~ mean(z * H z)`` with a per-entry standard error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mrgd_ext._validation import check_int
from mrgd_ext.curvature.krylov import CountingApply
from mrgd_ext.curvature.operator import LinearOperator, as_operator, at_one_point

__all__ = [
    "TRACE_METHODS",
    "TraceEstimate",
    "DiagonalEstimate",
    "trace",
    "hutchinson_trace",
    "hutchpp_trace",
    "xtrace",
    "hutchinson_diagonal",
]

#: Values accepted for :func:`trace`'s ``method=``.
TRACE_METHODS: tuple[str, ...] = ("auto", "xtrace", "hutch++", "hutchinson")


@dataclass
class TraceEstimate:
    """Result of a trace estimator: ``trace`` +- ``stderr``.

    Attributes:
        trace: the estimate.
        stderr: standard error of the estimate (the standard deviation of ``samples`` over
            ``sqrt(len(samples))``; for Hutch++ the samples are those of its Hutchinson part, for XTrace the
            leave-one-out estimates).
        samples: the per-probe values averaged into ``trace`` (Hutch++: the remainder's ``z^T H z``).
        num_probes: probes drawn.
        num_hvps: operator applications used.
        method: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
    """

    trace: float
    stderr: float
    samples: np.ndarray
    num_probes: int
    num_hvps: int
    method: str = "hutchinson"


@dataclass
class DiagonalEstimate:
    """Result of :func:`hutchinson_diagonal`: per-entry ``diagonal`` +- ``stderr`` ([n] float64, on the
    operator's device)."""

    diagonal: torch.Tensor
    stderr: torch.Tensor
    num_probes: int
    num_hvps: int
    _unflatten: Callable[[torch.Tensor], list[torch.Tensor]] | None = field(default=None, repr=False)

    def diagonal_params(self) -> list[torch.Tensor]:
        """The diagonal as views shaped like the operator's parameters (one view for matrices)."""
        return self._unflatten(self.diagonal) if self._unflatten else [self.diagonal]


def _rademacher(gen: torch.Generator, rows: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    z = torch.randint(0, 2, (rows, n), generator=gen, dtype=torch.int8)
    return (2 * z.to(dtype) - 1).to(device)


def _batched(apply: Callable[[torch.Tensor], torch.Tensor], V: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``apply`` on the rows of ``V`` [m, n], ``batch_size`` rows per call."""
    return torch.cat([apply(V[i : i + batch_size]) for i in range(0, V.shape[0], batch_size)])


def _stats(samples: np.ndarray) -> tuple[float, float]:
    return float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(samples.shape[0]))


def _probe_quadratics(
    apply: CountingApply, gen: torch.Generator, A: LinearOperator, count: int, batch_size: int,
    project: torch.Tensor | None = None,
) -> np.ndarray:
    """``z^T H z`` for ``count`` Rademacher probes (projected as ``z - (z Q^T) Q`` when ``project=Q``)."""
    out = []
    for start in range(0, count, batch_size):
        Z = _rademacher(gen, min(batch_size, count - start), A.n, A.dtype, A.device)
        if project is not None:
            Z = Z - (Z @ project.T) @ project
        out.append((Z.double() * apply(Z).double()).sum(dim=1).cpu().numpy())
    return np.concatenate(out)


def _orth_rows(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal rows ``Q`` [m, n] and upper triangular ``R`` [m, m] with ``Y = R^T Q`` (QR of ``Y^T``)."""
    Qc, R = torch.linalg.qr(Y.T)
    return Qc.T, R


@at_one_point
def hutchinson_trace(
    op: Any,
    num_probes: int = 100,
    seed: int = 0,
    *,
    batch_size: int = 8,
    n: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """Hutchinson's estimate of ``tr H`` from ``num_probes`` Rademacher probes, with its standard error.

    For Rademacher probes ``Var(z^T H z) = 2 sum_{i != j} H_ij^2`` (the diagonal contributes nothing), so a
    diagonally dominant operator needs few probes. ``batch_size`` probes share one operator call.
    ``num_probes >= 2`` (the standard error needs two samples). ``op`` as for :func:`mrgd_ext.lanczos`.
    """
    A = as_operator(op, n=n, dtype=dtype, device=device)
    num_probes = check_int(num_probes, "num_probes", 2)
    batch_size = check_int(batch_size, "batch_size", 1)
    apply = CountingApply(A)
    gen = torch.Generator().manual_seed(int(seed))
    s = _probe_quadratics(apply, gen, A, num_probes, batch_size)
    t, err = _stats(s)
    return TraceEstimate(trace=t, stderr=err, samples=s, num_probes=num_probes, num_hvps=apply.num_hvps)


@at_one_point
def hutchpp_trace(
    op: Any,
    budget: int = 99,
    seed: int = 0,
    *,
    batch_size: int = 8,
    n: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """Hutch++ estimate of ``tr H`` with ``budget`` operator applications (``>= 6``; module docstring).

    ``k = budget // 3`` probes sketch the range, ``k`` products give ``tr(Q^T H Q)`` exactly, and the
    remaining ``budget - 2k`` probes estimate the trace of the deflated remainder; ``stderr`` is that
    Hutchinson part's standard error (the sketch part has none given the sketch).
    """
    A = as_operator(op, n=n, dtype=dtype, device=device)
    budget = check_int(budget, "budget", 6)
    batch_size = check_int(batch_size, "batch_size", 1)
    apply = CountingApply(A)
    gen = torch.Generator().manual_seed(int(seed))
    k = min(budget // 3, A.n)
    S = _rademacher(gen, k, A.n, A.dtype, A.device)
    Q, _ = _orth_rows(_batched(apply, S, batch_size))
    exact = float((Q.double() * _batched(apply, Q, batch_size).double()).sum())
    g = budget - 2 * k
    s = _probe_quadratics(apply, gen, A, g, batch_size, project=Q)
    t, err = _stats(s)
    return TraceEstimate(trace=exact + t, stderr=err, samples=s, num_probes=k + g, num_hvps=apply.num_hvps,
                         method="hutch++")


@at_one_point
def xtrace(
    op: Any,
    budget: int = 100,
    seed: int = 0,
    *,
    batch_size: int = 8,
    n: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """XTrace estimate of ``tr H`` with ``budget`` operator applications (``>= 4``; ``budget // 2`` probes).

    Each probe ``omega_i`` gives the unbiased estimate ``tr(P_i H P_i) + omega_i^T (I - P_i) H (I - P_i)
    omega_i``, ``P_i`` the projector on the range of ``H`` applied to the other probes; ``trace`` is their
    mean and ``stderr`` their standard deviation over ``sqrt(m)`` (the estimates share probes, so this is
    the estimator's own heuristic error bar, not an exact standard error).
    """
    A = as_operator(op, n=n, dtype=dtype, device=device)
    budget = check_int(budget, "budget", 4)
    batch_size = check_int(batch_size, "batch_size", 1)
    apply = CountingApply(A)
    gen = torch.Generator().manual_seed(int(seed))
    m = min(budget // 2, A.n)
    Om = _rademacher(gen, m, A.n, A.dtype, A.device)  # rows omega_i
    Y = _batched(apply, Om, batch_size)  # rows H omega_i
    Q, R = _orth_rows(Y)  # Y = R^T Q
    Z = _batched(apply, Q, batch_size)  # rows H q_j
    # NOTE: [xtrace downdating]
    # The range of Y without row i is an (m-1)-dimensional subspace of span(Q): the complement of the unit
    # vector q_i = s_i Q with s_i ~ R^{-T} e_i (orthogonal to every other y_j). So P_i = Q^T Q - q_i^T q_i and,
    # with w = Q omega_i, c = s_i . w, r = (I - Q^T Q) omega_i, everything reduces to m x m matrices:
    #   tr(P_i H) = tr(Hq) - s_i^T Hq s_i,            (I - P_i) omega_i = r + c q_i,
    #   r^T H r = omega^T y_i - 2 t_i . w + w^T Hq w,  q_i^T H r = s_i . (t_i - Hq w),
    # Hq = Q H Q^T and t_i = Z omega_i: two blocks of m products in all, no product per left-out probe.
    Hq = (Q.double() @ Z.double().T).cpu().numpy()
    Hq = 0.5 * (Hq + Hq.T)
    W = (Q.double() @ Om.double().T).cpu().numpy()  # column i: Q omega_i
    Tm = (Z.double() @ Om.double().T).cpu().numpy()  # column i: Z omega_i
    oAo = (Om.double() * Y.double()).sum(dim=1).cpu().numpy()
    Sm = np.linalg.pinv(R.double().cpu().numpy()).T  # column i: R^{-T} e_i
    Sm /= np.maximum(np.linalg.norm(Sm, axis=0, keepdims=True), 1e-300)
    HS = Hq @ Sm
    HW = Hq @ W
    sHs = np.einsum("ji,ji->i", Sm, HS)
    c = np.einsum("ji,ji->i", Sm, W)
    rAr = oAo - 2 * np.einsum("ji,ji->i", Tm, W) + np.einsum("ji,ji->i", W, HW)
    qAr = np.einsum("ji,ji->i", Sm, Tm - HW)
    ests = (np.trace(Hq) - sHs) + rAr + 2 * c * qAr + c * c * sHs
    t, err = _stats(ests)
    return TraceEstimate(trace=t, stderr=err, samples=ests, num_probes=m, num_hvps=apply.num_hvps, method="xtrace")


def trace(
    op: Any,
    budget: int = 100,
    seed: int = 0,
    *,
    method: str = "auto",
    batch_size: int = 8,
    n: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """``tr H`` with at most ``budget`` operator applications.

    ``method="auto"`` takes XTrace (the most accurate per product of the three on decaying spectra, such as
    trained networks' Hessians; benchmarks/bench_lanczos.py --problem wine
    and tests/test_trace.py measure it) when ``budget >= 4``, else Hutchinson. ``"xtrace"``, ``"hutch++"``
    and ``"hutchinson"`` force one (budgets >= 4, >= 6 and >= 2).
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"method must be one of {TRACE_METHODS}, got {method!r}")
    budget = check_int(budget, "budget", 2)
    if method == "xtrace" or (method == "auto" and budget >= 4):
        return xtrace(op, budget, seed=seed, batch_size=batch_size, n=n, dtype=dtype, device=device)
    if method == "hutch++":
        return hutchpp_trace(op, budget, seed=seed, batch_size=batch_size, n=n, dtype=dtype, device=device)
    return hutchinson_trace(op, budget, seed=seed, batch_size=batch_size, n=n, dtype=dtype, device=device)


@at_one_point
def hutchinson_diagonal(
    op: Any,
    num_probes: int = 100,
    seed: int = 0,
    *,
    batch_size: int = 8,
    n: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> DiagonalEstimate:
    """Hutchinson's estimate of ``diag H`` (per-parameter curvature): ``mean(z * H z)`` over Rademacher
    probes, with per-entry standard errors. Entry ``i`` has variance ``sum_{j != i} H_ij^2`` per probe, so the
    error falls as ``1 / sqrt(num_probes)`` (``>= 2``); ``batch_size`` probes share one operator call."""
    A = as_operator(op, n=n, dtype=dtype, device=device)
    num_probes = check_int(num_probes, "num_probes", 2)
    batch_size = check_int(batch_size, "batch_size", 1)
    apply = CountingApply(A)
    gen = torch.Generator().manual_seed(int(seed))
    total = torch.zeros(A.n, dtype=torch.float64, device=A.device)
    total_sq = torch.zeros_like(total)
    for start in range(0, num_probes, batch_size):
        Z = _rademacher(gen, min(batch_size, num_probes - start), A.n, A.dtype, A.device)
        P = Z.double() * apply(Z).double()
        total += P.sum(dim=0)
        total_sq += (P * P).sum(dim=0)
    mean = total / num_probes
    var = (total_sq - num_probes * mean * mean).clamp_min(0.0) / (num_probes - 1)
    return DiagonalEstimate(diagonal=mean, stderr=(var / num_probes).sqrt(), num_probes=num_probes,
                            num_hvps=apply.num_hvps, _unflatten=A.unflatten)
