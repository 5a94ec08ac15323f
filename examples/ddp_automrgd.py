"""AutoMrGD under DDP, the probe spread over the ranks: CPU, gloo.

    torchrun --nproc-per-node 2 examples/ddp_automrgd.py [--steps 200]

A small classifier on two-scale inputs (feature columns 100x apart in scale). Each rank holds its own shard of
the training data and of the probe batch. The probe is a DistributedOperator: every Hessian-vector block
product is local, then one all-reduce, so every rank measures the Hessian over the whole probe and plans the
same cycle; the loss AutoMrGD checks is the ranks' mean. The parameters stay bitwise identical on every rank
(checked at the end).
"""

from __future__ import annotations

import argparse
import datetime

import torch
import torch.distributed as dist

import mrgd_ext


def data(rank: int, world: int, samples: int = 1024):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(samples, 8, generator=gen) * torch.tensor([10.0] * 2 + [1.0] * 3 + [0.1] * 3)
    y = (X[:, 0] + 10 * X[:, 2] - 100 * X[:, 5] > 0).long()
    return X[rank::world], y[rank::world]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    X, y = data(rank, world)

    torch.manual_seed(1)  # the same initial parameters on every rank (DDP also broadcasts rank 0's)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    loss_fn = torch.nn.CrossEntropyLoss()
    params = list(model.parameters())
    probe = mrgd_ext.DistributedOperator(mrgd_ext.HessianOperator(model, loss_fn, (X[:128], y[:128]), params=params))
    opt = mrgd_ext.AutoMrGD(params, probe, refresh_every=50)

    def closure():
        opt.zero_grad()
        loss = loss_fn(ddp(X), y)
        loss.backward()
        return loss

    first = None
    for _ in range(args.steps):
        loss = opt.step(closure)  # the ranks' mean loss
        first = float(loss) if first is None else first
    # Every rank took the same steps: compare a checksum of the parameters bit for bit.
    flat = torch.cat([p.detach().reshape(-1) for p in params]).double()
    sums = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(sums, flat.sum().reshape(1))
    assert all(torch.equal(s, sums[0]) for s in sums), "the replicas diverged"
    if rank == 0:
        print(f"plan: {opt.plan.cycle_length}-step cycle, rates {min(opt.plan.rates):.3g}..{max(opt.plan.rates):.3g}, "
              f"{len(opt.events)} measurements, {opt.estimation_hvps} HVPs per rank, "
              f"{probe.bytes_reduced / 2**20:.2f} MiB all-reduced by the probe")
        print(f"mean loss {first:.4f} -> {float(loss):.4f} after {args.steps} steps; replicas identical")
    # DDP's reducer goes before the process group: torn down after it (when main() returns), its destructor hung
    # in about one run of eight here (gloo, CPU); released first, in none of 64.
    ddp = None  # the only reference (the closure reads it through the same variable)
    dist.barrier()  # no rank tears its connections down while another still prints and exits
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
