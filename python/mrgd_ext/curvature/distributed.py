"""The Hessian of a loss whose data are spread across ranks: one operator, the same on every rank.

:class:`DistributedOperator` wraps a per-rank operator (a :class:`mrgd_ext.HessianOperator` over this rank's
shard of the probe data) so that it acts as the Hessian of the mean loss over the union of the shards::

    H = sum_r (N_r / N) H_r          (N_r samples on rank r, N = sum_r N_r)

One block product ``H V`` is the local product ``H_r V`` scaled by ``N_r / N`` and then one all-reduce (sum)
over the process group. Every rank gets the same bits (an all-reduce hands every rank the same reduced
buffer, which is what keeps DDP replicas identical), so ``lanczos``, ``spectral_density``,
``hutchinson_trace`` and ``estimate_curvature`` run on it unchanged, take identical decisions on every rank
and return identical results, provided every rank calls them with the same arguments (same seed: the probes
and start blocks are drawn from seeded CPU generators, hence equal on every rank).

What travels, per block product of ``b`` vectors of length ``n``: one all-reduce of ``b * n + 2 * world``
elements in the operator's dtype (the block, one failure flag and one input fingerprint per rank). On a ring
that is ``2 (world - 1) / world`` times that many elements sent and received by each rank.

Safety (NOTE: [collective safety]): a rank whose local product raises still joins the all-reduce, with its
failure flag set, so every rank raises instead of the others waiting forever; a rank that applies the
operator to a different block than the others (a different seed, a different solver) is caught by the
fingerprints, on every rank. Construction compares ``n``, dtype, device type, parameter shapes and the
per-sample shapes of the probe data across ranks (and sums the sample counts) with one small all-gather, and
raises the same error on every rank when they disagree. A rank that dies
outright cannot join anything; then the process group's timeout (``init_process_group(timeout=...)``)
bounds the wait.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistributedOperator"]

# dtype <-> a small integer for the construction-time descriptor exchanged between ranks.
_DTYPE_CODES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DEVICE_CODES = ("cpu", "cuda")
# Elements of the block sampled for the fingerprint: enough to catch diverged solvers (their blocks differ
# almost everywhere), cheap next to a Hessian-vector product.
_FINGERPRINT_SAMPLES = 4096


def _shapes_code(shapes: Any) -> int:
    # hash() of a tuple of tuples of ints is not salted (only str/bytes hashing is), so it is the same number in
    # every process.
    return hash(tuple(tuple(int(d) for d in s) for s in shapes)) if shapes is not None else 0


def _fingerprint(V: torch.Tensor) -> int:
    """An integer that identifies the bits of (a strided sample of) ``V``, exactly representable in V's dtype.

    Integer arithmetic (wrapping int64 sums) is exact and independent of the summation order, so equal blocks
    give equal fingerprints on every rank whatever the thread count."""
    flat = V.detach().reshape(-1)
    step = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
    sample = flat[::step][:_FINGERPRINT_SAMPLES].contiguous()
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[sample.element_size()]
    bits = sample.view(int_dtype).to(torch.int64).cpu()
    mixed = int((bits * torch.arange(1, bits.numel() + 1, dtype=torch.int64)).sum()) ^ (V.shape[0] << 20)
    mantissa = int(round(-math.log2(torch.finfo(V.dtype).eps)))
    return mixed % (1 << min(mantissa, 24))


class DistributedOperator:
    """The Hessian of the mean loss over the data shards of all ranks of a process group.

    Args:
        op: this rank's operator (a :class:`mrgd_ext.HessianOperator` over its shard of the probe data, or any
            object with ``matmat``, ``n``, ``dtype`` and ``device``). Every rank's ``op`` must act on the same
            parameters (same ``n``, dtype and parameter shapes), at the same values (under DDP they are).
        process_group: the group to reduce over (default: the default group). It must be initialised.
        num_samples: samples in this rank's shard; default ``op.num_samples`` (set by a
            :class:`HessianOperator` built from data). Required for operators without it (closures). Each
            rank's product enters with weight ``num_samples / sum over ranks``.
        check_inputs: compare a fingerprint of every block across ranks (free: it rides in the same
            all-reduce) and raise on every rank when they differ.

    Attributes:
        n, dtype, device: those of ``op``.
        rank, world_size: in ``process_group``.
        num_samples: this rank's samples; total_samples: over all ranks; weight: ``num_samples/total_samples``.
        bytes_reduced: bytes all-reduced so far (payload per rank; the wire traffic of a ring all-reduce is
            ``2 (world - 1) / world`` times this).

    Raises:
        RuntimeError: torch.distributed is not initialised.
        ValueError/TypeError: bad ``op`` or ``num_samples`` on any rank, or ranks that disagree on ``n``,
            dtype, device type, parameter shapes or per-sample probe shapes: the same message on every rank.
    """

    def __init__(self, op: Any, process_group: Any = None, *, num_samples: int | None = None,
                 check_inputs: bool = True) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistributedOperator needs an initialised torch.distributed process group "
                               "(call torch.distributed.init_process_group first)")
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.check_inputs = bool(check_inputs)
        self.bytes_reduced = 0
        # Validate locally, but report through the collective below so every rank raises.
        local_error: BaseException | None = None
        try:
            self._bind(op, num_samples)
        except (TypeError, ValueError) as exc:
            local_error = exc
        device = self._comm_device(op)
        desc = torch.tensor(
            [0, 0, 0, 0, 0, 0, 0] if local_error is not None else
            [1, self.n, _DTYPE_CODES.index(self.dtype), _DEVICE_CODES.index(self.device.type), self.num_samples,
             _shapes_code(getattr(op, "shapes", None)), _shapes_code(getattr(op, "sample_shapes", None))],
            dtype=torch.int64, device=device,
        )
        gathered = [torch.empty_like(desc) for _ in range(self.world_size)]
        dist.all_gather(gathered, desc, group=process_group)
        table = torch.stack(gathered).cpu().tolist()
        if local_error is not None:
            raise local_error
        self._check_agreement(table)
        self.total_samples = int(sum(row[4] for row in table))
        self.weight = self.num_samples / self.total_samples

    # ------------------------------------------------------------------------------------------------

    @staticmethod
    def _comm_device(op: Any) -> torch.device:
        device = getattr(op, "device", None)
        try:
            return torch.device(device) if device is not None else torch.device("cpu")
        except (TypeError, RuntimeError):
            return torch.device("cpu")

    def _bind(self, op: Any, num_samples: int | None) -> None:
        for attr in ("matmat", "n", "dtype", "device"):
            if not hasattr(op, attr):
                raise TypeError(f"op must be an operator with matmat, n, dtype and device (a HessianOperator); "
                                f"{type(op).__name__} has no {attr!r}")
        if op.dtype not in _DTYPE_CODES:
            raise TypeError(f"op: dtype {op.dtype} is not a floating-point dtype the reduction supports")
        device = torch.device(op.device)
        if device.type not in _DEVICE_CODES:
            raise ValueError(f"op: device {device} is not supported (cpu or cuda)")
        if num_samples is None:
            num_samples = getattr(op, "num_samples", None)
            if num_samples is None:
                raise ValueError("num_samples is required: op does not say how many samples its loss averages "
                                 "(pass the size of this rank's shard)")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples must be an integer > 0, got {num_samples!r}")
        self.op = op
        self.n = int(op.n)
        self.dtype = op.dtype
        self.device = device
        self.num_samples = int(num_samples)

    def _check_agreement(self, table: list[list[int]]) -> None:
        failed = [r for r, row in enumerate(table) if row[0] == 0]
        if failed:
            raise ValueError(f"DistributedOperator: op or num_samples was rejected on rank(s) {failed} "
                             "(see the error raised there)")
        fields = (("n (the number of parameter elements)", 1, lambda c: c),
                  ("dtype", 2, lambda c: _DTYPE_CODES[c]),
                  ("device type", 3, lambda c: _DEVICE_CODES[c]),
                  ("parameter shapes", 5, lambda c: f"<shapes hash {c:d}>"),
                  ("per-sample probe shapes (inputs and targets, batch dimension excluded)", 6,
                   lambda c: f"<shapes hash {c:d}>"))
        for what, col, show in fields:
            values = [row[col] for row in table]
            # Probe shapes are compared among the ranks whose operator has probe data (0: a closure or a
            # custom operator, which says nothing about its data).
            known = {v for v in values if v != 0} if col == 6 else set(values)
            if len(known) > 1:
                per_rank = ", ".join(f"rank {r}: {show(v)}" for r, v in enumerate(values))
                raise ValueError(f"DistributedOperator: the ranks' operators differ in {what} ({per_rank}); "
                                 "every rank must differentiate the same parameters on probe data of one layout")

    # ------------------------------------------------------------------------------------------------
    # The operator interface the Krylov solvers use.

    @property
    def num_hvps(self) -> int:
        """Hessian-vector products of this rank's operator (each block product counts its ``b`` vectors)."""
        return int(getattr(self.op, "num_hvps", 0))

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters of the wrapped :class:`mrgd_ext.CurvatureOperator`, so AutoMrGD's check that it
        differentiates the optimizer's own parameters applies through the wrapper."""
        params = getattr(self.op, "params", None)
        if params is None:
            raise AttributeError(f"the wrapped {type(self.op).__name__} is not a CurvatureOperator: it has no params")
        return list(params)

    def share_graph(self) -> contextlib.AbstractContextManager[None]:
        """The wrapped operator's :meth:`~mrgd_ext.curvature.LinearOperator.share_graph` (this rank's products
        at one point share one gradient graph), or a context that does nothing."""
        share = getattr(self.op, "share_graph", None)
        return share() if share is not None else contextlib.nullcontext()

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        flat: torch.Tensor = self.op.flatten(tensors)
        return flat

    def unflatten(self, vec: torch.Tensor) -> list[torch.Tensor]:
        if hasattr(self.op, "unflatten"):
            parts: list[torch.Tensor] = self.op.unflatten(vec)
            return parts
        return [vec]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector ``v`` [n]."""
        if not isinstance(v, torch.Tensor) or v.dim() != 1:
            raise ValueError(f"matvec needs a vector of shape [{self.n}], got "
                             f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        return self.matmat(v.unsqueeze(0))[0]

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.matvec(other) if other.dim() == 1 else self.matmat(other)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H`` applied to every row of ``V`` [b, n], the same ``[b, n]`` result on every rank.

        Collective: every rank of the group must call it with the same block."""
        if not isinstance(V, torch.Tensor) or V.dim() != 2 or V.shape[1] != self.n:
            shape = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise ValueError(f"matmat needs a block of shape [b, {self.n}], got {shape}")
        V = V.to(device=self.device, dtype=self.dtype)
        b, n, world = V.shape[0], self.n, self.world_size
        body = b * n
        payload = torch.zeros(body + 2 * world, dtype=self.dtype, device=self.device)
        local_error: BaseException | None = None
        try:
            local = self.op.matmat(V)
            if not isinstance(local, torch.Tensor) or tuple(local.shape) != (b, n):
                raise ValueError(f"op.matmat returned {type(local).__name__} of shape "
                                 f"{tuple(getattr(local, 'shape', ()))} for a block [{b}, {n}]")
            torch.mul(local.reshape(-1).to(self.dtype), self.weight, out=payload[:body])
        except Exception as exc:  # NOTE: [collective safety]: join the all-reduce, then raise
            local_error = exc
            payload[:body].zero_()
            payload[body + self.rank] = 1
        if self.check_inputs:
            payload[body + world + self.rank] = _fingerprint(V)
        dist.all_reduce(payload, group=self.process_group)
        self.bytes_reduced += payload.numel() * payload.element_size()
        flags = payload[body:].cpu().tolist()
        failed = [r for r in range(world) if flags[r] != 0]
        if local_error is not None:
            raise local_error
        if failed:
            raise RuntimeError(f"DistributedOperator: the local Hessian product failed on rank(s) {failed} "
                               "(see the error raised there); every rank stops")
        if self.check_inputs and len(set(flags[world:])) > 1:
            raise RuntimeError("DistributedOperator: the ranks applied the operator to different blocks; every "
                               "rank must run the same solver with the same arguments and seed")
        return payload[:body].view(b, n)

    def bytes_per_product(self, b: int) -> int:
        """Bytes each rank all-reduces for one block product of ``b`` vectors."""
        return (b * self.n + 2 * self.world_size) * torch.finfo(self.dtype).bits // 8

    def __repr__(self) -> str:
        return (f"DistributedOperator(n={self.n}, dtype={self.dtype}, rank={self.rank}/{self.world_size}, "
                f"samples={self.num_samples}/{self.total_samples}, op={self.op!r})")
