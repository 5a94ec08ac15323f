"""``mrgd-ext info``: what this build of mrgd_ext contains."""

from __future__ import annotations

import argparse
import json


def run_info(args: argparse.Namespace) -> int:
    import mrgd_ext

    info = mrgd_ext.build_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:20s} {value}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``info`` command to the top-level parser's subcommands."""
    info = sub.add_parser("info", help="what this build contains (versions, CUDA, CPU ISA)",
                          description="What this build of mrgd_ext contains (versions, CUDA archs, CPU ISA).")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=run_info)
