"""precision auto on a CPU with AVX512-BF16 and no AMX (train/precision_probe.py): fp32 vs bf16 autocast is timed
once per machine profile and cached; bf16 only when clearly faster; a resumed run keeps what it started with; the
choice reaches the run's config.yaml and the training itself. Fake timings and profiles, except one real timing."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from dogbreeds.train import precision_probe, session
from dogbreeds.train.recipe import Recipe

CPU = torch.device("cpu")
AVX512 = {"cpu": {"model": "AMD EPYC", "vendor": "AuthenticAMD", "cores": 2, "logical": 2,
                  "flags": {"avx2": True, "avx512f": True, "avx512_bf16": True}}, "gpu": [], "libraries": {"torch": "x"}}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DOGBREEDS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(session, "cpu_bf16_support", lambda: "avx512_bf16")
    return tmp_path / "cache"


def _timer(fp32: float, bf16: float, calls: list):
    def timer(name, size, device, channels_last, num_classes):
        calls.append((name, size, channels_last))
        return {"fp32": [fp32, fp32 * 1.1], "bf16": [bf16, bf16 * 1.1]}
    return timer


def test_decide_takes_bf16_only_when_clearly_faster():
    assert precision_probe.decide({"fp32": [2.0], "bf16": [1.0]}) == (
        True, "bf16 autocast trained 2.00x as fast as fp32 here (>= 1.10x): bf16")
    assert precision_probe.decide({"fp32": [1.05], "bf16": [1.0]})[0] is False  # within the margin
    assert precision_probe.decide({"fp32": [1.0], "bf16": [1.5]})[0] is False


def test_probed_once_per_machine_cached_and_only_where_it_can_differ(cache, monkeypatch):
    from dogbreeds import machine

    monkeypatch.setattr(machine, "machine_profile", lambda *a, **k: AVX512)
    calls = []
    recipe = Recipe(model="convnext_tiny", input_size=160)
    dtype, record = precision_probe.precision_for_run(recipe, CPU, timer=_timer(2.5, 1.0, calls))
    assert dtype is torch.bfloat16 and record["bf16"] and record["probed_at"]["size"] == 160 and len(calls) == 1
    files = list((cache / "train-precision").glob("convnext_tiny-160px-cl-cpu-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["bf16"] is True
    again, cached = precision_probe.precision_for_run(recipe, CPU, timer=_timer(1.0, 2.0, calls))
    assert again is torch.bfloat16 and cached["cached"] == str(files[0]) and len(calls) == 1
    # another size: measured again, here slower in bf16 -> fp32
    dtype, record = precision_probe.precision_for_run(Recipe(model="convnext_tiny", input_size=96), CPU,
                                                       timer=_timer(1.0, 1.0, calls))
    assert dtype is None and not record["bf16"] and len(calls) == 2
    # not probed: a precision given, several processes, AMX (bf16 by rule), no native bf16 (fp32 by rule)
    assert precision_probe.precision_for_run(Recipe(model="convnext_tiny", precision="fp32"), CPU,
                                             timer=_timer(2.5, 1.0, calls)) == (None, None)
    dtype, record = precision_probe.precision_for_run(Recipe(model="convnext_tiny"), CPU, world_size=2,
                                                      timer=_timer(2.5, 1.0, calls))
    assert dtype is None and "2 processes" in record["why"]
    monkeypatch.setattr(session, "cpu_bf16_support", lambda: "amx")
    assert precision_probe.precision_for_run(recipe, CPU, timer=_timer(1.0, 2.0, calls)) == (torch.bfloat16, None)
    monkeypatch.setattr(session, "cpu_bf16_support", lambda: None)
    assert precision_probe.precision_for_run(recipe, CPU, timer=_timer(2.5, 1.0, calls)) == (None, None)
    assert len(calls) == 2


def test_a_resumed_run_keeps_its_precision(tmp_path):
    config = tmp_path / "config.yaml"
    calls = []
    config.write_text(yaml.safe_dump({"model": "convnext_tiny", "precision_probe": {"bf16": True, "why": "then"}}))
    assert precision_probe.precision_for_run(Recipe(model="convnext_tiny"), CPU, config,
                                             timer=_timer(1.0, 2.0, calls)) == (torch.bfloat16, {"bf16": True,
                                                                                                 "why": "then"})
    config.write_text(yaml.safe_dump({"model": "convnext_tiny"}))  # a run from before the probe: fp32, as then
    dtype, record = precision_probe.precision_for_run(Recipe(model="convnext_tiny"), CPU, config,
                                                      timer=_timer(2.5, 1.0, calls))
    assert dtype is None and "before the precision probe" in record["why"] and not calls


def test_train_trains_in_the_probed_precision_and_records_it(tmp_path, tiny_data, monkeypatch):
    """A tiny run on this CPU with the probe's timing faked to favour bf16: the steps run under bf16 autocast,
    config.yaml holds the record, and it loads back as a recipe (the record is run metadata)."""
    from dogbreeds.train.loop import train

    monkeypatch.setattr(precision_probe, "_time_precisions", _timer(3.0, 1.0, []))
    seen = []
    real = torch.autocast

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dtype"))
        return real(*args, **kwargs)
    monkeypatch.setattr(torch, "autocast", spy)
    from .conftest import make_tiny_recipe

    out = tmp_path / "run"
    train(make_tiny_recipe(tiny_data, out, epochs=1, precision="auto", deterministic=False))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["precision_probe"]["bf16"] is True and "3.00x" in saved["precision_probe"]["why"]
    assert torch.bfloat16 in seen
    assert Recipe.from_yaml(out / "config.yaml").precision == "auto"  # the record is run metadata, not a setting


def test_the_real_probe_times_both_precisions():
    seconds = precision_probe._time_precisions("mobilenetv2_050", 32, CPU, True, 2)
    from dogbreeds.train.layout_probe import PROBE_ROUNDS

    assert set(seconds) == {"fp32", "bf16"} and all(len(v) == PROBE_ROUNDS and min(v) > 0 for v in seconds.values())
