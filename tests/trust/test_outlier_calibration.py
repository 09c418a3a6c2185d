"""A run trained with outlier exposure: its outliers are read from the prepared cache like its breed
photos, and calibration takes the run's recorded outliers (never the other breeds it did not see)
as its "other dogs"."""
from __future__ import annotations

import shutil

import pytest


@pytest.mark.slow  # trains a tiny run with outlier exposure and calibrates it: ~20 s here
def test_outliers_use_the_prepared_cache_and_calibration_uses_the_recorded_outliers(mini_root, tmp_path, capsys):
    from PIL import Image

    from dogbreeds.cli import main
    from dogbreeds.data.transforms import AugmentConfig
    from dogbreeds.models.factory import create_model
    from dogbreeds.train.loop import train
    from dogbreeds.train.recipe import Recipe
    from dogbreeds.trust.cli import calibrate_run, run_outlier_record

    data = tmp_path / "photos"
    breeds = sorted((mini_root / "Images").iterdir())[:5]
    for count, breed in zip((12, 12, 12, 6, 6), breeds):  # 3 known + 2 others, one of them an outlier
        (data / breed.name).mkdir(parents=True)
        for photo in sorted(breed.glob("*.jpg"))[:count]:
            shutil.copy(photo, data / breed.name / photo.name)
    wild = tmp_path / "wild"
    wild.mkdir()
    for number in (2, 4):
        Image.open(mini_root.parent / "cats-and-dogs" / "dogs" / f"dog.{number}.jpg").convert("RGB").resize(
            (48, 48)).save(wild / f"dog.{number}.jpg")
    outlier_breed, unseen_breed = breeds[3].name, breeds[4].name
    pp = create_model("convnext_atto", num_classes=3).preprocessing.with_input_size(32)
    assert main(["data", "prepare", str(data), "--size", str(pp.resize_size), "--interpolation", pp.interpolation,
                 "--workers", "1"]) == 0
    capsys.readouterr()
    recipe = Recipe(model="convnext_atto", data=str(data), breeds="top3", epochs=1, batch_size=8, input_size=32,
                    workers=0, lr=2e-3, warmup_epochs=0.0, ema_decay=None, layer_decay=None, drop_path=0.0,
                    val_fraction=0.25, precision="fp32", augment=AugmentConfig.preset("quick"), calibrate=False,
                    out=str(tmp_path / "run"), outlier_exposure=True, oe_breeds=outlier_breed,
                    outliers=str(wild / "*.jpg"), oe_batch_size=4)
    run = train(recipe)
    log = capsys.readouterr().out
    assert "outliers: 6 photos of other breeds from the prepared cache" in log and "2 given photos decoded" in log
    record = run_outlier_record(run)
    assert record["breeds"] == [outlier_breed] and record["other_breeds_not_used"] == [unseen_breed]
    calibration = calibrate_run(run, data, progress=True)
    log = capsys.readouterr().out
    assert "the 1 the run used as outliers (split.json), not the 1 it never saw" in log
    assert "+ 2 outlier photos the run trained with" in log
    assert len(calibration.dog_bank) == 6 + 2  # the outlier breed's 6 photos and the 2 wild dogs, not the unseen breed
