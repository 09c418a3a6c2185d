"""fp32 or bf16 autocast for training on a CPU with AVX512-BF16 but no AMX: a short probe, cached per machine.

`--precision auto` trains in bf16 on bf16 GPUs and AMX CPUs, in fp32 where bf16 would be emulated
(`session.autocast_dtype`). A CPU with AVX512-BF16 alone (bf16 dot products, no tiles) sits between:
on one such AMD EPYC a convnext_atto step at 96 px took the same time in both, while on another
(2 cores, AVX-512, December 2026) `dogbreeds bench` timed the plain timm ConvNeXt-T loop at 224 px
2.55x as fast under bf16 autocast as in fp32. So there it is measured, not assumed:
`choose_precision` times a forward + backward of the run's architecture (random init, the run's
input size and memory format, batch layout_probe.PROBE_BATCH, interleaved rounds, median) in fp32
and under bf16 autocast, takes bf16 only when it is at least MARGIN faster, and caches the answer
per machine profile, architecture, input size and memory format (layout_probe.cache_dir()). The
record goes into the run's config.yaml (`precision_probe`), and a resumed run keeps the precision
it started with.
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from .layout_probe import (PROBE_BATCH, cache_dir, new_record, read_cached, saved_record, speedup, time_steps,
                           write_cached)

MARGIN = 1.10          # bf16 autocast must train this much faster to replace fp32 (it costs precision)
CONFIG_KEY = "precision_probe"  # the record's key in config.yaml (recipe.RUN_METADATA_KEYS)


def cache_file(name: str, size: int, channels_last: bool, device: str, profile: str) -> Path:
    layout = "cl" if channels_last else "nchw"
    return cache_dir() / "train-precision" / f"{name.split('.')[0]}-{size}px-{layout}-{device}-{profile}.json"


def decide(seconds: dict[str, list[float]]) -> tuple[bool, str]:
    """(bf16, why) from the timed steps {"fp32": [...], "bf16": [...]}. Pure."""
    ratio = speedup(seconds, "bf16", "fp32")
    if ratio >= MARGIN:
        return True, f"bf16 autocast trained {ratio:.2f}x as fast as fp32 here (>= {MARGIN:.2f}x): bf16"
    return False, f"bf16 autocast at {ratio:.2f}x fp32's speed here (needs >= {MARGIN:.2f}x): fp32"


def _time_precisions(name: str, size: int, device, channels_last: bool, num_classes: int) -> dict[str, list[float]]:
    import torch

    from ..models.factory import create_model
    from .session import fast_layout_kwargs

    with torch.random.fork_rng(devices=[]):  # the run's seeded streams stay as they were
        torch.manual_seed(0)
        model = create_model(name, num_classes=num_classes, **fast_layout_kwargs(name)).to(device).train()
        x = torch.randn(PROBE_BATCH, 3, size, size, device=device)
    y = torch.zeros(PROBE_BATCH, dtype=torch.long, device=device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    bf16 = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    return time_steps({"fp32": (model, contextlib.nullcontext), "bf16": (model, bf16)}, x, y, device)


def choose_precision(name: str, size: int, device, channels_last: bool, num_classes: int = 2,
                     profile: dict | None = None, timer=None) -> dict:
    """{"bf16", "why", "seconds", "probed_at", "machine", "profile_key", "created", "cached"}. `timer` replaces
    the timing (tests): (name, size, device, channels_last, num_classes) -> {"fp32": [...], "bf16": [...]}."""
    from ..machine import machine_profile, profile_key

    profile = profile or machine_profile()
    path = cache_file(name, size, channels_last, device.type, profile_key(profile))
    record = read_cached(path, "bf16")
    if record is not None:
        return {**record, "cached": str(path)}
    print(f"precision auto: timing {name} in fp32 and bf16 autocast on this CPU (AVX512-BF16, no AMX; once per "
          f"machine, cached in {path.parent}) ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    seconds = (timer or _time_precisions)(name, size, device, channels_last, num_classes)
    bf16, why = decide(seconds)
    record = new_record("bf16", bf16, why, seconds, {"size": size, "channels_last": channels_last,
                                                     "device": device.type}, profile, started)
    write_cached(path, record)
    print(f"precision auto: {why}", file=sys.stderr, flush=True)
    return {**record, "cached": None}


def precision_for_run(recipe, device, saved_config: Path | None = None, world_size: int = 1, timer=None):
    """(autocast dtype or None, record or None): what `train` trains in. `session.autocast_dtype` decides
    everywhere but `--precision auto` on a CPU with AVX512-BF16 and no AMX; there a resumed run (saved_config:
    its config.yaml) keeps its record's choice (a run from before the probe: fp32, as then), several
    processes keep fp32 (they must agree without a probe each), else `choose_precision` at the recipe's
    input size (224 when the weights decide)."""
    import torch

    from .session import autocast_dtype, cpu_bf16_support

    if recipe.precision != "auto" or device.type != "cpu" or cpu_bf16_support() != "avx512_bf16":
        return autocast_dtype(recipe.precision, device), None
    if saved_config is not None:
        saved = saved_record(saved_config, CONFIG_KEY, "bf16")
        if saved is not None:
            return (torch.bfloat16 if saved["bf16"] else None), saved
        return None, {"bf16": False, "why": "resumed run from before the precision probe: fp32, as then"}
    if world_size > 1:
        return None, {"bf16": False, "why": f"{world_size} processes: fp32, not probed (every process must agree)"}
    record = choose_precision(recipe.model, recipe.input_size or 224, device, recipe.channels_last, timer=timer)
    return (torch.bfloat16 if record["bf16"] else None), record
