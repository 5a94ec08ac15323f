"""The default ``lanczos`` call on hard spectra: it returns the true top-k or says it has not converged.

NOTE: [top-k check]
For orthonormal Ritz vectors Y with residual matrix R = H Y^T - Y^T diag(theta), there are k distinct
eigenvalues within |R|_2 <= |R|_F of the k Ritz values (Kahan's theorem for Hermitian matrices); when those
are the k largest, sorting pairs them so that |theta_(i) - lambda_(i)| <= |R|_F. The checks below use that
bound (plus 1e-12 |H| for rounding of the products), so a "converged" result that has silently missed an
eigenvalue fails them as soon as the missed one is more than |R|_F away from the k-th reported value.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mrgd_ext.curvature.hessian import HessianOperator
from mrgd_ext.curvature.lanczos import lanczos


def spectrum_matrix(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    return (U * torch.as_tensor(np.array(eigs, dtype=np.float64))) @ U.T


def check_top_k(res, exact_desc, A=None):
    """Either not converged, or the reported values are the top k within the bound of NOTE: [top-k check]."""
    if not res.all_converged:
        return False
    k = res.eigenvalues.numel()
    bound = float(torch.linalg.vector_norm(res.residuals)) + 1e-12 * float(abs(exact_desc).max())
    err = np.abs(np.sort(res.eigenvalues.numpy())[::-1] - np.asarray(exact_desc[:k]))
    assert err.max() <= bound, f"converged but wrong: errors {err} > {bound:.3g}"
    return True


def degenerate_spectrum(n=300, mult=4, seed=0):
    """A top eigenvalue of multiplicity ``mult``, then a decaying tail."""
    g = np.random.default_rng(seed)
    tail = np.sort(g.uniform(0.0, 2.0, n - mult - 6))[::-1]
    return np.concatenate([np.full(mult, 10.0), [6.0, 5.0, 4.5, 4.0, 3.5, 3.0], tail])


def clustered_spectrum(n=300, seed=0):
    """10 top eigenvalues within a relative 1e-3 of each other, two of them 1e-8 apart, then a bulk."""
    g = np.random.default_rng(seed)
    cluster = 5.0 * (1.0 - 1e-3 * np.sort(g.uniform(0.0, 1.0, 9)))
    cluster = np.concatenate([cluster, [cluster[3] - 5e-8]])  # relative gap 1e-8 to its neighbour
    bulk = np.sort(g.uniform(-1.0, 3.0, n - 10))[::-1]
    return np.sort(np.concatenate([cluster, bulk]))[::-1]


@pytest.mark.parametrize("block_size", [1, 2, 4])
@pytest.mark.parametrize("k", [3, 6])
def test_degenerate_top_default_call_is_right_or_unconverged(block_size, k):
    eigs = degenerate_spectrum()
    A = spectrum_matrix(eigs, seed=3)
    res = lanczos(A, k, block_size=block_size)
    converged = check_top_k(res, eigs)
    # Not vacuous: the verification finds the missed copies of the degenerate eigenvalue (it restarts in
    # their complement), so every configuration here ends converged and right.
    assert converged, f"b={block_size} k={k}: not converged after {res.num_hvps} products"


@pytest.mark.parametrize("block_size", [1, 4])
def test_cluster_with_tiny_gap_default_call_is_right_or_unconverged(block_size):
    eigs = clustered_spectrum()
    A = spectrum_matrix(eigs, seed=4)
    res = lanczos(A, 10, block_size=block_size)
    assert check_top_k(res, eigs)


def test_without_verification_a_degenerate_top_is_missed_by_single_vectors():
    # Shows what the verification is for: a single-vector Krylov space holds one direction of a degenerate
    # eigenspace, so b=1 reports the next eigenvalues instead, with small residuals.
    eigs = degenerate_spectrum()
    A = spectrum_matrix(eigs, seed=3)
    res = lanczos(A, 3, block_size=1, verify=False)
    assert not res.verified and not res.all_converged
    assert float(res.eigenvalues[1]) < 9.0  # the second copy of 10 was missed
    assert bool((res.residuals <= res.thresholds).all())  # ...with small residuals all the same
    full = lanczos(A, 3, block_size=1)
    assert full.verified and full.verifications >= 2
    np.testing.assert_allclose(full.eigenvalues.numpy(), [10.0, 10.0, 10.0], rtol=1e-9)


def test_restarts_bound_memory_and_keep_accuracy():
    eigs = np.concatenate([[10.0, 9.0, 8.5, 8.4, 8.35], np.linspace(8.0, 0.0, 395)])
    A = spectrum_matrix(eigs, seed=5)
    res = lanczos(A, 5, block_size=2, max_basis=16)
    assert res.restarts > 0 and res.basis_size <= 16
    assert check_top_k(res, eigs)


def test_small_eigenvalues_are_relatively_accurate():
    # A multiscale spectrum spanning five decades: each value is accurate relative to itself.
    eigs = np.concatenate([[1.0, 0.3, 1e-2, 3e-3, 1e-4], np.linspace(5e-5, 0.0, 195)])
    A = spectrum_matrix(eigs, seed=6)
    res = lanczos(A, 5, block_size=1)
    assert res.all_converged
    rel = np.abs(res.eigenvalues.numpy() - eigs[:5]) / eigs[:5]
    assert rel.max() <= 1e-6, rel  # tol = 1e-6 relative residual bounds the relative error


# ----------------------------------------------------------------------------------------------------------
# A small trained network: 13-32-32-3 MLP on raw (unscaled) wine, 200 Adam steps, float64.


def _wine_mlp(lr):
    datasets = pytest.importorskip("sklearn.datasets")
    X, y = datasets.load_wine(return_X_y=True)
    X = torch.as_tensor(X, dtype=torch.float64)
    y = torch.as_tensor(y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(200):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    op = HessianOperator(model, loss_fn, (X, y))
    # Truth from the dense Hessian by double backward through the flattened parameters (torch.func), not
    # through the operator under test.
    names = [nm for nm, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(theta):
        parts = torch.split(theta, [int(np.prod(s)) for s in shapes])
        params = {nm: t.reshape(s) for nm, t, s in zip(names, parts, shapes)}
        return loss_fn(torch.func.functional_call(model, params, (X,)), y)

    H = torch.func.hessian(loss_of)(flat)
    exact = np.sort(np.linalg.eigvalsh(0.5 * (H + H.T).numpy()))[::-1]
    return op, exact


@pytest.fixture(scope="module", params=[1e-3, 1e-2], ids=["adam1e-3", "adam1e-2"])
def wine(request):
    return _wine_mlp(request.param)


@pytest.mark.parametrize("block_size", [1, 4, 8])
def test_trained_mlp_default_call_matches_dense_eigh(wine, block_size):
    op, exact = wine
    res = lanczos(op, 10, block_size=block_size)
    assert check_top_k(res, exact), f"b={block_size}: not converged after {res.num_hvps} products"
    # Each value within its own threshold of the truth (NOTE: [relative residuals]).
    err = np.abs(res.eigenvalues.numpy() - exact[:10])
    assert (err <= res.thresholds.numpy()).all(), (err, res.thresholds)


# ----------------------------------------------------------------------------------------------------------
# The quantitative verification bound (guarantee (c) of lanczos, NOTE: [verification bound])


def bulk_spectrum(n=300, seed=0):
    """Three separated top eigenvalues over a uniform bulk: the bulk's top converges slowly."""
    g = np.random.default_rng(seed)
    return np.concatenate([[10.0, 8.0, 7.0], np.sort(g.uniform(0.0, 5.0, n - 3))[::-1]])


def complement_spectrum(A, Y):
    """Eigenvalues of A restricted to the orthogonal complement of the rows of Y (dense, independent)."""
    n, k = A.shape[0], Y.shape[0]
    g = torch.Generator().manual_seed(123)
    basis, _ = torch.linalg.qr(torch.cat([Y.T, torch.randn(n, n - k, generator=g, dtype=torch.float64)], 1))
    Z = basis[:, k:]
    return torch.linalg.eigvalsh(Z.T @ A @ Z).numpy()


@pytest.mark.parametrize("spectrum,k", [(degenerate_spectrum, 6), (clustered_spectrum, 10), (bulk_spectrum, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_verification_bounds_hold_and_certify_the_top_k(spectrum, k, seed):
    eigs = spectrum()
    A = spectrum_matrix(eigs, seed=seed + 3)
    res = lanczos(A, k, seed=seed, verify_steps=24)
    assert res.all_converged
    lo, hi = res.verification_bounds
    mu = complement_spectrum(A, res.eigenvectors)
    # The stated interval holds the complement's spectrum (it fails with probability <= 1%; the Ritz values
    # of the fresh space alone lie strictly inside the bulk, so a bound without its padding fails here).
    # 1e-10 |H|: rounding of the dense reference.
    slack = 1e-10 * float(np.abs(eigs).max())
    assert lo <= mu.min() + slack and mu.max() <= hi + slack, (lo, mu.min(), mu.max(), hi)
    # Informative: 24 products bound the complement within a quarter of its width, below the k-th value...
    assert hi - mu.max() <= 0.25 * (mu.max() - mu.min())
    assert hi < float(res.eigenvalues[-1])
    # ...so the implication of (c) is a certificate: sorted errors within |R|_F (plus rounding of the truth).
    bound = float(torch.linalg.vector_norm(res.residuals)) + max(0.0, hi - float(res.eigenvalues[-1]))
    err = np.abs(np.sort(res.eigenvalues.numpy())[::-1] - np.sort(eigs)[::-1][:k])
    assert err.max() <= bound + slack


def test_verification_bound_needs_enough_steps():
    from mrgd_ext.curvature.lanczos import VERIFY_CONFIDENCE, _verification_bounds

    assert VERIFY_CONFIDENCE == 0.99
    T = np.diag([1.0, 2.0, 3.0])
    # Finite from j > 1/2 + ln(2 * 1.648 sqrt(N) / 0.01) / sqrt(2) steps: 6.6 for N = 300.
    assert _verification_bounds(T, 6, 300) == (-np.inf, np.inf)
    lo, hi = _verification_bounds(T, 7, 300)
    e = (np.log(2 * 1.648 * np.sqrt(300) / 0.01) / 13) ** 2
    pad = e / (1 - 2 * e) * 2.0
    assert lo == pytest.approx(1.0 - pad, rel=1e-12) and hi == pytest.approx(3.0 + pad, rel=1e-12)
    # The default (verify_steps=1) passes the screen after a few products, too few to bound anything.
    res = lanczos(spectrum_matrix(bulk_spectrum(), seed=3), 3, seed=0)
    assert res.all_converged and res.verification_bounds == (-np.inf, np.inf)
    # A thick restart inside the verification keeps no Krylov space of the fresh vector: no bound; the
    # locked pairs are still returned in descending order with estimates that match the true residuals.
    res = lanczos(spectrum_matrix(bulk_spectrum(), seed=3), 3, max_basis=14, verify_steps=24)
    assert res.restarts > 0 and res.all_converged and res.verification_bounds == (-np.inf, np.inf)
    np.testing.assert_allclose(res.eigenvalues.numpy(), [10.0, 8.0, 7.0], rtol=1e-9)
    torch.testing.assert_close(res.residual_estimates, res.residuals, rtol=1e-4, atol=1e-12)
    # A basis spanning the whole space makes the bound exact: the rest of the spectrum.
    eigs = np.arange(12.0)
    full = lanczos(spectrum_matrix(eigs, seed=0), 3, tol=1e-12, max_basis=12)
    lo, hi = full.verification_bounds
    assert full.basis_size == 12 and full.verified
    assert lo == pytest.approx(0.0, abs=1e-9) and hi == pytest.approx(8.0, abs=1e-9)
