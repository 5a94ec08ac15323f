"""HessianOperator: Hessian-vector products vs torch.autograd.functional.hessian, both backends.

Tolerances: in float64 the operator and the dense reference evaluate the same derivatives through different
autograd paths (forward-over-reverse vs reverse-over-reverse, batches summed separately), so they agree to
rounding: a few hundred ulps of the largest Hessian entry covers the reordered sums (rtol 1e-10,
atol 1e-12 * |H|_max below).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from mrgd_ext.curvature import hessian as hessian_module
from mrgd_ext.curvature.hessian import HessianOperator


def mlp(seed=0, dtype=torch.float64, bn=False, dropout=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(0.5))
    layers += [nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(dtype)


def data(n=24, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def dense_hessian(model, loss_fn, X, y, names):
    """Reference: the Hessian of the mean loss over (X, y) w.r.t. the named parameters, dense [n, n]."""
    params = dict(model.named_parameters())
    shapes = [params[k].shape for k in names]
    numels = [params[k].numel() for k in names]
    flat0 = torch.cat([params[k].detach().reshape(-1) for k in names])

    def f(flat):
        parts = {k: t.reshape(s) for k, t, s in zip(names, flat.split(numels), shapes)}
        return loss_fn(torch.func.functional_call(model, parts, (X,)), y)

    return torch.autograd.functional.hessian(f, flat0)


def assert_hessian_close(H, Href):
    scale = Href.abs().max().item()
    torch.testing.assert_close(H, Href, rtol=1e-10, atol=1e-12 * scale)


@pytest.mark.parametrize("backend", ["func", "double_backward"])
def test_mlp_hvp_matches_dense_hessian(backend):
    model, (X, y) = mlp(), data()
    loss_fn = nn.CrossEntropyLoss()
    # Unequal batches: weights |B|/N make the operator the Hessian of the mean over all samples.
    batches = [(X[:5], y[:5]), (X[5:16], y[5:16]), (X[16:], y[16:])]
    op = HessianOperator(model, loss_fn, batches, backend=backend)
    names = [k for k, _ in model.named_parameters()]
    Href = dense_hessian(model, loss_fn, X, y, names)
    assert op.n == Href.shape[0] and op.dtype == torch.float64
    assert_hessian_close(op.to_dense(block_size=7), Href)
    # matvec and matmat agree with H @ v.
    g = torch.Generator().manual_seed(2)
    V = torch.randn(3, op.n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), V @ Href, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matvec(V[0]), Href @ V[0], rtol=1e-10, atol=1e-12)
    assert op.resolved_backend == backend


@pytest.mark.parametrize("backend", ["func", "double_backward"])
def test_logistic_regression_hessian_closed_form(backend):
    # Binary logistic regression: H = X^T diag(p (1 - p)) X / N for the weight (closed form, no autograd).
    g = torch.Generator().manual_seed(3)
    X = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = (torch.rand(40, generator=g) > 0.5).double()
    model = nn.Linear(6, 1, bias=False).double()
    op = HessianOperator(model, lambda out, t: nn.functional.binary_cross_entropy_with_logits(out[:, 0], t),
                         (X, y), backend=backend)
    p = torch.sigmoid(X @ model.weight.detach()[0])
    H = X.T @ (X * (p * (1 - p))[:, None]) / 40
    assert_hessian_close(op.to_dense(), H)
    Href = dense_hessian(model, lambda out, t: nn.functional.binary_cross_entropy_with_logits(out[:, 0], t), X, y,
                         ["weight"])
    v = torch.randn(6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), Href @ v, rtol=1e-10, atol=1e-12)


def test_parameter_subset_is_the_hessian_block():
    model, (X, y) = mlp(), data()
    loss_fn = nn.CrossEntropyLoss()
    names = [k for k, _ in model.named_parameters()]
    Hfull = dense_hessian(model, loss_fn, X, y, names)
    sub = ["2.weight", "2.bias"]
    op_names = HessianOperator(model, loss_fn, (X, y), params=sub)
    op_tensors = HessianOperator(model, loss_fn, (X, y), params=[model[2].weight, model[2].bias])
    start = sum(p.numel() for k, p in model.named_parameters() if k not in sub)
    assert_hessian_close(op_names.to_dense(), Hfull[start:, start:])
    assert_hessian_close(op_tensors.to_dense(), Hfull[start:, start:])
    assert op_names.names == sub and op_names.shapes == [(3, 8), (3,)]


def test_flatten_unflatten_round_trip():
    model, (X, y) = mlp(), data()
    op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    vec = torch.arange(op.n, dtype=torch.float64)
    parts = op.unflatten(vec)
    assert [tuple(p.shape) for p in parts] == op.shapes
    assert torch.equal(op.flatten(parts), vec)
    block = torch.stack([vec, -vec])
    bparts = op.unflatten(block)
    assert tuple(bparts[0].shape) == (2, *op.shapes[0])
    assert torch.equal(op.flatten(bparts), block)
    with pytest.raises(ValueError, match="unflatten"):
        op.unflatten(vec[:-1])


def test_closure_quadratic_is_exact_and_mixed_shapes():
    g = torch.Generator().manual_seed(4)
    M = torch.randn(7, 7, generator=g, dtype=torch.float64)
    A = M @ M.T
    x0 = [torch.randn(3, generator=g, dtype=torch.float64), torch.randn(2, 2, generator=g, dtype=torch.float64)]

    def closure(ps):
        x = torch.cat([ps[0], ps[1].reshape(-1)])
        return 0.5 * x @ A @ x + torch.sin(x).sum() * 0.0 + x.sum()

    for backend in ("func", "double_backward"):
        op = HessianOperator.from_closure(closure, x0, backend=backend)
        torch.testing.assert_close(op.to_dense(), A, rtol=1e-13, atol=1e-13)


def test_batchnorm_train_mode_restores_buffers_and_uses_batch_statistics():
    model, (X, y) = mlp(bn=True), data()
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():  # non-trivial running statistics, so eval and train mode differ
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [k for k, _ in model.named_parameters()]
    train_copy = copy.deepcopy(model).train()
    Htrain = dense_hessian(train_copy, loss_fn, X, y, names)
    Heval = dense_hessian(copy.deepcopy(model).eval(), loss_fn, X, y, names)
    assert (Htrain - Heval).abs().max() > 1e-3, "test is blind: train and eval Hessians coincide"
    for backend in ("func", "double_backward"):
        op = HessianOperator(model, loss_fn, (X, y), train_mode=True, backend=backend)
        assert_hessian_close(op.to_dense(), Htrain)
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} changed ({backend})"
        assert not model.training and not model[1].training and model[1].track_running_stats


def test_eval_mode_by_default_and_flags_restored():
    model, (X, y) = mlp(bn=True), data()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    model.train()
    names = [k for k, _ in model.named_parameters()]
    Heval = dense_hessian(copy.deepcopy(model).eval(), nn.CrossEntropyLoss(), X, y, names)
    op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    assert_hessian_close(op.to_dense(), Heval)
    assert model.training and all(m.training for m in model.modules())


def test_float32_operator():
    model64, (X, y) = mlp(), data()
    model32 = copy.deepcopy(model64).float()
    op = HessianOperator(model32, nn.CrossEntropyLoss(), (X.float(), y))
    names = [k for k, _ in model64.named_parameters()]
    Href = dense_hessian(model64, nn.CrossEntropyLoss(), X, y, names)
    H = op.to_dense()
    assert H.dtype == torch.float32
    # float32 arithmetic through a few layers: ~1e-6 relative to the largest entry.
    torch.testing.assert_close(H.double(), Href, rtol=0, atol=1e-5 * Href.abs().max().item())


def test_nondeterministic_model_is_caught():
    model, (X, y) = mlp(dropout=True), data()
    op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y), train_mode=True)
    with pytest.raises(RuntimeError, match="not deterministic"):
        op.matvec(torch.ones(op.n, dtype=torch.float64))
    op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y), train_mode=True, allow_nondeterministic=True)
    assert op.check_determinism() > 1e-3  # reported, not raised
    # In eval mode dropout is off: deterministic, and the check passes silently.
    op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    assert op.check_determinism() == 0.0


class _Square(torch.autograd.Function):
    """x^2 written as an old-style autograd.Function (no setup_context): torch.func cannot transform it,
    plain autograd can differentiate it twice."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _OnceSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def test_auto_falls_back_to_double_backward_with_a_warning(monkeypatch):
    # On the CPU "auto" starts with double backward; where it starts with torch.func (other devices), a loss
    # torch.func cannot transform falls back with a warning. Drop the CPU entry to take that path here.
    monkeypatch.setattr(hessian_module, "AUTO_BACKEND_BY_DEVICE", {})
    x = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    op = HessianOperator.from_closure(lambda ps: (_Square.apply(ps[0]) * torch.tensor([1.0, 2.0, 3.0],
                                                                                       dtype=torch.float64)).sum(), x)
    with pytest.warns(RuntimeWarning, match="falling back to the double-backward"):
        H = op.to_dense()
    torch.testing.assert_close(H, torch.diag(torch.tensor([2.0, 4.0, 6.0], dtype=torch.float64)))
    assert op.resolved_backend == "double_backward"


def test_bad_input_errors_name_the_argument():
    model, (X, y) = mlp(), data()
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="params is empty"):
        HessianOperator(model, loss_fn, (X, y), params=[])
    frozen = mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="params is empty"):
        HessianOperator(frozen, loss_fn, (X, y))
    with pytest.raises(ValueError, match="params is empty"):
        HessianOperator.from_closure(lambda ps: ps[0].sum(), [])
    with pytest.raises(ValueError, match=r"params\[0\] is not a parameter"):
        HessianOperator(model, loss_fn, (X, y), params=[torch.zeros(3)])
    with pytest.raises(ValueError, match="no parameter named"):
        HessianOperator(model, loss_fn, (X, y), params=["nope"])
    with pytest.raises(ValueError, match="backend"):
        HessianOperator(model, loss_fn, (X, y), backend="jax")
    with pytest.raises(ValueError, match="data is empty"):
        HessianOperator(model, loss_fn, [])
    with pytest.raises(TypeError, match="data must be"):
        HessianOperator(model, loss_fn, X)
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        HessianOperator(model, nn.CrossEntropyLoss(reduction="none"), (X, y))
    with pytest.raises(TypeError, match="dtype"):
        HessianOperator.from_closure(lambda ps: ps[0].sum() + ps[1].sum(),
                                     [torch.zeros(2), torch.zeros(2, dtype=torch.float64)])
    x = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="closure must return a scalar"):
        HessianOperator.from_closure(lambda ps: ps[0] * 2, x)
    with pytest.raises(ValueError, match="closure's loss does not depend on params"):
        HessianOperator.from_closure(lambda ps: (ps[0] ** 2).sum().detach(), x)
    # Not twice differentiable: a backward that autograd cannot differentiate again.
    op = HessianOperator.from_closure(lambda ps: _OnceSquare.apply(ps[0]).sum(), x, check_determinism=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the func -> double_backward fallback warning
        with pytest.raises(ValueError, match="closure is not twice differentiable"):
            op.matvec(x)
    op = HessianOperator(model, loss_fn, (X, y))
    with pytest.raises(ValueError, match="matmat needs a block"):
        op.matmat(torch.zeros(2, op.n + 1, dtype=torch.float64))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_operator_matches_cpu():
    model, (X, y) = mlp(), data()
    names = [k for k, _ in model.named_parameters()]
    Href = dense_hessian(model, nn.CrossEntropyLoss(), X, y, names)
    op = HessianOperator(copy.deepcopy(model).cuda(), nn.CrossEntropyLoss(), (X.cuda(), y.cuda()))
    assert op.device.type == "cuda"
    torch.testing.assert_close(op.to_dense().cpu(), Href, rtol=1e-9, atol=1e-11 * Href.abs().max().item())


# ---------------------------------------------------------------------------------------------------------
# The torch.func backend runs for standard models and losses


def _standard_model(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(5, 3).double(), (5,)
    if kind == "mlp":
        return mlp(), (5,)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double(), (1, 6, 6)


@pytest.mark.parametrize("kind", ["linear", "mlp", "cnn"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_torch_func_backend_runs_for_standard_models(kind, loss):
    model, shape = _standard_model(kind)
    g = torch.Generator().manual_seed(4)
    X = torch.randn(12, *shape, generator=g, dtype=torch.float64)
    if loss == "mse":
        y, loss_fn = torch.randn(12, 3, generator=g, dtype=torch.float64), nn.functional.mse_loss
    else:
        y, loss_fn = torch.randint(0, 3, (12,), generator=g), nn.functional.cross_entropy
    op = HessianOperator(model, loss_fn, [(X[:5], y[:5]), (X[5:], y[5:])], backend="func")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to double backward
        H = op.to_dense()
    assert op.backend_used == "func"
    # F.mse_loss's backward cannot be differentiated in forward mode (it writes into a zero tangent), so MSE
    # takes the reverse-over-reverse transform; cross-entropy the forward-over-reverse one.
    expected = "reverse_over_reverse" if loss == "mse" else "forward_over_reverse"
    assert op.func_transform == expected
    names = [k for k, _ in model.named_parameters()]
    assert_hessian_close(H, dense_hessian(model, loss_fn, X, y, names))


def test_auto_backend_on_cpu_is_double_backward_without_a_warning():
    # On the CPU double backward measured faster per product than torch.func on these models (hessian.py).
    model, shape = _standard_model("mlp")
    X = torch.randn(7, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    op = HessianOperator(model, nn.functional.cross_entropy, (X, y))
    assert op.backend_used is None  # "auto" decides on first use
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        H = op.to_dense()
    assert op.backend_used == "double_backward"
    names = [k for k, _ in model.named_parameters()]
    assert_hessian_close(H, dense_hessian(model, nn.functional.cross_entropy, X, y, names))


def test_operator_counts_products_and_exposes_params():
    model, (X, y) = mlp(), data()
    op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y), check_determinism=False)
    seen = []
    op.on_products = seen.append
    op.matmat(torch.ones(4, op.n, dtype=torch.float64))
    op.matvec(torch.ones(op.n, dtype=torch.float64))
    assert op.num_hvps == 5 and seen == [4, 1]
    assert op.params == list(model.parameters())
    with pytest.raises(AttributeError):
        op.params = []


# --------------------------------------------------------------------------------------------------------
# share_graph (NOTE: [shared graph]): products at one point differentiate one gradient graph


class _ForwardCounter(nn.Module):
    """Wraps a model and counts its forward passes."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


def _counted_operator(batches=None, **kwargs):
    model = _ForwardCounter(mlp())
    X, y = data()
    data_arg = [(X[:10], y[:10]), (X[10:], y[10:])] if batches == 2 else (X, y)
    op = HessianOperator(model, nn.CrossEntropyLoss(), data_arg, backend="double_backward",
                         check_determinism=False, **kwargs)
    model.calls = 0
    return model, op


def _blocks(op, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, op.n, generator=g, dtype=torch.float64) for b in (1, 3, 1, 2)]


def test_shared_graph_products_are_bitwise_the_unshared_ones_with_one_forward_pass():
    model, op = _counted_operator()
    blocks = _blocks(op)
    plain = [op.matmat(V) for V in blocks]
    assert model.calls == len(blocks)  # one forward pass per block product without sharing
    model.calls = 0
    with op.share_graph():
        shared = [op.matmat(V) for V in blocks]
        assert op._shared is not None
    assert model.calls == 1
    assert op._shared is None  # released when the context exits
    for a, b in zip(plain, shared):
        assert torch.equal(a, b)
    assert op.num_hvps == 2 * sum(V.shape[0] for V in blocks)


def test_shared_graph_is_rebuilt_when_a_parameter_is_written_in_place():
    model, op = _counted_operator()
    v = _blocks(op)[1]
    with op.share_graph():
        before = op.matmat(v)
        with torch.no_grad():
            op.params[0].mul_(1.5)
        after = op.matmat(v)
        again = op.matmat(v)
    assert model.calls == 2  # one graph per parameter value
    fresh = op.matmat(v)  # outside the context: rebuilt from scratch
    assert torch.equal(after, fresh) and torch.equal(again, fresh)
    assert not torch.allclose(before, after)


def test_shared_graph_contexts_nest_and_release_at_the_outermost_exit():
    model, op = _counted_operator()
    v = _blocks(op)[0]
    with op.share_graph():
        with op.share_graph():
            op.matmat(v)
        assert op._shared is not None  # the outer context still holds it
        op.matmat(v)
    assert op._shared is None and model.calls == 1


@pytest.mark.parametrize("case", ["two_batches", "nondeterministic"])
def test_no_graph_is_kept_for_several_batches_or_a_nondeterministic_operator(case):
    if case == "two_batches":
        model, op = _counted_operator(batches=2)
        per_product = 2
    else:
        model, op = _counted_operator(allow_nondeterministic=True)
        per_product = 1
    v = _blocks(op)[0]
    with op.share_graph():
        first = op.matmat(v)
        second = op.matmat(v)
        assert op._shared is None
    assert model.calls == 2 * per_product
    assert torch.equal(first, second)


def test_determinism_check_inside_a_shared_context_evaluates_twice():
    model, op = _counted_operator()
    with op.share_graph():
        op.matmat(_blocks(op)[0])
        model.calls = 0
        op.check_determinism()
        assert model.calls == 2  # two independent evaluations, not one graph differentiated twice
        assert op._shared is not None  # the shared graph survives the check


def test_share_graph_of_other_operators():
    X = torch.randn(5, 5, dtype=torch.float64)
    A = X @ X.T
    from mrgd_ext.curvature.operator import as_operator

    dense = as_operator(A)
    with dense.share_graph():  # nothing to share: a no-op
        assert torch.equal(dense.matmat(torch.eye(5, dtype=torch.float64)), A)

    class Wrapped:  # an object with matmat/n/dtype/device and its own share_graph, as DistributedOperator
        n, dtype, device = 5, torch.float64, torch.device("cpu")
        entered = 0

        def matmat(self, V):
            return V @ A

        def share_graph(self):
            import contextlib

            Wrapped.entered += 1
            return contextlib.nullcontext()

    with as_operator(Wrapped()).share_graph():
        pass
    assert Wrapped.entered == 1


def test_func_backend_ignores_share_graph():
    model = mlp()
    X, y = data()
    op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y), backend="func", check_determinism=False)
    v = _blocks(op)[1]
    plain = op.matmat(v)
    with op.share_graph():
        shared = op.matmat(v)
        assert op._shared is None
    assert torch.equal(plain, shared)


def test_estimate_curvature_evaluates_the_loss_once_per_measurement():
    from mrgd_ext.curvature import estimate_curvature

    model, op = _counted_operator()
    est = estimate_curvature(op, num_eigs=3, block_size=1, density_probes=1, density_order=8, seed=0)
    assert est.num_hvps > 10
    assert model.calls == 1
    dense = torch.linalg.eigvalsh(op.to_dense()).flip(0)
    torch.testing.assert_close(est.eigenvalues[:1], dense[:1], rtol=1e-2, atol=0.0)


@pytest.mark.parametrize("routine", ["lanczos", "spectral_density", "hutchinson_trace", "hutchinson_diagonal",
                                     "xtrace"])
def test_krylov_routines_build_one_graph_per_call(routine):
    import mrgd_ext.curvature as curvature

    model, op = _counted_operator()
    fn = getattr(curvature, routine)
    if routine == "lanczos":
        fn(op, 2, block_size=1, tol=1e-6, seed=0)
    elif routine == "spectral_density":
        fn(op, num_probes=2, order=6, seed=0)
    else:
        fn(op, 6, seed=0)
    assert op.num_hvps >= 4
    assert model.calls == 1
    assert op._shared is None  # released when the routine returns
