"""The two matplotlib chores every figure shares: the Agg backend (files only, no display on
servers or CI) and saving a figure (folder created, figure closed so long runs don't leak)."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use (the CLI stays light)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 100, tight_bbox: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, **({"bbox_inches": "tight"} if tight_bbox else {}))
    pyplot().close(fig)
    return path
