"""Multiscale data: generators with known scales, and the offline scikit-learn data sets.

A data set is multiscale (DESIGN 1.1; He, Liu, Tsai, arXiv:2402.03021) when, after a rotation U, each sample
is ``x = U [x0, e1*x1, ..., em*xm]`` with ``1 = e0 >> e1 >> ... >> em > 0`` and every block ``xk`` of order
one. Two kinds of scale appear and every function here says which it means:

* **data scales** ``e_k``: the sizes of the blocks, i.e. the principal values of the data
  (:func:`principal_values`, singular values of the data matrix over ``sqrt(N)``);
* **Hessian scales** ``e_k**2``: the least-squares Hessian ``X^T X / N`` has its eigenvalues in groups near
  the squares of the data scales (what :func:`mrgd_ext.detect_scales` finds and
  :func:`mrgd_ext.plan_multirate` takes).

The ``scales`` argument of the generators is always the data scales.

Generators (seeded with a dedicated CPU ``torch.Generator``; the global RNG is untouched):
:func:`multiscale_inputs` (inputs only), :func:`multiscale_regression` (linear targets) and
:func:`multiscale_classification` (labels from a random linear teacher on the *unscaled* block coordinates, so
that every scale, the smallest included, carries label information).

Real data: :func:`load_digits`, :func:`load_breast_cancer` and :func:`load_wine` wrap the data sets that ship
with scikit-learn (nothing is downloaded). Raw features are kept by default: breast cancer's principal values
span almost six orders of magnitude (ratio 8e5), a naturally multiscale data set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mrgd_ext._validation import check_count

__all__ = [
    "MultiscaleData",
    "load_breast_cancer",
    "load_diabetes_raw",
    "load_digits",
    "load_wine",
    "multiscale_classification",
    "multiscale_inputs",
    "multiscale_regression",
    "principal_values",
]

#: Floating dtypes the generators and loaders return.
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class MultiscaleData:
    """Samples of a multiscale distribution with known structure (:func:`multiscale_inputs`).

    Attributes:
        x: ``[N, d]`` samples ``x_n = U (e * z_n)``, in the requested dtype.
        latent: ``[N, d]`` the unscaled block coordinates ``z_n`` (standard normal, float64), so that
            ``x = (latent * coordinate_scales) @ rotation.T`` up to the final rounding to ``x.dtype``.
        rotation: ``[d, d]`` orthogonal U (float64; the identity when generated with ``rotate=False``). Column
            block k spans the directions of scale ``e_k``.
        scales: the data scales ``(e_0, ..., e_m)``, strictly descending.
        dims: the block dimensions ``(d_0, ..., d_m)``, ``sum(dims) = d``.
        seed: the generator's seed.
    """

    x: torch.Tensor
    latent: torch.Tensor
    rotation: torch.Tensor
    scales: tuple[float, ...]
    dims: tuple[int, ...]
    seed: int

    @property
    def num_samples(self) -> int:
        return int(self.x.shape[0])

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    @property
    def hessian_scales(self) -> tuple[float, ...]:
        """``e_k**2``: where the least-squares Hessian ``X^T X / N`` has its eigenvalue groups."""
        return tuple(e * e for e in self.scales)

    @property
    def coordinate_scales(self) -> torch.Tensor:
        """``[d]`` float64: the data scale of every latent coordinate (``e_k`` repeated ``d_k`` times)."""
        return torch.cat([torch.full((dk,), e, dtype=torch.float64) for e, dk in zip(self.scales, self.dims)])

    def expected_principal_values(self) -> torch.Tensor:
        """``[d]`` float64, descending: the principal values of the distribution (``e_k``, ``d_k`` times).

        The empirical :func:`principal_values` of ``x`` approach them as N grows (block k's spread around
        ``e_k`` is about ``e_k * sqrt(d_k / N)``: a Marchenko-Pastur bulk).
        """
        return self.coordinate_scales

    def expected_hessian_eigenvalues(self) -> torch.Tensor:
        """``[d]`` float64, descending: eigenvalues of the population least-squares Hessian ``E[x x^T]``
        (``e_k**2``, ``d_k`` times)."""
        return self.coordinate_scales**2


# --------------------------------------------------------------------------------------------------------
# Argument checks


def _check_dtype(dtype: Any) -> torch.dtype:
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating torch dtype (float16, bfloat16, float32, float64), got {dtype!r}")
    return dtype


def _check_structure(dims: Sequence[int], scales: Sequence[float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or len(dims) == 0:
        raise ValueError(f"dims must be a non-empty sequence of block dimensions, got {dims!r}")
    dims_t = tuple(check_count(d, f"dims[{k}]", 1) for k, d in enumerate(dims))
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence):
        raise TypeError(f"scales must be a sequence of data scales (one per block), got {scales!r}")
    if len(scales) != len(dims_t):
        raise ValueError(f"scales must have one data scale per block of dims: got {len(scales)} scales for "
                         f"{len(dims_t)} blocks")
    try:
        scales_t = tuple(float(e) for e in scales)
    except (TypeError, ValueError):
        raise ValueError(f"scales must be numbers, got {list(scales)!r}") from None
    for k, e in enumerate(scales_t):
        if not (math.isfinite(e) and e > 0.0):
            raise ValueError(f"scales[{k}] must be a finite data scale > 0, got {e}")
    for k in range(len(scales_t) - 1):
        if not scales_t[k] > scales_t[k + 1]:
            raise ValueError(f"scales must be strictly descending (e_0 = 1 > e_1 > ... > e_m), got scales[{k}] = "
                             f"{scales_t[k]} <= scales[{k + 1}] = {scales_t[k + 1]}")
    return dims_t, scales_t


def _random_rotation(d: int, gen: torch.Generator) -> torch.Tensor:
    # QR of a Gaussian matrix with the signs of R's diagonal moved into Q: Haar-distributed (a plain QR is
    # biased by LAPACK's sign convention). Float64 so that U^T U = I to ~1e-15.
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


# --------------------------------------------------------------------------------------------------------
# Generators


def multiscale_inputs(
    num_samples: int,
    dims: Sequence[int],
    scales: Sequence[float],
    *,
    rotate: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> MultiscaleData:
    """Samples ``x = U [z_0, e_1 z_1, ..., e_m z_m]`` with standard normal blocks ``z_k`` (DESIGN 1.1).

    Args:
        num_samples: N >= 1.
        dims: block dimensions ``d_k >= 1`` (``d = sum(dims)``).
        scales: **data scales** ``e_k``, one per block, finite, > 0 and strictly descending (``e_0 = 1`` is
            the convention; it is not required). The least-squares Hessian scales are their squares.
        rotate: rotate the blocks by a random (Haar) orthogonal U; ``False`` keeps the scales on the
            coordinate axes (U = I).
        seed: seed of a dedicated CPU generator; the same seed gives the same samples.
        dtype: floating dtype of ``x`` (computed in float64 and rounded once).

    Returns:
        A :class:`MultiscaleData`.

    Raises:
        ValueError: naming the bad argument (``num_samples < 1``, a block dimension < 1, ``scales`` not one per
            block, not positive, not finite or not strictly descending).
        TypeError: ``dtype`` not a floating dtype.
    """
    num_samples = check_count(num_samples, "num_samples", 1)
    dims_t, scales_t = _check_structure(dims, scales)
    dtype = _check_dtype(dtype)
    seed = int(seed)
    d = sum(dims_t)
    gen = torch.Generator().manual_seed(seed)
    rotation = _random_rotation(d, gen) if rotate else torch.eye(d, dtype=torch.float64)
    latent = torch.randn(num_samples, d, generator=gen, dtype=torch.float64)
    coord = torch.cat([torch.full((dk,), e, dtype=torch.float64) for e, dk in zip(scales_t, dims_t)])
    x = ((latent * coord) @ rotation.T).to(dtype)  # [N, d]
    return MultiscaleData(x=x, latent=latent, rotation=rotation, scales=scales_t, dims=dims_t, seed=seed)


def multiscale_regression(
    num_samples: int,
    dims: Sequence[int],
    scales: Sequence[float],
    *,
    noise: float = 0.0,
    rotate: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Linear regression on multiscale inputs: ``y = x @ w* + noise * eps``.

    ``w*`` is standard normal in the coordinates of ``x``, so the least-squares loss
    ``1/(2N) ||X w - y||^2`` has the Hessian ``X^T X / N`` with eigenvalue groups near the **Hessian scales**
    ``e_k**2`` (the squares of the data scales ``scales``).

    Args:
        num_samples, dims, scales, rotate, seed, dtype: as for :func:`multiscale_inputs` (``scales`` are data
            scales).
        noise: standard deviation of the additive Gaussian target noise (>= 0).

    Returns:
        ``(x [N, d], y [N], info)``; ``info`` holds ``"data"`` (the :class:`MultiscaleData`), ``"w_star"``
        (``[d]`` float64), ``"noise"``, ``"scales"`` (data scales) and ``"hessian_scales"`` (their squares).
    """
    noise = float(noise)
    if not (math.isfinite(noise) and noise >= 0.0):
        raise ValueError(f"noise must be a finite standard deviation >= 0, got {noise}")
    data = multiscale_inputs(num_samples, dims, scales, rotate=rotate, seed=seed, dtype=torch.float64)
    # A generator of its own (seeded from the same seed) so that x does not depend on the target model.
    gen = torch.Generator().manual_seed(data.seed + 1)
    w_star = torch.randn(data.dim, generator=gen, dtype=torch.float64)
    y = data.x @ w_star + noise * torch.randn(data.num_samples, generator=gen, dtype=torch.float64)
    data = _recast(data, dtype)
    info = {"data": data, "w_star": w_star, "noise": noise, "scales": data.scales,
            "hessian_scales": data.hessian_scales}
    return data.x, y.to(dtype), info


def multiscale_classification(
    num_samples: int,
    dims: Sequence[int],
    scales: Sequence[float],
    num_classes: int = 10,
    *,
    rotate: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Classification on multiscale inputs, with labels that depend on every scale.

    NOTE: [teacher on the latent coordinates]
    The label of ``x = U (e * z)`` is ``argmax(z @ A + b)`` for a fixed random teacher ``A [d, C]``,
    ``b [C]`` (standard normal) acting on the *unscaled* block coordinates ``z``. Every block then moves the
    logits by the same order of magnitude, so the small-scale directions of x carry as much label information
    as the large ones; a model reading x must grow weights of size ``1/e_k`` along scale k to use it, and its
    gradient along those directions is only ``O(e_k)``: the optimisation is multiscale. (A teacher acting on
    x itself would make the small scales nearly irrelevant to the labels.)

    Args:
        num_samples, dims, scales, rotate, seed, dtype: as for :func:`multiscale_inputs` (``scales`` are data
            scales; the least-squares Hessian scales are their squares).
        num_classes: C >= 2.

    Returns:
        ``(x [N, d], y [N] long in [0, C), info)``; ``info`` holds ``"data"`` (the :class:`MultiscaleData`),
        ``"teacher"`` (``A``, float64), ``"teacher_bias"`` (``b``), ``"num_classes"``, ``"class_counts"``,
        ``"scales"`` and ``"hessian_scales"``.
    """
    num_classes = check_count(num_classes, "num_classes", 2)
    data = multiscale_inputs(num_samples, dims, scales, rotate=rotate, seed=seed, dtype=dtype)
    gen = torch.Generator().manual_seed(data.seed + 1)
    teacher = torch.randn(data.dim, num_classes, generator=gen, dtype=torch.float64)
    bias = torch.randn(num_classes, generator=gen, dtype=torch.float64)
    y = torch.argmax(data.latent @ teacher + bias, dim=1)
    info = {"data": data, "teacher": teacher, "teacher_bias": bias, "num_classes": num_classes,
            "class_counts": torch.bincount(y, minlength=num_classes).tolist(), "scales": data.scales,
            "hessian_scales": data.hessian_scales}
    return data.x, y, info


def _recast(data: MultiscaleData, dtype: torch.dtype) -> MultiscaleData:
    return MultiscaleData(x=data.x.to(_check_dtype(dtype)), latent=data.latent, rotation=data.rotation,
                          scales=data.scales, dims=data.dims, seed=data.seed)


# --------------------------------------------------------------------------------------------------------
# Real data (scikit-learn's bundled sets; nothing is downloaded)


def _sklearn_set(name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn import datasets
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"{name} needs scikit-learn (pip install 'mrgd_ext[cli]')", name="sklearn"
        ) from exc
    return getattr(datasets, name)(return_X_y=True)


def _finish_real(
    name: str, data: np.ndarray, target: np.ndarray, standardize: bool, num_samples: int | None, seed: int | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = _check_dtype(dtype)
    x = torch.as_tensor(np.asarray(data, dtype=np.float64))
    y = torch.as_tensor(np.asarray(target, dtype=np.int64))
    n = x.shape[0]
    if num_samples is not None:
        num_samples = check_count(num_samples, "num_samples", 1)
        if num_samples > n:
            raise ValueError(f"num_samples must be at most {n} (the size of {name}), got {num_samples}")
        if seed is None:
            idx = torch.arange(num_samples)
        else:
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:num_samples]
        x, y = x[idx], y[idx]
    elif seed is not None:
        raise ValueError(f"seed selects a random subset and needs num_samples, got num_samples=None, seed={seed}")
    if standardize:
        # Population statistics (ddof 0) of the returned rows, so the result has exactly unit variance.
        # Constant features (digits' border pixels) have no scale: they are centred and left at zero.
        mean = x.mean(0)
        std = x.std(0, correction=0)
        x = (x - mean) / torch.where(std > 0, std, torch.ones_like(std))
    return x.to(dtype), y


def load_digits(
    *, standardize: bool = False, num_samples: int | None = None, seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's handwritten digits: ``x [1797, 64]`` (raw pixel values 0..16), ``y [1797]`` in 0..9.

    Args:
        standardize: zero mean and unit variance per feature, computed on the returned rows (constant pixels
            stay 0). Off by default: the raw features keep their multiscale structure.
        num_samples: return only N rows: the first N, or a random subset when ``seed`` is given.
        seed: seed of the random subset (needs ``num_samples``).
        dtype: floating dtype of x (y is int64).
    """
    data, target = _sklearn_set("load_digits")
    return _finish_real("load_digits", data, target, standardize, num_samples, seed, dtype)


def load_breast_cancer(
    *, standardize: bool = False, num_samples: int | None = None, seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's breast-cancer data: ``x [569, 30]`` raw features, ``y [569]`` in {0, 1}.

    The raw features range from ~1e-3 (fractal dimension errors) to ~1e3 (areas): the principal values of the
    centred data span almost six orders of magnitude (ratio 8e5). Arguments as for :func:`load_digits`.
    """
    data, target = _sklearn_set("load_breast_cancer")
    return _finish_real("load_breast_cancer", data, target, standardize, num_samples, seed, dtype)


def load_wine(
    *, standardize: bool = False, num_samples: int | None = None, seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's wine data: ``x [178, 13]`` raw features, ``y [178]`` in {0, 1, 2}.

    Arguments as for :func:`load_digits`.
    """
    data, target = _sklearn_set("load_wine")
    return _finish_real("load_wine", data, target, standardize, num_samples, seed, dtype)


# --------------------------------------------------------------------------------------------------------
# Principal values


def load_diabetes_raw() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's diabetes data, raw features plus an intercept column (float64): ``X [442, 11], y [442]``.

    The regression target stays a float (the other loaders here are classification sets). The data ship with
    scikit-learn; nothing is downloaded.
    """
    try:
        from sklearn.datasets import load_diabetes
    except ImportError as exc:
        raise ModuleNotFoundError(
            "the diabetes comparison needs scikit-learn (pip install 'mrgd_ext[cli]')", name="sklearn"
        ) from exc
    data, target = load_diabetes(return_X_y=True, scaled=False)
    X = torch.as_tensor(np.hstack([data, np.ones((data.shape[0], 1))]), dtype=torch.float64)
    return X, torch.as_tensor(target, dtype=torch.float64)


def principal_values(x: torch.Tensor, center: bool = True) -> torch.Tensor:
    """Principal values of a data matrix: singular values of ``x`` (centred by default) over ``sqrt(N)``.

    For multiscale data these are the **data scales** (block k contributes ``d_k`` values near ``e_k``); their
    squares are the eigenvalues of the (centred) second-moment matrix ``X^T X / N``, the least-squares Hessian.

    Args:
        x: ``[N, d]`` data, N >= 1.
        center: subtract the column means first (principal component analysis); ``False`` gives the singular
            values of the raw matrix (the spectrum of the uncentred second moment).

    Returns:
        ``[min(N, d)]`` float64 on the CPU, sorted descending.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor [N, d], got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"x must be a non-empty matrix [N, d], got shape {tuple(x.shape)}")
    x = x.detach().to(device="cpu", dtype=torch.float64)
    if center:
        x = x - x.mean(0)
    return torch.linalg.svdvals(x) / math.sqrt(x.shape[0])
