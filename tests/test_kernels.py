"""CPU kernels vs pure-torch reference vs float64 truth, on random odd sizes and every dtype."""

import pytest
import torch

import mrgd_ext
from conftest import ALL_DTYPES, COMPUTE_ROUNDOFF, UNIT_ROUNDOFF
from mrgd_ext import _C
from mrgd_ext.ops import reference as ref
from mrgd_ext.ops import step_ops as _ops

CPU_ISAS = mrgd_ext.build_info()["cpu_isas_available"].split(",")


@pytest.fixture(autouse=True, params=CPU_ISAS)
def cpu_isa(request):
    """Run every kernel test once per CPU instruction-set build of the element loops."""
    _C._set_cpu_isa(request.param)
    assert mrgd_ext.build_info()["cpu_isa"] == request.param
    yield request.param
    _C._set_cpu_isa("auto")


def test_unknown_cpu_isa_is_refused():
    with pytest.raises(ValueError, match="not available"):
        _C._set_cpu_isa("avx1024")

# Tensor-size lists: empty list, zero- and one-element tensors, odd sizes, many tensors of mixed sizes
# (crossing the kernels' chunk boundaries of 8 Ki and 64 Ki elements).
SIZE_LISTS = {
    "empty": [],
    "zero": [0],
    "one": [1],
    "odd": [7, 0, 1, 33],
    "chunky": [65537, 8193, 3],
    "many": [int(s) for s in torch.randint(0, 3000, (37,), generator=torch.Generator().manual_seed(1))],
}


def make_lists(sizes, dtype, offset=False):
    """Random params/grads; with offset=True each tensor is a view one element into a larger buffer, so its
    data pointer is misaligned for vector loads."""
    params, grads = [], []
    for n in sizes:
        if offset:
            params.append(torch.randn(n + 1).to(dtype)[1:])
            grads.append(torch.randn(n + 1).to(dtype)[1:])
        else:
            params.append(torch.randn(n).to(dtype))
            grads.append(torch.randn(n).to(dtype))
    return params, grads


def truth_step(params, grads, lr, wd, maximize, scale):
    sign = -1.0 if maximize else 1.0
    return [p.double() - lr * (g.double() * sign / scale + wd * p.double()) for p, g in zip(params, grads)]


def assert_within(result, truth, bound, what):
    # Below the smallest normal number, rounding to storage has an absolute error of half the subnormal
    # spacing instead of a relative one.
    bound = bound + torch.finfo(result.dtype).smallest_normal * torch.finfo(result.dtype).eps
    excess = (result.double() - truth).abs() - bound
    assert excess.numel() == 0 or excess.max().item() <= 0.0, f"{what}: error exceeds bound by {excess.max().item()}"


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("sizes", list(SIZE_LISTS), ids=list(SIZE_LISTS))
@pytest.mark.parametrize("maximize,wd,scale", [(False, 0.0, None), (True, 0.05, 1024.0)])
def test_multirate_step_matches_reference_and_truth(dtype, sizes, maximize, wd, scale):
    params, grads = make_lists(SIZE_LISTS[sizes], dtype)
    if scale is not None:
        grads = [g * scale for g in grads]
    grad_scale = torch.tensor([scale], dtype=torch.float32) if scale is not None else None
    lr = 0.37
    truth = truth_step(params, grads, lr, wd, maximize, scale or 1.0)
    kernel = [p.clone() for p in params]
    reference = [p.clone() for p in params]
    _ops.multirate_step_(kernel, grads, lr, weight_decay=wd, maximize=maximize, grad_scale=grad_scale)
    ref.multirate_step(reference, grads, lr, weight_decay=wd, maximize=maximize, grad_scale=grad_scale)
    u, uc = UNIT_ROUNDOFF[dtype], COMPUTE_ROUNDOFF[dtype]
    for i, (k, r, t, p, g) in enumerate(zip(kernel, reference, truth, params, grads)):
        # One rounding to storage (u |t|) plus a few compute-precision roundings of each term.
        magnitude = p.double().abs() + lr * ((g.double() / (scale or 1.0)).abs() + wd * p.double().abs())
        bound = 1.01 * u * t.abs() + 4 * uc * magnitude + 1e-300
        assert_within(k, t, bound, f"kernel tensor {i}")
        assert_within(r, t, bound, f"reference tensor {i}")
        assert k.dtype == dtype and k.shape == p.shape


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_multirate_step_misaligned_views(dtype):
    params, grads = make_lists([1001, 17, 4099], dtype, offset=True)
    kernel = [p.clone() for p in params]
    reference = [p.clone() for p in params]
    _ops.multirate_step_(kernel, grads, 0.1)
    ref.multirate_step(reference, grads, 0.1)
    for k, r in zip(kernel, reference):
        torch.testing.assert_close(k, r, rtol=0, atol=0)  # same arithmetic, same order on the CPU


def test_multirate_step_found_inf_skips_everything():
    params, grads = make_lists([5, 7], torch.float32)
    before = [p.clone() for p in params]
    _ops.multirate_step_(params, grads, 0.5, found_inf=torch.tensor([1.0]), grad_scale=torch.tensor([2.0]))
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    _ops.multirate_step_(params, grads, 0.5, found_inf=torch.tensor([0.0]))
    assert not torch.equal(params[0], before[0])


def test_multirate_step_on_plain_sgd_matches_torch_fused_sgd():
    params, grads = make_lists([1000, 3, 77], torch.float32)
    mine = [p.clone() for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    for t, g in zip(theirs, grads):
        t.grad = g.clone()
    torch.optim.SGD(theirs, lr=0.3, weight_decay=0.01, fused=True).step()
    _ops.multirate_step_(mine, grads, 0.3, weight_decay=0.01)
    for m, t in zip(mine, theirs):
        # torch's fused SGD may evaluate p - lr*(g + wd*p) with a different association: a few ulps.
        torch.testing.assert_close(m, t.detach(), rtol=4e-7, atol=1e-7)


# ------------------------------------------------------------------------------------------------------
# Subspace step


def truth_project(params, grads, basis, wd, maximize, scale):
    sign = -1.0 if maximize else 1.0
    flat_p = torch.cat([p.reshape(-1).double() for p in params]) if params else torch.zeros(0, dtype=torch.float64)
    flat_g = torch.cat([g.reshape(-1).double() for g in grads]) if grads else torch.zeros(0, dtype=torch.float64)
    geff = flat_g * sign / scale + wd * flat_p
    return basis.double() @ geff, (basis.double().abs() @ geff.abs())


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("basis_dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("sizes", ["empty", "one", "odd", "chunky", "many"])
@pytest.mark.parametrize("r", [1, 4, 16])
def test_subspace_project_matches_reference_and_truth(dtype, basis_dtype, sizes, r):
    params, grads = make_lists(SIZE_LISTS[sizes], dtype)
    n = sum(p.numel() for p in params)
    basis = torch.randn(r, n).to(basis_dtype)
    wd, scale = 0.03, 8.0
    grads = [g * scale for g in grads]
    grad_scale = torch.tensor([scale])
    kw = dict(weight_decay=wd, maximize=True, grad_scale=grad_scale)
    c = _ops.subspace_project(params, grads, basis, **kw)
    c_ref = ref.subspace_project(params, grads, basis, **kw)
    truth, abs_sum = truth_project(params, grads, basis, wd, True, scale)
    expected_dtype = torch.float64 if dtype == torch.float64 and params else torch.float32
    assert c.dtype == expected_dtype and c.shape == (r,)
    # Per-chunk sums run in the compute precision over at most 8192 terms (split across SIMD lanes) and the
    # chunk sums are added in double: worst case ~ 8192 * u_c * sum|U_ki geff_i|; random signs give far
    # less, so 1e-5 (float32) / 1e-12 (float64) of sum|U_ki geff_i| is a bound with a wide margin that
    # still catches any wrong term (an O(1) relative error).
    rel = 1e-12 if expected_dtype == torch.float64 else 1e-5
    assert_within(c, truth, rel * abs_sum + 1e-300, "kernel projection")
    assert_within(c_ref.to(c.dtype), truth, rel * abs_sum + 1e-300, "reference projection")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("basis_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sizes", ["empty", "zero", "odd", "chunky", "many"])
@pytest.mark.parametrize("r", [1, 5])
def test_subspace_step_matches_reference_and_truth(dtype, basis_dtype, sizes, r):
    params, grads = make_lists(SIZE_LISTS[sizes], dtype)
    n = sum(p.numel() for p in params)
    basis = torch.randn(r, n).to(basis_dtype)
    coeff_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    coeffs = torch.randn(r, dtype=coeff_dtype) * 1e-2
    lr, wd = 0.2, 0.01
    kernel = [p.clone() for p in params]
    reference = [p.clone() for p in params]
    kw = dict(weight_decay=wd, maximize=False)
    _ops.subspace_step_(kernel, grads, basis, coeffs, lr, **kw)
    ref.subspace_step(reference, grads, basis, coeffs, lr, **kw)
    correction = coeffs.double() @ basis.double() if n else torch.zeros(0, dtype=torch.float64)
    correction_abs = coeffs.double().abs() @ basis.double().abs() if n else torch.zeros(0, dtype=torch.float64)
    u, uc = UNIT_ROUNDOFF[dtype], COMPUTE_ROUNDOFF[dtype]
    offset = 0
    for i, (k, rr, p, g) in enumerate(zip(kernel, reference, params, grads)):
        m = p.numel()
        pd, gd = p.double().reshape(-1), g.double().reshape(-1)
        truth = pd - lr * (gd + wd * pd) - correction[offset : offset + m]
        magnitude = pd.abs() + lr * (gd.abs() + wd * pd.abs()) + (r + 2) * correction_abs[offset : offset + m]
        bound = 1.01 * u * truth.abs() + 4 * uc * magnitude + 1e-300
        assert_within(k.reshape(-1), truth, bound, f"kernel tensor {i}")
        assert_within(rr.reshape(-1), truth, bound, f"reference tensor {i}")
        offset += m


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("basis_dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("sizes", ["empty", "zero", "one", "odd", "chunky", "many"])
@pytest.mark.parametrize("r", [1, 5])
@pytest.mark.parametrize("maximize,wd,scale", [(False, 0.0, None), (True, 0.03, 8.0)])
def test_subspace_momentum_step_matches_reference_and_truth(dtype, basis_dtype, sizes, r, maximize, wd, scale):
    # d = lr geff + U^T coeffs; v <- mu v + d; p <- p - d - mu v (NOTE: [momentum subspace update]).
    params, grads = make_lists(SIZE_LISTS[sizes], dtype)
    buffers, _ = make_lists(SIZE_LISTS[sizes], dtype)
    n = sum(p.numel() for p in params)
    basis = torch.randn(r, n).to(basis_dtype)
    coeff_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    coeffs = torch.randn(r, dtype=coeff_dtype) * 1e-2
    if scale is not None:
        grads = [g * scale for g in grads]
    grad_scale = torch.tensor([scale]) if scale is not None else None
    lr, mu = 0.2, 0.9
    kernel_p, kernel_v = [p.clone() for p in params], [v.clone() for v in buffers]
    ref_p, ref_v = [p.clone() for p in params], [v.clone() for v in buffers]
    kw = dict(weight_decay=wd, maximize=maximize, grad_scale=grad_scale)
    _ops.subspace_momentum_step_(kernel_p, grads, kernel_v, basis, coeffs, lr, mu, **kw)
    ref.subspace_momentum_step(ref_p, grads, ref_v, basis, coeffs, lr, mu, **kw)
    correction = coeffs.double() @ basis.double() if n else torch.zeros(0, dtype=torch.float64)
    correction_abs = coeffs.double().abs() @ basis.double().abs() if n else torch.zeros(0, dtype=torch.float64)
    u, uc = UNIT_ROUNDOFF[dtype], COMPUTE_ROUNDOFF[dtype]
    sign, gs = (-1.0 if maximize else 1.0), (scale or 1.0)
    offset = 0
    for i, (p, g, v) in enumerate(zip(params, grads, buffers)):
        m = p.numel()
        pd, gd, vd = p.double().reshape(-1), g.double().reshape(-1), v.double().reshape(-1)
        corr = correction[offset : offset + m]
        d = lr * (sign * gd / gs + wd * pd) + corr
        v_truth = mu * vd + d
        p_truth = pd - d - mu * v_truth
        # Each result is a handful of operations in the compute precision (u_c each, on terms up to the
        # magnitudes below; the correction sums r products) and one rounding to storage (u): 4 u_c of the
        # magnitude plus 1.01 u of the value bounds them with margin, and catches any wrong term (O(1)).
        d_mag = lr * (gd.abs() / gs + wd * pd.abs()) + (r + 2) * correction_abs[offset : offset + m]
        v_mag = mu * vd.abs() + d_mag
        p_mag = pd.abs() + d_mag + 2 * mu * v_mag
        for what, (kp, kv) in {"kernel": (kernel_p[i], kernel_v[i]), "reference": (ref_p[i], ref_v[i])}.items():
            assert_within(kv.reshape(-1), v_truth, 1.01 * u * v_truth.abs() + 4 * uc * v_mag + 1e-300,
                          f"{what} buffer {i}")
            assert_within(kp.reshape(-1), p_truth, 1.01 * u * p_truth.abs() + 4 * uc * p_mag + 1e-300,
                          f"{what} tensor {i}")
        offset += m


def test_subspace_momentum_step_equals_its_composition():
    # The fused pass and the composition it replaces (scale v; v += P g and p -= P g with the update kernel;
    # p -= mu v) agree to rounding, float64.
    params, grads = make_lists([65537, 7, 1], torch.float64)
    buffers, _ = make_lists([65537, 7, 1], torch.float64)
    basis = torch.randn(4, 65545, dtype=torch.float64)
    coeffs = torch.randn(4, dtype=torch.float64) * 1e-2
    lr, mu, wd = 0.3, 0.8, 0.01
    fused_p, fused_v = [p.clone() for p in params], [v.clone() for v in buffers]
    comp_p, comp_v = [p.clone() for p in params], [v.clone() for v in buffers]
    _ops.subspace_momentum_step_(fused_p, grads, fused_v, basis, coeffs, lr, mu)
    torch._foreach_mul_(comp_v, mu)
    _ops.subspace_step_(comp_v, grads, basis, -coeffs, -lr)
    _ops.subspace_step_(comp_p, grads, basis, coeffs, lr)
    torch._foreach_add_(comp_p, comp_v, alpha=-mu)
    for a, b in zip(fused_p + fused_v, comp_p + comp_v):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-13)
    # weight decay reads the parameters before the step: the fused pass takes it on geff for both updates
    p1, v1 = [p.clone() for p in params], [v.clone() for v in buffers]
    _ops.subspace_momentum_step_(p1, grads, v1, basis, coeffs, lr, mu, weight_decay=wd)
    geff = [g + wd * p for g, p in zip(grads, params)]
    p2, v2 = [p.clone() for p in params], [v.clone() for v in buffers]
    _ops.subspace_momentum_step_(p2, geff, v2, basis, coeffs, lr, mu)
    for a, b in zip(p1 + v1, p2 + v2):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-13)


def test_subspace_momentum_step_found_inf_skips_and_bad_input_writes_nothing():
    params, grads = make_lists([9, 4], torch.float32)
    buffers, _ = make_lists([9, 4], torch.float32)
    basis, coeffs = torch.randn(2, 13), torch.ones(2)
    everything = params + buffers
    before = [t.clone() for t in everything]
    _ops.subspace_momentum_step_(params, grads, buffers, basis, coeffs, 0.1, 0.9, found_inf=torch.tensor([1.0]))
    assert all(torch.equal(t, b) for t, b in zip(everything, before))
    step = _ops.subspace_momentum_step_
    _assert_untouched(lambda: step(params, grads, buffers[:1], basis, coeffs, 0.1, 0.9), everything, ValueError,
                      "momentum_buffers must have one tensor per parameter")
    _assert_untouched(lambda: step(params, grads, [buffers[0], torch.zeros(5)], basis, coeffs, 0.1, 0.9), everything,
                      ValueError, r"momentum_buffers\[1\] must be a torch.float32 tensor of shape \(4,\)")
    _assert_untouched(lambda: step(params, grads, [buffers[0], buffers[1].double()], basis, coeffs, 0.1, 0.9),
                      everything, ValueError, r"momentum_buffers\[1\]")
    _assert_untouched(lambda: step(params, grads, [buffers[0], params[1]], basis, coeffs, 0.1, 0.9), everything,
                      ValueError, "shares memory")
    nc = torch.randn(2, 2).t()
    _assert_untouched(lambda: step([params[1].reshape(2, 2)], [grads[1].reshape(2, 2)], [nc], torch.randn(2, 4),
                                   coeffs, 0.1, 0.9), everything, ValueError, "not contiguous")
    _assert_untouched(lambda: step(params, grads, buffers, basis, coeffs, 0.1, float("nan")), everything, ValueError,
                      "momentum")
    _assert_untouched(lambda: step(params, grads, buffers, basis, torch.ones(3), 0.1, 0.9), everything, ValueError,
                      "coeffs")
    # The C++ checks behind a direct op call
    _assert_untouched(lambda: torch.ops.mrgd_ext.subspace_momentum_step_(params, grads, buffers[:1], basis, coeffs,
                                                                         0.1, 0.9, 0.0, False),
                      everything, RuntimeError, "momentum_buffers")


def test_subspace_step_found_inf_skips():
    params, grads = make_lists([9, 4], torch.float32)
    before = [p.clone() for p in params]
    basis = torch.randn(2, 13)
    _ops.subspace_step_(params, grads, basis, torch.ones(2), 0.1, found_inf=torch.tensor([1.0]))
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_full_subspace_step_exact_on_quadratic_eigenbasis():
    """Closed form: with U the exact eigenvectors of H and rates 1/lambda, one step solves those directions."""
    torch.manual_seed(3)
    n = 41
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    lam = torch.cat([torch.tensor([100.0, 50.0, 20.0]), torch.linspace(0.5, 1.0, n - 3)]).double()
    H = q @ torch.diag(lam) @ q.T
    x = torch.randn(n, dtype=torch.float64)
    g = H @ x
    basis = q[:, :3].T.contiguous()  # [3, n]
    base_lr = 1.0 / 1.0
    c = _ops.subspace_project([x], [g], basis)
    coeffs = (1.0 / lam[:3] - base_lr) * c
    x_new = x.clone()
    _ops.subspace_step_([x_new], [g], basis, coeffs, base_lr)
    # The component of the error along each of the top three eigenvectors is removed exactly.
    torch.testing.assert_close(basis @ x_new, torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    # The rest moved by (1 - base_lr * lambda).
    rest = q[:, 3:].T
    torch.testing.assert_close(rest @ x_new, (1 - base_lr * lam[3:]) * (rest @ x), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------------
# Operator registration checks (schema, fake/meta implementation, mutation annotations).


def test_opcheck_multirate_step():
    params, grads = make_lists([17, 3], torch.float32)
    torch.library.opcheck(torch.ops.mrgd_ext.multirate_step_.default, (params, grads, 0.1, 0.01, False, None, None))
    torch.library.opcheck(
        torch.ops.mrgd_ext.multirate_step_.default,
        (params, grads, 0.1, 0.0, True, torch.tensor([2.0]), torch.tensor([0.0])),
    )


def test_opcheck_subspace_ops():
    params, grads = make_lists([17, 3], torch.float32)
    basis = torch.randn(4, 20)
    torch.library.opcheck(torch.ops.mrgd_ext.subspace_project.default, (params, grads, basis, 0.0, False, None))
    torch.library.opcheck(
        torch.ops.mrgd_ext.subspace_step_.default, (params, grads, basis, torch.randn(4), 0.1, 0.0, False, None, None)
    )


# ------------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, nothing written.


def _assert_untouched(call, params, exc, match):
    before = [p.clone() for p in params]
    with pytest.raises(exc, match=match):
        call()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_bad_inputs_are_rejected_before_any_write():
    p, g = make_lists([5, 6], torch.float32)
    _assert_untouched(lambda: _ops.multirate_step_(p, g[:1], 0.1), p, ValueError, "same length")
    _assert_untouched(lambda: _ops.multirate_step_(p, [g[0], g[1].double()], 0.1), p, TypeError, r"grads\[1\]")
    _assert_untouched(lambda: _ops.multirate_step_(p, [g[0], torch.randn(7)], 0.1), p, ValueError, r"grads\[1\]")
    mixed = [p[0], p[1].double()]
    _assert_untouched(lambda: _ops.multirate_step_(mixed, [g[0], g[1].double()], 0.1), p, TypeError, r"params\[1\]")
    nc = torch.randn(4, 6).t()
    _assert_untouched(lambda: _ops.multirate_step_([nc], [torch.randn(6, 4)], 0.1), [nc], ValueError, "contiguous")
    meta = [p[0], torch.empty(6, device="meta")]
    _assert_untouched(lambda: _ops.multirate_step_(meta, [g[0], torch.empty(6, device="meta")], 0.1), p, ValueError,
                      r"params\[1\] is on meta")
    sparse = torch.randn(6).to_sparse()
    _assert_untouched(lambda: _ops.multirate_step_([p[1]], [sparse], 0.1), p, RuntimeError, "sparse")
    ints = [torch.arange(5)]
    _assert_untouched(lambda: _ops.multirate_step_(ints, [torch.arange(5)], 0.1), p, TypeError, "dtype")
    _assert_untouched(lambda: _ops.multirate_step_(p, g, 0.1, grad_scale=torch.tensor([1.0, 2.0])), p, ValueError,
                      "grad_scale")
    _assert_untouched(lambda: _ops.subspace_project(p, g, torch.randn(3, 10)), p, ValueError, "basis has 10 columns")
    _assert_untouched(lambda: _ops.subspace_project(p, g, torch.randn(11)), p, ValueError, "basis must be 2-D")
    _assert_untouched(lambda: _ops.subspace_project(p, g, torch.randn(3, 11, dtype=torch.float16)), p, TypeError,
                      "basis must be")
    _assert_untouched(lambda: _ops.subspace_project(p, g, torch.randn(11, 3).t()), p, ValueError, "contiguous")
    _assert_untouched(lambda: _ops.subspace_step_(p, g, torch.randn(3, 11), torch.randn(2), 0.1), p, ValueError,
                      "coeffs")
    _assert_untouched(lambda: _ops.subspace_step_(p, g, torch.randn(3, 11), torch.randn(3).double(), 0.1), p,
                      ValueError, "coeffs")


def test_direct_op_calls_are_checked_in_cpp():
    """torch.ops.mrgd_ext.* called without the Python wrapper still refuse bad input (RuntimeError)."""
    p, g = make_lists([5], torch.float32)
    with pytest.raises(RuntimeError, match="same length"):
        torch.ops.mrgd_ext.multirate_step_(p, [], 0.1, 0.0, False)
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.mrgd_ext.subspace_project(p, g, torch.randn(2, 4), 0.0, False)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_multirate_step_rounding_and_special_values_match_torch_casts(dtype):
    """Narrowing to storage rounds to nearest even exactly like torch's casts, and inf/nan propagate.

    Values sit on rounding ties of the 16-bit formats, and the sizes leave a scalar tail after the 8-lane
    vector loop, so both code paths of every ISA are compared bit for bit with the reference.
    """
    n = 8 * 5 + 3
    p = torch.randn(n).to(dtype)
    p[:4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0]).to(dtype)
    p[-2:] = torch.tensor([float("nan"), float("inf")]).to(dtype)
    g = torch.randn(n).to(dtype)
    g[5] = float("nan")
    kernel, reference = [p.clone()], [p.clone()]
    lr = 1.0 / 3.0  # not a power of two: many results land between representable values
    _ops.multirate_step_(kernel, [g], lr, weight_decay=0.125)
    ref.multirate_step(reference, [g], lr, weight_decay=0.125)
    torch.testing.assert_close(kernel[0], reference[0], rtol=0, atol=0, equal_nan=True)


def test_ops_trace_under_torch_compile():
    """The fake implementations let torch.compile trace the ops into one graph (no graph breaks)."""
    params, grads = make_lists([33, 7], torch.float32)
    basis = torch.randn(3, 40)

    def step(ps, gs, u):
        c = torch.ops.mrgd_ext.subspace_project(ps, gs, u, 0.0, False)
        torch.ops.mrgd_ext.subspace_step_(ps, gs, u, -0.1 * c, 0.2, 0.0, False)
        torch.ops.mrgd_ext.multirate_step_(ps, gs, 0.1, 0.0, False)

    eager = [p.clone() for p in params]
    compiled = [p.clone() for p in params]
    step(eager, grads, basis)
    torch.compile(step, backend="aot_eager", fullgraph=True)(compiled, grads, basis)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------
# NOTE: [no decay term]: weight_decay == 0 adds no term, as torch.optim.SGD


def _special_values(dtype):
    # inf * 0 would be NaN and the signed zeros would flip if a zero decay term were added.
    vals = [float("inf"), float("-inf"), -0.0, 0.0, 1.5, -2.0, 3.0e3]
    # 19 elements: the AVX2 lanes (16 at a time for 16-bit types), then the scalar tail.
    return torch.tensor(vals * 2 + vals[:5], dtype=dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_temporal_step_adds_a_decay_term_only_when_weight_decay_is_nonzero(dtype, weight_decay):
    p0 = _special_values(dtype)
    g = torch.linspace(-1.0, 1.0, p0.numel()).to(dtype)
    g[3] = -0.0  # a signed-zero gradient on a signed-zero parameter
    fused, foreach, reference = p0.clone(), p0.clone(), p0.clone()
    _ops.multirate_step_([fused], [g], 0.25, weight_decay=weight_decay)
    ref.multirate_step([reference], [g], 0.25, weight_decay=weight_decay)
    p_sgd = torch.nn.Parameter(p0.clone())
    p_sgd.grad = g.clone()
    torch.optim.SGD([p_sgd], lr=0.25, weight_decay=weight_decay, foreach=False).step()
    opt = mrgd_ext.MrGD([torch.nn.Parameter(foreach)], plan=[0.25], weight_decay=weight_decay, foreach=True,
                        fused=False)
    opt.param_groups[0]["params"][0].grad = g.clone()
    opt.step()
    foreach = opt.param_groups[0]["params"][0].detach()
    if weight_decay == 0.0:
        assert torch.isinf(fused[:2]).all()  # an infinite parameter stays infinite, as in SGD
    for got in (fused, reference, foreach):
        _assert_same_bits(got, p_sgd.detach())


def _assert_same_bits(got, want):
    """NaN exactly where ``want`` has NaN (payloads aside), every other element bit for bit (signed zeros)."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    keep = ~torch.isnan(want)
    assert torch.equal(got.view(bits)[keep], want.view(bits)[keep]), (got, want)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_subspace_ops_add_a_decay_term_only_when_weight_decay_is_nonzero(weight_decay):
    p0 = _special_values(torch.float64)
    g = torch.linspace(-1.0, 1.0, p0.numel(), dtype=torch.float64)
    basis = torch.zeros(1, p0.numel(), dtype=torch.float64)
    basis[0, 4] = 1.0  # a finite coordinate, so the projection stays finite
    c_kernel = _ops.subspace_project([p0], [g], basis, weight_decay=weight_decay)
    c_ref = ref.subspace_project([p0], [g], basis, weight_decay=weight_decay)
    _assert_same_bits(c_kernel, c_ref)  # NaN with a decay term: 0 * (g + 0.1 * inf) in the dot product
    coeffs = torch.tensor([0.5], dtype=torch.float64)
    fused, reference = p0.clone(), p0.clone()
    _ops.subspace_step_([fused], [g], basis, coeffs, 0.25, weight_decay=weight_decay)
    ref.subspace_step([reference], [g], basis, coeffs, 0.25, weight_decay=weight_decay)
    _assert_same_bits(fused, reference)
    assert torch.isinf(fused[:2]).all() == (weight_decay == 0.0)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_temporal_step_is_the_same_for_any_thread_split(threads):
    # NOTE: [balanced element-wise split]: threads take ranges of the flat element range that start and end
    # inside tensors and skip empty ones; every element must be updated exactly once, whatever the split.
    sizes = [0, 70001, 0, 0, 1, 65536, 3, 0, 40000, 1000, 0]
    g = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=g) for s in sizes]
    grads = [torch.randn(s, generator=g) for s in sizes]
    expected = [p.clone() for p in params]
    ref.multirate_step(expected, grads, 0.3, weight_decay=0.01)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _ops.multirate_step_(params, grads, 0.3, weight_decay=0.01)
    finally:
        torch.set_num_threads(before)
    for got, want in zip(params, expected):
        assert torch.equal(got, want)
