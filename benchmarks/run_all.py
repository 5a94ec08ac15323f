"""One entry point for the benchmark suite: runs every benchmark, then writes a combined summary.md.

The suite, in this order: bench_step.py (fused multirate and subspace steps vs torch.optim.SGD and the torch
composition), bench_compile.py (the step and a training step under torch.compile, CPU), fig3.py (iteration
counts of Figure 3), bench_training.py (AutoMrGD vs GD, heavy ball and Adam in training, CPU), bench_minibatch.py
(AutoMrGD vs SGD-momentum and Adam with minibatches, CPU),
bench_planner.py, and every bench_lanczos*.py present. Each runs in its
own process with the same interpreter; its output goes to OUT/logs/<name>.log, its result files (JSON +
markdown) to OUT, and summary.md in OUT lists what ran (command, status, time, files) followed by the
markdown tables the benchmarks wrote.

Which options a benchmark takes is read from its ``--help``, so a new benchmark needs no change here:
  --device  passed through. A benchmark without it measures something device-independent (fig3 counts
            iterations in float64 on the CPU): it runs with --device cpu and is skipped for other devices.
  --out     passed through (OUT). A benchmark without it writes to benchmarks/results; the files it wrote
            there are copied into OUT, so OUT always holds every result of the run. With --quick such a
            benchmark is skipped: its smoke-size numbers would overwrite the real ones in benchmarks/results.
  --quick   passed with --quick. fig3 has no --quick: its smoke size is one seed (QUICK_ARGS). A benchmark
            with neither is skipped with --quick (a quick run must stay quick).

    python benchmarks/run_all.py [--quick] [--device cpu|cuda[:N]] [--out DIR] [--only a,b] [--timeout S]
                                 [--list] [--verbose] [--quiet]

OUT defaults to benchmarks/results (the tables the README quotes), and to benchmarks/results/quick with
--quick, so smoke-test numbers never overwrite real ones. Exit status: 0 when every benchmark that ran
succeeded, 1 when one failed or ran out of time, 2 on a usage mistake.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Where benchmarks write when not given --out (the tables the README quotes).
DEFAULT_RESULTS = HERE / "results"
#: Benchmarks in the order they run; bench_lanczos*.py are added after these when present.
FIXED_ORDER = ("bench_step", "bench_compile", "fig3", "bench_training", "bench_minibatch", "bench_planner")
LANCZOS_GLOB = "bench_lanczos*.py"
#: Smoke-size arguments for benchmarks that have no --quick option.
QUICK_ARGS = {"fig3": ["--seeds", "1"]}
#: Seconds a benchmark gets to print its --help (it imports torch and mrgd_ext to do so).
HELP_TIMEOUT_S = 120.0
#: Seconds between SIGTERM and SIGKILL when a benchmark runs out of time.
KILL_GRACE_S = 10.0
_OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


class SuiteError(Exception):
    """A usage mistake: one line on stderr, exit status 2."""


@dataclass
class Outcome:
    name: str
    status: str  # ok | FAILED | TIMEOUT | skipped
    seconds: float = 0.0
    command: list[str] = field(default_factory=list)
    returncode: int | None = None
    note: str = ""
    log: Path | None = None
    files: list[Path] = field(default_factory=list)


def discover(directory: Path = HERE) -> dict[str, Path]:
    """Benchmark name -> script, in run order (only the scripts that exist)."""
    found = {name: directory / f"{name}.py" for name in FIXED_ORDER if (directory / f"{name}.py").is_file()}
    for path in sorted(directory.glob(LANCZOS_GLOB)):
        found.setdefault(path.stem, path)
    return found


def options_of(script: Path) -> tuple[set[str] | None, str]:
    """The long options a script's --help lists, or (None, reason) when --help itself fails."""
    try:
        proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                              timeout=HELP_TIMEOUT_S, cwd=script.parent.parent)
    except subprocess.TimeoutExpired:
        return None, f"--help did not finish in {HELP_TIMEOUT_S:.0f} s"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return None, f"--help exited with status {proc.returncode}: {last}"
    return set(_OPTION.findall(proc.stdout)), ""


def command_for(name: str, script: Path, options: set[str], quick: bool, device: str,
                out: Path) -> tuple[list[str] | None, list[str]]:
    """The command to run ``script`` with, or None when it must be skipped; plus notes for the summary."""
    cmd, notes = [sys.executable, str(script)], []
    if "--device" in options:
        cmd += ["--device", device]
    elif device != "cpu":
        return None, ["takes no --device (device-independent or CPU-only): run it with --device cpu"]
    else:
        notes.append("takes no --device: runs on the CPU")
    if "--out" in options:
        cmd += ["--out", str(out)]
    elif quick:
        return None, ["takes no --out: a quick run would overwrite its results in benchmarks/results"]
    else:
        notes.append(f"takes no --out: its files in {DEFAULT_RESULTS.name}/ copied here")
    if quick:
        if "--quick" in options:
            cmd.append("--quick")
        elif name in QUICK_ARGS:
            cmd += QUICK_ARGS[name]
            notes.append(f"quick: {' '.join(QUICK_ARGS[name])}")
        else:
            return None, ["has no --quick (nor a smoke size in QUICK_ARGS): runs only in a full run"]
    return cmd, notes


def _snapshot(folder: Path) -> dict[Path, float]:
    if not folder.is_dir():
        return {}
    return {p: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}


def run_one(cmd: list[str], log: Path, timeout: float | None, verbose: bool) -> tuple[str, int | None, float]:
    """Run one benchmark, output to ``log`` (and to stdout with ``verbose``), killed after ``timeout`` s.

    The benchmark gets its own process group so that a timeout also ends anything it started.
    """
    start = time.perf_counter()
    timed_out = threading.Event()
    with open(log, "w", encoding="utf-8") as sink:
        sink.write(f"$ {' '.join(cmd)}\n")
        sink.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=HERE.parent, start_new_session=True, bufsize=1)

        def expire() -> None:
            timed_out.set()
            for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 0.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    return
                try:
                    proc.wait(wait)
                    return
                except subprocess.TimeoutExpired:
                    continue

        timer = threading.Timer(timeout, expire) if timeout else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                sink.write(line)
                if verbose:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            rc = proc.wait()
        finally:
            if timer is not None:
                timer.cancel()
            if proc.poll() is None:  # interrupted (Ctrl-C): do not leave the benchmark running
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    status = "TIMEOUT" if timed_out.is_set() else ("ok" if rc == 0 else "FAILED")
    return status, rc, time.perf_counter() - start


def _machine(device: str) -> dict:
    """Machine facts from benchmarks/_common (torch, CPU, GPU); what is known without torch if that fails."""
    try:
        sys.path.insert(0, str(HERE))
        from _common import machine_info

        return machine_info(device)
    except Exception as exc:  # the summary still says what ran
        return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "platform": platform.platform(), "python": platform.python_version(),
                "error": f"machine_info failed: {exc}"}


def write_summary(out: Path, outcomes: list[Outcome], args: argparse.Namespace, info: dict) -> Path:
    lines = ["# Benchmark suite summary", ""]
    lines.append(f"- date: {info.get('date')}")
    lines.append(f"- mode: {'quick (smoke-test sizes, not for quoting)' if args.quick else 'full'}; "
                 f"device {args.device}")
    if "cpu" in info:
        lines.append(f"- machine: {info['cpu']} ({info.get('cpu_count')} logical CPUs)")
    if "gpu" in info:
        lines.append(f"- GPU: {info['gpu']} ({info.get('gpu_memory_gib')} GiB), CUDA {info.get('cuda_version')}")
    lines.append(f"- torch {info.get('torch_version', '?')}, Python {info.get('python')}, {info.get('platform')}")
    if "mrgd_ext_build" in info:
        lines.append(f"- mrgd_ext build: {info['mrgd_ext_build']}")
    if "error" in info:
        lines.append(f"- {info['error']}")
    lines += ["", "| benchmark | status | seconds | command | notes | result files |", "|---|---|---:|---|---|---|"]
    for o in outcomes:
        cmd = " ".join(Path(c).name if i < 2 else c for i, c in enumerate(o.command)) if o.command else ""
        files = ", ".join(p.name for p in o.files)
        status = o.status if o.returncode in (None, 0) else f"{o.status} (exit {o.returncode})"
        log = f" (log: logs/{o.log.name})" if o.log is not None else ""
        cmd = f"`{cmd}`" if cmd else "-"
        lines.append(f"| {o.name} | {status} | {o.seconds:.1f} | {cmd} | {o.note}{log} | {files} |")
    failed = [o.name for o in outcomes if o.status in ("FAILED", "TIMEOUT")]
    lines += ["", f"Overall: {'FAILED: ' + ', '.join(failed) if failed else 'every benchmark that ran succeeded'}.", ""]
    for o in outcomes:
        for md in (p for p in o.files if p.suffix == ".md"):
            lines += [f"## {o.name}: {md.name}", ""]
            # Demote the benchmark's own headings one level so they nest under this section.
            for row in md.read_text(encoding="utf-8").splitlines():
                lines.append("#" + row if row.startswith("#") else row)
            lines.append("")
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _progress(total: int, quiet: bool):
    if quiet:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="benchmarks", unit="bench", leave=False, file=sys.stderr, dynamic_ncols=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="run_all.py", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke-test sizes (default OUT: benchmarks/results/quick)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N], passed to every benchmark that takes it")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--only", default=None, help="comma-separated benchmark names (see --list)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds allowed per benchmark (default: none)")
    ap.add_argument("--list", action="store_true", help="list the benchmarks in run order and exit")
    ap.add_argument("--verbose", action="store_true", help="stream each benchmark's output")
    ap.add_argument("--quiet", action="store_true", help="print only the final summary line")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except SuiteError as exc:
        print(f"run_all.py: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    suite = discover()
    if args.list:
        for name, path in suite.items():
            print(f"{name:24s} {path}")
        return 0
    if args.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", args.device):
        raise SuiteError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if args.timeout is not None and args.timeout <= 0:
        raise SuiteError(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in suite]
        if unknown or not wanted:
            raise SuiteError(f"--only {args.only!r}: unknown benchmark(s) {unknown}; available: {', '.join(suite)}")
        suite = {n: p for n, p in suite.items() if n in wanted}
    out = args.out if args.out is not None else DEFAULT_RESULTS / ("quick" if args.quick else "")
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise SuiteError(f"--out {out} exists and is not a directory")
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    say = (lambda *a: None) if args.quiet else print
    bar = None if args.verbose else _progress(len(suite), args.quiet)
    outcomes = []
    for i, (name, script) in enumerate(suite.items(), 1):
        if bar is not None:
            bar.set_postfix_str(name)
        options, problem = options_of(script)
        if options is None:
            outcome = Outcome(name, "FAILED", note=problem)
        else:
            cmd, notes = command_for(name, script, options, args.quick, args.device, out)
            if cmd is None:
                outcome = Outcome(name, "skipped", note="; ".join(notes))
            else:
                # Files a benchmark wrote: new or modified in OUT, or (without --out) in DEFAULT_RESULTS,
                # whence they are copied into OUT.
                folders = [out] if "--out" in cmd or DEFAULT_RESULTS.resolve() == out else [out, DEFAULT_RESULTS]
                before = {f: _snapshot(f) for f in folders}
                log = logs / f"{name}.log"
                status, rc, seconds = run_one(cmd, log, args.timeout, args.verbose)
                files = []
                for folder in folders:
                    changed = sorted(p for p, t in _snapshot(folder).items() if before[folder].get(p) != t)
                    if folder != out:
                        copies = [out / p.name for p in changed]
                        for src, dst in zip(changed, copies):
                            shutil.copy2(src, dst)
                        changed = copies
                    files += changed
                if status == "TIMEOUT":
                    notes.append(f"killed after {args.timeout:g} s")
                outcome = Outcome(name, status, seconds, cmd, rc, "; ".join(notes), log, files)
        outcomes.append(outcome)
        if bar is not None:
            bar.update(1)
        line = f"[{i}/{len(suite)}] {name}: {outcome.status} ({outcome.seconds:.1f} s)"
        if outcome.status != "ok" and outcome.note:
            line += f" - {outcome.note}"
        if bar is not None:
            bar.write(line, file=sys.stdout)
        else:
            say(line)
        if outcome.status in ("FAILED", "TIMEOUT") and outcome.log is not None and not args.verbose:
            tail = outcome.log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            print("\n".join(f"    {t}" for t in tail), file=sys.stderr)
    if bar is not None:
        bar.close()
    summary = write_summary(out, outcomes, args, _machine(args.device))
    failed = [o.name for o in outcomes if o.status in ("FAILED", "TIMEOUT")]
    skipped = sum(o.status == "skipped" for o in outcomes)
    print(f"run_all.py: {len(outcomes) - skipped} ran, {len(failed)} failed"
          f"{' (' + ', '.join(failed) + ')' if failed else ''}, {skipped} skipped; summary: {summary}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
