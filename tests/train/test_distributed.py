"""Two CPU processes (torchrun, gloo) with batch B/2 each end where one process with batch B does."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from dogbreeds.models.factory import create_model
from dogbreeds.train.session import seed_everything

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_args(data, out) -> list[str]:
    # No mixup, no random augmentation, no drop_path: the per-rank random streams then cannot
    # matter, and convnext's LayerNorm (unlike BatchNorm) does not depend on the batch split.
    return ["train", "--data", str(data), "--model", "convnext_atto", "--breeds", "all", "--out", str(out),
            "--epochs", "2", "--batch-size", "4", "--input-size", "32", "--workers", "0", "--precision", "fp32",
            "--deterministic", "--lr", "1e-3", "--warmup-epochs", "0.5", "--val-fraction", "0.2",
            "--test-fraction", "0.2", "--drop-path", "0", "--augment", "none", "--ema-decay", "none"]


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "dogbreeds.cli", *_train_args(tiny_data, tmp_path / "one")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
         "-m", "dogbreeds.cli", *_train_args(tiny_data, tmp_path / "two")],
        capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es)" in ddp.stdout and ddp.stdout.count("epoch 1:") == 1  # rank 0 alone reports
    one = load_file(tmp_path / "one" / "checkpoints" / "last.safetensors")
    two = load_file(tmp_path / "two" / "checkpoints" / "last.safetensors")
    seed_everything(0)  # the run's initial weights, to be sure training moved them
    initial = create_model("convnext_atto", num_classes=3).state_dict()
    assert max((one[k].float() - initial[k].float()).abs().max().item() for k in one) > 1e-3
    diff = max((one[k].float() - two[k].float()).abs().max().item() for k in one)
    assert diff <= 1e-5, f"max abs difference {diff}"


def test_outlier_exposure_under_two_processes(tiny_data, tmp_path):
    """Each process draws its own outlier stream (seeded by rank) in the same forward as its breed
    photos; --oe-batch-size is global like --batch-size (split over the processes), and the epoch's
    outlier count and OE loss are summed over both."""
    import json

    from .conftest import BREEDS

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = _train_args(tiny_data, tmp_path / "oe")
    args[args.index("--breeds") + 1] = ",".join(BREEDS[:2])  # the third breed is the outlier breed
    args += ["--outlier-exposure", "--oe-batch-size", "2", "--no-calibrate"]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "dogbreeds.cli", *args],
        capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "oe" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    steps = lines[0]["step"]
    for line in lines:  # 2 outliers per optimizer step in all, one from each process
        assert line["outlier_images"] == 2 * steps
        assert 0.69 <= line["train_oe_loss"] < 10  # >= ln 2, the floor for 2 breeds
    record = json.loads((tmp_path / "oe" / "split.json").read_text())["outliers"]
    assert record["breeds"] == [BREEDS[2]]
