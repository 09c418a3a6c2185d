"""Nothing lost: SIGKILL at any moment, Ctrl-C or SIGTERM, then rerun -> bit-identical to an unbroken run.

Each run is `python -m dogbreeds.cli train ...` in a subprocess, on tiny real photos with the
full augmentation (RandAugment, erasing, mixup/cutmix), drop_path and EMA, so every random
stream and every piece of state must come back exactly.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

EPOCHS = 4


def _command(data: Path, out: Path, workers: int = 0) -> list[str]:
    return [sys.executable, "-m", "dogbreeds.cli", "train", "--data", str(data), "--model", "convnext_atto",
            "--breeds", "all", "--out", str(out), "--epochs", str(EPOCHS), "--batch-size", "2",
            "--input-size", "32", "--workers", str(workers), "--precision", "fp32", "--deterministic", "--lr", "1e-3",
            "--warmup-epochs", "0.5", "--val-fraction", "0.2", "--test-fraction", "0.2", "--drop-path", "0.1",
            "--ema-decay", "0.9", "--no-channels-last", "--augment", "convnext"]


def _start(data: Path, out: Path, workers: int = 0, own_group: bool = False) -> subprocess.Popen:
    return subprocess.Popen(_command(data, out, workers), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=own_group)


def _finish(data: Path, out: Path) -> str:
    done = subprocess.run(_command(data, out), capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"run ended before {path} appeared: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout}s"
        time.sleep(0.01)


def _epoch_seconds(run: Path) -> float:
    """The reference run's median training time of one epoch (metrics.jsonl's epoch_time)."""
    times = sorted(json.loads(line)["epoch_time"] for line in (run / "metrics.jsonl").read_text().splitlines())
    return times[len(times) // 2]


def _assert_same_run(run: Path, reference: Path) -> None:
    for name in ("last.safetensors", "best.safetensors"):
        mine, theirs = load_file(run / "checkpoints" / name), load_file(reference / "checkpoints" / name)
        assert mine.keys() == theirs.keys()
        different = [k for k in theirs if not torch.equal(mine[k], theirs[k])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"

    def metrics(path):  # timings differ, the numbers must not
        lines = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in line.items() if k not in ("epoch_time", "images_per_s")} for line in lines]

    assert metrics(run) == metrics(reference)
    assert len(metrics(run)) == EPOCHS
    assert not list((run / "checkpoints").glob(".*.tmp")), "a killed write left a temporary file behind"


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("reference") / "run"
    started = time.monotonic()
    _finish(tiny_data, out)
    return out, time.monotonic() - started


def test_sigkill_after_first_checkpoint_and_at_a_random_moment_then_resume_is_bit_identical(
        tiny_data, tmp_path, reference):
    out = tmp_path / "run"
    # 1. kill -9 the moment the first epoch's checkpoint appears
    process = _start(tiny_data, out)
    _wait_for(out / "checkpoints" / "resume.pt", process)
    process.kill()
    process.wait()
    assert torch.load(out / "checkpoints" / "resume.pt", weights_only=True)["epoch"] < EPOCHS
    # 2. resume, and kill -9 again at a random moment (maybe mid-write of a checkpoint)
    seed = random.randrange(10**6)
    process = _start(tiny_data, out)
    time.sleep(random.Random(seed).uniform(0.1, 1.0) * reference[1])
    killed = process.poll() is None
    process.kill()
    process.wait()
    print(f"random kill: seed {seed}, killed={killed}")
    # 3. resume to the end
    assert "resuming" in _finish(tiny_data, out)
    _assert_same_run(out, reference[0])


def test_ctrl_c_saves_mid_epoch_exits_cleanly_and_resumes_bit_identically(tiny_data, tmp_path, reference):
    out = tmp_path / "run"
    process = _start(tiny_data, out)
    _wait_for(out / "checkpoints" / "resume.pt", process)
    # A signal that lands while epoch 0 is still being saved stops at that epoch's end (by design, so
    # no partial state); wait into epoch 1's training steps so that this test stops mid-epoch.
    time.sleep(0.4 * _epoch_seconds(reference[0]))
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "checkpoint saved" in stderr and "Traceback" not in stderr
    state = torch.load(out / "checkpoints" / "resume.pt", weights_only=True)
    assert state["partial"] is not None and 0 < state["micro_done"], "expected a mid-epoch checkpoint"
    assert "resuming" in _finish(tiny_data, out)
    _assert_same_run(out, reference[0])


def test_sigterm_to_every_process_saves_exits_like_ctrl_c_and_resumes_bit_identically(tiny_data, tmp_path, reference):
    """What SLURM or a shell's `kill -TERM -PGID` does: the signal reaches the training process
    and its loader workers at once. The workers must leave it to the training process (before,
    they died and the run ended in a "DataLoader worker ... killed by signal" traceback)."""
    out = tmp_path / "run"
    process = _start(tiny_data, out, workers=2, own_group=True)
    try:
        _wait_for(out / "checkpoints" / "resume.pt", process)
        os.killpg(process.pid, signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "SIGTERM" in stderr and "checkpoint saved" in stderr and "Traceback" not in stderr, stderr[-2000:]
    deadline = time.monotonic() + 15
    while (alive := subprocess.run(["pgrep", "-g", str(process.pid)], capture_output=True, text=True).stdout.split()) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"loader workers left running after the stop: {alive}"
    assert "resuming" in _finish(tiny_data, out)  # with --workers 0: the number of workers may change
    _assert_same_run(out, reference[0])

