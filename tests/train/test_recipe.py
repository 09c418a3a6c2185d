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
    ("warmup_epochs", 50, "epochs=30"),
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
    config.write_text(Recipe(data="/d", model="convnext_atto", lr=5e-4, epochs=7, out="runs/a").to_yaml())
    recipe = recipe_from_args(_args(["--config", str(config), "--lr", "0.002", "--ema-decay", "none",
                                     "--no-channels-last", "--accum", "2", "--mixup", "0"]))
    assert recipe.lr == 0.002 and recipe.epochs == 7 and recipe.model == "convnext_atto"  # kept from config
    assert recipe.ema_decay is None and recipe.channels_last is False and recipe.accum_steps == 2
    assert recipe.augment.mixup == 0.0 and recipe.augment.cutmix == 1.0
    assert recipe.out == "runs/a"


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
