"""The bench command's pieces compute the right things (never how fast: that is the benchmark's job)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dogbreeds.bench import ceiling, cli, inference, scaling, training


def test_prepare_for_training_gives_the_same_loss_and_gradients():
    import timm

    torch.manual_seed(0)
    plain = timm.create_model("convnext_atto", conv_mlp=False, num_classes=5).train()
    tuned = timm.create_model("convnext_atto", conv_mlp=False, num_classes=5)
    tuned.load_state_dict(plain.state_dict())
    tuned = training.prepare_for_training(tuned.train())
    assert tuned.training and all(b.use_conv_mlp for b in tuned.modules() if hasattr(b, "use_conv_mlp"))
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    losses = []
    for model, inputs in ((plain, x), (tuned, x.contiguous(memory_format=torch.channels_last))):
        loss = torch.nn.functional.cross_entropy(model(inputs), y)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    g_plain = plain.stages[0].blocks[0].mlp.fc1.weight.grad
    g_tuned = tuned.stages[0].blocks[0].mlp.fc1.weight.grad
    torch.testing.assert_close(g_tuned.reshape(g_plain.shape), g_plain, atol=1e-5, rtol=1e-4)
    opt = training.training_optimizer(tuned.parameters())
    opt.step()  # fused AdamW runs on CPU tensors


def test_matmul_ceiling_samples_both_libraries():
    c = ceiling.MatmulCeiling(size=64)
    c.sample()
    medians = c.medians()
    assert set(medians) == {"torch (MKL)", "onnxruntime (MLAS)"}
    assert c.gflops == max(medians.values()) > 0


def test_scaling_point_reports_throughput_and_peak_memory(tmp_path):
    import timm

    from dogbreeds.infer.export import write_onnx

    path = tmp_path / "tiny.onnx"
    write_onnx(timm.create_model("mobilenetv2_050", num_classes=3).eval(), path, input_size=64)
    row = scaling.point(str(path), batch=2, size=64, rounds=1)
    assert row["batch"] == 2 and row["size"] == 64 and row["images_per_s"] > 0
    assert row["peak_rss_mb"] >= row["rss_before_mb"] > 0


def test_sample_photos_spreads_over_breeds(mini_root):
    photos = inference.sample_photos(mini_root, 8)
    assert len(photos) == 8 and len({p.parent.name for p in photos}) > 1
    with pytest.raises(FileNotFoundError, match="no photos under"):
        inference.sample_photos(Path("/nonexistent"), 4)


def test_bad_batches_are_named():
    with pytest.raises(Exception, match="--batches.*'1,x'"):
        cli._ints("1,x", "--batches")


def test_bench_is_a_dogbreeds_command():
    from dogbreeds.cli import build_parser

    args = build_parser().parse_args(["bench", "--quick", "--batches", "1,16"])
    assert args.func is cli.run_bench and args.quick and args.batches == "1,16"


def _fake_report() -> dict:
    rows = []
    for model, batch, gflop in (("convnext_tiny", 1, 10.0), ("convnext_tiny", 16, 10.0), ("mobilenetv2_100", 16, 0.6)):
        for path, ms in ((inference.BASELINE, 1000.0 * batch), (inference.ENGINE, 400.0 * batch), ("HF transformers", None)):
            ips = batch / ms * 1000 if ms else None
            rows.append(inference.Result(model, batch, path, ms, ips, (1000.0 * batch) / ms if ms else None,
                                         ips * gflop / 50 if ips else None, "" if ms else "unavailable: test",
                                         gflop))
    return {
        "machine": {"cpu": "Test CPU", "logical_cpus": 2, "threads": 2, "avx512": True, "torch_blas": "MKL",
                    "versions": {"torch": "x"}, "load_start": "1 1 1", "load_end": "1 1 1"},
        "started": "now", "quick": True, "rounds": 2, "minutes": 1.0,
        "ceiling": {"samples": {}, "medians": {"torch (MKL)": 25.0, "onnxruntime (MLAS)": 50.0}, "gflops": 50.0, "size": 2048},
        "inference": rows,
        "int8": [{"model": "m", "photos": 10, "top1_agreement": 1.0, "max_abs_logit_diff": 0.01}],
        "training": {"model": "convnext_tiny", "batch": 16, "size": 224, "steps": 2, "first_loss": {"a": 1.0},
                     "images_per_s": {"plain timm loop": 1.0, "dogbreeds settings": 1.1}, "ratio": 1.1},
    }


def test_report_checks_each_goal_against_the_numbers(tmp_path):
    report = _fake_report()
    lines = cli.goals(report)
    text = "\n".join(lines)
    assert "**met**: ConvNeXt-T batch 16 at 2.50x" in text
    assert "**not met**: ConvNeXt-T batch 16 at 50% of the measured matmul ceiling (goal >= 85%; 1.70x short)" in text
    assert "**not met**: ConvNeXt-T batch-1 latency 400 ms" in text
    assert "**met**: MobileNetV2 batch 16 at 2.50x" in text
    assert "**not met**: training step 1.10x" in text
    md = cli.render(report, tmp_path / "performance.md")
    assert "| convnext_tiny | 16 | HF transformers | n/a |" in md and "unavailable: test" in md
    assert (tmp_path / "figures" / "perf_inference.png").is_file()
    assert "no GPU" in md


@pytest.mark.parametrize("missing", ["transformers", "keras"])
def test_a_peer_library_that_is_not_installed_is_skipped_with_a_message(missing, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, missing, None)  # how Python marks a module as absent: import fails
    logs = []
    paths = {p.name: p for p in inference.peer_paths("convnext_tiny", log=logs.append)}
    skipped = [p for p in paths.values() if p.run is None]
    assert len(skipped) == 1 and skipped[0].note == f"skipped: {missing} is not installed (pip install {missing} to time it)"
    assert any(f"{missing} is not installed" in line for line in logs)
    other = next(p for p in paths.values() if p.run is not None)  # the installed one still runs
    assert other.run(np.zeros((1, 3, 224, 224), np.float32)).shape[-1] == 1000
    assert cli.machine(1)["versions"][missing] == "not installed"


def _saved_run(tmp_path) -> Path:
    import dataclasses
    import json

    report = _fake_report()
    report["inference"] = [dataclasses.asdict(r) for r in report["inference"]]
    raw = tmp_path / "cache" / "bench-now.json"
    raw.parent.mkdir()
    raw.write_text(json.dumps(report))
    return raw


def test_the_report_is_printed_and_written_only_where_told(tmp_path, monkeypatch, capsys):
    from dogbreeds.cli import build_parser

    monkeypatch.chdir(tmp_path)  # nothing may appear in the working directory (e.g. docs/)
    raw = _saved_run(tmp_path)
    args = build_parser().parse_args(["bench", "--from-json", str(raw), "--cache-dir", str(raw.parent)])
    assert args.out is None and not args.photos.is_absolute() and not args.keras_weights.is_absolute()
    before = sorted(tmp_path.rglob("*"))
    assert cli.run_bench(args) == 0
    assert "# Performance" in capsys.readouterr().out
    assert sorted(tmp_path.rglob("*")) == before  # printed only: no report, no figures

    out = tmp_path / "report" / "perf.md"
    args = build_parser().parse_args(["bench", "--from-json", str(raw), "--cache-dir", str(raw.parent), "--out", str(out)])
    assert cli.run_bench(args) == 0
    assert out.read_text().startswith("# Performance") and (out.parent / "figures" / "perf_inference.png").is_file()


def test_bench_holds_no_machine_paths_or_dated_notes():
    import re

    sources = sorted(Path(cli.__file__).parent.glob("*.py"))
    assert len(sources) >= 5
    for path in sources:
        text = path.read_text()
        assert not re.search(r"['\"(\s]/(work|home|Users|root|mnt)/", text), path.name  # absolute paths
        assert not re.search(r"\b\d{1,2}:\d{2} UTC\b", text), path.name  # clock times of one-off probes
        assert "lead's" not in text and "other users" not in text, path.name
