"""Bad-input catalog: every case raises a named error, and leaves every parameter and the optimizer state
bit-for-bit as they were (nothing is half applied)."""

import copy
import math

import pytest
import torch

from mrgd_ext import AutoMrGD, HessianOperator, MrGD, mrgd
from mrgd_ext.ops import step_ops

CYCLE = (0.01, 0.02, 0.5)
SUB = "multirate_subspace"


def _bits(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8) if t.numel() else t


def same(a, b):
    """Bit-for-bit equality of nested state (tensors, numbers with NaN, containers)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(_bits(a), _bits(b)))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b and type(a) is type(b)


class World:
    """Two groups (the second one is where things go wrong), one step already taken, gradients present."""

    def __init__(self, fused=None, subspace=False):
        self.a = torch.nn.Parameter(torch.arange(3.0))
        self.b = torch.nn.Parameter(torch.arange(4.0) + 10)
        groups = [{"params": [self.a, self.b]}] if subspace else [{"params": [self.a]}, {"params": [self.b]}]
        self.opt = MrGD(groups, plan=CYCLE, weight_decay=0.1, fused=fused)
        if subspace:
            q, _ = torch.linalg.qr(torch.randn(7, 2))
            self.opt.set_subspace(q.T.contiguous(), [0.1, 0.2], 0.3)
        self.grads()
        self.opt.step()
        self.grads()

    def grads(self):
        self.a.grad = torch.ones(3)
        self.b.grad = torch.full((4,), 2.0)

    @property
    def params(self):
        return [self.a, self.b]

    def snapshot(self):
        return [p.detach().clone() for p in self.params], copy.deepcopy(self.opt.state_dict())

    def unchanged(self, snap):
        params, state = snap
        return all(same(p.detach(), q) for p, q in zip(self.params, params)) and same(self.opt.state_dict(), state)


def expect(exc, match, fn):
    with pytest.raises(exc, match=match):
        fn()


# ------------------------------------------------------------------------------------------------------
# Construction: (kwargs builder, error type, message naming the culprit)

def _p(dtype=torch.float32, n=3):
    return torch.nn.Parameter(torch.zeros(n, dtype=dtype), requires_grad=dtype.is_floating_point or dtype.is_complex)


CONSTRUCTION = {
    "int64 param": (lambda: MrGD([torch.zeros(3, dtype=torch.int64)], plan=CYCLE), TypeError,
                    r"param_groups\[0\]\['params'\]\[0\] has dtype torch.int64"),
    "float and int in one group": (lambda: MrGD([_p(), torch.zeros(2, dtype=torch.int32)], plan=CYCLE), TypeError,
                                   r"\['params'\]\[1\] has dtype torch.int32"),
    "int group after a float group": (lambda: MrGD([{"params": [_p()]},
                                                    {"params": [torch.zeros(2, dtype=torch.int64)]}],
                                                   plan=CYCLE), TypeError, r"param_groups\[1\]\['params'\]\[0\]"),
    "complex param": (lambda: MrGD([_p(torch.complex64)], plan=CYCLE), TypeError, r"torch.complex64"),
    "bool param": (lambda: MrGD([torch.zeros(2, dtype=torch.bool)], plan=CYCLE), TypeError, r"torch.bool"),
    "lr_scale 0": (lambda: MrGD([_p()], plan=CYCLE, lr_scale=0.0), ValueError, "lr_scale"),
    "lr_scale nan": (lambda: MrGD([_p()], plan=CYCLE, lr_scale=float("nan")), ValueError, "lr_scale"),
    "lr negative": (lambda: MrGD([_p()], plan=CYCLE, lr=-1.0), ValueError, r"\blr\b"),
    "lr inf": (lambda: MrGD([_p()], plan=CYCLE, lr=float("inf")), ValueError, r"\blr\b"),
    "lr 2-element tensor": (lambda: MrGD([_p()], plan=CYCLE, lr=torch.ones(2)), ValueError, r"\blr\b"),
    "weight_decay negative": (lambda: MrGD([_p()], plan=CYCLE, weight_decay=-1.0), ValueError, "weight_decay"),
    "weight_decay inf": (lambda: MrGD([_p()], plan=CYCLE, weight_decay=float("inf")), ValueError, "weight_decay"),
    "empty plan": (lambda: MrGD([_p()], plan=[]), ValueError, "empty cycle"),
    "nan rate": (lambda: MrGD([_p()], plan=[0.1, float("nan")]), ValueError, "learning rate 1"),
    "negative rate": (lambda: MrGD([_p()], plan=[0.1, -0.2]), ValueError, "learning rate 1"),
    "plan a string": (lambda: MrGD([_p()], plan="fast"), TypeError, "plan"),
    "fused and foreach": (lambda: MrGD([_p()], plan=CYCLE, fused=True, foreach=True), RuntimeError,
                          "fused and foreach"),
    "foreach not bool": (lambda: MrGD([_p()], plan=CYCLE, foreach="yes"), TypeError, "foreach"),
    "group plan zero rate": (lambda: MrGD([{"params": [_p()], "plan": [0.0]}], plan=CYCLE), ValueError,
                             r"param_group\['plan'\]"),
    "group lr_scale negative": (lambda: MrGD([{"params": [_p()]}, {"params": [_p()], "lr_scale": -1.0}], plan=CYCLE),
                                ValueError, r"param_groups\[1\]\['lr_scale'\]"),
}


@pytest.mark.parametrize("case", sorted(CONSTRUCTION))
def test_construction(case):
    build, exc, match = CONSTRUCTION[case]
    expect(exc, match, build)


def test_add_param_group_rejected_leaves_the_optimizer_as_it_was():
    w = World()
    snap = w.snapshot()
    expect(TypeError, r"param_groups\[2\]\['params'\]\[1\] has dtype torch.int64",
           lambda: w.opt.add_param_group({"params": [_p(), torch.zeros(1, dtype=torch.int64)]}))
    assert len(w.opt.param_groups) == 2 and w.unchanged(snap)


# ------------------------------------------------------------------------------------------------------
# Steps: (corruption applied to a World, error type, message). The corruption is in group 1 or its
# parameter, so a half-applied step would show in group 0.


def _set(group_key, value):
    def corrupt(w):
        w.opt.param_groups[1][group_key] = value
    return corrupt


def _del(group_key):
    def corrupt(w):
        del w.opt.param_groups[1][group_key]
    return corrupt


def _retype_b(dtype):
    def corrupt(w):
        w.b.data = w.b.data.to(dtype)  # .data bypasses the checks on .grad assignment
    return corrupt


def _int_param(w):
    i = torch.zeros(4, dtype=torch.int64)
    i.grad = torch.ones(4, dtype=torch.int64)  # what the construction-time check cannot see: a swapped-in tensor
    w.opt.param_groups[1]["params"][0] = i


def _reshape_b(w):
    w.b.data = torch.zeros(5)


def _sparse_grad(w):
    w.b.grad = torch.full((4,), 2.0).to_sparse()


def _attr(name, value):
    def corrupt(w):
        setattr(w.opt, name, value)
    return corrupt


STEP = {
    "int64 param swapped in": (_int_param, TypeError, r"param_groups\[1\]\['params'\]\[0\] has dtype torch.int64"),
    "grad dtype differs": (_retype_b(torch.float64), TypeError, r"param_groups\[1\]\['params'\]\[0\]: gradient dtype"),
    "grad shape differs": (_reshape_b, ValueError, r"param_groups\[1\]\['params'\]\[0\]: gradient shape"),
    "sparse grad": (_sparse_grad, RuntimeError, r"param_groups\[1\]\['params'\]\[0\] has a sparse gradient"),
    "cycle_position 99": (_set("cycle_position", 99), ValueError, r"param_groups\[1\]\['cycle_position'\]"),
    "cycle_position -1": (_set("cycle_position", -1), ValueError, r"param_groups\[1\]\['cycle_position'\]"),
    "cycle_position float": (_set("cycle_position", 1.5), TypeError, r"param_groups\[1\]\['cycle_position'\]"),
    "missing weight_decay": (_del("weight_decay"), KeyError, r"param_groups\[1\] has no 'weight_decay'"),
    "missing cycle": (_del("cycle"), KeyError, r"param_groups\[1\] has no 'cycle'"),
    "lr nan": (_set("lr", float("nan")), ValueError, r"param_groups\[1\]\['lr'\]"),
    "lr negative": (_set("lr", -0.1), ValueError, r"param_groups\[1\]\['lr'\]"),
    "lr_scale inf": (_set("lr_scale", float("inf")), ValueError, r"param_groups\[1\]\['lr_scale'\]"),
    "weight_decay negative": (_set("weight_decay", -1.0), ValueError, r"param_groups\[1\]\['weight_decay'\]"),
    "cycle with nan": (_set("cycle", (0.1, float("nan"))), ValueError, r"param_groups\[1\]\['cycle'\]"),
    "cycle empty": (_set("cycle", ()), ValueError, r"param_groups\[1\]\['cycle'\] has an empty cycle"),
    "cycle not a sequence": (_set("cycle", 0.1), TypeError, r"param_groups\[1\]\['cycle'\]"),
    "maximize not bool": (_set("maximize", "yes"), TypeError, r"param_groups\[1\]\['maximize'\]"),
    "grad_scale float64": (_attr("grad_scale", torch.tensor([2.0], dtype=torch.float64)), ValueError, "grad_scale"),
    "found_inf two elements": (_attr("found_inf", torch.zeros(2)), ValueError, "found_inf"),
}


@pytest.mark.parametrize("case", sorted(STEP))
def test_step(case):
    corrupt, exc, match = STEP[case]
    w = World()
    corrupt(w)
    params = [p.detach().clone() for p in w.params]
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in w.opt.param_groups])
    expect(exc, match, w.opt.step)
    assert all(same(p.detach(), q) for p, q in zip(w.params, params))
    assert same([{k: v for k, v in g.items() if k != "params"} for g in w.opt.param_groups], groups)


def test_step_non_contiguous_fused():
    w = World(fused=True)
    w.b.data = torch.zeros(4, 2).t()[0]  # a strided view, not contiguous
    w.b.grad = torch.zeros(4, 2).t()[0]
    snap = [p.detach().clone() for p in w.params]
    expect(ValueError, r"param_groups\[1\]\['params'\]\[0\] is not contiguous", w.opt.step)
    assert all(same(p.detach(), q) for p, q in zip(w.params, snap))


# ------------------------------------------------------------------------------------------------------
# load_state_dict: (edit of a state dict of the same optimizer, error type, message)


def _g(gi, key, value):
    def edit(sd):
        sd["param_groups"][gi][key] = value
    return edit


def _g_del(gi, key):
    def edit(sd):
        del sd["param_groups"][gi][key]
    return edit


def _sub(key, value, param=0):
    """Set field ``key`` of one parameter's subspace entry (the state dict holds one per parameter)."""
    def edit(sd):
        sd["state"][param][key] = value
    return edit


def _legacy(sd):
    """The subspace state in its in-memory form (one entry under a string key), as older state dicts hold it."""
    entries = [sd["state"].pop(k) for k in sorted(sd["state"])]
    basis = torch.cat([e["subspace_basis"].reshape(e["subspace_basis"].shape[0], -1) for e in entries], dim=1)
    sd["state"][SUB] = {"basis": basis, "column_rates": entries[0]["subspace_column_rates"],
                        "base_lr": entries[0]["subspace_base_lr"]}
    del sd["param_groups"][0]["subspace_rows"]


def _legacy_sub(key, value):
    def edit(sd):
        _legacy(sd)
        sd["state"][SUB][key] = value
    return edit


LOAD = {
    "cycle nan": (_g(0, "cycle", (0.1, float("nan"))), ValueError, r"\[0\]\['cycle'\]: learning rate 1"),
    "cycle negative": (_g(1, "cycle", (-0.1,)), ValueError, r"\[1\]\['cycle'\]: learning rate 0"),
    "cycle empty": (_g(1, "cycle", ()), ValueError, r"\[1\]\['cycle'\] has an empty cycle"),
    "cycle string": (_g(0, "cycle", "abc"), TypeError, r"\[0\]\['cycle'\]"),
    "cycle of strings": (_g(0, "cycle", ("a",)), TypeError, r"\[0\]\['cycle'\]\[0\]"),
    "cycle_position 99": (_g(1, "cycle_position", 99), ValueError, r"\[1\]\['cycle_position'\]"),
    "cycle_position -1": (_g(0, "cycle_position", -1), ValueError, r"\[0\]\['cycle_position'\]"),
    "cycle_position float": (_g(0, "cycle_position", 1.5), TypeError, r"\[0\]\['cycle_position'\]"),
    "cycle_position float tensor": (_g(0, "cycle_position", torch.tensor(1.0)), TypeError, r"\['cycle_position'\]"),
    "lr_scale nan": (_g(1, "lr_scale", float("nan")), ValueError, r"\[1\]\['lr_scale'\]"),
    "lr_scale string": (_g(1, "lr_scale", "x"), TypeError, r"\[1\]\['lr_scale'\]"),
    "lr nan": (_g(0, "lr", float("nan")), ValueError, r"\[0\]\['lr'\]"),
    "lr nan tensor": (_g(0, "lr", torch.tensor(float("nan"))), ValueError, r"\[0\]\['lr'\]"),
    "weight_decay negative": (_g(1, "weight_decay", -1.0), ValueError, r"\[1\]\['weight_decay'\]"),
    "maximize string": (_g(0, "maximize", "yes"), TypeError, r"\[0\]\['maximize'\]"),
    "fused string": (_g(0, "fused", "yes"), TypeError, r"\[0\]\['fused'\]"),
    "fused and foreach": (lambda sd: sd["param_groups"][1].update(fused=True, foreach=True), ValueError,
                          r"\[1\]: 'fused' and 'foreach'"),
    "last_rate nan": (_g(0, "last_rate", torch.tensor(float("nan"), dtype=torch.float64)), ValueError,
                      r"\[0\]\['last_rate'\]"),
    "missing lr_scale": (_g_del(1, "lr_scale"), KeyError, r"\[1\] has no 'lr_scale'"),
    "missing cycle_position": (_g_del(1, "cycle_position"), KeyError, r"\[1\] has no 'cycle_position'"),
    "group count": (lambda sd: sd["param_groups"].pop(), ValueError, r"has 1 groups but the optimizer has 2"),
    "params count": (lambda sd: sd["param_groups"][1]["params"].append(99), ValueError, r"\[1\]\['params'\]"),
    "not a dict": (lambda sd: sd.clear(), TypeError, r"state_dict must be a dict with 'state' and 'param_groups'"),
}

LOAD_SUBSPACE = {
    # The per-parameter form that state_dict() writes (parameters a [3] and b [4], basis of 2 rows).
    "basis an int": (_sub("subspace_basis", 3), TypeError, r"\[0\]\['subspace_basis'\] must be a tensor"),
    "basis piece shape": (_sub("subspace_basis", torch.eye(2, 5), 1), ValueError,
                          r"\[1\]\['subspace_basis'\] has shape \(2, 5\) here but the parameter needs \(2, 4\)"),
    "basis rows differ": (_sub("subspace_basis", torch.zeros(3, 4), 1), ValueError, r"needs \(2, 4\)"),
    "basis int dtype": (lambda sd: [e.update(subspace_basis=e["subspace_basis"].long()) for e in sd["state"].values()],
                        TypeError, r"\['subspace_basis'\] must be float32"),
    "basis dtypes differ": (_sub("subspace_basis", torch.zeros(2, 4, dtype=torch.float64), 1), TypeError,
                            r"\[1\]\['subspace_basis'\] is torch.float64 but"),
    "basis not orthonormal": (_sub("subspace_basis", torch.ones(2, 3)), ValueError,
                              r"subspace basis rows are not orthonormal"),
    "basis nan": (_sub("subspace_basis", torch.full((2, 3), float("nan"))), ValueError, r"has non-finite"),
    "column_rates nan": (lambda sd: [e.update(subspace_column_rates=torch.tensor([0.1, float("nan")],
                                                                                 dtype=torch.float64))
                                     for e in sd["state"].values()], ValueError,
                         r"\['subspace_column_rates'\] must be finite"),
    "column_rates differ": (_sub("subspace_column_rates", torch.tensor([0.1, 0.3], dtype=torch.float64), 1),
                            ValueError, r"\[1\]\['subspace_column_rates'\] differs"),
    "base_lr negative": (lambda sd: [e.update(subspace_base_lr=-1.0) for e in sd["state"].values()], ValueError,
                         r"\['subspace_base_lr'\]"),
    "entry missing": (lambda sd: sd["state"].pop(1), KeyError, r"\[1\] has no 'subspace_basis'"),
    "field missing": (lambda sd: sd["state"][1].pop("subspace_base_lr"), KeyError, r"\[1\] has no 'subspace_base_lr'"),
    "rows without entries": (lambda sd: sd["state"].clear(), ValueError,
                             r"'subspace_rows'\] is 2 but no parameter's entry has a 'subspace_basis'"),
    "rows disagree": (_g(0, "subspace_rows", 3), ValueError, r"'subspace_rows'\] is 3 but the basis entries have 2"),
    # The in-memory form of older state dicts.
    "legacy basis an int": (_legacy_sub("basis", 3), TypeError, r"\['basis'\] must be a tensor"),
    "legacy basis wrong columns": (_legacy_sub("basis", torch.eye(2, 5)), ValueError, r"\['basis'\] has 5 columns"),
    "legacy basis int dtype": (_legacy_sub("basis", torch.zeros(2, 7, dtype=torch.int64)), TypeError,
                               r"\['basis'\] must be float32"),
    "legacy basis not orthonormal": (_legacy_sub("basis", torch.ones(2, 7)), ValueError, r"rows are not orthonormal"),
    "legacy basis nan": (_legacy_sub("basis", torch.full((2, 7), float("nan"))), ValueError, r"has non-finite"),
    "legacy column_rates nan": (_legacy_sub("column_rates", torch.tensor([0.1, float("nan")], dtype=torch.float64)),
                                ValueError, r"\['column_rates'\] must be finite"),
    "legacy column_rates count": (_legacy_sub("column_rates", torch.tensor([0.1], dtype=torch.float64)), ValueError,
                                  r"\['column_rates'\] must be a 1-D tensor with 2 entries"),
    "legacy base_lr negative": (_legacy_sub("base_lr", -1.0), ValueError, r"\['base_lr'\]"),
    "legacy missing basis": (lambda sd: (_legacy(sd), sd["state"][SUB].pop("basis")), KeyError, r"has no 'basis'"),
}


@pytest.mark.parametrize("case", sorted(LOAD))
def test_load_state_dict(case):
    edit, exc, match = LOAD[case]
    source = World()
    source.opt.step()
    sd = copy.deepcopy(source.opt.state_dict())
    edit(sd)
    w = World()
    snap = w.snapshot()
    expect(exc, match, lambda: w.opt.load_state_dict(sd))
    assert w.unchanged(snap)
    w.opt.step()  # and it still works


@pytest.mark.parametrize("case", sorted(LOAD_SUBSPACE))
def test_load_state_dict_subspace(case):
    edit, exc, match = LOAD_SUBSPACE[case]
    sd = copy.deepcopy(World(subspace=True).opt.state_dict())
    edit(sd)
    w = World(subspace=True)
    snap = w.snapshot()
    expect(exc, match, lambda: w.opt.load_state_dict(sd))
    assert w.unchanged(snap)


@pytest.mark.parametrize("form", ["per-parameter", "legacy"])
def test_load_state_dict_subspace_round_trip(form):
    source = World(subspace=True)
    sd = copy.deepcopy(source.opt.state_dict())
    if form == "legacy":
        _legacy(sd)
    w = World()
    # An optimizer with two param groups cannot take it.
    expect(ValueError, r"several param groups|groups but the optimizer has", lambda: w.opt.load_state_dict(sd))
    w = World(subspace=True)
    w.opt.load_state_dict(sd)
    for key in ("basis", "column_rates"):
        assert same(w.opt.state[SUB][key], source.opt.state[SUB][key])
    assert w.opt.state[SUB]["base_lr"] == source.opt.state[SUB]["base_lr"]


def test_load_state_dict_accepts_its_own_state_and_older_integer_positions():
    source = World()
    sd = copy.deepcopy(source.opt.state_dict())
    for g in sd["param_groups"]:  # checkpoints written before the position became a tensor
        g["cycle_position"] = int(g["cycle_position"])
        del g["last_rate"]
    w = World()
    w.opt.load_state_dict(sd)
    assert isinstance(w.opt.param_groups[0]["cycle_position"], torch.Tensor)
    assert int(w.opt.param_groups[0]["cycle_position"]) == 1


# ------------------------------------------------------------------------------------------------------
# set_subspace


def _orthonormal(r, n):
    q, _ = torch.linalg.qr(torch.randn(n, r))
    return q.T.contiguous()


SET_SUBSPACE = {
    "not orthonormal": (lambda: (torch.ones(2, 7), [0.1, 0.1], 0.3), ValueError, "basis rows are not orthonormal"),
    "scaled rows": (lambda: (2.0 * _orthonormal(2, 7), [0.1, 0.1], 0.3), ValueError, "basis rows are not orthonormal"),
    "nan basis": (lambda: (torch.full((2, 7), float("nan")), [0.1, 0.1], 0.3), ValueError, "basis has non-finite"),
    "wrong columns": (lambda: (_orthonormal(2, 6), [0.1, 0.1], 0.3), ValueError, "basis has 6 columns"),
    "1-D basis": (lambda: (torch.ones(7), [0.1], 0.3), ValueError, "basis must be 2-D"),
    "int basis": (lambda: (torch.zeros(2, 7, dtype=torch.int64), [0.1, 0.1], 0.3), TypeError, "basis must be float32"),
    "rates count": (lambda: (_orthonormal(2, 7), [0.1], 0.3), ValueError, "column_rates has 1 entries"),
    "rates nan": (lambda: (_orthonormal(2, 7), [0.1, float("nan")], 0.3), ValueError, "column_rates must be finite"),
    "rates strings": (lambda: (_orthonormal(2, 7), ["a", "b"], 0.3), TypeError, "column_rates"),
    "base_lr nan": (lambda: (_orthonormal(2, 7), [0.1, 0.1], float("nan")), ValueError, "base_lr"),
}


@pytest.mark.parametrize("case", sorted(SET_SUBSPACE))
def test_set_subspace(case):
    args, exc, match = SET_SUBSPACE[case]
    a = torch.nn.Parameter(torch.arange(7.0))
    opt = MrGD([a], plan=CYCLE)
    a.grad = torch.ones(7)
    opt.step()
    snap = a.detach().clone(), copy.deepcopy(opt.state_dict())
    expect(exc, match, lambda: opt.set_subspace(*args()))
    assert same(a.detach(), snap[0]) and same(opt.state_dict(), snap[1]) and not opt.subspace_enabled


def test_set_subspace_check_opt_out():
    a = torch.nn.Parameter(torch.zeros(7))
    opt = MrGD([a], plan=CYCLE)
    opt.set_subspace(torch.ones(2, 7), [0.1, 0.1], 0.3, check=False)  # the caller knows better
    assert opt.subspace_enabled


# ------------------------------------------------------------------------------------------------------
# Functional form and op wrappers: (call, error type, message); the tensors must be untouched.


def _fn_cases():
    def t(*shape, dtype=torch.float32):
        return torch.ones(*shape, dtype=dtype)

    basis = _orthonormal(1, 6)
    return {
        "mrgd lr nan": (lambda P: mrgd(P, [t(3), t(3)], lr=float("nan")), ValueError, r"\blr\b"),
        "mrgd lr tensor": (lambda P: mrgd(P, [t(3), t(3)], lr=torch.tensor(0.1)), TypeError, r"\blr\b"),
        "mrgd weight_decay negative": (lambda P: mrgd(P, [t(3), t(3)], lr=0.1, weight_decay=-1), ValueError,
                                       "weight_decay"),
        "mrgd grads dtype": (lambda P: mrgd(P, [t(3), t(3, dtype=torch.float64)], lr=0.1), TypeError,
                             r"grads\[1\] has dtype torch.float64"),
        "mrgd grads shape": (lambda P: mrgd(P, [t(3), t(4)], lr=0.1), ValueError, r"grads\[1\] has shape"),
        "mrgd lengths": (lambda P: mrgd(P, [t(3)], lr=0.1), ValueError, "same length"),
        "mrgd int params": (lambda P: mrgd(P + [t(2, dtype=torch.int64)], [t(3), t(3), t(2, dtype=torch.int64)],
                                           lr=0.1), TypeError, r"params\[0\] has dtype torch.int64"),
        "mrgd grad not a tensor": (lambda P: mrgd(P, [t(3), 1.0], lr=0.1), TypeError, r"grads\[1\]"),
        "op int params": (lambda P: step_ops.multirate_step_(P + [t(3, dtype=torch.int32)], [t(3)] * 3, 0.1),
                          TypeError, r"params\[2\] has dtype torch.int32"),
        "op grads shape": (lambda P: step_ops.multirate_step_(P, [t(3), t(2)], 0.1), ValueError,
                           r"grads\[1\] has shape"),
        "op grad_scale dtype": (lambda P: step_ops.multirate_step_(P, [t(3), t(3)], 0.1,
                                                                   grad_scale=torch.ones(1, dtype=torch.float64)),
                                ValueError, "grad_scale"),
        "op subspace basis columns": (lambda P: step_ops.subspace_step_(P, [t(3), t(3)], _orthonormal(1, 5),
                                                                        torch.zeros(1), 0.1),
                                      ValueError, "basis has 5 columns"),
        "op subspace coeffs": (lambda P: step_ops.subspace_step_(P, [t(3), t(3)], basis, torch.zeros(2), 0.1),
                               ValueError, "coeffs must be"),
        # Non-finite float arguments: the wrappers refuse them in Python, the operators themselves in C++ (a
        # direct torch.ops call), before any kernel runs.
        "op lr nan": (lambda P: step_ops.multirate_step_(P, [t(3), t(3)], float("nan")), ValueError,
                      r"^lr must be finite, got nan"),
        "op lr inf": (lambda P: step_ops.multirate_step_(P, [t(3), t(3)], float("inf")), ValueError,
                      r"^lr must be finite, got inf"),
        "op weight_decay nan": (lambda P: step_ops.multirate_step_(P, [t(3), t(3)], 0.1, weight_decay=float("nan")),
                                ValueError, r"^weight_decay must be finite"),
        "op lr tensor": (lambda P: step_ops.multirate_step_(P, [t(3), t(3)], torch.tensor(0.1)), TypeError,
                         r"^lr must be a Python float, got Tensor"),
        "op lr bool": (lambda P: step_ops.multirate_step_(P, [t(3), t(3)], True), TypeError, r"^lr must be a Python"),
        "op lr nan, empty lists": (lambda P: step_ops.multirate_step_([], [], float("nan")), ValueError,
                                   r"^lr must be finite"),
        "op subspace_project weight_decay inf": (
            lambda P: step_ops.subspace_project(P, [t(3), t(3)], basis, weight_decay=float("inf")), ValueError,
            r"^weight_decay must be finite"),
        "op subspace_step lr nan": (lambda P: step_ops.subspace_step_(P, [t(3), t(3)], basis, torch.zeros(1),
                                                                      float("nan")), ValueError, r"^lr must be finite"),
        "op subspace_step weight_decay -inf": (
            lambda P: step_ops.subspace_step_(P, [t(3), t(3)], basis, torch.zeros(1), 0.1, weight_decay=-math.inf),
            ValueError, r"^weight_decay must be finite"),
        "raw multirate_step_ lr nan": (
            lambda P: torch.ops.mrgd_ext.multirate_step_(P, [t(3), t(3)], float("nan"), 0.0, False), ValueError,
            r"mrgd_ext: lr must be finite, got nan"),
        "raw multirate_step_ weight_decay inf": (
            lambda P: torch.ops.mrgd_ext.multirate_step_(P, [t(3), t(3)], 0.1, float("inf"), False), ValueError,
            r"mrgd_ext: weight_decay must be finite, got inf"),
        "raw subspace_project weight_decay nan": (
            lambda P: torch.ops.mrgd_ext.subspace_project(P, [t(3), t(3)], basis, float("nan"), False), ValueError,
            r"mrgd_ext: weight_decay must be finite"),
        "raw subspace_step_ lr inf": (
            lambda P: torch.ops.mrgd_ext.subspace_step_(P, [t(3), t(3)], basis, torch.zeros(1), float("inf"), 0.0,
                                                        False), ValueError, r"mrgd_ext: lr must be finite"),
        "raw subspace_step_ weight_decay nan": (
            lambda P: torch.ops.mrgd_ext.subspace_step_(P, [t(3), t(3)], basis, torch.zeros(1), 0.1, float("nan"),
                                                        False), ValueError, r"mrgd_ext: weight_decay must be finite"),
    }


FUNCTIONAL = _fn_cases()


@pytest.mark.parametrize("case", sorted(FUNCTIONAL))
def test_functional_and_ops(case):
    call, exc, match = FUNCTIONAL[case]
    params = [torch.arange(3.0), torch.arange(3.0) + 5]
    before = [p.clone() for p in params]
    expect(exc, match, lambda: call(params))
    assert all(same(p, q) for p, q in zip(params, before))


def test_compiled_step_takes_a_non_finite_tensor_lr_unchecked():
    # NOTE: a tensor "lr" is checked on every eager step (one host read of a CPU scalar), but a compiled step
    # cannot read it without a device synchronisation per step, so there it is not checked: a NaN multiplier
    # is written into the parameters, as torch.optim.SGD does with a NaN tensor lr.  This pins that decision.
    torch._dynamo.reset()
    a = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = MrGD([a], plan=CYCLE, lr=torch.tensor(1.0, dtype=torch.float64))
    step = torch.compile(opt.step, backend="eager")
    a.grad = torch.ones(3, dtype=torch.float64)
    step()
    assert torch.equal(a.detach(), torch.full((3,), 1.0 - CYCLE[0], dtype=torch.float64))
    opt.param_groups[0]["lr"].fill_(float("nan"))
    snap = a.detach().clone(), copy.deepcopy(opt.state_dict())
    expect(ValueError, r"param_groups\[0\]\['lr'\]", opt.step)  # eager: refused, nothing written
    assert same(a.detach(), snap[0]) and same(opt.state_dict(), snap[1])
    step()
    assert torch.isnan(a.detach()).all()
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------------
# AutoMrGD's own state entry ("multirate_auto"): (edit of the entry, error type, message)

AUTO = "multirate_auto"


class AutoWorld:
    """AutoMrGD on a small quadratic (eigenvalues in two groups), a few steps taken."""

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
        h = (q * torch.tensor([100.0, 80.0, 60.0, 1.0, 0.8, 0.6], dtype=torch.float64)) @ q.T
        self.h = 0.5 * (h + h.T)
        self.w = torch.zeros(6, dtype=torch.float64, requires_grad=True)
        self.target = torch.ones(6, dtype=torch.float64)
        op = HessianOperator.from_closure(self._loss, [self.w])
        self.opt = AutoMrGD([self.w], op, mode="temporal", density_order=6, max_groups=None)
        for _ in range(3):
            self.opt.step(self.closure)

    def _loss(self, plist):
        d = plist[0] - self.target
        return 0.5 * d @ (self.h @ d)

    def closure(self):
        self.opt.zero_grad()
        loss = self._loss([self.w])
        loss.backward()
        return loss

    def snapshot(self):
        return self.w.detach().clone(), copy.deepcopy(self.opt.state_dict())

    def unchanged(self, snap):
        return same(self.w.detach(), snap[0]) and same(self.opt.state_dict(), snap[1])


def _auto(key, value):
    def edit(sd):
        sd["param_groups"][0]["auto"][key] = value
    return edit


LOAD_AUTO = {
    "step negative": (_auto("step", -1), ValueError, r"\['auto'\]\['step'\] must be >= 0"),
    "step float": (_auto("step", 2.5), TypeError, r"\['auto'\]\['step'\] must be an integer"),
    "step bool": (_auto("step", True), TypeError, r"\['step'\] must be an integer"),
    "since_check negative": (_auto("since_check", -2), ValueError, r"\['since_check'\] must be >= 0"),
    "interval 0": (_auto("interval", 0), ValueError, r"\['interval'\] must be >= 1"),
    "backoffs string": (_auto("backoffs", "1"), TypeError, r"\['backoffs'\] must be an integer"),
    "safe_entries negative": (_auto("safe_entries", -1), ValueError, r"\['safe_entries'\] must be >= 0"),
    "last_estimate after step": (_auto("last_estimate", 99), ValueError, r"\['last_estimate'\] = 99 is after"),
    "ref_loss nan": (_auto("ref_loss", float("nan")), ValueError, r"\['ref_loss'\] must be finite"),
    "ref_loss string": (_auto("ref_loss", "low"), TypeError, r"\['ref_loss'\] must be a Python float"),
    "best_loss inf": (_auto("best_loss", float("inf")), ValueError, r"\['best_loss'\] must be finite"),
    "best_loss tensor": (_auto("best_loss", torch.tensor(1.0)), TypeError, r"\['best_loss'\] must be a Python"),
    "remeasure int": (_auto("remeasure", 1), TypeError, r"\['remeasure'\] must be a bool"),
    "loss_noise negative": (_auto("loss_noise", -0.1), ValueError, r"\['loss_noise'\] must be >= 0"),
    "loss_floor negative": (_auto("loss_floor", -1e-9), ValueError, r"\['loss_floor'\] must be >= 0"),
    "stochastic int": (_auto("stochastic", 1), TypeError, r"\['stochastic'\] must be a bool"),
    "interval_count negative": (_auto("interval_count", -1), ValueError, r"\['interval_count'\] must be >= 0"),
    "interval_sum nan": (_auto("interval_sum", float("nan")), ValueError, r"\['interval_sum'\] must be finite"),
    "interval_sumsq negative": (_auto("interval_sumsq", -1.0), ValueError, r"\['interval_sumsq'\] must be >= 0"),
    "best_error negative": (_auto("best_error", -0.5), ValueError, r"\['best_error'\] must be >= 0"),
    "normal_lr_scale 0": (_auto("normal_lr_scale", 0.0), ValueError, r"\['normal_lr_scale'\] must be a finite"),
    "normal_lr_scale nan": (_auto("normal_lr_scale", float("nan")), ValueError, r"\['normal_lr_scale'\]"),
    "missing interval": (lambda sd: sd["param_groups"][0]["auto"].pop("interval"), KeyError,
                         r"has no 'interval' field"),
    "unknown field": (_auto("intreval", 5), ValueError, r"\['auto'\] has unknown fields intreval"),
    "entry not a dict": (lambda sd: sd["param_groups"][0].update(auto=[1, 2]), TypeError,
                         r"\['auto'\] must be a dict, got list"),
    "entry missing": (lambda sd: sd["param_groups"][0].pop("auto"), KeyError, r"has no AutoMrGD state"),
    "and a bad MrGD field": (lambda sd: sd["param_groups"][0].update(lr_scale=-1.0), ValueError,
                             r"\[0\]\['lr_scale'\]"),
}


@pytest.fixture(scope="module")
def auto_state():
    return copy.deepcopy(AutoWorld().opt.state_dict())


@pytest.mark.parametrize("case", sorted(LOAD_AUTO))
def test_load_state_dict_auto(case, auto_state):
    edit, exc, match = LOAD_AUTO[case]
    sd = copy.deepcopy(auto_state)
    edit(sd)
    w = AutoWorld()
    snap = w.snapshot()
    expect(exc, match, lambda: w.opt.load_state_dict(sd))
    assert w.unchanged(snap)
    w.opt.step(w.closure)  # and it still works


def test_load_state_dict_auto_accepts_its_own_state_and_keeps_a_copy(auto_state):
    sd = copy.deepcopy(auto_state)
    sd["param_groups"][0]["auto"]["ref_loss"] = None  # before the first check point
    sd["param_groups"][0]["auto"]["best_loss"] = None
    w = AutoWorld()
    w.opt.load_state_dict(sd)
    saved_step = auto_state["param_groups"][0]["auto"]["step"]
    assert w.opt.state[AUTO]["step"] == saved_step
    w.opt.step(w.closure)
    assert w.opt.state[AUTO]["step"] == saved_step + 1
    assert sd["param_groups"][0]["auto"]["step"] == saved_step  # the caller's dict is not written


def test_catalog_size():
    n = (len(CONSTRUCTION) + len(STEP) + len(LOAD) + len(LOAD_SUBSPACE) + len(SET_SUBSPACE) + len(FUNCTIONAL)
         + len(LOAD_AUTO) + 3)
    assert n >= 60
