"""Thick-restart block Lanczos with full reorthogonalisation, for extreme eigenpairs of a symmetric operator.

``lanczos(op, k)`` finds the ``k`` largest (or smallest, or both ends) eigenpairs of a symmetric operator
given as a :class:`mrgd_ext.HessianOperator`, a symmetric matrix, or a callable on blocks of vectors. It is the
spectrum estimator of docs/design.md section 1.5:

* block Krylov space from a seeded random start block (CPU generator, moved to the device: same seed, same
  result), kept in the shared core :class:`mrgd_ext.curvature.krylov.BlockKrylov`: every new block is
  orthogonalised against the whole basis by classical Gram-Schmidt done twice (CGS2), rank deficiency and
  breakdown are deflated (NOTE: [deflation]);
* the projected matrix ``T = Q H Q^T`` lives in float64 on the host; its eigenpairs are the Ritz pairs and the
  residual of Ritz pair ``i`` is estimated for free as ``|S^T s_i|`` (``S`` the coupling of the last block to
  the next, ``s_i`` the last block of the eigenvector of T), checked after every block;
* the basis is bounded (``max_basis``): when full it is thick-restarted on the most wanted Ritz vectors
  (NOTE: [thick restart]);
* each pair converges relative to its own value (NOTE: [relative residuals]); once all wanted pairs have, they
  are locked and a fresh random vector checks their orthogonal complement for a missed eigenvalue
  (NOTE: [verification]) and bounds the complement's spectrum with probability 0.99 (NOTE: [verification
  bound]);
* the run starts with single vectors and widens the block (up to ``block_size``) when the verification finds
  a missed eigenvalue (NOTE: [adaptive block]);
* at the end the residuals ``|H y_i - theta_i y_i|`` are recomputed from the operator's stored products (no
  extra application, NOTE: [stored products]) or, with ``recompute_residuals="apply"``, with ``k`` more
  applications; the ``converged`` flags use those honest values.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mrgd_ext.curvature.krylov import ORTHOGONALIZERS, BlockKrylov, CountingApply, host_eigh, orthogonalizer
from mrgd_ext.curvature.operator import LinearOperator, as_operator, at_one_point

__all__ = ["lanczos", "LanczosResult", "WHICH", "ORTHOGONALIZERS", "VERIFY_CONFIDENCE"]

#: Values accepted for ``which=``.
WHICH: tuple[str, ...] = ("largest", "smallest", "both")

#: Probability with which :attr:`LanczosResult.verification_bounds` holds (NOTE: [verification bound]).
VERIFY_CONFIDENCE = 0.99

#: Values accepted for ``recompute_residuals=`` (True means "products").
RECOMPUTE: tuple[object, ...] = (True, False, "products", "apply")



# ----------------------------------------------------------------------------------------------------------
# Result


@dataclass
class LanczosResult:
    """Ritz pairs and bookkeeping of one :func:`lanczos` run.

    Attributes:
        eigenvalues: [k] float64 (CPU), sorted descending.
        eigenvectors: [k, n] in the operator's dtype and device; orthonormal rows.
        residuals: [k] float64, ``|H y_i - theta_i y_i|`` recomputed from the stored products
            (``recompute_residuals=True``, the default) or with ``k`` extra operator applications
            (``"apply"``); with ``False`` equal to ``residual_estimates``.
        residual_estimates: [k] float64, the Lanczos estimates ``|S^T s_i|`` at the last iteration.
        converged: [k] bool, ``(residuals <= thresholds) & verified`` (the guarantee of :func:`lanczos`).
        thresholds: [k] float64, ``max(tol |theta_i|, max(1e-3 tol, 100 eps) scale)`` (NOTE: [relative
            residuals]).
        verified: the verification in the orthogonal complement of the converged pairs passed
            (NOTE: [verification]).
        scale: largest ``|theta|`` seen over the run (an estimate of ``|H|_2``).
        num_hvps: operator applications requested, one per vector (including the ``k`` of an ``"apply"``
            recomputation; a HessianOperator's own first-use determinism check, two products, is not counted).
        num_iterations: block iterations (each applies the operator to one block).
        basis_size: rows of the final Krylov basis.
        hvp_time: seconds inside the operator; other_time: everything else (orthogonalisation, Ritz pairs,
            bookkeeping); total_time = hvp_time + other_time.
        history: per iteration, ``(basis_size, num_hvps, max wanted residual estimate / threshold, seconds)``.
        restarts: thick restarts (NOTE: [thick restart]); verifications: verification runs started.
        verification_bounds: ``(lo, hi)``, an interval that holds, with probability at least
            ``VERIFY_CONFIDENCE`` over the verification's random vector, every eigenvalue of ``H`` restricted
            to the orthogonal complement of ``eigenvectors`` (guarantee (c) of :func:`lanczos`; NOTE:
            [verification bound]); ``(-inf, inf)`` when the verification ran too few steps to bound anything
            (raise ``verify_steps``) or was restarted, exact when the basis spanned the whole space.
        orthogonalizer: "kernel" or "torch", the implementation of the vector work that was used.
        deflations: directions replaced by random vectors after rank deficiency or breakdown.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    residual_estimates: torch.Tensor
    converged: torch.Tensor
    scale: float
    tol: float
    which: str
    block_size: int
    num_hvps: int
    num_iterations: int
    basis_size: int
    hvp_time: float
    other_time: float
    orthogonalizer: str
    deflations: int = 0
    history: list[tuple[int, int, float, float]] = field(default_factory=list)
    thresholds: torch.Tensor | None = None
    verified: bool = False
    restarts: int = 0
    verifications: int = 0
    verification_bounds: tuple[float, float] = (-math.inf, math.inf)
    _unflatten: Callable[[torch.Tensor], list[torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def total_time(self) -> float:
        return self.hvp_time + self.other_time

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def eigenvector_params(self, i: int) -> list[torch.Tensor]:
        """Eigenvector ``i`` as views shaped like the operator's parameters (one view for matrices)."""
        return self._unflatten(self.eigenvectors[i]) if self._unflatten else [self.eigenvectors[i]]

    def eigenvectors_params(self) -> list[torch.Tensor]:
        """All eigenvectors as per-parameter views ``[k, *shape]``."""
        return self._unflatten(self.eigenvectors) if self._unflatten else [self.eigenvectors]


# ----------------------------------------------------------------------------------------------------------
# Driver


def _wanted(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices (into ascending ``theta``) of the wanted Ritz values, ordered by descending value."""
    m = theta.shape[0]
    if which == "largest":
        idx = np.arange(max(m - k, 0), m)
    elif which == "smallest":
        idx = np.arange(0, min(k, m))
    else:
        top, bottom = (k + 1) // 2, k // 2
        idx = np.union1d(np.arange(max(m - top, 0), m), np.arange(0, min(bottom, m)))
    picked: np.ndarray = idx[::-1].copy()
    return picked


def _verification_bounds(TF: np.ndarray, steps: int, dim: int) -> tuple[float, float]:
    """An interval holding the whole spectrum of the compression ``P H P`` (``P``: projector on the
    complement of the locked vectors, ``dim`` its rank) with probability >= VERIFY_CONFIDENCE, from the
    projected matrix ``TF`` of a space holding the Krylov space of ``steps`` products of ``P H P`` on one
    random vector uniform on its unit sphere.

    NOTE: [verification bound]
    Kuczynski and Wozniakowski ("Estimating the largest eigenvalue by the power and Lanczos algorithms with
    a random start", SIAM J. Matrix Anal. Appl. 13(4), 1992) bound the probabilistic failure of Lanczos from
    a start uniform on the sphere, for a positive definite matrix of order N after j products:
    P[(mu_1 - f_1) / mu_1 >= eps] <= 1.648 sqrt(N) exp(-sqrt(eps) (2 j - 1)). Krylov spaces are shift
    invariant, so for P H P - mu_min (and mu_max - P H P at the other end; semidefinite as a limit) it reads:
    the extreme Ritz values f_max, f_min miss mu_max, mu_min by at least eps S, S = mu_max - mu_min, each
    with probability at most p. Outside both events (probability >= 1 - 2 p), S <= (f_max - f_min) + 2 eps
    S, so S <= (f_max - f_min) / (1 - 2 eps) and every eigenvalue lies in [f_min - pad, f_max + pad],
    pad = eps (f_max - f_min) / (1 - 2 eps). Here eps solves 2 p = 1 - VERIFY_CONFIDENCE; eps >= 1/2 (too
    few steps) bounds nothing. Ritz values over a larger space than the Krylov one (deflation fills) only
    widen [f_min, f_max], so the bound stays valid; a thick restart inside the verification does not keep
    the Krylov space, and the caller then reports no bound.
    """
    if steps < 1 or TF.shape[0] == 0 or dim < 1:
        return (-math.inf, math.inf)
    f = host_eigh(TF)[0]
    root = math.log(2.0 * 1.648 * math.sqrt(dim) / (1.0 - VERIFY_CONFIDENCE)) / (2 * steps - 1)
    e = root * root
    if e >= 0.5:
        return (-math.inf, math.inf)
    pad = e / (1.0 - 2.0 * e) * float(f[-1] - f[0])
    return (float(f[0]) - pad, float(f[-1]) + pad)


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _start_block(K: BlockKrylov, start: torch.Tensor | None, block_size: int, A: LinearOperator) -> torch.Tensor:
    # NOTE: [warm start]
    # Ritz vectors of a nearby operator span most of the wanted invariant subspace; a Krylov space grown from
    # combinations of them reaches small residuals in fewer iterations than one grown from noise. Random
    # combinations (not the first ``block_size`` vectors) keep every start direction in the block; where
    # they happen to span an invariant subspace exactly, deflation fills in random directions
    # (NOTE: [deflation]), so a warm start never stalls the space.
    if start is None:
        return K.random_block(block_size)
    if not isinstance(start, torch.Tensor):
        raise TypeError(f"start must be a tensor [s, n], got {type(start).__name__}")
    if start.dim() == 1:
        start = start[None]
    if start.dim() != 2 or start.shape[1] != A.n or start.shape[0] == 0:
        raise ValueError(f"start must have shape [s, n] with s >= 1 and n = {A.n}, got {tuple(start.shape)}")
    if not start.dtype.is_floating_point:
        raise TypeError(f"start must be floating point, got {start.dtype}")
    S = start.detach().to(device=A.device, dtype=A.dtype)
    if not bool(torch.isfinite(S).all()):
        raise ValueError("start has non-finite entries")
    s = S.shape[0]
    if s >= block_size:
        G = torch.randn((block_size, s), generator=K.gen, dtype=torch.float64)
        return G.to(device=A.device, dtype=A.dtype) @ S
    return torch.cat([S, K.random_block(block_size - s)])


def _default_tol(dtype: torch.dtype) -> float:
    # NOTE: [default tolerance]
    # Residual r_i <= tol |theta_i| bounds the eigenvalue error by tol |theta_i| even inside clusters (and
    # by r_i^2 / gap, ~tol^2, where the eigenvalue is separated); 1e-6 is ARPACK's usual choice and reached in
    # float64 well above rounding. float32 products carry ~1e-7 relative rounding per product, so 1e-4.
    return 1e-6 if dtype == torch.float64 else 1e-4


def _thresholds(theta: np.ndarray, tol: float, scale: float, eps: float) -> np.ndarray:
    # NOTE: [relative residuals]
    # Each Ritz pair is judged relative to its own value, so small eigenvalues of a multiscale spectrum are
    # as accurate (relatively) as the largest. Values near 0 get the floor max(1e-3 tol, 100 eps) |H|: a
    # relative test is unreachable there, and below 100 eps |H| rounding of the products dominates.
    thresholds: np.ndarray = np.maximum(tol * np.abs(theta), max(1e-3 * tol, 100.0 * eps) * scale)
    return thresholds


@at_one_point
def lanczos(
    op: Any,
    k: int,
    block_size: int = 1,
    max_iters: int | None = None,
    tol: float | None = None,
    which: str = "largest",
    seed: int = 0,
    *,
    n: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    orthogonalize: str = "auto",
    recompute_residuals: bool | str = True,
    start: torch.Tensor | None = None,
    max_basis: int | None = None,
    verify: bool = True,
    adaptive_block: bool = True,
    verify_steps: int = 1,
) -> LanczosResult:
    """The ``k`` extreme eigenpairs of a symmetric operator by thick-restart block Lanczos.

    Guarantee: ``converged[i]`` is True only if (a) the recomputed residual satisfies
    ``|H y_i - theta_i y_i| <= thresholds[i] = max(tol |theta_i|, max(1e-3 tol, 100 eps) |H|)``, so an
    eigenvalue of ``H`` lies within ``thresholds[i]`` of ``theta_i`` (and the ``k`` reported values match ``k``
    distinct eigenvalues to within ``sqrt(k) max_i thresholds[i]``), and (b) the run is ``verified``: after
    every wanted pair had converged, the pairs were locked and a Lanczos run of at least ``verify_steps``
    products from a fresh seeded random vector in their orthogonal complement found no Ritz value beyond the
    ``k``-th reported one and located its own extreme Ritz value inside the reported range's complement
    (NOTE: [verification]). (b) is a screen: it catches eigenvalues the Krylov space had missed
    (multiplicities, clusters) as soon as the fresh space shows them, which it does first for the extreme
    ones; what it proves is stated by (c).

    (c) With probability at least ``VERIFY_CONFIDENCE`` (0.99) over the verification vector, every
    eigenvalue of ``H`` restricted to the orthogonal complement of the returned ``eigenvectors`` lies in
    ``verification_bounds = (lo, hi)``. Then (Weyl's inequality for the coupling of the two parts, whose
    norm is at most ``|R|_F``, ``R`` the residuals) the ``k`` largest eigenvalues of ``H`` (``which=
    "largest"``) satisfy ``|lambda_i - theta_i| <= |R|_F + max(0, hi - theta_k)`` (``theta_k`` the smallest
    reported value), and likewise ``|R|_F + max(0, theta_1 - lo)`` for ``"smallest"``: a missed eigenvalue
    beyond the reported ones is ruled out down to the margin ``hi - theta_k``. The interval is
    Kuczynski-Wozniakowski's bound for Lanczos from a random start (NOTE: [verification bound]); it needs a
    few verification products to be finite (``verify_steps``, about 7 for ``n`` = 300 and 10 for
    ``n`` = 1e6) and tightens as ``1 / verify_steps^2``. With the default ``verify_steps=1`` the run is as
    cheap as ARPACK's and (c) is usually ``(-inf, inf)``: the flag then rests on (a) and the screen (b).

    Args:
        op: a :class:`mrgd_ext.HessianOperator` (or any object with ``matmat``, ``n``, ``dtype``, ``device``),
            a symmetric matrix ``[n, n]`` (tensor or numpy array), or a callable mapping a block ``[b, n]`` to
            ``[b, n]`` (then pass ``n=``; ``dtype``/``device`` default to float64/CPU).
        k: number of eigenpairs, ``1 <= k <= n``.
        block_size: most vectors per block (``b``); blocks apply the operator to several vectors at once
            (one vmapped Hessian-vector product) and resolve clusters and multiplicities, but need more
            products than single vectors for simple eigenvalues. With ``adaptive_block`` (the default) a
            run starts with single vectors and widens the block up to ``block_size`` once the verification
            has found a missed eigenvalue (NOTE: [adaptive block]).
        max_iters: most block iterations (operator applications on a block, verification included); default
            ``ceil(max(50 k, 1000) / block_size)``.
        tol: relative residual tolerance per eigenpair (see the guarantee); default 1e-6 for float64
            operators, 1e-4 for float32 (NOTE: [default tolerance]).
        which: ``"largest"`` / ``"smallest"`` (algebraically) or ``"both"``: ``ceil(k/2)`` largest and
            ``floor(k/2)`` smallest.
        seed: seed of the CPU generator that draws the start block (and any deflation or verification block).
        orthogonalize: ``"auto"`` (the fused kernel where it was measured faster, NOTE: [orthogonaliser
            choice]), ``"kernel"`` (on CUDA: ``block_size`` <= 32) or ``"torch"``.
        recompute_residuals: recompute ``|H y - theta y|`` for the returned pairs. ``True`` (or
            ``"products"``): from the operator outputs kept for every basis vector (no extra application;
            twice the basis memory, NOTE: [stored products]); ``"apply"``: ``k`` more applications;
            ``False``: ``residuals`` are the Lanczos estimates.
        start: warm start, ``[s, n]`` vectors the first block is built from (e.g. the ``eigenvectors`` of
            an earlier run on a nearby operator). With ``s >= b`` (``b``: 1 with ``adaptive_block``, else
            ``block_size``) the start block is ``b`` seeded random combinations of them (so every start
            vector is represented), with ``s < b`` it is the vectors themselves completed by random rows
            (NOTE: [warm start]).
        max_basis: most basis vectors kept (memory ``max_basis * n`` elements, twice that with the stored
            products); when full, the basis is thick-restarted (NOTE: [thick restart]). Default
            ``min(n, max(4 k, 40) + 2 block_size)``; at least ``k + 2 block_size`` unless it is ``n``.
        verify: run the verification (b); without it ``verified`` is False and ``converged`` is (a) only.
        adaptive_block: start with one vector and widen on missed eigenvalues (default), or use
            ``block_size`` vectors for every product (NOTE: [adaptive block]).
        verify_steps: fewest products of the verification's fresh vector before (b) may pass. Each one
            tightens the bound (c): with ``N`` the complement's dimension, the interval is finite from
            ``j > 1/2 + ln(330 sqrt(N)) / 1.42`` steps (about 7 for N = 300, 10 for N = 1e6) and its padding
            falls like ``(ln(330 sqrt(N)) / (2 j))^2`` times its width (NOTE: [verification bound]).

    Returns:
        :class:`LanczosResult` (eigenvalues descending).
    """
    A = as_operator(op, n=n, dtype=dtype, device=device)
    k = _check_int(k, "k", 1)
    block_size = _check_int(block_size, "block_size", 1)
    if k > A.n:
        raise ValueError(f"k={k} exceeds the operator size n={A.n}")
    if block_size > A.n:
        raise ValueError(f"block_size={block_size} exceeds the operator size n={A.n}")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if A.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"op: Lanczos needs a float32 or float64 operator, got {A.dtype}")
    tol = _default_tol(A.dtype) if tol is None else float(tol)
    if not (math.isfinite(tol) and tol > 0.0):
        raise ValueError(f"tol must be a finite number > 0, got {tol}")
    if max_iters is None:
        max_iters = max(1, math.ceil(max(50 * k, 1000) / block_size))
    max_iters = _check_int(max_iters, "max_iters", 1)
    b = block_size
    if max_basis is None:
        capacity = min(A.n, max(4 * k, 40) + 2 * b)
    else:
        capacity = min(A.n, _check_int(max_basis, "max_basis", 1))
        if capacity < A.n and capacity < k + 2 * b:
            raise ValueError(f"max_basis={max_basis} must be >= k + 2 block_size = {k + 2 * b} (or >= n)")
    kind, orth = orthogonalizer(orthogonalize, A.device, A.dtype, b)
    if recompute_residuals not in RECOMPUTE:
        raise ValueError(f"recompute_residuals must be one of {RECOMPUTE}, got {recompute_residuals!r}")
    from_products = recompute_residuals is True or recompute_residuals == "products"
    if not isinstance(adaptive_block, bool):
        raise TypeError(f"adaptive_block must be a bool, got {type(adaptive_block).__name__}")
    verify_steps = _check_int(verify_steps, "verify_steps", 1)

    t_start = time.perf_counter()
    apply = CountingApply(A)
    gen = torch.Generator().manual_seed(int(seed))
    K = BlockKrylov(A, capacity, orth, gen, keep_products=from_products)
    eps = float(torch.finfo(A.dtype).eps)

    # NOTE: [adaptive block]
    # Per product, a single-vector Krylov space reaches a simple extreme eigenvalue faster than a block one
    # (degree m instead of m / b polynomials); blocks pay off for multiplicities and tight clusters, which a
    # single vector cannot resolve (it holds one direction of each eigenspace). So a run begins with
    # one vector and the block widens (doubling, at most block_size) each time the verification finds an
    # eigenvalue the space had missed, the signature of a multiplicity or cluster. A warm start begins with
    # one random combination of the start vectors: its Krylov space picks up every start direction within as
    # many steps (measured: 17 products for 8 pairs of a perturbed operator, against 29 for a block of 4
    # combinations and 20 from a cold single vector). adaptive_block=False keeps block_size throughout (fewer
    # operator calls for more products: the faster choice where a block product costs little more than a
    # single one, e.g. large batches on a GPU).
    b_act = 1 if adaptive_block else b
    K.extend(_start_block(K, start, b_act, A), scale=0.0)
    scale = 0.0
    history: list[tuple[int, int, float, float]] = []
    iterations = restarts = verifications = 0
    locked = 0  # leading basis vectors locked by the current verification (0: not verifying)
    verified = False
    # Residual norm of each basis vector that the Krylov relation no longer carries (locked pairs'
    # residuals, dropped with their coupling): added to the estimates so they stay honest.
    dropped = np.zeros(capacity)
    n_top = {"largest": k, "smallest": 0, "both": (k + 1) // 2}[which]
    lock_iter = lock_restarts = 0
    bounds = (-math.inf, math.inf)  # NOTE: [verification bound]
    final: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    while True:
        s, e = K.blocks[-1]
        W = apply(K.Q[s:e])
        K.record_products((s, e), W)
        iterations += 1
        coeffs, S = K.extend(W, scale)
        # The alpha block Q_j H Q_j^T is the projection of W on Q_j (both CGS rounds), symmetrised: T is
        # symmetric by construction and eigh reads one triangle.
        alpha = coeffs[:, s:e].cpu().numpy()
        K.T[s:e, s:e] = 0.5 * (alpha + alpha.T)
        if S.shape[1]:
            K.set_coupling((s, e), K.blocks[-1], S)
        theta, svec = host_eigh(K.T[:e, :e])
        scale = max(scale, float(np.abs(theta).max()))
        idx = _wanted(theta, k, which)
        # Residual estimates of every Ritz pair: |S^T s_i| (s_i: rows of the last multiplied block of the
        # eigenvector of T) combined with the dropped residuals it carries.
        estimates = np.linalg.norm(S.T @ svec[s:e], axis=0) if S.shape[1] else np.zeros(e)
        estimates = np.sqrt(estimates**2 + (svec**2).T @ dropped[:e] ** 2)
        thr = _thresholds(theta, tol, scale, eps)
        worst = float((estimates[idx] / thr[idx]).max()) if len(idx) else math.inf
        history.append((e, apply.num_hvps, worst, time.perf_counter() - t_start))
        if S.shape[1] == 0 and e == A.n:
            verified = True  # the basis spans the whole space: the Ritz pairs are exact
            rest = np.delete(theta, idx)  # ...and so is the rest of the spectrum
            bounds = (float(rest.min()), float(rest.max())) if rest.size else (math.inf, -math.inf)
            break
        done = len(idx) >= k and worst <= 1.0
        if locked:
            # NOTE: [verification]
            # The wanted pairs were locked (coupling to the rest dropped; their residuals, below threshold,
            # are carried in `dropped`) and Lanczos restarted from a fresh random block in their complement.
            # At each wanted end, a fresh Ritz value beyond the last locked one (by more than its threshold)
            # means the space had missed an eigenvalue: the lock is released and the run goes on (verifying
            # again once everything has converged). The check passes when the fresh space's extreme Ritz
            # value at each end is located on the unwanted side: its residual estimate is below a tenth of
            # its distance to the last locked value (or below that value's threshold). From a random start
            # the extreme eigenvalues of the complement converge first, so a missed one beyond the reported
            # values would show up before a Ritz value settles short of them.
            mass = (svec[:locked] ** 2).sum(axis=0)
            order = np.argsort(-mass, kind="stable")
            L, F = np.sort(order[:locked]), np.sort(order[locked:])  # Ritz indices: locked, fresh
            missed, ok = False, True
            for top, count in ((True, n_top), (False, k - n_top)):
                if count == 0 or F.size == 0:
                    continue
                group = L[::-1][:count] if top else L[:count]  # theta ascending: L[::-1] is descending
                edge = int(group[-1])
                j = int(F[-1] if top else F[0])
                beyond = (theta[j] - theta[edge]) if top else (theta[edge] - theta[j])
                if beyond > thr[edge]:
                    missed = True
                elif estimates[j] > max(0.1 * -beyond, thr[edge]):
                    ok = False
            if missed:
                locked = 0
                if b_act < b:  # NOTE: [adaptive block]
                    b_act = min(b, 2 * b_act)
                s2, e2 = K.blocks[-1]
                K.widen_last_block(b_act - (e2 - s2))
            elif ok and iterations - lock_iter >= verify_steps:
                verified = True
                # The locked pairs themselves are returned (their rows lead the basis): the bound below is a
                # statement about the complement of exactly these vectors. Their residual estimates: the
                # coupling T still holds (nonzero only after a restart inside the verification) and the
                # dropped part.
                lt = np.diag(K.T)[:locked].copy()
                off = K.T[:e, :locked].copy()
                off[np.arange(locked), np.arange(locked)] = 0.0
                est_l = np.sqrt(np.linalg.norm(off, axis=0) ** 2 + dropped[:locked] ** 2)
                desc = np.argsort(-lt, kind="stable")
                final = (np.eye(e)[:, :locked][:, desc], lt[desc], est_l[desc])
                steps = iterations - lock_iter
                if restarts == lock_restarts:  # the fresh rows hold a Krylov space of one random vector
                    bounds = _verification_bounds(K.T[locked:e, locked:e], steps, A.n - locked)
                break
        if iterations >= max_iters:
            break
        if done and not verify:
            break
        if done and not locked:
            # Lock the wanted pairs and start the verification from a fresh block.
            K.restart(svec[:, idx], theta[idx], coupling=None)
            dropped[:] = 0.0
            dropped[: len(idx)] = estimates[idx]
            locked = K.m
            lock_iter, lock_restarts = iterations, restarts
            verifications += 1
            # One fresh vector: a single-vector Krylov space reaches the complement's extreme eigenvalues
            # first, at the least products per step, and it is what the bound of NOTE: [verification bound]
            # is about; a missed eigenvalue found this way widens the block (NOTE: [adaptive block]).
            if K.append_random(1) == 0:
                verified = True  # the locked vectors span the whole space
                bounds = (math.inf, -math.inf)  # an empty complement
                break
            continue
        if K.m + b > capacity and capacity < A.n:
            # NOTE: [thick restart] keep the most wanted Ritz pairs (the wanted k and as many next ones as
            # half the free room allows; the locked pairs first, so a lock stays in front of the basis).
            p = min(capacity - 2 * b, k + (capacity - k) // 2)
            first = L if locked else idx
            keep = _wanted(theta, p, which)
            keep = np.concatenate([first, keep[~np.isin(keep, first)]])[: max(p, len(first))]
            carried = np.sqrt((svec[:, keep] ** 2).T @ dropped[:e] ** 2)
            K.restart(svec[:, keep], theta[keep], coupling=svec[s:e, keep].T @ S)
            dropped[:] = 0.0
            dropped[: len(keep)] = carried
            restarts += 1
    if final is None:
        final = (svec[:, idx], theta[idx], estimates[idx])
    coef, theta_w, est_w = final
    Y = K._combine(coef.T, K.Q[:e])  # Ritz vectors [k, n]
    res_est = torch.from_numpy(np.array(est_w, dtype=np.float64))
    if recompute_residuals:
        if from_products:
            R = K.apply_combination(coef, e)  # NOTE: [stored products]
        else:
            R = torch.empty_like(Y)
            for i in range(0, Y.shape[0], b):
                R[i : i + b] = apply(Y[i : i + b])
        lam = torch.from_numpy(theta_w.copy()).to(device=A.device, dtype=A.dtype)
        R -= lam[:, None] * Y
        residuals = torch.linalg.vector_norm(R.double(), dim=1).cpu()
    else:
        residuals = res_est.clone()
    thresholds = torch.from_numpy(_thresholds(theta_w, tol, scale, eps))
    total = time.perf_counter() - t_start
    return LanczosResult(
        eigenvalues=torch.from_numpy(theta_w.copy()),
        eigenvectors=Y,
        residuals=residuals,
        residual_estimates=res_est,
        converged=(residuals <= thresholds) & verified,
        scale=scale,
        tol=tol,
        which=which,
        block_size=b,
        num_hvps=apply.num_hvps,
        num_iterations=iterations,
        basis_size=e,
        hvp_time=apply.seconds,
        other_time=total - apply.seconds,
        orthogonalizer=kind,
        deflations=K.deflations,
        history=history,
        thresholds=thresholds,
        verified=verified,
        restarts=restarts,
        verifications=verifications,
        verification_bounds=bounds,
        _unflatten=A.unflatten,
    )
