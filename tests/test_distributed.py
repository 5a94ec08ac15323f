"""torch.distributed on gloo ranks of this machine (spawned processes, each run bounded in time).

* The subspace step with sharded parameters (the FSDP layout): each rank holds half of the flat parameter
  vector and the matching columns of the basis; the union of the shards must equal the unsharded step.
* DistributedOperator: the Hessian of the mean loss over data shards on every rank, its solvers' results
  identical on every rank and equal to the single-process results on the concatenated data; bad input
  raises on every rank.
* MrGD on FSDP2 (DTensor) parameters in every mode, and distributed checkpoints under DDP and FSDP2.
"""

import copy
import os

import pytest
import torch
import torch.distributed as dist

from _spawn import RUN_TIMEOUT_S, init_gloo, run_ranks
from mrgd_ext import MrGD

# Ranks that could deadlock in a collective: a hang must fail the run. Each spawned run has its own limit
# (tests/_spawn.py); pytest-timeout's thread method (stack dump, then exit of the whole run) is the backstop,
# since the ranks are not daemons and a timeout raised in the test would leave interpreter exit waiting on them.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(900, method="thread"),
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build"),
]

N, R, STEPS = 1001, 4, 3
BASE_LR, RATES = 0.3, [0.01, 0.02, 0.05, 0.1]


def problem():
    gen = torch.Generator().manual_seed(7)
    basis, _ = torch.linalg.qr(torch.randn(N, R, dtype=torch.float64, generator=gen))
    h_diag = torch.rand(N, dtype=torch.float64, generator=gen) + 0.5
    target = torch.randn(N, dtype=torch.float64, generator=gen)
    return basis.T.contiguous(), h_diag, target


def run_steps(x, opt, h_diag, target):
    for _ in range(STEPS):
        opt.zero_grad()
        (0.5 * (h_diag * (x - target) ** 2).sum()).backward()
        opt.step()


def _rank_main(rank, world, init_file, out_dir):
    init_gloo(rank, world, init_file)
    try:
        basis, h_diag, target = problem()
        lo, hi = (0, N // 2) if rank == 0 else (N // 2, N)
        x = torch.zeros(hi - lo, dtype=torch.float64, requires_grad=True)
        opt = MrGD([x], plan=[1.0])
        opt.set_subspace(basis[:, lo:hi].contiguous(), RATES, BASE_LR, process_group=dist.group.WORLD,
                         check=False)  # a shard of the columns: its rows alone are not orthonormal
        run_steps(x, opt, h_diag[lo:hi], target[lo:hi])
        torch.save(x.detach(), os.path.join(out_dir, f"shard.{rank}"))
    finally:
        dist.destroy_process_group()


def test_sharded_subspace_step_equals_unsharded(tmp_path):
    basis, h_diag, target = problem()
    x = torch.zeros(N, dtype=torch.float64, requires_grad=True)
    opt = MrGD([x], plan=[1.0])
    opt.set_subspace(basis, RATES, BASE_LR)
    run_steps(x, opt, h_diag, target)

    run_ranks(_rank_main, 2, tmp_path)
    sharded = torch.cat([torch.load(tmp_path / f"shard.{r}") for r in range(2)])
    # Only the order of the float64 additions in U^T g differs (two partial sums, then all-reduce).
    torch.testing.assert_close(sharded, x.detach(), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------------------------
# DistributedOperator: the Hessian over data shards on every rank.

# Uneven shards (the weights N_r / N matter): 64 samples split at these bounds.
SHARD_BOUNDS = {2: [0, 37, 64], 4: [0, 20, 36, 51, 64]}
LANCZOS = {"k": 4, "block_size": 2, "which": "both", "seed": 1, "tol": 1e-10}
SLQ = {"num_probes": 3, "order": 20, "seed": 2}
TRACE = {"num_probes": 8, "seed": 3}
ESTIMATE = {"num_eigs": 4, "block_size": 2, "density_probes": 2, "density_order": 20, "seed": 4}


def curvature_problem():
    """A small two-scale classifier (float64): inputs with columns 100x apart in scale."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(64, 6, dtype=torch.float64, generator=gen) * torch.tensor([10.0, 10.0, 1.0, 1.0, 0.1, 0.1],
                                                                             dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=gen)
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    return model, torch.nn.CrossEntropyLoss(), X, y


def curvature_results(op):
    """What every solver returns on ``op``, as tensors (compared across ranks and with one process)."""
    from mrgd_ext import estimate_curvature, hutchinson_trace, lanczos, spectral_density

    lz = lanczos(op, **LANCZOS)
    slq = spectral_density(op, **SLQ)
    tr = hutchinson_trace(op, **TRACE)
    est = estimate_curvature(op, **ESTIMATE)
    return {
        "dense": op.matmat(torch.eye(op.n, dtype=torch.float64)),
        "lanczos_values": lz.eigenvalues,
        "lanczos_vectors": lz.eigenvectors,
        "slq_nodes": torch.from_numpy(slq.nodes),
        "slq_weights": torch.from_numpy(slq.weights),
        "trace_samples": torch.from_numpy(tr.samples),
        "estimate_lambda_max": torch.tensor(est.lambda_max),
        "estimate_groups": torch.tensor([[g.a, g.b] for g in est.groups]),
    }


def _errors_on_every_rank(rank, world, results, name, make):
    """Run ``make()`` (expected to raise) and record the exception type and message under ``name``."""
    try:
        make()
    except Exception as exc:  # noqa: BLE001 - the test asserts the type
        results[name] = (type(exc).__name__, str(exc))
    else:
        results[name] = None


class _FailingOperator:
    """Matches the real operator's n/dtype/device but raises in its product (a rank whose HVP fails)."""

    def __init__(self, real):
        self.n, self.dtype, self.device, self.shapes = real.n, real.dtype, real.device, real.shapes
        self.num_samples = 10

    def matmat(self, V):
        raise ArithmeticError("local product failed on purpose")


def _curvature_rank(rank, world, init_file, out_dir, bad_input):
    init_gloo(rank, world, init_file)
    try:
        from mrgd_ext import HessianOperator, lanczos
        from mrgd_ext.curvature.distributed import DistributedOperator

        model, loss_fn, X, y = curvature_problem()
        lo, hi = SHARD_BOUNDS[world][rank], SHARD_BOUNDS[world][rank + 1]
        op = DistributedOperator(HessianOperator(model, loss_fn, (X[lo:hi], y[lo:hi])))
        results = curvature_results(op)
        results["bytes_reduced"] = op.bytes_reduced
        if bad_input:
            errors = {}
            # Ranks that differentiate different parameters (n differs).
            params = list(model.parameters()) if rank == 0 else list(model.parameters())[:2]
            _errors_on_every_rank(rank, world, errors, "n", lambda: DistributedOperator(
                HessianOperator(model, loss_fn, (X[lo:hi], y[lo:hi]), params=params)))
            # Ranks in different dtypes.
            other = curvature_problem()[0].float() if rank == 1 else model
            data = (X[lo:hi].to(next(other.parameters()).dtype), y[lo:hi])
            _errors_on_every_rank(rank, world, errors, "dtype", lambda: DistributedOperator(
                HessianOperator(other, loss_fn, data)))
            # Probe batches of different per-sample shapes: rank 1 has an extra input feature (validate=False:
            # nothing is evaluated, so only the comparison at construction can catch it, on every rank).
            Xp = torch.cat([X[lo:hi], torch.zeros(hi - lo, 1, dtype=X.dtype)], dim=1) if rank == 1 else X[lo:hi]
            _errors_on_every_rank(rank, world, errors, "probe_shape", lambda: DistributedOperator(
                HessianOperator(model, loss_fn, (Xp, y[lo:hi]), validate=False)))
            # A closure operator without num_samples, on one rank only.
            closure_op = HessianOperator.from_closure(lambda p: (p[0] ** 4).sum(),
                                                      [torch.ones(op.n, dtype=torch.float64)])
            _errors_on_every_rank(rank, world, errors, "num_samples", lambda: DistributedOperator(
                closure_op if rank == 1 else op.op))
            # A rank whose local product raises: every rank raises, none waits.
            failing = DistributedOperator(_FailingOperator(op.op) if rank == 1 else op.op)
            _errors_on_every_rank(rank, world, errors, "product",
                                  lambda: failing.matvec(torch.ones(op.n, dtype=torch.float64)))
            # Ranks running the solver with different seeds: the blocks differ, caught on every rank.
            _errors_on_every_rank(rank, world, errors, "seed", lambda: lanczos(op, k=2, seed=rank))
            # The operator still works after all of that.
            errors["after"] = op.matvec(torch.ones(op.n, dtype=torch.float64))
            results["errors"] = errors
        torch.save(results, os.path.join(out_dir, f"curvature.{rank}"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_operator_equals_single_process(tmp_path, world):
    from mrgd_ext import HessianOperator

    run_ranks(_curvature_rank, world, tmp_path, world == 2)
    ranks = [torch.load(tmp_path / f"curvature.{r}", weights_only=False) for r in range(world)]
    # Same bits on every rank: every rank receives the same all-reduced buffer, and runs the same
    # deterministic solver on it.
    for other in ranks[1:]:
        for key, value in ranks[0].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other[key]), key

    model, loss_fn, X, y = curvature_problem()
    single = curvature_results(HessianOperator(model, loss_fn, (X, y)))
    dist_res = ranks[0]
    # The Hessian of the mean over the union of the shards: the distributed operator adds the shards'
    # weighted float64 means in a different order than one pass over all samples: rounding only,
    # ~eps * (number of terms) relative to |H|.
    h_scale = single["dense"].abs().max()
    torch.testing.assert_close(dist_res["dense"], single["dense"], rtol=0, atol=1e-12 * h_scale)
    truth = torch.linalg.eigvalsh(single["dense"])
    # The solvers see operators equal to ~1e-15 relative; Lanczos' Ritz values (tol 1e-10) then agree to
    # far better than its tolerance, and both equal the dense eigenvalues to the tolerance.
    torch.testing.assert_close(dist_res["lanczos_values"], single["lanczos_values"], rtol=1e-9, atol=1e-9 * h_scale)
    ends = torch.cat([truth.flip(0)[:2], truth[:2].flip(0)])
    torch.testing.assert_close(dist_res["lanczos_values"], ends, rtol=1e-7, atol=1e-7 * h_scale)
    # Eigenvectors up to sign.
    signs = torch.sign((dist_res["lanczos_vectors"] * single["lanczos_vectors"]).sum(dim=1, keepdim=True))
    torch.testing.assert_close(dist_res["lanczos_vectors"] * signs, single["lanczos_vectors"], rtol=0, atol=1e-6)
    # SLQ (20 Lanczos steps per probe without reorthogonalisation) and Hutchinson: the same probes on the
    # same operator up to rounding.
    for key in ("slq_nodes", "slq_weights", "trace_samples", "estimate_lambda_max", "estimate_groups"):
        torch.testing.assert_close(dist_res[key], single[key], rtol=1e-7, atol=1e-9 * h_scale, equal_nan=True,
                                   msg=key)
    # One all-reduce per block product: its payload is the block plus 2 * world flags.
    assert dist_res["bytes_reduced"] > 0

    if world == 2:
        for rank, res in enumerate(ranks):
            errs = res["errors"]
            assert errs["n"][0] == "ValueError" and "differ in n" in errs["n"][1], errs["n"]
            assert errs["dtype"][0] == "ValueError" and "differ in dtype" in errs["dtype"][1], errs["dtype"]
            assert errs["num_samples"][0] == "ValueError" and "num_samples" in errs["num_samples"][1]
            assert errs["probe_shape"][0] == "ValueError" and "per-sample probe shapes" in errs["probe_shape"][1]
            if rank == 1:
                assert errs["product"] == ("ArithmeticError", "local product failed on purpose")
            else:
                assert errs["product"][0] == "RuntimeError" and "rank(s) [1]" in errs["product"][1]
            assert errs["seed"][0] == "RuntimeError" and "different blocks" in errs["seed"][1], errs["seed"]
            torch.testing.assert_close(errs["after"], single["dense"].sum(dim=0), rtol=0, atol=1e-11 * h_scale)


# ------------------------------------------------------------------------------------------------------------
# MrGD on FSDP2 (DTensor) parameters, and distributed checkpoints.

CYCLE, WEIGHT_DECAY = [0.05, 0.2, 0.5], 0.01
MODES = {
    "default": {},
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "reference": {"foreach": False, "fused": False},
}
TRAIN_STEPS, RESUME_AT = 7, 4  # RESUME_AT is not a multiple of len(CYCLE): the resumed run starts mid-cycle


def training_problem():
    """An MLP whose first layer's 7 rows do not split evenly over 2 or 4 ranks (uneven FSDP shards)."""
    torch.manual_seed(11)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    gen = torch.Generator().manual_seed(12)
    X = torch.randn(16, 5, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (16,), generator=gen)
    return model, X, y


def subspace_basis(n, r=3, seed=13):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64, generator=gen))
    return q.T.contiguous(), [0.02 * seed / 13, 0.05, 0.1], 0.3 * seed / 13


def make_optimizer(model, mode, seed=13):
    """The optimizer of ``mode``; ``seed`` picks the subspace (a resumed run starts from another one, which the
    checkpoint must replace)."""
    params = list(model.parameters())
    if mode == "subspace":
        opt = MrGD(params, plan=[1.0], weight_decay=WEIGHT_DECAY)
        basis, rates, base = subspace_basis(sum(p.numel() for p in params), seed=seed)
        opt.set_subspace(basis, rates, base)
        return opt
    return MrGD(params, plan=CYCLE, weight_decay=WEIGHT_DECAY, **MODES[mode])


def train(model, opt, X, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()


def full_params(model):
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]


def _fsdp_rank(rank, world, init_file, out_dir):
    init_gloo(rank, world, init_file)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        out = {}
        for mode in [*MODES, "subspace"]:
            model, X, y = training_problem()
            fully_shard(model[0], mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = make_optimizer(model, mode)
            # Every rank trains on the same batch: FSDP's reduce-scatter averages identical gradients
            # (exact: g + g = 2g, then / 2), so the gradients equal the single-process ones bitwise.
            train(model, opt, X, y, TRAIN_STEPS)
            out[mode] = full_params(model)
        # What FSDP2 parameters cannot do, refused with the same error on every rank, before any collective.
        from mrgd_ext import AutoMrGD, HessianOperator

        model, X, y = training_problem()
        fully_shard(model, mesh=mesh)
        params = list(model.parameters())
        basis, rates, base = subspace_basis(sum(p.numel() for p in params))
        lone = dist.new_group([0])  # collective: every rank creates it; rank 1 is not a member
        errors = {}
        for name, make in {
            "hessian": lambda: HessianOperator(model, torch.nn.functional.cross_entropy, (X, y)),
            "auto": lambda: AutoMrGD(params, None),
            "group": lambda: MrGD(params, plan=[1.0]).set_subspace(basis, rates, base, process_group=lone),
        }.items():
            _errors_on_every_rank(rank, world, errors, name, make)
        out["errors"] = errors
        torch.save(out, os.path.join(out_dir, f"fsdp.{rank}"))
    finally:
        dist.destroy_process_group()


def test_mrgd_on_fsdp2_parameters_equals_single_process(tmp_path):
    run_ranks(_fsdp_rank, 2, tmp_path)
    ranks = [torch.load(tmp_path / f"fsdp.{r}") for r in range(2)]
    for rank, res in enumerate(ranks):
        errs = res["errors"]
        for name in ("hessian", "auto"):  # curvature through FSDP2 is a documented limitation
            assert errs[name][0] == "NotImplementedError" and "DTensor parameters" in errs[name][1], errs[name]
        # A process group other than the mesh's: rank 0 is in it (wrong ranks), rank 1 is not.
        assert errs["group"][0] == "ValueError", errs["group"]
        assert ("has ranks [0] but" if rank == 0 else "does not contain this rank") in errs["group"][1]
    for mode in [*MODES, "subspace"]:
        model, X, y = training_problem()
        train(model, make_optimizer(model, mode), X, y, TRAIN_STEPS)
        single = full_params(model)
        for got in ranks:
            for a, b in zip(got[mode], single):
                if mode == "subspace":
                    # The projection U^T g is two partial sums all-reduced instead of one sum: float64
                    # rounding in c, scaled by the rates, per step.
                    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
                else:
                    # Element-wise step on the local shards of bitwise-equal gradients: bitwise.
                    assert torch.equal(a, b), mode


# Temporal MrGD (its state is in the param groups) and the subspace mode (its basis is saved per parameter,
# sharded like the parameters under FSDP2).
CHECKPOINT_CASES = [("ddp", "default"), ("ddp", "foreach"), ("ddp", "subspace"), ("fsdp2", "default"),
                    ("fsdp2", "reference"), ("fsdp2", "subspace")]


def _checkpoint_rank(rank, world, init_file, out_dir):
    init_gloo(rank, world, init_file)
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))

        def build(wrapper, mode, seed=13):
            model, X, y = training_problem()
            if wrapper == "fsdp2":
                fully_shard(model[0], mesh=mesh)
                fully_shard(model, mesh=mesh)
                wrapped = model
            else:
                wrapped = torch.nn.parallel.DistributedDataParallel(model)
                X, y = X[rank::world], y[rank::world]  # DDP: each rank its shard of the batch
            return wrapped, make_optimizer(wrapped, mode, seed), X, y

        out = {}
        for wrapper, mode in CHECKPOINT_CASES:
            ckpt = os.path.join(out_dir, f"ckpt_{wrapper}_{mode}")
            model, opt, X, y = build(wrapper, mode)
            train(model, opt, X, y, RESUME_AT)
            opt.zero_grad()  # the usual state at a checkpoint: no gradients
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.save(state, checkpoint_id=ckpt)
            train(model, opt, X, y, TRAIN_STEPS - RESUME_AT)
            uninterrupted = full_params(model)

            model2, opt2, X, y = build(wrapper, mode, seed=17)
            state = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
            dcp.load(state, checkpoint_id=ckpt)
            set_model_state_dict(model2, state["model"])
            set_optimizer_state_dict(model2, opt2, state["optim"])
            position = opt2.param_groups[0]["cycle_position"]
            train(model2, opt2, X, y, TRAIN_STEPS - RESUME_AT)
            out[wrapper, mode] = {"uninterrupted": uninterrupted, "resumed": full_params(model2),
                                  "position": position}
            if mode == "subspace":
                # Into an optimizer without a subspace: the template has no basis entries to fill, the
                # loaded param group says there is one; the same clear error on every rank.
                model3, opt3, X, y = build(wrapper, "default")
                state = {"optim": get_optimizer_state_dict(model3, opt3)}
                dcp.load(state, checkpoint_id=ckpt)
                _errors_on_every_rank(rank, world, out[wrapper, mode], "error",
                                      lambda m=model3, o=opt3, sd=state["optim"]: set_optimizer_state_dict(m, o, sd))
        torch.save(out, os.path.join(out_dir, f"ckpt.{rank}"))
    finally:
        dist.destroy_process_group()


def test_distributed_checkpoint_resumes_bitwise(tmp_path):
    run_ranks(_checkpoint_rank, 2, tmp_path)
    ranks = [torch.load(tmp_path / f"ckpt.{r}") for r in range(2)]
    for case in CHECKPOINT_CASES:
        for res in ranks:
            res = res[case]
            # The subspace step does not walk the cycle.
            assert res["position"] == (0 if case[1] == "subspace" else RESUME_AT % len(CYCLE)), case
            if case[1] == "subspace":
                assert res["error"][0] == "ValueError" and "subspace state that was not loaded" in res["error"][1]
            for a, b in zip(res["resumed"], res["uninterrupted"]):
                assert torch.equal(a, b), case
        # Replicas (DDP) and gathered shards (FSDP2) agree across ranks.
        for a, b in zip(ranks[0][case]["resumed"], ranks[1][case]["resumed"]):
            assert torch.equal(a, b), case


# ------------------------------------------------------------------------------------------------------------
# AutoMrGD under DDP: global probe, global loss, identical decisions on every rank.

AUTO_STEPS = 24


def _auto_rank(rank, world, init_file, out_dir, fail_at):
    init_gloo(rank, world, init_file)
    try:
        from mrgd_ext import AutoMrGD, DistributedOperator, HessianOperator

        model, loss_fn, X, y = curvature_problem()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        params = list(model.parameters())
        Xr, yr = X[rank::world], y[rank::world]  # each rank: its shard of the training and probe data
        probe = DistributedOperator(HessianOperator(model, loss_fn, (Xr[:20], yr[:20]), params=params))
        opt = AutoMrGD(params, probe, refresh_every=8, num_eigs=4, block_size=2, density_order=20)
        step = 0

        def closure():
            opt.zero_grad()
            loss = loss_fn(ddp(Xr), yr)
            loss.backward()
            if step == fail_at and rank == 1:
                raise ArithmeticError("closure failed on purpose")
            return loss

        out = {"error": None}
        try:
            for step in range(AUTO_STEPS):  # noqa: B007 - the closure above reads step
                opt.step(closure)
        except Exception as exc:  # noqa: BLE001 - the test asserts the type
            out["error"] = (type(exc).__name__, str(exc), step)
        out.update(params=[p.detach().clone() for p in params], events=opt.events,
                   losses=torch.tensor(float(opt.state["multirate_auto"]["best_loss"] or 0.0)))
        torch.save(out, os.path.join(out_dir, f"auto.{rank}"))
    finally:
        dist.destroy_process_group()


def test_automrgd_under_ddp_identical_on_every_rank(tmp_path):
    run_ranks(_auto_rank, 2, tmp_path, -1)
    ranks = [torch.load(tmp_path / f"auto.{r}", weights_only=False) for r in range(2)]
    assert ranks[0]["error"] is None and ranks[1]["error"] is None
    # One plan, the same measurements and decisions, the same parameters bit for bit.
    strip = [[{k: v for k, v in e.items() if k != "seconds"} for e in r["events"]] for r in ranks]
    assert strip[0] == strip[1] and len(strip[0]) >= 2  # the start and at least one refresh
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)
    # It trained: the global loss fell below the loss at the start.
    model, loss_fn, X, y = curvature_problem()
    with torch.no_grad():
        start = float(loss_fn(model(X), y))
    assert float(ranks[0]["losses"]) < start


def test_automrgd_rank_that_raises_stops_every_rank(tmp_path):
    run_ranks(_auto_rank, 2, tmp_path, 3)
    ranks = [torch.load(tmp_path / f"auto.{r}", weights_only=False) for r in range(2)]
    assert ranks[1]["error"][:2] == ("ArithmeticError", "closure failed on purpose")
    assert ranks[0]["error"][0] == "RuntimeError" and "rank(s) [1]" in ranks[0]["error"][1]
    assert ranks[0]["error"][2] == ranks[1]["error"][2] == 3


AUTO_STOP = 10  # mid check interval (check points every 4 steps), after a refresh; more refreshes follow


def _auto_checkpoint_rank(rank, world, init_file, out_dir):
    init_gloo(rank, world, init_file)
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from mrgd_ext import AutoMrGD, DistributedOperator, HessianOperator

        def build():
            model, loss_fn, X, y = curvature_problem()
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            params = list(model.parameters())
            Xr, yr = X[rank::world], y[rank::world]
            probe = DistributedOperator(HessianOperator(model, loss_fn, (Xr[:20], yr[:20]), params=params))
            # A tight Lanczos tolerance: a resumed run's next measurement warm-starts from a different
            # estimate and agrees with the uninterrupted one to that tolerance (checked below).
            opt = AutoMrGD(params, probe, refresh_every=4, check_every=4, num_eigs=4, block_size=2,
                           density_order=20, lanczos_tol=1e-9)

            def closure():
                opt.zero_grad()
                loss = loss_fn(ddp(Xr), yr)
                loss.backward()
                return loss

            return ddp, params, opt, closure

        ckpt = os.path.join(out_dir, "ckpt_auto")
        ddp, params, opt, closure = build()
        for _ in range(AUTO_STOP):
            opt.step(closure)
        saved_state = copy.deepcopy(opt.state_dict())  # state_dict() shares the live buffers, as in torch.optim
        dcp.save({"model": get_model_state_dict(ddp), "optim": get_optimizer_state_dict(ddp, opt)},
                 checkpoint_id=ckpt)
        done = len(opt.events)
        for _ in range(AUTO_STEPS - AUTO_STOP):
            opt.step(closure)
        out = {"uninterrupted": [p.detach().clone() for p in params], "events_after": opt.events[done:],
               "saved_state": saved_state}

        ddp2, params2, opt2, closure2 = build()  # measures at the initial parameters; the checkpoint replaces it
        state = {"model": get_model_state_dict(ddp2), "optim": get_optimizer_state_dict(ddp2, opt2)}
        dcp.load(state, checkpoint_id=ckpt)
        set_model_state_dict(ddp2, state["model"])
        set_optimizer_state_dict(ddp2, opt2, state["optim"])
        out["loaded_state"] = copy.deepcopy(opt2.state_dict())
        for _ in range(AUTO_STEPS - AUTO_STOP):
            opt2.step(closure2)
        out.update(resumed=[p.detach().clone() for p in params2], events_resumed=opt2.events[1:])
        torch.save(out, os.path.join(out_dir, f"auto_ckpt.{rank}"))
        dist.barrier()  # both ranks done before either tears its connections down
    finally:
        dist.destroy_process_group()


def _same_state(a, b, path="state"):
    """Bitwise equality of two state dicts (tensors by torch.equal, the rest by ==)."""
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same_state(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same_state(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def test_automrgd_distributed_checkpoint_resumes_the_trajectory(tmp_path):
    run_ranks(_auto_checkpoint_rank, 2, tmp_path)
    ranks = [torch.load(tmp_path / f"auto_ckpt.{r}", weights_only=False) for r in range(2)]
    for res in ranks:
        # The round trip of the state itself is exact (the rollback point, the subspace, every decision field).
        _same_state(res["loaded_state"], res["saved_state"])
        # The same decisions after the resume point: measurements at the same steps for the same reasons.
        assert [(e["step"], e["kind"], e["reason"]) for e in res["events_resumed"]] == \
            [(e["step"], e["kind"], e["reason"]) for e in res["events_after"]]
        assert len(res["events_after"]) >= 1  # the resumed run measures again: the tolerance below matters
        for e, f in zip(res["events_resumed"], res["events_after"]):
            torch.testing.assert_close(torch.tensor(e["groups"]), torch.tensor(f["groups"]), rtol=1e-7, atol=0)
        # The parameters: equal up to the next measurement; it warm-starts Lanczos from the estimate the resumed
        # optimizer's constructor made (not saved: NOTE: [AutoMrGD checkpoint]), so its Ritz vectors agree with
        # the uninterrupted run's to the solver's tolerance (lanczos_tol=1e-9 above, float64), and the
        # steps after it by about that, relative (measured: 9e-12 on parameters of size ~1 after 14 steps and
        # three measurements; groups to 2e-10 relative).
        for a, b in zip(res["resumed"], res["uninterrupted"]):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    for a, b in zip(ranks[0]["resumed"], ranks[1]["resumed"]):  # replicas stay identical
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------------
# The examples, as a user runs them.

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.mark.parametrize("script,args,expect", [
    ("fsdp2_mrgd.py", ["--steps", "12"], "resumed at cycle position"),
    ("ddp_automrgd.py", ["--steps", "20"], "replicas identical"),
])
def test_example_runs_under_torchrun(tmp_path, script, args, expect):
    import subprocess
    import sys

    path = os.path.join(EXAMPLES, script)
    if not os.path.exists(path):
        pytest.skip(f"{path} is not in this checkout")
    extra = ["--checkpoint", str(tmp_path / "ckpt")] if script == "fsdp2_mrgd.py" else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", path, *args, *extra],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert expect in proc.stdout, proc.stdout
