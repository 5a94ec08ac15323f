"""Run a function on ``world`` gloo ranks (spawned processes) with a hard time limit, so a hang fails a test.

The worker receives ``(rank, world, init_file, out_dir, *args)`` and initialises nothing itself:
:func:`init_gloo` sets up the process group with a short collective timeout, so a rank left waiting for a
peer raises instead of blocking.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import sys
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

#: Seconds any one collective may wait for a peer before gloo raises. Generous: on a loaded machine one rank
#: can lag another by tens of seconds (importing torch._dynamo for DDP/FSDP alone can take that long).
COLLECTIVE_TIMEOUT_S = 120
#: Seconds a whole spawned run may take before the test fails and the ranks are killed. A run takes ~5-20 s
#: on an idle machine but minutes on a heavily shared one (MRGD_DIST_TIMEOUT overrides).
RUN_TIMEOUT_S = float(os.environ.get("MRGD_DIST_TIMEOUT", 480))


def init_gloo(rank: int, world: int, init_file: str) -> None:
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                           timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def _rank(rank: int, fn, dump_after: float, *args) -> None:
    # A rank still running near the run's limit prints every thread's stack and exits, so a hang fails with
    # the place it hung in the test's output.
    faulthandler.dump_traceback_later(dump_after, exit=True)
    # A rank that finished exits at once, without tearing down what it built: a DistributedDataParallel
    # wrapper destroyed after its process group (the workers call destroy_process_group in their finally
    # blocks, and their locals die when they return) hangs in its reducer's destructor in about one run of
    # eight (measured with examples/ddp_automrgd.py under torchrun, gloo on CPU: 0 of 64 once the wrapper is
    # released before the group). A reference to the worker's frame, taken as it starts, keeps its locals alive
    # past its return (CPython moves them into the frame object); os._exit then skips their teardown. The
    # results are on disk already.
    kept = []

    def keep_worker_frame(frame, event, _arg):
        if event == "call" and frame.f_code is fn.__code__:
            kept.append(frame)
            sys.setprofile(None)

    sys.setprofile(keep_worker_frame)
    try:
        fn(rank, *args)
    finally:
        sys.setprofile(None)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class _Hung(Exception):
    pass


def _run_once(fn, world: int, out_dir: str, args: tuple, timeout: float) -> None:
    init_file = os.path.join(out_dir, f"init_{time.monotonic_ns()}")
    ctx = mp.spawn(_rank, args=(fn, 0.9 * timeout, world, init_file, out_dir, *args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            raise _Hung(f"{getattr(fn, '__name__', fn)} on {world} ranks did not finish within {timeout} s")


def run_ranks(fn, world: int, out_dir, *args, timeout: float = RUN_TIMEOUT_S) -> None:
    """Spawn ``world`` processes running ``fn(rank, world, init_file, out_dir, *args)`` (``out_dir``: a
    directory for the ranks' results, e.g. pytest's ``tmp_path``). Fails the test when a rank raises or when
    the run exceeds ``timeout`` seconds (then every rank is killed).

    A run that hangs (a rank still alive at 0.9 ``timeout``: it dumps its stacks and exits) is run once more
    (a teardown hang is known: see ``_rank``); a second hang fails the test, as does any rank error."""
    out_dir = str(out_dir)
    for attempt in (1, 2):
        start = time.monotonic()
        try:
            _run_once(fn, world, out_dir, args, timeout)
            return
        except (_Hung, mp.ProcessExitedException) as exc:
            hung = isinstance(exc, _Hung) or time.monotonic() - start >= 0.85 * timeout
            if not hung:
                raise
            if attempt == 2:
                pytest.fail(f"{getattr(fn, '__name__', fn)} on {world} ranks hung twice: {exc}")
            print(f"[_spawn] {getattr(fn, '__name__', fn)} hung ({exc}); running it once more", file=sys.stderr)
