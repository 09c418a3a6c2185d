"""The detector to ONNX (detect/export.py): dynamic image size, the same detections as PyTorch on
real photos of several sizes (boxes within 1 px, scores within 1e-3), the torch-free path
(an .onnx file, and a run whose export is cached) never imports torch, and a check that fails
leaves no file."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dogbreeds.detect.export import compare_detections, export_detector
from dogbreeds.detect.infer import Detector
from dogbreeds.errors import DogbreedsError, WeightsError


def tiny_detector(seed: int = 0):
    import torch

    from dogbreeds.detect.model import DetectorConfig, build_detector

    torch.manual_seed(seed)
    config = DetectorConfig(fpn_channels=32, representation_size=64, rpn_pre_nms_top_n_test=200,
                            rpn_post_nms_top_n_test=50, detections_per_img=20)
    return build_detector("mobilenetv2_050", None, min_size=128, max_size=192, config=config).eval()


@pytest.fixture(scope="module")
def detector_run(tmp_path_factory) -> Path:
    from dogbreeds.detect.model import save_detector

    model = tiny_detector()
    root = tmp_path_factory.mktemp("detector_run")
    save_detector(model, root / "checkpoints" / "best.safetensors", model.detector_config)
    return root


@pytest.fixture(scope="module")
def photos(mini_root) -> list[Path]:
    """Real dog photos of three different sizes, one of them portrait (the mini Stanford Dogs
    photos are all 224x224; the cats-and-dogs set keeps the photos' own sizes)."""
    from PIL import Image

    candidates = sorted((mini_root.parent / "cats-and-dogs" / "dogs").glob("*.jpg"))[:200]
    sizes = {p: Image.open(p).size for p in candidates}
    portrait = next(p for p in candidates if sizes[p][0] < sizes[p][1])
    landscape = [p for p in candidates if sizes[p][0] > sizes[p][1]]
    second = next(p for p in landscape[1:] if sizes[p] != sizes[landscape[0]])
    square = sorted((mini_root / "Images" / "n02111889-Samoyed").glob("*.jpg"))[0]  # 224x224, as the mini data
    return [landscape[0], portrait, second, square]


@pytest.fixture(scope="module")
def exported(detector_run, photos, tmp_path_factory) -> tuple[Path, str]:
    """`dogbreeds detect export` on the real photos: (the file, what the command printed)."""
    import contextlib
    import io

    from dogbreeds.cli import main

    out = tmp_path_factory.mktemp("export") / "det.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["detect", "export", str(detector_run), "--out", str(out),
                     "--check-images", *map(str, photos)]) == 0
    return out, printed.getvalue()


def test_export_matches_pytorch_on_real_photos_of_any_size(exported, detector_run, photos):
    from dogbreeds.data.decode import decode_image

    out, printed = exported
    assert out.is_file() and "checked on 4 photos" in printed and "max box difference vs PyTorch" in printed
    torch_detector = Detector.from_path(detector_run, engine="torch")
    onnx_detector = Detector.from_path(out)
    assert onnx_detector.kind == "onnxruntime" and torch_detector.kind == "torch"
    assert onnx_detector.config["min_size"] == 128 and onnx_detector.score_threshold == torch_detector.score_threshold
    shapes = set()
    for path in photos:
        image = decode_image(path)
        shapes.add(image.shape)
        a, b = torch_detector.detect(image, 0.0), onnx_detector.detect(image, 0.0)
        assert len(a) == len(b) > 0
        agreement = compare_detections((np.array([d.box for d in a]), np.array([d.score for d in a])),
                                       (np.array([d.box for d in b]), np.array([d.score for d in b])), floor=0.0)
        assert agreement.unmatched == 0 and agreement.max_box_diff <= 1.0 and agreement.max_score_diff <= 1e-3
    assert len(shapes) == len(photos) == 4  # several sizes through one graph: the size is dynamic


def test_the_exported_file_predicts_without_torch(exported, photos):
    out, _ = exported
    code = f"""
import json, sys
from dogbreeds.data.decode import decode_image
from dogbreeds.detect.infer import Detector
detector = Detector.from_path({str(out)!r})
dogs = [d.to_dict() for d in detector.detect(decode_image({str(photos[0])!r}), 0.0)]
print(json.dumps({{"torch": "torch" in sys.modules, "dogs": dogs}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["torch"] is False
    from dogbreeds.data.decode import decode_image

    expected = Detector.from_path(out).detect(decode_image(photos[0]), 0.0)
    assert [d["box"] for d in answer["dogs"]] == [d.to_dict()["box"] for d in expected] and answer["dogs"]


@pytest.mark.slow  # one more export (about 20 s on 2 busy cores)
def test_default_engine_caches_the_runs_export_and_reopens_it_without_torch(detector_run, photos, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(detector_run, run)
    first = Detector.from_path(run)  # exports into RUN/export/
    assert first.exported and first.kind == "onnxruntime"
    cached = sorted((run / "export").glob("detector-*.onnx"))
    assert len(cached) == 1 and first.path == cached[0]
    code = f"""
import json, sys
from dogbreeds.detect.infer import Detector
d = Detector.from_path({str(run)!r})
print(json.dumps({{"torch": "torch" in sys.modules, "exported": d.exported, "path": str(d.path)}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"torch": False, "exported": False, "path": str(cached[0])}


@pytest.mark.slow  # one more export (about 20 s on 2 busy cores)
def test_a_failed_check_leaves_no_file(detector_run, photos, tmp_path):
    out = tmp_path / "det.onnx"
    report = None
    with pytest.raises(DogbreedsError, match="differs from PyTorch"):
        report = export_detector(detector_run, out, check_images=[str(photos[0])], box_tolerance=-1.0)
    assert report is None and list(tmp_path.iterdir()) == []


def test_export_command_without_photos_to_check_says_how(detector_run, tmp_path, capsys):
    from dogbreeds.cli import main

    assert main(["detect", "export", str(detector_run), "--out", str(tmp_path / "x.onnx")]) == 2  # no split.json
    assert "--check-images" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()


def test_a_corrupt_file_is_a_weights_error_that_says_what_to_do(tmp_path):
    path = tmp_path / "det.onnx"
    path.write_bytes(b"\x08\x07 not a protobuf")
    with pytest.raises(WeightsError, match="re-export it with `dogbreeds detect export`"):
        Detector.from_path(path)
    with pytest.raises(WeightsError, match="no such ONNX file"):
        Detector.from_path(tmp_path / "missing.onnx")


def test_a_breed_model_is_not_a_detector(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    entry = model.metadata_props.add()
    entry.key, entry.value = "dogbreeds.format", "dogbreeds"
    path = tmp_path / "breeds.onnx"
    onnx.save(model, str(path))
    with pytest.raises(WeightsError, match="a breed model"):
        Detector.from_path(path)


def test_stable_resize_gives_the_intended_size_at_eval_only():
    import torch

    from dogbreeds.detect.infer import stable_resize

    model = stable_resize(tiny_detector())  # min_size 128, max_size 192
    for height in range(100, 700, 3):
        for width in (224, 333, 500):
            resized = model.transform.resize(torch.zeros(3, height, width))[0].shape[1:]
            assert min(resized) == 128 or max(resized) == 192, (height, width, resized)
    model.transform.train()
    boxes = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]])}
    assert model.transform.resize(torch.zeros(3, 397, 500), boxes)[1]["boxes"].shape == (1, 4)  # training: torchvision's
    assert stable_resize(model) is model


def test_compare_detections_matches_by_box_not_by_order():
    boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32)
    scores = np.array([0.9, 0.8], np.float32)
    swapped = compare_detections((boxes, scores), (boxes[::-1] + 0.5, scores[::-1] + 1e-4), floor=0.5)
    assert swapped.unmatched == 0 and swapped.max_box_diff == pytest.approx(0.5)
    assert swapped.max_score_diff == pytest.approx(1e-4, rel=1e-2) and swapped.within(1.0, 1e-3)
    missing = compare_detections((boxes, scores), (boxes[:1], scores[:1]), floor=0.5)
    assert missing.max_box_diff > 1.0 and not missing.within(1.0, 1e-3)
    assert compare_detections((boxes, scores), (boxes[:0], scores[:0]), floor=0.5).unmatched == 2
