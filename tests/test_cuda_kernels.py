"""CUDA kernels vs the CPU kernels vs float64 truth, on every dtype, odd sizes and misaligned storage.

Every test here needs a CUDA device and a build with the CUDA kernels; without either the module is skipped
(set MRGD_REQUIRE_CUDA=1 to turn that skip into a failure, e.g. on a GPU CI runner). The ops are called
through torch.ops directly, so these tests exercise the kernels, not the Python wrappers.
"""

import os
import re

import pytest
import torch

from conftest import ALL_DTYPES, COMPUTE_ROUNDOFF, UNIT_ROUNDOFF
from mrgd_ext.ops import registry  # loads the library and the fake implementations opcheck needs

HAS_CUDA_KERNELS = registry.has_kernel("cuda")
_MISSING = (
    "no CUDA device" if not torch.cuda.is_available()
    else "mrgd_ext was built without CUDA kernels" if not HAS_CUDA_KERNELS
    else None
)
if _MISSING is not None and os.environ.get("MRGD_REQUIRE_CUDA") == "1":
    raise RuntimeError(f"MRGD_REQUIRE_CUDA=1 but {_MISSING}")

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")]

#: The device under test (a module constant so that a debugging harness can point the tests elsewhere).
DEVICE = torch.device("cuda", 0)
step_op = torch.ops.mrgd_ext.multirate_step_
project_op = torch.ops.mrgd_ext.subspace_project
subspace_step_op = torch.ops.mrgd_ext.subspace_step_
momentum_step_op = torch.ops.mrgd_ext.subspace_momentum_step_

_rng = torch.Generator().manual_seed(1234)
# Tensor-size lists. The CUDA kernels take 16 Ki (step) and 8 Ki (subspace) element chunks per block and pack
# at most 110 (step) / 96 (subspace) tensors into one launch, so "chunky" crosses chunk boundaries inside
# tensors and "lots" needs several launches; sizes are mostly not multiples of the 4/8-element vectors.
SIZE_LISTS = {
    "zero": [0],
    "one": [1],
    "odd": [7, 0, 1, 33, 3, 5, 9],
    "shaped": [(3, 5), (2, 1, 7), (1,), (4, 0)],
    "chunky": [16385, 8193, 3, 40001],
    "many": [int(s) for s in torch.randint(0, 3000, (37,), generator=_rng)],
    "lots": [int(s) for s in torch.randint(0, 200, (250,), generator=_rng)],
}
# Storage offsets (in elements) of the device copies: "offset1" puts every tensor one element into a larger
# buffer, so no data pointer is 16-byte aligned (scalar path); "mixed" misaligns params and grads
# independently, so some tensors have one aligned and one misaligned operand.
ALIGNMENTS = ("aligned", "offset1", "mixed")


def make_lists(sizes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s if isinstance(s, tuple) else (s,), generator=gen).to(dtype) for s in sizes]
    grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
    return params, grads


def to_device(tensors, offsets):
    """Device copies of `tensors`, each a view `offset` elements into its own buffer."""
    out = []
    for t, off in zip(tensors, offsets):
        buf = torch.empty(t.numel() + off, dtype=t.dtype, device=DEVICE)
        view = buf[off:].view(t.shape)
        view.copy_(t)
        out.append(view)
    return out


def device_lists(params, grads, alignment):
    n = len(params)
    if alignment == "aligned":
        po, go = [0] * n, [0] * n
    elif alignment == "offset1":
        po, go = [1] * n, [1] * n
    else:
        po, go = [i % 2 for i in range(n)], [(i // 2) % 2 for i in range(n)]
    return to_device(params, po), to_device(grads, go)


def assert_within(result, truth, bound, what):
    # Below the smallest normal number, rounding to storage has an absolute error of half the subnormal
    # spacing instead of a relative one.
    bound = bound + torch.finfo(result.dtype).smallest_normal * torch.finfo(result.dtype).eps
    excess = (result.double() - truth).abs() - bound
    assert excess.numel() == 0 or excess.max().item() <= 0.0, f"{what}: error exceeds bound by {excess.max().item()}"


def assert_bitwise(cuda_tensors, cpu_tensors, what):
    # NOTE: [CUDA rounding] (CMakeLists.txt): both kernels evaluate the same update_math.h expressions in the
    # same order with no FMA contraction and IEEE division, so element-wise results agree to the bit.
    for i, (c, h) in enumerate(zip(cuda_tensors, cpu_tensors)):
        c = c.cpu()
        assert c.dtype == h.dtype and c.shape == h.shape
        if not torch.equal(c, h):
            diff = (c.double() - h.double()).abs()
            raise AssertionError(f"{what} tensor {i}: CUDA differs from CPU in {int((diff > 0).sum())} of "
                                 f"{diff.numel()} elements (max |diff| {diff.max().item():.3e})")


def flat64(tensors):
    return torch.cat([t.reshape(-1).double() for t in tensors]) if tensors else torch.zeros(0, dtype=torch.float64)


def cuda_scalar(x):
    return torch.tensor([x], dtype=torch.float32, device=DEVICE)


# ------------------------------------------------------------------------------------------------------
# multirate_step_


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("sizes", list(SIZE_LISTS))
@pytest.mark.parametrize("alignment", ALIGNMENTS)
@pytest.mark.parametrize("maximize,wd,scale", [(False, 0.0, None), (True, 0.05, 1024.0)])
def test_multirate_step_cuda_matches_cpu_and_truth(dtype, sizes, alignment, maximize, wd, scale):
    params, grads = make_lists(SIZE_LISTS[sizes], dtype)
    if scale is not None:
        grads = [(g.float() * scale).to(dtype) for g in grads]
    lr = 0.37
    cpu = [p.clone() for p in params]
    step_op(cpu, grads, lr, wd, maximize, torch.tensor([scale]) if scale else None, torch.zeros(1) if scale else None)
    dp, dg = device_lists(params, grads, alignment)
    step_op(dp, dg, lr, wd, maximize, cuda_scalar(scale) if scale else None, cuda_scalar(0.0) if scale else None)
    assert_bitwise(dp, cpu, "multirate_step_")

    u, uc, s = UNIT_ROUNDOFF[dtype], COMPUTE_ROUNDOFF[dtype], scale or 1.0
    sign = -1.0 if maximize else 1.0
    for i, (k, p, g) in enumerate(zip(dp, params, grads)):
        pd, gd = p.double(), g.double()
        truth = pd - lr * (gd * sign / s + wd * pd)
        # One rounding to storage (u |truth|) plus a few compute-precision roundings of each term.
        magnitude = pd.abs() + lr * ((gd / s).abs() + wd * pd.abs())
        assert_within(k.cpu(), truth, 1.01 * u * truth.abs() + 4 * uc * magnitude + 1e-300, f"tensor {i}")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_multirate_step_cuda_special_values_match_cpu(dtype):
    """inf/nan propagate alike, and values on the rounding ties of the 16-bit formats round alike."""
    n = 8 * 5 + 3  # a scalar tail after the 16-byte vectors of every dtype
    p = torch.randn(n).to(dtype)
    p[:4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0]).to(dtype)
    p[-2:] = torch.tensor([float("nan"), float("inf")]).to(dtype)
    g = torch.randn(n).to(dtype)
    g[5] = float("nan")
    cpu = [p.clone()]
    step_op(cpu, [g], 1.0 / 3.0, 0.125, False)
    for alignment in ("aligned", "offset1"):
        dp, dg = device_lists([p], [g], alignment)
        step_op(dp, dg, 1.0 / 3.0, 0.125, False)
        # NaN payloads may differ (c10::BFloat16 on the device vs the CPU's canonical quiet NaN); compare
        # NaN-ness, and every other value exactly.
        torch.testing.assert_close(dp[0].cpu(), cpu[0], rtol=0, atol=0, equal_nan=True)


def test_multirate_step_cuda_found_inf_skips_and_is_read_on_device():
    params, grads = make_lists([5, 7, 20000], torch.float32)
    dp, dg = device_lists(params, grads, "aligned")
    before = [p.clone() for p in dp]
    found_inf, grad_scale = cuda_scalar(1.0), cuda_scalar(2.0)
    step_op(dp, dg, 0.5, 0.1, False, grad_scale, found_inf)
    assert all(torch.equal(p, b) for p, b in zip(dp, before))
    found_inf.zero_()  # the same tensor, changed on the device: the kernel must see the new value
    step_op(dp, dg, 0.5, 0.1, False, grad_scale, found_inf)
    cpu = [p.clone() for p in params]
    step_op(cpu, grads, 0.5, 0.1, False, torch.tensor([2.0]), torch.tensor([0.0]))
    assert_bitwise(dp, cpu, "after found_inf cleared")


def test_multirate_step_cuda_empty_list_is_a_no_op():
    # The flag tensors are the only tensors, so they route the call to the CUDA kernel.
    step_op([], [], 0.1, 0.0, False, cuda_scalar(1.0), cuda_scalar(0.0))


def test_multirate_step_cuda_graph_capture_replays_with_live_flags():
    """No host synchronisation: the op captures into a CUDA graph, and grad_scale/found_inf are read at
    replay time (an op that read them on the host would fail to capture or bake the values in)."""
    params, grads = make_lists([1000, 3, 77], torch.float32)
    dp, dg = device_lists(params, grads, "aligned")
    grad_scale, found_inf = cuda_scalar(4.0), cuda_scalar(0.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs recommends
        step_op(dp, dg, 0.1, 0.01, True, grad_scale, found_inf)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step_op(dp, dg, 0.1, 0.01, True, grad_scale, found_inf)
    for p, p0 in zip(dp, params):
        p.copy_(p0)
    grad_scale.fill_(8.0)
    graph.replay()
    cpu = [p.clone() for p in params]
    step_op(cpu, grads, 0.1, 0.01, True, torch.tensor([8.0]), torch.tensor([0.0]))
    assert_bitwise(dp, cpu, "graph replay")
    found_inf.fill_(1.0)
    before = [p.clone() for p in dp]
    graph.replay()
    assert all(torch.equal(p, b) for p, b in zip(dp, before))


def test_multirate_step_cuda_on_side_stream_and_other_device():
    params, grads = make_lists([1001, 17], torch.float32)
    cpu = [p.clone() for p in params]
    step_op(cpu, grads, 0.2, 0.0, False)
    dp, dg = device_lists(params, grads, "aligned")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the kernel must run on the current (side) stream, ordered after the copies
        step_op(dp, dg, 0.2, 0.0, False)
    torch.cuda.current_stream().wait_stream(side)
    assert_bitwise(dp, cpu, "side stream")
    if torch.cuda.device_count() > 1:  # the device guard must switch to the tensors' device
        p1, g1 = [p.to("cuda:1") for p in params], [g.to("cuda:1") for g in grads]
        with torch.cuda.device(0):
            step_op(p1, g1, 0.2, 0.0, False)
        assert_bitwise(p1, cpu, "cuda:1")


def test_multirate_step_cuda_rejects_flags_on_another_device():
    params, grads = make_lists([5], torch.float32)
    dp, dg = device_lists(params, grads, "aligned")
    with pytest.raises(RuntimeError, match="grad_scale must be on"):
        step_op(dp, dg, 0.1, 0.0, False, torch.tensor([1.0]), None)


# ------------------------------------------------------------------------------------------------------
# subspace_project / subspace_step_

PROJECT_SIZES = ["zero", "one", "odd", "chunky", "many", "lots"]
RANKS = [1, 4, 16, 33]
BASIS_DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def truth_project(params, grads, basis, wd, maximize, scale):
    sign = -1.0 if maximize else 1.0
    fp, fg = flat64(params), flat64(grads)
    geff = fg * sign / scale + wd * fp
    # The size of the terms the kernels add up, |U| (|g / scale| + wd |p|): rounding errors scale with it.
    term_size = basis.double().abs() @ (fg.abs() / scale + wd * fp.abs())
    return basis.double() @ geff, term_size


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("basis_dtype", BASIS_DTYPES)
@pytest.mark.parametrize("sizes", PROJECT_SIZES)
@pytest.mark.parametrize("r", RANKS)
def test_subspace_project_cuda_matches_cpu_and_truth(dtype, basis_dtype, sizes, r):
    params, grads = make_lists(SIZE_LISTS[sizes], dtype)
    n = sum(p.numel() for p in params)
    basis = torch.randn(r, n).to(basis_dtype)
    wd, scale, maximize = 0.03, 8.0, True
    grads = [(g.float() * scale).to(dtype) for g in grads]
    c_cpu = project_op(params, grads, basis, wd, maximize, torch.tensor([scale]))
    dp, dg = device_lists(params, grads, "mixed")
    dbasis = basis.to(DEVICE)
    c = project_op(dp, dg, dbasis, wd, maximize, cuda_scalar(scale))
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert c.device == DEVICE and c.dtype == expected_dtype == c_cpu.dtype and c.shape == (r,)
    # Determinism: no atomics, fixed reduction trees (NOTE: [deterministic projection]).
    assert torch.equal(project_op(dp, dg, dbasis, wd, maximize, cuda_scalar(scale)), c)

    truth, term_size = truth_project(params, grads, basis, wd, maximize, scale)
    # Error budget of the CUDA kernel: geff and each product carry a few compute-precision roundings (u_c);
    # each thread sums at most 32 products in the compute precision (error <= ~32 u_c of their term sizes),
    # everything after that is in double, and the result is rounded once to float32/float64. For float32
    # compute that is ~2e-6 of term_size at worst; 1e-5 leaves a margin of 5x yet catches any wrong,
    # missing or doubled term (an O(1) relative error). For float64 compute, 1e-12 is ~10^4 u. The CPU kernel
    # meets the same bound (tests/test_kernels.py), so the two agree within twice it.
    rel = 1e-12 if expected_dtype == torch.float64 else 1e-5
    assert_within(c.cpu(), truth, rel * term_size + 1e-300, "CUDA projection vs truth")
    assert_within(c.cpu(), c_cpu.double(), 2 * rel * term_size + 1e-300, "CUDA vs CPU projection")


def test_subspace_project_cuda_empty_list_matches_cpu():
    for r in (0, 3):
        c = project_op([], [], torch.empty(r, 0, device=DEVICE), 0.0, False)
        c_cpu = project_op([], [], torch.empty(r, 0), 0.0, False)
        assert c.device == DEVICE and c.dtype == c_cpu.dtype == torch.float32 and c.shape == (r,)
        assert torch.equal(c.cpu(), c_cpu)
    with pytest.raises(RuntimeError, match=r"\[r, 0\]"):
        project_op([], [], torch.empty(2, 5, device=DEVICE), 0.0, False)


def test_subspace_project_cuda_rank_limit_is_checked_and_reached():
    """The rank limit is stated once, in the CUDA source; read it from the error and use it."""
    params, grads = make_lists([300, 5], torch.float32)
    dp, dg = device_lists(params, grads, "aligned")
    with pytest.raises(RuntimeError, match=r"at most \d+ rows") as info:
        project_op(dp, dg, torch.empty(1 << 16, 305, device=DEVICE), 0.0, False)
    limit = int(re.search(r"at most (\d+) rows", str(info.value)).group(1))
    assert limit >= 64
    basis = torch.randn(limit, 305)
    c = project_op(dp, dg, basis.to(DEVICE), 0.0, False)
    truth, term_size = truth_project(params, grads, basis, 0.0, False, 1.0)
    assert_within(c.cpu(), truth, 1e-5 * term_size, "projection at the rank limit")


def test_subspace_project_cuda_graph_capture():
    params, grads = make_lists([9000, 31], torch.float32)
    dp, dg = device_lists(params, grads, "aligned")
    basis = torch.randn(5, 9031, device=DEVICE)
    grad_scale = cuda_scalar(2.0)
    eager = project_op(dp, dg, basis, 0.01, False, grad_scale)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        project_op(dp, dg, basis, 0.01, False, grad_scale)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = project_op(dp, dg, basis, 0.01, False, grad_scale)
    graph.replay()
    assert torch.equal(captured, eager)
    grad_scale.fill_(4.0)  # read on the device at replay
    graph.replay()
    assert torch.equal(captured, project_op(dp, dg, basis, 0.01, False, grad_scale))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("basis_dtype", BASIS_DTYPES)
@pytest.mark.parametrize("sizes", ["zero", "odd", "chunky", "many", "lots"])
@pytest.mark.parametrize("r", RANKS)
def test_subspace_step_cuda_matches_cpu_and_truth(dtype, basis_dtype, sizes, r):
    params, grads = make_lists(SIZE_LISTS[sizes], dtype)
    n = sum(p.numel() for p in params)
    basis = torch.randn(r, n).to(basis_dtype)
    coeff_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    coeffs = torch.randn(r, dtype=coeff_dtype) * 1e-2
    lr, wd, scale, maximize = 0.2, 0.01, 16.0, True
    grads = [(g.float() * scale).to(dtype) for g in grads]
    cpu = [p.clone() for p in params]
    subspace_step_op(cpu, grads, basis, coeffs, lr, wd, maximize, torch.tensor([scale]), torch.zeros(1))
    dp, dg = device_lists(params, grads, "mixed")
    subspace_step_op(dp, dg, basis.to(DEVICE), coeffs.to(DEVICE), lr, wd, maximize, cuda_scalar(scale),
                     cuda_scalar(0.0))
    assert_bitwise(dp, cpu, "subspace_step_")

    correction = coeffs.double() @ basis.double() if n else torch.zeros(0, dtype=torch.float64)
    correction_abs = coeffs.double().abs() @ basis.double().abs() if n else torch.zeros(0, dtype=torch.float64)
    u, uc = UNIT_ROUNDOFF[dtype], COMPUTE_ROUNDOFF[dtype]
    fp, fg = flat64(params), -flat64(grads) / scale
    truth = fp - lr * (fg + wd * fp) - correction
    # One rounding to storage, a few compute-precision roundings of the gradient terms, and r + 2 roundings
    # of the running correction sum (plus rounding a float64 basis to float32 for low-precision params).
    magnitude = fp.abs() + lr * (fg.abs() + wd * fp.abs()) + (r + 2) * correction_abs
    bound = 1.01 * u * truth.abs() + 4 * uc * magnitude + 1e-300
    result = torch.cat([p.cpu().reshape(-1) for p in dp])
    assert_within(result, truth, bound, "CUDA subspace step vs truth")


def test_subspace_step_cuda_found_inf_skips_and_empty_list():
    params, grads = make_lists([9, 4, 9000], torch.float32)
    dp, dg = device_lists(params, grads, "aligned")
    before = [p.clone() for p in dp]
    basis, coeffs = torch.randn(2, 9013, device=DEVICE), torch.ones(2, device=DEVICE)
    found_inf = cuda_scalar(1.0)
    subspace_step_op(dp, dg, basis, coeffs, 0.1, 0.0, False, None, found_inf)
    assert all(torch.equal(p, b) for p, b in zip(dp, before))
    found_inf.zero_()
    subspace_step_op(dp, dg, basis, coeffs, 0.1, 0.0, False, None, found_inf)
    cpu = [p.clone() for p in params]
    subspace_step_op(cpu, grads, basis.cpu(), coeffs.cpu(), 0.1, 0.0, False, None, torch.zeros(1))
    assert_bitwise(dp, cpu, "after found_inf cleared")
    # An empty parameter list is a no-op, as on the CPU (the basis routes the call to the CUDA kernel).
    subspace_step_op([], [], torch.empty(3, 0, device=DEVICE), torch.ones(3, device=DEVICE), 0.1, 0.0, False)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("basis_dtype", BASIS_DTYPES)
@pytest.mark.parametrize("sizes", ["zero", "odd", "chunky", "many", "lots"])
@pytest.mark.parametrize("r", [1, 4, 33])
def test_subspace_momentum_step_cuda_matches_cpu_and_truth(dtype, basis_dtype, sizes, r):
    params, grads = make_lists(SIZE_LISTS[sizes], dtype)
    buffers, _ = make_lists(SIZE_LISTS[sizes], dtype, seed=1)
    n = sum(p.numel() for p in params)
    basis = torch.randn(r, n).to(basis_dtype)
    coeff_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    coeffs = torch.randn(r, dtype=coeff_dtype) * 1e-2
    lr, mu, wd, scale, maximize = 0.2, 0.9, 0.01, 16.0, True
    grads = [(g.float() * scale).to(dtype) for g in grads]
    cpu_p, cpu_v = [p.clone() for p in params], [v.clone() for v in buffers]
    momentum_step_op(cpu_p, grads, cpu_v, basis, coeffs, lr, mu, wd, maximize, torch.tensor([scale]), torch.zeros(1))
    dp, dg = device_lists(params, grads, "mixed")
    dv, _ = device_lists(buffers, buffers, "offset1")
    momentum_step_op(dp, dg, dv, basis.to(DEVICE), coeffs.to(DEVICE), lr, mu, wd, maximize, cuda_scalar(scale),
                     cuda_scalar(0.0))
    assert_bitwise(dp, cpu_p, "subspace_momentum_step_ params")
    assert_bitwise(dv, cpu_v, "subspace_momentum_step_ buffers")

    correction = coeffs.double() @ basis.double() if n else torch.zeros(0, dtype=torch.float64)
    correction_abs = coeffs.double().abs() @ basis.double().abs() if n else torch.zeros(0, dtype=torch.float64)
    u, uc = UNIT_ROUNDOFF[dtype], COMPUTE_ROUNDOFF[dtype]
    fp, fg, fv = flat64(params), -flat64(grads) / scale, flat64(buffers)
    d = lr * (fg + wd * fp) + correction
    v_truth = mu * fv + d
    p_truth = fp - d - mu * v_truth
    # As the CPU kernel test (tests/test_kernels.py): a few compute-precision roundings on the magnitudes
    # below and one rounding to storage.
    d_mag = lr * (fg.abs() + wd * fp.abs()) + (r + 2) * correction_abs
    v_mag = mu * fv.abs() + d_mag
    p_mag = fp.abs() + d_mag + 2 * mu * v_mag
    assert_within(torch.cat([v.cpu().reshape(-1) for v in dv]), v_truth,
                  1.01 * u * v_truth.abs() + 4 * uc * v_mag + 1e-300, "CUDA momentum buffers vs truth")
    assert_within(torch.cat([p.cpu().reshape(-1) for p in dp]), p_truth,
                  1.01 * u * p_truth.abs() + 4 * uc * p_mag + 1e-300, "CUDA momentum step vs truth")


def test_subspace_momentum_step_cuda_found_inf_skips_and_empty_list():
    params, grads = make_lists([9, 4, 9000], torch.float32)
    buffers, _ = make_lists([9, 4, 9000], torch.float32, seed=1)
    dp, dg = device_lists(params, grads, "aligned")
    dv, _ = device_lists(buffers, buffers, "aligned")
    before = [t.clone() for t in dp + dv]
    basis, coeffs = torch.randn(2, 9013, device=DEVICE), torch.ones(2, device=DEVICE)
    found_inf = cuda_scalar(1.0)
    momentum_step_op(dp, dg, dv, basis, coeffs, 0.1, 0.9, 0.0, False, None, found_inf)
    assert all(torch.equal(t, b) for t, b in zip(dp + dv, before))
    momentum_step_op([], [], [], torch.empty(3, 0, device=DEVICE), torch.ones(3, device=DEVICE), 0.1, 0.9, 0.0, False)


def test_subspace_ops_cuda_reject_operands_on_another_device():
    params, grads = make_lists([5], torch.float32)
    dp, dg = device_lists(params, grads, "aligned")
    with pytest.raises(RuntimeError, match="basis must be on"):
        project_op(dp, dg, torch.randn(2, 5), 0.0, False)
    with pytest.raises(RuntimeError, match="coeffs must be"):
        subspace_step_op(dp, dg, torch.randn(2, 5, device=DEVICE), torch.ones(2), 0.1, 0.0, False)


def test_full_subspace_step_cuda_on_quadratic_eigenbasis():
    """Both passes on the device: with U the exact top eigenvectors of H and rates 1/lambda, one step removes
    the error along them, and the rest moves by (1 - base_lr * lambda) (closed form)."""
    gen = torch.Generator().manual_seed(3)
    n = 41
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    lam = torch.cat([torch.tensor([100.0, 50.0, 20.0]), torch.linspace(0.5, 1.0, n - 3)]).double()
    H = q @ torch.diag(lam) @ q.T
    x = torch.randn(n, dtype=torch.float64, generator=gen)
    g = H @ x
    rest = q[:, 3:].T
    expected_rest = (1 - lam[3:]) * (rest @ x)
    basis = q[:, :3].T.contiguous().to(DEVICE)
    xd, gd = x.clone().to(DEVICE), g.to(DEVICE)
    c = project_op([xd], [gd], basis, 0.0, False)
    coeffs = (1.0 / lam[:3].to(DEVICE) - 1.0) * c
    subspace_step_op([xd], [gd], basis, coeffs, 1.0, 0.0, False)
    # float64 throughout: errors ~ n * u * |lambda| |x| ~ 1e-12.
    torch.testing.assert_close(basis @ xd, torch.zeros(3, dtype=torch.float64, device=DEVICE), atol=1e-11, rtol=0)
    torch.testing.assert_close(rest @ xd.cpu(), expected_rest, atol=1e-11, rtol=0)


# ------------------------------------------------------------------------------------------------------
# Registration checks on device tensors (schema, fake implementation, mutation annotations).


def test_opcheck_cuda():
    params, grads = make_lists([17, 3], torch.float32)
    dp, dg = device_lists(params, grads, "aligned")
    torch.library.opcheck(step_op.default, (dp, dg, 0.1, 0.01, False, None, None))
    torch.library.opcheck(step_op.default, (dp, dg, 0.1, 0.0, True, cuda_scalar(2.0), cuda_scalar(0.0)))
    basis = torch.randn(4, 20, device=DEVICE)
    torch.library.opcheck(project_op.default, (dp, dg, basis, 0.0, False, None))
    torch.library.opcheck(project_op.default, (dp, dg, basis.double(), 0.1, True, cuda_scalar(2.0)))
    coeffs = torch.randn(4, device=DEVICE)
    torch.library.opcheck(subspace_step_op.default, (dp, dg, basis, coeffs, 0.1, 0.0, False, None, None))
    dv = [torch.zeros_like(p) for p in dp]
    torch.library.opcheck(momentum_step_op.default, (dp, dg, dv, basis, coeffs, 0.1, 0.9, 0.01, True, None, None))
    torch.library.opcheck(
        subspace_step_op.default, (dp, dg, basis, coeffs, 0.1, 0.01, True, cuda_scalar(2.0), cuda_scalar(0.0))
    )
