"""The ``mrgd-ext`` command line (also ``python -m mrgd_ext``): the top-level parser and error handling.

Subcommands, one module each: ``demo``, ``plan``, ``info``, ``spectrum``, ``reproduce`` (fig1, fig2, fig3, fig4,
blog) and ``bench``.  Every mistake -- argparse's own included (unknown option, bad choice, missing argument) --
and a missing optional dependency prints ONE line on stderr that names the bad argument and exits with status
2; no usage block, no traceback.  Progress bars (tqdm, on stderr) show on anything that runs for more than a
second, unless ``--quiet``.  tqdm, matplotlib and scikit-learn are optional (``pip install 'mrgd_ext[cli]'``)
and imported only by the commands that use them.  Commands that write files take ``--out DIR`` and print the
full paths of what they wrote.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn, cast

from mrgd_ext.cli import bench, demo, info, plan, reproduce, spectrum
from mrgd_ext.cli._output import UsageError


class _ArgumentError(Exception):
    """An argparse error, raised instead of printing the usage block and exiting."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become one line (its subparsers are of the same class)."""

    def error(self, message: str) -> NoReturn:
        raise _ArgumentError(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mrgd-ext",
        description="Multirate gradient descent (MrGD) for multiscale problems: demo, planner, reproductions, "
                    "benchmarks.",
    )
    # Not `required`: argparse would then report a missing COMMAND before an unknown option such as --bogus;
    # main() checks both itself, the unknown option first.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (demo, plan, info, spectrum, reproduce, bench):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            prog = "mrgd-ext" if getattr(args, "command", None) is None else _command_name(args)
            raise _ArgumentError(prog, f"unrecognized arguments: {' '.join(unknown)}")
        if args.command is None:
            # argparse types its private _subparsers as optional; build_parser always adds the subcommands.
            subcommands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
            choices = ", ".join(cast("dict[str, argparse.ArgumentParser]", subcommands))
            raise _ArgumentError("mrgd-ext", f"a COMMAND is required: choose from {choices}")
        if args.command == "reproduce" and getattr(args, "figure", None) is None:
            raise _ArgumentError("mrgd-ext reproduce", "a FIGURE is required: choose from fig1, fig2, fig3, fig4, blog")
    except _ArgumentError as exc:
        print(f"{exc.prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"{_command_name(args)}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{_command_name(args)}: interrupted", file=sys.stderr)
        return 130


def _command_name(args: argparse.Namespace) -> str:
    if args.command == "reproduce" and getattr(args, "figure", None) is not None:
        return f"mrgd-ext reproduce {args.figure}"
    return f"mrgd-ext {args.command}"


if __name__ == "__main__":
    raise SystemExit(main())
