"""torch LR schedulers on MrGD: the scheduler drives the multiplier ``lr``; the rate taken is
``lr * lr_scale * cycle[position]``. Rates are read back from the parameter deltas of a linear loss."""

import pytest
import torch
from torch.optim import lr_scheduler as S

from mrgd_ext import MrGD, MultirateLR

CYCLE = (0.01, 0.02, 0.01, 0.5)
STEPS = 13  # three cycles and a bit, so the schedules cross cycle boundaries

SCHEDULERS = {
    "lambda_warmup": lambda o: S.LambdaLR(o, lambda k: min(1.0, (k + 1) / 5)),
    "lambda_from_zero": lambda o: S.LambdaLR(o, lambda k: k / 4),  # a warm-up whose first rate is 0
    "step": lambda o: S.StepLR(o, step_size=3, gamma=0.5),
    "one_cycle": lambda o: S.OneCycleLR(o, max_lr=2.0, total_steps=STEPS, cycle_momentum=False),
    "cosine": lambda o: S.CosineAnnealingLR(o, T_max=STEPS),
    "sequential": lambda o: S.SequentialLR(
        o, [S.LinearLR(o, start_factor=0.1, total_iters=4), S.CosineAnnealingLR(o, T_max=STEPS - 4)], milestones=[4]
    ),
    "chained": lambda o: S.ChainedScheduler([S.ExponentialLR(o, gamma=0.9), S.StepLR(o, step_size=3, gamma=0.5)]),
}


def scheduler_values(make, steps):
    """The multipliers the scheduler gives each step, read from torch.optim.SGD (the independent truth)."""
    w = torch.zeros(1, requires_grad=True)
    sgd = torch.optim.SGD([w], lr=1.0)
    sched = make(sgd)
    values = []
    for _ in range(steps):
        values.append(sgd.param_groups[0]["lr"])
        sgd.step()
        sched.step()
    return values


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("lr_scale", [1.0, 0.5])
def test_rate_taken_is_scheduler_value_times_cycle(name, lr_scale):
    make = SCHEDULERS[name]
    expected_mult = scheduler_values(make, STEPS)
    # Loss sum(w): gradient 1, so each step moves every entry by exactly minus the rate taken (float64).
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = MrGD([w], plan=CYCLE, lr_scale=lr_scale)
    sched = make(opt)
    position, last = 0, 0.0
    for k in range(STEPS):
        before = w.detach().clone()
        opt.zero_grad()
        w.sum().backward()
        opt.step()
        taken = (before - w.detach())[0].item()
        if expected_mult[k] == 0.0:
            expected = 0.0  # a step with the multiplier at 0 is no step: the cycle does not move either
        else:
            expected = expected_mult[k] * lr_scale * CYCLE[position % len(CYCLE)]
            position, last = position + 1, expected
        # One subtraction of a rate from a float64 number: relative error 2^-53 of |w| ~ sum of past rates.
        assert taken == pytest.approx(expected, rel=1e-12, abs=1e-14), (k, taken, expected)
        assert opt.param_groups[0]["last_rate"].item() == pytest.approx(last, rel=1e-15, abs=0.0)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected_mult[k], rel=1e-15)
        sched.step()
    assert int(opt.param_groups[0]["cycle_position"]) == position % len(CYCLE)


def test_default_multiplier_is_one_and_the_cycle_is_bare():
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = MrGD([w], plan=CYCLE)
    assert opt.param_groups[0]["lr"] == 1.0 and opt.param_groups[0]["last_rate"].item() == 0.0
    for k in range(5):
        w.grad = torch.ones(2, dtype=torch.float64)
        opt.step()
        assert opt.param_groups[0]["last_rate"].item() == CYCLE[k % 4]


def test_tensor_multiplier_is_filled_in_place_by_the_scheduler():
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    lr = torch.tensor(1.0, dtype=torch.float64)
    opt = MrGD([w], plan=CYCLE, lr=lr)
    sched = S.StepLR(opt, step_size=1, gamma=0.5)
    total = 0.0
    for k in range(6):
        w.grad = torch.ones(2, dtype=torch.float64)
        opt.step()
        total += 0.5**k * CYCLE[k % 4]
        sched.step()
    assert opt.param_groups[0]["lr"] is lr  # the same tensor, as torch.optim keeps it
    torch.testing.assert_close(w.detach(), torch.full((2,), -total, dtype=torch.float64), rtol=1e-14, atol=0)


def test_scheduler_scales_the_subspace_rates():
    n = 6
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    basis = q[:, :2].T.contiguous()
    w = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    opt = MrGD([w], plan=[1.0])
    opt.set_subspace(basis, [0.1, 0.2], 0.3)
    sched = S.LambdaLR(opt, lambda k: 0.5 ** k)
    g = torch.randn(n, dtype=torch.float64)
    expected = torch.zeros(n, dtype=torch.float64)
    for k in range(3):
        m = 0.5**k
        w.grad = g.clone()
        opt.step()
        column_rates = m * torch.tensor([0.1, 0.2], dtype=torch.float64)
        expected = expected - m * 0.3 * g - basis.T @ ((column_rates - m * 0.3) * (basis @ g))
        torch.testing.assert_close(w.detach(), expected, rtol=1e-13, atol=1e-15)
        assert opt.param_groups[0]["last_rate"].item() == pytest.approx(m * 0.3, rel=1e-15)
        sched.step()


def test_scheduler_state_and_optimizer_state_resume_together():
    def run(steps, opt, sched, w):
        for _ in range(steps):
            w.grad = torch.ones(2, dtype=torch.float64)
            opt.step()
            sched.step()

    w1 = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    o1 = MrGD([w1], plan=CYCLE)
    s1 = S.CosineAnnealingLR(o1, T_max=10)
    run(5, o1, s1, w1)
    saved = (w1.detach().clone(), o1.state_dict(), s1.state_dict())
    run(5, o1, s1, w1)

    w2 = saved[0].clone().requires_grad_()
    o2 = MrGD([w2], plan=[1.0])
    s2 = S.CosineAnnealingLR(o2, T_max=10)
    o2.load_state_dict(saved[1])
    s2.load_state_dict(saved[2])
    run(5, o2, s2, w2)
    assert torch.equal(w1.detach(), w2.detach())


def test_multirate_lr_still_drives_other_optimizers():
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    sgd = torch.optim.SGD([w], lr=1.0)
    sched = MultirateLR(sgd, CYCLE, lr_scale=2.0)
    for k in range(6):
        before = w.detach().clone()
        w.grad = torch.ones(2, dtype=torch.float64)
        sgd.step()
        assert (before - w.detach())[0].item() == pytest.approx(2.0 * CYCLE[k % 4], rel=1e-12)
        sched.step()
