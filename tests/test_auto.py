"""Data-informed MrGD: curvature estimates, Lanczos warm start, AutoMrGD (temporal, subspace, safety)."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch

import mrgd_ext
from mrgd_ext import AutoMrGD, HessianOperator, ScaleGroup, estimate_curvature, lanczos, plan_from_estimate

GROUPS = [ScaleGroup(0.5, 1.0), ScaleGroup(5e-3, 1e-2), ScaleGroup(5e-5, 1e-4)]


def _spectrum(n_per_group=(4, 6, 8), groups=GROUPS, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    parts = [np.concatenate([[g.a, g.b], rng.uniform(g.a, g.b, k - 2)]) for g, k in zip(groups, n_per_group)]
    return np.sort(np.concatenate(parts))[::-1].copy()


def _quadratic(eigs: np.ndarray, seed: int = 0):
    """0.5 (w - w*)^T H (w - w*) with eigenvalues ``eigs`` in a random basis (float64)."""
    n = eigs.size
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    H = (Q * torch.from_numpy(np.ascontiguousarray(eigs))) @ Q.T
    H = 0.5 * (H + H.T)
    w_star = torch.randn(n, generator=gen, dtype=torch.float64)
    return H, w_star


def _problem(eigs, seed=0):
    H, w_star = _quadratic(eigs, seed)
    w = torch.zeros(eigs.size, dtype=torch.float64, requires_grad=True)

    def loss_of(plist):
        d = plist[0] - w_star
        return 0.5 * d @ (H @ d)

    op = HessianOperator.from_closure(loss_of, [w])

    def closure_for(opt):
        def closure():
            opt.zero_grad()
            loss = loss_of([w])
            loss.backward()
            return loss

        return closure

    return w, w_star, H, op, closure_for


# ---------------------------------------------------------------------------------------------------------
# estimate_curvature


def test_estimate_curvature_recovers_the_groups_of_a_multiscale_matrix():
    eigs = _spectrum()
    H, _ = _quadratic(eigs)
    # order = n: every probe's Krylov space is the whole space, so the SLQ nodes are the exact eigenvalues
    # (up to rounding) and every group shows up. The group ends are read from the SLQ nodes and the Ritz
    # values together; a Ritz value at the default lanczos_tol (1e-2) lies below its eigenvalue by up to
    # r^2 / gap (measured 5e-5 on the top group's lower end), so the Ritz values are converged tightly here.
    est = estimate_curvature(H, num_eigs=4, density_probes=2, density_order=eigs.size, max_groups=None,
                             lanczos_tol=1e-8)
    assert len(est.groups) == 3
    for got, true in zip(est.groups, GROUPS):
        # The group ends are SLQ nodes: Lanczos without reorthogonalisation in float64 on an n = 18 space
        # resolves them to ~1e-8 relative (measured 2e-8 on the lowest end of the top group); 1e-6 is the
        # stated bound, far below any gap.
        assert got.a == pytest.approx(true.a, rel=1e-6) and got.b == pytest.approx(true.b, rel=1e-6)
    assert est.lambda_max == pytest.approx(1.0, rel=1e-10)
    assert torch.allclose(est.eigenvalues, torch.from_numpy(eigs[:4].copy()), rtol=1e-8)
    assert est.num_hvps == est.density.num_hvps + est.lanczos.num_hvps
    assert est.seconds > 0
    plan = plan_from_estimate(est, lambda_max_margin=1.1)
    assert plan.groups[0].b == pytest.approx(1.1, rel=1e-10)  # top widened by the margin
    assert plan.num_groups == 3


def test_estimate_curvature_from_ritz_values_only_and_bad_input():
    eigs = _spectrum()
    H, _ = _quadratic(eigs)
    est = estimate_curvature(H, num_eigs=eigs.size, density_probes=0, max_groups=None)
    assert est.density is None
    assert len(est.groups) == 3
    with pytest.raises(ValueError, match="num_eigs and density_probes"):
        estimate_curvature(H, num_eigs=0, density_probes=0)
    with pytest.raises(ValueError, match="num_eigs"):
        estimate_curvature(H, num_eigs=-1)
    with pytest.raises(ValueError, match="density_order"):
        estimate_curvature(H, density_order=0)
    with pytest.raises(ValueError, match="no positive curvature"):
        estimate_curvature(-H, num_eigs=2, density_probes=1, density_order=eigs.size)


# ---------------------------------------------------------------------------------------------------------
# Lanczos warm start


def test_lanczos_warm_start_from_nearby_ritz_vectors_needs_fewer_products():
    n = 400
    rng = np.random.default_rng(3)
    eigs = np.concatenate([np.linspace(10, 5, 8), rng.uniform(0, 1, n - 8)])
    H, _ = _quadratic(eigs, seed=1)
    cold = lanczos(H, 8, block_size=4, tol=1e-8, seed=0)
    gen = torch.Generator().manual_seed(5)
    E = torch.randn(n, n, generator=gen, dtype=torch.float64)
    H2 = H + 1e-3 * (E + E.T) / math.sqrt(n)  # a nearby operator (e.g. after some training steps)
    truth = torch.linalg.eigvalsh(H2).flip(0)[:8]
    cold2 = lanczos(H2, 8, block_size=4, tol=1e-8, seed=1)
    warm2 = lanczos(H2, 8, block_size=4, tol=1e-8, seed=1, start=cold.eigenvectors)
    # Both converge to the same eigenvalues (relative 1e-8 is the stopping tolerance on residuals; the
    # eigenvalue error is of the order of the squared residual, far below it).
    assert torch.allclose(warm2.eigenvalues, truth, rtol=1e-8)
    assert torch.allclose(cold2.eigenvalues, truth, rtol=1e-8)
    assert warm2.all_converged
    assert warm2.num_hvps < cold2.num_hvps


def test_lanczos_start_validation_and_short_start():
    H, _ = _quadratic(_spectrum())
    n = H.shape[0]
    res = lanczos(H, 3, block_size=4, start=torch.ones(n, dtype=torch.float64), tol=1e-10)
    assert torch.allclose(res.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:3], rtol=1e-8)
    with pytest.raises(ValueError, match="start must have shape"):
        lanczos(H, 3, start=torch.ones(2, n + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        lanczos(H, 3, start=torch.full((2, n), float("nan"), dtype=torch.float64))
    with pytest.raises(TypeError, match="start must be a tensor"):
        lanczos(H, 3, start=[1.0] * n)


# ---------------------------------------------------------------------------------------------------------
# AutoMrGD


def _run(opt, closure, w, w_star, tol=1e-6, max_iter=20000):
    e0 = float(torch.linalg.vector_norm(w.detach() - w_star))
    for k in range(max_iter):
        if float(torch.linalg.vector_norm(w.detach() - w_star)) <= tol * e0:
            return k
        opt.step(closure)
    return None


def test_auto_temporal_on_a_multiscale_quadratic_reaches_its_prediction():
    eigs = _spectrum()
    w, w_star, H, op, closure_for = _problem(eigs)
    opt = AutoMrGD([w], op, mode="temporal", density_order=eigs.size, max_groups=None, rate_rule="optimal",
                   refresh_every=10**6)
    assert opt.plan.num_groups == 3
    assert opt.events[0]["kind"] == "estimate" and opt.estimation_hvps > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a back-off here would be a bug
        iters = _run(opt, closure_for(opt), w, w_star)
    assert iters is not None
    predicted = opt.plan.predicted_iterations(1e-6)
    # The prediction bounds the worst case over starts (DESIGN 1.3); a given start needs at most that, and
    # the plan's own rounding of counts keeps it within the same cycle count.
    assert iters <= predicted
    gd_iters = math.ceil(math.log(1e-6) / math.log(1 - eigs.min() / eigs.max()))
    assert iters * 100 < gd_iters  # condition number 2e4: GD needs ~3e5 steps


def test_auto_subspace_gives_the_stiff_groups_their_own_rate():
    eigs = _spectrum()
    w, w_star, H, op, closure_for = _problem(eigs)
    # The basis holds the top two groups (10 vectors); the rest (smallest group) takes the large base rate.
    opt = AutoMrGD([w], op, mode="subspace", num_eigs=10, block_size=2, density_order=eigs.size, max_groups=None,
                   rate_rule="optimal", refresh_every=10**6)
    assert opt.subspace_enabled
    sub = opt.state["multirate_subspace"]
    assert sub["basis"].shape == (10, eigs.size) and sub["basis"].dtype == torch.float64
    iters = _run(opt, closure_for(opt), w, w_star)
    # Each group contracts by (kappa-1)/(kappa+1) per step with kappa <= 2.2 (widened top: 1.1/0.5; the
    # complement [5e-5, 1e-4]: 2): ln(1e-6)/ln(1.2/3.2) ~ 14 steps; allow for the Ritz basis being accurate
    # only to the Lanczos tolerance.
    assert iters is not None and iters <= 40


def test_auto_subspace_with_a_bfloat16_basis_caps_its_rates_by_the_measured_rounding():
    # Groups 1e4 apart: the uncapped base rate (~1e4) times lambda_max times the bfloat16 rounding (~2e-3)
    # is ~20, far past stability (NOTE: [basis rounding]); capped, the step converges without a back-off.
    eigs = _spectrum()
    w, w_star, H, op, closure_for = _problem(eigs)
    opt = AutoMrGD([w], op, mode="subspace", num_eigs=10, block_size=2, density_order=eigs.size, max_groups=None,
                   rate_rule="optimal", refresh_every=10**6, basis_dtype=torch.bfloat16)
    sub = opt.state["multirate_subspace"]
    assert sub["basis"].dtype == torch.bfloat16
    eps = opt.basis_rounding_error
    assert 1e-4 < eps < 1e-2
    # The measured error is what rounding to bfloat16 does to the float64 Ritz vectors.
    U = opt.estimate.eigenvectors
    assert eps == pytest.approx(float((U.to(torch.bfloat16).double() - U).norm(dim=1).max()), rel=1e-12)
    lam_top = 1.1 * float(opt.estimate.lambda_max)
    cap = mrgd_ext.optim.auto.BASIS_ROUNDING_MARGIN / (lam_top * eps)
    assert sub["base_lr"] <= cap * (1 + 1e-9)
    assert float(sub["column_rates"].max()) <= cap * (1 + 1e-9)
    iters = _run(opt, closure_for(opt), w, w_star, max_iter=2500)
    assert iters is not None
    assert all(e["kind"] == "estimate" for e in opt.events)
    # The same problem with a float64 basis has no rounding and keeps the full rate ratio.
    w2, w_star2, _, op2, closure_for2 = _problem(eigs)
    opt64 = AutoMrGD([w2], op2, mode="subspace", num_eigs=10, block_size=2, density_order=eigs.size,
                     max_groups=None, rate_rule="optimal", refresh_every=10**6)
    assert opt64.basis_rounding_error == 0.0
    assert opt64.state["multirate_subspace"]["base_lr"] > 10 * cap


def test_auto_refreshes_on_schedule_with_warm_start():
    eigs = _spectrum()
    w, w_star, H, op, closure_for = _problem(eigs)
    opt = AutoMrGD([w], op, mode="subspace", num_eigs=4, density_order=eigs.size, refresh_every=5, check_every=5,
                   subspace_rates="group")
    closure = closure_for(opt)
    for _ in range(21):
        opt.step(closure)
    # A refresh that finds the same groups (a fixed quadratic) doubles the interval: 5, then 10, then 20.
    assert [e["step"] for e in opt.events] == [0, 5, 15]
    assert all(e["kind"] == "estimate" for e in opt.events)
    assert opt.estimation_hvps == sum(e["num_hvps"] for e in opt.events)
    # The spectrum's top did not move, so the refreshes reuse the start's SLQ density.
    assert [e["density_reused"] for e in opt.events] == [False, True, True]
    assert opt.state["multirate_auto"]["interval"] == 20


def test_auto_temporal_refreshes_only_at_cycle_starts():
    eigs = _spectrum()
    w, w_star, H, op, closure_for = _problem(eigs)
    opt = AutoMrGD([w], op, mode="temporal", density_order=eigs.size, max_groups=None, refresh_every=1,
                   max_refresh_interval=1, max_cycle_length=10**4)
    length = opt.plan.cycle_length
    closure = closure_for(opt)
    for _ in range(2 * length + 1):
        opt.step(closure)
    # refresh_every=1 asks for a measurement after every step, but a cycle is never cut short: the cycle
    # polynomial damps what the large steps amplify only when it completes. (Same quadratic, same plan.)
    assert [e["step"] for e in opt.events] == [0, length, 2 * length]
    assert opt.plan.cycle_length == length


def test_auto_backs_off_instead_of_diverging():
    eigs = _spectrum()
    w, w_star, H, op, closure_for = _problem(eigs)
    opt = AutoMrGD([w], op, mode="temporal", density_order=eigs.size, max_groups=None, lr_scale=40.0,
                   refresh_every=10**6)
    closure = closure_for(opt)
    loss0 = float(closure().detach())
    with pytest.warns(RuntimeWarning, match="lr_scale now"):
        for _ in range(400):
            opt.step(closure)
    assert any(e["kind"] == "backoff" for e in opt.events)
    # Rolled back to the start, where the curvature was measured: the back-off keeps that estimate.
    first = next(e for e in opt.events if e["kind"] == "backoff")
    assert first["num_hvps"] == 0
    assert opt.param_groups[0]["lr_scale"] < 40.0
    assert torch.isfinite(w).all()
    assert float(closure().detach()) < loss0


def test_auto_degrades_to_the_safe_rate_after_too_many_backoffs():
    # A real divergence (every rate 1e4 times too large) is rolled back and, once max_backoffs is spent, the
    # optimizer runs the safe schedule 1 / (margin * lambda_max) instead of raising; on a quadratic that rate
    # decreases the loss at every step.
    eigs = _spectrum()
    w, w_star, H, op, closure_for = _problem(eigs)
    opt = AutoMrGD([w], op, mode="temporal", density_order=eigs.size, lr_scale=1e4, max_backoffs=0, refresh_every=10**6)
    closure = closure_for(opt)
    loss0 = float(closure().detach())
    with pytest.warns(RuntimeWarning, match="safe rate"):
        losses = [float(opt.step(closure).detach()) for _ in range(60)]
    assert opt._safe_plan
    lam_max = float(eigs.max())
    assert opt.param_groups[0]["cycle"] == pytest.approx((1.0 / (opt.lambda_max_margin * opt.estimate.lambda_max),))
    assert opt.estimate.lambda_max == pytest.approx(lam_max, rel=1e-2)  # Lanczos tolerance 1e-2
    after = losses[-20:]
    assert all(b <= a for a, b in zip(after, after[1:]))  # monotone at the safe rate
    assert math.isfinite(after[-1]) and after[-1] < loss0


def test_auto_raises_only_for_a_broken_closure():
    # A closure whose loss rises at every evaluation whatever the parameters: no rate helps, so after the
    # safe rate has been halved down to 2**-40 of itself the optimizer says the closure is broken.
    eigs = _spectrum()
    w, w_star, H, op, closure_for = _problem(eigs)
    opt = AutoMrGD([w], op, mode="temporal", density_order=eigs.size, max_backoffs=0, refresh_every=10**6,
                   check_every=1)
    count = [0]

    def broken():
        opt.zero_grad()
        (0.5 * (w - w_star) @ (H @ (w - w_star))).backward()
        count[0] += 1
        return torch.tensor(1.1 ** count[0])  # rises by 10% per call, beyond loss_slack 5%

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(RuntimeError, match="closure"):
            for _ in range(400):
                opt.step(broken)
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("returned", [None, "0.5", torch.ones(2), True], ids=["none", "str", "vector", "bool"])
def test_auto_closure_must_return_a_scalar_loss(returned):
    eigs = _spectrum()
    w, w_star, H, op, closure_for = _problem(eigs)
    opt = AutoMrGD([w], op, mode="temporal", density_order=eigs.size)
    good = closure_for(opt)

    def bad():
        good()  # computes the gradients, then returns what it should not
        return returned

    opt.step(good)  # measured and planned: the next step only walks the cycle
    before = w.detach().clone()
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.param_groups[0].items()
             if k != "params"}
    with pytest.raises(TypeError, match="the closure must return a scalar loss tensor or float, got"):
        opt.step(bad)
    assert torch.equal(w.detach(), before)
    for k, v in state.items():
        now = opt.param_groups[0][k]
        assert (torch.equal(now, v) if isinstance(v, torch.Tensor) else now == v), k


def test_auto_bad_input():
    eigs = _spectrum()
    w, w_star, H, op, closure_for = _problem(eigs)
    other = torch.zeros_like(w, requires_grad=True)
    with pytest.raises(ValueError, match="hessian must be built over exactly"):
        AutoMrGD([other], op)
    with pytest.raises(ValueError, match="mode"):
        AutoMrGD([w], op, mode="spatial")
    with pytest.raises(ValueError, match="num_eigs >= 1"):
        AutoMrGD([w], op, mode="subspace", num_eigs=0)
    with pytest.raises(ValueError, match="backoff"):
        AutoMrGD([w], op, mode="temporal", backoff=1.0)
    with pytest.raises(ValueError, match="refresh_every"):
        AutoMrGD([w], op, mode="temporal", refresh_every=0)
    with pytest.raises(ValueError, match="rate_rule"):
        AutoMrGD([w], op, mode="temporal", rate_rule="fast")
    with pytest.raises(ValueError, match="lambda_max_margin"):
        AutoMrGD([w], op, mode="temporal", lambda_max_margin=0.5)
    with pytest.raises(TypeError, match="hessian must be a HessianOperator"):
        AutoMrGD([w], H)
    with pytest.raises(TypeError, match="single tensor"):
        AutoMrGD(w, op)
    opt = AutoMrGD([w], op, mode="temporal", density_order=eigs.size)
    before = w.detach().clone()
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    assert torch.equal(w.detach(), before)


def _small_classifier(samples: int, seed: int):
    """Two-scale inputs (features 5-8 are 10x smaller but decide the label as much), a tanh MLP 8-16-2."""
    torch.manual_seed(seed)
    x = torch.randn(samples, 8) * torch.tensor([1.0] * 4 + [0.1] * 4)
    y = (x[:, :4].sum(1) + 10 * x[:, 4:].sum(1) > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    return x, y, model, torch.nn.CrossEntropyLoss(), list(model.parameters())


def test_auto_trains_a_small_network_with_a_fixed_probe_batch():
    x, y, model, loss_fn, params = _small_classifier(256, seed=0)
    op = HessianOperator(model, loss_fn, (x[:128], y[:128]), params=params)
    opt = AutoMrGD(params, op, mode="temporal", refresh_every=40, num_eigs=4, density_order=12)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    loss0 = float(closure().detach())
    for _ in range(100):
        loss = opt.step(closure)
    assert math.isfinite(float(loss))
    assert float(closure().detach()) < 0.7 * loss0
    assert all(e["kind"] == "estimate" for e in opt.events)


def test_auto_trains_with_minibatch_gradients_and_a_fixed_check_batch():
    # NOTE: [gradient noise]: the closure steps on a fresh minibatch but returns the loss of a fixed batch,
    # so the safety checks compare like with like while the gradients are noisy.
    x, y, model, loss_fn, params = _small_classifier(512, seed=1)
    check_x, check_y = x[:256], y[:256]
    op = HessianOperator(model, loss_fn, (check_x, check_y), params=params)
    opt = AutoMrGD(params, op, mode="temporal", refresh_every=50, num_eigs=4, density_order=12)
    gen = torch.Generator().manual_seed(0)

    def closure():
        idx = torch.randint(0, x.shape[0], (32,), generator=gen)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        with torch.no_grad():
            return loss_fn(model(check_x), check_y)

    loss0 = float(closure())
    for _ in range(150):
        opt.step(closure)
    final = float(closure())
    assert math.isfinite(final) and final < 0.7 * loss0
    assert opt.events[0]["kind"] == "estimate"


def test_public_names():
    for name in ("AutoMrGD", "estimate_curvature", "plan_from_estimate", "CurvatureEstimate"):
        assert hasattr(mrgd_ext, name)


def _resume_matches(kwargs: dict, stop_after: Callable[[AutoMrGD], int], steps_after: int) -> dict:
    """Run, save a (deep-copied) state, run on; then restore parameters and state into a new optimizer and run
    the same steps: the parameters must match bit for bit. Returns the resumed optimizer's state right after
    loading, for the caller's checks."""
    eigs = _spectrum()
    w, _w_star, _H, op, closure_for = _problem(eigs)
    opt = AutoMrGD([w], op, **kwargs)
    closure = closure_for(opt)
    for _ in range(stop_after(opt)):
        opt.step(closure)
    state = copy.deepcopy(opt.state_dict())  # as with torch.optim: state_dict() shares the live state
    saved = w.detach().clone()
    for _ in range(steps_after):
        opt.step(closure)
    expected = w.detach().clone()
    with torch.no_grad():
        w.copy_(saved)
    resumed = AutoMrGD([w], op, **kwargs)
    resumed.load_state_dict(state)
    loaded = copy.deepcopy(resumed.state_dict())
    closure2 = closure_for(resumed)
    for _ in range(steps_after):
        resumed.step(closure2)
    assert torch.equal(w.detach(), expected)
    return loaded


def test_auto_state_dict_resumes_the_same_trajectory():
    kwargs = {"mode": "temporal", "density_order": _spectrum().size, "max_groups": None, "refresh_every": 10**6}
    loaded = _resume_matches(kwargs, lambda opt: opt.plan.cycle_length + 7, 25)  # stop mid-cycle
    assert loaded["param_groups"][0]["cycle_position"] == 7


def _auto_after_steps(steps=12, **kwargs):
    eigs = _spectrum()
    w, _w_star, _H, op, closure_for = _problem(eigs)
    opt = AutoMrGD([w], op, refresh_every=4, check_every=4, **kwargs)
    closure = closure_for(opt)
    for _ in range(steps):
        opt.step(closure)
    return w, op, opt, closure_for


def test_auto_subspace_state_dict_resumes_the_same_trajectory_and_decisions():
    # Subspace mode with refreshes and check points every 4 steps, stopped mid-interval (step 10). The state
    # round trip is exact; the resumed optimizer's next measurements warm-start from its own constructor's
    # estimate (not saved), so they agree with the uninterrupted ones to the Lanczos tolerance (1e-9 relative
    # in float64), and the parameters to about that (measured: 6e-15 after 14 more steps and one refresh).
    w, op, opt, closure_for = _auto_after_steps(10)
    state = opt.state_dict()
    assert set(state["param_groups"][0]["auto"]) >= {"step", "measurements", "groups", "safe_plan"}
    assert "rollback_point" in state["state"][0] and "subspace_basis" in state["state"][0]
    saved, done = w.detach().clone(), len(opt.events)
    closure = closure_for(opt)
    for _ in range(14):
        opt.step(closure)
    expected = w.detach().clone()

    with torch.no_grad():
        w.zero_()  # the constructor measures somewhere else: the state must replace all of it
    resumed = AutoMrGD([w], op, refresh_every=4, check_every=4)
    with torch.no_grad():
        w.copy_(saved)
    resumed.load_state_dict(state)
    assert resumed.state["multirate_auto"]["step"] == 10
    assert resumed._snapshot is not None and torch.equal(resumed._snapshot[0], state["state"][0]["rollback_point"])
    closure = closure_for(resumed)
    for _ in range(14):
        resumed.step(closure)
    decisions = [(e["step"], e["reason"]) for e in opt.events[done:]]
    assert [(e["step"], e["reason"]) for e in resumed.events[1:]] == decisions and decisions
    torch.testing.assert_close(w.detach(), expected, rtol=1e-8, atol=1e-10)


def test_auto_state_dict_carries_the_complement_warm_start():
    # With fewer Ritz pairs than parameters the complement's top is measured by a Lanczos run that stops at 1e-2;
    # its start vector travels per parameter, so a resumed run's next complement run starts where the
    # uninterrupted one's would.
    w, op, opt, _ = _auto_after_steps(6, num_eigs=4)
    state = opt.state_dict()
    assert opt._complement_vector is not None
    assert torch.equal(state["state"][0]["complement_vector"], opt._complement_vector[0])
    resumed = AutoMrGD([w], op, refresh_every=4, check_every=4, num_eigs=4, seed=1)
    assert not torch.equal(resumed._complement_vector, opt._complement_vector)  # its own construction run
    resumed.load_state_dict(state)
    assert torch.equal(resumed._complement_vector, opt._complement_vector)


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd["state"][0].update(complement_vector=torch.zeros(3)),
     r"\['complement_vector'\] must be a floating-point tensor of shape \(18,\)"),
    (lambda sd: sd["state"][0].update(complement_vector=torch.full_like(sd["state"][0]["complement_vector"], math.nan)),
     r"\['complement_vector'\] has non-finite"),
    (lambda sd: sd["state"][0].update(complement_vector=sd["state"][0]["complement_vector"].long()),
     r"must be a floating-point tensor"),
])
def test_auto_load_state_dict_rejects_a_bad_complement_warm_start(edit, match):
    _w, _op, opt, _ = _auto_after_steps(6, num_eigs=4)
    assert "complement_vector" in opt.state_dict()["state"][0]
    _assert_load_rejected(opt, edit, ValueError, match)


def _assert_load_rejected(opt, edit, exc, match):
    """Load an edited copy of ``opt``'s state: it raises ``exc`` matching ``match`` and changes nothing (the
    decision state and every per-parameter entry compare equal before and after)."""
    import copy

    sd = copy.deepcopy(opt.state_dict())
    edit(sd)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(exc, match=match):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert before["param_groups"][0]["auto"] == after["param_groups"][0]["auto"]
    assert before["state"][0].keys() == after["state"][0].keys()
    for field, value in before["state"][0].items():
        same = torch.equal(value, after["state"][0][field]) if isinstance(value, torch.Tensor) else \
            value == after["state"][0][field]
        assert same, field


@pytest.mark.parametrize("edit,exc,match", [
    (lambda sd: sd["param_groups"][0]["auto"].update(step=-1), ValueError, r"\['auto'\]\['step'\] must be >= 0"),
    (lambda sd: sd["param_groups"][0]["auto"].pop("interval"), KeyError, r"\['auto'\] has no 'interval'"),
    (lambda sd: sd["param_groups"][0]["auto"].pop("measurements"), KeyError, r"has no 'measurements'"),
    (lambda sd: sd["param_groups"][0]["auto"].update(rate_rule="fast"), ValueError, r"rate_rule"),
    (lambda sd: sd["param_groups"][0]["auto"].update(groups=[[1.0]]), TypeError, r"\['groups'\] must be a list"),
    (lambda sd: sd["param_groups"][0]["auto"].update(remeasure=1), TypeError, r"\['remeasure'\] must be a bool"),
    (lambda sd: sd["state"][0].update(rollback_point=torch.zeros(3)), ValueError, r"\['rollback_point'\] must be"),
    (lambda sd: sd["state"][0].update(subspace_basis=torch.ones_like(sd["state"][0]["subspace_basis"])), ValueError,
     r"rows are not orthonormal"),
    (lambda sd: sd["param_groups"][0].pop("auto"), KeyError, r"has no AutoMrGD state"),
])
def test_auto_load_state_dict_rejects_bad_state(edit, exc, match):
    _w, _op, opt, _ = _auto_after_steps(6)
    assert {"subspace_basis", "rollback_point"} <= set(opt.state_dict()["state"][0])
    _assert_load_rejected(opt, edit, exc, match)


def test_auto_load_state_dict_accepts_the_in_memory_form():
    # State dicts written before the param-group form kept the decision state under state["multirate_auto"].
    _w, _op, opt, _ = _auto_after_steps(6, mode="temporal")
    sd = opt.state_dict()
    auto = sd["param_groups"][0].pop("auto")
    sd["state"]["multirate_auto"] = {k: auto[k] for k in ("step", "last_estimate", "since_check", "ref_loss",
                                                          "best_loss", "backoffs", "interval", "remeasure",
                                                          "normal_lr_scale")}
    opt.load_state_dict(sd)
    assert opt.state["multirate_auto"]["step"] == 6 and opt.state["multirate_auto"]["safe_entries"] == 0


def test_auto_subspace_measures_the_curvature_left_outside_the_basis():
    # Eight stiff eigenvalues (the basis), four just below them that no 10x gap separates from the Ritz
    # values (12, 8, 4, 2), and a bulk at [0.02, 0.14]: the base rate must respect 12, not jump to the bulk.
    lam = torch.cat([torch.linspace(64, 16, 8), torch.tensor([12.0, 8.0, 4.0, 2.0]),
                     torch.linspace(0.14, 0.02, 488)]).double()
    th = torch.ones(lam.numel(), dtype=torch.float64, requires_grad=True)
    op = HessianOperator.from_closure(lambda p: 0.5 * (lam * p[0] ** 2).sum(), [th])
    opt = AutoMrGD([th], op, mode="subspace", num_eigs=8)
    _, _, base = opt._subspace_arguments(opt.estimate)
    assert base * 12.0 < 1.0  # safe rule: 1 / (top of the rest, with margin) <= 1/12
    assert base * 12.0 > 0.5  # ... and not needlessly small: the measured top is 12, margin 1.1
    assert opt.events[0]["num_hvps"] > opt.estimate.num_hvps  # the deflated run is counted

    def closure():
        opt.zero_grad()
        loss = 0.5 * (lam * th**2).sum()
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no back-off: the rates are right
        for _ in range(100):
            opt.step(closure)
    # The basis and the four middle eigenvalues are resolved within 100 steps; what remains is the bulk
    # (initial loss ~19 of 193, condition 12/0.02 at the safe base rate), so the loss drops below 5%.
    assert float(closure().detach()) < 0.05 * float(0.5 * lam.sum())


def test_auto_temporal_cycles_fit_the_refresh_interval():
    eigs = _spectrum()
    w, _w_star, _H, op, closure_for = _problem(eigs)
    opt = AutoMrGD([w], op, mode="temporal", density_order=eigs.size, max_groups=None, refresh_every=30,
                   rate_rule="optimal")
    assert opt.plan.cycle_length <= 30
    unlimited = AutoMrGD([w], op, mode="temporal", density_order=eigs.size, max_groups=None, refresh_every=10**6,
                         rate_rule="optimal")
    assert unlimited.plan.cycle_length > 30  # the cap changed the plan, it did not just happen to hold
    with pytest.raises(ValueError, match="max_cycle_length"):
        AutoMrGD([w], op, mode="temporal", max_cycle_length=0)


def test_auto_check_points_compare_with_the_lowest_loss_so_far():
    # A loss that rises by less than loss_slack per check interval passes a comparison with the previous
    # check point forever; against the lowest check-point loss it is caught once it has risen by loss_slack.
    eigs = _spectrum()
    w, w_star, H, op, closure_for = _problem(eigs)
    opt = AutoMrGD([w], op, mode="subspace", num_eigs=10, block_size=2, density_order=eigs.size, max_groups=None,
                   check_every=1, loss_slack=0.05, refresh_every=10**6, max_backoffs=0, stochastic=False)
    losses = iter([1.0, 1.03, 1.06, 0.9])

    def creeping():  # true gradients, a scripted loss
        opt.zero_grad()
        (0.5 * (w - w_star) @ (H @ (w - w_star))).backward()
        return torch.tensor(next(losses))

    opt.step(creeping)
    opt.step(creeping)  # 1.03 <= 1.0 * 1.05: fine
    with pytest.warns(RuntimeWarning, match="lowest check-point loss 1"):
        opt.step(creeping)  # 1.06 > 1.0 * 1.05, though only 2.9% above the previous check point
    assert opt.events[-1]["kind"] == "backoff"
    # The closure re-evaluated at the restored point.
    assert opt.state["multirate_auto"]["best_loss"] == pytest.approx(0.9)


# ---------------------------------------------------------------------------------------------------------
# Cheap estimation, the cycle-aware guard and the default floor


def test_history_ritz_matches_the_extreme_eigenvalues_of_a_quadratic():
    # Steps and gradient changes of plain GD on a quadratic: y_k = H s_k exactly, and the steps span the
    # Krylov space of the first gradient, so the Ritz values converge to the extreme eigenvalues as for
    # Lanczos (the same space). 30 steps on 18 dimensions span the whole space up to the Gram cut-off.
    from mrgd_ext.curvature import history_ritz

    eigs = _spectrum()
    H, w_star = _quadratic(eigs)
    x = torch.zeros(eigs.size, dtype=torch.float64)
    lr = 1.0 / float(eigs.max())
    S, Y = [], []
    g = H @ (x - w_star)
    for _ in range(12):
        x_new = x - lr * g
        g_new = H @ (x_new - w_star)
        S.append(x_new - x)
        Y.append(g_new - g)
        x, g = x_new, g_new
    theta = history_ritz(torch.stack(S), torch.stack(Y))
    # The top Ritz value of a 12-dimensional Krylov space of a spectrum with a 50x gap below its top group:
    # Lanczos resolves it to ~1e-6 relative after a few steps; 1e-4 leaves room for the Gram cut-off.
    assert theta[0] == pytest.approx(float(eigs.max()), rel=1e-4)
    assert theta.min() >= float(eigs.min()) * (1 - 1e-6) and theta.max() <= float(eigs.max()) * (1 + 1e-9)
    # Ritz values of a subspace interlace with the spectrum: every one lies inside [lambda_min, lambda_max].
    with pytest.raises(ValueError, match="same shape"):
        history_ritz(torch.zeros(3, 4), torch.zeros(3, 5))


def test_default_floor_keeps_a_small_group_of_a_float64_problem():
    # Raw diabetes least squares has its smallest eigenvalue 2e-8 below lambda_max; the old fixed floor 1e-6
    # dropped it, so no rate ever reached it. The default floor (10 eps of float64) keeps it.
    from mrgd_ext.curvature import default_floor

    eigs = np.array([1.0, 0.8, 0.5, 3e-4, 1e-4, 2e-8])
    H, _ = _quadratic(eigs)
    est = estimate_curvature(H, num_eigs=6, block_size=2, density_probes=0, lanczos_tol=1e-10)
    assert est.groups[-1].a == pytest.approx(2e-8, rel=1e-3)
    assert default_floor(torch.float64) < 1e-14 and default_floor(torch.float32) == pytest.approx(1.19e-6, rel=1e-2)


def test_cycle_aware_guard_accepts_a_transient_rise_within_the_predicted_bound():
    # Inside a temporal cycle the loss may rise by what the plan predicts (its peak amplification); only the
    # cycle end is compared with the lowest check-point loss.
    eigs = _spectrum()
    w, w_star, H, op, closure_for = _problem(eigs)
    opt = AutoMrGD([w], op, mode="temporal", density_order=eigs.size, max_groups=None, refresh_every=10**6,
                   gradient_history=False, stochastic=False)  # scripted losses of one deterministic closure
    length = opt.plan.cycle_length
    assert length >= 3 and opt._growth_bound > 4.0
    script = [1.0] + [min(4.0, opt._growth_bound / 2)] * (length - 1) + [0.5]

    def scripted():
        opt.zero_grad()
        (0.5 * (w - w_star) @ (H @ (w - w_star))).backward()
        return torch.tensor(script.pop(0))

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(length + 1):
            opt.step(scripted)
    assert [e["kind"] for e in opt.events] == ["estimate"]


def test_cycle_aware_guard_rolls_back_a_rise_at_the_cycle_end():
    eigs = _spectrum()
    w, w_star, H, op, closure_for = _problem(eigs)
    opt = AutoMrGD([w], op, mode="temporal", density_order=eigs.size, max_groups=None, refresh_every=10**6,
                   gradient_history=False, stochastic=False)  # scripted losses of one deterministic closure
    length = opt.plan.cycle_length
    start = w.detach().clone()
    script = [1.0] + [2.0] * (length - 1) + [1.2, 0.9]

    def scripted():
        opt.zero_grad()
        (0.5 * (w - w_star) @ (H @ (w - w_star))).backward()
        return torch.tensor(script.pop(0))

    with pytest.warns(RuntimeWarning, match="rose from 1 to 1.2"):
        for _ in range(length + 1):
            opt.step(scripted)
    assert opt.events[-1]["kind"] == "backoff"
    # Rolled back to the cycle start and then one step (at the backed-off rates) taken from there.
    assert not torch.equal(w.detach(), start)
    assert opt.param_groups[0]["lr_scale"] == 0.5


def test_gradient_history_triggers_a_remeasurement_when_the_curvature_outgrows_the_plan():
    # The probe underestimates the curvature 4x (it measures H / 4): the secant curvature of the small
    # steps exceeds the planned lambda_max and asks for an early re-measurement, at zero HVPs.
    eigs = _spectrum()
    H, w_star = _quadratic(eigs)
    w = torch.zeros(eigs.size, dtype=torch.float64, requires_grad=True)
    op = HessianOperator.from_closure(lambda pl: 0.125 * (pl[0] - w_star) @ (H @ (pl[0] - w_star)), [w])
    opt = AutoMrGD([w], op, mode="temporal", density_order=eigs.size, max_groups=None, refresh_every=10**6,
                   lr_scale=0.2)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (w - w_star) @ (H @ (w - w_star))
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(3 * opt.plan.cycle_length):
            opt.step(closure)
    assert any(e["reason"] == "refresh" and e["step"] > 0 for e in opt.events)


def test_gradient_history_curvature_is_bounded_by_lambda_max_on_a_quadratic():
    eigs = _spectrum()
    w, w_star, H, op, closure_for = _problem(eigs)
    opt = AutoMrGD([w], op, mode="temporal", density_order=eigs.size, max_groups=None, refresh_every=10**6)
    closure = closure_for(opt)
    for _ in range(opt.plan.cycle_length):
        opt.step(closure)
    # Secant = exact Rayleigh quotient on a quadratic: inside [lambda_min, lambda_max] (rounding: 1e-9).
    assert 0.0 < opt.history_max_curvature <= float(eigs.max()) * (1 + 1e-9)
    assert [e["kind"] for e in opt.events] == ["estimate"]


def test_hvp_budget_on_a_quadratic():
    # Counted, not timed: 600 steps on a 3-group quadratic of n = 120 with the defaults cost the start's
    # estimate (2 SLQ probes x 40 + Lanczos for 8 pairs at tolerance 1e-2 + 0 for the complement) and a few
    # refreshes whose density is reused and whose Lanczos is warm-started.
    eigs = _spectrum(n_per_group=(10, 30, 80))
    w, w_star, H, op, closure_for = _problem(eigs)
    opt = AutoMrGD([w], op, mode="temporal", refresh_every=100)
    closure = closure_for(opt)
    start_hvps = opt.events[0]["num_hvps"]
    for _ in range(600):
        opt.step(closure)
    refreshes = [e for e in opt.events if e["kind"] == "estimate" and e["step"] > 0]
    assert all(e["density_reused"] for e in refreshes)
    assert all(e["num_hvps"] < 0.5 * start_hvps for e in refreshes)
    # Intervals 100, 200, 400 -> at most 3 refreshes in 600 steps (fewer if cycles end later).
    assert len(refreshes) <= 3
    assert opt.estimation_hvps <= start_hvps + 3 * 0.5 * start_hvps
    assert start_hvps <= 2 * 40 + 60


# ---------------------------------------------------------------------------------------------------------
# Small versions of the training suite's problems (raw features): defaults never raise, never diverge


def _suite_problem(name: str):
    sk = pytest.importorskip("sklearn.datasets")
    torch.manual_seed(0)
    if name == "logreg_cancer":
        x, y = sk.load_breast_cancer(return_X_y=True)
        x, y = torch.tensor(x), torch.tensor(y, dtype=torch.float64)
        model = torch.nn.Linear(30, 1).double()

        def loss_fn(out, t):
            return torch.nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1), t)
    elif name == "ls_diabetes":
        x, y = sk.load_diabetes(return_X_y=True, scaled=False)
        x, y = torch.tensor(x), torch.tensor(y)
        model = torch.nn.Linear(10, 1).double()

        def loss_fn(out, t):
            return 0.5 * ((out.squeeze(-1) - t) ** 2).mean()
    else:  # mlp_wine, smaller than the suite's 13-64-64-3
        x, y = sk.load_wine(return_X_y=True)
        x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
        model = torch.nn.Sequential(torch.nn.Linear(13, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        loss_fn = torch.nn.functional.cross_entropy
    return model, loss_fn, x, y


@pytest.mark.parametrize("mode", ["temporal", "subspace"])
@pytest.mark.parametrize("name", ["logreg_cancer", "ls_diabetes", "mlp_wine"])
def test_defaults_never_raise_or_diverge_on_raw_suite_problems(name, mode):
    # Raw breast-cancer logistic regression used to raise RuntimeError in temporal mode (the cycle's large
    # step transient, then back-offs that could not recover); now a violation degrades to the safe rate.
    model, loss_fn, x, y = _suite_problem(name)
    params = list(model.parameters())
    op = HessianOperator(model, loss_fn, (x, y), params=params)
    opt = AutoMrGD(params, op, mode=mode)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    with torch.no_grad():
        loss0 = float(loss_fn(model(x), y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(120):
            opt.step(closure)
    with torch.no_grad():
        final = float(loss_fn(model(x), y))
    assert math.isfinite(final) and final < loss0


# ---------------------------------------------------------------------------------------------------------
# Subspace mode: the residual cap on the base rate and the accelerated step


def _preconditioned_top(opt, H: torch.Tensor) -> float:
    """Top eigenvalue of P^1/2 H P^1/2 for the optimizer's subspace step x -= P g (dense, float64)."""
    sub = opt.state["multirate_subspace"]
    U = sub["basis"].to(torch.float64)
    n = U.shape[1]
    scale = opt.param_groups[0]["lr_scale"] * float(opt.param_groups[0]["lr"])
    eye = torch.eye(n, dtype=torch.float64)
    P = scale * (U.T @ torch.diag(sub["column_rates"].to(torch.float64)) @ U + sub["base_lr"] * (eye - U.T @ U))
    evals, evecs = torch.linalg.eigh(0.5 * (P + P.T))
    root = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    return float(torch.linalg.eigvalsh(root @ H @ root).max())


def test_residual_cap_bounds_the_coupling_of_an_unconverged_basis():
    # A 2 x 2 Hessian whose "Ritz vector" e1 has residual 10 (H e1 - 100 e1 = (0, 10)): without the cap the base
    # rate 1 / (1.1 * 1) would put the preconditioned top at ~1.8; the cap keeps the coupling at 0.25.
    est = mrgd_ext.curvature.CurvatureEstimate(
        groups=[ScaleGroup(100.0, 100.0)], lambda_max=100.0, eigenvalues=torch.tensor([100.0], dtype=torch.float64),
        eigenvectors=torch.tensor([[1.0, 0.0]], dtype=torch.float64), residuals=torch.tensor([10.0]),
        density=None, num_hvps=0, seconds=0.0)
    rates = [1.0 / 110.0]
    base = AutoMrGD._residual_cap(est, [100.0], rates, 1.0 / 1.1)
    assert base == pytest.approx(0.25 ** 2 / (10.0 ** 2 / 110.0))
    H = torch.tensor([[100.0, 10.0], [10.0, 1.0]], dtype=torch.float64)
    P = torch.diag(torch.tensor([rates[0], base], dtype=torch.float64))
    top = float(torch.linalg.eigvalsh(P.sqrt() @ H @ P.sqrt()).max())
    assert top <= 1.0 / 1.1 + 0.25 + 1e-12
    # A converged pair (residual 0) leaves the base rate alone.
    est.residuals = torch.tensor([0.0])
    assert AutoMrGD._residual_cap(est, [100.0], rates, 1.0 / 1.1) == 1.0 / 1.1


@pytest.mark.parametrize("scale", [1.0, 1e-6, 1e-12])
def test_residual_cap_with_a_negative_ritz_value_is_positive_and_exact(scale):
    # A positive pair with a large residual and a Ritz value <= 0 with a small one: the cap solves
    # s_neg x^2 + s_pos x = 0.25^2. When s_pos^2 dwarfs 4 s_neg 0.25^2 the textbook root formula cancels to 0
    # (a base rate of 0, which the optimizer refuses); the cancellation-free form keeps x ~ 0.25^2 / s_pos.
    est = mrgd_ext.curvature.CurvatureEstimate(
        groups=[ScaleGroup(100.0, 100.0)], lambda_max=100.0,
        eigenvalues=torch.tensor([100.0, -1.0], dtype=torch.float64),
        eigenvectors=torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64),
        residuals=torch.tensor([1e4, 1e-6 * scale]), density=None, num_hvps=0, seconds=0.0)
    rates = [1.0 / 110.0, 1.0]
    base = AutoMrGD._residual_cap(est, [100.0, -1.0], rates, 1.0)
    s_pos, s_neg = (1e4) ** 2 / 110.0, (1e-6 * scale) ** 2
    assert base > 0.0
    assert s_neg * base**2 + s_pos * base == pytest.approx(0.25**2, rel=1e-12)


@pytest.mark.parametrize("lanczos_tol", [0.3, 1e-2, 1e-8])
def test_subspace_step_is_stable_whatever_the_lanczos_tolerance(lanczos_tol):
    # NOTE: [basis accuracy]: the preconditioned Hessian's top eigenvalue stays below 4/3 (the bound for
    # Nesterov momentum near 1) for a loose and a tight basis alike; a loose basis pays in base rate only.
    eigs = _spectrum()
    w, w_star, H, op, closure_for = _problem(eigs)
    opt = AutoMrGD([w], op, num_eigs=6, block_size=2, lanczos_tol=lanczos_tol, refresh_every=10**6)
    top = _preconditioned_top(opt, H)
    # 1/1.1 (diagonal blocks) + 0.25 (coupling) + the complement measurement's own error (tolerance 1e-2).
    assert top <= 1.0 / 1.1 + 0.25 + 0.02
    assert _run(opt, closure_for(opt), w, w_star, tol=1e-6, max_iter=5000) is not None


def test_accelerated_subspace_step_needs_fewer_steps_than_the_plain_one():
    # The basis takes the top group only; the complement keeps a condition number of 1e-2 / 5e-5 = 200. Plain
    # steps contract the complement by ~(1 - 1/200) per step; Nesterov's momentum by ~(1 - 1/sqrt(200)).
    eigs = _spectrum()
    counts = {}
    for acceleration in ("nesterov", None):
        w, w_star, H, op, closure_for = _problem(eigs)
        opt = AutoMrGD([w], op, num_eigs=4, block_size=2, refresh_every=10**6, acceleration=acceleration)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no back-off on a quadratic
            counts[acceleration] = _run(opt, closure_for(opt), w, w_star, tol=1e-6, max_iter=20000)
    assert counts["nesterov"] is not None and counts[None] is not None
    assert counts["nesterov"] * 4 < counts[None], counts


def test_accelerated_step_restarts_when_the_loss_rises():
    eigs = _spectrum()
    w, _w_star, _H, op, closure_for = _problem(eigs)
    opt = AutoMrGD([w], op, num_eigs=4, block_size=2, refresh_every=10**6)
    closure = closure_for(opt)
    for _ in range(5):
        opt.step(closure)
    auto = opt.state["multirate_auto"]
    assert auto["momentum_steps"] == 5 and float(opt.state[w]["momentum_buffer"].norm()) > 0
    closure()
    opt._accelerated_step(auto["previous_loss"] * 2.0)  # a rise: momentum restarts, this step is a plain one
    assert auto["momentum_steps"] == 1


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(("weight_decay", "maximize"), [(0.0, False), (0.3, False), (0.3, True)])
def test_accelerated_step_matches_the_closed_form(fused, weight_decay, maximize):
    # v <- mu v + P geff, x <- x - P geff - mu v with geff = +-g + wd x and
    # P geff = base geff + U^T ((scale rates - base) * (U geff)), checked against float64 torch arithmetic
    # (fused kernel and torch composition alike; NOTE: [momentum subspace update]).
    if fused and not mrgd_ext.ops.has_kernel("cpu"):
        pytest.skip("no CPU kernels in this build")
    eigs = _spectrum()
    w, w_star, H, op, _ = _problem(eigs)
    sign = -1.0 if maximize else 1.0
    # Declared stochastic: the constant momentum (a decay term or maximize would otherwise restart it, as the
    # closure's loss leaves the decay out).
    opt = AutoMrGD([w], op, num_eigs=4, refresh_every=10**6, weight_decay=weight_decay, maximize=maximize,
                   fused=fused, stochastic=True, max_loss_growth=1e30, loss_slack=1e30)

    def closure():
        opt.zero_grad()
        d = w - w_star
        loss = sign * 0.5 * d @ (H @ d)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    loss = closure()
    group, sub = opt.param_groups[0], opt.state["multirate_subspace"]
    buf, x = opt.state[w]["momentum_buffer"].clone(), w.detach().clone()
    mu = mrgd_ext.optim.auto.STOCHASTIC_MOMENTUM
    geff = sign * w.grad.detach() + weight_decay * x
    scale = group["lr_scale"] * group["lr"]
    base = scale * sub["base_lr"]
    U = sub["basis"].double()
    Pg = base * geff + U.T @ ((scale * sub["column_rates"].double() - base) * (U @ geff))
    opt._accelerated_step(float(loss))
    assert float(buf.norm()) > 0  # momentum is on
    expected_buf = mu * buf + Pg
    assert torch.allclose(opt.state[w]["momentum_buffer"], expected_buf, rtol=1e-10, atol=1e-12)
    assert torch.allclose(w.detach(), x - Pg - mu * expected_buf, rtol=1e-10, atol=1e-12)


def test_auto_subspace_state_dict_resumes_the_same_trajectory():
    # The momentum buffer travels with the per-parameter state, its counter with the AutoMrGD entry.
    loaded = _resume_matches({"num_eigs": 4, "block_size": 2, "refresh_every": 10**6}, lambda opt: 9, 15)
    assert loaded["param_groups"][0]["auto"]["momentum_steps"] == 9


def test_auto_acceleration_bad_input():
    eigs = _spectrum()
    w, _w_star, _H, op, _closure_for = _problem(eigs)
    before = w.detach().clone()
    with pytest.raises(ValueError, match="acceleration"):
        AutoMrGD([w], op, acceleration="heavy")
    assert torch.equal(w.detach(), before)


def test_secant_back_off_shrinks_by_the_curvature_along_the_rejected_step():
    # NOTE: [secant back-off]: on a quadratic, one step x0 -> x0 + d with slope s = g0^T d and losses f0, f1
    # gives the exact minimiser t* = -s / (2 (f1 - f0 - s)) = -g0^T d / d^T H d along d; a step 1e3 times too
    # large is cut to it in one back-off instead of ten halvings.
    eigs = _spectrum()
    w, w_star, H, op, closure_for = _problem(eigs)
    opt = AutoMrGD([w], op, mode="temporal", density_order=eigs.size, lr_scale=1e3, max_backoffs=5,
                   refresh_every=10**6)
    closure = closure_for(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step(closure)  # check point at the start, then the first (far too large) step
        x0 = opt._snapshot[0].clone()
        g0 = H @ (x0 - w_star)
        d = w.detach() - x0
        t_star = float(-(g0 @ d) / (d @ (H @ d)))
        opt.step(closure)  # the loss grew beyond the bound one step after the check point: back-off
    assert opt.events[-1]["kind"] == "backoff" and not opt._safe_plan
    assert 0 < t_star < opt.backoff
    assert opt.param_groups[0]["lr_scale"] == pytest.approx(1e3 * t_star, rel=1e-9)
    assert torch.equal(opt._snapshot[0], x0)  # rolled back to the check point


def _noisy_run(monkeypatch_noise_off: bool, steps: int = 400, stochastic: bool | None = False):
    eigs = _spectrum()
    w, w_star, H, op, _closure_for = _problem(eigs)
    opt = AutoMrGD([w], op, num_eigs=4, refresh_every=10**6, stochastic=stochastic)
    if monkeypatch_noise_off:
        opt._learn_loss_noise = lambda restored: None
    gen = torch.Generator().manual_seed(0)

    def closure():  # exact gradient, loss reported with a +-30% batch-to-batch spread (a minibatch loss)
        opt.zero_grad()
        d = w - w_star
        loss = 0.5 * d @ (H @ d)
        loss.backward()
        return loss.detach() * (1.0 + 0.3 * (2.0 * torch.rand((), generator=gen, dtype=torch.float64) - 1.0))

    e0 = float(torch.linalg.vector_norm(w.detach() - w_star))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(steps):
            opt.step(closure)
    return opt, float(torch.linalg.vector_norm(w.detach() - w_star)) / e0


def test_guard_learns_the_spread_of_a_noisy_loss():
    # NOTE: [loss noise]: a rollback re-evaluates the loss at the check point; the spread it sees widens the
    # check-point slack, so a minibatch-like loss does not shrink the rates to nothing and end in RuntimeError.
    opt, ratio = _noisy_run(False)
    assert opt.state["multirate_auto"].get("loss_noise", 0.0) > 0.05
    assert ratio < 0.5
    # Without learning the spread, the same run backs off until it declares the closure broken.
    with pytest.raises(RuntimeError, match="closure"):
        _noisy_run(True, steps=3000)


# ---------------------------------------------------------------------------------------------------------
# Stochastic closures (NOTE: [stochastic closure])


def _minibatch_problem(seed: int = 0, n_samples: int = 400, batch: int = 20):
    """Least squares on features with scales 1 / 0.1 / 0.01 (a multiscale Hessian): a closure per step on a fresh
    minibatch, as a training loop builds it. Returns (w, op over the full data, make_closure, full loss)."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1.0] * 4 + [0.1] * 4 + [0.01] * 4, dtype=torch.float64)
    X = torch.randn(n_samples, scales.numel(), generator=gen, dtype=torch.float64) * scales
    y = X @ torch.randn(scales.numel(), generator=gen, dtype=torch.float64) + 0.1 * torch.randn(
        n_samples, generator=gen, dtype=torch.float64)
    w = torch.zeros(scales.numel(), dtype=torch.float64, requires_grad=True)

    def loss_on(plist, idx=None):
        Xi, yi = (X, y) if idx is None else (X[idx], y[idx])
        return 0.5 * torch.mean((Xi @ plist[0] - yi) ** 2)

    op = HessianOperator.from_closure(loss_on, [w])
    order = torch.Generator().manual_seed(seed + 1)

    def make_closure(opt):
        idx = torch.randperm(n_samples, generator=order)[:batch]

        def closure():
            opt.zero_grad()
            loss = loss_on([w], idx)
            loss.backward()
            return loss

        return closure

    return w, op, make_closure, lambda: float(loss_on([w]))


def test_a_closure_on_a_fresh_minibatch_per_step_is_detected_as_stochastic():
    # The second step evaluates its closure also at the first step's parameters: a new batch gives another loss
    # there. One evaluation more, once.
    w, op, make_closure, _ = _minibatch_problem()
    opt = AutoMrGD([w], op, num_eigs=4)
    calls = []

    def counted(closure):
        def wrapped():
            calls.append(1)
            return closure()
        return wrapped

    assert opt.stochastic is None
    opt.step(counted(make_closure(opt)))
    assert opt.stochastic is None and len(calls) == 1
    opt.step(counted(make_closure(opt)))
    assert opt.stochastic is True and len(calls) == 3
    opt.step(counted(make_closure(opt)))
    assert len(calls) == 4


def test_a_deterministic_closure_is_detected_and_keeps_its_trajectory_bit_for_bit():
    eigs = _spectrum()
    runs = []
    for stochastic in (None, False):
        w, w_star, H, op, closure_for = _problem(eigs)
        opt = AutoMrGD([w], op, num_eigs=4, stochastic=stochastic)
        closure = closure_for(opt)
        losses = [float(opt.step(closure)) for _ in range(30)]
        assert opt.stochastic is False
        runs.append((w.detach().clone(), losses))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


def test_detection_leaves_the_step_its_own_gradient_when_the_loop_zeroes_outside_the_closure():
    # A loop that calls zero_grad() before step() and a closure that only accumulates: the detecting evaluation
    # at the previous parameters must not add its gradient to the step's.
    eigs = _spectrum()
    runs = []
    for stochastic in (None, False):
        w, w_star, H, op, _ = _problem(eigs)
        opt = AutoMrGD([w], op, num_eigs=4, stochastic=stochastic)

        def accumulating(w=w, w_star=w_star, H=H):
            d = w - w_star
            loss = 0.5 * d @ (H @ d)
            loss.backward()
            return loss

        for _ in range(5):
            opt.zero_grad()
            opt.step(accumulating)
        runs.append(w.detach().clone())
    assert torch.equal(runs[0], runs[1])


def test_stochastic_closure_trains_without_shrinking_its_rates_on_batch_noise():
    # Batch losses of one interval differ by far more than loss_slack; judged as single losses they would read
    # as rises and back off again and again (test_guard_learns_the_spread_of_a_noisy_loss). Judged as interval
    # means, a few back-offs remain where the run reaches its noise floor (0.2-1% of the start; the momentum
    # correlates successive losses, so the interval means spread a little more than their standard error says).
    for seed in range(3):
        w, op, make_closure, full_loss = _minibatch_problem(seed)
        opt = AutoMrGD([w], op, num_eigs=4)
        start = full_loss()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for _ in range(300):
                opt.step(make_closure(opt))
        assert opt.stochastic is True
        assert sum(e["kind"] == "backoff" for e in opt.events) <= 2
        assert opt.param_groups[0]["lr_scale"] >= 0.25 and not opt._safe_plan
        assert full_loss() < 0.02 * start


def _scripted_stochastic(losses, **kwargs):
    eigs = _spectrum()
    w, w_star, H, op, _ = _problem(eigs)
    opt = AutoMrGD([w], op, num_eigs=4, stochastic=True, refresh_every=10**6, **kwargs)
    script = iter(losses)

    def closure():
        opt.zero_grad()
        d = w - w_star
        (0.5 * d @ (H @ d)).backward()
        return torch.tensor(next(script), dtype=torch.float64)

    return opt, closure


def test_stochastic_momentum_is_constant_and_survives_a_rising_batch_loss():
    opt, closure = _scripted_stochastic([1.0, 0.5, 0.9, 0.4, 0.8])  # batch-like losses rising every other step
    w = opt.param_groups[0]["params"][0]
    for _ in range(4):
        opt.step(closure)
    buf = opt.state[w]["momentum_buffer"].clone()
    before = w.detach().clone()
    opt.step(closure)  # the loss rose (0.4 -> 0.8): a deterministic closure would restart here
    mu = mrgd_ext.optim.auto.STOCHASTIC_MOMENTUM
    new_buf = opt.state[w]["momentum_buffer"]
    step = new_buf - mu * buf  # P g, by v <- mu v + P g
    assert float(step.norm()) > 0.1 * float(buf.norm()) > 0  # momentum kept (not reset) and a real step taken
    # x <- x - P g - mu v with the same mu: the step's momentum term is the constant coefficient.
    assert torch.allclose(w.detach(), before - step - mu * new_buf, rtol=1e-12, atol=1e-15)


def test_stochastic_guard_rolls_back_an_interval_whose_mean_rose():
    # Interval 1 (steps 0-9) alternates 0.8 / 1.2 (mean 1.0, standard error 0.067); interval 2 has mean 1.5:
    # 0.5 above, more than loss_slack (0.05) plus 3 sqrt(2) standard errors (0.28). Single losses of 1.2
    # and 1.6 lie within the growth bound, so only the check point sees it.
    noisy = [0.8, 1.2] * 5
    opt, closure = _scripted_stochastic(noisy + [1.4, 1.6] * 5 + [1.5, 1.0], check_every=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(20):
            opt.step(closure)
    auto = opt.state["multirate_auto"]
    assert auto["best_loss"] == pytest.approx(1.0)
    assert auto["best_error"] == pytest.approx(math.sqrt(0.4 / 9 / 10))  # sample standard error of the mean
    with pytest.warns(RuntimeWarning, match="mean loss of the last 10 steps rose to 1.5"):
        opt.step(closure)
    assert opt.events[-1]["kind"] == "backoff"
    assert opt.param_groups[0]["lr_scale"] == pytest.approx(opt.backoff)  # halved, not the secant factor
    # The rejected interval is neither the reference nor the best; the next interval starts with the
    # loss at the restored point.
    assert auto["best_loss"] == pytest.approx(1.0) and auto["ref_loss"] == pytest.approx(1.0)
    assert auto["interval_count"] == 1 and auto["interval_sum"] == pytest.approx(1.0)


def test_stochastic_guard_accepts_an_interval_within_its_noise():
    # The same first interval, then one whose mean is 1.1: 0.1 above, inside 0.05 + 0.28.
    opt, closure = _scripted_stochastic([0.8, 1.2] * 5 + [0.9, 1.3] * 5 + [1.0], check_every=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(21):
            opt.step(closure)
    assert opt.state["multirate_auto"]["ref_loss"] == pytest.approx(1.1)
    assert opt.state["multirate_auto"]["best_loss"] == pytest.approx(1.0)


def test_stochastic_guard_re_baselines_after_repeated_back_offs():
    # An accepted interval may end where the loss has already risen; from that restored point no interval can get
    # back under the old best. After max_backoffs + 1 violations in a row (the safe schedule) the restored point's
    # own intervals set the reference: 3 back-offs, not one at every check point.
    script = [0.9, 1.1] * 5 + [1.9, 2.1] * 200
    opt, closure = _scripted_stochastic(script, check_every=10, max_backoffs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(100):
            opt.step(closure)
    backoffs = [e["step"] for e in opt.events if e["kind"] == "backoff"]
    assert backoffs == [20, 30, 40]
    assert opt._safe_plan and opt.param_groups[0]["lr_scale"] == 1.0  # doubled back after the passed checks
    assert opt.state["multirate_auto"]["best_loss"] == pytest.approx(2.0)


def test_stochastic_guard_catches_a_blow_up_within_an_interval():
    # One batch far beyond the growth bound times the last accepted interval mean is a blow-up, not noise.
    opt, closure = _scripted_stochastic([1.0] * 12 + [1e4, 1.0], check_every=10)
    for _ in range(12):
        opt.step(closure)
    with pytest.warns(RuntimeWarning, match=r"grew from 1 \(interval mean\) to 10000"):
        opt.step(closure)
    assert opt.events[-1]["kind"] == "backoff"


def _flattening_run(stochastic: bool, factors: list[float]):
    """A quadratic whose Hessian is scaled by ``factors[k]`` from the k-th refresh on (a lambda_max that
    changes between measurements), refreshed every 10 steps; returns lr_scale after each refresh."""
    eigs = _spectrum()
    H, w_star = _quadratic(eigs)
    w = torch.zeros(eigs.size, dtype=torch.float64, requires_grad=True)
    scale = [1.0]

    def loss_of(plist):
        d = plist[0] - w_star
        return 0.5 * scale[0] * (d @ (H @ d))

    op = HessianOperator.from_closure(loss_of, [w])
    opt = AutoMrGD([w], op, num_eigs=4, stochastic=stochastic, refresh_every=10, max_refresh_interval=10,
                   check_every=10)

    def closure():
        opt.zero_grad()
        loss = loss_of([w])
        loss.backward()
        return loss

    scales = []
    for k, factor in enumerate(factors):
        while opt.state["multirate_auto"]["step"] < 10 * (k + 1):
            opt.step(closure)
        scale[0] = factor  # the next step is a check point and refreshes
        opt.step(closure)
        assert opt.events[-1]["step"] == 10 * (k + 1) and opt.events[-1]["kind"] == "estimate"
        scales.append(opt.param_groups[0]["lr_scale"])
    return scales


def test_a_refresh_raises_a_stochastic_closures_rates_at_most_twofold():
    # lambda_max falls 100x, then 10x more: the stochastic closure's rates grow 2x per refresh (lr_scale 2/100,
    # then 2/10 of that); a deterministic closure takes the new rates at once. (A lambda_max that grows again
    # gives a shrink back through the scale recovery, tested with the back-offs.)
    capped = _flattening_run(True, [1e-2, 1e-3])
    free = _flattening_run(False, [1e-2, 1e-3])
    assert capped[0] == pytest.approx(2e-2, rel=1e-2)
    assert capped[1] == pytest.approx(4e-3, rel=1e-2)
    assert free == [1.0, 1.0]


def test_stochastic_state_survives_a_checkpoint():
    w, op, make_closure, _ = _minibatch_problem()
    opt = AutoMrGD([w], op, num_eigs=4)
    for _ in range(15):
        opt.step(make_closure(opt))
    saved = copy.deepcopy(opt.state_dict())
    w2, op2, _, _ = _minibatch_problem()
    with torch.no_grad():
        w2.copy_(w)
    resumed = AutoMrGD([w2], op2, num_eigs=4)
    resumed.load_state_dict(saved)
    assert resumed.stochastic is True
    a, b = opt.state["multirate_auto"], resumed.state["multirate_auto"]
    for key in ("interval_sum", "interval_sumsq", "interval_count", "best_error", "best_loss"):
        assert a[key] == b[key]


def test_a_stochastic_closure_skips_the_gradient_history_watch():
    # Minibatch gradient differences are mostly noise: the secant watch would re-measure for nothing.
    eigs = _spectrum()
    watched = []
    for stochastic in (False, True):
        w, w_star, H, op, closure_for = _problem(eigs)
        opt = AutoMrGD([w], op, mode="temporal", density_order=eigs.size, max_groups=None, refresh_every=10**6,
                       stochastic=stochastic)
        assert opt.gradient_history
        closure = closure_for(opt)
        histories = 0
        for _ in range(2 * opt.plan.cycle_length):
            opt.step(closure)
            histories += opt._history is not None
        watched.append(histories)
    assert watched[0] > 0 and watched[1] == 0


def test_stochastic_must_be_a_bool_or_none():
    eigs = _spectrum()
    w, w_star, H, op, _ = _problem(eigs)
    with pytest.raises(TypeError, match="stochastic must be True, False or None"):
        AutoMrGD([w], op, stochastic=1)


def _float32_run_with_rounding_noise(amplitude: float, steps: int = 600, refresh_every: int = 10**6):
    """A float32 quadratic whose loss carries a deterministic +-amplitude * eps32 * L_0 wobble (how a float32
    loss near its rounding floor behaves), run by AutoMrGD to convergence; returns the optimizer."""
    eigs = _spectrum()
    H, w_star = (t.float() for t in _quadratic(eigs))
    w = torch.zeros(eigs.size, dtype=torch.float32, requires_grad=True)

    def loss_of(plist):
        d = plist[0] - w_star
        return 0.5 * d @ (H @ d)

    opt = AutoMrGD([w], HessianOperator.from_closure(loss_of, [w]), num_eigs=4, refresh_every=refresh_every)
    with torch.no_grad():
        l0 = float(loss_of([w]))
    calls = [0]

    def closure():
        opt.zero_grad()
        loss = loss_of([w])
        loss.backward()
        calls[0] += 1
        wobble = amplitude * torch.finfo(torch.float32).eps * l0 * (1.0 if calls[0] % 3 == 0 else -1.0)
        return loss.detach() + wobble

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(steps):
            opt.step(closure)
    with torch.no_grad():
        return opt, float(loss_of([w])) / l0, l0


def test_guard_ignores_changes_below_the_loss_rounding_floor():
    # NOTE: [loss floor]: once a float32 loss is near its rounding floor, step-to-step changes of less than
    # eps32 * |L_0| are rounding, not rises; the guard lets them pass (no rollback, no re-measurement).
    opt, final, l0 = _float32_run_with_rounding_noise(0.4)
    # Set from the first loss (L_0 and its first wobble of -0.4 eps32 L_0): eps32 * |L_0| to a relative 1e-6.
    assert opt.state["multirate_auto"]["loss_floor"] == pytest.approx(torch.finfo(torch.float32).eps * l0, rel=1e-6)
    assert final < 1e-5  # converged to the float32 floor of the quadratic
    assert not [e for e in opt.events if e["kind"] == "backoff"]
    # The same wobble ten times larger exceeds the floor: the guard sees rises and backs off.
    opt, _, _ = _float32_run_with_rounding_noise(4.0)
    assert [e for e in opt.events if e["kind"] == "backoff"]


def _saturated_logistic_run(steps: int):
    """Raw breast-cancer logistic regression from a start whose sigmoids are saturated (seed 2 of the training
    benchmark's initialisation: loss ~66, measured curvature ~1e-4, the L2 term's): AutoMrGD subspace mode."""
    sk = pytest.importorskip("sklearn.datasets")
    x, y = sk.load_breast_cancer(return_X_y=True)
    x, y = torch.tensor(x), torch.tensor(y, dtype=torch.float64)
    torch.manual_seed(2)
    model = torch.nn.Linear(30, 1).double()
    params = list(model.parameters())

    def loss_of(plist):
        out = torch.func.functional_call(model, dict(zip(("weight", "bias"), plist)), (x,))
        l2 = 0.5e-4 * sum((p * p).sum() for p in plist)
        return torch.nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1), y) + l2

    opt = AutoMrGD(params, HessianOperator.from_closure(loss_of, params))

    def closure():
        opt.zero_grad()
        loss = loss_of(params)
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(steps):
            opt.step(closure)
    with torch.no_grad():
        return opt, float(loss_of(params))


def test_back_off_from_a_flat_start_takes_the_chord_after_the_quadratic_model_fails():
    # NOTE: [secant back-off] and [scale recovery]: the first step from the flat start overshoots by ~1e10
    # and the loss grows about linearly along it, so the quadratic model shrinks by ~5x per retry (17
    # rejected steps before the chord); the chord at the second blow-up fixes the scale in one retry, and the
    # next measurement (curvature 1e8 times larger) gives the shrink back instead of compounding it.
    opt, loss = _saturated_logistic_run(60)
    first = [e for e in opt.events if e["step"] <= 20]
    assert sum(e["kind"] == "backoff" for e in first) <= 3
    assert max(e["lambda_max"] for e in opt.events) > 1e6 * opt.events[0]["lambda_max"]
    opt, loss = _saturated_logistic_run(600)
    assert loss < 0.09  # f* = 0.0731 on the full data set; the start is at ~66


def test_refresh_waits_while_the_loss_is_below_its_rounding_floor():
    # NOTE: [loss floor]: a due refresh at a check point whose loss is below eps32 |L_0| is postponed (and its
    # interval doubled): it could neither improve nor be judged by the loss.
    opt, final, l0 = _float32_run_with_rounding_noise(0.4, steps=600, refresh_every=20)
    floor = opt.state["multirate_auto"]["loss_floor"]
    assert final * l0 < floor  # the run went below the floor
    refreshes = [e["step"] for e in opt.events if e["reason"] == "refresh"]
    assert refreshes and refreshes[-1] < 300  # measured while converging, not for the last half of the run
    assert opt.state["multirate_auto"]["interval"] > 20


@pytest.mark.parametrize("mode", ["subspace", "temporal"])
def test_a_measurement_evaluates_the_loss_once(mode):
    # NOTE: [shared graph]: the Lanczos run, the complement's top (subspace) and the SLQ density (temporal)
    # all differentiate one gradient graph, built by one evaluation of the operator's loss.
    eigs = _spectrum(n_per_group=(12, 14, 16))  # 42 parameters: more than SMALL_PROBLEM, so Lanczos runs
    H, w_star = _quadratic(eigs)
    w = torch.zeros(eigs.size, dtype=torch.float64, requires_grad=True)
    calls = [0]

    def loss_of(plist):
        calls[0] += 1
        d = plist[0] - w_star
        return 0.5 * d @ (H @ d)

    op = HessianOperator.from_closure(loss_of, [w], check_determinism=False)
    calls[0] = 0
    opt = AutoMrGD([w], op, mode=mode)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (w - w_star) @ (H @ (w - w_star))
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.estimation_hvps > 10
    assert calls[0] == len([e for e in opt.events if e["num_hvps"] > 0]) == 1
