"""The Lanczos orthogonalisation step: fused kernel vs the pure-torch composition it replaces.

One step = CGS2 of a block V [b, n] against the basis Q [m, n] plus the Gram matrix of the result and the
input norms (what ``mrgd_ext.curvature.lanczos`` does once per block iteration):

* ``kernel``: ``torch.ops.mrgd_ext.block_orthogonalize_`` (3 passes over Q, NOTE: [fused passes] in
  csrc/cpu/block_orthogonalize.cpp);
* ``torch``: ``mrgd_ext.ops.lanczos_reference.block_orthogonalize``: per round ``C = V @ Q.T`` and
  ``V.addmm_(C, Q, alpha=-1)``, then ``V @ V.T`` (4 passes over Q, BLAS).

Timed round-robin (``time_interleaved``) so both see the same machine state; median of ``--repeats``.
Bandwidth = bytes of Q each implementation must read (3 or 4 passes) / time, against the measured copy
bandwidth. Writes benchmarks/results/lanczos_step_<device>.{json,md}.

    python benchmarks/bench_lanczos_step.py [--device cpu] [--repeats 7] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    copy_bandwidth,
    machine_info,
    markdown_header,
    markdown_table,
    time_interleaved,
    write_results,
)
from mrgd_ext.ops import lanczos_ops as _lanczos_ops  # noqa: E402
from mrgd_ext.ops import lanczos_reference as _lanczos_reference  # noqa: E402


def cases(quick: bool):
    ns = [10**5, 10**6] if quick else [10**5, 10**6, 4 * 10**6]
    for dtype in (torch.float32, torch.float64):
        for n in ns:
            if dtype == torch.float64 and n > 10**6:
                continue  # the float64 rows show the trend; 4e6 x 64 x 8 B = 2 GB per basis copy
            for m in (16, 64):
                for b in (1, 4, 8):
                    yield dtype, n, m, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="skip n = 4e6")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    device = args.device
    if not _lanczos_ops.has_block_orthogonalize_kernel(torch.device(device).type):
        raise SystemExit(f"no block_orthogonalize_ kernel for {device} in this build")
    info = machine_info(device)
    bw = copy_bandwidth(device)
    rows = []
    results = []
    for dtype, n, m, b in cases(args.quick):
        g = torch.Generator().manual_seed(0)
        Q = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float32))[0].T.contiguous().to(device, dtype)
        V0 = torch.randn(b, n, generator=g, dtype=torch.float32).to(device, dtype)
        Vk, Vt = V0.clone(), V0.clone()

        def run_kernel(Q=Q, V0=V0, Vk=Vk):
            Vk.copy_(V0)
            _lanczos_ops.block_orthogonalize_(Q, Vk, 2)

        def run_torch(Q=Q, V0=V0, Vt=Vt):
            Vt.copy_(V0)
            _lanczos_reference.block_orthogonalize(Q, Vt, 2)

        # Reset V each call so both always orthogonalise the same input; the copy costs the same for both.
        t = time_interleaved({"kernel": run_kernel, "torch": run_torch}, device, warmup=2, repeats=args.repeats)
        elem = torch.finfo(dtype).bits // 8
        q_bytes = m * n * elem
        tk, tt = t["kernel"]["median_s"], t["torch"]["median_s"]
        entry = {
            "dtype": str(dtype).replace("torch.", ""),
            "n": n,
            "m": m,
            "b": b,
            "kernel_s": tk,
            "torch_s": tt,
            "speedup": tt / tk,
            "kernel_iqr_s": t["kernel"]["iqr_s"],
            "torch_iqr_s": t["torch"]["iqr_s"],
            "kernel_GBps": 3 * q_bytes / tk / 1e9,
            "torch_GBps": 4 * q_bytes / tt / 1e9,
        }
        results.append(entry)
        rows.append([entry["dtype"], n, m, b, tk * 1e3, tt * 1e3, entry["speedup"], entry["kernel_GBps"],
                     entry["torch_GBps"]])
        print(f"{entry['dtype']} n={n:>8} m={m:>3} b={b}: kernel {tk * 1e3:8.2f} ms  torch {tt * 1e3:8.2f} ms  "
              f"speedup {entry['speedup']:.2f}", flush=True)
    wins = sum(r["speedup"] > 1.0 for r in results)
    geo = 1.0
    for r in results:
        geo *= r["speedup"]
    geo **= 1.0 / len(results)
    summary = {
        "cases": len(results),
        "kernel_faster_in": wins,
        "geometric_mean_speedup": geo,
        "min_speedup": min(r["speedup"] for r in results),
        "max_speedup": max(r["speedup"] for r in results),
        "copy_bandwidth_GBps": bw,
    }
    payload = {"machine": info, "summary": summary, "results": results}
    md = markdown_header("Lanczos orthogonalisation step: fused kernel vs pure-torch composition", info)
    md += (
        "\nOne CGS2 step of a block V [b, n] against a basis Q [m, n] + Gram matrix + input norms. "
        "`kernel` = `mrgd_ext::block_orthogonalize_` (3 passes over Q); `torch` = two rounds of "
        "`C = V @ Q.T; V.addmm_(C, Q, alpha=-1)` then `V @ V.T` (4 passes over Q). Median of "
        f"{args.repeats} interleaved runs. GB/s = bytes of Q read / time (copy bandwidth measured: "
        f"{bw:.1f} GB/s read+write).\n\n"
    )
    md += markdown_table(
        ["dtype", "n", "m", "b", "kernel ms", "torch ms", "speedup", "kernel GB/s", "torch GB/s"], rows
    )
    md += (
        f"\nKernel faster in {wins} of {len(results)} cases; geometric-mean speedup {geo:.2f}x "
        f"(min {summary['min_speedup']:.2f}x, max {summary['max_speedup']:.2f}x).\n"
    )
    paths = write_results(f"lanczos_step_{torch.device(device).type}", payload, md, args.out)
    print(md)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
