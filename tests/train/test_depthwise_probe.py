"""Depthwise convolutions in fp32 under bf16 autocast (train/depthwise_probe.py): timed once per machine profile and
cached; kept fp32 only when clearly faster; only for bf16 runs of models with depthwise convolutions; a resumed run
keeps what it started with; the choice reaches config.yaml and the training itself. Fake timings, except one."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

from dogbreeds.models.depthwise import Fp32DepthwiseConv2d
from dogbreeds.models.factory import create_model
from dogbreeds.train import depthwise_probe, session
from dogbreeds.train.recipe import Recipe

CPU = torch.device("cpu")
AMX = {"cpu": {"model": "Intel Xeon", "vendor": "GenuineIntel", "cores": 2, "logical": 2,
               "flags": {"avx2": True, "avx512f": True, "amx_bf16": True}}, "gpu": [], "libraries": {"torch": "x"}}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DOGBREEDS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def atto():
    return create_model("convnext_atto", num_classes=2)


def _timer(bf16: float, fp32_dw: float, calls: list):
    def timer(name, size, device, channels_last, num_classes, model_kwargs):
        calls.append((name, size, channels_last, dict(model_kwargs)))
        return {"bf16": [bf16, bf16 * 1.1], "fp32_depthwise": [fp32_dw, fp32_dw * 1.1]}
    return timer


def test_decide_keeps_fp32_only_when_clearly_faster():
    assert depthwise_probe.decide({"bf16": [1.3], "fp32_depthwise": [1.0]}) == (
        True, "bf16 training with the depthwise convolutions in fp32 ran 1.30x as fast as all-bf16 here (>= 1.03x): "
              "depthwise in fp32")
    assert depthwise_probe.decide({"bf16": [1.02], "fp32_depthwise": [1.0]})[0] is False  # within the margin
    assert depthwise_probe.decide({"bf16": [1.0], "fp32_depthwise": [1.4]})[0] is False


def test_probed_once_per_machine_and_layout_cached_and_only_where_it_matters(cache, monkeypatch, atto):
    from dogbreeds import machine

    monkeypatch.setattr(machine, "machine_profile", lambda *a, **k: AMX)
    calls = []
    recipe = Recipe(model="convnext_atto", input_size=96)
    record = depthwise_probe.depthwise_for_run(recipe, atto, CPU, torch.bfloat16, {}, timer=_timer(1.4, 1.0, calls))
    assert record["fp32_depthwise"] and record["probed_at"]["size"] == 96 and len(calls) == 1
    files = list((cache / "train-depthwise").glob("convnext_atto-96px-default-cl-cpu-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["fp32_depthwise"] is True
    again = depthwise_probe.depthwise_for_run(recipe, atto, CPU, torch.bfloat16, {}, timer=_timer(1.0, 2.0, calls))
    assert again["fp32_depthwise"] and again["cached"] == str(files[0]) and len(calls) == 1
    # the conv-MLP layout is another model: measured again (here no faster -> all bf16), with the layout's kwargs
    other = depthwise_probe.depthwise_for_run(recipe, atto, CPU, torch.bfloat16, {"conv_mlp": True},
                                              timer=_timer(1.0, 1.0, calls))
    assert other["fp32_depthwise"] is False and calls[-1][3] == {"conv_mlp": True} and len(calls) == 2
    # nothing to choose: an fp32 run, a model without depthwise convolutions; several processes: not probed
    assert depthwise_probe.depthwise_for_run(recipe, atto, CPU, None, {}, timer=_timer(2.0, 1.0, calls)) is None
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2))  # grouped, not depthwise
    assert depthwise_probe.depthwise_for_run(recipe, plain, CPU, torch.bfloat16, {},
                                             timer=_timer(2.0, 1.0, calls)) is None
    several = depthwise_probe.depthwise_for_run(Recipe(model="convnext_atto", input_size=64), atto, CPU,
                                                torch.bfloat16, {}, world_size=2, timer=_timer(2.0, 1.0, calls))
    assert several["fp32_depthwise"] is False and "2 processes" in several["why"]
    assert len(calls) == 2


def test_a_resumed_run_keeps_its_choice(tmp_path, atto):
    config = tmp_path / "config.yaml"
    calls = []
    config.write_text(yaml.safe_dump({"model": "convnext_atto", "depthwise_probe": {"fp32_depthwise": True,
                                                                                      "why": "then"}}))
    recipe = Recipe(model="convnext_atto")
    assert depthwise_probe.depthwise_for_run(recipe, atto, CPU, torch.bfloat16, {}, config,
                                             timer=_timer(1.0, 2.0, calls)) == {"fp32_depthwise": True, "why": "then"}
    config.write_text(yaml.safe_dump({"model": "convnext_atto"}))  # a run from before the probe: all bf16, as then
    record = depthwise_probe.depthwise_for_run(recipe, atto, CPU, torch.bfloat16, {}, config,
                                               timer=_timer(2.0, 1.0, calls))
    assert record["fp32_depthwise"] is False and "before the depthwise probe" in record["why"] and not calls


def test_train_applies_the_probed_choice_and_records_it(tmp_path, tiny_data, monkeypatch):
    """A tiny bf16 run (an AMX CPU as far as train can tell) with the probe's timing faked to favour fp32 depthwise
    convolutions: the steps run them as Fp32DepthwiseConv2d under autocast, config.yaml holds the record, and it
    loads back as a recipe (the record is run metadata); the checkpoint has the plain model's keys."""
    from safetensors.torch import load_file

    from dogbreeds.train.loop import train

    from .conftest import make_tiny_recipe

    monkeypatch.setattr(session, "cpu_bf16_support", lambda: "amx")
    monkeypatch.setattr(depthwise_probe, "_time_depthwise", _timer(1.5, 1.0, []))
    seen = []
    real = Fp32DepthwiseConv2d.forward

    def spy(self, x):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(self, x)
    monkeypatch.setattr(Fp32DepthwiseConv2d, "forward", spy)
    out = tmp_path / "run"
    train(make_tiny_recipe(tiny_data, out, epochs=1, precision="auto", deterministic=False))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["depthwise_probe"]["fp32_depthwise"] is True and "1.50x" in saved["depthwise_probe"]["why"]
    assert seen and any(seen)  # called inside the autocast region of the training steps
    assert Recipe.from_yaml(out / "config.yaml").precision == "auto"
    keys = set(load_file(str(out / "checkpoints" / "last.safetensors")))
    classes = len(json.loads((out / "classes.json").read_text()))
    assert keys == set(create_model("convnext_atto", num_classes=classes).state_dict())


def test_the_real_probe_times_both():
    seconds = depthwise_probe._time_depthwise("convnext_atto", 32, CPU, True, 2, {})
    from dogbreeds.train.layout_probe import PROBE_ROUNDS

    assert set(seconds) == {"bf16", "fp32_depthwise"} and all(len(v) == PROBE_ROUNDS and min(v) > 0
                                                              for v in seconds.values())
