"""MrGD on DTensor parameters (``torch.distributed.fsdp.fully_shard``, tensor parallel): run on the local shards.

NOTE: [local shards]
The temporal step ``p -= lr * (g + wd * p)`` is element-wise: each element of the update depends only on the
same element of the parameter and of its gradient, and a DTensor parameter and its gradient have the same
placements (FSDP2 shards both along dim 0). So the step on the local shards *is* the step on the global
tensor, element for element: bitwise the single-process result, with no communication. A sharding strategy
registered for the custom ops would arrive at exactly this (pointwise ops keep the input placements) through
DTensor's dispatcher for nothing, so the optimizer unwraps instead (``to_local()`` is a view of the shard:
writing it writes the parameter).

The subspace step is element-wise except for its projection ``c = U^T g``, a sum over all elements. With
sharded parameters each rank holds the basis columns of its own shard; the per-rank partial projections
are summed by one all-reduce of ``r`` numbers over the mesh's process group (``MrGD.set_subspace`` takes a
basis over the global flat parameters and keeps the local columns). That needs every parameter sharded on a
one-dimensional mesh (each element on exactly one rank); a replicated DTensor parameter would be counted once
per rank, so such layouts are refused.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

from mrgd_ext._validation import is_dtensor

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["is_dtensor", "local", "local_pairs", "prepare_subspace"]


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: in-place writes reach the DTensor), any other tensor as is."""
    return t.to_local() if is_dtensor(t) else t


def local_pairs(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Local shards of matching parameter and gradient lists (NOTE: [local shards])."""
    module = sys.modules.get("torch.distributed.tensor")  # absent: no DTensor can exist (see is_dtensor)
    if module is None or not any(isinstance(t, module.DTensor) for ts in (params, grads) for t in ts):
        return list(params), list(grads)  # plain tensors (every step of a non-sharded model): nothing to unwrap
    out_p, out_g = [], []
    for i, (p, g) in enumerate(zip(params, grads)):
        if is_dtensor(p) != is_dtensor(g) or (is_dtensor(p) and is_dtensor(g) and p.placements != g.placements):
            raise ValueError(
                f"params[{i}] and its gradient have different layouts ({_layout(p)} vs {_layout(g)}); the "
                "element-wise step needs the gradient sharded like its parameter"
            )
        out_p.append(local(p))
        out_g.append(local(g))
    return out_p, out_g


def _layout(t: torch.Tensor) -> str:
    return f"DTensor {tuple(t.placements)}" if is_dtensor(t) else "plain tensor"


def _global_indices(p: DTensor) -> torch.Tensor:
    """Flat indices (into the global parameter) of the elements of this rank's shard, in local order."""
    from torch.distributed.tensor import distribute_tensor

    index = torch.arange(p.numel(), dtype=torch.int64).reshape(p.shape).to(p.device)
    # src_data_rank=None: every rank slices its own shard of the same index tensor, no communication.
    shard: torch.Tensor = distribute_tensor(index, p.device_mesh, p.placements, src_data_rank=None).to_local()
    return shard.reshape(-1)


def _check_group_matches_mesh(process_group: Any, mesh: Any) -> None:
    """``process_group`` holds exactly the ranks of the parameters' (1-D) mesh: the projection ``U^T g`` is summed
    over it, so any other set of ranks sums the wrong shards. Local (no collective): the same verdict on every
    rank that passes the same group."""
    import torch.distributed as dist

    if process_group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"set_subspace: process_group does not contain this rank ({dist.get_rank()}); it must be "
                         "the group of the parameters' device mesh (or None for that group)")
    try:
        ranks = dist.get_process_group_ranks(process_group)
    except (RuntimeError, ValueError, AttributeError, TypeError):
        raise TypeError(f"set_subspace: process_group must be a torch.distributed process group, got "
                        f"{type(process_group).__name__}") from None
    mesh_ranks = dist.get_process_group_ranks(mesh.get_group())
    if sorted(ranks) != sorted(mesh_ranks):
        raise ValueError(f"set_subspace: process_group has ranks {sorted(ranks)} but the parameters are sharded "
                         f"over the mesh ranks {sorted(mesh_ranks)}; pass the mesh's group (or None)")


def prepare_subspace(
    params: Sequence[torch.Tensor], basis: torch.Tensor, process_group: Any
) -> tuple[torch.Tensor, Any, int]:
    """``(local basis, process group, local element count)`` for ``MrGD.set_subspace``.

    Plain parameters: unchanged. DTensor parameters: every one must be sharded (``Shard``) on the same 1-D
    mesh; ``basis`` may span the global flat parameters (then its local columns are taken) or already only the
    local shards; ``process_group`` defaults to the mesh's group.
    """
    if not any(is_dtensor(p) for p in params):
        return basis, process_group, sum(p.numel() for p in params)
    if not all(is_dtensor(p) for p in params):
        raise ValueError("set_subspace: params mix DTensor and plain tensors; the subspace step needs one layout")
    from torch.distributed.tensor import Shard

    dparams = cast("list[DTensor]", list(params))  # all DTensors (checked above)
    mesh = dparams[0].device_mesh
    for i, p in enumerate(dparams):
        if p.device_mesh != mesh or mesh.ndim != 1 or not all(isinstance(pl, Shard) for pl in p.placements):
            raise NotImplementedError(
                f"set_subspace: params[{i}] is a DTensor with placements {tuple(p.placements)} on a "
                f"{p.device_mesh.ndim}-D mesh; the subspace step supports parameters sharded on one 1-D mesh "
                "(fully_shard), where each element lives on exactly one rank"
            )
    if process_group is None:
        process_group = mesh.get_group()
    else:
        _check_group_matches_mesh(process_group, mesh)
    n_local = sum(local(p).numel() for p in params)
    n_global = sum(p.numel() for p in params)
    if isinstance(basis, torch.Tensor) and basis.dim() == 2 and basis.shape[1] == n_global != n_local:
        offsets, columns = 0, []
        for p in dparams:
            columns.append(_global_indices(p) + offsets)
            offsets += p.numel()
        basis = basis[:, torch.cat(columns).to(basis.device)].contiguous()
    return basis, process_group, n_local
