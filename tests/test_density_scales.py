"""Stochastic Lanczos quadrature, Hutchinson's trace and scale detection vs exact spectra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance
from torch import nn

import mrgd_ext
from mrgd_ext.curvature.density import hutchinson_trace, spectral_density
from mrgd_ext.curvature.hessian import HessianOperator
from mrgd_ext.curvature.lanczos import lanczos
from mrgd_ext.curvature.scales import detect_scales
from mrgd_ext.planning.plan import ScaleGroup


def spectrum_matrix(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    return (U * torch.as_tensor(eigs, dtype=torch.float64)) @ U.T


def multiscale_eigs(groups, counts, seed=0):
    """Eigenvalues spread uniformly in log-space inside each (a, b) group."""
    g = np.random.default_rng(seed)
    out = [np.exp(g.uniform(np.log(a), np.log(b), size=c)) for (a, b), c in zip(groups, counts)]
    for (a, b), vals in zip(groups, out):  # pin both ends, so the true groups are exactly [a, b]
        vals[0], vals[-1] = a, b
    return np.concatenate(out)


def test_slq_matches_exact_eigenvalue_distribution():
    g = np.random.default_rng(0)
    eigs = np.concatenate([g.uniform(9, 11, 20), g.uniform(0.9, 1.1, 180), g.uniform(0.0, 0.3, 200)])
    A = spectrum_matrix(eigs)
    sd = spectral_density(A, num_probes=10, order=40, seed=0)
    nodes, weights = sd.quadrature()
    assert weights.sum() == pytest.approx(1.0)
    # NOTE: [SLQ tolerance] Gauss quadrature with 40 nodes per probe resolves each group; the remaining
    # Wasserstein-1 error is the probe noise, of order spread * sqrt(2 / (P n)) ~ 0.0035 * spread for
    # P = 10, n = 400 (each probe weighs the groups by a chi-square-like sum over their eigenvectors); over
    # seeds 0-3 it measures 0.2-0.7% of the spread. 1% of the spread is above that and still discriminating:
    # moving the middle group (45% of the mass) by 0.5 moves the exact distribution by W1 = 0.225 ~ 2% of
    # the spread, which the test must notice.
    spread = eigs.max() - eigs.min()
    w1 = wasserstein_distance(eigs, nodes, v_weights=weights)
    assert w1 <= 0.01 * spread
    shifted = eigs + np.where((eigs > 0.5) & (eigs < 2), 0.5, 0.0)
    assert wasserstein_distance(shifted, nodes, v_weights=weights) > 0.01 * spread
    # The smoothed density integrates to 1 and matches the exact smoothed density in L1.
    grid = np.linspace(-1, 12, 4000)
    dens = sd.smoothed(grid, 0.1)
    exact = np.exp(-0.5 * ((grid[:, None] - eigs[None]) / 0.1) ** 2).sum(1) / (len(eigs) * 0.1 * math.sqrt(2 * math.pi))
    dx = grid[1] - grid[0]
    assert dens.sum() * dx == pytest.approx(1.0, abs=1e-3)
    assert np.abs(dens - exact).sum() * dx <= 0.15  # L1 of two densities is at most 2
    assert sd.density.sum() * (sd.grid[1] - sd.grid[0]) == pytest.approx(1.0, abs=1e-3)
    assert sd.num_hvps == 400


def test_slq_is_deterministic_and_handles_breakdown():
    A = spectrum_matrix(np.linspace(1, 2, 60))
    a = spectral_density(A, num_probes=3, order=10, seed=4)
    b = spectral_density(A, num_probes=3, order=10, seed=4, probe_batch=1)
    again = spectral_density(A, num_probes=3, order=10, seed=4)
    np.testing.assert_array_equal(a.nodes, again.nodes)
    np.testing.assert_array_equal(a.density, again.density)
    # Probes run one at a time see the same probes (one generator stream); batched products round alike
    # to ~1e-15.
    np.testing.assert_allclose(a.nodes, b.nodes, rtol=1e-10)
    # 2 I: every probe's Krylov space is one-dimensional; one node at 2 with weight 1.
    sd = spectral_density(2.0 * torch.eye(30, dtype=torch.float64), num_probes=4, order=8, seed=0)
    assert (sd.lengths == 1).all()
    np.testing.assert_allclose(sd.nodes[:, 0], 2.0)
    np.testing.assert_allclose(sd.weights.sum(1), 1.0)
    # Three distinct eigenvalues: the quadrature is exact after three steps.
    sd = spectral_density(spectrum_matrix(np.repeat([1.0, 3.0, 7.0], 10)), num_probes=2, order=6, seed=0)
    assert (sd.lengths == 3).all()
    np.testing.assert_allclose(np.sort(sd.nodes[0, :3]), [1.0, 3.0, 7.0], atol=1e-10)


def test_hutchinson_trace_within_standard_errors():
    g = np.random.default_rng(1)
    eigs = g.uniform(0.5, 3.0, 200)
    A = spectrum_matrix(eigs, seed=1)
    est = hutchinson_trace(A, num_probes=64, seed=0)
    # The sample mean is within 4 standard errors except with probability ~6e-5 (CLT over 64 probes).
    assert abs(est.trace - eigs.sum()) <= 4 * est.stderr
    # The standard error matches its closed form sqrt(2 sum_{i != j} A_ij^2 / P) within sampling noise.
    off = (A**2).sum().item() - (torch.diagonal(A) ** 2).sum().item()
    assert est.stderr == pytest.approx(math.sqrt(2 * off / 64), rel=0.35)
    again = hutchinson_trace(A, num_probes=64, seed=0, batch_size=5)
    np.testing.assert_allclose(again.samples, est.samples, rtol=1e-12)


def test_hutchinson_on_a_hessian_operator():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    X, y = torch.randn(30, 3, dtype=torch.float64), torch.randint(0, 2, (30,))
    op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    exact = torch.trace(op.to_dense()).item()
    est = hutchinson_trace(op, num_probes=200, seed=0, batch_size=50)
    assert abs(est.trace - exact) <= 4 * est.stderr


def test_detect_scales_recovers_synthetic_groups():
    groups = [(50.0, 120.0), (0.8, 2.0), (0.004, 0.01)]
    eigs = multiscale_eigs(groups, [5, 40, 200])
    found = detect_scales(eigs)
    assert found == [ScaleGroup(a, b) for a, b in groups]
    # Descending, tensor input, shuffled order: same answer.
    perm = np.random.default_rng(3).permutation(len(eigs))
    assert detect_scales(torch.from_numpy(eigs[perm])) == found
    # max_groups=2 splits only at the widest gap (0.8 / 0.01 = 80 beats 50 / 2 = 25).
    assert detect_scales(eigs, max_groups=2) == [ScaleGroup(0.8, 120.0), ScaleGroup(0.004, 0.01)]
    # A min_gap wider than every gap leaves one group; 30 still splits at the 80x gap only.
    assert detect_scales(eigs, min_gap=1000.0) == [ScaleGroup(0.004, 120.0)]
    assert detect_scales(eigs, min_gap=30.0) == [ScaleGroup(0.8, 120.0), ScaleGroup(0.004, 0.01)]
    # Non-positive and sub-floor eigenvalues are ignored.
    assert detect_scales(np.concatenate([eigs, [-3.0, 0.0, 1e-14]])) == found
    # The result plans directly.
    plan = mrgd_ext.plan_multirate(found)
    assert plan.num_groups >= 1


def test_detect_scales_from_lanczos_and_density():
    groups = [(40.0, 80.0), (1.0, 2.0), (0.01, 0.02)]
    eigs = multiscale_eigs(groups, [3, 30, 200], seed=2)
    A = spectrum_matrix(eigs, seed=2)
    res = lanczos(A, 6, block_size=3, tol=1e-10)
    top = detect_scales(res)  # the top 6: three in the first group, three in the second
    # Converged to tol 1e-10 |H|: the Ritz values equal the eigenvalues to ~1e-12 relative.
    assert len(top) == 2
    assert top[0].a == pytest.approx(40.0, rel=1e-12) and top[0].b == pytest.approx(80.0, rel=1e-12)
    assert 1.0 <= top[1].a and top[1].b == pytest.approx(2.0, rel=1e-12)
    sd = spectral_density(A, num_probes=8, order=30, seed=0)
    found = detect_scales(sd)
    # Quadrature nodes lie inside each group's hull up to the quadrature's resolution: every true group is
    # matched by one detected group whose ends are within 20% (a node at the edge carries little weight).
    assert len(found) == 3
    for (a, b), g in zip(groups, found):
        assert g.a >= a * 0.8 and g.b <= b * 1.2 and g.b >= a and g.a <= b


def test_bad_input_errors_name_the_argument():
    A = spectrum_matrix(np.linspace(1, 2, 10))
    with pytest.raises(ValueError, match="order=11 exceeds"):
        spectral_density(A, num_probes=2, order=11)
    with pytest.raises(ValueError, match="num_probes must be >= 1"):
        spectral_density(A, num_probes=0, order=3)
    with pytest.raises(ValueError, match="sigma"):
        spectral_density(A, num_probes=1, order=3, sigma=-1.0)
    with pytest.raises(ValueError, match="num_probes must be >= 2"):
        hutchinson_trace(A, num_probes=1)
    with pytest.raises(ValueError, match="min_gap"):
        detect_scales([1.0, 2.0], min_gap=1.0)
    with pytest.raises(ValueError, match="no positive"):
        detect_scales([-1.0, 0.0])
    with pytest.raises(ValueError, match="max_groups"):
        detect_scales([1.0, 2.0], max_groups=0)
    with pytest.raises(TypeError, match="eigenvalues_or_density"):
        detect_scales(object())
