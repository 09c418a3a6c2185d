"""Figures for evaluation and comparison reports (matplotlib, Agg backend, PNG files).

Sizes and DPI are chosen so a 20-breed confusion matrix is readable and every PNG stays well
under 300 KB, small enough to commit next to the docs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI; must happen before pyplot is imported
import matplotlib.lines  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..plotting import save_figure  # noqa: E402
from .metrics import CalibrationBins  # noqa: E402

DPI = 100


def _save(fig, path: str | Path) -> Path:
    return save_figure(fig, path, dpi=DPI, tight_bbox=True)


def plot_confusion_matrix(matrix, names: Sequence[str], path: str | Path, title: str = "Confusion matrix") -> Path:
    """Rows are true breeds, columns predicted. Colour is the row-normalised rate (so rare
    breeds are as visible as common ones); the number in each cell is the raw count."""
    matrix = np.asarray(matrix)
    n = len(names)
    if matrix.shape != (n, n):
        raise ValueError(f"confusion matrix shape {matrix.shape} does not match {n} class names")
    row_sums = matrix.sum(axis=1, keepdims=True)
    rates = np.divide(matrix, row_sums, out=np.zeros(matrix.shape, dtype=float), where=row_sums > 0)
    side = max(4.0, 0.45 * n + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true breed")
    ax.set_xticks(range(n), labels=names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels=names, fontsize=8)
    ax.set_xlabel("predicted breed")
    ax.set_ylabel("true breed")
    ax.set_title(title)
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    return _save(fig, path)


def plot_reliability(bins: CalibrationBins, path: str | Path, ece: float, title: str = "Reliability diagram") -> Path:
    """Accuracy per confidence bin beside its mean confidence and the diagonal of perfect
    calibration, with the number of images per bin underneath (empty bins are left out)."""
    edges = np.asarray(bins.edges)
    width = np.diff(edges)
    centres = edges[:-1] + width / 2
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    filled = np.asarray(bins.count) > 0
    top.bar(centres[filled], np.asarray(bins.accuracy)[filled], width=width[filled], edgecolor="black",
            color="tab:blue", alpha=0.8, label="accuracy")
    # Confidence as an unfilled red outline: where red is above blue the model is
    # over-confident, where blue pokes out above red it is under-confident.
    top.bar(centres[filled], np.asarray(bins.confidence)[filled], width=width[filled], fill=False,
            edgecolor="tab:red", linewidth=1.5, label="mean confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"{title}\nECE = {ece:.3f} ({len(centres)} bins)")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, bins.count, width=width, color="gray", edgecolor="black")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (max probability)")
    bottom.set_ylabel("images")
    return _save(fig, path)


def plot_training_curves(histories: dict[str, dict[str, list]], path: str | Path,
                         title: str = "Validation accuracy and loss per epoch") -> Path:
    """One figure for all models: val top-1 on the left, loss on the right (val solid,
    train dashed). `histories[model] = {"epoch": [...], "val_top1": [...], "val_loss": [...],
    "train_loss": [...]}`; missing series are simply not drawn. One legend (a colour per
    model) sits under both panels so it never hides a curve."""
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    handles = []
    for index, (name, series) in enumerate(histories.items()):
        colour = f"C{index % 10}"
        epochs = series.get("epoch", [])
        handles.append(matplotlib.lines.Line2D([], [], color=colour, marker="o", markersize=3, label=name))
        if series.get("val_top1"):
            acc_ax.plot(epochs, [100 * v for v in series["val_top1"]], marker="o", markersize=3, color=colour)
        if series.get("val_loss"):
            loss_ax.plot(epochs, series["val_loss"], marker="o", markersize=3, color=colour)
        if series.get("train_loss"):
            loss_ax.plot(epochs, series["train_loss"], linestyle="--", color=colour, alpha=0.7)
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("val top-1 (%)")
    acc_ax.grid(alpha=0.3)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("cross-entropy loss")
    loss_ax.set_title("solid: val, dashed: train (train includes label smoothing)", fontsize=9)
    loss_ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, max(1, len(handles))),
               fontsize=8, frameon=False)
    return _save(fig, path)


def plot_accuracy_vs_gmacs(rows: Sequence[dict], path: str | Path,
                           title: str = "Test top-1 vs compute (bubble area ~ parameters)") -> Path:
    """Bubble chart: x = GMACs per image, y = test top-1, bubble area proportional to
    parameters. `rows` hold "name", "gmacs", "top1" (0..1) and "params_m"."""
    fig, ax = plt.subplots(figsize=(7, 5))
    largest = max((r["params_m"] for r in rows), default=1.0) or 1.0
    for index, row in enumerate(rows):
        area = 2000.0 * row["params_m"] / largest + 30.0  # +30 keeps tiny models visible
        ax.scatter(row["gmacs"], 100 * row["top1"], s=area, alpha=0.5, color=f"C{index % 10}",
                   edgecolors="black", label=f"{row['name']} ({row['params_m']:.1f} M params)")
        ax.annotate(row["name"], (row["gmacs"], 100 * row["top1"]), textcoords="offset points",
                    xytext=(0, 12), ha="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("GMACs per image (log scale)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.margins(x=0.3, y=0.25)
    ax.legend(fontsize=8, loc="lower right", markerscale=0.4)
    return _save(fig, path)
