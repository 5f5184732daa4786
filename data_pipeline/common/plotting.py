"""Plots as files, on machines with no display (a cluster node, a CI runner)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from data_pipeline.common.files import write_atomically


def headless_pyplot() -> ModuleType:
    """matplotlib's pyplot, drawing to files only."""
    import matplotlib  # deferred: half a second to import, and only the commands that draw need it

    matplotlib.use("Agg")
    import matplotlib.pyplot  # deferred: as above

    return matplotlib.pyplot


def log_norm(low: float, high: float) -> Any:
    """A colour scale over [low, high] in log space (a colour per model size)."""
    return headless_pyplot().matplotlib.colors.LogNorm(low, high)


def save_png(figure: Any, path: Path) -> Path:
    """`figure` laid out and written to `path` durably; the figure is closed."""
    figure.tight_layout()
    try:
        return write_atomically(path, lambda temporary: figure.savefig(temporary, format="png"))
    finally:
        headless_pyplot().close(figure)
