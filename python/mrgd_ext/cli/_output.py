"""Output helpers shared by the ``mrgd-ext`` commands: the one-line user error, optional dependencies, progress
bars, ``--quiet``-aware printing, ``--out`` folders and written files (always reported by their full path)."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


class UsageError(Exception):
    """A mistake in the command line or a missing optional dependency: one line on stderr, exit status 2."""


def require(module: str, package: str, purpose: str, extra: str = "cli", alternative: str = "") -> None:
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


def progress(total: int | None, desc: str, quiet: bool):
    """A tqdm bar on stderr, or a silent stand-in with --quiet.

    Without tqdm the command still runs: progress bars are a convenience, so a missing tqdm costs one notice
    line (once per command) instead of the result.
    """
    if quiet:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        if not getattr(progress, "warned", False):
            print("mrgd-ext: progress bars are off: tqdm is not installed (pip install 'mrgd_ext[cli]')",
                  file=sys.stderr)
            progress.warned = True  # type: ignore[attr-defined]
        return _NoBar()
    unit = "hvp" if "HVP" in desc else "run"
    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)


def ticker(bar) -> Any:
    def tick(label: str) -> None:
        bar.set_postfix_str(label, refresh=False)
        bar.update(1)

    return tick


def out_dir(text: str, option: str = "--out") -> Path:
    """The folder an --out option names (created when the command writes into it)."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {text!r} exists and is not a directory")
    return path


def check_tol(tol: float) -> None:
    if not 0.0 < tol < 1.0:
        raise UsageError(f"--tol must be in (0, 1), got {tol:g}")


def check_seeds(seeds: int) -> list[int]:
    if seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {seeds}")
    return list(range(seeds))


def reporter(quiet: bool) -> Callable[..., None]:
    """``print`` for the commentary of a command, or a no-op with --quiet (tables are printed either way)."""
    return (lambda *a, **k: None) if quiet else print


def show_paths(paths: Iterable[Path]) -> str:
    """Written files as absolute paths, comma-separated: what the user can open from anywhere."""
    return ", ".join(str(Path(p).resolve()) for p in paths)


def write_json(path_text: str | Path, payload: Any, **dumps: Any) -> Path:
    """Write ``payload`` as JSON (one trailing newline) to a path given on the command line, creating its
    folder; returns the path."""
    path = Path(path_text).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, **dumps) + "\n")
    return path
