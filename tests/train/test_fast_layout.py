"""fast_layout: training builds ConvNeXt-T (and larger) with 1x1-convolution MLPs (timm's
conv_mlp=True), keeps it in the checkpoint, and leaves other models alone."""
from __future__ import annotations

import pytest
import yaml

from dogbreeds.models.checkpoint_format import read_checkpoint_meta
from dogbreeds.models.factory import load_run
from dogbreeds.train.loop import train
from dogbreeds.train.recipe import Recipe
from dogbreeds.train.session import fast_layout_kwargs


def conv_mlp_flags(model) -> set:
    return {block.use_conv_mlp for block in model.modules() if hasattr(block, "use_conv_mlp")}


@pytest.mark.parametrize("name, kwargs", [
    ("convnext_tiny", {"conv_mlp": True}),
    ("convnext_tiny.fb_in22k_ft_in1k", {"conv_mlp": True}),  # a pretrained tag: same architecture
    ("convnext_base", {"conv_mlp": True}),
    ("convnext_atto", {}),  # timm builds the small ConvNeXts with conv MLPs already
    ("mobilenetv2_100", {}),
    ("roadmap_step3", {}),
    ("convnextv2_tiny", {}),  # GRN MLPs: not measured, so not switched
])
def test_fast_layout_kwargs(name, kwargs):
    assert fast_layout_kwargs(name) == kwargs


def test_recipe_default_is_on_and_survives_yaml(tmp_path):
    assert Recipe().fast_layout is True
    path = tmp_path / "config.yaml"
    path.write_text(Recipe(fast_layout=False).to_yaml())
    assert Recipe.from_yaml(path).fast_layout is False


@pytest.mark.parametrize("fast_layout", [True, False])
def test_convnext_tiny_trains_saves_and_loads_in_its_layout(tiny_data, tiny_recipe, tmp_path, fast_layout, monkeypatch):
    from dogbreeds.train import layout_probe  # fast_layout=True: conv MLPs where they time faster (faked here)

    monkeypatch.setenv("DOGBREEDS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(layout_probe, "_time_layouts", lambda *a: {"conv": [1.0], "linear": [1.0]})
    run = train(tiny_recipe(tiny_data, tmp_path / "run", model="convnext_tiny", epochs=1, ema_decay=None,
                            fast_layout=fast_layout))
    meta = read_checkpoint_meta(run / "checkpoints" / "last.safetensors")
    assert meta["model_kwargs"].get("conv_mlp") is (True if fast_layout else None)
    loaded = load_run(run)
    assert conv_mlp_flags(loaded.model) == {fast_layout}
    assert loaded.model.stages[0].blocks[0].mlp.fc1.weight.ndim == (4 if fast_layout else 2)


def test_mobilenet_gets_no_conv_mlp(tiny_data, tiny_recipe, tmp_path):
    run = train(tiny_recipe(tiny_data, tmp_path / "run", model="mobilenetv2_050", epochs=1, ema_decay=None))
    assert "conv_mlp" not in read_checkpoint_meta(run / "checkpoints" / "last.safetensors")["model_kwargs"]


def test_run_from_before_fast_layout_resumes_with_its_linear_mlps(tiny_data, tiny_recipe, tmp_path, capsys):
    """A config.yaml without the key was written by a run with Linear MLPs: its resume.pt must load."""
    out = tmp_path / "old"
    train(tiny_recipe(tiny_data, out, model="convnext_tiny", epochs=1, ema_decay=None, fast_layout=False))
    config = yaml.safe_load((out / "config.yaml").read_text())
    del config["fast_layout"]
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    capsys.readouterr()

    train(tiny_recipe(tiny_data, out, model="convnext_tiny", epochs=1, ema_decay=None))  # default: fast_layout=True
    assert "predates the fast_layout setting" in capsys.readouterr().err
    assert yaml.safe_load((out / "config.yaml").read_text())["fast_layout"] is False
    assert conv_mlp_flags(load_run(out).model) == {False}
