"""Figure 3 of He, Liu, Tsai (arXiv:2402.03021), reproduced: iterations to relative error 1e-6.

Runs mrgd_ext.experiments.reproduce.figure3 (its docstring describes the problems, methods and counts) over several
seeds and writes benchmarks/results/fig3.{json,md}.

    python benchmarks/fig3.py [--seeds 5] [--tol 1e-6] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mrgd_ext.experiments.reproduce import figure3, figure3_markdown


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
