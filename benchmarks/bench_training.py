"""Training benchmark: AutoMrGD (temporal and subspace) against GD, heavy ball and Adam, on the CPU.

Three problems (``--problems``, default all):

* ``digits``: scikit-learn's handwritten digits (bundled, no download) with the RAW pixel values 0..16 (not
  standardised: the principal values of raw data span several scales), a fixed 75/25 train/test split
  (random permutation with seed 0: 1347 train, 450 test samples).
* ``multiscale``: ``mrgd_ext.experiments.data.multiscale_classification`` (x = U [z0, 0.1 z1, 0.01 z2], d = 64 with
  blocks (16, 16, 32), a random rotation U, labels from a random linear teacher on the unscaled block
  coordinates, so that the 0.01-scale directions carry as much label information as the unit-scale ones),
  2000 samples, 10 classes, split 1500/500.
* ``logreg``: binary logistic regression on the RAW breast-cancer features (569 x 30, features from ~1e-3 to
  ~1e3), float64, loss = mean binary cross-entropy + 1e-4 * |w|^2 / 2 (weights only, not the bias: with the L2
  term the optimum is unique), all 569 samples (an optimisation benchmark: no test split).

MLP problems (float32): full-batch training of in_dim -> 1024 -> 128 -> 10 with ReLU and cross-entropy (the
paper's architecture with in_dim = 64; ``--quick``: 64 -> 64 -> 32 -> 10), the same initialisation (seed 0)
for every run, a fixed budget of 300 steps (``--steps``; chosen so that the default run fits in about ten
minutes on a 2-core machine: one step of the large MLP costs ~25 ms on one core, a Hessian-vector product on
the probe batch ~30 ms). Methods and settings (every run is reported, not only the best):

* ``gd``: ``torch.optim.SGD`` over 6 log-spaced rates ``(2 / lambda_0) * 10^j``, ``j`` in 1.5 .. -1 by
  0.5, where ``lambda_0`` is the top Hessian eigenvalue at the initialisation on the probe batch (block
  Lanczos, not counted in any run): from rates that diverge down to rates that are clearly too small;
* ``heavy_ball``: ``torch.optim.SGD(momentum=0.9)`` at ``(2 / lambda_0) * {1, 0.3, 0.1}``;
* ``adam``: ``torch.optim.Adam`` at 1e-3, 3e-3, 1e-2, 3e-2;
* ``mrgd_temporal`` and ``mrgd_subspace``: ``mrgd_ext.AutoMrGD`` with a ``HessianOperator`` on a fixed probe
  batch (the first 512 training samples), defaults except as listed in ``AUTO_MLP`` below: temporal with
  the defaults (rate rule safe, nested cycle, num_eigs 8) and with rate rule optimal + the planner's choice
  of cycle (strategy auto); subspace with group rates (safe and optimal, num_eigs 8) and with per-Ritz-value
  rates (num_eigs 16). Construction runs the first curvature measurement: it is counted in the wall time,
  as is every re-measurement.

A baseline run stops early when the loss is not finite or exceeds 10x the initial loss (status ``diverged``).
AutoMrGD runs are not stopped (the optimizer watches its loss itself); one that raises (too many back-offs) is
reported as ``failed`` with the error message, and one whose final loss is not finite or above 10x the initial
loss as ``diverged``, "with no error from the optimizer".

Logistic regression (float64): the optimum ``f*`` from a float64 Newton solve with backtracking line search
(gradient norm ~1e-14). Target: relative gap ``(f - f*) / f* <= 1e-6``. Every run starts at w = 0, b = 0 and
stops at the target or after the step budget; "not reached" runs report the best gap reached. Methods: GD at
``(1/L) * {0.5, 1, 1.9, 2, 4}`` (L = top eigenvalue of the Hessian at w = 0, which bounds the Hessian
everywhere since p (1 - p) <= 1/4), heavy ball with the optimal parameters of the quadratic model at w = 0
(``alpha = 4 / (sqrt L + sqrt mu)^2``, ``beta = ((sqrt k - 1) / (sqrt k + 1))^2``) and at 0.5x / 0.25x that
alpha, Adam at 1e-3 .. 10, and AutoMrGD (``AUTO_LOGREG``: num_eigs up to n = 31, floor 1e-13, max_groups None,
temporal safe/optimal/auto, subspace rates group and ritz). Step budget 10000 (``--logreg-steps``).

Wall time: ``time.perf_counter`` around each optimizer step (closure included) plus the optimizer's
construction; the test-accuracy evaluations at the record points are not counted. Each problem first runs an
untimed warm-up of every optimizer kind (a few steps, one small AutoMrGD construction). The machine is shared
and noisy, so the decisive pair of the target check (best GD rate, fastest MrGD setting) is re-run
``--repeats`` times in total, alternating, each run stopping at the target, and the check uses the medians.

Target check: "MrGD (auto or subspace) reaches the target loss in <= 0.5x the wall time of the best grid
learning rate for GD, estimation included, on both multiscale problems". The target loss of an MLP problem is
the final training loss of the best GD run (lowest final training loss over the grid) within the budget; the
time to target of a run is the wall time at the first iterate whose training loss is <= the target. The best
setting of each method is its lowest final training loss (logistic regression: fastest to the target, else the
smallest gap). Also reported: loss spikes (an iterate whose loss exceeds the previous one by more than 10%)
with their spacing, and final test accuracies of MrGD against GD and Adam.

Writes ``OUT/training_cpu.json`` (machine, settings, every run with its curves subsampled to <= 200 points),
``OUT/training_cpu.md`` and ``OUT/training_cpu_<problem>.png`` (loss against iteration and against wall time;
skipped without matplotlib). OUT defaults to benchmarks/results, and to benchmarks/results/quick with
``--quick`` so smoke-test numbers never overwrite the real ones.

    python benchmarks/bench_training.py [--out DIR] [--quick] [--problems digits,multiscale,logreg]
                                        [--steps N] [--logreg-steps N] [--repeats N] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mrgd_ext
from mrgd_ext.experiments import data
from _common import (
    RESULTS_DIR,
    machine_info,
    markdown_header,
    markdown_table,
    write_results,
)

PROBLEMS = ("digits", "multiscale", "logreg")
MLP_PROBLEMS = ("digits", "multiscale")
METHODS = ("gd", "heavy_ball", "adam", "mrgd_temporal", "mrgd_subspace")
MRGD_METHODS = ("mrgd_temporal", "mrgd_subspace")
TARGET = ("MrGD (auto or subspace) reaches the target loss in <= 0.5x the wall time of the best grid "
               "learning rate for GD, estimation included, on both multiscale problems")
#: JSON keys every result file has (the smoke test checks them).
TOP_KEYS = ("machine", "torch_version", "date", "settings", "problems", "checks", "runtime_s")
RUN_KEYS = ("method", "label", "setting", "status", "reason", "steps_run", "final_loss", "wall_s",
            "construct_s", "estimation_hvps", "estimation_s", "backoffs", "events", "warnings",
            "iters_to_target", "time_to_target_s", "spikes", "curve")

#: MLP: seconds of the loss-spike detector (relative increase from one iterate to the next).
SPIKE_RATIO = 1.10
DIVERGENCE_FACTOR = 10.0
PROBE_SAMPLES = 512
MLP_GD_DECADES = (1.5, 1.0, 0.5, 0.0, -0.5, -1.0)
MLP_HB_FACTORS = (1.0, 0.3, 0.1)
MLP_ADAM_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
#: AutoMrGD settings on the MLP problems (everything else: AutoMrGD's defaults, e.g. refresh_every=200,
#: block_size=4, density_probes=2, density_order=40, min_gap=10, floor=1e-6, max_groups=4, tol=1e-6,
#: strategy nested, lambda_max_margin 1.1, loss_slack 0.05, check_every 10, backoff 0.5, max_backoffs 6).
AUTO_MLP = {
    "mrgd_temporal": [
        {"rate_rule": "safe", "num_eigs": 8},
        {"rate_rule": "optimal", "num_eigs": 8, "strategy": "auto"},
    ],
    "mrgd_subspace": [
        {"subspace_rates": "group", "rate_rule": "safe", "num_eigs": 8},
        {"subspace_rates": "group", "rate_rule": "optimal", "num_eigs": 8},
        {"subspace_rates": "ritz", "rate_rule": "safe", "num_eigs": 16},
    ],
}

LOGREG_L2 = 1e-4
LOGREG_TARGET = 1e-6  # relative gap (f - f*) / f*
LOGREG_GD_FACTORS = (0.5, 1.0, 1.9, 2.0, 4.0)
LOGREG_HB_FACTORS = (1.0, 0.5, 0.25)
LOGREG_ADAM_LRS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
_LOGREG_COMMON = {"floor": 1e-13, "max_groups": None, "block_size": 4}
AUTO_LOGREG = {
    "mrgd_temporal": [
        {**_LOGREG_COMMON, "num_eigs": 31, "rate_rule": "safe", "strategy": "nested"},
        {**_LOGREG_COMMON, "num_eigs": 31, "rate_rule": "optimal", "strategy": "nested"},
        {**_LOGREG_COMMON, "num_eigs": 31, "rate_rule": "optimal", "strategy": "auto"},
    ],
    "mrgd_subspace": [
        {**_LOGREG_COMMON, "num_eigs": 31, "subspace_rates": "group", "rate_rule": "optimal"},
        {**_LOGREG_COMMON, "num_eigs": 31, "subspace_rates": "ritz", "rate_rule": "safe"},
        {**_LOGREG_COMMON, "num_eigs": 31, "subspace_rates": "ritz", "rate_rule": "safe", "refresh_every": 50},
        {**_LOGREG_COMMON, "num_eigs": 16, "subspace_rates": "ritz", "rate_rule": "safe"},
    ],
}

MAX_CURVE_POINTS = 200


# --------------------------------------------------------------------------------------------------------
# Data


def load_digits_raw() -> tuple[torch.Tensor, torch.Tensor, str]:
    """Raw digits (pixel values 0..16) from the package's loader."""
    x, y = data.load_digits(standardize=False)
    return x.to(torch.float32), y.long(), "mrgd_ext.experiments.data.load_digits(standardize=False)"


def load_breast_cancer_raw() -> tuple[torch.Tensor, torch.Tensor, str]:
    x, y = data.load_breast_cancer(standardize=False, dtype=torch.float64)
    return x, y.long(), "mrgd_ext.experiments.data.load_breast_cancer(standardize=False)"


def load_multiscale(num_samples: int, dims, scales, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    x, y, _ = data.multiscale_classification(num_samples, dims, scales, num_classes, seed=seed)
    return x.to(torch.float32), y.long(), "mrgd_ext.experiments.data.multiscale_classification"


# --------------------------------------------------------------------------------------------------------
# Problems


@dataclass
class MLPProblem:
    name: str
    description: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    hidden: tuple[int, int]
    init_state: dict = field(default_factory=dict)
    lambda0: float = float("nan")
    data_source: str = ""

    def model(self) -> nn.Module:
        d = self.x_train.shape[1]
        m = nn.Sequential(nn.Linear(d, self.hidden[0]), nn.ReLU(), nn.Linear(self.hidden[0], self.hidden[1]), nn.ReLU(),
                          nn.Linear(self.hidden[1], 10))
        if self.init_state:
            m.load_state_dict(self.init_state)
        return m


def make_mlp_problem(name: str, hidden: tuple[int, int]) -> MLPProblem:
    if name == "digits":
        x, y, source = load_digits_raw()
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
        n_train = round(0.75 * x.shape[0])
        tr, te = perm[:n_train], perm[n_train:]
        desc = (f"digits, raw pixels 0..16, {len(tr)} train / {len(te)} test (permutation seed 0), "
                f"MLP {x.shape[1]}-{hidden[0]}-{hidden[1]}-10 ReLU, float32")
    else:
        x, y, source = load_multiscale(2000, (16, 16, 32), (1.0, 0.1, 0.01), 10, seed=0)
        tr, te = torch.arange(1500), torch.arange(1500, 2000)
        desc = ("multiscale_classification(2000, dims=(16, 16, 32), data scales (1, 0.1, 0.01), 10 classes, seed 0), "
                f"1500 train / 500 test, MLP 64-{hidden[0]}-{hidden[1]}-10 ReLU, float32")
    prob = MLPProblem(name, desc, x[tr].contiguous(), y[tr].contiguous(), x[te].contiguous(), y[te].contiguous(),
                      hidden, data_source=source)
    torch.manual_seed(0)
    prob.init_state = copy.deepcopy(prob.model().state_dict())
    model = prob.model()
    op = mrgd_ext.HessianOperator(model, nn.CrossEntropyLoss(), (prob.x_train[:PROBE_SAMPLES], prob.y_train[:PROBE_SAMPLES]))
    res = mrgd_ext.curvature.lanczos(op, 1, block_size=1, tol=1e-4, seed=0)
    prob.lambda0 = float(res.eigenvalues[0])
    return prob


# --------------------------------------------------------------------------------------------------------
# One training run


@dataclass
class Run:
    """What one training run recorded (full resolution; subsampled when written)."""

    method: str
    label: str
    setting: dict
    status: str = "ok"
    reason: str = ""
    losses: list = field(default_factory=list)  # loss at iterate t (t = 0 .. steps_run)
    times: list = field(default_factory=list)  # wall time (s) when loss[t] was known
    test_iters: list = field(default_factory=list)
    test_acc: list = field(default_factory=list)
    test_times: list = field(default_factory=list)
    construct_s: float = 0.0
    estimation_hvps: int = 0
    estimation_s: float = 0.0
    backoffs: int = 0
    events: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def steps_run(self) -> int:
        return max(len(self.losses) - 1, 0)

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")

    @property
    def wall_s(self) -> float:
        return self.times[-1] if self.times else float("nan")

    def first_reach(self, target: float) -> tuple[int | None, float | None]:
        for t, (loss, s) in enumerate(zip(self.losses, self.times)):
            if math.isfinite(loss) and loss <= target:
                return t, s
        return None, None


def _event_digest(events: list[dict]) -> list[dict]:
    keep = ("step", "kind", "reason", "num_hvps", "seconds", "groups", "lambda_max", "cycle_length", "rates")
    return [{k: e.get(k) for k in keep} for e in events]


def train(
    method: str,
    label: str,
    setting: dict,
    build: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    model: nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    steps: int,
    *,
    evaluate: Callable[[], float] | None = None,
    record_every: int = 10,
    stop_below: float | None = None,
    diverge_factor: float | None = DIVERGENCE_FACTOR,
) -> Run:
    """Run ``steps`` optimizer steps from the model's current parameters (closure = full-batch loss).

    ``build(params)`` constructs the optimizer inside the timed region (AutoMrGD measures the curvature there).
    ``evaluate`` (test accuracy, untimed) runs at every ``record_every``-th iterate and at the last.
    ``stop_below``: stop at the first iterate whose loss is <= it.
    """
    run = Run(method, label, setting)
    params = [p for p in model.parameters()]
    opt_box: list[Any] = []

    def closure():
        opt_box[0].zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss

    def record_test(t: int, elapsed: float) -> None:
        if evaluate is not None:
            run.test_iters.append(t)
            run.test_acc.append(evaluate())
            run.test_times.append(elapsed)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        t0 = time.perf_counter()
        try:
            opt = build(params)
        except (RuntimeError, ValueError) as exc:  # reported, never hidden: a failed measurement is a result
            run.status, run.reason = "failed", f"construction: {type(exc).__name__}: {exc}"
            run.losses, run.times = [float(loss_fn().detach())], [time.perf_counter() - t0]
            return run
        elapsed = time.perf_counter() - t0
        run.construct_s = elapsed
        opt_box.append(opt)
        record_test(0, elapsed)
        loss0 = None
        for t in range(steps):
            t1 = time.perf_counter()
            try:
                loss = opt.step(closure)
            except RuntimeError as exc:
                elapsed += time.perf_counter() - t1
                run.status, run.reason = "failed", str(exc)
                break
            elapsed += time.perf_counter() - t1
            value = float(loss.detach())
            run.losses.append(value)
            run.times.append(elapsed)
            if loss0 is None:
                loss0 = value
            if not math.isfinite(value) or (diverge_factor is not None and value > diverge_factor * max(loss0, 1e-12)):
                run.status, run.reason = "diverged", f"loss {value:.3g} at iteration {t}"
                break
            if stop_below is not None and value <= stop_below:
                break
            if evaluate is not None and t > 0 and t % record_every == 0:
                record_test(t, elapsed)
        else:
            # The loss at the final iterate (after the last step): one more evaluation, timed.
            t1 = time.perf_counter()
            with torch.no_grad():
                value = float(loss_fn())
            elapsed += time.perf_counter() - t1
            run.losses.append(value)
            run.times.append(elapsed)
        if not run.test_iters or run.test_iters[-1] != run.steps_run:
            record_test(run.steps_run, elapsed)
    if run.status == "ok" and loss0 is not None:
        # Runs that are not stopped early (AutoMrGD keeps its own watch) are still judged at the end.
        final = run.final_loss
        if not math.isfinite(final) or final > DIVERGENCE_FACTOR * max(loss0, 1e-12):
            run.status = "diverged"
            run.reason = (f"final loss {final:.3g} = {final / max(loss0, 1e-12):.3g}x the initial loss, "
                          "with no error from the optimizer")
    if isinstance(opt, mrgd_ext.AutoMrGD):
        run.estimation_hvps = int(opt.estimation_hvps)
        run.estimation_s = float(opt.estimation_seconds)
        run.events = _event_digest(opt.events)
        run.backoffs = sum(e["kind"] == "backoff" for e in opt.events)
    run.warnings = sorted({str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)})
    return run


def spike_stats(losses: list[float]) -> dict:
    """Iterates whose loss exceeds the previous iterate's by more than SPIKE_RATIO, and their spacing."""
    arr = np.asarray(losses, dtype=np.float64)
    if arr.size < 2:
        return {"count": 0, "max_ratio": None, "median_spacing": None, "positions": []}
    prev, nxt = arr[:-1], arr[1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(prev > 0, nxt / prev, np.nan)
    pos = np.nonzero(ratio > SPIKE_RATIO)[0] + 1
    spacing = np.diff(pos)
    finite = ratio[np.isfinite(ratio)]
    return {
        "count": int(pos.size),
        "max_ratio": float(finite.max()) if finite.size else None,
        "median_spacing": float(np.median(spacing)) if spacing.size else None,
        "positions": pos[:50].tolist(),
    }


def _subsample(n: int, k: int = MAX_CURVE_POINTS) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))


def run_payload(run: Run, target: float | None) -> dict:
    idx = _subsample(len(run.losses))
    tidx = _subsample(len(run.test_iters))
    it, ts = run.first_reach(target) if target is not None else (None, None)
    out = {
        "method": run.method,
        "label": run.label,
        "setting": run.setting,
        "status": run.status,
        "reason": run.reason,
        "steps_run": run.steps_run,
        "final_loss": run.final_loss,
        "wall_s": run.wall_s,
        "construct_s": run.construct_s,
        "estimation_hvps": run.estimation_hvps,
        "estimation_s": run.estimation_s,
        "backoffs": run.backoffs,
        "events": run.events,
        "warnings": run.warnings,
        "iters_to_target": it,
        "time_to_target_s": ts,
        "spikes": spike_stats(run.losses),
        "curve": {"iter": idx, "loss": [run.losses[i] for i in idx], "time_s": [run.times[i] for i in idx]},
    }
    if run.test_iters:
        out["final_test_acc"] = run.test_acc[-1]
        out["test_curve"] = {"iter": [run.test_iters[i] for i in tidx], "test_acc": [run.test_acc[i] for i in tidx],
                             "time_s": [run.test_times[i] for i in tidx]}
    out.update(run.extra)
    return out


# --------------------------------------------------------------------------------------------------------
# MLP problems


def _auto_label(method: str, cfg: dict) -> str:
    parts = []
    if method == "mrgd_subspace" and "subspace_rates" in cfg:
        parts.append(cfg["subspace_rates"])
    parts += [f"{k}={v}" for k, v in cfg.items() if k not in ("subspace_rates", "floor", "max_groups", "block_size")]
    return ", ".join(parts)


def mlp_configs(prob: MLPProblem, quick: bool) -> list[tuple[str, str, dict]]:
    base = 2.0 / prob.lambda0
    decades = MLP_GD_DECADES if not quick else (1.0, 0.0, -1.0)
    configs = [("gd", f"lr={base * 10 ** j:.3g}", {"lr": base * 10 ** j, "lr_over_2_div_lambda0": 10 ** j}) for j in decades]
    hb = MLP_HB_FACTORS if not quick else (0.3,)
    configs += [("heavy_ball", f"lr={base * f:.3g}, m=0.9", {"lr": base * f, "momentum": 0.9, "lr_over_2_div_lambda0": f})
                for f in hb]
    adam = MLP_ADAM_LRS if not quick else (1e-3, 1e-2)
    configs += [("adam", f"lr={lr:g}", {"lr": lr}) for lr in adam]
    for method, cfgs in AUTO_MLP.items():
        for cfg in cfgs[:1] if quick else cfgs:
            configs.append((method, _auto_label(method, cfg), dict(cfg)))
    return configs


def mlp_builder(method: str, setting: dict, model: nn.Module, prob: MLPProblem, probe: int):
    if method == "gd":
        return lambda params: torch.optim.SGD(params, lr=setting["lr"])
    if method == "heavy_ball":
        return lambda params: torch.optim.SGD(params, lr=setting["lr"], momentum=setting["momentum"])
    if method == "adam":
        return lambda params: torch.optim.Adam(params, lr=setting["lr"])
    mode = "temporal" if method == "mrgd_temporal" else "subspace"

    def build(params):
        op = mrgd_ext.HessianOperator(model, nn.CrossEntropyLoss(), (prob.x_train[:probe], prob.y_train[:probe]),
                                      params=params)
        return mrgd_ext.AutoMrGD(params, op, mode=mode, **setting)

    return build


def mlp_run(prob: MLPProblem, method: str, label: str, setting: dict, steps: int, probe: int, *,
            record_every: int, stop_below: float | None = None) -> Run:
    model = prob.model()
    ce = nn.CrossEntropyLoss()

    def loss_fn():
        return ce(model(prob.x_train), prob.y_train)

    @torch.no_grad()
    def evaluate() -> float:
        return float((model(prob.x_test).argmax(1) == prob.y_test).float().mean())

    run = train(method, label, setting, mlp_builder(method, setting, model, prob, probe), model, loss_fn, steps,
                evaluate=evaluate, record_every=record_every, stop_below=stop_below,
                diverge_factor=None if method in MRGD_METHODS else DIVERGENCE_FACTOR)
    with torch.no_grad():
        out = model(prob.x_train)
        run.extra["final_train_acc"] = float((out.argmax(1) == prob.y_train).float().mean())
    return run


def warm_up_mlp(prob: MLPProblem, probe: int) -> None:
    """Untimed: a few steps of each optimizer kind and one small AutoMrGD construction per mode."""
    small = {"num_eigs": 2, "block_size": 2, "density_probes": 1, "density_order": 8}
    for method, setting in (("gd", {"lr": 1e-4}), ("heavy_ball", {"lr": 1e-4, "momentum": 0.9}), ("adam", {"lr": 1e-4}),
                            ("mrgd_temporal", small), ("mrgd_subspace", small)):
        mlp_run(prob, method, "warm-up", setting, 5, probe, record_every=5)


def best_run(runs: list[Run], method: str) -> Run | None:
    cands = [r for r in runs if r.method == method and r.status == "ok" and math.isfinite(r.final_loss)]
    if not cands:
        cands = [r for r in runs if r.method == method and r.losses]
        if not cands:
            return None
        return min(cands, key=lambda r: min((v for v in r.losses if math.isfinite(v)), default=math.inf))
    return min(cands, key=lambda r: r.final_loss)


def bench_mlp(name: str, args) -> dict:
    hidden = (64, 32) if args.quick else (1024, 128)
    t_setup = time.perf_counter()
    prob = make_mlp_problem(name, hidden)
    probe = min(PROBE_SAMPLES, prob.x_train.shape[0])
    steps = args.steps
    record_every = max(1, steps // 100)
    print(f"[{name}] {prob.description}; lambda_0 = {prob.lambda0:.4g} (probe batch {probe}); {steps} steps", flush=True)
    warm_up_mlp(prob, probe)
    setup_s = time.perf_counter() - t_setup
    runs: list[Run] = []
    for method, label, setting in mlp_configs(prob, args.quick):
        run = mlp_run(prob, method, label, setting, steps, probe, record_every=record_every)
        runs.append(run)
        acc = run.test_acc[-1] if run.test_acc else float("nan")
        print(f"[{name}] {method:14s} {label:40s} {run.status:8s} loss {run.final_loss:.4g} test acc {acc:.4f} "
              f"wall {run.wall_s:.2f} s (estimation {run.estimation_s:.2f} s, {run.estimation_hvps} HVPs, "
              f"{run.backoffs} back-offs) {run.reason}", flush=True)

    gd_best = best_run(runs, "gd")
    target = gd_best.final_loss if gd_best is not None else None
    check = {"problem": name, "target_loss": target, "gd_best": gd_best.label if gd_best else None}
    # Decisive pair: best GD rate and the MrGD setting that reached the target first.
    reached = [(r.first_reach(target)[1], r) for r in runs if r.method in MRGD_METHODS and target is not None]
    reached = [(s, r) for s, r in reached if s is not None]
    gd_times = [gd_best.first_reach(target)[1]] if gd_best is not None else []
    mr_best = min(reached, key=lambda p: p[0])[1] if reached else None
    mr_times = [min(reached, key=lambda p: p[0])[0]] if reached else []
    repeat_runs = []
    if mr_best is not None and gd_best is not None:
        for _ in range(args.repeats - 1):
            for ref, times in ((gd_best, gd_times), (mr_best, mr_times)):
                again = mlp_run(prob, ref.method, ref.label, ref.setting, steps, probe, record_every=steps,
                                stop_below=target)
                times.append(again.first_reach(target)[1])
                repeat_runs.append({"method": ref.method, "label": ref.label, "time_to_target_s": times[-1]})
    gd_med = statistics.median([t for t in gd_times if t is not None]) if gd_times else None
    mr_valid = [t if t is not None else math.inf for t in mr_times]
    mr_med = statistics.median(mr_valid) if mr_valid else None
    ratio = (mr_med / gd_med) if (mr_med is not None and gd_med) else None
    check.update({
        "gd_time_to_target_s": gd_times, "gd_median_s": gd_med,
        "mrgd_best": f"{mr_best.method} ({mr_best.label})" if mr_best else None,
        "mrgd_time_to_target_s": mr_times, "mrgd_median_s": mr_med,
        "ratio": ratio, "pass": bool(ratio is not None and ratio <= 0.5), "repeats": repeat_runs,
    })
    # The paper's observations: loss spikes and test accuracy.
    obs = {}
    for method in METHODS:
        b = best_run(runs, method)
        if b is not None:
            obs[method] = {"best": b.label, "final_loss": b.final_loss,
                           "final_test_acc": b.test_acc[-1] if b.test_acc else None,
                           "max_test_acc_any_setting": max((r.test_acc[-1] for r in runs if r.method == method
                                                            and r.test_acc and r.status == "ok"), default=None),
                           "spikes": spike_stats(b.losses)}
    check["observations"] = obs
    return {
        "description": prob.description,
        "data_source": prob.data_source,
        "hidden": list(hidden),
        "steps": steps,
        "probe_samples": probe,
        "lambda0_probe": prob.lambda0,
        "setup_and_warmup_s": setup_s,
        "target_loss": target,
        "runs": [run_payload(r, target) for r in runs],
        "check": check,
        "_runs": runs,
    }


# --------------------------------------------------------------------------------------------------------
# Logistic regression


def logreg_problem():
    x, y, source = load_breast_cancer_raw()
    yf = y.to(torch.float64)
    d = x.shape[1]

    def loss_of(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        z = x @ w + b
        return nn.functional.binary_cross_entropy_with_logits(z, yf) + 0.5 * LOGREG_L2 * (w * w).sum()

    # Newton's method with backtracking (Armijo) line search, in float64 on the 31 x 31 Hessian.
    theta = torch.zeros(d + 1, dtype=torch.float64)

    def f(th):
        return loss_of(th[:d], th[d])

    for _ in range(200):
        g = torch.func.grad(f)(theta)
        if float(g.norm()) < 1e-14:
            break
        hess = torch.func.hessian(f)(theta)
        step = torch.linalg.solve(hess, g)
        t, f0 = 1.0, float(f(theta))
        while float(f(theta - t * step)) > f0 - 1e-4 * t * float(g @ step) and t > 1e-12:
            t *= 0.5
        theta = theta - t * step
    fstar = float(f(theta))
    gnorm = float(torch.func.grad(f)(theta).norm())
    h0 = torch.func.hessian(f)(torch.zeros(d + 1, dtype=torch.float64))
    ev0 = torch.linalg.eigvalsh(h0)
    hs = torch.linalg.eigvalsh(torch.func.hessian(f)(theta))
    return {
        "x": x, "y": yf, "loss_of": loss_of, "d": d, "fstar": fstar, "theta_star": theta, "grad_norm_at_opt": gnorm,
        "L0": float(ev0[-1]), "mu0": float(ev0[0]), "cond0": float(ev0[-1] / ev0[0]),
        "L_star": float(hs[-1]), "mu_star": float(hs[0]), "cond_star": float(hs[-1] / hs[0]), "source": source,
    }


class _LinearModel(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros((), dtype=torch.float64))


def logreg_configs(lp: dict, quick: bool) -> list[tuple[str, str, dict]]:
    L, mu = lp["L0"], lp["mu0"]
    configs = [("gd", f"lr={f:g}/L", {"lr": f / L, "lr_times_L": f}) for f in (LOGREG_GD_FACTORS if not quick else (1.0, 1.9))]
    sk = math.sqrt(L / mu)
    alpha = 4.0 / (math.sqrt(L) + math.sqrt(mu)) ** 2
    beta = ((sk - 1) / (sk + 1)) ** 2
    for f in (LOGREG_HB_FACTORS if not quick else (1.0,)):
        configs.append(("heavy_ball", f"optimal(H0) x{f:g}" if f != 1.0 else "optimal(H0)",
                        {"lr": alpha * f, "momentum": beta, "alpha_factor": f}))
    configs += [("adam", f"lr={lr:g}", {"lr": lr}) for lr in (LOGREG_ADAM_LRS if not quick else (1e-2, 1.0))]
    for method, cfgs in AUTO_LOGREG.items():
        for cfg in cfgs[:1] if quick else cfgs:
            configs.append((method, _auto_label(method, cfg), dict(cfg)))
    return configs


def logreg_run(lp: dict, method: str, label: str, setting: dict, steps: int, stop_below: float) -> Run:
    model = _LinearModel(lp["d"])
    loss_of = lp["loss_of"]

    def loss_fn():
        return loss_of(model.w, model.b)

    def build(params):
        if method == "gd":
            return torch.optim.SGD(params, lr=setting["lr"])
        if method == "heavy_ball":
            return torch.optim.SGD(params, lr=setting["lr"], momentum=setting["momentum"])
        if method == "adam":
            return torch.optim.Adam(params, lr=setting["lr"])
        op = mrgd_ext.HessianOperator.from_closure(lambda pl: loss_of(pl[0], pl[1]), params)
        mode = "temporal" if method == "mrgd_temporal" else "subspace"
        return mrgd_ext.AutoMrGD(params, op, mode=mode, **setting)

    # The check must not stop a run that sits at the optimum: the loss differences there are ~1e-16 relative.
    return train(method, label, setting, build, model, loss_fn, steps, stop_below=stop_below,
                 diverge_factor=None if method in MRGD_METHODS else 1e6)


def bench_logreg(args) -> dict:
    t_setup = time.perf_counter()
    lp = logreg_problem()
    fstar = lp["fstar"]
    target = fstar * (1.0 + LOGREG_TARGET)
    steps = args.logreg_steps
    print(f"[logreg] f* = {fstar:.15g} (|grad| {lp['grad_norm_at_opt']:.2e}); H(0): L {lp['L0']:.4g}, mu {lp['mu0']:.4g}, "
          f"cond {lp['cond0']:.3g}; H(w*): cond {lp['cond_star']:.3g}; {steps} steps max", flush=True)
    for method, setting in (("gd", {"lr": 1e-9}), ("adam", {"lr": 1e-3}),
                            ("mrgd_temporal", {"num_eigs": 4, "floor": 1e-13}),
                            ("mrgd_subspace", {"num_eigs": 4, "floor": 1e-13})):
        logreg_run(lp, method, "warm-up", setting, 20, -math.inf)
    setup_s = time.perf_counter() - t_setup
    runs = []
    for method, label, setting in logreg_configs(lp, args.quick):
        run = logreg_run(lp, method, label, setting, steps, target)
        gaps = [(v - fstar) / fstar for v in run.losses if math.isfinite(v)]
        run.extra["best_gap"] = min(gaps) if gaps else None
        run.extra["final_gap"] = (run.final_loss - fstar) / fstar if math.isfinite(run.final_loss) else None
        it, ts = run.first_reach(target)
        runs.append(run)
        print(f"[logreg] {method:14s} {label:45s} {run.status:8s} "
              + (f"reached in {it} it, {ts:.3f} s" if it is not None else
                 f"not reached, best gap {run.extra['best_gap']:.3g}")
              + f" (estimation {run.estimation_s:.3f} s, {run.estimation_hvps} HVPs, {run.backoffs} back-offs) {run.reason}",
              flush=True)
    info = {k: lp[k] for k in ("fstar", "grad_norm_at_opt", "L0", "mu0", "cond0", "L_star", "mu_star", "cond_star", "source")}
    return {
        "description": (f"breast_cancer raw features (569 x 30), binary logistic regression, float64, loss = mean BCE + "
                        f"{LOGREG_L2:g} * |w|^2 / 2 (bias not regularised), start w = 0, b = 0; target: relative gap "
                        f"(f - f*) / f* <= {LOGREG_TARGET:g}"),
        "steps": steps,
        "problem": info,
        "target_loss": target,
        "setup_and_warmup_s": setup_s,
        "runs": [run_payload(r, target) for r in runs],
        "_runs": runs,
    }


# --------------------------------------------------------------------------------------------------------
# Report


def _fmt(v, digits=4):
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}"
    return str(v)


def mlp_markdown(name: str, res: dict) -> str:
    runs = res["runs"]
    chk = res["check"]
    md = [f"## {name}: {res['description']}", ""]
    md.append(f"{res['steps']} full-batch steps per run; AutoMrGD probe batch: first {res['probe_samples']} training samples; "
              f"lambda_0 (top Hessian eigenvalue at the initialisation, probe batch) = {res['lambda0_probe']:.4g}. "
              f"Target loss = final training loss of the best GD rate ({chk['gd_best']}): **{_fmt(res['target_loss'], 5)}**.")
    md.append("")
    md.append("Best setting per method (lowest final training loss):")
    md.append("")
    rows = []
    for method in METHODS:
        cands = [r for r in runs if r["method"] == method]
        if not cands:
            continue
        ok = [r for r in cands if r["status"] == "ok"]
        b = min(ok or cands, key=lambda r: r["final_loss"] if math.isfinite(r["final_loss"]) else math.inf)
        rows.append([method, b["label"], _fmt(b["final_loss"]), _fmt(b.get("final_test_acc")),
                     _fmt(b["iters_to_target"]), _fmt(b["time_to_target_s"], 3), _fmt(b["wall_s"], 3),
                     f"{b['estimation_hvps']} / {b['estimation_s']:.2f}", b["backoffs"],
                     f"{sum(r['status'] == 'ok' for r in cands)}/{len(cands)}"])
    md.append(markdown_table(["method", "best setting", "final loss", "test acc", "iters to target", "s to target",
                              "wall s", "estimation HVPs / s", "back-offs", "ok runs"], rows))
    md.append("All runs:")
    md.append("")
    rows = []
    for r in runs:
        sp = r["spikes"]
        rows.append([r["method"], r["label"], r["status"] + (f" ({r['reason']})" if r["reason"] else ""),
                     _fmt(r["final_loss"]), _fmt(r.get("final_test_acc")), _fmt(r["iters_to_target"]),
                     _fmt(r["time_to_target_s"], 3), _fmt(r["wall_s"], 3), f"{r['estimation_hvps']} / {r['estimation_s']:.2f}",
                     r["backoffs"], f"{sp['count']} ({_fmt(sp['median_spacing'])})", _plan_digest(r)])
    md.append(markdown_table(["method", "setting", "status", "final loss", "test acc", "iters to target", "s to target",
                              "wall s", "estimation HVPs / s", "back-offs", "spikes (spacing)", "first plan"], rows))
    md.append("(spikes: iterates whose loss exceeds the previous one's by more than "
              f"{round((SPIKE_RATIO - 1) * 100)}%, with their median spacing in iterations; first plan: the groups "
              "AutoMrGD measured at the start and the length of the cycle of rates planned from them, which only the "
              "temporal mode walks)")
    md.append("")
    return "\n".join(md) + "\n"


def _plan_digest(run: dict) -> str:
    if not run["events"]:
        return "-"
    e = run["events"][0]
    groups = " ".join(f"[{a:.3g}, {b:.3g}]" for a, b in e["groups"])
    return f"{groups}; cycle {e['cycle_length']}"


def logreg_markdown(res: dict) -> str:
    p = res["problem"]
    md = [f"## logreg: {res['description']}", ""]
    md.append(f"f* = {p['fstar']:.15g} (Newton, |grad| = {p['grad_norm_at_opt']:.1e}); Hessian at w = 0: L = {p['L0']:.4g}, "
              f"mu = {p['mu0']:.3g}, condition {p['cond0']:.3g}; at the optimum: condition {p['cond_star']:.3g}. "
              f"Budget {res['steps']} steps; runs stop at the target.")
    md.append("")
    rows = []
    for r in res["runs"]:
        reached = r["iters_to_target"] is not None
        rows.append([r["method"], r["label"], r["status"] + (f" ({r['reason']})" if r["reason"] else ""),
                     "yes" if reached else "not reached", _fmt(r["iters_to_target"]), _fmt(r["time_to_target_s"], 3),
                     _fmt(r.get("best_gap"), 3), _fmt(r["wall_s"], 3), f"{r['estimation_hvps']} / {r['estimation_s']:.3f}",
                     r["backoffs"], _plan_digest(r)])
    md.append(markdown_table(["method", "setting", "status", "target reached", "iterations", "seconds",
                              "best relative gap", "wall s", "estimation HVPs / s", "back-offs", "first plan"], rows))
    return "\n".join(md) + "\n"


def logreg_check(res: dict) -> dict:
    """The target check on the logistic regression: wall time to the target of the fastest MrGD run against the
    best GD rate. A GD run that never reaches the target within the budget needed more than its whole wall
    time, so the ratio against it is an upper bound."""
    runs = res["runs"]
    gd = [r for r in runs if r["method"] == "gd" and r["status"] == "ok"]
    mrgd = [r for r in runs if r["method"].startswith("mrgd") and r.get("time_to_target_s") is not None]
    gd_reached = [r for r in gd if r.get("time_to_target_s") is not None]
    if gd_reached:
        best_gd = min(gd_reached, key=lambda r: r["time_to_target_s"])
        gd_time, bound = best_gd["time_to_target_s"], False
    elif gd:
        best_gd = min(gd, key=lambda r: r.get("best_gap") if r.get("best_gap") is not None else math.inf)
        gd_time, bound = best_gd["wall_s"], True
    else:
        return {"pass": False, "line": "- **logreg: FAIL** - no GD run finished"}
    if not mrgd:
        return {"pass": False, "line": f"- **logreg: FAIL** - no MrGD setting reached the target (best GD "
                                       f"{best_gd['label']})"}
    best = min(mrgd, key=lambda r: r["time_to_target_s"])
    ratio = best["time_to_target_s"] / gd_time
    ok = ratio <= 0.5
    gd_text = (f"best GD ({best_gd['label']}) did not reach it within {res['steps']} steps ({_fmt(gd_time, 3)} s, "
               f"best gap {_fmt(best_gd.get('best_gap'), 3)}), so its time to target exceeds that"
               if bound else f"best GD ({best_gd['label']}) {_fmt(gd_time, 3)} s")
    line = (f"- **logreg: {'PASS' if ok else 'FAIL'}** - target relative gap {LOGREG_TARGET:g}; {gd_text}; fastest "
            f"MrGD {best['method']} ({best['label']}) {_fmt(best['time_to_target_s'], 3)} s, estimation included; "
            f"ratio {'< ' if bound else ''}{ratio:.3g} (needs <= 0.5)")
    return {"pass": ok, "line": line, "ratio": ratio, "ratio_is_upper_bound": bound, "mrgd_best": best["label"],
            "gd_best": best_gd["label"]}


def checks_markdown(checks: dict) -> str:
    md = ["## Target check", "", f"Target: \"{TARGET}\".", ""]
    for name, c in checks["per_problem"].items():
        if "line" in c:
            line = c["line"]
        elif c.get("ratio") is None:
            line = (f"- **{name}: FAIL** - no MrGD setting reached the target loss {_fmt(c['target_loss'], 5)} "
                    f"(best GD {c['gd_best']}: {_fmt(c['gd_median_s'], 3)} s)")
        else:
            line = (f"- **{name}: {'PASS' if c['pass'] else 'FAIL'}** - target loss {_fmt(c['target_loss'], 5)}; "
                    f"best GD ({c['gd_best']}) median {_fmt(c['gd_median_s'], 3)} s "
                    f"(runs: {', '.join(_fmt(t, 3) for t in c['gd_time_to_target_s'])}); fastest MrGD "
                    f"{c['mrgd_best']} median {_fmt(c['mrgd_median_s'], 3)} s "
                    f"(runs: {', '.join(_fmt(t, 3) for t in c['mrgd_time_to_target_s'])}); ratio {c['ratio']:.3g} "
                    f"(needs <= 0.5)")
        md.append(line)
    md.append(f"- **overall: {'PASS' if checks['pass'] else 'FAIL'}**")
    md.append("")
    md.append("Paper's observations (best setting per method; spikes: iterates whose loss exceeds the previous one's "
              f"by more than {round((SPIKE_RATIO - 1) * 100)}%):")
    md.append("")
    for name, c in checks["per_problem"].items():
        if "observations" not in c:
            continue
        obs = c["observations"]
        for method in METHODS:
            if method in obs:
                o = obs[method]
                sp = o["spikes"]
                md.append(f"- {name}, {method} ({o['best']}): {sp['count']} spikes"
                          + (f", median spacing {_fmt(sp['median_spacing'])} iterations, largest x{sp['max_ratio']:.3g}"
                             if sp["count"] else "")
                          + f"; final test acc {_fmt(o['final_test_acc'])} (best of any setting "
                          f"{_fmt(o['max_test_acc_any_setting'])})")
        md.append(f"- {name}: {c['accuracy_verdict']}")
    md.append("")
    return "\n".join(md) + "\n"


def plot(name: str, res: dict, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    colors = {"gd": "tab:blue", "heavy_ball": "tab:green", "adam": "tab:orange", "mrgd_temporal": "tab:red",
              "mrgd_subspace": "tab:purple"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    logreg = name == "logreg"
    fstar = res["problem"]["fstar"] if logreg else None
    for r in res["runs"]:
        if not r["curve"]["loss"]:
            continue
        loss = np.asarray(r["curve"]["loss"], dtype=np.float64)
        y = (loss - fstar) / fstar if logreg else loss
        y = np.where(np.isfinite(y) & (y > 0), y, np.nan)
        is_best = r["status"] == "ok" and r["label"] == _best_label(res["runs"], r["method"], logreg)
        kw = {"color": colors.get(r["method"], "k"), "lw": 1.6 if is_best else 0.6, "alpha": 1.0 if is_best else 0.45}
        lab = f"{r['method']} {r['label']}" if is_best else None
        axes[0].plot(r["curve"]["iter"], y, label=lab, **kw)
        axes[1].plot(r["curve"]["time_s"], y, **kw)
    target = res.get("target_loss")
    for ax, xlabel in zip(axes, ("iteration", "wall time (s), estimation included")):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("relative gap (f - f*) / f*" if logreg else "training loss")
        if target is not None:
            ax.axhline(LOGREG_TARGET if logreg else target, color="k", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{name}: thick = best setting per method, thin = other settings, dashed = target")
    fig.tight_layout()
    path = out / f"training_cpu_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _best_label(runs: list[dict], method: str, logreg: bool) -> str | None:
    cands = [r for r in runs if r["method"] == method and r["status"] == "ok"]
    if not cands:
        return None
    if logreg:
        reached = [r for r in cands if r["time_to_target_s"] is not None]
        if reached:
            return min(reached, key=lambda r: r["time_to_target_s"])["label"]
        return min(cands, key=lambda r: r.get("best_gap") or math.inf)["label"]
    return min(cands, key=lambda r: r["final_loss"])["label"]


def accuracy_verdict(obs: dict) -> str:
    mr = [(m, obs[m]["final_test_acc"]) for m in MRGD_METHODS if m in obs and obs[m]["final_test_acc"] is not None]
    ref = {m: obs[m]["final_test_acc"] for m in ("gd", "adam") if m in obs}
    if not mr or len(ref) < 2:
        return "test accuracy comparison incomplete"
    m, acc = max(mr, key=lambda p: p[1])
    above = all(acc > v for v in ref.values())
    return (f"best MrGD final test accuracy {acc:.4f} ({m}) is {'above' if above else 'NOT above'} both GD "
            f"({ref['gd']:.4f}) and Adam ({ref['adam']:.4f}) (best settings by training loss)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default benchmarks/results; benchmarks/results/quick with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke-test size: small MLP, few steps, small grids")
    ap.add_argument("--problems", default=",".join(PROBLEMS), help=f"comma-separated subset of {','.join(PROBLEMS)}")
    ap.add_argument("--steps", type=int, default=None, help="MLP steps per run (default 300; --quick 40)")
    ap.add_argument("--logreg-steps", type=int, default=None, help="logistic-regression step budget (default 10000; "
                    "--quick 300)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs of the decisive pair for the target check, medians reported (default 3; --quick 1)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared 2-core machine two threads that compete "
                         "with other processes slow every kernel by an order of magnitude, and the timings with them)")
    args = ap.parse_args(argv)
    problems = [p.strip() for p in args.problems.split(",") if p.strip()]
    unknown = [p for p in problems if p not in PROBLEMS]
    if unknown or not problems:
        ap.error(f"--problems: unknown {unknown}; choose from {', '.join(PROBLEMS)}")
    if args.steps is None:
        args.steps = 40 if args.quick else 300
    if args.logreg_steps is None:
        args.logreg_steps = 300 if args.quick else 10000
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.steps < 1 or args.logreg_steps < 1 or args.repeats < 1 or args.threads < 1:
        ap.error("--steps, --logreg-steps, --repeats and --threads must be >= 1")
    out = args.out if args.out is not None else (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    info = machine_info("cpu")
    results: dict[str, dict] = {}
    for name in problems:
        t0 = time.perf_counter()
        results[name] = bench_logreg(args) if name == "logreg" else bench_mlp(name, args)
        results[name]["problem_s"] = time.perf_counter() - t0
        print(f"[{name}] done in {results[name]['problem_s']:.1f} s", flush=True)

    per_problem = {}
    for name in problems:
        if name in MLP_PROBLEMS:
            c = results[name]["check"]
            c["accuracy_verdict"] = accuracy_verdict(c["observations"])
            per_problem[name] = c
        elif name == "logreg":
            per_problem[name] = logreg_check(payload_logreg := {k: v for k, v in results[name].items()
                                                                 if not k.startswith("_")})
            del payload_logreg
    checks = {"target": TARGET, "per_problem": per_problem,
              "pass": bool(per_problem) and all(c["pass"] for c in per_problem.values())
              and all(p in per_problem for p in MLP_PROBLEMS),
              "complete": all(p in per_problem for p in MLP_PROBLEMS)}

    settings = {
        "quick": args.quick, "threads": args.threads, "mlp_steps": args.steps, "logreg_steps": args.logreg_steps,
        "repeats": args.repeats, "probe_samples": PROBE_SAMPLES, "mlp_dtype": "float32", "logreg_dtype": "float64",
        "mlp_gd_lr": "(2 / lambda_0) * 10^j, j in " + str(MLP_GD_DECADES if not args.quick else (1.0, 0.0, -1.0)),
        "mlp_heavy_ball": f"momentum 0.9, lr (2 / lambda_0) * {MLP_HB_FACTORS}",
        "mlp_adam_lr": list(MLP_ADAM_LRS), "auto_mlp": AUTO_MLP, "auto_logreg": AUTO_LOGREG,
        "logreg_l2": LOGREG_L2, "logreg_target": f"relative gap (f - f*) / f* <= {LOGREG_TARGET:g}",
        "logreg_gd_lr_times_L": list(LOGREG_GD_FACTORS), "logreg_heavy_ball_alpha_factors": list(LOGREG_HB_FACTORS),
        "logreg_adam_lr": list(LOGREG_ADAM_LRS), "spike_ratio": SPIKE_RATIO, "divergence_factor": DIVERGENCE_FACTOR,
        "mlp_target": "final training loss of the best GD rate (lowest final training loss) within the budget",
        "wall_time": "optimizer construction (first curvature measurement) + every step with its closure; test "
                     "evaluations excluded",
    }
    payload = {
        "machine": info,
        "torch_version": torch.__version__,
        "date": info["date"],
        "settings": settings,
        "problems": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in results.items()},
        "checks": checks,
        "runtime_s": time.perf_counter() - t_start,
    }
    md = markdown_header("Training benchmark: AutoMrGD vs GD, heavy ball, Adam (CPU)", info)
    md += (f"\n{'Quick (smoke-test) sizes, not for quoting. ' if args.quick else ''}torch threads: {args.threads}. "
           "Wall time = optimizer construction (the first curvature measurement) + all steps (closures and "
           "re-measurements included); test evaluations excluded. Estimation HVPs / s: Hessian-vector products "
           f"and seconds spent measuring curvature. Total runtime {payload['runtime_s']:.0f} s.\n\n")
    if per_problem:
        md += checks_markdown(checks)
    for name in problems:
        md += mlp_markdown(name, payload["problems"][name]) if name in MLP_PROBLEMS else logreg_markdown(payload["problems"][name])
        md += "\n"
    out.mkdir(parents=True, exist_ok=True)
    pngs = [p for p in (plot(name, payload["problems"][name], out) for name in problems) if p is not None]
    json_path, md_path = write_results("training_cpu", payload, md, out)
    print(md)
    print(f"wrote {json_path}, {md_path}" + (", " + ", ".join(str(p) for p in pngs) if pngs else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
