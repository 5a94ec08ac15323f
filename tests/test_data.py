"""Tests for the multiscale data generators and the offline real data sets (mrgd_ext.experiments.data)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mrgd_ext.curvature.scales import detect_scales
from mrgd_ext.experiments.data import (
    MultiscaleData,
    load_breast_cancer,
    load_digits,
    load_wine,
    multiscale_classification,
    multiscale_inputs,
    multiscale_regression,
    principal_values,
)

# --------------------------------------------------------------------------------------------------------
# Generators


def test_multiscale_inputs_shapes_dtypes_and_structure():
    d = multiscale_inputs(50, [3, 2, 1], [1.0, 0.1, 0.01], seed=3)
    assert isinstance(d, MultiscaleData)
    assert d.x.shape == (50, 6) and d.x.dtype == torch.float32
    assert d.latent.shape == (50, 6) and d.latent.dtype == torch.float64
    assert d.rotation.shape == (6, 6) and d.rotation.dtype == torch.float64
    assert d.dims == (3, 2, 1) and d.scales == (1.0, 0.1, 0.01) and d.seed == 3
    assert d.num_samples == 50 and d.dim == 6
    assert d.hessian_scales == pytest.approx((1.0, 1e-2, 1e-4), rel=1e-15)
    expected = torch.tensor([1.0, 1.0, 1.0, 0.1, 0.1, 0.01], dtype=torch.float64)
    assert torch.equal(d.coordinate_scales, expected)
    assert torch.equal(d.expected_principal_values(), expected)
    assert torch.equal(d.expected_hessian_eigenvalues(), expected**2)
    # x is the float64 construction rounded once to float32 (relative error <= 2**-24 per entry, up to the
    # float64 product's own ~1e-16).
    exact = (d.latent * d.coordinate_scales) @ d.rotation.T
    assert torch.allclose(d.x.double(), exact, rtol=2.0**-24, atol=1e-15)
    d64 = multiscale_inputs(50, [3, 2, 1], [1.0, 0.1, 0.01], seed=3, dtype=torch.float64)
    assert d64.x.dtype == torch.float64 and torch.equal(d64.x, exact)


def test_generators_are_reproducible_and_seeded():
    a = multiscale_inputs(40, (4, 4), (1.0, 0.01), seed=5)
    b = multiscale_inputs(40, (4, 4), (1.0, 0.01), seed=5)
    c = multiscale_inputs(40, (4, 4), (1.0, 0.01), seed=6)
    assert torch.equal(a.x, b.x) and torch.equal(a.rotation, b.rotation)
    assert not torch.equal(a.x, c.x)
    torch.manual_seed(123)  # the global RNG plays no part
    x1, y1, _ = multiscale_regression(40, (4, 4), (1.0, 0.01), noise=0.1, seed=5)
    torch.manual_seed(999)
    x2, y2, _ = multiscale_regression(40, (4, 4), (1.0, 0.01), noise=0.1, seed=5)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x1, y1, _ = multiscale_classification(40, (4, 4), (1.0, 0.01), 3, seed=5)
    x2, y2, _ = multiscale_classification(40, (4, 4), (1.0, 0.01), 3, seed=5)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_rotation_is_orthogonal_and_identity_without_rotation():
    d = multiscale_inputs(10, (20, 20, 10), (1.0, 0.1, 0.01), seed=1, dtype=torch.float64)
    eye = torch.eye(50, dtype=torch.float64)
    # QR in float64: U^T U = I to a few units of roundoff times sqrt(d) (~1e-15); 1e-12 leaves room.
    assert float((d.rotation.T @ d.rotation - eye).abs().max()) < 1e-12
    assert float((d.rotation @ d.rotation.T - eye).abs().max()) < 1e-12
    plain = multiscale_inputs(10, (2, 3), (1.0, 0.1), rotate=False, seed=1, dtype=torch.float64)
    assert torch.equal(plain.rotation, torch.eye(5, dtype=torch.float64))
    assert torch.equal(plain.x, plain.latent * plain.coordinate_scales)  # exact: U = I adds no rounding


def test_empirical_principal_values_match_the_prescribed_scales():
    dims, scales = (10, 10, 10), (1.0, 0.1, 0.01)
    d = multiscale_inputs(20_000, dims, scales, seed=0, dtype=torch.float64)
    pv = principal_values(d.x)
    assert pv.dtype == torch.float64 and pv.shape == (30,)
    assert torch.all(pv[:-1] >= pv[1:])
    # Block k alone has a sample covariance whose eigenvalues fill a Marchenko-Pastur bulk
    # e_k^2 (1 +- sqrt(d_k/N))^2, i.e. principal values e_k (1 +- 0.022) for d_k/N = 5e-4, plus O(1/sqrt(N))
    # fluctuations of the edges; the coupling between blocks moves the smaller block's values only at second
    # order ((e_j e_k / sqrt(N))^2 / e_j^2 relative). Sorted, the values therefore come in groups of 10 within a
    # few percent of e_k (measured: 2.0% at most); 6% is three times that and still far from the next scale.
    ratio = pv / d.expected_principal_values()
    assert float((ratio - 1).abs().max()) < 0.06
    for k, e in enumerate(scales):
        block = pv[10 * k : 10 * (k + 1)]
        assert float(block.min()) > 0.94 * e and float(block.max()) < 1.06 * e


@pytest.mark.parametrize("scales", [(1.0, 0.1, 0.01), (1.0, 0.1), (1.0, 0.05, 0.002, 1e-4)])
def test_least_squares_hessian_eigenvalues_form_one_group_per_scale(scales):
    m = len(scales)
    d = multiscale_inputs(5_000, (6,) * m, scales, seed=2, dtype=torch.float64)
    H = d.x.T @ d.x / d.num_samples
    eig = torch.linalg.eigvalsh(H).flip(0)
    # Data-scale ratios >= 10 are Hessian ratios >= 100; each group is a Marchenko-Pastur bulk of relative
    # width (1 +- sqrt(6/5000))^2 = 1 -+ 0.07, so neighbouring groups are >= ~85x apart: the default gap
    # of 10x (one decade) separates them and nothing inside a bulk does.
    groups = detect_scales(eig, min_gap=10.0)
    assert len(groups) == m
    for g, e, h in zip(groups, d.scales, d.hessian_scales):
        # Group k sits at the Hessian scale h = e_k^2 (not at e_k): a bulk around it with edges at
        # (1 +- 0.035)^2 ~ 0.93 and 1.07 times h plus sampling fluctuations; 20% is ample and still excludes
        # every neighbouring scale (>= 100x away).
        assert h == pytest.approx(e * e, rel=1e-15)
        assert 0.8 * h < g.a <= g.b < 1.2 * h


def test_regression_targets_and_hessian_scales():
    x, y, info = multiscale_regression(200, (3, 3), (1.0, 0.1), seed=4, dtype=torch.float64)
    assert x.shape == (200, 6) and y.shape == (200,) and y.dtype == torch.float64
    assert info["scales"] == (1.0, 0.1) and info["hessian_scales"] == pytest.approx((1.0, 0.01))
    assert isinstance(info["data"], MultiscaleData) and torch.equal(info["data"].x, x)
    # noise = 0: exact linear targets (one float64 product).
    assert torch.allclose(y, x @ info["w_star"], rtol=0, atol=1e-12)
    xn, yn, info_n = multiscale_regression(200, (3, 3), (1.0, 0.1), noise=0.5, seed=4, dtype=torch.float64)
    assert torch.equal(xn, x)  # the noise does not change the inputs
    resid = yn - xn @ info_n["w_star"]
    # 200 draws of N(0, 0.25): the sample standard deviation is within ~5% of 0.5 (four sigma of its spread)
    assert 0.4 < float(resid.std()) < 0.6
    x32, y32, _ = multiscale_regression(20, (2,), (1.0,))
    assert x32.dtype == torch.float32 and y32.dtype == torch.float32


def test_classification_labels_depend_on_every_scale():
    x, y, info = multiscale_classification(2000, (4, 4, 4), (1.0, 1e-2, 1e-4), 5, seed=0)
    assert x.shape == (2000, 12) and y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) < 5
    assert sum(info["class_counts"]) == 2000 and info["num_classes"] == 5
    assert info["hessian_scales"] == pytest.approx((1.0, 1e-4, 1e-8))
    z, A, b = info["data"].latent, info["teacher"], info["teacher_bias"]
    assert torch.equal(torch.argmax(z @ A + b, 1), y)
    # The teacher reads the unscaled blocks, so each block moves the logits as much as the others: ignoring
    # any one block (the smallest-scale one included) changes a sizeable share of the labels (measured 17%,
    # 45%, 37%; a teacher on x itself would change ~0% for the 1e-4 block).
    for k in range(3):
        zz = z.clone()
        zz[:, 4 * k : 4 * k + 4] = 0
        changed = float((torch.argmax(zz @ A + b, 1) != y).double().mean())
        assert changed > 0.1, (k, changed)


# --------------------------------------------------------------------------------------------------------
# Real data


def test_breast_cancer_raw_features_are_multiscale():
    pytest.importorskip("sklearn")
    x, y = load_breast_cancer()
    assert x.shape == (569, 30) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == {0, 1}
    pv = principal_values(x)
    # Raw features from ~1e-3 to ~1e3: principal values span ~5.9 decades (measured 8e5); ask for 4.
    assert float(pv[0] / pv[-1]) >= 1e4
    # Standardized, only the correlations between features remain (measured ratio 316, 2500x less).
    pv_std = principal_values(load_breast_cancer(standardize=True)[0])
    assert float(pv_std[0] / pv_std[-1]) < float(pv[0] / pv[-1]) / 100


@pytest.mark.parametrize("loader, shape, classes", [(load_digits, (1797, 64), 10), (load_wine, (178, 13), 3),
                                                    (load_breast_cancer, (569, 30), 2)])
def test_loaders_shapes_standardize_and_subsets(loader, shape, classes):
    pytest.importorskip("sklearn")
    x, y = loader(dtype=torch.float64)
    assert x.shape == shape and y.shape == (shape[0],) and x.dtype == torch.float64 and y.dtype == torch.int64
    assert sorted(set(y.tolist())) == list(range(classes))
    xs, ys = loader(standardize=True, dtype=torch.float64)
    assert torch.equal(ys, y)
    var = xs.var(0, correction=0)
    constant = x.std(0, correction=0) == 0  # digits' border pixels
    # Population statistics of the returned rows: unit variance and zero mean up to float64 rounding.
    assert torch.allclose(var[~constant], torch.ones_like(var[~constant]), rtol=0, atol=1e-12)
    assert float(xs.mean(0).abs().max()) < 1e-12
    assert torch.all(xs[:, constant] == 0)
    # First N rows, or a seeded subset (reproducible, standardized on the subset itself).
    xf, yf = loader(num_samples=20)
    assert torch.equal(xf, x[:20].float()) and torch.equal(yf, y[:20])
    xr1, yr1 = loader(num_samples=20, seed=1, standardize=True)
    xr2, yr2 = loader(num_samples=20, seed=1, standardize=True)
    assert torch.equal(xr1, xr2) and torch.equal(yr1, yr2) and xr1.dtype == torch.float32
    assert not torch.equal(loader(num_samples=20, seed=1)[0], xf)
    nonconstant = xr1.double().std(0, correction=0) > 0
    # float32 storage of unit-variance values: variance exact to ~1e-6 relative.
    assert torch.allclose(xr1.double().var(0, correction=0)[nonconstant], torch.ones(int(nonconstant.sum()),
                          dtype=torch.float64), rtol=0, atol=1e-5)


def test_principal_values_against_numpy():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 7, generator=gen) * torch.logspace(0, -3, 7) + 5.0
    ref_c = np.linalg.svd(x.double().numpy() - x.double().numpy().mean(0), compute_uv=False) / math.sqrt(30)
    ref_raw = np.linalg.svd(x.double().numpy(), compute_uv=False) / math.sqrt(30)
    pv, raw = principal_values(x), principal_values(x, center=False)
    assert pv.dtype == torch.float64 and raw.shape == (7,)
    np.testing.assert_allclose(pv.numpy(), ref_c, rtol=1e-12)
    np.testing.assert_allclose(raw.numpy(), ref_raw, rtol=1e-12)
    assert principal_values(x[:3]).shape == (3,)  # min(N, d) values


# --------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "call, exc, needle",
    [
        (lambda: multiscale_inputs(0, (2,), (1.0,)), ValueError, "num_samples"),
        (lambda: multiscale_inputs(True, (2,), (1.0,)), ValueError, "num_samples"),
        (lambda: multiscale_inputs(10, (), ()), ValueError, "dims"),
        (lambda: multiscale_inputs(10, (2, 0), (1.0, 0.1)), ValueError, "dims[1]"),
        (lambda: multiscale_inputs(10, 3, (1.0,)), ValueError, "dims"),
        (lambda: multiscale_inputs(10, (2, 2), (1.0,)), ValueError, "scales must have one data scale per block"),
        (lambda: multiscale_inputs(10, (2, 2), (1.0, 0.0)), ValueError, "scales[1]"),
        (lambda: multiscale_inputs(10, (2, 2), (1.0, -0.1)), ValueError, "scales[1]"),
        (lambda: multiscale_inputs(10, (2, 2), (float("nan"), 0.1)), ValueError, "scales[0]"),
        (lambda: multiscale_inputs(10, (2, 2), (0.1, 1.0)), ValueError, "strictly descending"),
        (lambda: multiscale_inputs(10, (2, 2), (0.1, 0.1)), ValueError, "strictly descending"),
        (lambda: multiscale_inputs(10, (2, 2), ("a", 0.1)), ValueError, "scales"),
        (lambda: multiscale_inputs(10, (2,), (1.0,), dtype=torch.int64), TypeError, "dtype"),
        (lambda: multiscale_regression(10, (2,), (1.0,), noise=-1.0), ValueError, "noise"),
        (lambda: multiscale_regression(0, (2,), (1.0,)), ValueError, "num_samples"),
        (lambda: multiscale_classification(10, (2,), (1.0,), 1), ValueError, "num_classes"),
        (lambda: multiscale_classification(10, (2, 2), (1.0, 2.0)), ValueError, "strictly descending"),
        (lambda: principal_values(torch.ones(5)), ValueError, "x must be"),
        (lambda: principal_values(torch.ones(0, 3)), ValueError, "x must be"),
        (lambda: principal_values([[1.0]]), TypeError, "x must be a tensor"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, exc, needle):
    with pytest.raises(exc, match=None) as info:
        call()
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": 10_000}, "num_samples must be at most 178"),
        ({"seed": 1}, "needs num_samples"),
        ({"dtype": torch.int32}, "dtype"),
    ],
)
def test_loader_bad_input(kwargs, needle):
    pytest.importorskip("sklearn")
    with pytest.raises((ValueError, TypeError)) as info:
        load_wine(**kwargs)
    assert needle in str(info.value)
