"""Detection data: the breed runs' split, boxes read as the breed loader reads them, and bad
annotations counted and named instead of crashing."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from dogbreeds.cli import main
from dogbreeds.data.sources import load_dataset
from dogbreeds.detect.data import DetectionDataset, load_detection_data, read_annotation
from dogbreeds.errors import DataError

from .conftest import BREEDS


def test_split_and_boxes_match_the_breed_loader(box_root):
    data = load_detection_data(box_root, breeds="all")
    ref = load_dataset(box_root, breeds="all")
    for split in ("train", "val", "test"):
        assert [r.path for r in data.split(split)] == [r.path for r in ref.split(split)]
        for det, rec in zip(data.split(split), ref.split(split)):
            expected = np.asarray([[b.xmin, b.ymin, b.xmax, b.ymax] for b in rec.boxes], dtype=np.float32)
            np.testing.assert_allclose(det.boxes, np.minimum(expected, [det.size[0], det.size[1]] * 2))
    summary = data.summary()
    assert summary["annotation_problems"] == {}
    assert sum(summary["multi_dog_photos"].values()) >= 2  # the fixture puts multi-dog photos in


@pytest.mark.slow  # reads every annotation of the mini data twice (~20 s on a loaded 2-core CPU)
def test_mini_data_split_is_the_breed_runs_split(mini_root):
    data = load_detection_data(mini_root)  # top20, official lists
    ref = load_dataset(mini_root)
    assert [r.path for r in data.split("test")] == [r.path for r in ref.test]
    assert sum(r.count >= 2 for r in data.split("test")) > 50  # the mini data's multi-dog photos are there


def _set_box(xml: Path, index: int, coords) -> None:
    text = xml.read_text()
    parts = text.split("<bndbox>")
    head, tail = parts[index + 1].split("</bndbox>", 1)
    x0, y0, x1, y1 = coords
    parts[index + 1] = f"<xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>" + tail
    xml.write_text("<bndbox>".join(parts))


@pytest.fixture()
def bad_root(box_root, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(box_root, root)
    return root


def test_bad_annotations_are_counted_and_named(bad_root):
    breed = BREEDS[0]
    xmls = sorted((bad_root / "Annotation" / breed).iterdir())
    multi = [x for x in xmls if x.read_text().count("<bndbox>") >= 2]
    single = [x for x in xmls if x not in multi]
    malformed, missing, clipped, outside = single[:4]
    malformed.write_text(malformed.read_text()[:120])            # cut mid-tag
    missing.unlink()
    _set_box(clipped, 0, (10, 20, 900, 100))                     # partly outside: clipped to the width
    _set_box(outside, 0, (500, 500, 600, 600))                   # wholly outside: dropped, photo left boxless
    _set_box(multi[0], 0, (30, 30, 30, 90))                      # zero area: dropped, the other dog kept

    data = load_detection_data(bad_root, breeds="all")           # no crash
    assert data.problem_counts() == {"malformed": 1, "missing": 1, "clipped": 1, "outside": 1, "zero_area": 1,
                                     "no_box": 1}
    report = data.problem_report()
    for xml in (malformed, clipped, outside, multi[0]):
        assert xml.name in report
    assert missing.name + ".jpg" in report
    kept = {Path(r.path).stem: r for s in ("train", "val", "test") for r in data.split(s)}
    assert malformed.name not in kept and missing.name not in kept and outside.name not in kept
    width = kept[clipped.name].size[0]
    assert kept[clipped.name].boxes[0].tolist() == [10, 20, width, 100]
    n_before = multi[0].read_text().count("<bndbox>")
    assert kept[multi[0].name].count == n_before - 1
    assert data.summary()["annotation_problems"]["malformed"] == 1


def test_read_annotation_uses_the_file_size_when_the_photo_is_unknown(tmp_path):
    xml = tmp_path / "a"
    xml.write_text("<annotation><size><width>100</width><height>50</height></size>"
                   "<object><bndbox><xmin>-5</xmin><ymin>0</ymin><xmax>60</xmax><ymax>70</ymax></bndbox></object>"
                   "</annotation>")
    boxes, problems = read_annotation(xml, None)
    assert boxes.tolist() == [[0, 0, 60, 50]]
    assert [p.kind for p in problems] == ["clipped"]


def test_a_boxless_dataset_says_which_layout_has_boxes(box_root, tmp_path):
    folders = tmp_path / "folders"
    for breed in BREEDS:
        shutil.copytree(box_root / "Images" / breed, folders / breed)
    with pytest.raises(DataError, match="Annotation/<wnid>-<breed>"):
        load_detection_data(folders, breeds="all")
    no_annotation = tmp_path / "images_only"
    shutil.copytree(box_root / "Images", no_annotation / "Images")
    with pytest.raises(DataError, match="no dog boxes"):
        load_detection_data(no_annotation, breeds="all")


def test_detect_train_on_a_boxless_dataset_is_an_error(box_root, tmp_path, capsys):
    folders = tmp_path / "folders"
    for breed in BREEDS:
        shutil.copytree(box_root / "Images" / breed, folders / breed)
    code = main(["detect", "train", "--data", str(folders), "--backbone", "mobilenetv2_100", "--breeds", "all",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "has no dog boxes" in err and "Stanford Dogs layout" in err


def test_flip_moves_the_boxes_with_the_pixels(box_root):
    record = load_detection_data(box_root, breeds="all").split("train")[0]
    plain, target = DetectionDataset([record])[0]
    flipped, flipped_target = DetectionDataset([record], flips=np.array([True]))[0]
    assert flipped.flip(-1).equal(plain)
    width = plain.shape[-1]
    b, f = target["boxes"], flipped_target["boxes"]
    assert f[:, 0].tolist() == (width - b[:, 2]).tolist() and f[:, 2].tolist() == (width - b[:, 0]).tolist()
    assert target["labels"].tolist() == [1] * record.count


def test_registering_the_detect_commands_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from dogbreeds.cli import build_parser; p = build_parser(); "
            "p.parse_args(['detect', 'train', '--data', 'D', '--backbone', 'b', '--out', 'o', '--quick']); "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
