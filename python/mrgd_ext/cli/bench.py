"""``mrgd-ext bench``: the benchmark suite of a source checkout (benchmarks/run_all.py), or a quick subset."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from mrgd_ext.cli._output import UsageError, out_dir

#: Where a source checkout keeps the benchmark suite, relative to the repository root.
_SUITE_ENTRY = Path("benchmarks") / "run_all.py"


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


def run_bench(args: argparse.Namespace) -> int:
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    out = out_dir(args.out) if args.out is not None else None
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


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``bench`` command to the top-level parser's subcommands."""
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
    bench.set_defaults(func=run_bench)
