"""``mrgd-ext demo``: the Figure 3 table on random multiscale least squares, then MrGD against SGD and heavy
ball on scikit-learn's diabetes data (raw features): a comparison table and a plot of the loss."""

from __future__ import annotations

import argparse
import time

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
    write_json,
)


def run_demo(args: argparse.Namespace) -> int:
    seeds = check_seeds(args.seeds)
    check_tol(args.tol)
    if args.iterations < 1:
        raise UsageError(f"--iterations must be >= 1, got {args.iterations}")
    out = None if args.no_plot else out_dir(args.out) / "mrgd_demo.png"
    if out is not None:
        require("matplotlib", "matplotlib", "the demo's plot", "plot", "pass --no-plot")
    require("sklearn", "scikit-learn", "the demo's real data set (load_diabetes)")

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
    from mrgd_ext.planning import plan_multirate

    # Thousands of products of 100x100 (Figure 3) and 442x11 (diabetes) matrices: one thread is fastest for
    # sizes this small and keeps the timings independent of other load on the machine.
    torch.set_num_threads(1)
    say = reporter(args.quiet)
    start = time.perf_counter()
    say(f"mrgd_ext {mrgd_ext.__version__} (torch {torch.__version__}); build: {mrgd_ext.build_info()}")
    say()
    say("== 1. Built-in multiscale problem: Figure 3 of He, Liu, Tsai (arXiv:2402.03021) ==")
    problem = random_multiscale_quadratic(dim=100, num_scales=2, ratio=1e-3, seed=0)
    say("Random 100-dim linear regression, two scales (r = 1e-3); exact eigenvalue groups of the Hessian:")
    say("  " + ", ".join(f"[{g.a:.3g}, {g.b:.3g}]" for g in problem.groups))
    say()
    say(plan_multirate(problem.groups, tol=args.tol))
    say("  sup|P| on group: the factor by which one cycle shrinks the worst error component in that group "
        "(smaller is better).")
    say("  perturbation amplification: how much an error injected at one step (rounding, gradient noise) can "
        "grow before the rest of the cycle damps it.")
    say()
    say(f"Iterations to relative error {args.tol:g}, median over {len(seeds)} random problem(s):")
    problems = ["two_scales", "three_scales"]
    bar = progress(len(problems) * len(seeds), "Figure 3", args.quiet)
    try:
        fig3 = figure3(seeds, args.tol, problems=problems, progress=ticker(bar))
    finally:
        bar.close()
    print(figure3_text_table(fig3))
    for check in fig3["checks"]:
        say(f"{'PASS' if check['passed'] else 'FAIL'}: {check['name']}")
    say("(full tables: mrgd-ext reproduce fig3)")
    say()

    say("== 2. Real data: least squares on scikit-learn's diabetes data, raw features ==")
    bar = progress(DIABETES_RUNS, "diabetes", args.quiet)
    try:
        real = diabetes_least_squares(args.iterations, args.tol, progress=ticker(bar))
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
        say(f"wrote {show_paths([out])}")
    if args.json is not None:
        path = write_json(args.json, {"figure3": fig3, "diabetes": real}, default=str)
        say(f"wrote {show_paths([path])}")
    say(f"({time.perf_counter() - start:.1f} s)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` command to the top-level parser's subcommands."""
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
    demo.add_argument("--out", metavar="DIR", default=".",
                      help="folder for the plot of loss vs iterations, mrgd_demo.png (default: the current folder)")
    demo.add_argument("--no-plot", action="store_true", help="do not write the plot (no matplotlib needed)")
    demo.add_argument("--json", metavar="PATH", default=None, help="also write all numbers as JSON to PATH")
    demo.add_argument("--quiet", action="store_true", help="print only the tables; no progress bars")
    demo.set_defaults(func=run_demo)
