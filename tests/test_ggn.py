"""GGNOperator: generalized Gauss-Newton products vs a dense J^T H_L J, the Hessian, curvlinops, and its use
by lanczos, spectral_density and AutoMrGD.

Tolerances: in float64 the operator (jvp / output-space vjp / vjp, vmapped, batches summed separately) and the
dense reference (full Jacobian and output-space Hessian from torch.autograd.functional, one product) compute
the same sums in different orders, so they agree to rounding: a few hundred ulps of the largest entry
(rtol 1e-10, atol 1e-12 * |G|_max).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mrgd_ext
from mrgd_ext import AutoMrGD, GGNOperator, HessianOperator, lanczos, spectral_density
from mrgd_ext.curvature import CurvatureOperator


def mlp(seed=0, out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, out)).double()


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).double()


def regression_data(n=20, out=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(n, out, generator=g, dtype=torch.float64)


def class_data(n=20, seed=1, shape=(5,)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def dense_ggn(model, loss_fn, X, y):
    """Reference: J^T H_L J of the mean loss over (X, y), dense [n, n], from the full Jacobian of the outputs
    and the full Hessian of the loss in output space."""
    names = [k for k, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    shapes = [params[k].shape for k in names]
    numels = [params[k].numel() for k in names]
    flat0 = torch.cat([params[k].detach().reshape(-1) for k in names])

    def outputs(flat):
        parts = {k: t.reshape(s) for k, t, s in zip(names, flat.split(numels), shapes)}
        return torch.func.functional_call(model, parts, (X,))

    out0 = outputs(flat0).detach()
    J = torch.autograd.functional.jacobian(outputs, flat0).reshape(out0.numel(), -1)
    H = torch.autograd.functional.hessian(lambda o: loss_fn(o.reshape(out0.shape), y), out0.reshape(-1))
    return J.T @ H @ J


def assert_close_scaled(G, Gref):
    torch.testing.assert_close(G, Gref, rtol=1e-10, atol=1e-12 * Gref.abs().max().item())


@pytest.mark.parametrize("kind", ["mse", "cross_entropy"])
def test_ggn_matches_dense_jacobian_product(kind):
    model = mlp()
    X, y = regression_data() if kind == "mse" else class_data()
    loss_fn = F.mse_loss if kind == "mse" else nn.CrossEntropyLoss()
    # Unequal batches: the |B|/N weights make the operator the GGN of the mean over all samples.
    batches = [(X[:4], y[:4]), (X[4:13], y[4:13]), (X[13:], y[13:])]
    op = GGNOperator(model, loss_fn, batches)
    Gref = dense_ggn(model, loss_fn, X, y)
    assert isinstance(op, CurvatureOperator) and op.n == Gref.shape[0] and op.dtype == torch.float64
    assert_close_scaled(op.to_dense(block_size=5), Gref)
    g = torch.Generator().manual_seed(2)
    V = torch.randn(4, op.n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), V @ Gref, rtol=1e-10, atol=1e-12 * Gref.abs().max().item())
    torch.testing.assert_close(op @ V[0], Gref @ V[0], rtol=1e-10, atol=1e-12 * Gref.abs().max().item())
    # Positive semi-definite (MSE and cross-entropy are convex in the outputs): the smallest eigenvalue is
    # zero up to rounding, n * eps * |G| = O(1e-13) relative; the Hessian of the same MLP is indefinite.
    evals = torch.linalg.eigvalsh(op.to_dense())
    assert evals.min() >= -1e-12 * evals.max()
    hess = torch.linalg.eigvalsh(HessianOperator(model, loss_fn, batches).to_dense())
    assert hess.min() < -1e-6 * hess.max()


def test_ggn_equals_the_hessian_for_linear_least_squares():
    # Linear model + MSE: the model's second derivative is zero, so G = H = 2 A^T A / (N m) with
    # A = [X, 1] per output (mse_loss averages over N * m entries). Closed form for m = 1.
    X, y = regression_data(n=30, out=1, seed=4)
    torch.manual_seed(0)
    model = nn.Linear(5, 1).double()
    op = GGNOperator(model, F.mse_loss, (X, y))
    A = torch.cat([X, torch.ones(30, 1, dtype=torch.float64)], dim=1)
    closed = 2.0 * A.T @ A / 30
    G = op.to_dense()
    assert_close_scaled(G, closed)
    assert_close_scaled(G, HessianOperator(model, F.mse_loss, (X, y)).to_dense())


def test_ggn_parameter_selection_and_state_untouched():
    model = mlp()
    X, y = class_data()
    loss_fn = nn.CrossEntropyLoss()
    names = [k for k, _ in model.named_parameters()]
    full = dense_ggn(model, loss_fn, X, y)
    # The block of the last layer: parameters selected by name, in the order given.
    op = GGNOperator(model, loss_fn, (X, y), params=["2.weight", "2.bias"])
    start = sum(p.numel() for k, p in model.named_parameters() if k in names[:2])
    assert op.names == ["2.weight", "2.bias"] and op.params == [model[2].weight, model[2].bias]
    assert_close_scaled(op.to_dense(), full[start:, start:])
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    op.to_dense()
    assert model.training and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_ggn_counts_products_and_reports_them():
    model = mlp()
    X, y = class_data()
    op = GGNOperator(model, nn.CrossEntropyLoss(), (X, y))
    seen = []
    op.on_products = seen.append
    op.matmat(torch.ones(3, op.n, dtype=torch.float64))
    # First use runs the determinism check (2 products), then the block of 3.
    assert op.num_hvps == 5 and seen == [1, 1, 3]
    op.matvec(torch.ones(op.n, dtype=torch.float64))
    assert op.num_hvps == 6 and seen[-1] == 1


def test_ggn_bad_input_errors_name_the_argument():
    model = mlp()
    X, y = class_data()
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        GGNOperator(lambda x: x, loss_fn, (X, y))
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        GGNOperator(model, 3, (X, y))
    with pytest.raises(ValueError, match="params is empty"):
        GGNOperator(model, loss_fn, (X, y), params=[])
    with pytest.raises(ValueError, match="no parameter named"):
        GGNOperator(model, loss_fn, (X, y), params=["nope"])
    with pytest.raises(ValueError, match=r"params\[0\] is not a parameter"):
        GGNOperator(model, loss_fn, (X, y), params=[torch.zeros(2)])
    with pytest.raises(ValueError, match="data is empty"):
        GGNOperator(model, loss_fn, [])
    with pytest.raises(TypeError, match="data must be"):
        GGNOperator(model, loss_fn, X)
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        GGNOperator(model, nn.CrossEntropyLoss(reduction="none"), (X, y))

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3).double()

        def forward(self, x):
            return self.lin(x), self.lin(x)

    with pytest.raises(TypeError, match="model must return one floating-point tensor"):
        GGNOperator(TwoHeads(), loss_fn, (X, y))
    with pytest.raises(ValueError, match="does not depend on the model's outputs"):
        GGNOperator(model, lambda out, t: out.detach().sum(), (X, y))
    op = GGNOperator(model, loss_fn, (X, y))
    with pytest.raises(ValueError, match="matmat needs a block"):
        op.matmat(torch.zeros(2, op.n + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="matvec needs a vector"):
        op.matvec(torch.zeros(op.n + 1, 2, dtype=torch.float64))


def test_ggn_nondeterministic_model_is_rejected():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    X, y = class_data()
    op = GGNOperator(model, nn.CrossEntropyLoss(), (X, y), train_mode=True)
    with pytest.raises(RuntimeError, match="GGNOperator is not deterministic"):
        op.matvec(torch.ones(op.n, dtype=torch.float64))
    # eval mode (the default): dropout is off and the operator is fixed.
    op = GGNOperator(model, nn.CrossEntropyLoss(), (X, y))
    assert op.check_determinism() == 0.0


# ---------------------------------------------------------------------------------------------------------
# Against curvlinops (an independent implementation of the same matrix)


def _curvlinops_dense(model, loss_fn, batches):
    curvlinops = pytest.importorskip("curvlinops")
    params = [p for p in model.parameters() if p.requires_grad]
    G = curvlinops.GGNLinearOperator(model, loss_fn, params, batches)
    # curvlinops >= 3 applies its operators to torch tensors: G @ I is the dense matrix.
    return G @ torch.eye(sum(p.numel() for p in params), dtype=torch.float64)


@pytest.mark.parametrize(
    "name",
    ["mlp_mse", "mlp_cross_entropy", "cnn_cross_entropy", "cnn_mse"],
)
def test_ggn_matches_curvlinops(name):
    pytest.importorskip("curvlinops")
    if name.startswith("mlp"):
        model = mlp()
        X, y = regression_data(n=16) if name.endswith("mse") else class_data(n=16)
    else:
        model = cnn()
        X, _ = class_data(n=12, shape=(1, 6, 6))
        _, y = regression_data(n=12) if name.endswith("mse") else class_data(n=12)
    loss_fn = nn.MSELoss() if name.endswith("mse") else nn.CrossEntropyLoss()
    batches = [(X[:7], y[:7]), (X[7:], y[7:])]
    ours = GGNOperator(model, loss_fn, batches).to_dense()
    theirs = _curvlinops_dense(model, loss_fn, batches)
    assert_close_scaled(ours, theirs)


# ---------------------------------------------------------------------------------------------------------
# Consumers


def test_lanczos_and_spectral_density_accept_a_ggn():
    model = mlp()
    X, y = class_data(n=40)
    op = GGNOperator(model, nn.CrossEntropyLoss(), (X, y))
    exact = torch.linalg.eigvalsh(dense_ggn(model, nn.CrossEntropyLoss(), X, y)).flip(0)
    res = lanczos(op, 4, block_size=2, tol=1e-10)
    # Converged Ritz values of a symmetric operator are within residual^2 / gap of the eigenvalues; with
    # residuals <= 1e-10 |G| that is far below 1e-8 |G|.
    assert res.converged.all()
    np.testing.assert_allclose(res.eigenvalues.numpy(), exact[:4].numpy(), rtol=0, atol=1e-8 * float(exact[0]))
    assert [t.shape for t in res.eigenvector_params(0)] == [p.shape for p in model.parameters()]
    # SLQ with order = n on every probe: the Krylov space of each probe spans the probe's components, so
    # the quadrature reproduces the moments of the spectral measure seen by each probe exactly; averaged,
    # the first moment is z^T G z / n summed over probes, whose expectation is trace(G) / n. Checked exactly
    # per probe: sum of weights * nodes = z^T G z / |z|^2.
    n = op.n
    sd = spectral_density(op, num_probes=3, order=n, seed=5)
    G = dense_ggn(model, nn.CrossEntropyLoss(), X, y)
    gen = torch.Generator().manual_seed(5)
    Z = (2 * torch.randint(0, 2, (3, n), generator=gen, dtype=torch.int8).double() - 1)
    for i in range(3):
        w, x = sd.weights[i], sd.nodes[i]
        mask = w > 0
        moment = float((w[mask] * x[mask]).sum())
        expected = float(Z[i] @ G @ Z[i]) / n
        assert math.isclose(moment, expected, rel_tol=1e-8)
    assert np.nanmin(sd.nodes) >= -1e-10 * float(exact[0])  # PSD: no negative Ritz value


def _least_squares_run(kind, steps=300):
    """Two-scale linear least squares (eigenvalues ~ 0.005 and 1.5-19) trained by AutoMrGD planned from a
    GGNOperator or a HessianOperator, or by GD at rate 1 / lambda_max; returns (optimizer, losses, lambda_max)."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([3.0, 3.0, 1.0, 1.0, 0.05, 0.05], dtype=torch.float64)
    X = torch.randn(64, 6, generator=g, dtype=torch.float64) * scale
    y = X @ torch.randn(6, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Linear(6, 1, bias=False).double()
    params = list(model.parameters())
    lam_max = float(torch.linalg.eigvalsh(2.0 * X.T @ X / 64).max())
    if kind == "gd":
        opt = torch.optim.SGD(params, lr=1.0 / lam_max)
    else:
        cls = GGNOperator if kind == "ggn" else HessianOperator
        opt = AutoMrGD(params, cls(model, F.mse_loss, (X, y), params=params), density_order=6, max_groups=None,
                       refresh_every=10**6)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(X), y)
        loss.backward()
        return loss

    losses = [float(closure().detach())]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a back-off would mean a wrong plan
        for _ in range(steps):
            opt.step(closure)
    losses.append(float(closure().detach()))
    return opt, losses, lam_max


def test_auto_mrgd_runs_with_a_ggn_on_least_squares():
    opt, losses, lam_max = _least_squares_run("ggn")
    assert opt.events[0]["kind"] == "estimate" and opt.estimation_hvps > 0
    # Lanczos residual tolerance 1e-3 relative: the Ritz value is within 1e-3 of lambda_max.
    assert math.isclose(opt.estimate.lambda_max, lam_max, rel_tol=1e-3)
    # For a linear model the GGN is the Hessian: the plan and the trajectory are those of the Hessian-planned
    # optimizer (operators equal to rounding, so the measurements agree to ~1e-10 and the run to ~1e-9).
    ref, ref_losses, _ = _least_squares_run("hessian")
    ends = [x for g in opt.plan.groups for x in (g.a, g.b)]
    assert ends == pytest.approx([x for g in ref.plan.groups for x in (g.a, g.b)], rel=1e-8)
    assert losses[-1] == pytest.approx(ref_losses[-1], rel=1e-6)
    # And the multirate plan beats GD at its stable rate by orders of magnitude on this condition number
    # (~4.6e3): measured 3.3e-5 vs 2.1e-2 after 300 steps.
    _, gd_losses, _ = _least_squares_run("gd")
    assert losses[-1] < 1e-2 * gd_losses[-1] and losses[-1] < 1e-5 * losses[0]


def test_auto_mrgd_rejects_an_operator_that_is_not_a_curvature_operator():
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match="hessian must be a HessianOperator or GGNOperator"):
        AutoMrGD([w], torch.eye(3, dtype=torch.float64))
    other = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    op = HessianOperator.from_closure(lambda ps: (ps[0] ** 2).sum(), [other])
    with pytest.raises(ValueError, match="exactly the optimizer's parameters"):
        AutoMrGD([w], op)


def test_top_level_exports():
    assert mrgd_ext.GGNOperator is GGNOperator
    assert issubclass(GGNOperator, mrgd_ext.CurvatureOperator) and issubclass(HessianOperator, CurvatureOperator)
