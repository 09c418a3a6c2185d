"""How cost grows: throughput and peak memory of the fastest path against batch and input size.

Each point runs in a fresh Python process (`python -m dogbreeds.bench.scaling ONNX BATCH SIZE
ROUNDS`), so its peak resident memory (the kernel's VmHWM for the process) belongs to that point
alone (getrusage's ru_maxrss would not do: Linux carries it over fork+exec from the parent); the
table also gives the RSS just before the first batch (process + onnxruntime session + weights),
so the difference is what the batch itself costs. The points run one after another, not
interleaved: the machine's load can drift between them (the inference table is the
side-by-side comparison).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status: the memory measurement needs Linux")


def current_rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """High-water mark of this process's resident memory (VmHWM), MB."""
    return _status_mb("VmHWM")


def point(onnx_path: str, batch: int, size: int, rounds: int) -> dict:
    """One measurement, in this process (meant to be a fresh one)."""
    from ..infer.runtime_onnxruntime import OrtBackend

    engine = OrtBackend(onnx_path)
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    before = current_rss_mb()
    engine.forward(x)  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        engine.forward(x)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    peak = peak_rss_mb()
    return {"batch": batch, "size": size, "ms": seconds * 1000, "images_per_s": batch / seconds,
            "rss_before_mb": before, "peak_rss_mb": peak, "batch_mb": peak - before}


def measure(onnx_path: Path, batches: list[int], sizes: list[int], rounds: int, log=print) -> list[dict]:
    """Batch sweep at 224 px and size sweep at batch 16 (each point in its own process)."""
    grid = [(b, 224) for b in batches] + [(16, s) for s in sizes if s != 224 or 16 not in batches]
    rows = []
    for batch, size in grid:
        done = subprocess.run([sys.executable, "-m", "dogbreeds.bench.scaling", str(onnx_path), str(batch), str(size),
                               str(rounds)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"scaling point batch {batch} size {size} failed: {done.stderr.strip()[-500:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        log(f"  scaling batch {batch:3d} size {size}: {row['images_per_s']:.2f} img/s, {row['ms']:.0f} ms, "
            f"peak RSS {row['peak_rss_mb']:.0f} MB (+{row['batch_mb']:.0f})")
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path, model: str) -> None:
    from ..plotting import pyplot, save_figure

    plt = pyplot()

    by_batch = sorted((r for r in rows if r["size"] == 224), key=lambda r: r["batch"])
    by_size = sorted((r for r in rows if r["batch"] == 16), key=lambda r: r["size"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    b = [r["batch"] for r in by_batch]
    axes[0].plot(b, [r["images_per_s"] for r in by_batch], "o-")
    axes[0].set(xscale="log", xlabel="batch size (224 px)", ylabel="images/s", title="throughput vs batch")
    axes[0].set_ylim(bottom=0)
    axes[1].plot(b, [r["peak_rss_mb"] for r in by_batch], "o-", label="peak RSS")
    axes[1].plot(b, [r["batch_mb"] for r in by_batch], "s--", label="peak minus RSS before first batch")
    axes[1].set(xscale="log", xlabel="batch size (224 px)", ylabel="MB", title="peak memory vs batch")
    axes[1].legend(fontsize=8)
    s = [r["size"] for r in by_size]
    axes[2].plot(s, [r["images_per_s"] for r in by_size], "o-", label="images/s")
    twin = axes[2].twinx()
    twin.plot(s, [r["peak_rss_mb"] for r in by_size], "s--", color="tab:red", label="peak RSS (MB)")
    axes[2].set(xlabel="input size (batch 16)", ylabel="images/s", title="input size")
    axes[2].set_ylim(bottom=0)
    twin.set_ylabel("peak RSS (MB)", color="tab:red")
    for ax in axes[:2]:
        ax.set_xticks(b)
        ax.set_xticklabels([str(v) for v in b])
    fig.suptitle(f"{model}: dogbreeds engine (onnxruntime), fp32, one process per point", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    onnx_file, batch_arg, size_arg, rounds_arg = sys.argv[1:5]
    print(json.dumps(point(onnx_file, int(batch_arg), int(size_arg), int(rounds_arg))))
