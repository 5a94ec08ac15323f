"""AutoMrGD under data parallelism: the loss it checks is the mean over the ranks, the same on every rank.

AutoMrGD decides from the loss (check points, back-offs, rollbacks) and from the curvature it measures. Under
DDP each rank sees the loss of its own batch, so ranks would decide differently, take different code paths
and leave their collectives unmatched. With a :class:`mrgd_ext.DistributedOperator` as the probe the
measurement is already global; :func:`global_closure` makes the loss global too: every closure evaluation is
followed by one all-reduce of two float64 numbers (the loss and a failure flag), so every rank sees the
same mean loss and takes the same decisions, and a rank whose closure raises still joins the all-reduce, so
the others raise too instead of waiting (NOTE: [collective safety] in mrgd_ext.curvature.distributed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["global_closure"]


def global_closure(closure: Callable[[], Any], hessian: Any) -> Callable[[], Any]:
    """``closure`` itself, or, when ``hessian`` is a DistributedOperator, a closure returning the mean of the
    ranks' losses (a float64 scalar tensor, the same bits on every rank)."""
    from mrgd_ext.curvature.distributed import DistributedOperator

    if not isinstance(hessian, DistributedOperator):
        return closure
    import torch.distributed as dist

    group, world = hessian.process_group, hessian.world_size

    def mean_loss() -> torch.Tensor:
        error: BaseException | None = None
        try:
            loss = closure()
            value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        except Exception as exc:  # joins the all-reduce below, then raises
            error, value = exc, 0.0
        payload = torch.zeros(1 + world, dtype=torch.float64, device=hessian.device)  # [loss, flag per rank]
        payload[0] = value
        payload[1 + hessian.rank] = 1.0 if error is not None else 0.0
        dist.all_reduce(payload, group=group)
        if error is not None:
            raise error
        failed = [r for r, f in enumerate(payload[1:].tolist()) if f != 0]
        if failed:
            raise RuntimeError(f"AutoMrGD: the closure raised on rank(s) {failed} (see the error raised there); "
                               "every rank stops")
        return payload[0] / world

    return mean_loss
