"""Planning time of ``mrgd_ext.plan_multirate`` against the number of eigenvalue groups, with a time budget.

Three families of synthetic spectra, default strategy ("auto": nested and Chebyshev-nested over merge
patterns):

* ``separated`` -- ``groups_from_scales(n, 0.1, 1.0)``: Hessian ratio 0.1 between groups, relative width 1.
  Beyond ~16 groups no plan fits the limits (every level multiplies the cycle), so these sizes measure how fast
  the planner says so.
* ``dense`` -- ``groups_from_scales(n, 0.5, 0.3)``: narrow groups a factor 2 apart, where merging pays: one
  Chebyshev cycle over everything wins up to 22 groups.
* ``irregular`` -- :func:`irregular_groups` (seed 1): random widths and gaps, a large gap one time in four.

Each size is planned once (planning is deterministic; repeats only cost time).  A size that fails raises nothing
here but is recorded with its error; sizes above ``MAX_GROUPS`` record the refusal.  Budget (CPU seconds, so the
load of a shared machine counts less): 1 s up to 20 groups, 5 s beyond.  ``--check`` exits 1 when a size
misses its budget.  Writes planner_cpu.json and planner_cpu.md (machine, torch version, date).

Where the time goes (cProfile, irregular family, 20 groups, 0.65 s): the merge search (``_search_many``: seeds
scanned from few runs up, then hill climbing) takes ~0.2 s; the counts of the three finalists on the fine grid
(``fine_counts``, closed-form Chebyshev levels) ~0.02 s; most of the rest is ``assemble`` of the chosen plan,
which evaluates every actual rate on the fine grid and is dominated by levels of high Chebyshev degree: a
degree-512 level over the fine grid of 20 groups is 512 logarithms and run updates over ~60,000 points
(~0.2 s).  Summing the nodes' logarithms in ``fine_counts`` too (as before) cost another ~0.13 s there.

Before this search (pairwise greedy merging, one degree search per adjacent pair per round), the dense family
took 2.0 / 4.7 / 6.6 CPU s at 12 / 16 / 20 groups and planned 708 / 3670 / 15444 predicted iterations where
the search now finds 384 / 1792 / 11776; at 21-24 dense groups and 12-24 irregular ones it found no plan.

    python benchmarks/bench_planner.py [--quick] [--check] [--out DIR] [--sizes 2,4,8,12,16,20,24,25,50]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_header, markdown_table, write_results  # noqa: E402
from mrgd_ext import ScaleGroup, groups_from_scales, plan_multirate  # noqa: E402
from mrgd_ext.planning.search import MAX_GROUPS  # noqa: E402

# name: (Hessian ratio, relative width) for groups_from_scales; None: irregular_groups.
FAMILIES: dict[str, tuple[float, float] | None] = {"separated": (0.1, 1.0), "dense": (0.5, 0.3), "irregular": None}


def irregular_groups(n: int, seed: int = 1) -> list[ScaleGroup]:
    """Seeded random spectrum: relative widths (b - a) / b in [0.1, 0.8]; gaps b_{k+1} / a_k mostly in
    [0.3, 0.8] (merging may pay), one in four in [0.005, 0.03] (a level of its own may pay)."""
    rng = np.random.default_rng(seed)
    out, b = [], 1.0
    for _ in range(n):
        a = b * (1.0 - rng.uniform(0.1, 0.8))
        out.append(ScaleGroup(a, b))
        b = a * (rng.uniform(5e-3, 3e-2) if rng.random() < 0.25 else rng.uniform(0.3, 0.8))
    return out


def budget_s(groups: int) -> float:
    """The planning-time budget: 1 CPU second up to 20 groups, 5 beyond."""
    return 1.0 if groups <= 20 else 5.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="sizes 2, 4, 8 and one above MAX_GROUPS")
    ap.add_argument("--sizes", default=None, help="comma-separated group counts (default 2,4,8,12,16,20,24,25,50)")
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: " + ", ".join(FAMILIES))
    ap.add_argument("--check", action="store_true", help="exit 1 if a size misses its budget")
    ap.add_argument("--device", default="cpu", help="accepted for the suite; planning runs on the CPU")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        sizes = [2, 4, 8, MAX_GROUPS + 1]
    else:
        sizes = [int(s) for s in (args.sizes or "2,4,8,12,16,20,24,25,50").split(",")]
    rows = []
    for family in args.families.split(","):
        params = FAMILIES[family]
        ratio, width = params if params is not None else (None, None)
        for n in sizes:
            groups = groups_from_scales(n, *params) if params is not None else irregular_groups(n)
            start, cpu = time.perf_counter(), time.process_time()
            try:
                plan = plan_multirate(groups)
                outcome = {"strategy": plan.strategy, "levels": plan.num_groups, "cycle_length": plan.cycle_length,
                           "predicted_iterations": plan.predicted_iterations()}
            except ValueError as exc:
                outcome = {"error": str(exc)}
            cpu_s = time.process_time() - cpu
            rows.append({"family": family, "ratio": ratio, "width": width, "groups": n,
                         "seconds": time.perf_counter() - start, "cpu_seconds": cpu_s, "budget_s": budget_s(n),
                         "within_budget": cpu_s <= budget_s(n), **outcome})
            print(f"{family:>9} {n:>3} groups: {rows[-1]['seconds']:.2f} s wall, {cpu_s:.2f} s CPU  {outcome}",
                  flush=True)
    info = machine_info("cpu")
    payload = {"machine": info, "families": FAMILIES, "max_groups": MAX_GROUPS, "results": rows}
    table = markdown_table(
        ["family", "groups", "wall s", "CPU s", "budget s", "strategy (or error)", "levels", "cycle length",
         "predicted iterations"],
        [[r["family"], r["groups"], f"{r['seconds']:.2f}", f"{r['cpu_seconds']:.2f}",
          f"{r['budget_s']:g} ({'met' if r['within_budget'] else 'MISSED'})", r.get("strategy", r.get("error", "")),
          r.get("levels", ""), r.get("cycle_length", ""), r.get("predicted_iterations", "")] for r in rows],
    )
    md = markdown_header("Planner time (plan_multirate, strategy auto)", info) + "\n" + table + "\n"
    json_path, md_path = write_results("planner_cpu", payload, md, Path(args.out) if args.out else None)
    print(f"wrote {json_path.resolve()}, {md_path.resolve()}")
    missed = [f"{r['family']}/{r['groups']}" for r in rows if not r["within_budget"]]
    if args.check and missed:
        print(f"planning-time budget missed for: {', '.join(missed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
