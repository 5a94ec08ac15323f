"""torch.compile (inductor, CPU) of MrGD: the compiled step against the eager fused step, and a compiled
training step with MrGD against the same step with torch.optim.SGD (fused and foreach).

Byte floor (written down before measuring), float32 parameters, weight decay 0:
- the temporal step reads p, reads g and writes p: 3 accesses of 4 B, 12 B per element. The eager fused
  kernel and torch's fused SGD have exactly this pattern. The compiled step runs the update as multi-tensor
  ops with the rate as a tensor (the position walks the cycle without recompiling); inductor fuses
  ``p - rate * g`` into one loop per parameter, which has the same 12 B floor. The rate itself (a gather
  from the cycle, a few scalar ops) is O(1). At 16 Mi elements the working set (192 MiB) is far beyond the
  caches, so both are bound by memory bandwidth: the target is a compiled step no slower than the eager
  fused one, and both near the measured copy bandwidth. The copy is counted as 8 B per element (read src,
  write dst) but, with write-allocate caches, also reads dst before writing it: 12 B actually move. The step
  writes p after reading it, so its 12 B are all it moves: a step at the floor shows as up to 1.5x "of copy
  BW".
- the training step (forward, backward, step of a small MLP) is dominated by the matrix products; the
  optimizer's share is the step's 12 B per parameter, so MrGD and SGD should take the same time (ratio ~1.0).

Everything runs with one torch thread (``torch.set_num_threads(1)``) and one inductor compile thread; times
are medians of round-robin interleaved calls (benchmarks/_common.time_interleaved). Each compiled callable
is compiled once before timing, and the benchmark records its graph count before and after the timed calls
(a recompile during timing would show as a change).

Run: python benchmarks/bench_compile.py [--size 16] [--repeats 15] [--quick] [--out DIR]
Writes OUT/compile_cpu.json and OUT/compile_cpu.md (machine, torch version and date included; OUT:
benchmarks/results by default, benchmarks/results/quick with --quick).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
import torch._inductor.config
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mrgd_ext  # noqa: E402
from _common import (  # noqa: E402
    RESULTS_DIR,
    copy_bandwidth,
    machine_info,
    markdown_header,
    markdown_table,
    time_interleaved,
    write_results,
)
from bench_step import model_like_params  # noqa: E402

BYTES_PER_ELEMENT = 12  # float32: read p, read g, write p
#: Rates of the cycle walked by the timed MrGD steps: tiny, so parameters stay bounded over many steps; three
#: distinct values, so a compiled step that recompiled per rate would show.
STEP_CYCLE = (1e-7, 2e-7, 3e-7)
TOP_KEYS = ("machine", "settings", "load_average_1min", "copy_bandwidth_GBps", "byte_floor", "step", "training")


def compiled(fn: Callable[..., Any]) -> tuple[Callable[..., Any], CompileCounterWithBackend]:
    counter = CompileCounterWithBackend("inductor")
    return torch.compile(fn, backend=counter), counter


def compile_seconds(fn: Callable[[], Any], calls: int = 2) -> float:
    """Wall time of the first calls (the compilation; two calls, as Dynamo may restart its analysis once)."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - t0


def bench_step(n_total: int, bandwidth: float, repeats: int) -> dict:
    params = model_like_params(n_total, torch.float32, "cpu")
    for p in params:
        p.grad = torch.randn_like(p)
    n = sum(p.numel() for p in params)
    eager = mrgd_ext.MrGD(params, plan=STEP_CYCLE, fused=True)
    sgd = torch.optim.SGD(params, lr=STEP_CYCLE[0], fused=True)
    comp_opt = mrgd_ext.MrGD(params, plan=STEP_CYCLE)
    comp_step, counter = compiled(comp_opt.step)
    seconds = compile_seconds(comp_step)
    graphs_before = counter.frame_count
    timings = time_interleaved(
        {"mrgd_eager_fused": eager.step, "mrgd_compiled": comp_step, "sgd_eager_fused": sgd.step}, "cpu",
        repeats=repeats,
    )
    row: dict[str, Any] = {"n": n, "tensors": len(params), "compile_s": seconds,
                           "graphs_after_compile": graphs_before, "graphs_after_timing": counter.frame_count}
    for name, t in timings.items():
        row[f"{name}_ms"] = 1e3 * t["median_s"]
        row[f"{name}_iqr_ms"] = 1e3 * t["iqr_s"]
        row[f"{name}_GBps"] = BYTES_PER_ELEMENT * n / t["median_s"] / 1e9
        row[f"{name}_of_copy_bw"] = row[f"{name}_GBps"] / bandwidth
    # > 1: the compiled step is faster than the eager fused one.
    row["eager_fused_over_compiled"] = row["mrgd_eager_fused_ms"] / row["mrgd_compiled_ms"]
    row["target_met"] = row["mrgd_compiled_ms"] <= row["mrgd_eager_fused_ms"]
    # Against the stock fused step with the same byte floor (> 1: MrGD slower).
    row["compiled_over_sgd_fused"] = row["mrgd_compiled_ms"] / row["sgd_eager_fused_ms"]
    row["eager_fused_over_sgd_fused"] = row["mrgd_eager_fused_ms"] / row["sgd_eager_fused_ms"]
    return row


def mlp(sizes: tuple[int, ...], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


TRAINING_OPTIMIZERS: dict[str, Callable[[Any, float], torch.optim.Optimizer]] = {
    # MrGD walks a cycle of one rate repeated, so its trajectory must equal SGD's (checked before timing).
    "mrgd": lambda params, lr: mrgd_ext.MrGD(params, plan=(lr, lr, lr)),
    "sgd_fused": lambda params, lr: torch.optim.SGD(params, lr=lr, fused=True),
    "sgd_foreach": lambda params, lr: torch.optim.SGD(params, lr=lr, foreach=True),
}


def make_training_step(sizes: tuple[int, ...], opt_name: str, lr: float, compile_step: bool = True):
    """A training step with the model compiled (forward and backward) and, by default, the optimizer step."""
    model = mlp(sizes)
    opt = TRAINING_OPTIMIZERS[opt_name](list(model.parameters()), lr)
    model_c = torch.compile(model, backend="inductor")
    step, counter = compiled(opt.step) if compile_step else (opt.step, None)
    loss_fn = nn.CrossEntropyLoss()

    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(model_c(x), y)
        loss.backward()
        step()
        return loss.detach()

    return train_step, model, counter


def bench_training(sizes: tuple[int, ...], batch: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, sizes[0], generator=gen)
    y = torch.randint(0, sizes[-1], (batch,), generator=gen)
    lr = 1e-3
    variants = {name: make_training_step(sizes, name, lr) for name in TRAINING_OPTIMIZERS}
    variants["mrgd_eager_step"] = make_training_step(sizes, "mrgd", lr, compile_step=False)
    row: dict[str, Any] = {"sizes": list(sizes), "batch": batch,
                           "parameters": sum(p.numel() for p in mlp(sizes).parameters())}
    for name, (fn, _, _) in variants.items():
        row[f"{name}_compile_s"] = compile_seconds(lambda fn=fn: fn(x, y))
    # The same work: after the same steps every variant holds the same parameters (float32; the fused and
    # foreach updates round alike, so the difference is a few ulps at most).
    ref = [p.detach() for p in variants["sgd_fused"][1].parameters()]
    worst = 0.0
    for _, model, _ in variants.values():
        for p, q in zip(model.parameters(), ref):
            worst = max(worst, float(((p.detach() - q).abs() / (q.abs() + 1e-6)).max()))
    row["max_rel_param_diff_vs_sgd_fused"] = worst
    row["same_trajectory"] = worst < 1e-4
    graphs = {name: c.frame_count for name, (_, _, c) in variants.items() if c is not None}
    timings = time_interleaved({name: (lambda fn=fn: fn(x, y)) for name, (fn, _, _) in variants.items()}, "cpu",
                               repeats=repeats)
    row["no_recompile_while_timing"] = all(
        c.frame_count == graphs[name] for name, (_, _, c) in variants.items() if c is not None)
    for name, t in timings.items():
        row[f"{name}_ms"] = 1e3 * t["median_s"]
        row[f"{name}_iqr_ms"] = 1e3 * t["iqr_s"]
    # > 1: MrGD's training step is slower than SGD's.
    row["mrgd_over_sgd_fused"] = row["mrgd_ms"] / row["sgd_fused_ms"]
    row["mrgd_over_sgd_foreach"] = row["mrgd_ms"] / row["sgd_foreach_ms"]
    return row


def markdown(payload: dict) -> str:
    s, t = payload["step"], payload["training"]
    md = markdown_header("torch.compile of MrGD (inductor, CPU)", payload["machine"])
    md += (f"Measured copy bandwidth (read + write, float32, {payload['settings']['copy_Mi']} Mi elements): "
           f"{payload['copy_bandwidth_GBps']:.1f} GB/s\n\n")
    load = payload["load_average_1min"]
    md += (f"1-minute load average of the machine (other processes included): {load['before']:.1f} before, "
           f"{load['after']:.1f} after\n\n")
    md += f"Byte floor: {payload['byte_floor']}\n\n"
    md += ("(The copy counts 8 B per element, but a write-allocate cache also reads the destination first: 12 B "
           "move. A step at its 12 B floor can therefore show up to 1.5x the copy bandwidth.)\n\n")
    md += f"## Step at {s['n']} parameters ({s['tensors']} tensors, float32), median of interleaved calls\n\n"
    md += markdown_table(
        ["step", "ms", "IQR ms", "GB/s at the floor", "of copy BW"],
        [[name, s[f"{key}_ms"], s[f"{key}_iqr_ms"], s[f"{key}_GBps"], s[f"{key}_of_copy_bw"]]
         for name, key in (("MrGD eager, fused kernel", "mrgd_eager_fused"),
                           ("MrGD compiled (inductor)", "mrgd_compiled"),
                           ("SGD(fused=True) eager", "sgd_eager_fused"))],
    )
    verdict = "met" if s["target_met"] else "MISSED"
    md += (f"\nEager fused / compiled: {s['eager_fused_over_compiled']:.3f} (> 1: compiled faster). Target "
           f"(compiled no slower than eager fused): **{verdict}**. Compilation {s['compile_s']:.1f} s; graphs "
           f"{s['graphs_after_compile']} after compiling, {s['graphs_after_timing']} after the timed calls. Against "
           f"SGD(fused=True) eager (> 1: MrGD slower): compiled {s['compiled_over_sgd_fused']:.3f}, eager fused "
           f"{s['eager_fused_over_sgd_fused']:.3f}.\n\n")
    md += (f"## Training step: MLP {'-'.join(map(str, t['sizes']))} ({t['parameters']} parameters), batch "
           f"{t['batch']}, cross-entropy; model compiled, step compiled\n\n")
    md += markdown_table(
        ["optimizer", "ms per training step", "IQR ms", "compile s"],
        [[name, t[f"{key}_ms"], t[f"{key}_iqr_ms"], t[f"{key}_compile_s"]]
         for name, key in (("MrGD (step compiled)", "mrgd"), ("SGD(fused=True) (step compiled)", "sgd_fused"),
                           ("SGD(foreach=True) (step compiled)", "sgd_foreach"),
                           ("MrGD (step eager, fused kernel)", "mrgd_eager_step"))],
    )
    md += (f"\nMrGD / SGD(fused=True): {t['mrgd_over_sgd_fused']:.3f}; MrGD / SGD(foreach=True): "
           f"{t['mrgd_over_sgd_foreach']:.3f} (> 1: MrGD slower). Same parameters after the compile calls "
           f"(largest relative difference {t['max_rel_param_diff_vs_sgd_fused']:.2g}): {t['same_trajectory']}; "
           f"no recompile while timing: {t['no_recompile_while_timing']}. Compile s: the first two calls; the "
           "variants after the first reuse inductor's cache of the model's graphs.\n")
    return md


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16, help="parameters of the step benchmark, in Mi elements")
    ap.add_argument("--mlp", default="256,512,512,10", help="MLP layer widths, comma separated")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (smoke run)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    out = args.out
    if args.quick:
        args.size, args.mlp, args.batch, args.repeats = 1, "16,32,10", 8, 4
        out = out if out is not None else RESULTS_DIR / "quick"
    torch.set_num_threads(1)
    torch._inductor.config.compile_threads = 1
    torch._dynamo.reset()
    info = machine_info("cpu")
    load_before = os.getloadavg()[0]  # other processes share the machine: say how busy it was
    copy_mi = 1 if args.quick else 64
    bandwidth = copy_bandwidth("cpu", numel=copy_mi * 2**20)
    step = bench_step(args.size * 2**20, bandwidth, args.repeats)
    print(step, flush=True)
    training = bench_training(tuple(int(v) for v in args.mlp.split(",")), args.batch, args.repeats)
    print(training, flush=True)
    payload = {
        "machine": info,
        "settings": {"size_Mi": args.size, "mlp": args.mlp, "batch": args.batch, "repeats": args.repeats,
                     "quick": args.quick, "copy_Mi": copy_mi, "torch_threads": torch.get_num_threads(),
                     "step_cycle": STEP_CYCLE},
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "copy_bandwidth_GBps": bandwidth,
        "byte_floor": (f"{BYTES_PER_ELEMENT} B per element per step (float32: read p, read g, write p), for the "
                       "eager fused kernel, the compiled step and SGD(fused=True) alike"),
        "step": step,
        "training": training,
    }
    md = markdown(payload)
    json_path, md_path = write_results("compile_cpu", payload, md, out)
    print(md)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
