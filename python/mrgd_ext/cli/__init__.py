"""The ``mrgd-ext`` command line."""

from mrgd_ext.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
