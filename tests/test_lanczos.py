"""Block Lanczos vs dense eigh: extreme eigenpairs, honest residuals, determinism, deflation, bad input.

NOTE: [Lanczos tolerances]
With full reorthogonalisation the basis stays orthonormal to O(u) and a converged Ritz value theta of an
eigenvalue lambda separated from the rest of the spectrum by gap satisfies |theta - lambda| <= r^2 / gap
(Kato-Temple), r = |H y - theta y|. Stopping at r <= tol * |H| with tol = 1e-10 gives a relative error around
1e-20 |H|^2 / (gap |lambda|) plus rounding (~1e-15): far below the 1e-8 asked for well-separated eigenvalues.
Eigenvectors are compared through |<y, v>| = 1 - O(r^2 / gap^2).
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
    return (U * torch.as_tensor(eigs, dtype=torch.float64)) @ U.T


def separated_spectrum(n=240, seed=0):
    """Five well-separated eigenvalues at each end of a bulk in [-1, 4]."""
    g = torch.Generator().manual_seed(seed)
    bulk = torch.rand(n - 10, generator=g, dtype=torch.float64) * 5 - 1
    top = torch.tensor([100.0, 60.0, 35.0, 20.0, 12.0], dtype=torch.float64)
    bottom = torch.tensor([-30.0, -18.0, -11.0, -7.0, -4.5], dtype=torch.float64)
    return torch.cat([top, bulk, bottom])


@pytest.mark.parametrize("block_size", [1, 4, 8])
@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_extreme_eigenpairs_match_dense_eigh(block_size, which):
    eigs = separated_spectrum()
    A = spectrum_matrix(eigs)
    exact, vecs = torch.linalg.eigh(A)  # ascending
    k = 4
    res = lanczos(A, k, block_size=block_size, tol=1e-10, which=which, max_iters=400 // block_size)
    if which == "largest":
        idx = [-1, -2, -3, -4]
    elif which == "smallest":
        idx = [3, 2, 1, 0]
    else:
        idx = [-1, -2, 1, 0]
    expected = exact[idx]
    rel = ((res.eigenvalues - expected).abs() / expected.abs()).max().item()
    assert rel <= 1e-8, f"relative eigenvalue error {rel:.2e}"
    overlap = (res.eigenvectors @ vecs[:, idx]).diagonal().abs()
    assert (1 - overlap).max() <= 1e-8
    assert res.all_converged
    assert torch.all(res.eigenvalues[:-1] >= res.eigenvalues[1:]), "eigenvalues must be sorted descending"
    # Orthonormal Ritz vectors (full reorthogonalisation).
    gram = res.eigenvectors @ res.eigenvectors.T
    assert (gram - torch.eye(k, dtype=torch.float64)).abs().max() <= 1e-12


def test_residuals_are_honest():
    A = spectrum_matrix(separated_spectrum(seed=1), seed=1)
    res = lanczos(A, 3, block_size=2, tol=1e-6)
    recomputed = torch.linalg.vector_norm(res.eigenvectors @ A - res.eigenvalues[:, None] * res.eigenvectors, dim=1)
    torch.testing.assert_close(res.residuals, recomputed, rtol=1e-6, atol=1e-12)
    assert torch.equal(res.converged, (res.residuals <= res.thresholds) & res.verified)
    assert res.verified
    # The free estimates track the recomputed residuals (both are |H y - theta y| in exact arithmetic, up to
    # the locked pairs' residuals, which the estimates carry as norms).
    assert (res.residual_estimates - res.residuals).abs().max() <= 1e-9 * res.scale
    torch.testing.assert_close(
        res.thresholds, torch.clamp(res.tol * res.eigenvalues.abs(), min=1e-3 * res.tol * res.scale)
    )
    # Stopping early leaves unconverged pairs, reported as such.
    early = lanczos(A, 3, block_size=1, tol=1e-12, max_iters=5, recompute_residuals=True)
    assert not early.all_converged and early.num_iterations == 5


def test_hessian_of_an_mlp_top_and_bottom():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(64, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g)
    op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    H = op.to_dense()
    exact = torch.linalg.eigvalsh(H)
    for which, expected in (("largest", exact.flip(0)[:5]), ("smallest", exact[:3].flip(0))):
        k = expected.numel()
        for b in (1, 4):
            res = lanczos(op, k, block_size=b, tol=1e-10, which=which, max_iters=op.n)
            # Compare eigenvalues separated from their neighbours by at least 1e-3 |H| (NOTE: [Lanczos
            # tolerances]); the Hessian of a small MLP has a crowded bulk near zero.
            sorted_all = exact.numpy()
            for theta, lam in zip(res.eigenvalues.numpy(), expected.numpy()):
                i = int(np.argmin(np.abs(sorted_all - lam)))
                gap = min(abs(sorted_all[j] - lam) for j in (i - 1, i + 1) if 0 <= j < len(sorted_all))
                tol_abs = 1e-8 * abs(lam) if gap >= 1e-3 * exact.abs().max() else 1e-8 * exact.abs().max()
                assert abs(theta - lam) <= tol_abs, f"{which} b={b}: {theta} vs {lam}"
            assert res.all_converged
            parts = res.eigenvector_params(0)
            assert [tuple(p.shape) for p in parts] == op.shapes


def test_same_seed_same_result_and_seed_matters():
    A = spectrum_matrix(separated_spectrum(seed=2), seed=2)
    a = lanczos(A, 3, block_size=4, tol=1e-8, seed=7)
    b = lanczos(A, 3, block_size=4, tol=1e-8, seed=7)
    c = lanczos(A, 3, block_size=4, tol=1e-8, seed=8)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.eigenvectors, b.eigenvectors)
    assert a.num_hvps == b.num_hvps and a.history[-1][:3] == b.history[-1][:3]
    assert not torch.equal(a.eigenvectors.abs(), c.eigenvectors.abs())
    torch.testing.assert_close(a.eigenvalues, c.eigenvalues, rtol=1e-10, atol=0)


def test_kernel_and_torch_orthogonalizers_agree():
    A = spectrum_matrix(separated_spectrum(seed=3), seed=3)
    k = lanczos(A, 4, block_size=4, tol=1e-10, orthogonalize="kernel")
    t = lanczos(A, 4, block_size=4, tol=1e-10, orthogonalize="torch")
    assert k.orthogonalizer == "kernel" and t.orthogonalizer == "torch"
    torch.testing.assert_close(k.eigenvalues, t.eigenvalues, rtol=1e-12, atol=0)


def test_float32_operator_converges_to_float32_accuracy():
    eigs = separated_spectrum(seed=4)
    A = spectrum_matrix(eigs, seed=4)
    res = lanczos(A.float(), 3, block_size=2, tol=1e-4)
    assert res.eigenvectors.dtype == torch.float32 and res.all_converged
    exact = torch.linalg.eigvalsh(A).flip(0)[:3]
    # float32: residual <= 1e-4 |H| and gap >= 15 give eigenvalue errors of ~1e-5 |H| at worst (rounding).
    assert ((res.eigenvalues - exact).abs() / exact.abs()).max() <= 1e-5


def test_callable_and_numpy_operators():
    A = spectrum_matrix(separated_spectrum(seed=5), seed=5)
    exact = torch.linalg.eigvalsh(A).flip(0)[:2]
    res = lanczos(lambda V: V @ A, 2, n=A.shape[0], tol=1e-10)
    torch.testing.assert_close(res.eigenvalues, exact, rtol=1e-10, atol=0)
    res = lanczos(A.numpy(), 2, tol=1e-10)
    torch.testing.assert_close(res.eigenvalues, exact, rtol=1e-10, atol=0)


def test_breakdown_and_rank_deficiency_are_deflated():
    # Identity: the first block spans an invariant subspace (beta = 0 at once).
    res = lanczos(3.0 * torch.eye(50, dtype=torch.float64), 6, block_size=4, tol=1e-10)
    torch.testing.assert_close(res.eigenvalues, torch.full((6,), 3.0, dtype=torch.float64))
    assert res.all_converged and res.deflations > 0
    # Rank 6 with a triple eigenvalue: a block of 4 resolves the multiplicity; the block becomes rank
    # deficient once the 6-dimensional range is exhausted.
    eigs = torch.zeros(200, dtype=torch.float64)
    eigs[:6] = torch.tensor([5.0, 2.0, 1.0, -1.0, -1.0, -1.0])
    A = spectrum_matrix(eigs, seed=6)
    res = lanczos(A, 4, block_size=4, tol=1e-10, which="smallest")
    torch.testing.assert_close(res.eigenvalues, torch.tensor([0.0, -1.0, -1.0, -1.0], dtype=torch.float64),
                               rtol=0, atol=1e-10)
    assert res.all_converged and res.deflations > 0
    # The whole space: n = 12, k = n.
    g = torch.Generator().manual_seed(0)
    M = torch.randn(12, 12, generator=g, dtype=torch.float64)
    A = M + M.T
    for b in (1, 5):
        res = lanczos(A, 12, block_size=b, tol=1e-12)
        torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(A).flip(0), rtol=0, atol=1e-12)


def test_timing_and_counters():
    A = spectrum_matrix(separated_spectrum(seed=6), seed=6)
    res = lanczos(A, 2, block_size=3, tol=1e-8)
    # Every product is in the history: the final residuals come from the stored products (NOTE: [stored
    # products]), no extra application.
    assert res.num_hvps == res.history[-1][1]
    applied = lanczos(A, 2, block_size=3, tol=1e-8, recompute_residuals="apply")
    assert applied.num_hvps == applied.history[-1][1] + 2  # ...or k more applications when asked for
    # Both are |H y - theta y| of the same Ritz vectors, up to rounding of the products (~eps |H|).
    torch.testing.assert_close(applied.residuals, res.residuals, rtol=0, atol=1e-12 * res.scale)
    assert res.verifications >= 1 and res.verified
    assert res.hvp_time > 0 and res.other_time > 0
    assert res.total_time == pytest.approx(res.hvp_time + res.other_time)
    assert len(res.history) == res.num_iterations


def test_bad_input_errors_name_the_argument():
    A = spectrum_matrix(torch.arange(1.0, 11.0))
    with pytest.raises(ValueError, match="k=11 exceeds"):
        lanczos(A, 11)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        lanczos(A, 2, block_size=0)
    with pytest.raises(ValueError, match="block_size=11 exceeds"):
        lanczos(A, 2, block_size=11)
    with pytest.raises(ValueError, match="k must be >= 1"):
        lanczos(A, 0)
    with pytest.raises(ValueError, match="which"):
        lanczos(A, 2, which="middle")
    with pytest.raises(ValueError, match="tol"):
        lanczos(A, 2, tol=0.0)
    with pytest.raises(ValueError, match="not symmetric"):
        lanczos(A + torch.triu(torch.ones(10, 10, dtype=torch.float64), 1), 2)
    with pytest.raises(ValueError, match="square"):
        lanczos(torch.zeros(3, 4), 1)
    with pytest.raises(ValueError, match="needs n="):
        lanczos(lambda V: V, 2)
    with pytest.raises(ValueError, match="orthogonalize"):
        lanczos(A, 2, orthogonalize="magic")
    with pytest.raises(TypeError, match="op must be"):
        lanczos("matrix", 2)
    with pytest.raises(ValueError, match="max_iters"):
        lanczos(A, 2, max_iters=0)
    with pytest.raises(ValueError, match="recompute_residuals"):
        lanczos(A, 2, recompute_residuals="twice")
    with pytest.raises(TypeError, match="adaptive_block"):
        lanczos(A, 2, adaptive_block="yes")
    with pytest.raises(ValueError, match="verify_steps must be >= 1"):
        lanczos(A, 2, verify_steps=0)


class _BlockSizes:
    """A matrix operator that records the number of vectors in each product."""

    def __init__(self, A):
        self.A, self.n, self.dtype, self.device, self.sizes = A, A.shape[0], A.dtype, A.device, []

    def matmat(self, V):
        self.sizes.append(V.shape[0])
        return V @ self.A


def test_adaptive_block_widens_only_for_missed_eigenvalues():
    # Separated spectrum: single vectors all the way (NOTE: [adaptive block]); a 4-fold top eigenvalue: the
    # verification finds the missed copies and the block widens to block_size; adaptive_block=False keeps
    # block_size for every product.
    sep = _BlockSizes(spectrum_matrix(separated_spectrum(seed=8), seed=8))
    res = lanczos(sep, 3, block_size=4, tol=1e-8)
    assert res.all_converged and set(sep.sizes) == {1}
    eigs = torch.cat([torch.full((4,), 10.0), torch.tensor([6.0, 5.0, 4.5]), torch.linspace(2.0, 0.0, 293)])
    deg = _BlockSizes(spectrum_matrix(eigs.double(), seed=3))
    res = lanczos(deg, 3, block_size=4, tol=1e-8)
    assert res.all_converged and res.verifications >= 2 and max(deg.sizes) > 1
    torch.testing.assert_close(res.eigenvalues, torch.full((3,), 10.0, dtype=torch.float64), rtol=1e-9, atol=0)
    fixed = _BlockSizes(spectrum_matrix(separated_spectrum(seed=8), seed=8))
    res = lanczos(fixed, 3, block_size=4, tol=1e-8, adaptive_block=False)
    main = fixed.sizes[: fixed.sizes.index(1)]  # the verification then runs single vectors
    assert res.all_converged and len(main) >= 2 and set(main) == {4}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    A = spectrum_matrix(separated_spectrum(seed=7), seed=7)
    cpu = lanczos(A, 3, block_size=4, tol=1e-10)
    gpu = lanczos(A.cuda(), 3, block_size=4, tol=1e-10)
    assert gpu.eigenvectors.is_cuda
    torch.testing.assert_close(gpu.eigenvalues, cpu.eigenvalues, rtol=1e-9, atol=0)
