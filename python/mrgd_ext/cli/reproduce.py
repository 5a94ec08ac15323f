"""``mrgd-ext reproduce``: the paper reproductions this package carries: fig3 (JSON, markdown and a PNG);
fig1, fig2, fig4 (gradient rows and row-Hessian spectra of an MLP at training stages); blog (the whole story
on one multiscale problem)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

from mrgd_ext.cli._output import (
    UsageError,
    check_seeds,
    check_tol,
    out_dir,
    progress,
    reporter,
    require,
    show_paths,
    ticker,
)


def run_fig3(args: argparse.Namespace) -> int:
    from mrgd_ext.experiments.reproduce import PROBLEMS

    seeds = check_seeds(args.seeds)
    check_tol(args.tol)
    known = [spec["key"] for spec in PROBLEMS]
    problems = [p.strip() for p in args.problems.split(",") if p.strip()] if args.problems else known
    unknown = [p for p in problems if p not in known]
    if unknown or not problems:
        raise UsageError(f"--problems {args.problems!r}: choose from {', '.join(known)}")
    out = out_dir(args.out)
    if not args.no_plot:
        require("matplotlib", "matplotlib", "the Figure 3 plot", "plot", "pass --no-plot")

    import torch

    from mrgd_ext.experiments.reproduce import figure3, figure3_markdown, figure3_plot, figure3_text_table

    torch.set_num_threads(1)  # see mrgd_ext.cli.demo
    say = reporter(args.quiet)
    start = time.perf_counter()
    bar = progress(len(problems) * len(seeds), "Figure 3", args.quiet)
    try:
        results = figure3(seeds, args.tol, problems=problems, progress=ticker(bar))
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
    say(f"wrote {show_paths(written)} ({time.perf_counter() - start:.1f} s)")
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


def parse_floats(text: str, option: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"{option} {text!r} must be comma-separated numbers") from None
    if not values:
        raise UsageError(f"{option} is empty")
    return values


def parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"{option} {text!r} must be comma-separated integers") from None
    if not values or min(values) < 1:
        raise UsageError(f"{option} {text!r} must be one or more integers >= 1")
    return values


def run_rows(args: argparse.Namespace) -> int:
    """fig1, fig2, fig4: gradient rows and row-Hessian spectra of an MLP at training stages."""
    func_name, plot_name, _, title = ROW_FIGURES[args.figure]
    hidden = parse_ints(args.hidden, "--hidden")
    if args.figure != "fig1" and len(hidden) < 2:
        raise UsageError(f"--hidden {args.hidden!r}: {args.figure} looks at the second hidden layer, give two widths "
                         "or more")
    milestones = parse_floats(args.milestones or ROW_FIGURES[args.figure][2], "--milestones")
    if any(not 0 < m <= 1 for m in milestones) or milestones != sorted(milestones):
        raise UsageError(f"--milestones {args.milestones!r} must be ascending test accuracies in (0, 1]")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be > 0, got {args.lr:g}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.samples is not None and args.samples < 8:
        raise UsageError(f"--samples must be >= 8 (a train and a test part), got {args.samples}")
    out = out_dir(args.out)
    if not args.no_plot:
        require("matplotlib", "matplotlib", f"the {title} plot", "plot", "pass --no-plot")
    if args.dataset == "digits":
        require("sklearn", "scikit-learn", f"{title} on the digits data (load_digits)")

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
    say = reporter(args.quiet)
    start = time.perf_counter()
    bar = progress(2 * len(milestones), title, args.quiet)
    try:
        results = getattr(diagnostics, func_name)(progress=ticker(bar), **kwargs)
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
    say(f"wrote {show_paths(written)} ({time.perf_counter() - start:.1f} s)")
    return 0


def run_blog(args: argparse.Namespace) -> int:
    """The walkthrough of mrgd_ext.experiments.walkthrough: data -> Hessian groups -> plan -> training."""
    dims = tuple(parse_ints(args.dims, "--dims"))
    scales = tuple(parse_floats(args.scales, "--scales"))
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
    check_tol(args.tol)
    out = out_dir(args.out)
    if not args.no_plot:
        require("matplotlib", "matplotlib", "the walkthrough plot", "plot", "pass --no-plot")

    import torch

    from mrgd_ext.experiments.walkthrough import blog, blog_markdown, blog_plot

    torch.set_num_threads(1)  # see run_rows
    say = reporter(args.quiet)
    start = time.perf_counter()
    bar = progress(7, "walkthrough", args.quiet)
    try:
        results = blog(num_samples=args.samples, dims=dims, scales=scales, tol=args.tol, max_iter=args.max_iter,
                       seed=args.seed, progress=ticker(bar))
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
    say(f"wrote {show_paths(written)} ({time.perf_counter() - start:.1f} s)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``reproduce`` command to the top-level parser's subcommands."""
    reproduce = sub.add_parser("reproduce", help="paper reproductions with plots (fig1, fig2, fig3, fig4, blog)",
                               description="Reproductions of the paper's experiments, written to a folder.")
    rsub = reproduce.add_subparsers(dest="figure", metavar="FIGURE")
    # Checked by main(): a missing FIGURE is reported as one line there.
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
    fig3.set_defaults(func=run_fig3)
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
        fig.set_defaults(func=run_rows)
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
    walk.set_defaults(func=run_blog)
