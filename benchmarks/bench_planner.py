"""Planning time of ``mrgd_ext.plan_multirate`` against the number of eigenvalue groups.

Groups from ``groups_from_scales(n, ratio)`` (Hessian ratio between successive groups, relative width 1), default
strategy ("auto": nested and Chebyshev-nested over merge patterns).  Each size is planned once (planning is
deterministic and takes seconds, so repeats only cost time); a size that fails raises nothing here but is
recorded with its error.  Writes planner_cpu.json and planner_cpu.md (machine, torch version, date).  CPU
seconds are reported beside wall seconds: on a shared machine the wall time mostly measures the other load.

Where the time goes (cProfile): the degree search per merge pattern -- adding a level's large steps to a batch
of partial cycles (``extend``) and the least count per candidate (``least_counts``), each a few elementwise
passes over [candidates, grid points] arrays -- is 75-85% of it; building the large-step rows of each pattern
most of the rest.  Deep nests (4+ levels) use coordinate descent, and beyond 6 groups merge patterns are
explored greedily, one ``_search`` per adjacent pair per round, so the cost grows about with the cube of the
number of groups; plan_multirate refuses more than ``MAX_GROUPS`` groups.

    python benchmarks/bench_planner.py [--quick] [--out DIR] [--sizes 2,4,8,12,20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_header, markdown_table, write_results  # noqa: E402
from mrgd_ext import groups_from_scales, plan_multirate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="sizes 2 and 4 only")
    ap.add_argument("--sizes", default=None, help="comma-separated group counts (default 2,4,8,12,20)")
    ap.add_argument("--ratio", type=float, default=0.1, help="Hessian ratio between successive groups")
    ap.add_argument("--device", default="cpu", help="accepted for the suite; planning runs on the CPU")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sizes = [2, 4] if args.quick else [int(s) for s in (args.sizes or "2,4,8,12,20").split(",")]
    rows = []
    for n in sizes:
        groups = groups_from_scales(n, args.ratio)
        start, cpu = time.perf_counter(), time.process_time()
        try:
            plan = plan_multirate(groups)
            outcome = {"strategy": plan.strategy, "levels": plan.num_groups, "cycle_length": plan.cycle_length,
                       "predicted_iterations": plan.predicted_iterations()}
        except ValueError as exc:
            outcome = {"error": str(exc)}
        cpu_s = time.process_time() - cpu
        # The planning-time budget: 1 s up to 20 groups, 5 s beyond (CPU seconds, so other load does not count).
        budget = 1.0 if n <= 20 else 5.0
        rows.append({"groups": n, "seconds": time.perf_counter() - start, "cpu_seconds": cpu_s, "budget_s": budget,
                     "within_budget": cpu_s <= budget, **outcome})
        print(f"{n:>3} groups: {rows[-1]['seconds']:.2f} s wall, {rows[-1]['cpu_seconds']:.2f} s CPU  {outcome}",
              flush=True)
    info = machine_info("cpu")
    payload = {"machine": info, "ratio": args.ratio, "results": rows}
    table = markdown_table(
        ["groups", "wall s", "CPU s", "budget s", "strategy (or error)", "levels", "cycle length",
         "predicted iterations"],
        [[r["groups"], f"{r['seconds']:.2f}", f"{r['cpu_seconds']:.2f}",
          f"{r['budget_s']:g} ({'met' if r['within_budget'] else 'MISSED'})", r.get("strategy", r.get("error", "")),
          r.get("levels", ""),
          r.get("cycle_length", ""), r.get("predicted_iterations", "")] for r in rows],
    )
    md = markdown_header("Planner time (plan_multirate, strategy auto)", info) + "\n" + table + "\n"
    json_path, md_path = write_results("planner_cpu", payload, md, Path(args.out) if args.out else None)
    print(f"wrote {json_path.resolve()}, {md_path.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
