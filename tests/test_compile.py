"""torch.compile of MrGD.step (temporal and subspace modes): one graph, no graph break, no recompile over whole
cycles; same trajectory as eager."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from mrgd_ext import MrGD

CYCLE = (0.01, 0.02, 0.01, 0.05, 0.3)  # five distinct positions: a per-rate recompile would show


def quadratic(n=17, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    H = (q * torch.linspace(0.5, 3.0, n, dtype=torch.float64)) @ q.T
    return H, torch.randn(n, dtype=torch.float64, generator=gen)


def run(step_fn, opt, x, H, b, steps):
    traj = []
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * x @ H @ x - b @ x).backward()
        step_fn()
        traj.append(x.detach().clone())
    return traj


def compiled_vs_eager(backend, **kwargs):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    H, b = quadratic()
    x_eager = torch.zeros_like(b, requires_grad=True)
    x_comp = torch.zeros_like(b, requires_grad=True)
    o_eager = MrGD([x_eager], plan=CYCLE, weight_decay=1e-2, **kwargs)
    o_comp = MrGD([x_comp], plan=CYCLE, weight_decay=1e-2, **kwargs)
    counter = CompileCounterWithBackend(backend)
    step = torch.compile(o_comp.step, backend=counter, fullgraph=True)  # fullgraph: a graph break raises
    steps = 2 * len(CYCLE) + 1
    t_eager = run(o_eager.step, o_eager, x_eager, H, b, steps)
    t_comp, seen = [], []
    for _ in range(steps):
        o_comp.zero_grad()
        (0.5 * x_comp @ H @ x_comp - b @ x_comp).backward()
        step()
        t_comp.append(x_comp.detach().clone())
        seen.append(counter.frame_count)
    return seen, t_eager, t_comp, o_eager, o_comp


def check(seen, t_eager, t_comp, o_eager, o_comp):
    # All graphs come from the first call (Dynamo may restart its analysis once, which compiles twice);
    # none later: walking two full cycles does not recompile.
    assert 1 <= seen[0] <= 2 and seen[-1] == seen[0], seen
    assert not torch._dynamo.utils.counters["graph_break"]
    for a, c in zip(t_eager, t_comp):
        # float64; the compiled update multiplies by a tensor rate instead of a scalar: a few ulps per step.
        torch.testing.assert_close(c, a, rtol=1e-13, atol=1e-15)
    for key in ("cycle_position", "last_rate"):
        assert torch.equal(o_comp.param_groups[0][key], o_eager.param_groups[0][key])


@pytest.mark.parametrize("impl", [{}, dict(fused=True), dict(foreach=True)])
def test_aot_eager_one_graph_over_two_cycles(impl):
    check(*compiled_vs_eager("aot_eager", **impl))


@pytest.mark.integration
def test_inductor_one_graph_over_two_cycles():
    check(*compiled_vs_eager("inductor"))


def test_tensor_lr_with_scheduler_does_not_recompile():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    w = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = MrGD([w], plan=CYCLE, lr=torch.tensor(1.0, dtype=torch.float64))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 4))
    counter = CompileCounterWithBackend("aot_eager")
    # opt.step is now the scheduler's bookkeeping wrapper, which Dynamo does not trace; the MrGD step
    # inside it is compiled as its own frame (as in the README).
    step = torch.compile(opt.step, backend=counter)
    total, seen = 0.0, []
    for k in range(2 * len(CYCLE)):
        w.grad = torch.ones(4, dtype=torch.float64)
        step()
        seen.append(counter.frame_count)
        total += min(1.0, (k + 1) / 4) * CYCLE[k % len(CYCLE)]
        sched.step()
    assert 1 <= seen[0] <= 2 and seen[-1] == seen[0], seen
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert all("marked as skipped" in reason for reason in breaks), breaks  # the wrapper only
    torch.testing.assert_close(w.detach(), torch.full((4,), -total, dtype=torch.float64), rtol=1e-13, atol=0)


def test_compiled_step_skips_overflowed_steps_like_eager():
    torch._dynamo.reset()
    w = torch.zeros(3, requires_grad=True)
    opt = MrGD([w], plan=CYCLE)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(opt.step, backend=counter, fullgraph=True)
    opt.grad_scale = torch.tensor([4.0])
    w.grad = torch.full((3,), float("inf"))
    opt.found_inf = torch.tensor([1.0])
    step()
    assert torch.equal(w.detach(), torch.zeros(3)) and int(opt.param_groups[0]["cycle_position"]) == 0
    w.grad = torch.full((3,), 4.0)
    opt.found_inf = torch.tensor([0.0])
    step()
    torch.testing.assert_close(w.detach(), torch.full((3,), -CYCLE[0]))
    assert int(opt.param_groups[0]["cycle_position"]) == 1


# Subspace mode: the spatial step, compiled.

def subspace_optimizer(H, **kwargs):
    # The basis: three eigenvectors of H (orthonormal to float64 rounding), each with its own rate.
    _, vecs = torch.linalg.eigh(H)
    x = torch.zeros(H.shape[0], dtype=torch.float64, requires_grad=True)
    opt = MrGD([x], plan=CYCLE, weight_decay=1e-2, lr=torch.tensor(1.0, dtype=torch.float64), **kwargs)
    opt.set_subspace(vecs[:, -3:].T.contiguous(), [0.3, 0.35, 0.4], 0.5)
    return x, opt


def subspace_run(step_fn, opt, x, H, b, steps, overflow_at):
    """Steps with a warm-up that changes the tensor lr in place (as torch's schedulers do with a tensor lr)
    and GradScaler flags (scale 2, one overflowed step). Returns the trajectory and the rates taken."""
    traj, rates = [], []
    for k in range(steps):
        opt.zero_grad()
        (2.0 * (0.5 * x @ H @ x - b @ x)).backward()  # a loss scaled by 2, as GradScaler's
        opt.param_groups[0]["lr"].fill_(min(1.0, (k + 1) / 4))
        opt.grad_scale = torch.tensor([2.0])
        opt.found_inf = torch.tensor([1.0 if k == overflow_at else 0.0])
        if k == overflow_at:
            x.grad[0] = float("inf")
        step_fn()
        traj.append(x.detach().clone())
        rates.append(float(opt.param_groups[0]["last_rate"]))
    return traj, rates


def subspace_compiled_vs_eager(backend, **kwargs):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    H, b = quadratic()
    x_eager, o_eager = subspace_optimizer(H, **kwargs)
    x_comp, o_comp = subspace_optimizer(H, **kwargs)
    counter = CompileCounterWithBackend(backend)
    step = torch.compile(o_comp.step, backend=counter, fullgraph=True)  # fullgraph: a graph break raises
    steps, overflow_at = 2 * len(CYCLE) + 1, 3
    t_eager, r_eager = subspace_run(o_eager.step, o_eager, x_eager, H, b, steps, overflow_at)
    seen = []
    t_comp, r_comp = subspace_run(lambda: (step(), seen.append(counter.frame_count)), o_comp, x_comp, H, b, steps,
                                  overflow_at)
    # All graphs come from the first call; none later, although the lr changed at the first four steps and
    # one step overflowed.
    assert 1 <= seen[0] <= 2 and seen[-1] == seen[0], seen
    assert not torch._dynamo.utils.counters["graph_break"]
    # float64; the compiled update (a tensor rate) runs as the torch composition where eager runs the fused
    # kernel: the two differ only in rounding (summation order), a few ulps per step on a contraction.
    for a, c in zip(t_eager, t_comp):
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-14)
    assert r_comp == pytest.approx(r_eager, rel=1e-15)
    assert r_eager[overflow_at] == r_eager[overflow_at - 1]  # the skipped step took no rate
    assert torch.equal(t_comp[overflow_at], t_comp[overflow_at - 1])  # ... and moved nothing
    assert r_eager[-1] == 0.5  # the warm-up reached lr 1: the complement of the span takes base_lr
    assert int(o_comp.param_groups[0]["cycle_position"]) == 0  # the subspace step does not walk the cycle


@pytest.mark.parametrize("impl", [{}, dict(fused=False)])
def test_subspace_aot_eager_one_graph_with_tensor_lr_and_grad_scaler(impl):
    subspace_compiled_vs_eager("aot_eager", **impl)


@pytest.mark.integration
def test_subspace_inductor_one_graph_with_tensor_lr_and_grad_scaler():
    subspace_compiled_vs_eager("inductor")


def test_subspace_recompiles_once_per_mode_and_per_new_base_rate():
    """Limitation, documented: switching mode compiles once per mode (each later switch reuses the cached
    graph); a new basis and new column rates of the same shape reuse it; a new base_lr (a Python float)
    compiles once more, a new rank once more before the rank becomes dynamic."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    H, b = quadratic()
    _, vecs = torch.linalg.eigh(H)
    x = torch.zeros_like(b, requires_grad=True)
    opt = MrGD([x], plan=CYCLE, lr=torch.tensor(1.0, dtype=torch.float64))
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(opt.step, backend=counter, fullgraph=True)

    def frames_after(steps=3):
        for _ in range(steps):
            opt.zero_grad()
            (0.5 * x @ H @ x - b @ x).backward()
            step()
        return counter.frame_count

    def basis(cols):
        return vecs[:, cols].T.contiguous()

    temporal = frames_after()
    opt.set_subspace(basis([-1, -2, -3]), [0.3, 0.35, 0.4], 0.5)
    subspace = frames_after()
    assert subspace == temporal + 1
    opt.clear_subspace()
    assert frames_after() == subspace
    opt.set_subspace(basis([0, 1, 2]), [0.2, 0.25, 0.3], 0.5)
    assert frames_after() == subspace
    opt.set_subspace(basis([0, 1, 2]), [0.2, 0.25, 0.3], 0.45)
    assert frames_after() == subspace + 1
    opt.set_subspace(basis([0, 1, 2, 3]), [0.2, 0.25, 0.3, 0.3], 0.45)
    assert frames_after() == subspace + 2
    opt.set_subspace(basis([0, 1, 2, 3, 4]), [0.2, 0.25, 0.3, 0.3, 0.3], 0.45)
    assert frames_after() == subspace + 2
    assert not torch._dynamo.utils.counters["graph_break"]
