"""``mrgd-ext spectrum``: top-k Hessian eigenvalues (block Lanczos), the spectral density (SLQ) and the detected
eigenvalue groups, for a built-in model and data set or for a user's Python file."""

from __future__ import annotations

import argparse
import math
import os
import runpy
import time
import traceback
from pathlib import Path
from typing import Any

from mrgd_ext.cli._output import (
    UsageError,
    out_dir,
    progress,
    reporter,
    require,
    show_paths,
    write_json,
)

#: Built-in problems of ``spectrum``: name -> what it is (shown in --help).
BUILTIN_SPECTRA = {
    "digits-mlp": "MLP 64-32-10 (tanh) at its seeded initialisation, cross-entropy on scikit-learn's digits "
                  "(1797 images, raw pixels 0..16); 2410 weights",
    "diabetes": "least squares 0.5*mean((Xw+b-y)^2) on scikit-learn's diabetes data, raw features; 11 weights "
                "(exact Hessian X^T X / N with an intercept: the demo's problem)",
}
#: Largest operator --check-dense builds densely (n Hessian-vector products and an n x n eigensolve).
DENSE_CHECK_LIMIT = 5000


def _builtin_problem(name: str, seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)  # the model's initialisation
    if name == "diabetes":
        from mrgd_ext.experiments.data import load_diabetes_raw

        X, y = load_diabetes_raw()
        model: nn.Module = nn.Linear(10, 1, dtype=torch.float64)  # its bias is the intercept column of the demo

        def loss_fn(out, target):
            return 0.5 * torch.mean((out.squeeze(-1) - target) ** 2)

        return model, loss_fn, (X[:, :-1].contiguous(), y)
    from mrgd_ext.experiments.data import load_digits

    X, y = load_digits(dtype=torch.float64)  # raw pixels 0..16
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    return model, nn.CrossEntropyLoss(), (X, y)


def _user_problem(path_text: str):
    """``model, loss_fn, data`` from a user's Python file, run as a script (its ``__name__`` is not
    ``"__main__"``, so an ``if __name__ == "__main__":`` training block does not run)."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise UsageError(f"--model-file {path_text!r} does not exist")
    try:
        namespace = runpy.run_path(str(path), run_name="mrgd_ext_spectrum_model")
    except Exception as exc:
        # Their code, their bug: one line that says where, rather than our traceback around theirs.
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path.resolve()]
        where = f" at line {frames[-1].lineno}" if frames else ""
        raise UsageError(f"--model-file {path_text}: running it raised {type(exc).__name__}{where}: {exc}") from None
    missing = [name for name in ("model", "loss_fn", "data") if name not in namespace]
    if missing:
        raise UsageError(f"--model-file {path_text} must define model, loss_fn and data "
                         f"(missing: {', '.join(missing)})")
    return namespace["model"], namespace["loss_fn"], namespace["data"]


def _groups_or_none(values, min_gap: float):
    from mrgd_ext.curvature.scales import detect_scales

    try:
        return detect_scales(values, min_gap=min_gap)
    except ValueError:  # no positive eigenvalue: there is no scale to show
        return None


def _spectrum_plot(result: dict[str, Any], path: Path) -> None:
    from mrgd_ext.experiments.figures import new_figure

    fig = new_figure(11.0, 4.2)
    ax_d, ax_k = fig.subplots(1, 2)
    density = result["density"]
    grid, values = density["grid"], density["values"]
    floor = max(max(values) * 1e-10, 1e-300)
    ax_d.plot(grid, [max(v, floor) for v in values], color="tab:blue", linewidth=1)
    ax_d.set_yscale("log")
    for lam in result["eigenvalues"]:
        ax_d.axvline(lam, color="tab:red", linewidth=0.6, alpha=0.6)
    ax_d.set_xlabel("eigenvalue")
    ax_d.set_ylabel("density (SLQ, Gaussian-smoothed)")
    ax_d.set_title(f"spectral density; red: top-{len(result['eigenvalues'])} Lanczos eigenvalues", fontsize=9)
    positive = [v for v in result["eigenvalues"] if v > 0]
    if positive:
        ax_k.semilogy(range(1, len(positive) + 1), positive, "o", color="tab:red", markersize=4)
    for a, b in result["groups_top_k"] or []:
        ax_k.axhspan(a, b, color="tab:orange", alpha=0.25)
    ax_k.set_xlabel("index (descending)")
    ax_k.set_ylabel("eigenvalue (positive ones)")
    ax_k.set_title(f"top-k eigenvalues; shaded: groups (gaps >= {result['min_gap']:g}x)", fontsize=9)
    for ax in (ax_d, ax_k):
        ax.grid(alpha=0.3)
    fig.suptitle(f"Hessian spectrum: {result['problem_name']} ({result['n']} parameters, "
                 f"{result['num_samples']} samples)", fontsize=9)
    fig.savefig(os.fspath(path), dpi=110)


def run_spectrum(args: argparse.Namespace) -> int:
    for option, value, least in (("-k", args.k, 1), ("--block-size", args.block_size, 1), ("--probes", args.probes, 1),
                                 ("--order", args.order, 2)):
        if value < least:
            raise UsageError(f"{option} must be >= {least}, got {value}")
    if not (math.isfinite(args.min_gap) and args.min_gap > 1):
        raise UsageError(f"--min-gap must be a ratio > 1 (10 = one decade), got {args.min_gap:g}")
    if not 0 < args.lanczos_tol < 1:
        raise UsageError(f"--lanczos-tol must be in (0, 1), got {args.lanczos_tol:g}")
    out = None if args.no_plot else out_dir(args.out) / "mrgd_spectrum.png"
    if out is not None:
        require("matplotlib", "matplotlib", "the spectrum plot", "plot", "pass --no-plot")
    if args.model_file is None:
        require("sklearn", "scikit-learn", f"the built-in problem {args.problem!r}")

    import torch

    from mrgd_ext.curvature.density import spectral_density
    from mrgd_ext.curvature.hessian import HessianOperator
    from mrgd_ext.curvature.lanczos import lanczos

    say = reporter(args.quiet)
    if args.model_file is not None:
        model, loss_fn, data = _user_problem(args.model_file)
        name = Path(args.model_file).name
        label = f"{args.model_file} (model, loss_fn, data)"
    else:
        model, loss_fn, data = _builtin_problem(args.problem, args.seed)
        name, label = args.problem, f"{args.problem}: {BUILTIN_SPECTRA[args.problem]}"
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA device is available")
        model.to(device)
        op = HessianOperator(model, loss_fn, data)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UsageError(f"cannot build the Hessian operator: {exc}") from None
    if args.check_dense and op.n > DENSE_CHECK_LIMIT:
        raise UsageError(f"--check-dense builds the {op.n} x {op.n} Hessian; allowed up to n = {DENSE_CHECK_LIMIT}")
    k, block = min(args.k, op.n), min(args.block_size, op.n)
    order = min(args.order, op.n)
    say(f"Hessian of {label}")
    say(f"  {op.n} parameters, {op.num_samples} samples, {op.dtype}, {op.device}")

    start = time.perf_counter()
    bar = progress(None, "Lanczos HVPs", args.quiet)
    op.on_products = bar.update  # the operator reports every block product to the bar
    try:
        res = lanczos(op, k, block_size=block, tol=args.lanczos_tol, seed=args.seed)
    finally:
        bar.close()
    bar = progress(args.probes * order, "SLQ HVPs", args.quiet)
    op.on_products = bar.update
    try:
        dens = spectral_density(op, num_probes=args.probes, order=order, seed=args.seed)
    finally:
        bar.close()
        op.on_products = None
    eigenvalues = res.eigenvalues.tolist()
    groups_top = _groups_or_none(res.eigenvalues, args.min_gap)
    groups_density = _groups_or_none(dens, args.min_gap)
    result: dict[str, Any] = {
        "problem": label, "problem_name": name, "n": op.n, "num_samples": op.num_samples, "k": k, "block_size": block,
        "eigenvalues": eigenvalues, "residuals": res.residuals.tolist(), "converged": res.converged.tolist(),
        "lanczos_hvps": res.num_hvps, "lanczos_seconds": res.total_time, "min_gap": args.min_gap,
        "groups_top_k": [[g.a, g.b] for g in groups_top] if groups_top else None,
        "groups_density": [[g.a, g.b] for g in groups_density] if groups_density else None,
        "density": {"grid": dens.grid.tolist(), "values": dens.density.tolist(), "sigma": dens.sigma,
                    "probes": args.probes, "order": order, "hvps": dens.num_hvps},
    }

    print(f"Top {k} eigenvalues (block Lanczos, block {block}, tol {args.lanczos_tol:g}; {res.num_hvps} "
          f"Hessian-vector products, {res.total_time:.2f} s):")
    print(f"  {'#':>3}  {'eigenvalue':>13}  {'residual':>9}  converged")
    for i, (lam, r, c) in enumerate(zip(eigenvalues, result["residuals"], result["converged"])):
        print(f"  {i:>3}  {lam:>13.6g}  {r:>9.2e}  {'yes' if c else 'NO'}")

    def fmt(groups) -> str:
        return ", ".join(f"[{a:.4g}, {b:.4g}]" for a, b in groups) if groups else "none (no positive eigenvalue)"

    print(f"Groups from the top-{k} eigenvalues (gaps >= {args.min_gap:g}x): {fmt(result['groups_top_k'])}")
    print(f"Groups from the density (whole spectrum, {args.probes} probes x {order} Lanczos steps): "
          f"{fmt(result['groups_density'])}")
    if args.check_dense:
        exact = torch.linalg.eigvalsh(op.to_dense().double().cpu()).flip(0)[:k]
        diff = float(((res.eigenvalues - exact).abs() / exact.abs().max()).max())
        result["dense_check"] = {"eigenvalues": exact.tolist(), "max_diff_relative_to_lambda_max": diff}
        print(f"Dense check (n Hessian-vector products + eigvalsh): max |Lanczos - exact| / |lambda_max| = {diff:.2e}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        _spectrum_plot(result, out)
        say(f"wrote {show_paths([out])}")
    if args.json is not None:
        path = write_json(args.json, result)
        say(f"wrote {show_paths([path])}")
    say(f"({time.perf_counter() - start:.1f} s)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``spectrum`` command to the top-level parser's subcommands."""
    spectrum = sub.add_parser(
        "spectrum", help="top-k Hessian eigenvalues, spectral density and eigenvalue groups (table + PNG)",
        description="Hessian spectrum of a model's loss at its current parameters: the top-k eigenvalues by "
                    "block Lanczos (with residuals), the spectral density by stochastic Lanczos quadrature, "
                    "and the eigenvalue groups (gaps in the log-spectrum) that `mrgd-ext plan` and "
                    "mrgd_ext.plan_multirate take. Built-in problems: "
                    + "; ".join(f"{k}: {v}" for k, v in BUILTIN_SPECTRA.items())
                    + ". Or --model-file FILE.py defining model (nn.Module), loss_fn(outputs, targets) and data "
                      "((inputs, targets) or a list of such batches).",
    )
    spectrum.add_argument("--problem", default="digits-mlp", choices=list(BUILTIN_SPECTRA),
                          help="built-in model and data set (default digits-mlp)")
    spectrum.add_argument("--model-file", metavar="FILE.py", default=None,
                          help="a Python file defining model, loss_fn and data (instead of --problem)")
    spectrum.add_argument("-k", type=int, default=10, help="eigenvalues to compute (default 10)")
    spectrum.add_argument("--block-size", type=int, default=4, help="Lanczos block size (default 4)")
    spectrum.add_argument("--lanczos-tol", type=float, default=1e-6,
                          help="residual tolerance relative to |lambda_max| (default 1e-6)")
    spectrum.add_argument("--probes", type=int, default=5, help="SLQ probes (default 5)")
    spectrum.add_argument("--order", type=int, default=60, help="Lanczos steps per SLQ probe (default 60)")
    spectrum.add_argument("--min-gap", type=float, default=10.0,
                          help="a new group starts at a gap of at least this factor (default 10)")
    spectrum.add_argument("--seed", type=int, default=0, help="seed of the model init, Lanczos start and probes")
    spectrum.add_argument("--device", default="cpu", help="device for the model and the Hessian (default cpu)")
    spectrum.add_argument("--check-dense", action="store_true",
                          help=f"also compare with the dense Hessian's eigenvalues (n <= {DENSE_CHECK_LIMIT})")
    spectrum.add_argument("--out", metavar="DIR", default=".",
                          help="folder for the density and eigenvalue plot, mrgd_spectrum.png (default: the current "
                               "folder)")
    spectrum.add_argument("--no-plot", action="store_true", help="do not write the plot (no matplotlib needed)")
    spectrum.add_argument("--json", metavar="PATH", default=None, help="also write all numbers as JSON to PATH")
    spectrum.add_argument("--quiet", action="store_true", help="print only the tables; no progress bars")
    spectrum.set_defaults(func=run_spectrum)
