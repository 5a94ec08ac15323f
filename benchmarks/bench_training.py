"""Training suite: AutoMrGD (defaults, untuned) against tuned GD, heavy ball, Adam and L-BFGS, full batch, CPU.

Problems (``--problems``, default all; every feature RAW, not standardised; a fixed 75/25 train/test split by a
permutation with seed 0; the loss is the full-batch training loss):

* ``ls_diabetes``: least squares on scikit-learn's diabetes data (442 x 10), linear model with bias, float64,
  loss mean (x w + b - y)^2 / 2; f* from a float64 least-squares solve.
* ``logreg_cancer``: binary logistic regression on the breast-cancer features (569 x 30), float64, mean BCE
  + 1e-4 |w|^2 / 2 (weights only); f* from Newton's method.
* ``softmax_digits``: softmax regression on the digits pixels 0..16 (64 -> 10), float64, mean cross-entropy +
  1e-4 |W|^2 / 2; f* from Newton's method.
* ``mlp_diabetes``: MLP 10-64-64-1 (tanh) on diabetes, float32, mean squared error / 2 of the raw target.
* ``mlp_wine``: MLP 13-64-64-3 (tanh) on the wine features, float32, cross-entropy.
* ``mlp_multiscale``: MLP 64-64-64-10 (tanh) on ``multiscale_classification`` (data scales 1, 0.1, 0.01), float32.
* ``cnn_digits``: a small CNN (two 3x3 convolutions, tanh, a linear layer; 3,818 parameters) on the raw 8 x 8
  digits, float32, cross-entropy.
* ``mlp_paper_digits`` (not in the default set: ~30 ms per gradient on one CPU thread): the paper's MLP
  64-1024-128-10 (ReLU; 199,050 parameters) on the raw digits, float32, cross-entropy, run for 700 steps as in
  the paper's experiments: ``--problems mlp_paper_digits --budget 3000,700 --results-name training_paper_cpu``.

Every run starts from the model's default initialisation under seed s (s = 0, 1, 2) and takes a fixed budget of
optimizer steps. Methods:

* ``gd`` (``torch.optim.SGD``), ``heavy_ball`` (momentum 0.9) and ``adam``, each tuned on a log grid of rates on
  seed 0 (GD and heavy ball: ``(1 / L0) * 10^(j/2)``, L0 the top Hessian eigenvalue at the seed-0
  initialisation; Adam: 1e-4 .. 1); the best rate (lowest final loss) then runs on all three seeds. The grid's
  cost (gradient evaluations and seconds of all its runs) is reported beside the tuned method;
* ``lbfgs``: ``torch.optim.LBFGS(lr=1, history_size=20, line_search_fn="strong_wolfe")``, one iteration per
  ``step``, budgeted in gradient evaluations like the others;
* ``auto_temporal`` / ``auto_subspace`` / ``auto_subspace_plain``: ``mrgd_ext.AutoMrGD`` with default arguments
  except ``mode`` (and ``acceleration=None`` for the plain subspace step, to measure what momentum adds), with a
  ``HessianOperator`` of the full-batch training loss; ``auto_subspace_ggn``: the default subspace mode planned on
  the ``GGNOperator`` of the data loss instead (positive semi-definite; the small L2 term left out). Never tuned
  per problem.

Counted per run: gradient evaluations (closure calls), Hessian-vector products and seconds of AutoMrGD's
curvature estimation, wall seconds (construction included: AutoMrGD measures there), evaluations / seconds to
(i) tuned GD's final loss (median over seeds) and (ii) a relative gap (f - f*) / f* <= 1e-6 where f* is known,
the final loss and the test metric (accuracy, or test mean squared error for regression). Reported: medians
over the 3 seeds. A baseline stops when its loss is not finite or above 1e3 times the initial loss
(``diverged``); an AutoMrGD run (which watches and rolls back its own loss) is judged at its end: ``diverged``
if its final loss is above 1e3 times the initial one, ``failed`` with its message if it raised. Runs with f*
stop at a gap 1e-9.

The target check judges ``auto_subspace`` (AutoMrGD with every argument at its default): it never raises or
diverges; convex problems reach a gap 1e-6 in at most L-BFGS's time and tuned GD's final loss in at most 0.2x
GD's; networks reach tuned GD's final loss in at most 0.5x GD's and 1.0x heavy ball's time with a test metric
within one standard deviation of tuned Adam's; its curvature estimation takes at most 10% of its wall time.
The other AutoMrGD variants get the same checks, reported beside the verdict.

Writes ``OUT/NAME.json`` and ``OUT/NAME.md`` (OUT: benchmarks/results, or benchmarks/results/quick with
``--quick``, which uses smaller budgets and grids; NAME: ``--results-name``, default training_cpu).

    python benchmarks/bench_training.py [--out DIR] [--quick] [--problems a,b] [--seeds N] [--threads N]
                                        [--budget CONVEX,MLP] [--results-name NAME]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mrgd_ext
from _common import (
    RESULTS_DIR,
    machine_info,
    markdown_header,
    markdown_table,
    write_results,
)
from mrgd_ext.experiments import data

PROBLEMS = ("ls_diabetes", "logreg_cancer", "softmax_digits", "mlp_diabetes", "mlp_wine", "mlp_multiscale",
            "cnn_digits")
EXTRA_PROBLEMS = ("mlp_paper_digits",)  # selectable with --problems, not run by default
CONVEX = ("ls_diabetes", "logreg_cancer", "softmax_digits")
METHODS = ("gd", "heavy_ball", "adam", "lbfgs", "auto_temporal", "auto_subspace", "auto_subspace_plain",
           "auto_subspace_ggn")
AUTO_METHODS = ("auto_temporal", "auto_subspace", "auto_subspace_plain", "auto_subspace_ggn")
#: AutoMrGD with default arguments: the method the targets judge (the others are variants, reported beside it).
DEFAULT_METHOD = "auto_subspace"
#: Largest share of wall time the curvature estimation may take (the issue's target).
ESTIMATION_SHARE = 0.10
#: AutoMrGD's arguments per method: defaults except these (never tuned per problem).
AUTO_ARGUMENTS: dict[str, dict[str, Any]] = {
    "auto_temporal": {"mode": "temporal"},
    "auto_subspace": {"mode": "subspace"},
    "auto_subspace_plain": {"mode": "subspace", "acceleration": None},
    "auto_subspace_ggn": {"mode": "subspace"},
}
TUNED = ("gd", "heavy_ball", "adam")
TOP_KEYS = ("machine", "torch_version", "date", "settings", "problems", "checks", "runtime_s")
RUN_KEYS = ("method", "setting", "seed", "status", "reason", "grad_evals", "hvps", "estimation_s", "wall_s",
            "final_loss", "test_metric", "to_target", "to_gap", "backoffs")
GAP = 1e-6
STOP_GAP = 1e-9
DIVERGENCE_FACTOR = 1e3
L2 = 1e-4
GD_EXPONENTS = (0.5, 0.0, -0.5, -1.0, -1.5)  # lr = (1 / L0) * 10^j: from past 2/L0 down
HB_EXPONENTS = (0.0, -0.5, -1.0, -1.5)
ADAM_LRS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
BUDGET = {"convex": 3000, "mlp": 1500}
QUICK_BUDGET = {"convex": 300, "mlp": 150}
MAX_CURVE_POINTS = 200


# --------------------------------------------------------------------------------------------------------
# Data



def _finite_median(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def _finite_pstdev(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.pstdev(finite) if finite else math.nan

def load_digits_raw() -> tuple[torch.Tensor, torch.Tensor, str]:
    """Raw digits (pixel values 0..16) from the package's loader."""
    x, y = data.load_digits(standardize=False)
    return x.to(torch.float32), y.long(), "mrgd_ext.experiments.data.load_digits(standardize=False)"


def load_breast_cancer_raw() -> tuple[torch.Tensor, torch.Tensor, str]:
    x, y = data.load_breast_cancer(standardize=False, dtype=torch.float64)
    return x, y.long(), "mrgd_ext.experiments.data.load_breast_cancer(standardize=False)"


def load_multiscale(
    num_samples: int, dims, scales, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, str]:
    x, y, _ = data.multiscale_classification(num_samples, dims, scales, num_classes, seed=seed)
    return x.to(torch.float32), y.long(), "mrgd_ext.experiments.data.multiscale_classification"


# --------------------------------------------------------------------------------------------------------
# Problems


def load_diabetes_raw() -> tuple[torch.Tensor, torch.Tensor, str]:
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True, scaled=False)
    return (torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64),
            "sklearn load_diabetes(scaled=False)")


def load_wine_raw() -> tuple[torch.Tensor, torch.Tensor, str]:
    from mrgd_ext.experiments.data import load_wine

    x, y = load_wine(standardize=False, dtype=torch.float64)
    return x, y.long(), "mrgd_ext.experiments.data.load_wine(standardize=False)"


@dataclass
class Problem:
    """One suite problem: data, a model factory, the full-batch loss, the test metric and f* (if known)."""

    name: str
    description: str
    kind: str  # "convex" or "mlp"
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    make_model: Callable[[], nn.Module]
    data_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric_name: str
    l2: float = 0.0
    fstar: float | None = None
    info: dict = field(default_factory=dict)

    def loss_of(self, model: nn.Module, plist: list[torch.Tensor] | None = None) -> torch.Tensor:
        params = dict(model.named_parameters())
        if plist is not None:
            params = dict(zip(params, plist))
        out = torch.func.functional_call(model, params, (self.x_train,))
        loss = self.data_loss(out, self.y_train)
        if self.l2:
            loss = loss + 0.5 * self.l2 * sum((v * v).sum() for k, v in params.items() if k.endswith("weight"))
        return loss

    def metric(self, model: nn.Module) -> float:
        with torch.no_grad():
            out = model(self.x_test)
        if self.metric_name == "test acc":
            pred = (out.squeeze(-1) > 0).long() if out.shape[-1] == 1 else out.argmax(-1)
            return float((pred == self.y_test).double().mean())
        return float(((out.squeeze(-1) - self.y_test) ** 2).mean())


def _split(x: torch.Tensor, y: torch.Tensor):
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    k = (3 * x.shape[0]) // 4
    return x[idx[:k]], y[idx[:k]], x[idx[k:]], y[idx[k:]]


def _mse(out, y):
    return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()


def _bce(out, y):
    return nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1), y.to(out.dtype))


def _ce(out, y):
    return nn.functional.cross_entropy(out, y)


def _mlp(d_in: int, d_out: int, width: int = 64) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                 nn.Linear(width, d_out))


def _paper_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 128), nn.ReLU(), nn.Linear(128, 10))


def _cnn() -> nn.Module:
    """Small CNN on 8 x 8 digit images given as flat rows: conv 1->8 (3x3), conv 8->16 (3x3, stride 2), linear."""
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(256, 10))


def _newton_fstar(prob: Problem) -> float:
    """f* of a strictly convex problem by Newton's method with Armijo backtracking, in float64."""
    model = prob.make_model()
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.zeros(sum(sizes), dtype=torch.float64)

    def f(th):
        return prob.loss_of(model, [t.reshape(s) for t, s in zip(th.split(sizes), shapes)])

    for _ in range(100):
        g = torch.func.grad(f)(theta)
        if float(g.norm()) < 1e-13:
            break
        step = torch.linalg.solve(torch.func.hessian(f)(theta), g)
        t, f0 = 1.0, float(f(theta))
        while float(f(theta - t * step)) > f0 - 1e-4 * t * float(g @ step) and t > 1e-12:
            t *= 0.5
        theta = theta - t * step
    hess = torch.linalg.eigvalsh(torch.func.hessian(f)(theta))
    prob.info.update({"grad_norm_at_opt": float(torch.func.grad(f)(theta).norm()), "L_star": float(hess[-1]),
                      "cond_star": float(hess[-1] / hess[0])})
    return float(f(theta))


def make_problem(name: str) -> Problem:
    if name in ("ls_diabetes", "mlp_diabetes"):
        x, y, src = load_diabetes_raw()
        xtr, ytr, xte, yte = _split(x, y)
        if name == "ls_diabetes":
            prob = Problem(name, f"least squares, raw diabetes ({src}), linear 10 -> 1, float64", "convex",
                           xtr, ytr, xte, yte, lambda: nn.Linear(10, 1).double(), _mse, "test mse")
            prob.fstar = _newton_fstar(prob)
            return prob
        return Problem(name, f"MLP 10-64-64-1 tanh, raw diabetes ({src}), float32, mse/2", "mlp",
                       xtr.float(), ytr.float(), xte.float(), yte.float(), _mlp(10, 1), _mse, "test mse")
    if name == "logreg_cancer":
        x, y, src = load_breast_cancer_raw()
        xtr, ytr, xte, yte = _split(x.double(), y)
        prob = Problem(name, f"logistic regression, raw breast cancer ({src}), float64, BCE + {L2:g}|w|^2/2",
                       "convex", xtr, ytr, xte, yte, lambda: nn.Linear(30, 1).double(), _bce, "test acc", l2=L2)
        prob.fstar = _newton_fstar(prob)
        return prob
    if name == "softmax_digits":
        x, y, src = load_digits_raw()
        xtr, ytr, xte, yte = _split(x.double(), y)
        prob = Problem(name, f"softmax regression, raw digits ({src}), float64, CE + {L2:g}|W|^2/2", "convex",
                       xtr, ytr, xte, yte, lambda: nn.Linear(64, 10).double(), _ce, "test acc", l2=L2)
        prob.fstar = _newton_fstar(prob)
        return prob
    if name == "mlp_wine":
        x, y, src = load_wine_raw()
        xtr, ytr, xte, yte = _split(x.float(), y)
        return Problem(name, f"MLP 13-64-64-3 tanh, raw wine ({src}), float32, CE", "mlp", xtr, ytr, xte, yte,
                       _mlp(13, 3), _ce, "test acc")
    if name == "mlp_multiscale":
        x, y, src = load_multiscale(2000, (16, 16, 32), (1.0, 0.1, 0.01), 10, 0)
        xtr, ytr, xte, yte = _split(x, y)
        return Problem(name, f"MLP 64-64-64-10 tanh, multiscale_classification data scales 1/0.1/0.01 ({src})",
                       "mlp", xtr, ytr, xte, yte, _mlp(64, 10), _ce, "test acc")
    if name == "cnn_digits":
        x, y, src = load_digits_raw()
        xtr, ytr, xte, yte = _split(x.float(), y)
        return Problem(name, f"CNN conv(1->8, 3x3)-conv(8->16, 3x3, stride 2)-linear(256->10) tanh, raw digits "
                       f"({src}), float32, CE", "mlp", xtr, ytr, xte, yte, _cnn, _ce, "test acc")
    if name == "mlp_paper_digits":
        x, y, src = load_digits_raw()
        xtr, ytr, xte, yte = _split(x.float(), y)
        return Problem(name, f"MLP 64-1024-128-10 ReLU (the paper's), raw digits ({src}), float32, CE", "mlp",
                       xtr, ytr, xte, yte, _paper_mlp, _ce, "test acc")
    raise ValueError(f"unknown problem {name!r}")


def model_for(prob: Problem, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return prob.make_model()


def top_eigenvalue(prob: Problem, model: nn.Module) -> float:
    params = list(model.parameters())
    op = mrgd_ext.HessianOperator.from_closure(lambda pl: prob.loss_of(model, pl), params)
    return float(mrgd_ext.curvature.lanczos(op, 1, tol=1e-4).eigenvalues[0])


# --------------------------------------------------------------------------------------------------------
# Runs


@dataclass
class Run:
    method: str
    setting: str
    seed: int
    status: str = "ok"
    reason: str = ""
    evals: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    hvps: int = 0
    estimation_s: float = 0.0
    backoffs: int = 0
    test_metric: float = float("nan")
    events: list[dict] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")

    def first_reach(self, target: float) -> tuple[int | None, float | None]:
        for e, t, loss in zip(self.evals, self.times, self.losses):
            if math.isfinite(loss) and loss <= target:
                return e, t
        return None, None


def build_optimizer(method: str, lr: float | None, params: list[torch.Tensor], prob: Problem, model: nn.Module):
    if method == "gd":
        return torch.optim.SGD(params, lr=lr)
    if method == "heavy_ball":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if method == "adam":
        return torch.optim.Adam(params, lr=lr)
    if method == "lbfgs":
        return torch.optim.LBFGS(params, lr=1.0, max_iter=1, history_size=20, line_search_fn="strong_wolfe")
    if method == "auto_subspace_ggn":
        # The Gauss-Newton matrix of the data loss (positive semi-definite; without the small L2 term).
        op = mrgd_ext.GGNOperator(model, prob.data_loss, (prob.x_train, prob.y_train), params=params)
    else:
        op = mrgd_ext.HessianOperator.from_closure(lambda pl: prob.loss_of(model, pl), params)
    return mrgd_ext.AutoMrGD(params, op, **AUTO_ARGUMENTS[method])


def run_one(prob: Problem, method: str, lr: float | None, seed: int, budget: int) -> Run:
    """One run of ``budget`` gradient evaluations (closure calls) from seed ``seed``'s initialisation."""
    model = model_for(prob, seed)
    params = list(model.parameters())
    run = Run(method, "defaults" if lr is None else f"lr={lr:.3g}", seed)
    box: list[Any] = []
    count = [0]

    def closure():
        box[0].zero_grad(set_to_none=True)
        loss = prob.loss_of(model)
        loss.backward()
        count[0] += 1
        return loss

    stop = None if prob.fstar is None else prob.fstar * (1 + STOP_GAP)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t0 = time.perf_counter()
        try:
            opt = build_optimizer(method, lr, params, prob, model)
        except (RuntimeError, ValueError) as exc:
            run.status, run.reason = "failed", f"construction: {type(exc).__name__}: {exc}"
            return run
        box.append(opt)
        with torch.no_grad():
            loss0 = float(prob.loss_of(model))
        run.evals.append(0), run.times.append(time.perf_counter() - t0), run.losses.append(loss0)
        while count[0] < budget:
            try:
                opt.step(closure)
            except RuntimeError as exc:
                run.status, run.reason = "failed", str(exc)
                break
            with torch.no_grad():
                value = float(prob.loss_of(model))  # the loss at the new iterate (counted as part of the step)
            run.evals.append(count[0]), run.times.append(time.perf_counter() - t0), run.losses.append(value)
            # AutoMrGD watches its own loss (a cycle may rise inside and is rolled back at its end): judged at the
            # end of the run only; a baseline is stopped at the first sign of divergence.
            watched = method in AUTO_METHODS and math.isfinite(value)
            if not watched and (not math.isfinite(value) or value > DIVERGENCE_FACTOR * max(loss0, 1e-12)):
                run.status, run.reason = "diverged", f"loss {value:.3g} after {count[0]} gradient evaluations"
                break
            if stop is not None and value <= stop:
                break
    if run.status == "ok" and run.final_loss > DIVERGENCE_FACTOR * max(loss0, 1e-12):
        run.status, run.reason = "diverged", f"final loss {run.final_loss:.3g}, with no error from the optimizer"
    run.test_metric = prob.metric(model)
    if isinstance(opt, mrgd_ext.AutoMrGD):
        run.hvps = int(opt.estimation_hvps)
        run.estimation_s = float(opt.estimation_seconds)
        run.backoffs = sum(e["kind"] == "backoff" for e in opt.events)
        run.events = [{k: e.get(k) for k in ("step", "kind", "reason", "num_hvps", "seconds", "groups",
                                              "cycle_length", "density_reused")} for e in opt.events]
    return run


def _subsample(n: int, k: int = MAX_CURVE_POINTS) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({int(round(i * (n - 1) / (k - 1))) for i in range(k)})


def payload_of(run: Run, target: float | None, fstar: float | None) -> dict:
    idx = _subsample(len(run.losses))
    to_target = run.first_reach(target) if target is not None else (None, None)
    to_gap = run.first_reach(fstar * (1 + GAP)) if fstar is not None else (None, None)
    return {
        "method": run.method, "setting": run.setting, "seed": run.seed, "status": run.status, "reason": run.reason,
        "grad_evals": run.evals[-1] if run.evals else 0, "hvps": run.hvps, "estimation_s": run.estimation_s,
        "wall_s": run.times[-1] if run.times else 0.0, "final_loss": run.final_loss,
        "test_metric": run.test_metric, "to_target": {"evals": to_target[0], "s": to_target[1]},
        "to_gap": {"evals": to_gap[0], "s": to_gap[1]}, "backoffs": run.backoffs, "events": run.events,
        "curve": {"evals": [run.evals[i] for i in idx], "time_s": [run.times[i] for i in idx],
                  "loss": [run.losses[i] for i in idx]},
    }


def _median(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    # A quantity a run never reached counts as infinite: the median is finite only if most seeds reached it.
    if len(vals) * 2 <= len(values):
        return None
    vals = vals + [math.inf] * (len(values) - len(vals))
    m = statistics.median(vals)
    return None if math.isinf(m) else m


def bench_problem(name: str, seeds: int, quick: bool, budgets: dict[str, int]) -> dict:
    t_start = time.perf_counter()
    prob = make_problem(name)
    budget = budgets[prob.kind]
    L0 = top_eigenvalue(prob, model_for(prob, 0))
    grids = {
        "gd": [10 ** j / L0 for j in (GD_EXPONENTS[1:4] if quick else GD_EXPONENTS)],
        "heavy_ball": [10 ** j / L0 for j in (HB_EXPONENTS[:2] if quick else HB_EXPONENTS)],
        "adam": list(ADAM_LRS[1:4] if quick else ADAM_LRS),
    }
    runs: list[Run] = []
    grid_cost: dict[str, dict] = {}
    tuned: dict[str, float] = {}
    for method, lrs in grids.items():
        trial = [run_one(prob, method, lr, 0, budget) for lr in lrs]
        grid_cost[method] = {"runs": len(trial), "grad_evals": sum(r.evals[-1] for r in trial if r.evals),
                             "seconds": sum(r.times[-1] for r in trial if r.times)}
        ok = [(r.final_loss, lr, r) for lr, r in zip(lrs, trial) if r.status == "ok"]
        best_lr = min(ok, key=lambda t: t[0])[1] if ok else lrs[-1]
        tuned[method] = best_lr
        runs.append(next(r for lr, r in zip(lrs, trial) if lr == best_lr))
        runs += [run_one(prob, method, best_lr, s, budget) for s in range(1, seeds)]
    for method in ("lbfgs", *AUTO_METHODS):
        runs += [run_one(prob, method, None, s, budget) for s in range(seeds)]
    gd_finals = [r.final_loss for r in runs if r.method == "gd"]
    target = statistics.median(gd_finals)
    payload_runs = [payload_of(r, target, prob.fstar) for r in runs]
    summary = {}
    for method in METHODS:
        rs = [p for p in payload_runs if p["method"] == method]
        metrics = [p["test_metric"] for p in rs]
        summary[method] = {
            "setting": rs[0]["setting"] if rs else None,
            "ok": sum(p["status"] == "ok" for p in rs), "runs": len(rs),
            "statuses": sorted({p["status"] for p in rs}),
            "final_loss": statistics.median([p["final_loss"] for p in rs]),
            # A diverged run's metric is not finite: the median and spread are over the finite ones.
            "test_metric": _finite_median(metrics), "test_metric_std": _finite_pstdev(metrics),
            "grad_evals": statistics.median([p["grad_evals"] for p in rs]),
            "wall_s": statistics.median([p["wall_s"] for p in rs]),
            "hvps": statistics.median([p["hvps"] for p in rs]),
            "estimation_s": statistics.median([p["estimation_s"] for p in rs]),
            "estimation_share": statistics.median([p["estimation_s"] / p["wall_s"] if p["wall_s"] else 0.0
                                                   for p in rs]),
            "backoffs": statistics.median([p["backoffs"] for p in rs]),
            "target_evals": _median([p["to_target"]["evals"] for p in rs]),
            "target_s": _median([p["to_target"]["s"] for p in rs]),
            "gap_evals": _median([p["to_gap"]["evals"] for p in rs]),
            "gap_s": _median([p["to_gap"]["s"] for p in rs]),
            "grid": grid_cost.get(method),
        }
    return {"description": prob.description, "kind": prob.kind, "budget_grad_evals": budget, "L0": L0,
            "fstar": prob.fstar, "info": prob.info, "target_loss": target, "tuned_lrs": tuned,
            "metric": prob.metric_name, "summary": summary, "runs": payload_runs,
            "seconds": time.perf_counter() - t_start}


# --------------------------------------------------------------------------------------------------------
# Targets


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None:
        return None
    if b is None:
        return 0.0  # the baseline never got there: any time of ours is better
    return a / b if b > 0 else None


def _method_items(res: dict, m: str) -> list[dict]:
    """The issue's targets for one AutoMrGD method on one problem."""
    s = res["summary"]
    a = s[m]
    items = [{"what": f"{m}: never raises or diverges", "pass": a["ok"] == a["runs"],
              "detail": f"{a['ok']}/{a['runs']} ok"}]
    if res["kind"] == "convex":
        r1 = _ratio(a["gap_s"], s["lbfgs"]["gap_s"])
        items.append({"what": f"{m}: time to gap 1e-6 <= 1.0x L-BFGS", "pass": r1 is not None and r1 <= 1.0,
                      "detail": f"{a['gap_s']} s vs L-BFGS {s['lbfgs']['gap_s']} s (ratio {r1})"})
        r2 = _ratio(a["target_s"], s["gd"]["target_s"])
        items.append({"what": f"{m}: time to tuned GD's final loss <= 0.2x GD",
                      "pass": r2 is not None and r2 <= 0.2,
                      "detail": f"{a['target_s']} s vs GD {s['gd']['target_s']} s (ratio {r2})"})
    else:
        r1 = _ratio(a["target_s"], s["gd"]["target_s"])
        r2 = _ratio(a["target_s"], s["heavy_ball"]["target_s"])
        items.append({"what": f"{m}: time to tuned GD's final loss <= 0.5x GD and <= 1.0x heavy ball",
                      "pass": r1 is not None and r1 <= 0.5 and r2 is not None and r2 <= 1.0,
                      "detail": f"{a['target_s']} s vs GD {s['gd']['target_s']} s (ratio {r1}), "
                                f"heavy ball {s['heavy_ball']['target_s']} s (ratio {r2})"})
        better_high = res["metric"] == "test acc"
        ad, sd = s["adam"]["test_metric"], s["adam"]["test_metric_std"]
        ok = a["test_metric"] >= ad - sd if better_high else a["test_metric"] <= ad + sd
        items.append({"what": f"{m}: {res['metric']} within one std of tuned Adam", "pass": bool(ok),
                      "detail": f"{a['test_metric']:.4g} vs Adam {ad:.4g} +- {sd:.2g}"})
    share = a["estimation_share"]
    items.append({"what": f"{m}: curvature estimation <= {ESTIMATION_SHARE:.0%} of wall time",
                  "pass": share <= ESTIMATION_SHARE,
                  "detail": f"{a['estimation_s']:.3g} s of {a['wall_s']:.3g} s ({share:.1%})"})
    return items


def check_problem(name: str, res: dict) -> dict:
    """The targets judge AutoMrGD with its defaults (``DEFAULT_METHOD``); the other AutoMrGD variants are checked
    the same way and reported beside them, outside the verdict."""
    items = _method_items(res, DEFAULT_METHOD)
    variants = [i for m in AUTO_METHODS if m != DEFAULT_METHOD for i in _method_items(res, m)]
    return {"items": items, "variants": variants, "pass": all(i["pass"] for i in items)}


# --------------------------------------------------------------------------------------------------------
# Report


def _f(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def problem_markdown(name: str, res: dict) -> str:
    lines = [f"## {name}: {res['description']}", ""]
    fs = f"f* = {res['fstar']:.10g}; " if res["fstar"] is not None else ""
    lines.append(f"{fs}budget {res['budget_grad_evals']} gradient evaluations; L0 (top Hessian eigenvalue at the "
                 f"seed-0 initialisation) = {res['L0']:.4g}; target (i) = tuned GD's median final loss "
                 f"{res['target_loss']:.6g}; {res['seconds']:.0f} s for the whole problem.")
    lines.append("")
    headers = ["method", "setting (seed 0 grid)", "ok", "evals to (i)", "s to (i)", "evals to gap 1e-6",
               "s to gap 1e-6", "final loss", res["metric"], "evals", "wall s", "HVPs", "estimation s (share)",
               "back-offs", "grid cost (runs / evals / s)"]
    rows = []
    for m in METHODS:
        a = res["summary"][m]
        grid = a["grid"]
        rows.append([m, a["setting"], f"{a['ok']}/{a['runs']}", _f(a["target_evals"]), _f(a["target_s"]),
                     _f(a["gap_evals"]), _f(a["gap_s"]), _f(a["final_loss"], 4),
                     f"{a['test_metric']:.4g} +- {a['test_metric_std']:.2g}", _f(a["grad_evals"]), _f(a["wall_s"]),
                     _f(a["hvps"]), f"{a['estimation_s']:.3g} ({100 * a['estimation_share']:.0f}%)",
                     _f(a["backoffs"]),
                     f"{grid['runs']} / {grid['grad_evals']} / {grid['seconds']:.3g}" if grid else "-"])
    lines.append(markdown_table(headers, rows))
    failed = [r for r in res["runs"] if r["status"] != "ok"]
    if failed:
        lines.append("")
        lines.append("Runs not ok: " + "; ".join(f"{r['method']} seed {r['seed']} {r['status']}: {r['reason']}"
                                                 for r in failed))
    return "\n".join(lines) + "\n"


def checks_markdown(checks: dict) -> str:
    lines = ["## Target check", "", f"AutoMrGD with its defaults ({DEFAULT_METHOD}) against the targets:", ""]
    for name, c in checks["per_problem"].items():
        for item in c["items"]:
            lines.append(f"- {name}: **{'PASS' if item['pass'] else 'FAIL'}** {item['what']} ({item['detail']})")
    lines.append(f"- **overall: {'PASS' if checks['pass'] else 'FAIL'}**")
    lines += ["", "The other AutoMrGD variants, the same checks (not part of the verdict):", ""]
    for name, c in checks["per_problem"].items():
        for item in c.get("variants", []):
            lines.append(f"- {name}: {'pass' if item['pass'] else 'fail'}: {item['what']} ({item['detail']})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results[/quick])")
    ap.add_argument("--quick", action="store_true", help="smoke-test size: small budgets and grids")
    ap.add_argument("--problems", default=",".join(PROBLEMS),
                    help=f"comma-separated subset of {','.join(PROBLEMS + EXTRA_PROBLEMS)} (default: all but "
                         f"{','.join(EXTRA_PROBLEMS)})")
    ap.add_argument("--results-name", default="training_cpu", help="stem of the result files (default training_cpu)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--budget", default=None,
                    help="gradient evaluations per run as CONVEX,MLP (default 3000,1500; --quick 300,150)")
    args = ap.parse_args(argv)
    budgets = dict(QUICK_BUDGET if args.quick else BUDGET)
    if args.budget:
        try:
            convex, mlp = (int(v) for v in args.budget.split(","))
        except ValueError:
            ap.error(f"--budget must be two integers CONVEX,MLP, got {args.budget!r}")
        if convex < 1 or mlp < 1:
            ap.error("--budget values must be >= 1")
        budgets = {"convex": convex, "mlp": mlp}
    names = [p for p in args.problems.split(",") if p]
    for p in names:
        if p not in PROBLEMS + EXTRA_PROBLEMS:
            ap.error(f"--problems: unknown problem {p!r} (choose from {', '.join(PROBLEMS + EXTRA_PROBLEMS)})")
    if not args.results_name.replace("_", "").replace("-", "").isalnum():
        ap.error(f"--results-name must be letters, digits, '_' or '-', got {args.results_name!r}")
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    torch.set_num_threads(args.threads)
    out = args.out or (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)
    t0 = time.perf_counter()
    problems = {}
    for name in names:
        problems[name] = bench_problem(name, args.seeds, args.quick, budgets)
        s = problems[name]["summary"]
        print(f"{name}: " + "; ".join(f"{m} {s[m]['ok']}/{s[m]['runs']} final {s[m]['final_loss']:.4g} "
                                      f"to(i) {_f(s[m]['target_s'])} s gap {_f(s[m]['gap_s'])} s" for m in METHODS),
              flush=True)
    per = {name: check_problem(name, res) for name, res in problems.items()}
    checks = {"per_problem": per, "pass": all(c["pass"] for c in per.values())}
    info = machine_info("cpu")
    runtime = time.perf_counter() - t0
    payload = {"machine": info, "torch_version": torch.__version__, "date": info["date"],
               "settings": {"quick": args.quick, "seeds": args.seeds, "threads": args.threads,
                            "budget": budgets, "problems": names},
               "problems": problems, "checks": checks, "runtime_s": runtime}
    md = markdown_header("Training suite: AutoMrGD (defaults) vs tuned GD, heavy ball, Adam and L-BFGS (CPU)", info)
    md += (f"\n{'QUICK grids (--quick). ' if args.quick else ''}Budgets (gradient evaluations per run): "
           f"convex {budgets['convex']}, networks {budgets['mlp']}. torch threads {args.threads}; "
           f"{args.seeds} seeds, medians; wall time includes AutoMrGD's construction and every curvature "
           f"measurement. Total runtime {runtime:.0f} s.\n\n")
    md += checks_markdown(checks) + "\n"
    md += "\n".join(problem_markdown(n, r) for n, r in problems.items())
    paths = write_results(args.results_name, payload, md, out)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
