"""Which ConvNeXt MLP layout trains faster on this machine: a short probe, cached per machine profile.

`fast_layout` (Recipe) builds ConvNeXt-T and larger with 1x1-convolution MLPs (timm's conv_mlp=True,
the same weights reshaped) because on an AVX-512 AMD EPYC their oneDNN convolutions trained 1.52x
faster than timm's Linear MLPs (MKL matrix products). That does not hold on every CPU: on a 2-core
AMD EPYC with AVX2 and no AVX-512 a ConvNeXt-T training step with conv MLPs took 1.10x (batch 8)
to 1.18x (batch 16) the time of one with Linear MLPs, slower in every interleaved round
(benchmarks/bench_train_step.py --settings, docs/performance.md). So the
layout is measured, not assumed: `choose_layout` times a forward + backward of both layouts of the
run's architecture (random init, the run's input size, memory format and precision, batch
PROBE_BATCH, interleaved rounds, median), keeps conv MLPs unless the Linear layout is at least
MARGIN faster, and caches the answer per machine profile (machine.profile_key: CPU model, ISA
flags, cores, GPU, library versions), architecture, input size, precision, memory format and
device in `cache_dir()` (DOGBREEDS_CACHE_DIR, default ~/.cache/dogbreeds). The record goes into the
run's config.yaml (`layout`), and a resumed run keeps the layout it started with.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PROBE_BATCH = 8
PROBE_ROUNDS = 2      # timed rounds after one untimed step of each layout
MARGIN = 1.03         # Linear MLPs must be this much faster to replace the conv MLPs
RECORD_VERSION = 1
CONFIG_KEY = "layout"  # the record's key in config.yaml (recipe.RUN_METADATA_KEYS)


def cache_dir() -> Path:
    return Path(os.environ.get("DOGBREEDS_CACHE_DIR") or Path.home() / ".cache" / "dogbreeds")


def cache_file(name: str, size: int, precision: str, channels_last: bool, device: str, profile: str) -> Path:
    arch = name.split(".")[0]
    layout = "cl" if channels_last else "nchw"
    return cache_dir() / "train-layout" / f"{arch}-{size}px-{precision}-{layout}-{device}-{profile}.json"


def speedup(seconds: dict[str, list[float]], new: str, old: str) -> float:
    """How many times as fast variant `new` stepped as `old` (medians of their timed steps; 1.0 if unmeasured)."""
    new_s, old_s = float(np.median(seconds[new])), float(np.median(seconds[old]))
    return old_s / new_s if new_s > 0 else 1.0


def decide(seconds: dict[str, list[float]]) -> tuple[bool, str]:
    """(conv_mlp, why) from the timed steps {"conv": [...], "linear": [...]}. Pure."""
    ratio = speedup(seconds, "linear", "conv")
    if ratio >= MARGIN:
        return False, (f"timm's Linear MLPs trained {ratio:.2f}x as fast as 1x1-conv MLPs here "
                       f"(>= {MARGIN:.2f}x): Linear")
    return True, f"1x1-conv MLPs at {1 / ratio:.2f}x the Linear MLPs' speed here (Linear needs >= {MARGIN:.2f}x): conv"


def _time_layouts(name: str, size: int, device, dtype, channels_last: bool, num_classes: int) -> dict[str, list[float]]:
    """Seconds per forward + backward of each layout at PROBE_BATCH, interleaved rounds."""
    import torch

    from ..models.factory import create_model

    with torch.random.fork_rng(devices=[]):  # the run's seeded streams stay as they were
        torch.manual_seed(0)
        models = {"conv": create_model(name, num_classes=num_classes, conv_mlp=True),
                  "linear": create_model(name, num_classes=num_classes, conv_mlp=False)}
        x = torch.randn(PROBE_BATCH, 3, size, size, device=device)
    y = torch.zeros(PROBE_BATCH, dtype=torch.long, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = contextlib.nullcontext if dtype is None else (lambda: torch.autocast(device.type, dtype=dtype))
    for key, model in models.items():
        model = model.to(device).train()
        models[key] = model.to(memory_format=torch.channels_last) if channels_last else model
    return time_steps({key: (model, autocast) for key, model in models.items()}, x, y, device)


def time_steps(variants: dict, x, y, device) -> dict[str, list[float]]:
    """Seconds per forward + backward of each variant {key: (model, autocast context factory)} on (x, y):
    one untimed step each (allocations, oneDNN primitive creation), then PROBE_ROUNDS interleaved rounds."""
    import torch

    def step(model, autocast) -> float:
        start = time.perf_counter()
        with autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for variant in variants.values():
        step(*variant)
    seconds = {key: [] for key in variants}
    for i in range(PROBE_ROUNDS):
        for key in (list(variants) if i % 2 == 0 else list(variants)[::-1]):
            seconds[key].append(step(*variants[key]))
    return seconds


def choose_layout(name: str, size: int, device, dtype, channels_last: bool, num_classes: int = 2,
                  profile: dict | None = None, timer=None) -> dict | None:
    """The MLP layout to train `name` in on this machine: {"model_kwargs": {"conv_mlp": True} or {},
    "conv_mlp", "why", "seconds", "probed_at", "profile_key", "created", "cached"}; None for models
    without the switch (train.session.fast_layout_kwargs gives {}). `timer` replaces the timing
    (tests): (name, size, device, dtype, channels_last, num_classes) -> {"conv": [...], "linear": [...]}."""
    from ..machine import machine_profile, profile_key
    from .session import fast_layout_kwargs

    if not fast_layout_kwargs(name):
        return None
    profile = profile or machine_profile()
    precision = "fp32" if dtype is None else str(dtype).replace("torch.", "")
    path = cache_file(name, size, precision, channels_last, device.type, profile_key(profile))
    record = read_cached(path, "conv_mlp")
    if record is not None:
        return {**record, "model_kwargs": {"conv_mlp": True} if record["conv_mlp"] else {}, "cached": str(path)}
    print(f"fast_layout: timing {name}'s MLP layouts on this machine (once per machine, cached in {path.parent}) ...",
          file=sys.stderr, flush=True)
    started = time.perf_counter()
    seconds = (timer or _time_layouts)(name, size, device, dtype, channels_last, num_classes)
    conv_mlp, why = decide(seconds)
    record = new_record("conv_mlp", conv_mlp, why, seconds, {"size": size, "precision": precision,
                                                            "channels_last": channels_last, "device": device.type},
                        profile, started)
    write_cached(path, record)
    print(f"fast_layout: {why}", file=sys.stderr, flush=True)
    return {**record, "model_kwargs": {"conv_mlp": True} if conv_mlp else {}, "cached": None}


def new_record(choice_key: str, choice: bool, why: str, seconds: dict[str, list[float]], probed_at: dict,
               profile: dict, started: float) -> dict:
    """A probe's record, for its cache file and the run's config.yaml: the choice under `choice_key`, why, the
    timed seconds, where it was probed (PROBE_BATCH and `probed_at`), the machine, and how long it took since
    `started` (time.perf_counter())."""
    from ..machine import describe, profile_key

    return {"version": RECORD_VERSION, choice_key: choice, "why": why,
            "seconds": {k: [round(s, 4) for s in v] for k, v in seconds.items()},
            "probed_at": {"batch": PROBE_BATCH, **probed_at},
            "machine": describe(profile), "profile_key": profile_key(profile),
            "probe_s": round(time.perf_counter() - started, 1),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def read_cached(path: Path, choice_key: str) -> dict | None:
    """A probe's cached record, or None when absent, unreadable (logged) or of another version."""
    try:
        record = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError, RecursionError) as exc:
        log.warning("probe cache: ignoring %s (%s); probing again", path, exc)
        return None
    if isinstance(record, dict) and record.get("version") == RECORD_VERSION and isinstance(record.get(choice_key), bool):
        return record
    return None


def write_cached(path: Path, record: dict) -> None:
    from ..rundir import atomic_write_text

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    except OSError as exc:  # a read-only home: the choice still holds for this run
        log.warning("probe cache: cannot write %s (%s); it will be measured again next time", path, exc)


def layout_for_run(recipe, device, dtype, saved_config: Path | None, world_size: int = 1, timer=None) -> dict | None:
    """What `train` builds: a resumed run (saved_config: its config.yaml) keeps the layout it
    started with (its `layout` record; a run from before the probe: conv MLPs, as then); several
    processes keep conv MLPs (they must agree without a probe each); else `choose_layout` at the
    recipe's input size (224 when the weights decide)."""
    from .session import fast_layout_kwargs

    kwargs = fast_layout_kwargs(recipe.model)
    if not kwargs:
        return None
    if saved_config is not None:
        saved = saved_record(saved_config, CONFIG_KEY, "conv_mlp")
        if saved is not None:
            return {**saved, "model_kwargs": {"conv_mlp": True} if saved["conv_mlp"] else {}}
        return {"conv_mlp": True, "model_kwargs": kwargs, "why": "resumed run from before the layout probe: conv MLPs"}
    if world_size > 1:
        return {"conv_mlp": True, "model_kwargs": kwargs,
                "why": f"{world_size} processes: conv MLPs, not probed (every process must build the same layout)"}
    return choose_layout(recipe.model, recipe.input_size or 224, device, dtype, recipe.channels_last, timer=timer)


def saved_record(saved_config: Path, key: str, choice_key: str) -> dict | None:
    """A resumed run's probe record (config.yaml's `key`), or None when absent or without its boolean choice."""
    import yaml

    saved = (yaml.safe_load(saved_config.read_text()) or {}).get(key) if saved_config.is_file() else None
    return saved if isinstance(saved, dict) and isinstance(saved.get(choice_key), bool) else None


def config_record(record: dict | None) -> dict | None:
    """The part of a probe's record (layout or precision) written into config.yaml: no cache path, no model kwargs."""
    if record is None:
        return None
    return {k: v for k, v in record.items() if k not in ("model_kwargs", "cached")}
