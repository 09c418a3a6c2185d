"""The resize at inference, chosen on the validation photos (`detect evaluate --choose-size`): it travels
in the checkpoint's config to every runtime (PyTorch, the cached ONNX export, evaluation) and leaves
the weights and the training size alone; the choice takes the size that counts the dogs best."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from dogbreeds.detect import evaluate as evaluate_module
from dogbreeds.detect.data import DetRecord
from dogbreeds.detect.evaluate import choose_inference_size, save_settings, size_grid
from dogbreeds.detect.export import compare_detections
from dogbreeds.detect.infer import Detector, config_inference_size, detector_key
from dogbreeds.detect.model import DetectorConfig, load_detector, read_detector_meta
from dogbreeds.errors import DogbreedsError
from dogbreeds.rundir import RunDir


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A random-weights detector (mobilenetv2_050, trained size 64-96 px) saved as a run: it answers
    plenty of boxes at score >= 0, which is all this test needs."""
    import torch

    from dogbreeds.detect.model import build_detector, save_detector

    torch.manual_seed(0)
    config = DetectorConfig(fpn_channels=16, representation_size=32, rpn_pre_nms_top_n_test=100,
                            rpn_post_nms_top_n_test=30, detections_per_img=10, channels_last=False)
    model = build_detector("mobilenetv2_050", None, min_size=64, max_size=96, config=config).eval()
    root = tmp_path_factory.mktemp("size_run") / "run"
    save_detector(model, root / "checkpoints" / "best.safetensors", model.detector_config)
    return root


@pytest.fixture(scope="module")
def photo(mini_root):
    """A real photo that is not square (cats-and-dogs keeps the photos' own sizes)."""
    from PIL import Image

    from dogbreeds.data.decode import decode_image

    for path in sorted((mini_root.parent / "cats-and-dogs" / "dogs").glob("*.jpg"))[:50]:
        width, height = Image.open(path).size
        if width != height:
            return decode_image(path)
    raise AssertionError("no landscape or portrait photo among the first 50 cats-and-dogs dogs")


def _boxes(detections):
    return np.array([d.box for d in detections], np.float64).reshape(-1, 4), np.array([d.score for d in detections])


def test_the_chosen_size_reaches_detect_on_pytorch_and_onnx(small_run, photo, tmp_path):
    import torch

    run_path = tmp_path / "run"
    shutil.copytree(small_run, run_path)
    run = RunDir(run_path)
    trained = Detector.from_run_torch(run_path)
    key_before = detector_key(run.checkpoint())
    weights_before = {k: v.clone() for k, v in trained.model.state_dict().items()}

    cfg = save_settings(run, infer_min_size=128, infer_max_size=192)  # what --choose-size writes
    assert cfg.inference_size() == (128, 192) and (cfg.min_size, cfg.max_size) == (64, 96)  # training size kept
    assert "infer_min_size" in read_detector_meta(run.checkpoint())["extra"]["chosen_on_val"]
    assert detector_key(run.checkpoint()) != key_before  # the cached export is made again for the new size

    on_torch = Detector.from_run_torch(run_path)
    assert on_torch.model.transform.min_size == (128,) and on_torch.model.transform.max_size == 192
    assert all(torch.equal(v, weights_before[k]) for k, v in on_torch.model.state_dict().items())
    # the 128-192 px detections are those of the trained model resized to 128-192 by hand, not the 64-96 px ones
    by_hand = trained.model
    by_hand.transform.min_size, by_hand.transform.max_size = (128,), 192
    found = _boxes(on_torch.detect(photo, 0.0))
    assert len(found[0]) > 0
    assert np.array_equal(found[0], _boxes(Detector.from_model(by_hand, cfg).detect(photo, 0.0))[0])
    small = _boxes(Detector.from_run_torch(small_run).detect(photo, 0.0))
    assert len(small[0]) != len(found[0]) or np.abs(small[0] - found[0]).max() > 1.0

    on_onnx = Detector.from_path(run_path, cache_dir=tmp_path / "cache")  # the default engine: a new export
    assert on_onnx.kind == "onnxruntime" and on_onnx.exported
    assert config_inference_size(on_onnx.config) == (128, 192)
    agreement = compare_detections(found, _boxes(on_onnx.detect(photo, 0.0)), floor=0.0)
    assert agreement.compared > 0 and agreement.unmatched == 0
    assert agreement.max_box_diff <= 1.0 and agreement.max_score_diff <= 1e-3


def test_old_runs_keep_their_training_size(small_run):
    model, cfg = load_detector(small_run)
    assert (cfg.infer_min_size, cfg.infer_max_size) == (None, None) and cfg.inference_size() == (64, 96)
    assert model.transform.min_size == (64,) and model.transform.max_size == 96
    old = {k: v for k, v in cfg.to_dict().items() if not k.startswith("infer_")}  # a config from before the fields
    assert DetectorConfig.from_dict(old).inference_size() == (64, 96)
    assert config_inference_size(old) == (64, 96)
    # the thin-photo check follows the inference size: 100x3 is 2.9 px thin at max 96, 0.6 px at max 20
    thin = np.zeros((3, 100, 3), np.uint8)
    Detector(lambda chw: None, {**old}).check_size(thin)
    from dogbreeds.errors import ImageDecodeError

    with pytest.raises(ImageDecodeError, match="at most 20 pixels"):
        Detector(lambda chw: None, {**old, "infer_min_size": 16, "infer_max_size": 20}).check_size(thin)


def test_size_grid_scales_the_training_size_and_keeps_the_current_one():
    assert size_grid(DetectorConfig(min_size=160, max_size=160)) == [(160, 160), (192, 192), (224, 224), (256, 256)]
    assert size_grid(DetectorConfig(min_size=480, max_size=800))[1] == (576, 960)
    assert (300, 300) in size_grid(DetectorConfig(min_size=160, max_size=160, infer_min_size=300, infer_max_size=300))


class _Transform:
    def __init__(self, size):
        self.min_size, self.max_size = (size,), size


class _Heads:
    nms_thresh = 0.6


class _Model:
    def __init__(self):
        self.transform, self.roi_heads = _Transform(64), _Heads()


GT = [np.array([[0, 0, 100, 100], [120, 0, 220, 100]], np.float32), np.array([[0, 0, 100, 100]], np.float32)]


def _fake_predict(found_second_from):
    """The second dog of the first photo scores 0.9 from this input size on, else it is not found."""
    def predict(model, records):
        size = model.transform.min_size[-1]
        first = GT[0] if size >= found_second_from else GT[0][:1]
        return [{"boxes": first, "scores": np.array([0.95, 0.9][:len(first)], np.float32)},
                {"boxes": GT[1], "scores": np.array([0.95], np.float32)}]
    return predict


@pytest.mark.parametrize("found_second_from, chosen", [(96, 102), (64, 64)])
def test_choose_size_takes_the_size_that_counts_both_dogs_and_else_the_smaller(monkeypatch, found_second_from, chosen):
    records = [DetRecord("a.jpg", "pug", 0, "val", GT[0], (240, 120)),
               DetRecord("b.jpg", "pug", 0, "val", GT[1], (240, 120))]
    predict = _fake_predict(found_second_from)
    monkeypatch.setattr(evaluate_module, "predict_records", predict)
    model, cfg = _Model(), DetectorConfig(min_size=64, max_size=64, box_nms_thresh=0.6)
    size, nms, preds, rule, _, table = choose_inference_size(model, records, predict(model, records), cfg, 1.0)
    # sizes 64, 77, 90, 102 px (64 x 1, 1.2, 1.4, 1.6): the smallest that finds the second dog counts every photo
    assert size == (chosen, chosen) and model.transform.min_size == (chosen,) and model.transform.max_size == chosen
    assert nms == 0.6 and len(preds[0]["boxes"]) == 2 and rule[0] <= 0.9  # ties over NMS: the current one
    assert len(table) == 4 * 3 and sum(row["chosen"] for row in table) == 1
    assert {row["exact_count"] for row in table if row["min_size"] >= found_second_from} == {1.0}
    assert {row["exact_count"] for row in table if row["min_size"] < found_second_from} <= {0.5}


@pytest.mark.parametrize("split", ["test", "train"])
def test_choose_size_only_on_validation(split, tmp_path):
    from dogbreeds.detect.evaluate import evaluate_detector

    with pytest.raises(DogbreedsError, match="--split val"):
        evaluate_detector(tmp_path, tmp_path, split, choose_size=True)
    with pytest.raises(DogbreedsError, match="--score-threshold"):
        evaluate_detector(tmp_path, tmp_path, "val", choose_size=True, score_threshold=0.5)


@pytest.mark.parametrize("flag, key", [("--choose-size", "choose_size"), ("--with-other-breeds", "other_breeds")])
def test_the_cli_passes_the_validation_choices(monkeypatch, flag, key):
    import argparse

    from dogbreeds.detect import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    seen = {}
    monkeypatch.setattr(evaluate_module, "evaluate_detector", lambda *a, **k: seen.update(k) or {"figure": "f"})
    args = parser.parse_args(["detect", "evaluate", "r", "--data", "d", "--split", "val", flag])
    assert args.func(args) == 0 and seen[key] is True and seen["choose_count"] is False


@pytest.mark.parametrize("key, value", [("infer_min_size", 10**6), ("infer_max_size", 0), ("min_size", -5),
                                        ("max_size", 1e9), ("infer_min_size", "224"), ("min_size", True)])
def test_a_config_from_a_file_cannot_ask_for_any_resize(key, value):
    """A checkpoint's config is read from a file: an absurd resize (memory and time without bound)
    is an error naming the field, before any model is built."""
    base = DetectorConfig(backbone="mobilenetv2_050", min_size=160, max_size=160).to_dict()
    with pytest.raises(DogbreedsError, match=key):
        DetectorConfig.from_dict({**base, key: value})
    assert DetectorConfig.from_dict({**base, "infer_min_size": 192, "infer_max_size": 192}).inference_size() == (192, 192)
