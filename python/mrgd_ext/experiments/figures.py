"""Shared pieces of the reports the experiments write: a matplotlib figure that needs no display, and the
description of the machine a result was measured on."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import numpy as np
import torch

__all__ = ["new_figure", "machine_info"]


def new_figure(width: float, height: float):
    """A matplotlib ``Figure`` (inches) on the Agg canvas, independent of pyplot's global state and display.

    Raises ``ModuleNotFoundError`` (name ``"matplotlib"``) with the install hint when matplotlib is missing.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ModuleNotFoundError(
            "plots need matplotlib (pip install 'mrgd_ext[plot]')", name="matplotlib"
        ) from exc
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def machine_info() -> dict[str, Any]:
    """Platform, CPU, Python, torch and numpy versions and torch's thread count, recorded beside results."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
    }
