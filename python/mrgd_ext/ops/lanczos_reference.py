"""Pure-torch reference of the Lanczos orthogonalisation kernel (``mrgd_ext::block_orthogonalize_``).

It defines what the kernel computes, is the float64 truth the tests compare the kernel against
(``compute_dtype=torch.float64``), and is the "torch composition" the Lanczos solver uses wherever the fused
kernel is not the faster choice (see ``mrgd_ext.curvature.lanczos`` and benchmarks/bench_lanczos_step.py): per round
two matrix products, ``C = V Q^T`` and ``V -= C Q``, then the Gram matrix ``V V^T``.
"""

from __future__ import annotations

import torch


def block_orthogonalize(
    basis: torch.Tensor,
    vectors: torch.Tensor,
    rounds: int = 2,
    *,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place: ``rounds`` rounds of classical Gram-Schmidt of the rows of ``vectors`` [b, n] against the
    orthonormal rows of ``basis`` [m, n] (``rounds=2`` is CGS2).

    Round ``r`` computes ``C_r = V Q^T`` and subtracts ``C_r Q``. Returns, all float64:
    ``coeffs`` [b, m] = ``sum_r C_r`` (so ``V_out = V_in - coeffs @ Q`` up to rounding), ``gram`` [b, b] =
    ``V_out V_out^T`` and ``in_norms_sq`` [b] = squared norms of the input rows.

    ``compute_dtype`` defaults to the storage dtype (then everything happens in place, with no copies);
    ``torch.float64`` gives the high-precision truth (the result is rounded back into ``vectors``).
    """
    dtype = compute_dtype if compute_dtype is not None else vectors.dtype
    b, m = vectors.shape[0], basis.shape[0]
    work = vectors if dtype == vectors.dtype else vectors.to(dtype)
    q = basis if basis.dtype == dtype else basis.to(dtype)
    in_norms_sq = (work * work).sum(dim=1).to(torch.float64)
    coeffs = torch.zeros((b, m), dtype=torch.float64, device=vectors.device)
    if m > 0 and b > 0:
        for _ in range(rounds):
            c = work @ q.T  # [b, m]
            work.addmm_(c, q, alpha=-1.0)
            coeffs += c.to(torch.float64)
    gram = (work @ work.T).to(torch.float64)
    if work is not vectors:
        vectors.copy_(work)
    return coeffs, gram, in_norms_sq
