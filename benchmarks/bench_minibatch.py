"""Minibatch training: AutoMrGD (defaults, untuned) against tuned SGD with momentum and tuned Adam, CPU.

The networks of the training suite (``bench_training.py``: the same data, models and losses) trained with
minibatches instead of the full batch:

* ``cnn_digits``: the small CNN on the raw 8 x 8 digits;
* ``mlp_multiscale``: the MLP 64-64-64-10 on the multiscale generator's data (scales 1, 0.1, 0.01).

Every epoch visits the training set once in batches of ``--batch`` (default 128) in an order drawn from the
run's seed (the same orders for every method). Methods:

* ``sgd_momentum``: ``torch.optim.SGD(lr, momentum=0.9)``, ``lr = (1 / L0) * 10^j``, j = 0 .. -2 (L0: the
  top eigenvalue of the full-batch Hessian at the seed-0 initialisation); ``adam``: ``torch.optim.Adam(lr)``,
  lr in 1e-3 .. 1e-1. Each tuned on seed 0 (lowest final full-batch loss), then run on every seed; the
  grid's cost is reported;
* ``auto``: ``mrgd_ext.AutoMrGD`` with default arguments on a ``HessianOperator`` of a fixed probe batch of
  256 training samples; its closure evaluates the current minibatch (the loss it watches is the minibatch
  loss). Never tuned.

After every epoch the full training loss is evaluated with the clock stopped. Reported per method (medians
over seeds): time and epochs to tuned SGD-momentum's median final loss, the final loss, the test metric, and
AutoMrGD's HVPs, estimation seconds and back-offs. Target: AutoMrGD's time to that loss <= 1.0x tuned
SGD-momentum's, without tuning; it never raises or diverges.

Writes ``OUT/minibatch_cpu.json`` and ``OUT/minibatch_cpu.md`` (OUT: benchmarks/results, or
benchmarks/results/quick with ``--quick``).

    python benchmarks/bench_minibatch.py [--out DIR] [--quick] [--problems a,b] [--seeds N] [--epochs N]
                                         [--batch B] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import mrgd_ext
from _common import RESULTS_DIR, machine_info, markdown_header, markdown_table, write_results
from bench_training import Problem, make_problem, model_for, top_eigenvalue

PROBLEMS = ("cnn_digits", "mlp_multiscale")
METHODS = ("sgd_momentum", "adam", "auto")
SGD_EXPONENTS = (0.0, -0.5, -1.0, -1.5, -2.0)  # lr = (1 / L0) * 10^j: noise needs smaller rates
ADAM_LRS = (1e-3, 1e-2, 1e-1)
PROBE_SAMPLES = 256
DIVERGENCE_FACTOR = 1e3


def _optimizer(method: str, lr: float | None, params: list[torch.Tensor], prob: Problem, model: torch.nn.Module):
    if method == "sgd_momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if method == "adam":
        return torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(12345)
    probe = torch.randperm(prob.x_train.shape[0], generator=gen)[:PROBE_SAMPLES]
    x, y = prob.x_train[probe], prob.y_train[probe]

    def probe_loss(plist: list[torch.Tensor]) -> torch.Tensor:
        out = torch.func.functional_call(model, dict(zip(dict(model.named_parameters()), plist)), (x,))
        return prob.data_loss(out, y)

    return mrgd_ext.AutoMrGD(params, mrgd_ext.HessianOperator.from_closure(probe_loss, params))


def run_one(prob: Problem, method: str, lr: float | None, seed: int, epochs: int, batch: int) -> dict[str, Any]:
    model = model_for(prob, seed)
    params = list(model.parameters())
    n = prob.x_train.shape[0]
    order_gen = torch.Generator().manual_seed(1000 + seed)
    run: dict[str, Any] = {"method": method, "setting": "defaults" if lr is None else f"lr={lr:.3g}", "seed": seed,
                           "status": "ok", "reason": "", "times": [0.0], "losses": [], "steps": 0, "hvps": 0,
                           "estimation_s": 0.0, "backoffs": 0}
    with torch.no_grad():
        loss0 = float(prob.loss_of(model))
    run["losses"].append(loss0)
    elapsed = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t0 = time.perf_counter()
        try:
            opt = _optimizer(method, lr, params, prob, model)
        except (RuntimeError, ValueError) as exc:
            run["status"], run["reason"] = "failed", f"construction: {type(exc).__name__}: {exc}"
            return run
        elapsed += time.perf_counter() - t0
        for _epoch in range(epochs):
            perm = torch.randperm(n, generator=order_gen)
            t0 = time.perf_counter()
            try:
                for start in range(0, n, batch):
                    idx = perm[start:start + batch]
                    xb, yb = prob.x_train[idx], prob.y_train[idx]

                    def closure(xb=xb, yb=yb):
                        opt.zero_grad(set_to_none=True)
                        loss = prob.data_loss(model(xb), yb)
                        loss.backward()
                        return loss

                    if method == "auto":
                        opt.step(closure)
                    else:
                        closure()
                        opt.step()
                    run["steps"] += 1
            except RuntimeError as exc:
                run["status"], run["reason"] = "failed", str(exc)
                break
            elapsed += time.perf_counter() - t0
            with torch.no_grad():  # the clock is stopped for the full-batch loss
                value = float(prob.loss_of(model))
            run["times"].append(elapsed)
            run["losses"].append(value)
            if not math.isfinite(value) or value > DIVERGENCE_FACTOR * max(loss0, 1e-12):
                run["status"], run["reason"] = "diverged", f"full-batch loss {value:.3g} after epoch {_epoch + 1}"
                break
    run["test_metric"] = prob.metric(model)
    if isinstance(opt, mrgd_ext.AutoMrGD):
        run["hvps"] = int(opt.estimation_hvps)
        run["estimation_s"] = float(opt.estimation_seconds)
        run["backoffs"] = sum(e["kind"] == "backoff" for e in opt.events)
    return run


def _reach(run: dict[str, Any], target: float) -> tuple[int | None, float | None]:
    for epoch, (t, loss) in enumerate(zip(run["times"], run["losses"])):
        if math.isfinite(loss) and loss <= target:
            return epoch, t
    return None, None


def _median(values: list) -> float | None:
    """Median where a value never reached counts as infinite (None unless most runs reached it)."""
    vals = [v for v in values if v is not None]
    if len(vals) * 2 <= len(values):
        return None
    m = statistics.median(vals + [math.inf] * (len(values) - len(vals)))
    return None if math.isinf(m) else m


def bench_problem(name: str, seeds: int, quick: bool, epochs: int, batch: int) -> dict[str, Any]:
    t_start = time.perf_counter()
    prob = make_problem(name)
    L0 = top_eigenvalue(prob, model_for(prob, 0))
    grids = {"sgd_momentum": [10 ** j / L0 for j in ((-0.5, -1.5) if quick else SGD_EXPONENTS)],
             "adam": list(ADAM_LRS[:2] if quick else ADAM_LRS)}
    runs: list[dict[str, Any]] = []
    grid_cost: dict[str, dict[str, Any]] = {}
    tuned: dict[str, float] = {}
    for method, lrs in grids.items():
        trial = [run_one(prob, method, lr, 0, epochs, batch) for lr in lrs]
        grid_cost[method] = {"runs": len(trial), "seconds": sum(r["times"][-1] for r in trial)}
        ok = [(r["losses"][-1], lr) for lr, r in zip(lrs, trial) if r["status"] == "ok"]
        best = min(ok)[1] if ok else lrs[-1]
        tuned[method] = best
        runs.append(next(r for lr, r in zip(lrs, trial) if lr == best))
        runs += [run_one(prob, method, best, s, epochs, batch) for s in range(1, seeds)]
    runs += [run_one(prob, "auto", None, s, epochs, batch) for s in range(seeds)]
    target = statistics.median(r["losses"][-1] for r in runs if r["method"] == "sgd_momentum")
    summary = {}
    for method in METHODS:
        rs = [r for r in runs if r["method"] == method]
        reached = [_reach(r, target) for r in rs]
        metrics = [r["test_metric"] for r in rs if math.isfinite(r["test_metric"])]
        summary[method] = {
            "setting": rs[0]["setting"], "ok": sum(r["status"] == "ok" for r in rs), "runs": len(rs),
            "final_loss": statistics.median(r["losses"][-1] for r in rs),
            "test_metric": statistics.median(metrics) if metrics else float("nan"),
            "test_metric_std": statistics.pstdev(metrics) if len(metrics) > 1 else 0.0,
            "target_epochs": _median([e for e, _ in reached]), "target_s": _median([t for _, t in reached]),
            "train_s": statistics.median(r["times"][-1] for r in rs),
            "hvps": statistics.median(r["hvps"] for r in rs),
            "estimation_s": statistics.median(r["estimation_s"] for r in rs),
            "backoffs": statistics.median(r["backoffs"] for r in rs), "grid": grid_cost.get(method),
        }
    return {"description": prob.description, "L0": L0, "epochs": epochs, "batch": batch, "target_loss": target,
            "tuned_lrs": tuned, "metric": prob.metric_name, "summary": summary, "runs": runs,
            "seconds": time.perf_counter() - t_start}


def check_problem(res: dict[str, Any]) -> dict[str, Any]:
    s = res["summary"]
    a, b = s["auto"]["target_s"], s["sgd_momentum"]["target_s"]
    # The baseline never got there: any time of ours is better; it got there at once (its final loss is no
    # lower than the start): only a time of 0 matches it.
    ratio = None if a is None else 0.0 if b is None else a / b if b > 0 else (1.0 if a == 0 else math.inf)
    items = [
        {"what": "AutoMrGD never raises or diverges", "pass": s["auto"]["ok"] == s["auto"]["runs"],
         "detail": f"{s['auto']['ok']}/{s['auto']['runs']} ok"},
        {"what": "AutoMrGD: time to tuned SGD-momentum's final loss <= 1.0x SGD-momentum",
         "pass": ratio is not None and ratio <= 1.0, "detail": f"{a} s vs {b} s (ratio {ratio})"},
    ]
    return {"items": items, "pass": all(i["pass"] for i in items)}


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def problem_markdown(name: str, res: dict[str, Any]) -> str:
    lines = [f"## {name}: {res['description']}", "",
             f"{res['epochs']} epochs, batch {res['batch']}; L0 = {res['L0']:.4g}; target = tuned SGD-momentum's "
             f"median final full-batch loss {res['target_loss']:.6g}; {res['seconds']:.0f} s for the whole problem.",
             ""]
    headers = ["method", "setting (seed 0 grid)", "ok", "epochs to target", "s to target", "final loss",
               res["metric"], "train s", "HVPs", "estimation s", "back-offs", "grid cost (runs / s)"]
    rows = []
    for m in METHODS:
        a = res["summary"][m]
        grid = a["grid"]
        rows.append([m, a["setting"], f"{a['ok']}/{a['runs']}", _f(a["target_epochs"]), _f(a["target_s"]),
                     _f(a["final_loss"], 4), f"{a['test_metric']:.4g} +- {a['test_metric_std']:.2g}",
                     _f(a["train_s"]), _f(a["hvps"]), _f(a["estimation_s"]), _f(a["backoffs"]),
                     f"{grid['runs']} / {grid['seconds']:.3g}" if grid else "-"])
    lines.append(markdown_table(headers, rows))
    bad = [r for r in res["runs"] if r["status"] != "ok"]
    if bad:
        lines += ["", "Runs not ok: " + "; ".join(f"{r['method']} seed {r['seed']} {r['status']}: {r['reason']}"
                                                for r in bad)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results[/quick])")
    ap.add_argument("--quick", action="store_true", help="smoke-test size: fewer epochs and smaller grids")
    ap.add_argument("--problems", default=",".join(PROBLEMS), help=f"comma-separated subset of {','.join(PROBLEMS)}")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per run (default 20; --quick 4)")
    ap.add_argument("--batch", type=int, default=128, help="minibatch size (default 128)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    names = [p for p in args.problems.split(",") if p]
    for p in names:
        if p not in PROBLEMS:
            ap.error(f"--problems: unknown problem {p!r} (choose from {', '.join(PROBLEMS)})")
    epochs = args.epochs if args.epochs is not None else (4 if args.quick else 20)
    if args.seeds < 1 or epochs < 1 or args.batch < 1:
        ap.error("--seeds, --epochs and --batch must be >= 1")
    torch.set_num_threads(args.threads)
    out = args.out or (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)
    t0 = time.perf_counter()
    problems = {name: bench_problem(name, args.seeds, args.quick, epochs, args.batch) for name in names}
    per = {name: check_problem(res) for name, res in problems.items()}
    checks = {"per_problem": per, "pass": all(c["pass"] for c in per.values())}
    info = machine_info("cpu")
    runtime = time.perf_counter() - t0
    payload = {"machine": info, "torch_version": torch.__version__, "date": info["date"],
               "settings": {"quick": args.quick, "seeds": args.seeds, "epochs": epochs, "batch": args.batch,
                            "threads": args.threads, "problems": names},
               "problems": problems, "checks": checks, "runtime_s": runtime}
    md = markdown_header("Minibatch training: AutoMrGD (defaults) vs tuned SGD-momentum and Adam (CPU)", info)
    md += (f"\n{'QUICK grids (--quick). ' if args.quick else ''}{epochs} epochs, batch {args.batch}, torch threads "
           f"{args.threads}, {args.seeds} seeds, medians; times exclude the per-epoch full-batch loss and include "
           f"AutoMrGD's construction and every curvature measurement. Total runtime {runtime:.0f} s.\n\n"
           "## Target check\n\n")
    for name, c in per.items():
        md += "".join(f"- {name}: **{'PASS' if i['pass'] else 'FAIL'}** {i['what']} ({i['detail']})\n"
                      for i in c["items"])
    md += f"- **overall: {'PASS' if checks['pass'] else 'FAIL'}**\n\n"
    md += "\n".join(problem_markdown(n, r) for n, r in problems.items())
    for name, res in problems.items():
        s = res["summary"]
        print(f"{name}: " + "; ".join(f"{m} {s[m]['ok']}/{s[m]['runs']} final {s[m]['final_loss']:.4g} "
                                      f"to target {_f(s[m]['target_s'])} s" for m in METHODS), flush=True)
    print("wrote", *write_results("minibatch_cpu", payload, md, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
