"""The ``mrgd-ext`` command line (also ``python -m mrgd_ext``).

Subcommands:
  demo       the Figure 3 table on random multiscale least squares, then MrGD against SGD and heavy ball on a
             real data set (scikit-learn's diabetes data, raw features): a comparison table and a PNG of the
             loss against iterations.
  plan       plan a multirate cycle for eigenvalue groups given on the command line; a table or JSON.
  info       what this build of mrgd_ext contains.
  spectrum   top-k Hessian eigenvalues (block Lanczos), the spectral density (SLQ) and the detected
             eigenvalue groups, for a built-in model and data set or for a user's Python file.
  reproduce  the paper reproductions that this package carries: fig3 (JSON, markdown and a PNG); fig1, fig2,
             fig4 (gradient rows and row-Hessian spectra of an MLP at training stages; JSON and a PNG);
             blog (the whole story on one multiscale problem: data, measured Hessian groups, plan, and
             AutoMrGD against GD and heavy ball; markdown, JSON and a PNG).
  bench      the benchmark suite of a source checkout (benchmarks/run_all.py), or a quick subset.

User mistakes (and a missing optional dependency) print one line on stderr and exit with status 2; no
traceback. Progress bars (tqdm, on stderr) show on anything that runs for more than a second, unless
``--quiet``. tqdm, matplotlib and scikit-learn are optional (``pip install 'mrgd_ext[cli]'``) and imported
only by the commands that use them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import runpy
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

#: File types the plots can be written as (matplotlib picks the format from the suffix).
PLOT_SUFFIXES = (".png", ".svg", ".pdf")
#: Where a source checkout keeps the benchmark suite, relative to the repository root.
_SUITE_ENTRY = Path("benchmarks") / "run_all.py"


class UsageError(Exception):
    """A mistake in the command line or a missing optional dependency: one line on stderr, exit status 2."""


# --------------------------------------------------------------------------------------------------------
# Optional dependencies and progress bars


def _require(module: str, package: str, purpose: str, extra: str = "cli", alternative: str = "") -> None:
    """Fail early, before any long computation, when an optional dependency is missing.

    find_spec does not import the module (matplotlib's import alone takes a noticeable fraction of a second).
    """
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked package counts as missing
        found = False
    if not found:
        hint = f" or {alternative}" if alternative else ""
        raise UsageError(f"{purpose} needs {package}, which is not installed: pip install 'mrgd_ext[{extra}]'{hint}")


class _NoBar:
    """Stands in for a tqdm bar when bars are off: same calls, no output."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int | None, desc: str, quiet: bool):
    """A tqdm bar on stderr, or a silent stand-in with --quiet.

    Without tqdm the command still runs: progress bars are a convenience, so a missing tqdm costs one notice
    line (once per command) instead of the result.
    """
    if quiet:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        if not getattr(_progress, "warned", False):
            print("mrgd-ext: progress bars are off: tqdm is not installed (pip install 'mrgd_ext[cli]')",
                  file=sys.stderr)
            _progress.warned = True  # type: ignore[attr-defined]
        return _NoBar()
    unit = "hvp" if "HVP" in desc else "run"
    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)


def _ticker(bar) -> Any:
    def tick(label: str) -> None:
        bar.set_postfix_str(label, refresh=False)
        bar.update(1)

    return tick


def _plot_path(text: str, option: str) -> Path:
    path = Path(text).expanduser()
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise UsageError(f"{option} {text!r} must end in one of {', '.join(PLOT_SUFFIXES)} (the plot's file type)")
    if path.is_dir():
        raise UsageError(f"{option} {text!r} is a directory; give a file name such as mrgd_demo.png")
    return path


def _out_dir(text: str, option: str = "--out") -> Path:
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {text!r} exists and is not a directory")
    return path


def _check_tol(tol: float) -> None:
    if not 0.0 < tol < 1.0:
        raise UsageError(f"--tol must be in (0, 1), got {tol:g}")


def _check_seeds(seeds: int) -> list[int]:
    if seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {seeds}")
    return list(range(seeds))


# --------------------------------------------------------------------------------------------------------
# plan, info


def _parse_groups(text: str):
    from mrgd_ext.planning.plan import ScaleGroup

    groups = []
    for i, item in enumerate(t for t in text.split(",") if t.strip()):
        parts = item.split(":")
        if len(parts) != 2:
            raise UsageError(f"--groups item {i} ({item.strip()!r}) must be 'a:b' (an eigenvalue interval)")
        try:
            a, b = float(parts[0]), float(parts[1])
        except ValueError:
            raise UsageError(f"--groups item {i} ({item.strip()!r}) is not two numbers 'a:b'") from None
        try:
            groups.append(ScaleGroup(a, b))
        except ValueError as exc:
            raise UsageError(f"--groups item {i}: {exc}") from None
    if not groups:
        raise UsageError("--groups is empty; give intervals like '1:2,1e-3:2e-3'")
    return groups


def _cmd_plan(args: argparse.Namespace) -> int:
    from mrgd_ext.planning.plan import plan_multirate

    groups = _parse_groups(args.groups)
    try:
        plan = plan_multirate(groups, tol=args.tol, strategy=args.strategy, rate_rule=args.rate_rule,
                              merge=not args.no_merge)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(plan)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import mrgd_ext

    info = mrgd_ext.build_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:20s} {value}")
    return 0


# --------------------------------------------------------------------------------------------------------
# demo


def _cmd_demo(args: argparse.Namespace) -> int:
    seeds = _check_seeds(args.seeds)
    _check_tol(args.tol)
    if args.iterations < 1:
        raise UsageError(f"--iterations must be >= 1, got {args.iterations}")
    out = None if args.no_plot else _plot_path(args.out, "--out")
    if out is not None:
        _require("matplotlib", "matplotlib", "the demo's plot", "plot", "pass --no-plot")
    _require("sklearn", "scikit-learn", "the demo's real data set (load_diabetes)")

    import torch

    import mrgd_ext
    from mrgd_ext.experiments.problems import random_multiscale_quadratic
    from mrgd_ext.experiments.reproduce import (
        DIABETES_RUNS,
        diabetes_least_squares,
        diabetes_plot,
        diabetes_text_table,
        figure3,
        figure3_text_table,
    )
    from mrgd_ext.planning.plan import plan_multirate

    # Thousands of products of 100x100 (Figure 3) and 442x11 (diabetes) matrices: one thread is fastest for
    # sizes this small and keeps the timings independent of other load on the machine.
    torch.set_num_threads(1)
    say = (lambda *a: None) if args.quiet else print
    start = time.perf_counter()
    say(f"mrgd_ext {mrgd_ext.__version__} (torch {torch.__version__}); build: {mrgd_ext.build_info()}")
    say()
    say("== 1. Built-in multiscale problem: Figure 3 of He, Liu, Tsai (arXiv:2402.03021) ==")
    problem = random_multiscale_quadratic(dim=100, num_scales=2, ratio=1e-3, seed=0)
    say("Random 100-dim linear regression, two scales (r = 1e-3); exact eigenvalue groups of the Hessian:")
    say("  " + ", ".join(f"[{g.a:.3g}, {g.b:.3g}]" for g in problem.groups))
    say()
    say(plan_multirate(problem.groups, tol=args.tol))
    say()
    say(f"Iterations to relative error {args.tol:g}, median over {len(seeds)} random problem(s):")
    problems = ["two_scales", "three_scales"]
    bar = _progress(len(problems) * len(seeds), "Figure 3", args.quiet)
    try:
        fig3 = figure3(seeds, args.tol, problems=problems, progress=_ticker(bar))
    finally:
        bar.close()
    print(figure3_text_table(fig3))
    for check in fig3["checks"]:
        say(f"{'PASS' if check['passed'] else 'FAIL'}: {check['name']}")
    say("(full tables: mrgd-ext reproduce fig3)")
    say()

    say("== 2. Real data: least squares on scikit-learn's diabetes data, raw features ==")
    bar = _progress(DIABETES_RUNS, "diabetes", args.quiet)
    try:
        real = diabetes_least_squares(args.iterations, args.tol, progress=_ticker(bar))
    finally:
        bar.close()
    meta = real["meta"]
    say(f"{meta['n_samples']} samples, {meta['n_parameters']} weights (10 raw features + intercept). Exact "
        f"Hessian X^T X / N: condition {real['condition']:.3g}, eigenvalues")
    say("  " + " ".join(f"{v:.3g}" for v in real["spectrum"]))
    say("Groups from gaps of >= 10x in the log-spectrum (mrgd_ext.curvature.scales.detect_scales):")
    say("  " + ", ".join(f"[{a:.4g}, {b:.4g}]" for a, b in real["groups"]))
    say()
    say(real["plan_text"])
    say()
    say(f"{args.iterations} full-batch steps from w = 0 (float64, autograd), each method a torch optimizer:")
    print(diabetes_text_table(real))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        diabetes_plot(real, out)
        say(f"wrote {out}")
    if args.json is not None:
        path = Path(args.json).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"figure3": fig3, "diabetes": real}, default=str) + "\n")
        say(f"wrote {path}")
    say(f"({time.perf_counter() - start:.1f} s)")
    return 0


# --------------------------------------------------------------------------------------------------------
# spectrum

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
        from mrgd_ext.experiments.reproduce import load_diabetes_raw

        X, y = load_diabetes_raw()
        model = nn.Linear(10, 1, dtype=torch.float64)  # its bias is the intercept column of the demo

        def loss_fn(out, target):
            return 0.5 * torch.mean((out.squeeze(-1) - target) ** 2)

        return model, loss_fn, (X[:, :-1].contiguous(), y)
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    return model, nn.CrossEntropyLoss(), (torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(y))


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
    from mrgd_ext.experiments.reproduce import _figure

    fig = _figure(11.0, 4.2)
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


def _cmd_spectrum(args: argparse.Namespace) -> int:
    for option, value, least in (("-k", args.k, 1), ("--block-size", args.block_size, 1), ("--probes", args.probes, 1),
                                 ("--order", args.order, 2)):
        if value < least:
            raise UsageError(f"{option} must be >= {least}, got {value}")
    if not (math.isfinite(args.min_gap) and args.min_gap > 1):
        raise UsageError(f"--min-gap must be a ratio > 1 (10 = one decade), got {args.min_gap:g}")
    if not 0 < args.lanczos_tol < 1:
        raise UsageError(f"--lanczos-tol must be in (0, 1), got {args.lanczos_tol:g}")
    out = None if args.no_plot else _plot_path(args.out, "--out")
    if out is not None:
        _require("matplotlib", "matplotlib", "the spectrum plot", "plot", "pass --no-plot")
    if args.model_file is None:
        _require("sklearn", "scikit-learn", f"the built-in problem {args.problem!r}")

    import torch

    from mrgd_ext.curvature.density import spectral_density
    from mrgd_ext.curvature.hessian import HessianOperator
    from mrgd_ext.curvature.lanczos import lanczos

    say = (lambda *a: None) if args.quiet else print
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
    bar = _progress(None, "Lanczos HVPs", args.quiet)
    op.on_products = bar.update  # the operator reports every block product to the bar
    try:
        res = lanczos(op, k, block_size=block, tol=args.lanczos_tol, seed=args.seed)
    finally:
        bar.close()
    bar = _progress(args.probes * order, "SLQ HVPs", args.quiet)
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
        say(f"wrote {out}")
    if args.json is not None:
        path = Path(args.json).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result) + "\n")
        say(f"wrote {path}")
    say(f"({time.perf_counter() - start:.1f} s)")
    return 0


# --------------------------------------------------------------------------------------------------------
# reproduce


def _cmd_reproduce_fig3(args: argparse.Namespace) -> int:
    from mrgd_ext.experiments.reproduce import PROBLEMS

    seeds = _check_seeds(args.seeds)
    _check_tol(args.tol)
    known = [spec["key"] for spec in PROBLEMS]
    problems = [p.strip() for p in args.problems.split(",") if p.strip()] if args.problems else known
    unknown = [p for p in problems if p not in known]
    if unknown or not problems:
        raise UsageError(f"--problems {args.problems!r}: choose from {', '.join(known)}")
    out = _out_dir(args.out)
    if not args.no_plot:
        _require("matplotlib", "matplotlib", "the Figure 3 plot", "plot", "pass --no-plot")

    import torch

    from mrgd_ext.experiments.reproduce import figure3, figure3_markdown, figure3_plot, figure3_text_table

    torch.set_num_threads(1)  # see _cmd_demo
    say = (lambda *a: None) if args.quiet else print
    start = time.perf_counter()
    bar = _progress(len(problems) * len(seeds), "Figure 3", args.quiet)
    try:
        results = figure3(seeds, args.tol, problems=problems, progress=_ticker(bar))
    finally:
        bar.close()
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "fig3.json", out / "fig3.md"]
    written[0].write_text(json.dumps(results, indent=1) + "\n")
    written[1].write_text(figure3_markdown(results))
    if not args.no_plot:
        written.append(out / "fig3.png")
        figure3_plot(results, written[-1])
    print(figure3_text_table(results))
    failed = [c for c in results["checks"] if not c["passed"]]
    for check in results["checks"]:
        say(f"{'PASS' if check['passed'] else 'FAIL'}: {check['name']}")
    say(f"wrote {', '.join(str(p) for p in written)} ({time.perf_counter() - start:.1f} s)")
    if failed:
        print(f"mrgd-ext reproduce fig3: {len(failed)} check(s) failed (see {written[1]})", file=sys.stderr)
        return 1
    return 0


#: Row-diagnostics reproductions: figure -> (function name, plot name, default milestones, title).
ROW_FIGURES = {
    "fig1": ("figure1", "figure1_plot", "0.3,0.5", "Figure 1"),
    "fig2": ("figure2", "figure2_plot", "0.3,0.5", "Figure 2"),
    "fig4": ("figure4", "figure4_plot", "0.2,0.5,0.8", "Figure 4"),
}


def _parse_floats(text: str, option: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"{option} {text!r} must be comma-separated numbers") from None
    if not values:
        raise UsageError(f"{option} is empty")
    return values


def _parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"{option} {text!r} must be comma-separated integers") from None
    if not values or min(values) < 1:
        raise UsageError(f"{option} {text!r} must be one or more integers >= 1")
    return values


def _cmd_reproduce_rows(args: argparse.Namespace) -> int:
    """fig1, fig2, fig4: gradient rows and row-Hessian spectra of an MLP at training stages."""
    func_name, plot_name, _, title = ROW_FIGURES[args.figure]
    hidden = _parse_ints(args.hidden, "--hidden")
    if args.figure != "fig1" and len(hidden) < 2:
        raise UsageError(f"--hidden {args.hidden!r}: {args.figure} looks at the second hidden layer, give two widths "
                         "or more")
    milestones = _parse_floats(args.milestones or ROW_FIGURES[args.figure][2], "--milestones")
    if any(not 0 < m <= 1 for m in milestones) or milestones != sorted(milestones):
        raise UsageError(f"--milestones {args.milestones!r} must be ascending test accuracies in (0, 1]")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be > 0, got {args.lr:g}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.samples is not None and args.samples < 8:
        raise UsageError(f"--samples must be >= 8 (a train and a test part), got {args.samples}")
    out = _out_dir(args.out)
    if not args.no_plot:
        _require("matplotlib", "matplotlib", f"the {title} plot", "plot", "pass --no-plot")
    if args.dataset == "digits":
        _require("sklearn", "scikit-learn", f"{title} on the digits data (load_digits)")

    import torch

    from mrgd_ext.experiments import diagnostics

    # One thread: a few seconds with the defaults either way, and timings independent of other load (two
    # OpenMP threads competing with another process on two cores can be many times slower than one).
    torch.set_num_threads(1)
    kwargs: dict[str, Any] = {"dataset": args.dataset, "hidden": tuple(hidden), "milestones": tuple(milestones),
                              "lr": args.lr, "max_steps": args.max_steps, "num_samples": args.samples,
                              "seed": args.seed}
    if args.figure == "fig1":
        kwargs["center"] = not args.uncentered
    say = (lambda *a: None) if args.quiet else print
    start = time.perf_counter()
    bar = _progress(2 * len(milestones), title, args.quiet)
    try:
        results = getattr(diagnostics, func_name)(progress=_ticker(bar), **kwargs)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    finally:
        bar.close()
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{args.figure}.json"]
    written[0].write_text(json.dumps(results) + "\n")
    if not args.no_plot:
        written.append(out / f"{args.figure}.png")
        getattr(diagnostics, plot_name)(results, written[-1])
    print(diagnostics.figure_text_summary(results))
    say(f"wrote {', '.join(str(p) for p in written)} ({time.perf_counter() - start:.1f} s)")
    return 0


def _cmd_reproduce_blog(args: argparse.Namespace) -> int:
    """The walkthrough of mrgd_ext.experiments.walkthrough: data -> Hessian groups -> plan -> training."""
    dims = tuple(_parse_ints(args.dims, "--dims"))
    scales = tuple(_parse_floats(args.scales, "--scales"))
    if len(dims) != len(scales):
        raise UsageError(f"--dims has {len(dims)} blocks but --scales has {len(scales)} scales")
    if any(d < 1 for d in dims):
        raise UsageError(f"--dims {args.dims!r}: every block needs at least one dimension")
    if any(not (math.isfinite(e) and e > 0) for e in scales) or list(scales) != sorted(scales, reverse=True):
        raise UsageError(f"--scales {args.scales!r} must be positive and descending (data scales, e.g. 1,0.1,0.01)")
    if args.samples < 2 * sum(dims):
        raise UsageError(f"--samples must be at least twice the dimension ({2 * sum(dims)}), got {args.samples}")
    if args.max_iter < 1:
        raise UsageError(f"--max-iter must be >= 1, got {args.max_iter}")
    _check_tol(args.tol)
    out = _out_dir(args.out)
    if not args.no_plot:
        _require("matplotlib", "matplotlib", "the walkthrough plot", "plot", "pass --no-plot")

    import torch

    from mrgd_ext.experiments.walkthrough import blog, blog_markdown, blog_plot

    torch.set_num_threads(1)  # see _cmd_reproduce_rows
    say = (lambda *a: None) if args.quiet else print
    start = time.perf_counter()
    bar = _progress(7, "walkthrough", args.quiet)
    try:
        results = blog(num_samples=args.samples, dims=dims, scales=scales, tol=args.tol, max_iter=args.max_iter,
                       seed=args.seed, progress=_ticker(bar))
    finally:
        bar.close()
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "blog.json", out / "blog.md"]
    written[0].write_text(json.dumps(results, indent=1) + "\n")
    markdown = blog_markdown(results)
    written[1].write_text(markdown)
    if not args.no_plot:
        written.append(out / "blog.png")
        blog_plot(results, written[-1])
    print(markdown)
    say(f"wrote {', '.join(str(p) for p in written)} ({time.perf_counter() - start:.1f} s)")
    return 0


# --------------------------------------------------------------------------------------------------------
# bench


def _suite_entry(explicit: str | None) -> Path:
    """benchmarks/run_all.py of --benchmarks DIR, else of the checkout this package was imported from, else of
    the current directory.

    The suite is not part of the wheel (benchmarks are the repository's scripts and write next to them):
    an editable install finds it through the package's location, a regular install when run from the root
    of a checkout.
    """
    if explicit is not None:
        entry = Path(explicit).expanduser() / "run_all.py"
        if not entry.is_file():
            raise UsageError(f"--benchmarks {explicit!r} has no run_all.py")
        return entry
    import mrgd_ext

    package = Path(mrgd_ext.__file__).resolve().parent
    for root in (package.parent.parent, Path.cwd()):  # <repo>/python/mrgd_ext/__init__.py; or the cwd
        if (root / _SUITE_ENTRY).is_file():
            return root / _SUITE_ENTRY
    raise UsageError(
        f"no benchmark suite ({_SUITE_ENTRY}) beside this mrgd_ext ({package}) or in the current directory: "
        "run from the root of a source checkout or pass --benchmarks DIR"
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    out = _out_dir(args.out) if args.out is not None else None
    entry = _suite_entry(args.benchmarks)
    cmd = [sys.executable, str(entry), "--device", args.device]
    if args.quick:
        cmd.append("--quick")
    if out is not None:
        cmd += ["--out", str(out.resolve())]
    if args.only:
        cmd += ["--only", args.only]
    if args.timeout is not None:
        cmd += ["--timeout", str(args.timeout)]
    if args.list:
        cmd.append("--list")
    if args.quiet:
        cmd.append("--quiet")
    if args.verbose:
        cmd.append("--verbose")
    # The suite reports its own mistakes (unknown --only names: one line, status 2) and results; its exit
    # status is this command's.
    return subprocess.call(cmd, cwd=entry.parent.parent, env=dict(os.environ))


# --------------------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mrgd-ext",
        description="Multirate gradient descent (MrGD) for multiscale problems: demo, planner, reproductions, "
                    "benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo", help="Figure 3 table, then MrGD vs SGD and heavy ball on real data (table + PNG)",
        description="Figure 3 reproduction on random multiscale least squares (with the plan MrGD follows), "
                    "then least squares on scikit-learn's diabetes data (raw features) trained with "
                    "mrgd_ext.MrGD, torch.optim.SGD at its best constant rate and heavy ball: a comparison "
                    "table and a plot of the loss against iterations. About half a minute on 2 CPU cores.",
    )
    demo.add_argument("--seeds", type=int, default=3, help="random problems per Figure 3 row (default 3)")
    demo.add_argument("--tol", type=float, default=1e-6, help="relative error to reach (default 1e-6)")
    demo.add_argument("--iterations", type=int, default=3000,
                      help="full-batch steps per method on the real data (default 3000)")
    demo.add_argument("--out", default="mrgd_demo.png",
                      help="plot of loss vs iterations (.png, .svg or .pdf; default ./mrgd_demo.png)")
    demo.add_argument("--no-plot", action="store_true", help="do not write the plot (no matplotlib needed)")
    demo.add_argument("--json", metavar="PATH", default=None, help="also write all numbers as JSON to PATH")
    demo.add_argument("--quiet", action="store_true", help="print only the tables; no progress bars")
    demo.set_defaults(func=_cmd_demo)

    plan = sub.add_parser("plan", help="plan a multirate cycle for eigenvalue groups",
                          description="Plan a multirate cycle of learning rates for Hessian eigenvalue groups.")
    plan.add_argument("--groups", required=True,
                      help="eigenvalue intervals a:b (Hessian scale), largest first, e.g. '1:2,1e-3:2e-3'")
    plan.add_argument("--strategy", default="auto", choices=["auto", "nested", "chebyshev-nested", "chebyshev"])
    plan.add_argument("--rate-rule", default="optimal", choices=["optimal", "safe"])
    plan.add_argument("--tol", type=float, default=1e-6, help="relative error the plan is optimised for")
    plan.add_argument("--no-merge", action="store_true", help="never merge adjacent groups")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(func=_cmd_plan)

    info = sub.add_parser("info", help="what this build contains (versions, CUDA, CPU ISA)",
                          description="What this build of mrgd_ext contains (versions, CUDA archs, CPU ISA).")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_cmd_info)

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
    spectrum.add_argument("--out", default="mrgd_spectrum.png",
                          help="density and eigenvalue plot (.png, .svg or .pdf; default ./mrgd_spectrum.png)")
    spectrum.add_argument("--no-plot", action="store_true", help="do not write the plot (no matplotlib needed)")
    spectrum.add_argument("--json", metavar="PATH", default=None, help="also write all numbers as JSON to PATH")
    spectrum.add_argument("--quiet", action="store_true", help="print only the tables; no progress bars")
    spectrum.set_defaults(func=_cmd_spectrum)

    reproduce = sub.add_parser("reproduce", help="paper reproductions with plots (fig1, fig2, fig3, fig4, blog)",
                               description="Reproductions of the paper's experiments, written to a folder.")
    rsub = reproduce.add_subparsers(dest="figure", metavar="FIGURE")
    rsub.required = True
    fig3 = rsub.add_parser(
        "fig3", help="iterations to 1e-6 on random multiscale least squares (JSON, markdown, PNG)",
        description="Figure 3: iterations to relative error tol for GD, heavy ball, Nesterov, CG and MrGD on "
                    "random 100-dim multiscale least squares. Writes fig3.json, fig3.md and fig3.png to "
                    "--out; exit status 1 if one of the reproduction's checks fails.",
    )
    fig3.add_argument("--seeds", type=int, default=5, help="random problems per row (default 5)")
    fig3.add_argument("--tol", type=float, default=1e-6, help="relative error to reach (default 1e-6)")
    fig3.add_argument("--problems", default=None,
                      help="comma-separated subset of two_scales, three_scales, three_scales_data (default all)")
    fig3.add_argument("--out", default="mrgd_reproduce", help="output folder (default ./mrgd_reproduce)")
    fig3.add_argument("--no-plot", action="store_true", help="do not write fig3.png (no matplotlib needed)")
    fig3.add_argument("--quiet", action="store_true", help="print only the table; no progress bars")
    fig3.set_defaults(func=_cmd_reproduce_fig3)
    descriptions = {
        "fig1": ("magnitudes of the loss gradient w.r.t. first-layer weight rows vs the data's principal values",
                 ("Figure 1: the gradient of the mean cross-entropy with respect to rows W1[0, :] and W1[i, :] of an "
                  "MLP's first layer, raw and sorted, against the principal values of the data (scaled), at two "
                  "training stages; summary: rank and log correlation of the gradient's components in the data's "
                  "principal basis with the principal values.")),
        "fig2": ("eigenvalues of the Hessian w.r.t. one weight row of layers 1 and 2 vs the input spectrum",
                 ("Figure 2: eigenvalues (sorted by magnitude, natural log) of the Hessian of the loss with respect "
                  "to single rows of W1 and W2 at two training stages, against the spectrum of each layer's "
                  "input.")),
        "fig4": ("eigenvalues of the second hidden layer's row Hessians at three training stages",
                 ("Figure 4: eigenvalues of the Hessian with respect to rows of W2 (second hidden layer) at three "
                  "training stages (test accuracy 20%, 50%, 80%), against the spectrum of the layer's input.")),
    }
    for name, (short, long) in descriptions.items():
        fig = rsub.add_parser(
            name, help=f"{short} (JSON, PNG)",
            description=f"{long} The MLP (in-1024-128-10, ReLU) is trained full-batch with lr 0.1 on the mean "
                        f"cross-entropy; stages are the first steps the test accuracy reaches each milestone. "
                        f"Writes {name}.json and {name}.png to --out. Seconds on 2 CPU cores with the defaults.",
        )
        fig.add_argument("--dataset", default="digits", choices=["digits", "multiscale"],
                         help="scikit-learn digits (default) or a generated multiscale classification set")
        fig.add_argument("--hidden", default="1024,128", help="hidden widths, comma-separated (default 1024,128)")
        fig.add_argument("--milestones", default=None,
                         help=f"test accuracies that define the stages (default {ROW_FIGURES[name][2]})")
        fig.add_argument("--lr", type=float, default=0.1, help="learning rate of full-batch GD (default 0.1)")
        fig.add_argument("--max-steps", type=int, default=None,
                         help="training budget (default 3000 on digits, 500 on multiscale)")
        fig.add_argument("--samples", type=int, default=None,
                         help="use a seeded subset of this many samples (train + test; default all)")
        fig.add_argument("--seed", type=int, default=0, help="seed of the model, the split and the rows (default 0)")
        if name == "fig1":
            fig.add_argument("--uncentered", action="store_true",
                             help="principal basis of the raw data instead of the centred data")
        fig.add_argument("--out", default="mrgd_reproduce", help="output folder (default ./mrgd_reproduce)")
        fig.add_argument("--no-plot", action="store_true", help=f"do not write {name}.png (no matplotlib needed)")
        fig.add_argument("--quiet", action="store_true", help="print only the summary; no progress bars")
        fig.set_defaults(func=_cmd_reproduce_rows)
    walk = rsub.add_parser(
        "blog", help="the whole story on one multiscale problem (markdown, JSON, PNG)",
        description="Least squares on generated multiscale data: the data's principal values, the Hessian's "
                    "groups measured from Hessian-vector products against the exact ones, the multirate plan, "
                    "and iterations and wall time to a relative loss gap of --tol for GD, heavy ball and "
                    "AutoMrGD (temporal and subspace). Writes blog.md, blog.json and blog.png to --out; about "
                    "15 s on 2 CPU cores with the defaults.",
    )
    walk.add_argument("--samples", type=int, default=4000, help="samples (default 4000)")
    walk.add_argument("--dims", default="8,16,40", help="block dimensions, comma-separated (default 8,16,40)")
    walk.add_argument("--scales", default="1,0.1,0.01", help="data scales per block, descending (default 1,0.1,0.01)")
    walk.add_argument("--tol", type=float, default=1e-6, help="relative loss gap to reach (default 1e-6)")
    walk.add_argument("--max-iter", type=int, default=20000, help="iteration budget per method (default 20000)")
    walk.add_argument("--seed", type=int, default=0, help="seed of the data (default 0)")
    walk.add_argument("--out", default="mrgd_reproduce", help="output folder (default ./mrgd_reproduce)")
    walk.add_argument("--no-plot", action="store_true", help="do not write blog.png (no matplotlib needed)")
    walk.add_argument("--quiet", action="store_true", help="print only the report; no progress bars")
    walk.set_defaults(func=_cmd_reproduce_blog)

    bench = sub.add_parser(
        "bench", help="run the benchmark suite of a source checkout (or a --quick subset)",
        description="Run benchmarks/run_all.py of the source checkout: every benchmark with its tables "
                    "(JSON + markdown) and a combined summary.md in --out.",
    )
    bench.add_argument("--quick", action="store_true",
                       help="smoke-test sizes (results go to benchmarks/results/quick unless --out)")
    bench.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    bench.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    bench.add_argument("--only", default=None, help="comma-separated benchmark names (see --list)")
    bench.add_argument("--timeout", type=float, default=None, help="seconds allowed per benchmark")
    bench.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    bench.add_argument("--benchmarks", metavar="DIR", default=None,
                       help="the folder holding run_all.py (default: <checkout>/benchmarks)")
    bench.add_argument("--verbose", action="store_true", help="stream each benchmark's output")
    bench.add_argument("--quiet", action="store_true", help="only the final summary line; no progress bar")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        name = args.command if args.command != "reproduce" else f"reproduce {args.figure}"
        print(f"mrgd-ext {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mrgd-ext {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
