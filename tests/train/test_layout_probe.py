"""fast_layout per machine (train/layout_probe.py): the MLP layout that trains faster here is timed
once per machine profile and cached; a resumed run keeps the layout it started with; the choice is
written into the run's config.yaml. Fake timings and fake machine profiles, except one real timing."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from dogbreeds.train import layout_probe
from dogbreeds.train.recipe import Recipe

CPU = torch.device("cpu")
AMD = {"cpu": {"model": "AMD EPYC", "vendor": "AuthenticAMD", "cores": 2, "logical": 2,
               "flags": {"avx2": True, "fma": True}}, "gpu": [], "libraries": {"torch": "x"}}
XEON = {**AMD, "cpu": {**AMD["cpu"], "model": "Intel Xeon", "flags": {"avx2": True, "avx512f": True}}}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DOGBREEDS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _timer(conv: float, linear: float, calls: list):
    def timer(name, size, device, dtype, channels_last, num_classes):
        calls.append((name, size, channels_last))
        return {"conv": [conv, conv * 1.1], "linear": [linear, linear * 1.1]}
    return timer


def test_decide_keeps_conv_mlps_unless_linear_is_clearly_faster():
    assert layout_probe.decide({"conv": [1.2, 1.2], "linear": [1.0, 1.0]})[0] is False
    assert layout_probe.decide({"conv": [1.01, 1.01], "linear": [1.0, 1.0]})[0] is True  # within the margin
    conv, why = layout_probe.decide({"conv": [0.7], "linear": [1.0]})
    assert conv is True and why.startswith("1x1-conv MLPs at 1.43x")


def test_the_choice_is_timed_once_per_machine_profile_and_cached(cache):
    calls = []
    slow_conv = _timer(1.2, 1.0, calls)
    first = layout_probe.choose_layout("convnext_tiny", 224, CPU, None, True, profile=AMD, timer=slow_conv)
    assert first["conv_mlp"] is False and first["model_kwargs"] == {} and "Linear" in first["why"]
    assert first["probed_at"] == {"batch": layout_probe.PROBE_BATCH, "size": 224, "precision": "fp32",
                                  "channels_last": True, "device": "cpu"}
    files = list((cache / "train-layout").glob("convnext_tiny-224px-fp32-cl-cpu-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["conv_mlp"] is False
    again = layout_probe.choose_layout("convnext_tiny.fb_in22k", 224, CPU, None, True, profile=AMD, timer=slow_conv)
    assert len(calls) == 1 and again["conv_mlp"] is False and again["cached"] == str(files[0])
    # another kind of machine, another size or memory format: measured again, into a record of its own
    fast_conv = _timer(0.7, 1.0, calls)
    assert layout_probe.choose_layout("convnext_tiny", 224, CPU, None, True, profile=XEON, timer=fast_conv)["conv_mlp"]
    layout_probe.choose_layout("convnext_tiny", 160, CPU, None, True, profile=AMD, timer=fast_conv)
    layout_probe.choose_layout("convnext_tiny", 224, CPU, None, False, profile=AMD, timer=fast_conv)
    assert len(calls) == 4 and len(list((cache / "train-layout").glob("*.json"))) == 4


def test_models_without_the_switch_are_not_timed():
    calls = []
    for name in ("convnext_atto", "mobilenetv2_100"):  # atto: conv MLPs already; MobileNetV2: no MLPs
        assert layout_probe.choose_layout(name, 224, CPU, None, True, profile=AMD, timer=_timer(1, 1, calls)) is None
        assert layout_probe.layout_for_run(Recipe(model=name), CPU, None, None) is None
    assert calls == []


def test_a_resumed_run_keeps_its_layout_and_several_processes_are_not_probed(tmp_path):
    recipe = Recipe(model="convnext_tiny")
    never = lambda *a: pytest.fail("probed")  # noqa: E731
    config = tmp_path / "config.yaml"
    config.write_text(recipe.to_yaml({layout_probe.CONFIG_KEY: {"conv_mlp": False, "why": "Linear (test)"}}))
    kept = layout_probe.layout_for_run(recipe, CPU, None, config, timer=never)
    assert kept["model_kwargs"] == {} and kept["why"] == "Linear (test)"
    assert Recipe.from_yaml(config) == recipe  # the record is run metadata, not part of the recipe
    config.write_text(recipe.to_yaml())  # a run from before the probe trained with conv MLPs
    assert layout_probe.layout_for_run(recipe, CPU, None, config, timer=never)["model_kwargs"] == {"conv_mlp": True}
    several = layout_probe.layout_for_run(recipe, CPU, None, None, world_size=2, timer=never)
    assert several["model_kwargs"] == {"conv_mlp": True} and "2 processes" in several["why"]


def test_the_real_timing_times_both_layouts_and_leaves_the_seeded_streams_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    seconds = layout_probe._time_layouts("convnext_tiny", 32, CPU, None, True, 2)
    assert torch.equal(torch.rand(3), expected)
    assert set(seconds) == {"conv", "linear"}
    assert all(len(v) == layout_probe.PROBE_ROUNDS and all(s > 0 for s in v) for v in seconds.values())


def test_train_records_the_layout_in_its_config_and_builds_it(tiny_data, tiny_recipe, tmp_path, monkeypatch):
    from dogbreeds.models.checkpoint_format import read_checkpoint_meta
    from dogbreeds.train.loop import train

    monkeypatch.setattr(layout_probe, "_time_layouts", _timer(1.2, 1.0, []))  # Linear faster "here"
    run = train(tiny_recipe(tiny_data, tmp_path / "run", model="convnext_tiny", epochs=1, ema_decay=None))
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["fast_layout"] is True and config[layout_probe.CONFIG_KEY]["conv_mlp"] is False
    assert "Linear" in config[layout_probe.CONFIG_KEY]["why"]
    assert "conv_mlp" not in read_checkpoint_meta(run / "checkpoints" / "last.safetensors")["model_kwargs"]

    # resumed where conv MLPs now look faster (another machine, a cleared cache): the run keeps its Linear MLPs
    monkeypatch.setattr(layout_probe, "_time_layouts", lambda *a: pytest.fail("a resumed run was probed"))
    train(tiny_recipe(tiny_data, tmp_path / "run", model="convnext_tiny", epochs=1, ema_decay=None))
    assert "conv_mlp" not in read_checkpoint_meta(run / "checkpoints" / "last.safetensors")["model_kwargs"]
    assert yaml.safe_load((run / "config.yaml").read_text())[layout_probe.CONFIG_KEY]["conv_mlp"] is False
