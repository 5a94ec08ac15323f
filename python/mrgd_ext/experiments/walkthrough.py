"""The whole story on one multiscale problem, measured end to end (``mrgd-ext reproduce blog``).

Each step feeds the next, and each is checked against what is known about the problem:

1. multiscale data (docs/design.md 1.1): a generator with data scales ``e_k``; the measured principal values of the
   data sit at ``e_k``;
2. the Hessian mirrors the data: for least squares it is ``X^T X / N``, so its groups sit at ``e_k^2``; the
   curvature estimate (SLQ + Lanczos on Hessian-vector products, never the dense matrix) finds them;
3. a multirate plan from the measured groups (the large rates far beyond ``2 / lambda_max``);
4. training to relative loss gap ``tol``: GD at its best constant rate and heavy ball with its optimal
   parameters (both given the exact extreme eigenvalues, the strongest form of each), against
   :class:`mrgd_ext.AutoMrGD` in temporal and subspace mode, which measure their own rates; iterations and
   wall time, measurement included.

:func:`blog` returns a JSON-serialisable dict; :func:`blog_markdown` renders it and :func:`blog_plot` draws
the loss gap against iterations.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mrgd_ext.curvature.estimate import estimate_curvature, plan_from_estimate
from mrgd_ext.curvature.hessian import HessianOperator
from mrgd_ext.experiments.data import multiscale_regression, principal_values
from mrgd_ext.experiments.problems import heavy_ball_params
from mrgd_ext.optim.auto import AutoMrGD

__all__ = ["blog", "blog_markdown", "blog_plot"]


def _loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.mean((out.squeeze(-1) - target) ** 2)


def _run(name: str, make: Callable[[list[torch.Tensor], torch.nn.Module], Any], X: torch.Tensor, y: torch.Tensor,
         loss_star: float, tol: float, max_iter: int, closure_step: bool) -> dict[str, Any]:
    model = torch.nn.Linear(X.shape[1], 1, bias=False, dtype=torch.float64)
    torch.nn.init.zeros_(model.weight)
    params: list[torch.Tensor] = list(model.parameters())
    start = time.perf_counter()
    opt = make(params, model)
    gap0 = None
    gaps: list[float] = []
    reached = None
    for k in range(max_iter + 1):
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = _loss_fn(model(X), y)
            loss.backward()
            return loss

        with torch.no_grad():
            loss_now = float(_loss_fn(model(X), y))
        gap = loss_now - loss_star
        gap0 = gap if gap0 is None else gap0
        gaps.append(gap / gap0)
        if not math.isfinite(gap):
            break
        if gap <= tol * gap0:
            reached = k
            break
        if k == max_iter:
            break
        if closure_step:
            opt.step(closure)
        else:
            closure()
            opt.step()
    wall = time.perf_counter() - start
    keep = sorted(set(range(0, len(gaps), max(1, len(gaps) // 200))) | {len(gaps) - 1})
    out = {"method": name, "iterations": reached, "wall_s": wall, "final_gap": gaps[-1],
           "curve_iterations": keep, "curve": [gaps[i] for i in keep]}
    if isinstance(opt, AutoMrGD):
        out["estimation_hvps"] = opt.estimation_hvps
        out["estimation_s"] = opt.estimation_seconds
        out["backoffs"] = sum(e["kind"] == "backoff" for e in opt.events)
    return out


def blog(
    *,
    num_samples: int = 4000,
    dims: tuple[int, ...] = (8, 16, 40),
    scales: tuple[float, ...] = (1.0, 0.1, 0.01),
    tol: float = 1e-6,
    max_iter: int = 20_000,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the walkthrough (module docstring). ``scales`` are data scales; the Hessian's are their squares."""
    say = progress or (lambda _msg: None)
    X, y, info = multiscale_regression(num_samples, dims, scales, noise=0.01, seed=seed, dtype=torch.float64)
    from mrgd_ext.experiments.figures import machine_info

    results: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               "machine": machine_info(),
                               "settings": {"num_samples": num_samples, "dims": list(dims), "scales": list(scales),
                                            "tol": tol, "max_iter": max_iter, "seed": seed}}

    # 1. The data are multiscale: principal values per block against the prescribed scales.
    pv = principal_values(X)
    bounds = np.cumsum([0, *dims])
    results["data"] = {
        "principal_values_by_block": [[float(pv[s:e].min()), float(pv[s:e].max())] for s, e in zip(bounds, bounds[1:])],
        "prescribed_scales": list(scales),
    }
    say("data")

    # 2. The Hessian mirrors the data; measured with HVPs only.
    model = torch.nn.Linear(X.shape[1], 1, bias=False, dtype=torch.float64)
    op = HessianOperator(model, _loss_fn, (X, y))
    est = estimate_curvature(op, num_eigs=8, density_probes=2, density_order=X.shape[1], max_groups=None)
    exact = np.linalg.eigvalsh((X.T @ X / num_samples).numpy())[::-1]
    results["hessian"] = {
        "measured_groups": [[g.a, g.b] for g in est.groups],
        "exact_groups": [[float(exact[s:e].min()), float(exact[s:e].max())] for s, e in zip(bounds, bounds[1:])],
        "hessian_scales": [float(e * e) for e in scales],
        "num_hvps": est.num_hvps,
        "seconds": est.seconds,
    }
    say("spectrum")

    # 3. The plan from the measured groups.
    plan = plan_from_estimate(est, strategy="auto", rate_rule="optimal")
    results["plan"] = {"strategy": plan.strategy, "rates": list(plan.rates), "cycle_length": plan.cycle_length,
                       "predicted_iterations": plan.predicted_iterations(tol),
                       "largest_rate_times_lambda_max": max(plan.cycle) * est.lambda_max, "text": str(plan)}
    say("plan")

    # 4. Training to relative loss gap tol.
    w_star = torch.linalg.lstsq(X, y.unsqueeze(-1)).solution.squeeze(-1)
    loss_star = float(_loss_fn(X @ w_star, y))
    lam_max, lam_min = float(exact[0]), float(exact[-1])
    hb_lr, hb_mom = heavy_ball_params(lam_min, lam_max)
    top_two = sum(dims[:2])

    def auto(mode: str, **kw: Any) -> Callable[[list[torch.Tensor], torch.nn.Module], Any]:
        def make(params: list[torch.Tensor], m: torch.nn.Module) -> AutoMrGD:
            probe = HessianOperator(m, _loss_fn, (X, y), params=params)
            return AutoMrGD(params, probe, mode=mode, density_order=X.shape[1], max_groups=None,
                            refresh_every=10**9, **kw)
        return make

    methods = [
        ("GD at 2/(lmin+lmax)", lambda p, m: torch.optim.SGD(p, lr=2.0 / (lam_min + lam_max)), False),
        ("heavy ball (optimal)", lambda p, m: torch.optim.SGD(p, lr=hb_lr, momentum=hb_mom), False),
        ("AutoMrGD temporal", auto("temporal", rate_rule="optimal", strategy="auto"), True),
        ("AutoMrGD subspace", auto("subspace", num_eigs=top_two, rate_rule="optimal"), True),
    ]
    runs = []
    for name, make, closure_step in methods:
        runs.append(_run(name, make, X, y, loss_star, tol, max_iter, closure_step))
        say(name)
    results["training"] = runs
    return results


def _fmt(v: Any) -> str:
    if v is None:
        return "not reached"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def blog_markdown(results: dict[str, Any]) -> str:
    """The walkthrough as a short markdown report."""
    s = results["settings"]
    lines = ["# Multiscale data, multiscale Hessian, multirate descent", ""]
    m = results.get("machine", {})
    if m:
        lines += [f"date: {results.get('date', '?')}; " + ", ".join(f"{k}: {v}" for k, v in m.items()), ""]
    lines.append(f"Least squares on {s['num_samples']} samples of a multiscale generator: blocks {s['dims']} at data "
                 f"scales {s['scales']} (Hessian scales {[round(e * e, 12) for e in s['scales']]}), random rotation.")
    lines += ["", "## 1. The data are multiscale", "", "| block | prescribed scale | principal values (min..max) |",
              "|---|---|---|"]
    for k, (lo_hi, e) in enumerate(zip(results["data"]["principal_values_by_block"], s["scales"])):
        lines.append(f"| {k} | {e:g} | {lo_hi[0]:.3g}..{lo_hi[1]:.3g} |")
    h = results["hessian"]
    lines += ["", "## 2. The Hessian mirrors the data (measured from Hessian-vector products)", "",
              "| group | measured [a, b] | exact [a, b] | data scale squared |", "|---|---|---|---|"]
    for k, (m, e, hs) in enumerate(zip(h["measured_groups"], h["exact_groups"], h["hessian_scales"])):
        lines.append(f"| {k} | [{m[0]:.3g}, {m[1]:.3g}] | [{e[0]:.3g}, {e[1]:.3g}] | {hs:.3g} |")
    if len(h["measured_groups"]) != len(h["exact_groups"]):
        lines.append(f"\n{len(h['measured_groups'])} groups measured for {len(h['exact_groups'])} blocks.")
    lines.append(f"\nCost: {h['num_hvps']} Hessian-vector products, {h['seconds']:.2f} s.")
    p = results["plan"]
    lines += ["", "## 3. The plan", "", f"Strategy {p['strategy']}, cycle of {p['cycle_length']} steps, predicted "
              f"{p['predicted_iterations']} iterations; the largest rate is {p['largest_rate_times_lambda_max']:.3g} / "
              "lambda_max (plain GD is stable only below 2 / lambda_max).", "", "```", p["text"], "```"]
    lines += ["", f"## 4. Training to relative loss gap {s['tol']:g}", "",
              "| method | iterations | wall s (measurement included) | measurement HVPs | back-offs |",
              "|---|---|---|---|---|"]
    for r in results["training"]:
        lines.append(f"| {r['method']} | {_fmt(r['iterations'])} | {r['wall_s']:.3f} | {r.get('estimation_hvps', '')} "
                     f"| {r.get('backoffs', '')} |")
    lines.append("\nGD and heavy ball are given the exact extreme eigenvalues; AutoMrGD measures everything itself.")
    return "\n".join(lines) + "\n"


def blog_plot(results: dict[str, Any], path: str | os.PathLike) -> None:
    """Relative loss gap against iterations, log scale (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results["training"]:
        curve = np.asarray(r["curve"], dtype=float)
        ax.semilogy(r["curve_iterations"], np.maximum(curve, 1e-300), label=r["method"])
    ax.axhline(results["settings"]["tol"], color="gray", lw=0.8, ls="--")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(left=0)
    ax.set_xlabel("iteration")
    ax.set_ylabel("relative loss gap")
    ax.set_title("Least squares on multiscale data")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
