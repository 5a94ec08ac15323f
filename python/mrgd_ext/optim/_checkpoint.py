"""MrGD's subspace state in a state dict: one entry per parameter, so torch.distributed.checkpoint can save it.

NOTE: [per-parameter checkpoint form]
In memory the subspace state is one entry under a string key of ``optimizer.state`` (the basis ``[r, n_local]``
over the concatenated parameters, the rate of each row, the base rate), because the fused kernels read one
contiguous basis. ``torch.distributed.checkpoint`` names optimizer state by the parameter it belongs to
(``get_optimizer_state_dict`` maps every state key to a parameter's name and has none for other keys), and
under FSDP2 it has to know how each tensor is sharded. So ``state_dict()`` writes the subspace state per
parameter::

    state[i]["subspace_basis"]          the basis columns of parameter i, shape [r, *p_i.shape]; a DTensor
                                        sharded like p_i (one dimension further in) when p_i is one
    state[i]["subspace_column_rates"]   [r], the same in every entry
    state[i]["subspace_base_lr"]        the same in every entry
    param_groups[0]["subspace_rows"]    r, or 0 outside subspace mode

and ``load_state_dict`` reassembles the basis from the columns. ``subspace_rows`` travels with the param group
even when the entries do not (``dcp.load`` fills only the keys of the state dict it is given), so a checkpoint
with a subspace state loaded into an optimizer without one is an error, not a silent switch to the temporal
cycle. The entries are copies (``r * n_local`` elements while the state dict lives): ``dcp.load`` writes into the
state dict it is handed, and nothing may reach the live basis before ``load_state_dict`` has checked it.

Loading with DTensor parameters is collective over their mesh (every rank calls ``load_state_dict``, as
``set_optimizer_state_dict`` does): the ranks exchange whether their part of the state was accepted, so a
rejected state raises on every rank, and the basis's orthonormality is checked on the global Gram matrix
(one all-reduce of ``r * r`` float64), since no rank's column shard is orthonormal on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mrgd_ext._validation import check_orthonormal_gram, check_orthonormal_rows
from mrgd_ext.optim._dtensor import is_dtensor, local

__all__ = ["BASIS", "RATES", "BASE_LR", "ROWS", "pack_subspace", "unpack_subspace", "mesh_group", "agree",
           "check_orthonormal"]

BASIS, RATES, BASE_LR = "subspace_basis", "subspace_column_rates", "subspace_base_lr"
ROWS = "subspace_rows"
_FIELDS = (BASIS, RATES, BASE_LR)


def _piece_as_dtensor(piece: torch.Tensor, p: Any) -> torch.Tensor:
    """``piece`` (this rank's ``[r, *local shape]`` columns of ``p``) as a DTensor of global shape ``[r, *p.shape]``
    sharded like ``p`` one dimension further in (FSDP2 shards dimension 0, so the basis dimension 1)."""
    from torch.distributed.tensor import DTensor, Shard

    shape = torch.Size([piece.shape[0], *p.shape])
    placements = [Shard(pl.dim + 1) for pl in p.placements]  # prepare_subspace admits Shard placements only
    stride = torch.empty(shape, device="meta").stride()
    # shape and stride given: FSDP2's shards may be uneven, which from_local cannot infer.
    return DTensor.from_local(piece, p.device_mesh, placements, run_check=False, shape=shape, stride=stride)


def pack_subspace(sub: dict[str, Any] | None, params: Sequence[torch.Tensor], keys: Sequence[Any],
                  state: dict[Any, Any], group: dict[str, Any]) -> None:
    """Write the in-memory subspace entry ``sub`` into a state dict's ``state`` (entries under ``keys``, one per
    parameter) and ``group`` (its first param group); NOTE: [per-parameter checkpoint form]."""
    if sub is None:
        group[ROWS] = 0
        return
    basis = sub["basis"]
    r = basis.shape[0]
    group[ROWS] = r
    offset = 0
    for key, p in zip(keys, params):
        shard = local(p)
        piece = basis[:, offset:offset + shard.numel()].reshape(r, *shard.shape).clone()
        offset += shard.numel()
        entry = dict(state.get(key, {}))
        entry[BASIS] = _piece_as_dtensor(piece, p) if is_dtensor(p) else piece
        entry[RATES] = sub["column_rates"].clone()
        entry[BASE_LR] = float(sub["base_lr"])
        state[key] = entry


def unpack_subspace(state: dict[Any, Any], keys: Sequence[Any], params: Sequence[torch.Tensor], rows: Any,
                    where: str) -> tuple[dict[str, Any] | None, dict[Any, Any]]:
    """``(subspace entry or None, state without the per-parameter subspace fields)`` from a state dict's ``state``.

    Structural checks only (presence, shapes, one dtype, equal rates in every entry, ``rows``); the values are
    checked by the caller. Raises KeyError/TypeError/ValueError naming the entry."""
    rest: dict[Any, Any] = {}
    for k, v in state.items():
        if isinstance(v, dict) and any(f in v for f in _FIELDS):
            v = {f: x for f, x in v.items() if f not in _FIELDS}
            if not v:
                continue
        rest[k] = v
    present = [isinstance(state.get(k), dict) and BASIS in state[k] for k in keys]
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 0):
        raise ValueError(f"{where}['param_groups'][0][{ROWS!r}] must be an integer >= 0, got {rows!r}")
    if not any(present):
        if rows:
            raise ValueError(
                f"{where}['param_groups'][0][{ROWS!r}] is {rows} but no parameter's entry has a {BASIS!r}: the "
                "checkpoint holds a subspace state that was not loaded. Give the optimizer a subspace of the same "
                "shape (set_subspace) before taking the state dict that dcp.load fills"
            )
        return None, rest
    name = f"{where}['state']"
    missing = [k for k, has in zip(keys, present) if not has]
    if missing:
        raise KeyError(f"{name}[{missing[0]!r}] has no {BASIS!r}, but other parameters' entries do: a subspace "
                       "state has one for every parameter")
    entries = [state[k] for k in keys]
    for k, e in zip(keys, entries):
        for f in _FIELDS:
            if f not in e:
                raise KeyError(f"{name}[{k!r}] has no {f!r}")
    first = entries[0][BASIS]
    if not isinstance(first, torch.Tensor) or first.dim() < 1:
        raise TypeError(f"{name}[{keys[0]!r}][{BASIS!r}] must be a tensor [r, *parameter shape], "
                        f"got {type(first).__name__}")
    r = first.shape[0]
    columns = []
    for k, e, p in zip(keys, entries, params):
        piece = e[BASIS]
        if not isinstance(piece, torch.Tensor):
            raise TypeError(f"{name}[{k!r}][{BASIS!r}] must be a tensor, got {type(piece).__name__}")
        if is_dtensor(piece) != is_dtensor(p):
            raise TypeError(f"{name}[{k!r}][{BASIS!r}] is {'a' if is_dtensor(piece) else 'not a'} DTensor but its "
                            f"parameter is {'one' if is_dtensor(p) else 'a plain tensor'}")
        shard = local(piece)
        want = (r, *local(p).shape)
        if tuple(shard.shape) != want:
            raise ValueError(f"{name}[{k!r}][{BASIS!r}] has shape {tuple(shard.shape)} here but the parameter "
                             f"needs {want} (r = {r} rows, then the parameter's shape)")
        if shard.dtype != first.dtype:
            raise TypeError(f"{name}[{k!r}][{BASIS!r}] is {shard.dtype} but {name}[{keys[0]!r}][{BASIS!r}] is "
                            f"{first.dtype}: the basis has one dtype")
        columns.append(shard.reshape(r, -1))
    rates, base = entries[0][RATES], entries[0][BASE_LR]
    if not isinstance(rates, torch.Tensor):
        raise TypeError(f"{name}[{keys[0]!r}][{RATES!r}] must be a tensor, got {type(rates).__name__}")
    for k, e in zip(keys[1:], entries[1:]):
        other = e[RATES]
        if not (isinstance(other, torch.Tensor) and other.shape == rates.shape and other.dtype == rates.dtype
                and torch.allclose(other.cpu(), rates.cpu(), rtol=0.0, atol=0.0, equal_nan=True)):
            raise ValueError(f"{name}[{k!r}][{RATES!r}] differs from {name}[{keys[0]!r}][{RATES!r}]: every entry "
                             "holds the same rates")
        if e[BASE_LR] != base:
            raise ValueError(f"{name}[{k!r}][{BASE_LR!r}] differs from {name}[{keys[0]!r}][{BASE_LR!r}]")
    if rows is not None and rows != r:
        raise ValueError(f"{where}['param_groups'][0][{ROWS!r}] is {rows} but the basis entries have {r} rows")
    basis = torch.cat(columns, dim=1).contiguous()
    return {"basis": basis, "column_rates": rates, "base_lr": base}, rest


def mesh_group(params: Sequence[torch.Tensor]) -> Any:
    """The process group of the DTensor parameters' mesh, or None when no parameter is a DTensor."""
    for p in params:
        if is_dtensor(p):
            return p.device_mesh.get_group() if p.device_mesh.ndim == 1 else None
    return None


def agree(error: BaseException | None, rows: int, group: Any, device: torch.device, what: str) -> None:
    """Collective: raise on every rank of ``group`` when any rank has ``error`` or the ranks' ``rows`` differ."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    mine = torch.tensor([1 if error is not None else 0, rows], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu().tolist()
    if error is not None:
        raise error
    failed = [r for r, row in enumerate(table) if row[0]]
    if failed:
        raise ValueError(f"{what}: the state was rejected on rank(s) {failed} (see the error raised there); "
                         "every rank stops")
    if len({row[1] for row in table}) > 1:
        per_rank = ", ".join(f"rank {r}: {row[1]}" for r, row in enumerate(table))
        raise ValueError(f"{what}: the ranks' subspace states have different numbers of rows ({per_rank})")


def check_orthonormal(basis: torch.Tensor, group: Any, name: str) -> None:
    """Rows of the basis orthonormal; ``group`` not None: ``basis`` holds this rank's columns, and the Gram matrix
    is summed over the group first (collective; the same verdict on every rank)."""
    if group is None:
        check_orthonormal_rows(basis, name)
        return
    import torch.distributed as dist

    b = basis.detach().to(torch.float64)
    # The Gram matrix and a non-finite count, in one all-reduce.
    payload = torch.cat([(b @ b.T).reshape(-1), (~torch.isfinite(b)).sum().reshape(1).to(torch.float64)])
    dist.all_reduce(payload, group=group)
    if payload[-1] != 0:
        raise ValueError(f"{name} has non-finite entries")
    r = b.shape[0]
    check_orthonormal_gram(payload[:-1].reshape(r, r), basis.dtype, name)
