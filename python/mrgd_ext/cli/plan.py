"""``mrgd-ext plan``: a multirate cycle for eigenvalue groups given on the command line; a table or JSON."""

from __future__ import annotations

import argparse
import json

from mrgd_ext.cli._output import UsageError


def _parse_groups(text: str):
    from mrgd_ext.planning import ScaleGroup

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


def run_plan(args: argparse.Namespace) -> int:
    from mrgd_ext.planning import plan_multirate

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


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``plan`` command to the top-level parser's subcommands."""
    plan = sub.add_parser("plan", help="plan a multirate cycle for eigenvalue groups",
                          description="Plan a multirate cycle of learning rates for Hessian eigenvalue groups.")
    plan.add_argument("--groups", required=True,
                      help="eigenvalue intervals a:b (Hessian scale), largest first, e.g. '1:2,1e-3:2e-3'")
    plan.add_argument("--strategy", default="auto", choices=["auto", "nested", "chebyshev-nested", "chebyshev"])
    plan.add_argument("--rate-rule", default="optimal", choices=["optimal", "safe"])
    plan.add_argument("--tol", type=float, default=1e-6, help="relative error the plan is optimised for")
    plan.add_argument("--no-merge", action="store_true", help="never merge adjacent groups")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(func=run_plan)
