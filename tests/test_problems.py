"""Tests for the quadratic test problems and the classical iteration counters (mrgd_ext.experiments.problems)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mrgd_ext.experiments.problems import (
    heavy_ball_params,
    nesterov_params,
    quadratic_from_groups,
    random_multiscale_quadratic,
    run_cg,
    run_gd,
    run_heavy_ball,
    run_nesterov,
    run_rate_cycle,
    worst_case_iterations_from_eigenvalues,
)
from mrgd_ext.planning import ScaleGroup


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Thousands of tiny matrix products: one thread is faster and immune to competing processes.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------------
# Problem generators
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_scales, ratio", [(2, 1e-3), (3, 0.1)])
def test_random_multiscale_quadratic_structure(num_scales, ratio):
    p = random_multiscale_quadratic(dim=100, num_scales=num_scales, ratio=ratio, seed=7)
    assert p.H.dtype == torch.float64 and p.H.shape == (100, 100) and p.dim == 100
    assert torch.equal(p.H, p.H.T)
    # Exact groups = the blocks of the sorted spectrum (dense eigvalsh as the reference).
    ref = np.sort(np.linalg.eigvalsh(p.H.numpy()))[::-1]
    dims = p.info["dims"]
    assert sum(dims) == 100 and len(p.groups) == num_scales
    start = 0
    for g, dk in zip(p.groups, dims):
        block = ref[start : start + dk]
        # eigh vs eigvalsh on the same matrix: agree to ~1e-15 * lambda_max.
        assert g.a == pytest.approx(block.min(), rel=1e-9) and g.b == pytest.approx(block.max(), rel=1e-9)
        start += dk
    # Groups sit near ratio**k: each is a Marchenko-Pastur bulk with edges (1 +- sqrt(d_k/N))^2 ~ 0.6..1.5
    # around its scale, so the center is within a factor 2 of ratio**k.
    for k, g in enumerate(p.groups):
        assert 0.5 < g.center / ratio**k < 2.0
    # x* solves H x = b to float64 accuracy (relative residual, condition up to ~3e3 here).
    resid = torch.linalg.vector_norm(p.H @ p.x_star - p.b) / torch.linalg.vector_norm(p.b)
    assert resid < 1e-12


def test_random_multiscale_quadratic_is_least_squares():
    """H and b are X^T X / N and X^T y / N for the documented data model (rebuilt here independently)."""
    p = random_multiscale_quadratic(dim=6, num_scales=2, ratio=0.01, seed=3, n_samples=50, noise=0.5)
    gen = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    Z = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    scales = torch.tensor([1.0] * 3 + [0.1] * 3, dtype=torch.float64)  # data ratio sqrt(0.01)
    X = (Z * scales) @ U.T
    w = torch.randn(6, generator=gen, dtype=torch.float64)
    y = X @ w + 0.5 * torch.randn(50, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(p.H, X.T @ X / 50, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(p.b, X.T @ y / 50, rtol=1e-13, atol=1e-15)
    # The quadratic equals the least-squares loss up to the constant |y|^2 / (2N).
    x = torch.randn(6, dtype=torch.float64)
    ls = 0.5 * torch.mean((X @ x - y) ** 2)
    torch.testing.assert_close(p.loss(x) + 0.5 * torch.mean(y**2), ls, rtol=1e-12, atol=1e-12)


def test_ratio_is_data_squares_the_ratio():
    ph = random_multiscale_quadratic(100, 3, 0.01, seed=1, ratio_is="hessian")
    pd = random_multiscale_quadratic(100, 3, 0.1, seed=1, ratio_is="data")
    # Same generator stream and the same data scales (0.1 per step) -> identical matrices.
    torch.testing.assert_close(ph.H, pd.H, rtol=0, atol=0)
    assert pd.info["hessian_ratio"] == pytest.approx(0.01) and pd.info["data_ratio"] == pytest.approx(0.1)


def test_seeds_are_reproducible_and_distinct():
    a = random_multiscale_quadratic(20, 2, 0.01, seed=5)
    b = random_multiscale_quadratic(20, 2, 0.01, seed=5)
    c = random_multiscale_quadratic(20, 2, 0.01, seed=6)
    assert torch.equal(a.H, b.H) and not torch.equal(a.H, c.H)


def test_loss_and_grad_agree_with_autograd():
    p = random_multiscale_quadratic(30, 2, 0.01, seed=2)
    x = torch.randn(30, dtype=torch.float64, requires_grad=True)
    p.loss(x).backward()
    torch.testing.assert_close(x.grad, p.grad(x.detach()), rtol=1e-12, atol=1e-12)
    assert p.loss(p.x_star) < p.loss(p.x_star + 1e-3 * torch.randn(30, dtype=torch.float64))


def test_quadratic_from_groups_spectrum():
    groups = [ScaleGroup(1.0, 4.0), ScaleGroup(1e-3, 2e-3)]
    p = quadratic_from_groups(groups, per_group=10, seed=0)
    ref = np.sort(np.linalg.eigvalsh(p.H.numpy()))[::-1]
    assert ref[0] == pytest.approx(4.0, rel=1e-12) and ref[9] == pytest.approx(1.0, rel=1e-12)
    assert ref[10] == pytest.approx(2e-3, rel=1e-9) and ref[-1] == pytest.approx(1e-3, rel=1e-9)
    assert p.groups == tuple(groups)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=0), "dim"),
        (dict(num_scales=0), "num_scales"),
        (dict(ratio=2.0), "ratio"),
        (dict(ratio_is="eigen"), "ratio_is"),
        (dict(n_samples=10), "n_samples"),
        (dict(dims=[10, 10]), "dims"),
        (dict(ratio=0.9, num_scales=2), "overlap"),  # scales too close to separate
    ],
)
def test_generator_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        random_multiscale_quadratic(**{"dim": 100, "num_scales": 2, "ratio": 1e-3, **kwargs})


# --------------------------------------------------------------------------------------------------------
# Iteration counters
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_group():
    return quadratic_from_groups([ScaleGroup(0.1, 1.0)], per_group=30, seed=1)


def test_gd_worst_case_is_the_closed_form(one_group):
    p, kappa = one_group, 10.0
    rho = (kappa - 1) / (kappa + 1)
    res = run_gd(p, 2.0 / 1.1, tol=1e-6, x0="worst")
    # Worst start = the extreme eigenvectors, contracted by exactly rho per step.
    assert res.iterations == math.ceil(math.log(1e-6) / math.log(rho))
    assert res.converged and res.relative_error <= 1e-6 and res.params["lr"] == 2.0 / 1.1


def test_gd_reports_the_cap(one_group):
    res = run_gd(one_group, 0.01, tol=1e-6, max_iter=50)
    assert res.iterations is None and not res.converged and res.relative_error > 1e-6
    assert "capped" in str(res)
    diverged = run_gd(one_group, 5.0, tol=1e-6, max_iter=50)  # lr > 2/lambda_max
    assert not diverged.converged and diverged.relative_error > 1.0


def test_rate_cycle_matches_eigenvalue_products(one_group):
    cycle = [1.0 / 0.9, 1.0 / 0.2, 1.0 / 0.55]
    res = run_rate_cycle(one_group, cycle, tol=1e-8, x0="worst")
    direct = worst_case_iterations_from_eigenvalues(one_group.eigenvalues.numpy(), cycle, 1e-8)
    assert res.iterations == direct


def test_several_starts_report_the_worst(one_group):
    p = one_group
    v_fast, v_slow = p.eigenvectors[:, 0], p.eigenvectors[:, -1]  # lambda = 1 and 0.1
    lr = 1.0  # contracts lambda=1 exactly, lambda=0.1 by 0.9 per step
    both = torch.stack([p.x_star + v_fast, p.x_star + v_slow], dim=1)
    assert run_gd(p, lr, x0=both).iterations == run_gd(p, lr, x0=p.x_star + v_slow).iterations
    assert run_gd(p, lr, x0=p.x_star + v_fast).iterations == 1


def test_heavy_ball_and_nesterov_parameters():
    mu, L = 0.01, 1.0
    kappa = L / mu
    a, b = heavy_ball_params(mu, L)
    assert a == pytest.approx(4 / (1 + 0.1) ** 2) and b == pytest.approx((0.9 / 1.1) ** 2)

    def spectral_radius(step, mom, nesterov):
        worst = 0.0
        for lam in np.linspace(mu, L, 801):
            c = 1.0 - step * lam
            if nesterov:  # y = x + mom (x - x_prev); x+ = y - step lam y
                M = np.array([[(1 + mom) * c, -mom * c], [1.0, 0.0]])
            else:  # x+ = x - step lam x + mom (x - x_prev)
                M = np.array([[1 + mom - step * lam, -mom], [1.0, 0.0]])
            worst = max(worst, max(abs(np.linalg.eigvals(M))))
        return worst

    # Heavy ball: rate (sqrt(kappa)-1)/(sqrt(kappa)+1) (eigenvalue-grid evaluation, 1e-6 slack).
    assert spectral_radius(a, b, False) == pytest.approx((math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1), abs=1e-6)
    step, mom = nesterov_params(mu, L)
    q = math.sqrt(3 * kappa + 1)
    assert spectral_radius(step, mom, True) == pytest.approx(1 - 2 / q, abs=1e-6)
    # ...and it beats the textbook tuning 1/L, (sqrt(kappa)-1)/(sqrt(kappa)+1).
    textbook = spectral_radius(1 / L, (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1), True)
    assert 1 - 2 / q < textbook - 1e-3
    with pytest.raises(ValueError, match="lam_min"):
        heavy_ball_params(0.0, 1.0)
    with pytest.raises(ValueError, match="lam_min"):
        nesterov_params(2.0, 1.0)


def test_momentum_methods_converge_at_their_rates():
    p = random_multiscale_quadratic(100, 2, 1e-2, seed=0)
    kappa = p.condition
    hb = run_heavy_ball(p, p.lambda_min, p.lambda_max)
    ne = run_nesterov(p, p.lambda_min, p.lambda_max)
    gd = run_gd(p, 2 / (p.lambda_min + p.lambda_max))
    # Asymptotic counts ln(1e-6)/ln(rate); the double root of the optimal 2x2 iteration adds a factor k
    # (error ~ k rho^k), so allow up to 1.6x above the plain estimate, never below 0.5x (x0 = 0 has only part
    # of its error on the slowest directions).
    est_hb = math.log(1e-6) / math.log((math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1))
    est_ne = math.log(1e-6) / math.log(1 - 2 / math.sqrt(3 * kappa + 1))
    assert 0.5 * est_hb < hb.iterations < 1.6 * est_hb
    assert 0.5 * est_ne < ne.iterations < 1.6 * est_ne
    assert hb.iterations < ne.iterations < gd.iterations


def test_cg_finishes_in_as_many_steps_as_distinct_eigenvalues():
    # 5 distinct eigenvalues (point groups, 8 copies each): exact-arithmetic CG terminates in 5 steps;
    # in float64 at tol 1e-6 it does too (one extra step allowed for rounding).
    groups = [ScaleGroup(c, c) for c in (10.0, 3.0, 1.0, 0.2, 0.01)]
    p = quadratic_from_groups(groups, per_group=8, seed=4)
    res = run_cg(p, tol=1e-6)
    assert res.converged and res.iterations <= 6
    worst = run_cg(p, tol=1e-6, x0="worst")
    assert worst.converged and worst.iterations <= 2  # each start is one eigenvector: one CG step


def test_cg_beats_chebyshev_bound():
    p = random_multiscale_quadratic(100, 2, 1e-3, seed=0)
    kappa = p.condition
    res = run_cg(p)
    # Classical bound 2 ((sqrt k - 1)/(sqrt k + 1))^k in the energy norm; the error norm adds sqrt(kappa).
    bound = math.log(1e-6 / (2 * math.sqrt(kappa))) / math.log((math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1))
    assert res.converged and res.iterations < bound


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: run_gd(p, 0.1, tol=0.0), "tol"),
        (lambda p: run_gd(p, 0.1, max_iter=-1), "max_iter"),
        (lambda p: run_gd(p, 0.1, x0="random"), "x0"),
        (lambda p: run_gd(p, 0.1, x0=torch.zeros(3)), "shape"),
        (lambda p: run_gd(p, 0.1, x0=p.x_star), "x0 equals x_star"),
        (lambda p: run_rate_cycle(p, []), "cycle"),
        (lambda p: run_rate_cycle(p, [0.1, -1.0]), "cycle"),
        (lambda p: run_heavy_ball(p, 0.0, 1.0), "lam_min"),
    ],
)
def test_counters_reject(one_group, call, match):
    with pytest.raises(ValueError, match=match):
        call(one_group)


def test_subspace_form_runs_at_the_slowest_group_rate():
    from mrgd_ext.experiments.problems import run_subspace_rates

    groups = [ScaleGroup(0.5, 1.5), ScaleGroup(1e-4, 4e-4)]
    p = quadratic_from_groups(groups, per_group=10, seed=2)
    rates = [2 / (g.a + g.b) for g in groups]
    rho = max((g.condition - 1) / (g.condition + 1) for g in groups)  # 0.6 (group 1, kappa 4)
    res = run_subspace_rates(p, rates, x0="worst")
    # Each eigendirection contracts by |1 - eta_k lambda| per step; group ends are eigenvalues: exact.
    assert res.iterations == math.ceil(math.log(1e-6) / math.log(rho))
    with pytest.raises(ValueError, match="one rate per group"):
        run_subspace_rates(p, rates[:1])
