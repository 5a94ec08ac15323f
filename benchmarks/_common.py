"""Shared benchmark plumbing: machine facts, robust timing, result files (JSON + markdown)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict:
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda_version"] = torch.version.cuda
    try:
        import mrgd_ext

        info["mrgd_ext_build"] = mrgd_ext.build_info()
    except Exception as exc:  # the benchmark still records what it can
        info["mrgd_ext_build"] = f"unavailable: {exc}"
    return info


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str = "cpu", *, warmup: int = 3, repeats: int = 15,
              min_time: float = 0.0) -> dict:
    """Median wall time of ``fn`` (seconds) over ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    start_all = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - start_all < min_time:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "repeats": len(samples),
        "iqr_s": (statistics.quantiles(samples, n=4)[2] - statistics.quantiles(samples, n=4)[0])
        if len(samples) >= 4 else 0.0,
    }


def time_interleaved(fns: dict[str, Callable[[], object]], device: str = "cpu", *, warmup: int = 3,
                     repeats: int = 15) -> dict[str, dict]:
    """Median wall time of each candidate, timed round-robin (A, B, C, A, B, C, ...).

    Interleaving makes the comparison fair on a machine whose speed drifts (shared hosts, turbo, other
    processes): every candidate sees the same conditions, so ratios stay meaningful even when absolute
    times move.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - t0)
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) >= 4 else [min(s), 0, max(s)]
        out[name] = {"median_s": statistics.median(s), "min_s": min(s), "repeats": len(s), "iqr_s": q[2] - q[0]}
    return out


def copy_bandwidth(device: str = "cpu", numel: int = 64 * 2**20) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + bytes written per second), float32."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = time_call(lambda: dst.copy_(src), device, warmup=3, repeats=10)
    return 2 * numel * 4 / t["median_s"] / 1e9


def write_results(name: str, payload: dict, markdown: str, out_dir: Path | None = None) -> tuple[Path, Path]:
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{name}.json"
    md_path = out / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def markdown_header(title: str, info: dict) -> str:
    lines = [f"# {title}", ""]
    lines.append(f"- date: {info['date']}")
    lines.append(f"- machine: {info['cpu']} ({info['cpu_count']} logical CPUs, torch threads {info['torch_threads']})")
    if "gpu" in info:
        lines.append(f"- GPU: {info['gpu']} ({info['gpu_memory_gib']} GiB), CUDA {info['cuda_version']}")
    lines.append(f"- torch {info['torch_version']}, Python {info['python']}, device {info['device']}")
    lines.append("")
    return "\n".join(lines)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(out) + "\n"
