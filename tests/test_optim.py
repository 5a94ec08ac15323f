"""MrGD and MultirateLR: trajectories, param groups, state_dict resume, AMP flags, subspace mode, bad input."""

import io

import pytest
import torch

from mrgd_ext import MrGD, MultirateLR, mrgd
from mrgd_ext.ops import reference as ref

CYCLE = (0.01, 0.02, 0.01, 0.5)  # small steps first, the large step last


def quadratic_problem(n=23, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    lam = torch.cat([torch.linspace(20.0, 30.0, 3), torch.linspace(1.0, 2.0, n - 3)]).double()
    H = (q * lam) @ q.T
    b = torch.randn(n, dtype=torch.float64, generator=gen)
    return H.to(dtype), b.to(dtype), q.to(dtype), lam.to(dtype)


class TwoLayer(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.a = torch.nn.Linear(13, 7, dtype=dtype)
        self.b = torch.nn.Linear(7, 3, dtype=dtype)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def loss_of(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def train(model, opt, steps, x, y, scheduler=None):
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("impl", [dict(fused=True), dict(foreach=True), dict(foreach=False, fused=False), {}])
def test_trajectory_equals_reference_gd_walk_float64(impl):
    """MrGD on a quadratic equals plain GD that applies the cycle's rates in order (float64)."""
    H, b, _, _ = quadratic_problem()
    x = torch.zeros_like(b, requires_grad=True)
    opt = MrGD([x], plan=CYCLE, lr_scale=0.5, **impl)
    expected = torch.zeros_like(b)
    for step in range(11):  # crosses the cycle boundary twice
        opt.zero_grad()
        (0.5 * x @ H @ x - b @ x).backward()
        opt.step()
        expected = expected - 0.5 * CYCLE[step % len(CYCLE)] * (H @ expected - b)
        torch.testing.assert_close(x.detach(), expected, rtol=1e-13, atol=1e-13)
    assert opt.param_groups[0]["cycle_position"] == 11 % len(CYCLE)
    # lr is the scheduler's multiplier (1 without a scheduler); last_rate the rate the last step took.
    assert opt.param_groups[0]["lr"] == 1.0
    assert opt.param_groups[0]["last_rate"].item() == 0.5 * CYCLE[10 % len(CYCLE)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_foreach_and_single_tensor_agree(dtype):
    x = torch.randn(50, 13)
    y = torch.randn(50, 3)
    models = [TwoLayer() for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    for m in models:
        m.to(dtype)
    impls = [dict(fused=True), dict(foreach=True), dict(foreach=False, fused=False)]
    for m, impl in zip(models, impls):
        opt = MrGD(m.parameters(), plan=CYCLE, weight_decay=0.01, **impl)
        train(m, opt, 6, x.to(dtype), y.to(dtype))
    # float32: the kernel and the references compute the same expression; the foreach path rounds the
    # intermediate g + wd*p to storage, a few ulps. bfloat16: foreach works in bfloat16 (as torch SGD), the
    # kernel in float32, so they may differ by a bfloat16 ulp per step.
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    for p0, p1, p2 in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p0, p2, **tol)
        torch.testing.assert_close(p0, p1, **tol)


def test_state_dict_round_trip_resumes_bit_exactly():
    x, y = torch.randn(40, 13), torch.randn(40, 3)
    model = TwoLayer()
    opt = MrGD(model.parameters(), plan=CYCLE, weight_decay=1e-3)
    train(model, opt, 6, x, y)  # stop in the middle of the second cycle
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 7, x, y)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = TwoLayer()
    resumed.load_state_dict(ckpt["model"])
    opt2 = MrGD(resumed.parameters(), plan=[1.0])  # a different plan: the checkpoint's cycle must win
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups[0]["cycle_position"] == 6 % len(CYCLE)
    train(resumed, opt2, 7, x, y)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_param_groups_with_their_own_plans():
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    opt = MrGD([{"params": [a]}, {"params": [b], "plan": [0.1, 0.3], "lr_scale": 2.0}], plan=[1.0, 2.0, 3.0])
    expected_a, expected_b = [], []
    for step in range(5):
        opt.zero_grad()
        (a.sum() + b.sum()).backward()  # gradient of ones
        opt.step()
        expected_a.append([1.0, 2.0, 3.0][step % 3])
        expected_b.append(2.0 * [0.1, 0.3][step % 2])
    torch.testing.assert_close(a.detach(), torch.full((3,), -sum(expected_a)))
    torch.testing.assert_close(b.detach(), torch.full((3,), -sum(expected_b)))


def test_maximize_and_params_without_grad():
    a = torch.ones(4, requires_grad=True)
    frozen = torch.ones(4, requires_grad=True)
    opt = MrGD([a, frozen], plan=[0.5], maximize=True)
    (a * 2).sum().backward()
    opt.step()
    torch.testing.assert_close(a.detach(), torch.full((4,), 2.0))
    assert torch.equal(frozen.detach(), torch.ones(4))


def test_multirate_lr_makes_sgd_follow_the_plan_exactly():
    x, y = torch.randn(40, 13, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    m1, m2 = TwoLayer(torch.float64), TwoLayer(torch.float64)
    m2.load_state_dict(m1.state_dict())
    train(m1, MrGD(m1.parameters(), plan=CYCLE, foreach=True), 9, x, y)
    sgd = torch.optim.SGD(m2.parameters(), lr=1.0, foreach=True)
    sched = MultirateLR(sgd, CYCLE)
    train(m2, sgd, 9, x, y, scheduler=sched)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-14, atol=1e-14)
    assert sched.get_last_lr() == [CYCLE[9 % len(CYCLE)]]


def test_amp_flags_skip_a_step_and_keep_the_cycle_position():
    a = torch.zeros(5, requires_grad=True)
    opt = MrGD([a], plan=CYCLE, fused=True)
    a.grad = torch.full((5,), 8.0)
    # What torch.amp.GradScaler does for optimizers with _step_supports_amp_scaling.
    opt.grad_scale, opt.found_inf = torch.tensor([8.0]), torch.tensor([1.0])
    opt.step()
    assert torch.equal(a.detach(), torch.zeros(5)) and opt.param_groups[0]["cycle_position"] == 0
    opt.found_inf = torch.tensor([0.0])
    opt.step()
    torch.testing.assert_close(a.detach(), torch.full((5,), -CYCLE[0]))
    assert opt.param_groups[0]["cycle_position"] == 1
    assert opt._step_supports_amp_scaling


def test_grad_scaler_on_cpu_unscales_through_the_kernel():
    x, y = torch.randn(30, 13), torch.randn(30, 3)
    m1, m2 = TwoLayer(), TwoLayer()
    m2.load_state_dict(m1.state_dict())
    opt1 = MrGD(m1.parameters(), plan=CYCLE, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(3):
        opt1.zero_grad()
        scaler.scale(loss_of(m1, x, y)).backward()
        scaler.step(opt1)
        scaler.update()
    train(m2, MrGD(m2.parameters(), plan=CYCLE, fused=True), 3, x, y)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        # Scaling by a power of two is exact; only the order of the unscale differs.
        torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------------
# Subspace mode


def test_subspace_mode_converges_at_the_slowest_group_rate():
    """With exact eigenvectors of the top group, each group gets its own optimal rate every step."""
    H, b, q, lam = quadratic_problem(n=60)
    x_star = torch.linalg.solve(H, b)
    top = q[:, :3].T.contiguous()
    rate_top = 2.0 / (lam[:3].min() + lam[:3].max())
    rate_rest = 2.0 / (lam[3:].min() + lam[3:].max())
    x = torch.zeros_like(b, requires_grad=True)
    opt = MrGD([x], plan=[1.0])
    opt.set_subspace(top, [rate_top.item()] * 3, rate_rest.item())
    errors = []
    for _ in range(40):
        opt.zero_grad()
        (0.5 * x @ H @ x - b @ x).backward()
        opt.step()
        errors.append((x.detach() - x_star).norm().item())
    # Contraction per step is max over groups of (kappa_k - 1) / (kappa_k + 1): (2-1)/(2+1) = 1/3 here,
    # against (30-1)/(30+1) for plain GD at its best constant rate.
    kappa = max(lam[:3].max() / lam[:3].min(), lam[3:].max() / lam[3:].min()).item()
    predicted = ((kappa - 1) / (kappa + 1)) ** 40 * x_star.norm().item()
    assert errors[-1] <= 1.01 * predicted + 1e-13


@pytest.mark.parametrize("basis_dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_subspace_fused_equals_reference(basis_dtype, tol):
    x, y = torch.randn(40, 13), torch.randn(40, 3)
    m1, m2 = TwoLayer(), TwoLayer()
    m2.load_state_dict(m1.state_dict())
    n = sum(p.numel() for p in m1.parameters())
    basis, _ = torch.linalg.qr(torch.randn(n, 4))
    basis = basis.T.contiguous().to(basis_dtype)
    rates = [0.01, 0.01, 0.02, 0.05]
    o1 = MrGD(m1.parameters(), plan=[1.0], fused=True, weight_decay=1e-3)
    o2 = MrGD(m2.parameters(), plan=[1.0], fused=False, foreach=False, weight_decay=1e-3)
    for o in (o1, o2):
        o.set_subspace(basis, rates, 0.3)
    train(m1, o1, 5, x, y)
    train(m2, o2, 5, x, y)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=tol, atol=tol)


def test_subspace_matches_reference_formula_and_round_trips():
    H, b, q, lam = quadratic_problem(n=30)
    basis = q[:, :3].T.contiguous()
    x = torch.zeros_like(b, requires_grad=True)
    opt = MrGD([x], plan=CYCLE)
    opt.set_subspace(basis, [0.04, 0.04, 0.04], 0.6)
    expected = torch.zeros_like(b)
    for _ in range(3):
        opt.zero_grad()
        (0.5 * x @ H @ x - b @ x).backward()
        opt.step()
        g = H @ expected - b
        expected = expected - 0.6 * g - basis.T @ ((0.04 - 0.6) * (basis @ g))
    torch.testing.assert_close(x.detach(), expected, rtol=1e-13, atol=1e-13)
    state = opt.state_dict()
    opt2 = MrGD([x], plan=CYCLE)
    opt2.load_state_dict(state)
    assert opt2.subspace_enabled
    opt2.clear_subspace()
    assert not opt2.subspace_enabled and opt2.param_groups[0]["cycle_position"] == 0


# ------------------------------------------------------------------------------------------------------
# Bad input


def test_constructor_rejects_bad_arguments():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="lr_scale"):
        MrGD(p, plan=CYCLE, lr_scale=0.0)
    with pytest.raises(ValueError, match="learning rate 1"):
        MrGD(p, plan=[0.1, -0.2])
    with pytest.raises(ValueError, match="empty cycle"):
        MrGD(p, plan=[])
    with pytest.raises(TypeError, match="plan"):
        MrGD(p, plan="fast")
    with pytest.raises(ValueError, match="weight_decay"):
        MrGD(p, plan=CYCLE, weight_decay=-1.0)
    with pytest.raises(RuntimeError, match="fused and foreach"):
        MrGD(p, plan=CYCLE, fused=True, foreach=True)
    with pytest.raises(ValueError, match="lr"):
        mrgd(p, [torch.zeros(2)], lr=0.0)


def test_bad_step_leaves_every_parameter_untouched():
    good = torch.ones(3, requires_grad=True)
    bad = torch.nn.Parameter(torch.ones(4, 3).t())  # non-contiguous: the fused kernel refuses it
    opt = MrGD([{"params": [good]}, {"params": [bad]}], plan=CYCLE, fused=True)
    good.grad = torch.ones(3)
    bad.grad = torch.ones(3, 4)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] is not contiguous"):
        opt.step()
    assert torch.equal(good.detach(), torch.ones(3)) and opt.param_groups[0]["cycle_position"] == 0
    bad.grad = torch.ones(3, 4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(good.detach(), torch.ones(3))


def test_functional_rejects_mismatched_grads_before_writing():
    a, b = torch.ones(3), torch.ones(3)
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype torch.float64"):
        mrgd([a, b], [torch.ones(3), torch.ones(3, dtype=torch.float64)], lr=0.1)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape"):
        mrgd([a, b], [torch.ones(3), torch.ones(4)], lr=0.1)
    assert torch.equal(a, torch.ones(3)) and torch.equal(b, torch.ones(3))


def test_non_contiguous_params_need_a_non_fused_path():
    w = torch.nn.Parameter(torch.randn(4, 5).t())  # non-contiguous
    w.grad = torch.ones(5, 4)
    before = w.detach().clone()
    with pytest.raises(ValueError, match="not contiguous"):
        MrGD([w], plan=[0.1], fused=True).step()
    assert torch.equal(w.detach(), before)
    MrGD([w], plan=[0.1]).step()  # the default picks foreach for such a bucket
    torch.testing.assert_close(w.detach(), before - 0.1)


def test_set_subspace_rejects_bad_bases():
    p = torch.zeros(10, requires_grad=True)
    opt = MrGD([p], plan=CYCLE)
    ortho = torch.linalg.qr(torch.randn(10, 2))[0].T.contiguous()  # orthonormal rows: the checks below see them
    with pytest.raises(ValueError, match="basis has 9 columns"):
        opt.set_subspace(torch.randn(2, 9), [0.1, 0.1], 1.0)
    with pytest.raises(ValueError, match="column_rates has 3 entries"):
        opt.set_subspace(ortho, [0.1, 0.1, 0.1], 1.0)
    with pytest.raises(ValueError, match="base_lr"):
        opt.set_subspace(ortho, [0.1, 0.1], -1.0)
    with pytest.raises(ValueError, match="column_rates must be finite"):
        opt.set_subspace(ortho, [0.1, float("nan")], 1.0)
    with pytest.raises(ValueError, match="exactly one param group"):
        MrGD([{"params": [p]}, {"params": [torch.zeros(1, requires_grad=True)]}], plan=CYCLE).set_subspace(
            torch.randn(1, 11), [0.1], 1.0
        )
    assert not opt.subspace_enabled


def test_reference_full_subspace_step_matches_formula():
    H, b, q, _ = quadratic_problem(n=12)
    x = torch.randn(12, dtype=torch.float64)
    g = H @ x - b
    basis = q[:, :2].T.contiguous()
    x_new = x.clone()
    ref.multirate_subspace_step([x_new], [g], basis, torch.tensor([0.1, 0.2]), 0.7)
    expected = x - 0.7 * g - basis.T @ ((torch.tensor([0.1, 0.2]).double() - 0.7) * (basis @ g))
    torch.testing.assert_close(x_new, expected, rtol=1e-14, atol=1e-14)
