"""Figure 3 of He, Liu, Tsai (arXiv:2402.03021), reproduced: iterations to relative error 1e-6.

Random 100-dimensional linear regression with multiscale data (mrgd_ext.problems.random_multiscale_quadratic):
two scales (m = 1, r = 1e-3) and three scales (m = 2, r = 0.1), with r read as the ratio between Hessian
eigenvalue groups (see the problems module for why), plus a supplementary row set with the data-scale reading
of the three-scale problem (Hessian ratio r**2 = 0.01).

Methods, all float64 on the exact quadratic:
  GD at the best constant rate 2/(lambda_min+lambda_max); heavy ball and Nesterov with optimal constant
  parameters for [lambda_min, lambda_max]; conjugate gradients; MrGD cycles planned by
  mrgd_ext.schedule.plan_multirate from the exact eigenvalue groups: nested (paper Algorithm 1, reference
  form), chebyshev-nested, chebyshev and auto; and, as the ideal of DESIGN 1.4, the subspace (spatial)
  form with exact eigenbases, every group at its own rate at every step.

Counts: "measured" starts from x0 = 0 (the regression default) and stops at the first iteration with
||x_k - x*|| <= tol ||x_0 - x*||.  For the MrGD plans the planner's prediction (a worst case over starts) is
shown next to the measured worst case: one run per eigenvector start, i.e. the first k with
||P_k(H)||_2 <= tol.  Medians over seeds.  Timings are not the point here; nothing is timed.

    python benchmarks/fig3.py [--seeds 5] [--tol 1e-6]   (the computation lives in mrgd_ext.reproduce)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mrgd_ext.reproduce import figure3, figure3_markdown


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="number of random problems per row (seeds 0..n-1)")
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    # Thousands of 100x100 products: one thread is fastest and makes runs independent of machine load.
    torch.set_num_threads(1)
    results = figure3(list(range(args.seeds)), args.tol)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fig3.json").write_text(json.dumps(results, indent=1))
    md = figure3_markdown(results)
    (args.out / "fig3.md").write_text(md)
    print(md)
    return 0 if all(c["passed"] for c in results["checks"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
