"""`dogbreeds evaluate` on a tiny real run: convnext_atto, 1 epoch at 32 px on 3 real breeds."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dogbreeds.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path: Path) -> None:
    assert path.is_file(), f"missing figure {path}"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size < 300_000
    with Image.open(path) as image:
        image.verify()


@pytest.fixture(scope="module")
def tiny_run(mini_root, tmp_path_factory) -> Path:
    from dogbreeds.data.transforms import AugmentConfig
    from dogbreeds.train.loop import train
    from dogbreeds.train.recipe import Recipe

    recipe = Recipe(model="convnext_atto", data=str(mini_root), breeds="top3", epochs=1, batch_size=32, input_size=32,
                    workers=0, lr=2e-3, warmup_epochs=0.0, ema_decay=None, layer_decay=None, drop_path=0.0,
                    precision="fp32", augment=AugmentConfig.preset("quick"),
                    out=str(tmp_path_factory.mktemp("runs") / "atto"))
    return train(recipe)


def test_evaluate_writes_metrics_and_figures(tiny_run, mini_root, capsys):
    assert main(["evaluate", str(tiny_run), "--data", str(mini_root), "--split", "test", "--batch-size", "64"]) == 0
    assert "top-1" in capsys.readouterr().out
    result = json.loads((tiny_run / "eval" / "test.json").read_text())
    for key in ("top1", "top5", "loss", "ece", "per_class", "confusion_matrix", "n_images", "skipped"):
        assert key in result, key
    split = json.loads((tiny_run / "split.json").read_text())
    classes = [c["breed_id"] for c in json.loads((tiny_run / "classes.json").read_text())]
    # On the run's own root, exactly the run's held-out test files are scored.
    assert result["n_images"] == len(split["files"]["test"]) == split["counts"]["test"]
    assert result["skipped"] == 0
    assert "split.json" in result["records_from"]
    assert list(result["per_class"]) == classes
    assert sum(v["support"] for v in result["per_class"].values()) == result["n_images"]
    matrix = np.array(result["confusion_matrix"])
    assert matrix.shape == (3, 3) and matrix.sum() == result["n_images"]
    assert result["top1"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert result["top5"] == 1.0  # 3 classes: the true one is always in the top 5
    assert 0.0 <= result["ece"] <= 1.0 and result["loss"] > 0
    assert_valid_png(tiny_run / "figures" / "confusion_test.png")
    assert_valid_png(tiny_run / "figures" / "reliability_test.png")


def test_flip_tta_writes_its_own_file(tiny_run, mini_root):
    assert main(["evaluate", str(tiny_run), "--data", str(mini_root), "--tta", "flip", "--split", "val"]) == 0
    result = json.loads((tiny_run / "eval" / "val_flip.json").read_text())
    assert result["tta"] == "flip" and result["n_images"] == json.loads((tiny_run / "split.json").read_text())["counts"]["val"]
    assert_valid_png(tiny_run / "figures" / "reliability_val_flip.png")


def test_other_root_resplits_with_the_runs_breeds_and_counts_bad_files(tiny_run, tmp_path):
    # A folder-per-breed copy of a few photos of the run's breeds, plus one truncated JPEG.
    classes = [c["breed_id"] for c in json.loads((tiny_run / "classes.json").read_text())]
    split = json.loads((tiny_run / "split.json").read_text())
    root = Path(split["root"])
    for breed in classes:
        (tmp_path / "data" / breed).mkdir(parents=True)
        for source in sorted((root / "Images" / breed).glob("*.jpg"))[:10]:
            shutil.copy(source, tmp_path / "data" / breed / source.name)
    victim = sorted((tmp_path / "data" / classes[0]).glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:300])
    seen, skipped = 0, 0
    for name in ("train", "val", "test"):
        assert main(["evaluate", str(tiny_run), "--data", str(tmp_path / "data"), "--split", name]) == 0
        result = json.loads((tiny_run / "eval" / f"{name}.json").read_text())
        assert "load_dataset" in result["records_from"]
        seen, skipped = seen + result["n_images"], skipped + result["skipped"]
    assert skipped == 1 and seen + skipped == 30
    broken = [f for name in ("train", "val", "test")
              for f in json.loads((tiny_run / "eval" / f"{name}.json").read_text())["skipped_files"]]
    assert [f["path"] for f in broken] == [str(victim)]


def test_without_split_json_the_config_gives_breeds_and_seed(tiny_run, mini_root, tmp_path):
    # An older or hand-made run with config.yaml but no split.json: same root, split re-made
    # from the recorded seed, which (same data, same seed) reproduces the run's test list.
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("eval", "figures", "split.json", "resume.pt"))
    assert main(["evaluate", str(copy), "--data", str(mini_root)]) == 0
    result = json.loads((copy / "eval" / "test.json").read_text())
    assert "re-made" in result["records_from"]
    assert result["n_images"] == json.loads((tiny_run / "split.json").read_text())["counts"]["test"]


def test_wrong_breeds_is_a_clear_error(tiny_run, tmp_path, capsys):
    (tmp_path / "data" / "not_a_run_breed").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(tmp_path / "data" / "not_a_run_breed" / "a.jpg")
    (tmp_path / "data" / "another").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "data" / "another" / "b.jpg")
    assert main(["evaluate", str(tiny_run), "--data", str(tmp_path / "data")]) == 2
    assert "unknown breed" in capsys.readouterr().err


def test_missing_run_dir(tmp_path, mini_root, capsys):
    assert main(["evaluate", str(tmp_path / "nope"), "--data", str(mini_root)]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_default_engine_is_the_cached_onnxruntime_export_and_torch_agrees(tiny_run, mini_root):
    """evaluate scores on the onnxruntime engine by default, its export in RUN/export/, reused on
    the next call; --engine torch (eager) scores the same tensors: same top-1, and metrics within
    1e-4 (the export itself is checked against torch when made; measured differences ~1e-6)."""
    from dogbreeds.evaluate.report import evaluate_run

    fast = evaluate_run(tiny_run, mini_root, split="val")
    exports = sorted((tiny_run / "export").glob("model-*.onnx"))
    assert len(exports) == 1 and fast["engine"] == "onnxruntime" and exports[0].name in fast["engine_detail"]
    modified = exports[0].stat().st_mtime_ns
    again = evaluate_run(tiny_run, mini_root, split="val", tta="flip")  # the cached export, not a new one
    assert again["engine"] == "onnxruntime" and exports[0].name in again["engine_detail"]
    assert sorted((tiny_run / "export").glob("model-*.onnx")) == exports and exports[0].stat().st_mtime_ns == modified

    eager = evaluate_run(tiny_run, mini_root, split="val", engine="torch")
    assert eager["engine"] == "torch" and eager["n_images"] == fast["n_images"] > 0
    assert eager["confusion_matrix"] == fast["confusion_matrix"] and eager["top1"] == fast["top1"]
    for key in ("loss", "ece", "top5"):
        assert eager[key] == pytest.approx(fast[key], abs=1e-4), key


def test_engine_option_on_the_command_line(tiny_run, mini_root, capsys):
    assert main(["evaluate", str(tiny_run), "--data", str(mini_root), "--split", "val", "--engine", "torch"]) == 0
    assert json.loads((tiny_run / "eval" / "val.json").read_text())["engine"] == "torch"
    with pytest.raises(SystemExit):
        main(["evaluate", str(tiny_run), "--data", str(mini_root), "--engine", "fastest"])
    assert "invalid choice: 'fastest'" in capsys.readouterr().err


def test_a_model_the_engine_cannot_export_is_an_error_naming_engine_torch(tiny_run, mini_root, tmp_path, monkeypatch, capsys):
    import torch

    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("export", "eval", "figures", "resume.pt"))

    def unsupported(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::frobnicate' to ONNX opset 17 is not supported")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    assert main(["evaluate", str(copy), "--data", str(mini_root), "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert "cannot export convnext_atto to ONNX" in err and "frobnicate" in err and "--engine torch" in err
    assert not (copy / "eval" / "val.json").exists()  # no silent fallback to torch
    assert main(["evaluate", str(copy), "--data", str(mini_root), "--split", "val", "--engine", "torch"]) == 0
