"""Property tests (hypothesis): the step ops against float64 truths and their references, over counts,
sizes, dtypes, misaligned views, CPU ISAs and AMP flags; MrGD's walk against the closed form.

Fast by default (a few dozen examples each); ``MRGD_HYPOTHESIS_PROFILE=ci`` runs a longer search."""

import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import mrgd_ext  # noqa: E402
from conftest import ALL_DTYPES, COMPUTE_ROUNDOFF, UNIT_ROUNDOFF  # noqa: E402
from mrgd_ext import _C, MrGD  # noqa: E402
from mrgd_ext.ops import reference as ref  # noqa: E402
from mrgd_ext.ops import step_ops  # noqa: E402

settings.register_profile("default", max_examples=10, deadline=None, derandomize=True)
settings.register_profile("ci", max_examples=400, deadline=None)
settings.load_profile(os.environ.get("MRGD_HYPOTHESIS_PROFILE", "default"))

CPU_ISAS = mrgd_ext.build_info()["cpu_isas_available"].split(",")


@st.composite
def step_inputs(draw):
    dtype = draw(st.sampled_from(ALL_DTYPES))
    sizes = draw(st.lists(st.integers(0, 300), min_size=1, max_size=4))
    offset = draw(st.booleans())  # views one element into a buffer: misaligned data pointers
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for n in sizes:
        p = torch.randn(n + offset, generator=gen).to(dtype)[offset:]
        g = torch.randn(n + offset, generator=gen).to(dtype)[offset:]
        params.append(p)
        grads.append(g)
    lr = draw(st.floats(1e-4, 4.0))
    wd = draw(st.sampled_from([0.0, 1e-3, 0.1]))
    maximize = draw(st.booleans())
    scale = draw(st.sampled_from([None, 2.0**-3, 2.0**10]))
    isa = draw(st.sampled_from(CPU_ISAS))
    return params, grads, lr, wd, maximize, scale, isa


def truth_and_bound(params, grads, lr, wd, maximize, scale):
    """float64 truth, and the error allowed to a computation in the kernels' precision rounded to storage."""
    out = []
    for p, g in zip(params, grads):
        sign = -1.0 if maximize else 1.0
        s = 1.0 if scale is None else scale
        pd, gd = p.double(), g.double()
        truth = pd - lr * (gd * sign / s + wd * pd)
        # One rounding to storage of the result, plus a few roundings in the compute precision of each of
        # the terms (scale division, products, sums): 8 units of the compute roundoff per magnitude.
        magnitude = pd.abs() + lr * (gd.abs() / s + wd * pd.abs())
        bound = UNIT_ROUNDOFF[p.dtype] * truth.abs() + 8 * COMPUTE_ROUNDOFF[p.dtype] * magnitude
        bound = bound + torch.finfo(p.dtype).smallest_normal  # subnormal results round absolutely
        out.append((truth, bound))
    return out


@given(step_inputs())
def test_multirate_step_op_and_reference_within_rounding_of_the_truth(case):
    params, grads, lr, wd, maximize, scale, isa = case
    expected = truth_and_bound(params, grads, lr, wd, maximize, scale)
    grad_scale = None if scale is None else torch.tensor([scale])
    kernel = [p.clone() for p in params]
    reference = [p.clone() for p in params]
    _C._set_cpu_isa(isa)
    try:
        step_ops.multirate_step_(kernel, grads, lr, weight_decay=wd, maximize=maximize, grad_scale=grad_scale)
    finally:
        _C._set_cpu_isa("auto")
    ref.multirate_step(reference, grads, lr, weight_decay=wd, maximize=maximize, grad_scale=grad_scale)
    for k, r, (truth, bound) in zip(kernel, reference, expected):
        assert ((k.double() - truth).abs() <= bound).all()
        assert ((r.double() - truth).abs() <= bound).all()


@given(step_inputs())
def test_found_inf_leaves_everything_bit_for_bit(case):
    params, grads, lr, wd, maximize, _, isa = case
    before = [p.clone() for p in params]
    _C._set_cpu_isa(isa)
    try:
        step_ops.multirate_step_(params, grads, lr, weight_decay=wd, maximize=maximize,
                                 grad_scale=torch.tensor([1.0]), found_inf=torch.tensor([1.0]))
    finally:
        _C._set_cpu_isa("auto")
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@given(
    cycle=st.lists(st.floats(1e-3, 2.0), min_size=1, max_size=6),
    lr=st.floats(0.0, 3.0),
    lr_scale=st.floats(0.1, 3.0),
    wd=st.sampled_from([0.0, 0.01]),
    steps=st.integers(1, 13),
    impl=st.sampled_from([dict(fused=True), dict(foreach=True), dict(foreach=False, fused=False)]),
)
def test_mrgd_walk_equals_closed_form(cycle, lr, lr_scale, wd, steps, impl):
    g = torch.linspace(-1.0, 2.0, 5, dtype=torch.float64)
    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = MrGD([w], plan=cycle, lr=lr, lr_scale=lr_scale, weight_decay=wd, **impl)
    expected = torch.zeros(5, dtype=torch.float64)
    for k in range(steps):
        w.grad = g.clone()
        opt.step()
        rate = lr * lr_scale * cycle[k % len(cycle)]
        expected = expected - rate * (g + wd * expected)
        assert opt.param_groups[0]["last_rate"].item() == pytest.approx(rate, rel=1e-15, abs=0.0)
    # float64, at most 13 steps of rates <= 18: a few ulps of the largest magnitude per step.
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-12)
    assert int(opt.param_groups[0]["cycle_position"]) == steps % len(cycle)
