"""The operator registry (mrgd_ext.ops.registry), the dispatcher and the references agree.

Every operator the compiled library defines is in the registry and vice versa; each has a CPU kernel, a
fake implementation that matches what the kernel returns, and a reference that computes what the kernel
computes, on every dtype the registry lists and every CPU instruction set of this build.
"""

import subprocess
import sys

import pytest
import torch

import mrgd_ext
from mrgd_ext import _C
from mrgd_ext.ops import registry

CPU_ISAS = mrgd_ext.build_info()["cpu_isas_available"].split(",")
CASES = [(name, dtype) for name, info in registry.OPS.items() for dtype in info.dtypes]


def _case_id(case):
    name, dtype = case
    return f"{name}-{str(dtype).removeprefix('torch.')}"


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request):
    _C._set_cpu_isa(request.param)
    yield request.param
    _C._set_cpu_isa("auto")


def _clone(args):
    return tuple([t.clone() for t in a] if isinstance(a, list) else a.clone() if isinstance(a, torch.Tensor) else a
                 for a in args)


def _written_args(info):
    """Positions of the arguments the schema marks as written in place (``Tensor(a!)``)."""
    args = info.packet.default._schema.arguments
    return [i for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write]


def _as_list(x):
    if x is None:
        return []
    if isinstance(x, torch.Tensor):
        return [x]
    return [t for item in x for t in _as_list(item)]


def test_registry_lists_exactly_the_dispatchers_operators():
    defined = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("mrgd_ext::")}
    assert defined == set(registry.op_names())
    assert all(hasattr(torch.ops.mrgd_ext, name) for name in registry.op_names())


@pytest.mark.parametrize("name", registry.op_names())
def test_every_operator_has_a_cpu_kernel_fake_and_reference(name):
    info = registry.OPS[name]
    assert info.qualname == f"mrgd_ext::{name}"
    assert info.schema.startswith(f"mrgd_ext::{name}(")
    assert info.has_kernel("cpu") and registry.has_kernel("cpu", name)
    assert not info.has_kernel("tpu")
    # The fake is registered under this name (and exercised for real by the opcheck test below).
    assert torch._library.simple_registry.singleton.find(info.qualname).fake_impl.kernel is not None
    assert callable(info.reference) and info.dtypes
    assert registry.has_kernel("cpu")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fake_implementation_and_schema_match_the_kernel(case):
    name, dtype = case
    info = registry.OPS[name]
    # test_schema runs the kernel and checks that it mutates exactly what the schema says; test_faketensor
    # runs the fake and checks its outputs' shapes, dtypes and devices against the kernel's.
    torch.library.opcheck(info.packet.default, info.sample(torch.device("cpu"), dtype),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_reference_computes_what_the_kernel_computes(cpu_isa, case):
    name, dtype = case
    info = registry.OPS[name]
    args = info.sample(torch.device("cpu"), dtype)
    kernel_args, reference_args = _clone(args), _clone(args)
    kernel_out = info.packet(*kernel_args)
    reference_out = info.reference(*reference_args)
    written = _written_args(info)
    got = _as_list(kernel_out) + [t for i in written for t in _as_list(kernel_args[i])]
    want = _as_list(reference_out) + [t for i in written for t in _as_list(reference_args[i])]
    before = [t for i in written for t in _as_list(args[i])]
    assert len(got) == len(want) > 0
    # This checks the wiring (that the registry's reference is the kernel's definition and the arguments line
    # up), not the accuracy, which tests/test_kernels.py and tests/test_block_orthogonalize.py bound tightly.
    # Allowed: a few units of the storage rounding (the kernels sum in another order, which can flip a
    # rounding of a 16-bit result) plus sums of ~1000 terms in the compute precision; a wrong formula or
    # a swapped argument differs by O(1) relative to the values.
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    tol = 4 * torch.finfo(dtype).eps + 1000 * torch.finfo(compute).eps
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        scale = max(w.double().abs().max().item(), 1.0)
        assert (g.double() - w.double()).abs().max().item() <= tol * scale, name
    # The sample does change the written tensors (so the comparison above is not of two untouched copies).
    assert not written or any(not torch.equal(b, a) for b, a in zip(before, got[len(_as_list(kernel_out)):]))


def test_module_prints_the_operator_names_for_scripts():
    out = subprocess.run([sys.executable, "-m", "mrgd_ext.ops.registry"], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == registry.op_names()
