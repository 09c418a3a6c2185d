"""`dogbreeds calibrate` reads the pixels `dogbreeds data prepare` cached under DATA when the cache
holds every photo it needs, with the same result as decoding, and says which it did."""
from __future__ import annotations

import shutil

import numpy as np
import pytest


@pytest.mark.slow  # trains a tiny run and calibrates it twice: 16 s here, 75 s with the 2 cores at a load of ~9
def test_calibrate_reads_the_prepared_cache(mini_root, tmp_path, capsys):
    from dogbreeds.cli import main
    from dogbreeds.data.transforms import AugmentConfig
    from dogbreeds.models.factory import load_run
    from dogbreeds.train.loop import train
    from dogbreeds.train.recipe import Recipe
    from dogbreeds.trust.cli import calibrate_run

    data = tmp_path / "photos"
    for count, breed in zip((12, 12, 12, 6), sorted((mini_root / "Images").iterdir())[:4]):  # 3 known + 1 other
        (data / breed.name).mkdir(parents=True)
        for photo in sorted(breed.glob("*.jpg"))[:count]:
            shutil.copy(photo, data / breed.name / photo.name)
    recipe = Recipe(model="convnext_atto", data=str(data), breeds="top3", epochs=1, batch_size=8, input_size=32,
                    workers=0, lr=2e-3, warmup_epochs=0.0, ema_decay=None, layer_decay=None, drop_path=0.0,
                    val_fraction=0.25, precision="fp32", augment=AugmentConfig.preset("quick"), calibrate=False,
                    out=str(tmp_path / "run"))
    run = train(recipe)
    capsys.readouterr()
    decoded = calibrate_run(run, data, progress=True)
    assert "decoding images from files" in capsys.readouterr().out
    pp = load_run(run).preprocessing
    assert main(["data", "prepare", str(data), "--size", str(pp.resize_size), "--interpolation", pp.interpolation,
                 "--workers", "1"]) == 0
    capsys.readouterr()
    cached = calibrate_run(run, data, progress=True)
    assert "[calibrate] using the prepared cache" in capsys.readouterr().out
    assert len(cached.dog_bank) == len(decoded.dog_bank) == 6  # the other breed's photos, from the cache too
    np.testing.assert_allclose(cached.bank.astype(np.float32), decoded.bank.astype(np.float32), atol=2e-3)
    assert abs(cached.temperature - decoded.temperature) < 1e-3
