"""The fused Lanczos orthogonalisation kernel (mrgd_ext::block_orthogonalize_) vs the pure-torch reference vs
float64 truth, on odd sizes, both dtypes and every CPU instruction-set build of its loops.

NOTE: [tolerances of the orthogonalisation tests]
A dot product of length n accumulated in precision u (unit roundoff) with depth k has error at most
gamma_k sum|x_i y_i| and, under the probabilistic model of Higham & Mary (SIAM J. Sci. Comput. 2019), below
lambda * sqrt(k) * u * sum|x_i y_i| except with probability exp(-lambda^2 / 2)-small. The kernel's depth is a
sub-chunk of at most 32 Ki columns split over SIMD lanes, and the torch reference's depth is at most n, so
every comparison below uses lambda * sqrt(n) * u * (scale of the exact sum of |terms|) with lambda = 10,
plus the same for the float64 truth (u = 2^-53). In float64 this is ~1e-13 relative for n = 1e5 and catches
any indexing slip (a single missing term changes a sum by ~1/n of its scale); in float32 it is ~2e-4, so the
float32 cases check the float32 loads, stores and dispatch, while the float64 cases carry the precision.
"""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch

import mrgd_ext
from mrgd_ext import _C
from mrgd_ext.ops import lanczos_ops as ops
from mrgd_ext.ops import lanczos_reference as ref

CPU_ISAS = mrgd_ext.build_info()["cpu_isas_available"].split(",")
LAMBDA = 10.0
U64 = 2.0**-53


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request):
    """Run a test once per CPU instruction-set build of the element loops."""
    _C._set_cpu_isa(request.param)
    yield request.param
    _C._set_cpu_isa("auto")


@functools.lru_cache(maxsize=8)
def _orthonormal_rows(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))[0].T.contiguous()


def make_inputs(n, m, b, dtype, seed=0, near_span=False):
    """Q [m, n] with orthonormal rows (m <= n) and V [b, n]; near_span makes V lie almost in span(Q).
    The rows of Q are the first m of one cached orthonormal set per n (any subset is orthonormal)."""
    g = torch.Generator().manual_seed(seed)
    Q = _orthonormal_rows(n, min(n, 33), 0)[:m] if m > 0 else torch.zeros(0, n, dtype=torch.float64)
    V = 3.0 * torch.randn(b, n, generator=g, dtype=torch.float64)
    if near_span and m > 0:
        V = torch.randn(b, m, generator=g, dtype=torch.float64) @ Q + 1e-7 * V
    return Q.to(dtype), V.to(dtype)


def truth(Q, V, rounds=2):
    """Float64 result from the (rounded) inputs: the reference in float64 arithmetic."""
    Vt = V.double().clone()
    c, g, nrm = ref.block_orthogonalize(Q.double(), Vt, rounds)
    return c, g, nrm, Vt


def bound(u, n, scale):
    return LAMBDA * math.sqrt(max(n, 1)) * (u + U64) * scale


def check_against_truth(Q, V_in, V_out, coeffs, gram, norms, rounds, what, expected=None):
    """``expected``: truth(Q, V_in, rounds), when the caller already has it."""
    dtype = V_in.dtype
    u = torch.finfo(dtype).eps / 2
    n = V_in.shape[1]
    c_t, _, n_t, V_t = expected if expected is not None else truth(Q, V_in, rounds)
    Qd, Vd, Vo = Q.double(), V_in.double(), V_out.double()
    assert coeffs.dtype == gram.dtype == norms.dtype == torch.float64
    assert coeffs.shape == (V_in.shape[0], Q.shape[0]) and gram.shape == (V_in.shape[0],) * 2
    # Coefficients: scale sum_i |v_i q_i| (the second round only adds terms of the same kind, smaller).
    if coeffs.numel():
        scale = Vd.abs() @ Qd.abs().T
        err = (coeffs - c_t).abs() - rounds * bound(u, n, scale)
        assert err.max() <= 0, f"{what}: coefficients off by {err.max():.3g} beyond the bound"
    # Squared input norms: scale sum v_i^2.
    err = (norms - n_t).abs() - bound(u, n, (Vd * Vd).sum(1))
    assert err.numel() == 0 or err.max() <= 0, f"{what}: input norms off beyond the bound"
    # Output rows: each of the m + 1 terms subtracted per round rounds once more, and coefficient errors
    # enter through unit-norm basis rows; scale |v_in|.
    vn = Vd.norm(dim=1)
    if V_in.numel():
        err = (Vo - V_t).norm(dim=1) - rounds * (Q.shape[0] + 1) * bound(u, n, vn)
        assert err.max() <= 0, f"{what}: output rows off by {err.max():.3g} beyond the bound"
    # The Gram matrix is of the rows the kernel actually wrote: scale sum |v_j v_l|.
    g_t = Vo @ Vo.T
    err = (gram - g_t).abs() - bound(u, n, Vo.abs() @ Vo.abs().T)
    assert err.numel() == 0 or err.max() <= 0, f"{what}: Gram matrix off beyond the bound"


SIZES_N = [0, 1, 7, 1001, 100003]
SIZES_M = [0, 1, 5, 33]
SIZES_B = [1, 3, 8]
LARGE_N_CASES = {(0, 3), (1, 1), (5, 8), (33, 3), (33, 8)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n", SIZES_N)
def test_kernel_and_reference_match_float64_truth(cpu_isa, dtype, n):
    for m in SIZES_M:
        if m > n:
            continue  # at most n orthonormal rows
        for b in SIZES_B:
            if n > 10**4 and (m, b) not in LARGE_N_CASES:
                continue  # the large size crosses every chunk boundary; a few shapes keep the suite fast
            Q, V = make_inputs(n, m, b, dtype, seed=n + 7 * m + b)
            Vk, Vr = V.clone(), V.clone()
            out_k = ops.block_orthogonalize_(Q, Vk, 2)
            out_r = ref.block_orthogonalize(Q, Vr, 2)
            expected = truth(Q, V, 2)
            check_against_truth(Q, V, Vk, *out_k, 2, f"kernel n={n} m={m} b={b} {dtype}", expected)
            check_against_truth(Q, V, Vr, *out_r, 2, f"reference n={n} m={m} b={b} {dtype}", expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rounds", [0, 1, 3])
def test_other_round_counts(cpu_isa, dtype, rounds):
    Q, V = make_inputs(1001, 5, 3, dtype, seed=rounds)
    Vk = V.clone()
    out = ops.block_orthogonalize_(Q, Vk, rounds)
    check_against_truth(Q, V, Vk, *out, rounds, f"rounds={rounds}")
    if rounds == 0:
        assert torch.equal(Vk, V) and not out[0].any()


def test_cgs2_restores_orthogonality_where_one_round_does_not(cpu_isa):
    # V almost in span(Q) (|v_out| ~ 1e-7 |v_in|): one round leaves an error ~ u |v_in| along Q, which is
    # ~1e-9 relative to |v_out|; the second round removes it to O(u) relative to |v_out| ("twice is enough",
    # Giraud, Langou, Rozloznik 2005). The threshold 100 u sqrt(m) sits between the two regimes.
    Q, V = make_inputs(20011, 16, 4, torch.float64, seed=3, near_span=True)
    u = U64
    results = {}
    for rounds in (1, 2):
        Vk = V.clone()
        ops.block_orthogonalize_(Q, Vk, rounds)
        results[rounds] = ((Q @ Vk.T).abs().max(dim=0).values / Vk.norm(dim=1)).max().item()
    assert results[2] <= 100 * u * math.sqrt(16)
    assert results[1] > 100 * u * math.sqrt(16), "the one-round case should lose orthogonality (test is blind)"


def test_empty_shapes_and_identity_cases(cpu_isa):
    Q, V = make_inputs(9, 3, 0, torch.float64)
    c, g, nr = ops.block_orthogonalize_(Q, V, 2)
    assert c.shape == (0, 3) and g.shape == (0, 0) and nr.shape == (0,)
    # m = 0: nothing to project, V untouched, Gram of V itself.
    Q, V = make_inputs(1001, 0, 3, torch.float32)
    Vk = V.clone()
    c, g, nr = ops.block_orthogonalize_(Q, Vk, 2)
    assert c.shape == (3, 0) and torch.equal(Vk, V)
    torch.testing.assert_close(g, V.double() @ V.double().T, rtol=1e-6, atol=1e-3)
    # n = 0: all zeros.
    c, g, nr = ops.block_orthogonalize_(torch.zeros(0, 0), torch.zeros(4, 0), 2)
    assert c.shape == (4, 0) and not g.any() and not nr.any()


def test_deterministic_and_independent_of_thread_count(cpu_isa):
    Q, V = make_inputs(300007, 9, 5, torch.float32, seed=11)
    outs = []
    threads = torch.get_num_threads()
    try:
        for t in (1, max(2, threads), 1):
            torch.set_num_threads(t)
            Vk = V.clone()
            outs.append((Vk, *ops.block_orthogonalize_(Q, Vk, 2)))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b), "results differ bitwise between runs/thread counts"


def test_strided_rows_are_handled_and_padding_untouched(cpu_isa):
    # Row slices of wider buffers (leading dimension > n), as the Lanczos basis buffer passes them.
    n = 1003
    Qw = torch.zeros(4, n + 17, dtype=torch.float64)
    Q, V = make_inputs(n, 4, 3, torch.float64, seed=5)
    Qw[:, :n] = Q
    Vw = torch.full((3, n + 5), 7.0, dtype=torch.float64)
    Vw[:, :n] = V
    out = ops.block_orthogonalize_(Qw[:, :n], Vw[:, :n], 2)
    Vk = V.clone()
    expected = ops.block_orthogonalize_(Q, Vk, 2)
    assert torch.equal(Vw[:, :n], Vk) and torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])
    assert (Vw[:, n:] == 7.0).all(), "columns beyond n were written"


def test_bad_input_is_rejected_with_named_arguments():
    Q, V = make_inputs(50, 3, 2, torch.float64)
    with pytest.raises(ValueError, match="vectors must have unit stride"):
        ops.block_orthogonalize_(Q, V.T.contiguous().T, 2)
    with pytest.raises(ValueError, match="basis must have unit stride"):
        ops.block_orthogonalize_(Q.T.contiguous().T, V, 2)
    with pytest.raises(TypeError, match="share one dtype"):
        ops.block_orthogonalize_(Q.float(), V, 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.block_orthogonalize_(Q.half(), V.half(), 2)
    with pytest.raises(ValueError, match="columns"):
        ops.block_orthogonalize_(Q[:, :40], V, 2)
    with pytest.raises(ValueError, match="rounds"):
        ops.block_orthogonalize_(Q, V, -1)
    with pytest.raises(ValueError, match="2-D"):
        ops.block_orthogonalize_(Q, V[0], 2)
    buf = torch.randn(5, 50, dtype=torch.float64)
    with pytest.raises(ValueError, match="share memory"):
        ops.block_orthogonalize_(buf[:3], buf[3:], 2)
    # Direct torch.ops calls are guarded by the C++ checks.
    with pytest.raises(RuntimeError, match="unit stride"):
        torch.ops.mrgd_ext.block_orthogonalize_(Q, V.T.contiguous().T, 2)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.mrgd_ext.block_orthogonalize_(Q.float(), V, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    Q, V = make_inputs(257, 5, 3, dtype)
    torch.library.opcheck(torch.ops.mrgd_ext.block_orthogonalize_.default, (Q, V, 2))


def test_has_kernel_reports_cpu():
    assert ops.has_block_orthogonalize_kernel("cpu")
    assert not ops.has_block_orthogonalize_kernel("xla")


# ---- CUDA kernel (csrc/cuda/block_orthogonalize.cu); the same bounds as the CPU kernel, whose per-lane sums
# are no longer than the CPU's sub-chunk sums (NOTE: [tolerances of the orthogonalisation tests]).


def _skip_without_cuda_kernel():
    # MRGD_REQUIRE_CUDA=1 (the GPU suite) turns a missing device or kernel into a failure, as in
    # tests/test_cuda_kernels.py.
    missing = None
    if not torch.cuda.is_available():
        missing = "needs a CUDA device"
    elif not ops.has_block_orthogonalize_kernel("cuda"):
        missing = "this build has no CUDA block_orthogonalize_ kernel"
    if missing is not None:
        if os.environ.get("MRGD_REQUIRE_CUDA") == "1":
            pytest.fail(f"MRGD_REQUIRE_CUDA=1 but {missing}")
        pytest.skip(missing)


def _cuda_case(Q, V, rounds, what):
    Vk = V.cuda()
    out = ops.block_orthogonalize_(Q.cuda(), Vk, rounds)
    assert all(t.device.type == "cuda" for t in out)
    check_against_truth(Q, V, Vk.cpu(), *(t.cpu() for t in out), rounds, what)
    return Vk, out


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n", SIZES_N)
def test_block_orthogonalize_cuda_matches_truth(dtype, n):
    _skip_without_cuda_kernel()
    # b covers every register bucket of the kernel (1, 4, 8, 16, 32) and values between them.
    for m in SIZES_M:
        if m > n:
            continue
        for b in (1, 3, 8, 17, 32):
            if n > 10**4 and (m, b) not in LARGE_N_CASES | {(33, 32)}:
                continue
            Q, V = make_inputs(n, m, b, dtype, seed=n + 7 * m + b)
            _cuda_case(Q, V, 2, f"cuda n={n} m={m} b={b} {dtype}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rounds", [0, 1, 3])
def test_block_orthogonalize_cuda_other_round_counts(dtype, rounds):
    _skip_without_cuda_kernel()
    Q, V = make_inputs(1001, 5, 3, dtype, seed=rounds)
    Vk, out = _cuda_case(Q, V, rounds, f"cuda rounds={rounds}")
    if rounds == 0:
        assert torch.equal(Vk.cpu(), V) and not out[0].any()


@pytest.mark.cuda
def test_block_orthogonalize_cuda_many_chunks_per_block():
    # b = 8 float32 rows give chunks of 1024 columns; 1.5M columns are ~1465 chunks, more than the grid's
    # 1024 blocks, so some blocks take two chunks and add into their slots twice.
    _skip_without_cuda_kernel()
    Q, V = make_inputs(1_500_007, 5, 8, torch.float32, seed=2)
    _cuda_case(Q, V, 2, "cuda n=1.5M m=5 b=8")


@pytest.mark.cuda
def test_block_orthogonalize_cuda_restores_orthogonality():
    _skip_without_cuda_kernel()
    Q, V = make_inputs(20011, 16, 4, torch.float64, seed=3, near_span=True)
    Qc = Q.cuda()
    results = {}
    for rounds in (1, 2):
        Vk = V.cuda()
        ops.block_orthogonalize_(Qc, Vk, rounds)
        results[rounds] = ((Qc @ Vk.T).abs().max(dim=0).values / Vk.norm(dim=1)).max().item()
    assert results[2] <= 100 * U64 * math.sqrt(16) < results[1]


@pytest.mark.cuda
def test_block_orthogonalize_cuda_deterministic_and_strided():
    _skip_without_cuda_kernel()
    Q, V = make_inputs(300007, 9, 5, torch.float32, seed=11)
    Qc = Q.cuda()
    runs = []
    for _ in range(2):
        Vk = V.cuda()
        runs.append((Vk, *ops.block_orthogonalize_(Qc, Vk, 2)))
    for a, b in zip(*runs):
        assert torch.equal(a, b), "two CUDA calls on the same inputs differ bitwise"
    # Row slices of wider buffers: same result, padding untouched.
    n = Q.shape[1]
    Qw = torch.zeros(9, n + 17, device="cuda")
    Qw[:, :n] = Qc
    Vw = torch.full((5, n + 5), 7.0, device="cuda")
    Vw[:, :n] = V.cuda()
    out = ops.block_orthogonalize_(Qw[:, :n], Vw[:, :n], 2)
    assert torch.equal(Vw[:, :n], runs[0][0]) and torch.equal(out[0], runs[0][1]) and torch.equal(out[1], runs[0][2])
    assert (Vw[:, n:] == 7.0).all(), "columns beyond n were written"


@pytest.mark.cuda
def test_block_orthogonalize_cuda_edges_and_bad_input():
    _skip_without_cuda_kernel()
    Q, V = make_inputs(9, 3, 0, torch.float64)
    c, g, nr = ops.block_orthogonalize_(Q.cuda(), V.cuda(), 2)
    assert c.shape == (0, 3) and g.shape == (0, 0) and nr.shape == (0,)
    Q, V = make_inputs(1001, 0, 3, torch.float32)
    Vk = V.cuda()
    c, g, nr = ops.block_orthogonalize_(Q.cuda(), Vk, 2)
    assert c.shape == (3, 0) and torch.equal(Vk.cpu(), V)
    torch.testing.assert_close(g.cpu(), V.double() @ V.double().T, rtol=1e-6, atol=1e-3)
    c, g, nr = ops.block_orthogonalize_(torch.zeros(0, 0, device="cuda"), torch.zeros(4, 0, device="cuda"), 2)
    assert c.shape == (4, 0) and not g.any() and not nr.any()
    Q, V = make_inputs(50, 3, 33, torch.float32)
    with pytest.raises(ValueError, match="at most 32"):
        ops.block_orthogonalize_(Q.cuda(), V.cuda(), 2)
    with pytest.raises(RuntimeError, match="at most 32"):
        torch.ops.mrgd_ext.block_orthogonalize_(Q.cuda(), V.cuda(), 2)
    with pytest.raises(ValueError, match="basis is on"):
        ops.block_orthogonalize_(Q, V[:3].cuda(), 2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_orthogonalize_cuda_opcheck(dtype):
    _skip_without_cuda_kernel()
    Q, V = make_inputs(257, 5, 3, dtype)
    torch.library.opcheck(torch.ops.mrgd_ext.block_orthogonalize_.default, (Q.cuda(), V.cuda(), 2))


@pytest.mark.cuda
def test_lanczos_with_the_cuda_kernel_matches_the_torch_composition():
    _skip_without_cuda_kernel()
    g = torch.Generator().manual_seed(0)
    A = torch.randn(300, 300, generator=g, dtype=torch.float64)
    A = (A @ A.T / 300).cuda()
    runs = {o: mrgd_ext.curvature.lanczos(A, 6, block_size=4, tol=1e-10, seed=0, orthogonalize=o)
            for o in ("kernel", "torch")}
    assert runs["kernel"].orthogonalizer == "kernel" and runs["torch"].orthogonalizer == "torch"
    torch.testing.assert_close(runs["kernel"].eigenvalues, runs["torch"].eigenvalues, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="block_size=33"):
        mrgd_ext.curvature.lanczos(A, 2, block_size=33, orthogonalize="kernel")
