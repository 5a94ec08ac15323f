"""The ``mrgd-ext`` command line (also ``python -m mrgd_ext``).

Subcommands:
  demo   the Figure 3 reproduction: iterations to relative error 1e-6 for GD, heavy ball, Nesterov, CG and
         MrGD on random multiscale linear regression, with the plan MrGD follows.
  plan   plan a multirate cycle for eigenvalue groups given on the command line; a table or JSON.
  info   what this build of mrgd_ext contains.
User mistakes print one line on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


class UsageError(Exception):
    """A mistake in the command line: reported as one line, exit status 2."""


def _parse_groups(text: str):
    from mrgd_ext.schedule import ScaleGroup

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
    from mrgd_ext.schedule import plan_multirate

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


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    import mrgd_ext
    from mrgd_ext.problems import random_multiscale_quadratic
    from mrgd_ext.reproduce import figure3, figure3_text_table
    from mrgd_ext.schedule import plan_multirate

    if args.seeds < 1:
        raise UsageError("--seeds must be >= 1")
    if not 0.0 < args.tol < 1.0:
        raise UsageError("--tol must be in (0, 1)")
    torch.set_num_threads(1)  # thousands of 100x100 products: one thread is fastest
    say = (lambda *a: None) if args.quiet else print
    say(f"mrgd_ext {mrgd_ext.__version__} (torch {torch.__version__}); build: {mrgd_ext.build_info()}")
    say()
    problem = random_multiscale_quadratic(dim=100, num_scales=2, ratio=1e-3, seed=0)
    say("Random 100-dim linear regression, two scales (r = 1e-3); exact eigenvalue groups of the Hessian:")
    say("  " + ", ".join(f"[{g.a:.3g}, {g.b:.3g}]" for g in problem.groups))
    plan = plan_multirate(problem.groups, tol=args.tol)
    say()
    say(plan)
    say()
    seeds = list(range(args.seeds))
    say(f"Figure 3: iterations to relative error {args.tol:g}, median over {len(seeds)} random problems ...")
    start = time.perf_counter()
    results = figure3(seeds, args.tol, problems=["two_scales", "three_scales"])
    print(figure3_text_table(results))
    say()
    for check in results["checks"]:
        say(f"{'PASS' if check['passed'] else 'FAIL'}: {check['name']}")
    say(f"({time.perf_counter() - start:.1f} s; full tables: python benchmarks/fig3.py)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrgd-ext", description="Multirate gradient descent for multiscale problems.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", help="Figure 3 reproduction with the plan MrGD follows")
    demo.add_argument("--seeds", type=int, default=3, help="random problems per row (default 3)")
    demo.add_argument("--tol", type=float, default=1e-6, help="relative error to reach (default 1e-6)")
    demo.add_argument("--quiet", action="store_true", help="print only the table")
    demo.set_defaults(func=_cmd_demo)

    plan = sub.add_parser("plan", help="plan a multirate cycle for eigenvalue groups")
    plan.add_argument("--groups", required=True,
                      help="eigenvalue intervals a:b (Hessian scale), largest first, e.g. '1:2,1e-3:2e-3'")
    plan.add_argument("--strategy", default="auto", choices=["auto", "nested", "chebyshev-nested", "chebyshev"])
    plan.add_argument("--rate-rule", default="optimal", choices=["optimal", "safe"])
    plan.add_argument("--tol", type=float, default=1e-6, help="relative error the plan is optimised for")
    plan.add_argument("--no-merge", action="store_true", help="never merge adjacent groups")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(func=_cmd_plan)

    info = sub.add_parser("info", help="what this build contains (versions, CUDA, CPU ISA)")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"mrgd-ext {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
