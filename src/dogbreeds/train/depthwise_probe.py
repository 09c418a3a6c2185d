"""Depthwise convolutions in fp32 or bf16 when training under bf16 autocast: a short probe, cached per machine.

Under bf16 autocast every convolution computes in bf16. On the 2-core Intel Xeon with AMX-BF16 a ConvNeXt
7x7 depthwise convolution's backward ran 2.2-2.5x slower in bf16 than in fp32 (models/depthwise.py), so
keeping those convolutions fp32 made the whole training step faster (ConvNeXt-T at 224 px, batch 16:
1.26x; convnext_atto batch 32: 1.45x). That is one CPU and one oneDNN; a GPU or another CPU may differ, so
it is measured, not assumed: `choose_depthwise` times a forward + backward of the run's architecture
(random init, the run's MLP layout, input size and memory format, batch layout_probe.PROBE_BATCH,
interleaved rounds, median) under bf16 autocast with its depthwise convolutions in bf16 and in fp32,
keeps them fp32 when that is at least MARGIN faster (fp32 is the more precise of the two, so a small
margin), and caches the answer per machine profile, architecture, input size, layout, memory format and
device (layout_probe.cache_dir()). Only runs that train in bf16 and whose model has depthwise
convolutions are probed. The record goes into the run's config.yaml (`depthwise_probe`), and a resumed
run keeps the choice it started with (bit-identical resume).
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

from .layout_probe import (PROBE_BATCH, cache_dir, new_record, read_cached, saved_record, speedup, time_steps,
                           write_cached)

MARGIN = 1.03  # fp32 depthwise convolutions must train this much faster to be kept (they cost no precision)
CONFIG_KEY = "depthwise_probe"  # the record's key in config.yaml (recipe.RUN_METADATA_KEYS)
CHOICE = "fp32_depthwise"


def cache_file(name: str, size: int, layout: str, channels_last: bool, device: str, profile: str) -> Path:
    memory = "cl" if channels_last else "nchw"
    return (cache_dir() / "train-depthwise"
            / f"{name.split('.')[0]}-{size}px-{layout}-{memory}-{device}-{profile}.json")


def decide(seconds: dict[str, list[float]]) -> tuple[bool, str]:
    """(fp32_depthwise, why) from the timed steps {"bf16": [...], "fp32_depthwise": [...]}. Pure."""
    ratio = speedup(seconds, "fp32_depthwise", "bf16")
    if ratio >= MARGIN:
        return True, (f"bf16 training with the depthwise convolutions in fp32 ran {ratio:.2f}x as fast as all-bf16 "
                      f"here (>= {MARGIN:.2f}x): depthwise in fp32")
    return False, (f"depthwise convolutions in fp32 at {ratio:.2f}x the all-bf16 speed here (needs >= {MARGIN:.2f}x): "
                   "all bf16")


def _time_depthwise(name: str, size: int, device, channels_last: bool, num_classes: int,
                    model_kwargs: dict) -> dict[str, list[float]]:
    import torch

    from ..models.depthwise import keep_depthwise_fp32
    from ..models.factory import create_model

    with torch.random.fork_rng(devices=[]):  # the run's seeded streams stay as they were
        torch.manual_seed(0)
        model = create_model(name, num_classes=num_classes, **model_kwargs).to(device).train()
        x = torch.randn(PROBE_BATCH, 3, size, size, device=device)
    y = torch.zeros(PROBE_BATCH, dtype=torch.long, device=device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    fp32_dw = copy.deepcopy(model)
    keep_depthwise_fp32(fp32_dw)
    bf16 = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    return time_steps({"bf16": (model, bf16), "fp32_depthwise": (fp32_dw, bf16)}, x, y, device)


def choose_depthwise(name: str, size: int, device, channels_last: bool, model_kwargs: dict | None = None,
                     num_classes: int = 2, profile: dict | None = None, timer=None) -> dict:
    """{"fp32_depthwise", "why", "seconds", "probed_at", "machine", "profile_key", "created", "cached"}. `timer`
    replaces the timing (tests): (name, size, device, channels_last, num_classes, model_kwargs) ->
    {"bf16": [...], "fp32_depthwise": [...]}."""
    from ..machine import machine_profile, profile_key

    model_kwargs = dict(model_kwargs or {})
    layout = "conv-mlp" if model_kwargs.get("conv_mlp") else "default"
    profile = profile or machine_profile()
    path = cache_file(name, size, layout, channels_last, device.type, profile_key(profile))
    record = read_cached(path, CHOICE)
    if record is not None:
        return {**record, "cached": str(path)}
    print(f"depthwise: timing {name}'s depthwise convolutions in bf16 and in fp32 under bf16 autocast (once per "
          f"machine, cached in {path.parent}) ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    seconds = (timer or _time_depthwise)(name, size, device, channels_last, num_classes, model_kwargs)
    fp32_depthwise, why = decide(seconds)
    record = new_record(CHOICE, fp32_depthwise, why, seconds, {"size": size, "layout": layout,
                                                                "channels_last": channels_last, "device": device.type},
                        profile, started)
    write_cached(path, record)
    print(f"depthwise: {why}", file=sys.stderr, flush=True)
    return {**record, "cached": None}


def depthwise_for_run(recipe, model, device, dtype, model_kwargs: dict | None = None,
                      saved_config: Path | None = None, world_size: int = 1, timer=None) -> dict | None:
    """The record of what `train` does with `model`'s depthwise convolutions, or None when there is nothing
    to choose (training in fp32, or no depthwise convolution). A resumed run (saved_config: its config.yaml)
    keeps its record's choice (a run from before the probe: bf16, as then); several processes keep bf16
    (they must agree without a probe each); else `choose_depthwise` at the recipe's input size (224 when
    the weights decide). The caller applies it (models.depthwise.keep_depthwise_fp32)."""
    import torch

    from ..models.depthwise import depthwise_convs

    if dtype != torch.bfloat16 or not depthwise_convs(model):
        return None
    if saved_config is not None:
        saved = saved_record(saved_config, CONFIG_KEY, CHOICE)
        if saved is not None:
            return saved
        return {CHOICE: False, "why": "resumed run from before the depthwise probe: all bf16, as then"}
    if world_size > 1:
        return {CHOICE: False, "why": f"{world_size} processes: all bf16, not probed (every process must agree)"}
    return choose_depthwise(recipe.model, recipe.input_size or 224, device, recipe.channels_last, model_kwargs,
                            timer=timer)
