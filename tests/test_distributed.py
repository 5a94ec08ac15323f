"""The subspace step with sharded parameters (the FSDP layout): two gloo ranks on this machine.

Each rank holds half of the flat parameter vector and the matching columns of the basis. The projection
U^T g is then a partial sum per rank; MrGD all-reduces it over the process group, and the union of the
shards must equal the unsharded step.
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mrgd_ext import MrGD

# Two ranks that could deadlock in a collective: a hang must fail the run. The ranks are not daemons, so a
# timeout raised in the test would leave interpreter exit waiting on them; pytest-timeout's thread method
# (stack dump, then exit of the whole run) bounds it instead.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300, method="thread")]

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


def _rank_main(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        basis, h_diag, target = problem()
        lo, hi = (0, N // 2) if rank == 0 else (N // 2, N)
        x = torch.zeros(hi - lo, dtype=torch.float64, requires_grad=True)
        opt = MrGD([x], plan=[1.0])
        opt.set_subspace(basis[:, lo:hi].contiguous(), RATES, BASE_LR, process_group=dist.group.WORLD)
        run_steps(x, opt, h_diag[lo:hi], target[lo:hi])
        torch.save(x.detach(), f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_sharded_subspace_step_equals_unsharded():
    basis, h_diag, target = problem()
    x = torch.zeros(N, dtype=torch.float64, requires_grad=True)
    opt = MrGD([x], plan=[1.0])
    opt.set_subspace(basis, RATES, BASE_LR)
    run_steps(x, opt, h_diag, target)

    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "shard")
        mp.spawn(_rank_main, args=(2, init_file, out_file), nprocs=2, join=True)
        sharded = torch.cat([torch.load(f"{out_file}.{r}") for r in range(2)])
    # Only the order of the float64 additions in U^T g differs (two partial sums, then all-reduce).
    torch.testing.assert_close(sharded, x.detach(), rtol=1e-12, atol=1e-14)
