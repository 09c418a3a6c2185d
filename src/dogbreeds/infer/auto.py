"""What "auto" means: the fastest engine on this machine that gives fp32's answers.

1. Capability (machine.py): which engines are worth measuring here (`candidates`). bf16 engines
   only where the CPU has bf16 matrix units (AMX-BF16, AVX512-BF16) or the GPU has bf16
   (compute capability >= 8.0): emulated bf16 is slower than fp32. The CUDA engines only with a
   GPU. OpenVINO only when installed. Compiling engines are not probed (minutes to compile).
   On a CPU, onnxruntime is probed twice: as the default ("onnxruntime": worker threads sleep
   between operators) and with spinning worker threads ("onnxruntime-spin"); which is faster
   depends on the model, the batch and the machine's load (docs/performance.md).
2. A short probe (`probe`): up to PROBE_PHOTOS real photos (the run's validation split, or the
   photos given), each candidate built (exports cached in RUN/export/ as usual), run on all of
   them, then timed on batches of PROBE_BATCH. Its logits are compared with fp32 PyTorch's.
3. The rule (`pick`): the fastest candidate whose top-1 agrees with fp32 on at least
   MIN_AGREEMENT of the photos and whose probabilities differ by at most MAX_PROB_DIFF; an
   engine that computes in lower precision (bf16, int8) must also beat the fastest fp32 engine
   by LOW_PRECISION_MARGIN, since it changes the numbers. A lower-precision engine that fails
   the rule is never chosen; an engine that fails to build or run (an unsupported operator, a
   crash, a missing package) is skipped with its reason logged and recorded, and so is an int8
   engine that quantised no operator of the model (MobileNetV2 under dynamic int8: the fp32
   graph under an int8 label, which could otherwise win by timing noise).

The choice, what was measured and why engines were skipped are written next to the export
(RunDir.engine_choice_file: engine-choice-<model key>-<machine key>.json) and read back by the
next start on the same kind of machine (no probe, and no torch when the chosen engine's export is
cached); another machine profile (machine.profile_key: CPU model, ISA, cores, GPU, runtime
versions) probes again, and so does a record of an older RECORD_VERSION. The backend carries the record as `backend.auto_choice`, shown by
`predict --verbose`, /healthz and `dogbreeds bench`. With no photos to probe on, "auto" is
onnxruntime (fp32), unprobed, as before.

The service (`dogbreeds serve`) never runs a spinning engine that "auto" chose: `without_spinning`
gives it the same export in the sleeping session (the probe times the engine alone; the service
decodes photos on the same cores, which spinning threads take). `--engine onnxruntime-spin` still forces it.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import DogbreedsError
from .backend import AUTO_ENGINE, RUNTIME_SETTLE_S, Backend, ModelInfo, softmax

log = logging.getLogger(__name__)

PROBE_PHOTOS = 32
PROBE_BATCH = 16
PROBE_REPEATS = 3        # timed batches per engine (after one untimed pass over every photo)
PROBE_BUDGET_S = 3.0     # at most this long timing one engine (a slow engine stops early)
MIN_AGREEMENT = 0.995    # top-1 agreement with fp32 on the probe photos
MAX_PROB_DIFF = 1e-2     # max |probability difference| from fp32
LOW_PRECISION_MARGIN = 1.05  # bf16 / int8 must be this much faster than the fastest fp32 engine
SWITCH_MARGIN = 1.05    # another fp32 engine replaces the default (AUTO_ENGINE) only when this much faster:
                        # a 1% lead is probe noise on a shared CPU (openvino at 1.01x the default was cached
                        # once and then ran MobileNetV2 at 0.53x plain onnxruntime in the next bench)
RECORD_VERSION = 4      # 2: SWITCH_MARGIN; 3: onnxruntime-spin probed too; 4: openvino compiles fixed shapes
                        # (older records are probed again)

PRECISION = {"onnxruntime": "fp32", "onnxruntime-spin": "fp32", "torch": "fp32", "torch-compile": "fp32", "openvino": "fp32", "cuda": "fp32",
             "int8": "int8", "int8-static": "int8",
             "torch-bf16": "bf16", "torch-bf16-compile": "bf16", "openvino-bf16": "bf16",
             "cuda-bf16": "bf16", "cuda-bf16-compile": "bf16"}
COMPILING = ("torch-compile", "torch-bf16-compile", "cuda-bf16-compile")
REFERENCES = ("torch", "onnxruntime")  # fp32 reference: the first of these that runs
OPENVINO_ENGINES = ("openvino", "openvino-bf16")


# --- photos ----------------------------------------------------------------------------------------

def split_photos(path, part: str = "val", limit: int | None = None, last: bool = False) -> list[Path]:
    """Photos of one split of the run at `path` (a run folder or checkpoint) that exist: the first
    `limit` (the last ones with last=True). [] when the run has no split.json. No torch."""
    from ..rundir import RunDir

    try:
        run = RunDir.locate(path)
        if not run.split_file.is_file():
            return []
        split = run.read_split()
    except DogbreedsError as exc:
        log.warning("auto: cannot read the run's split (%s); no validation photos", exc)
        return []
    root = Path(split.get("root") or run.path)
    names = list((split.get("files") or {}).get(part) or [])
    found = []
    for name in (reversed(names) if last else names):
        photo = root / name
        if photo.is_file():
            found.append(photo)
            if limit is not None and len(found) >= limit:
                break
    return found[::-1] if last else found


def load_batch(photos: list[Path], info: ModelInfo) -> tuple[np.ndarray, list[Path]]:
    """The photos decoded and preprocessed (the numpy eval transform every backend uses); unreadable ones left out."""
    from ..data.decode import decode_image
    from .preprocess_np import NumpyEvalTransform

    transform = NumpyEvalTransform(info.preprocessing)
    arrays, used = [], []
    for photo in photos:
        try:
            arrays.append(transform(decode_image(photo)))
            used.append(Path(photo))
        except DogbreedsError as exc:
            log.warning("auto: probe photo left out: %s", exc)
    if not arrays:
        return np.zeros((0, 3, 1, 1), np.float32), []
    return np.stack(arrays), used


# --- 1. capability -------------------------------------------------------------------------------

def _cuda_bf16(gpu: dict) -> bool:
    try:
        return float(gpu.get("compute_capability") or 0) >= 8.0
    except ValueError:
        return False


def candidates(profile: dict, openvino: bool, include_compile: bool = False) -> tuple[list[str], dict[str, str]]:
    """(engines to probe, {engine: why not}) for a machine profile (machine.machine_profile()).
    The fp32 references come first. Pure: unit-tested with made-up profiles."""
    from ..machine import has_native_bf16

    flags = profile.get("cpu", {}).get("flags") or {}
    gpus = profile.get("gpu") or []
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    if gpus:
        gpu = gpus[0]
        chosen += ["torch", "onnxruntime", "cuda"]
        if _cuda_bf16(gpu):
            chosen.append("cuda-bf16")
            if include_compile:
                chosen.append("cuda-bf16-compile")
            else:
                skipped["cuda-bf16-compile"] = "compiles on first use (minutes): not probed; force it with --engine"
        else:
            for engine in ("cuda-bf16", "cuda-bf16-compile"):
                skipped[engine] = (f"{gpu.get('name')} has compute capability {gpu.get('compute_capability')} "
                                   "< 8.0: no bf16")
        for engine in ("onnxruntime-spin", "openvino", "openvino-bf16", "int8", "int8-static", "torch-bf16",
                       "torch-compile", "torch-bf16-compile"):
            skipped[engine] = "a CUDA GPU is present: only the CPU fp32 references are probed beside it"
        return chosen, skipped

    for engine in ("cuda", "cuda-bf16", "cuda-bf16-compile"):
        skipped[engine] = "no CUDA GPU"
    chosen += ["torch", "onnxruntime", "onnxruntime-spin"]  # the default session, and the same with spinning threads
    if openvino:
        chosen.append("openvino")
    else:
        skipped["openvino"] = 'OpenVINO is not installed (pip install -e ".[openvino]")'
    chosen += ["int8", "int8-static"]
    if has_native_bf16(flags):
        chosen.append("torch-bf16")
        if openvino:
            chosen.append("openvino-bf16")
        else:
            skipped["openvino-bf16"] = skipped["openvino"]
    else:
        reason = "no native bf16 on this CPU (no AMX-BF16 / AVX512-BF16): emulated bf16 is slower than fp32"
        skipped["torch-bf16"] = reason
        skipped["openvino-bf16"] = reason if openvino else skipped["openvino"]
        skipped["torch-bf16-compile"] = reason
    for engine in ("torch-compile",) + (("torch-bf16-compile",) if has_native_bf16(flags) else ()):
        if include_compile:
            chosen.append(engine)
        else:
            skipped[engine] = "compiles on first use (minutes): not probed; force it with --engine"
    return chosen, skipped


# --- 3. the rule ------------------------------------------------------------------------------------

def passes(measured: dict) -> bool:
    return (measured.get("agreement") is not None and measured["agreement"] >= MIN_AGREEMENT
            and measured["max_prob_diff"] <= MAX_PROB_DIFF)


def pick(measurements: list[dict]) -> tuple[str | None, str]:
    """(engine, why) from the probe's measurements (dicts with engine, precision, images_per_s,
    agreement, max_prob_diff); None when no fp32 engine was measured. Pure."""
    ok = [m for m in measurements if passes(m)]
    fp32 = [m for m in ok if m["precision"] == "fp32"]
    if not fp32:
        return None, "no fp32 engine ran"
    best = max(fp32, key=lambda m: m["images_per_s"])
    lower = [m for m in ok if m["precision"] != "fp32" and m["images_per_s"] >= best["images_per_s"] * LOW_PRECISION_MARGIN]
    if lower:
        fastest = max(lower, key=lambda m: m["images_per_s"])
        return fastest["engine"], (f"{fastest['precision']}, {fastest['images_per_s'] / best['images_per_s']:.2f}x the "
                                   f"fastest fp32 engine ({best['engine']}), agreeing with fp32")
    rejected = [m["engine"] for m in measurements if m["precision"] != "fp32" and not passes(m)]
    why = "the fastest fp32 engine"
    default = next((m for m in fp32 if m["engine"] == AUTO_ENGINE), None)
    if default is not None and default is not best and best["images_per_s"] < default["images_per_s"] * SWITCH_MARGIN:
        why = (f"the default fp32 engine ({best['engine']} was only {best['images_per_s'] / default['images_per_s']:.2f}x "
               f"as fast, under {SWITCH_MARGIN:.2f}x)")
        best = default
    if rejected:
        why += f"; {', '.join(rejected)} disagreed with fp32 beyond the limits"
    return best["engine"], why


# --- 2. the probe ------------------------------------------------------------------------------------

def _timed_speed(backend: Backend, batch: np.ndarray) -> float:
    """Seconds for one call on `batch`."""
    start = time.perf_counter()
    backend.forward(batch)
    return time.perf_counter() - start


def _speeds(backends: dict[str, Backend], batch: np.ndarray) -> dict[str, float]:
    """Images per second of each backend on `batch`: PROBE_REPEATS rounds, each timing every engine
    once in turn (so a change in the machine's load falls on all of them alike), each after an untimed
    RUNTIME_SETTLE_S pause (the previous engine's spinning threads would slow it), the median per
    engine; a round starts only while the timing has taken less than PROBE_BUDGET_S per engine."""
    times: dict[str, list[float]] = {engine: [] for engine in backends}
    started = time.perf_counter()
    for _ in range(PROBE_REPEATS):
        for engine, backend in backends.items():
            time.sleep(RUNTIME_SETTLE_S)
            times[engine].append(_timed_speed(backend, batch))
        if time.perf_counter() - started > PROBE_BUDGET_S * max(1, len(backends)):
            break
    return {engine: len(batch) / float(np.median(t)) for engine, t in times.items()}


def _outputs(backend: Backend, batch: np.ndarray) -> np.ndarray:
    return np.concatenate([backend.forward(batch[i:i + PROBE_BATCH]) for i in range(0, len(batch), PROBE_BATCH)])


def probe(model, info: ModelInfo, cache_dir: Path | None, threads: int | None, photos: list[Path],
          profile: dict | None = None, engines: list[str] | None = None,
          include_compile: bool = False) -> tuple[dict, dict[str, Backend]]:
    """Measure the candidate engines for a torch `model` on `photos`; returns (the record, the
    backends built: engine -> Backend). `engines` overrides the capability's candidates (bench, tests)."""
    from ..machine import describe, machine_profile, profile_key
    from .backend import build_backend
    from .runtime_onnxruntime import photo_set_key
    from .runtime_openvino import available as openvino_available

    profile = profile or machine_profile()
    started = time.perf_counter()
    batch, used = load_batch(photos[:PROBE_PHOTOS], info)
    if not used:
        raise DogbreedsError(f"none of the {len(photos)} probe photos could be read (first: {photos[0]}); "
                             "pass readable photos, or choose an engine with --engine")
    chosen, skipped = candidates(profile, openvino_available(), include_compile)
    if engines is not None:
        chosen = list(engines)
        skipped = {e: why for e, why in skipped.items() if e not in chosen}
    ordered = [e for e in REFERENCES if e in chosen] + [e for e in chosen if e not in REFERENCES]
    # info.photos stays as given: None lets int8-static calibrate on the run's own validation photos
    # (the ones its cached file is named by, so that the next start finds it without torch)
    built: dict[str, Backend] = {}
    outputs: dict[str, np.ndarray] = {}
    measured: list[dict] = []
    for engine in ordered:
        start = time.perf_counter()
        try:
            backend = build_backend(model, engine, info, cache_dir, threads, quiet=True)
            build_s = time.perf_counter() - start
            if backend.not_quantised:  # an "int8" graph with no integer operator: fp32 under another name
                skipped[engine] = backend.not_quantised
                log.info("auto: engine %s skipped: %s", engine, backend.not_quantised)
                continue
            logits = _outputs(backend, batch)  # every photo once: the answers, and the warm-up
            if logits.shape != (len(batch), len(info.classes)) or not np.isfinite(logits).all():
                raise DogbreedsError(f"gave logits of shape {logits.shape}"
                                     f"{'' if np.isfinite(logits).all() else ' with non-finite values'}")
        except Exception as exc:  # an unsupported operator, a runtime crash, a missing package ...
            reason = f"{type(exc).__name__}: {exc}"
            reason = reason if len(reason) <= 400 else reason[:397] + "..."
            skipped[engine] = f"failed in the probe: {reason}"
            log.warning("auto: engine %s skipped: %s", engine, reason)
            continue
        built[engine], outputs[engine] = backend, logits
        measured.append({"engine": engine, "precision": PRECISION.get(engine, "fp32"),
                         "build_s": round(build_s, 2), "description": backend.description})
    try:
        speeds = _speeds(built, batch[:PROBE_BATCH])
    except Exception as exc:  # a runtime that answered once and then crashed: time them one by one
        log.warning("auto: timing the engines together failed (%s: %s); timing each alone", type(exc).__name__, exc)
        speeds = {}
        for engine in list(built):
            try:
                speeds.update(_speeds({engine: built[engine]}, batch[:PROBE_BATCH]))
            except Exception as alone:
                skipped[engine] = f"failed in the probe: {type(alone).__name__}: {alone}"[:400]
                built.pop(engine)
                outputs.pop(engine)
        measured = [m for m in measured if m["engine"] in built]
    for m in measured:
        m["images_per_s"] = round(speeds[m["engine"]], 2)
    reference = next((e for e in REFERENCES if e in outputs), None)
    if reference is not None:
        want = softmax(outputs[reference])
        for m in measured:
            got = softmax(outputs[m["engine"]])
            m["agreement"] = round(float((got.argmax(1) == want.argmax(1)).mean()), 4)
            m["max_prob_diff"] = float(np.abs(got - want).max())
            m["passed"] = passes(m)
    engine, why = pick(measured) if reference is not None else (None, "no fp32 reference engine ran")
    chosen_m = next((m for m in measured if m["engine"] == engine), {})
    record = {
        "version": RECORD_VERSION, "engine": engine, "why": why, "precision": chosen_m.get("precision"),
        "images_per_s": chosen_m.get("images_per_s"), "agreement": chosen_m.get("agreement"),
        "max_prob_diff": chosen_m.get("max_prob_diff"), "batch": min(PROBE_BATCH, len(batch)),
        "photos": len(used), "photo_set": photo_set_key(used), "reference": reference,
        "rule": (f"fastest with top-1 agreement >= {MIN_AGREEMENT:.1%} and max |probability difference| <= "
                 f"{MAX_PROB_DIFF:g} vs fp32 ({reference}); bf16/int8 only when >= {LOW_PRECISION_MARGIN:.2f}x the "
                 "fastest fp32 engine"),
        "model": info.name, "model_key": info.key, "machine": describe(profile), "profile_key": profile_key(profile),
        "measured": sorted(measured, key=lambda m: -m["images_per_s"]), "skipped": skipped,
        "probe_s": round(time.perf_counter() - started, 1),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "probed": True,
    }
    return record, built


def summary(record: dict | None) -> str:
    """One line for `predict --verbose` and logs."""
    if not record:
        return "engine chosen by name (--engine)"
    if not record.get("probed"):
        return f"auto: {record['engine']} ({record.get('why')})"
    return (f"auto: {record['engine']} ({record.get('precision')}), {record.get('images_per_s')} images/s at batch "
            f"{record.get('batch')}, top-1 agreement with fp32 {record.get('agreement', 0):.1%} and max |probability "
            f"difference| {record.get('max_prob_diff', 0):.1e} on {record.get('photos')} photos; {record.get('why')}; "
            f"measured on {record.get('machine')} ({record.get('created')})")


def without_spinning(backend: Backend) -> Backend:
    """`backend`, or, when "auto" chose a spinning engine (onnxruntime-spin), the same export in the
    default, sleeping session, its record saying so: what `dogbreeds serve` runs. The service
    decodes uploads on threads of the same cores while the model runs; spinning workers busy-wait
    on them between operators (docs/serving.md). A spinning engine named with --engine (no
    auto_choice) is kept: the user asked for it."""
    from .runtime_onnxruntime import FP32, SPIN, OrtBackend

    record = backend.auto_choice
    if not record or backend.kind != SPIN:
        return backend
    sleeping = OrtBackend(backend.path, threads=getattr(backend, "threads", None), kind=FP32,
                          checkpoint=backend.checkpoint)
    measured = next((m for m in record.get("measured") or [] if m.get("engine") == FP32), {})
    sleeping.auto_choice = {**record, "engine": FP32, "chose": SPIN,
                            **{k: measured[k] for k in ("images_per_s", "agreement", "max_prob_diff") if k in measured},
                            "why": f"{record.get('why')}; the service runs {FP32} instead of {SPIN}: spinning "
                                   "threads take the cores its decoding needs (docs/serving.md)"}
    return sleeping


# --- the records -------------------------------------------------------------------------------------

def choice_file(cache_dir: Path, model_key: str, profile: str) -> Path:
    from ..rundir import RunDir

    return RunDir(Path(cache_dir).parent).engine_choice_file(f"{model_key}-{profile}", export_dir=Path(cache_dir))


def read_choice(path: Path, photos: list[Path] | None = None) -> dict | None:
    """The record at `path`, or None (missing, unreadable, of another version, or probed on other photos)."""
    from .backend import engine_names
    from .runtime_onnxruntime import photo_set_key

    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        log.warning("auto: ignoring %s (%s); probing again", path, exc)
        return None
    if (not isinstance(record, dict) or record.get("version") != RECORD_VERSION
            or record.get("engine") not in engine_names()):
        return None
    if photos and record.get("photo_set") != photo_set_key([Path(p) for p in photos[:PROBE_PHOTOS]]):
        return None
    return record


def write_choice(path: Path, record: dict) -> None:
    from ..rundir import atomic_write_text

    try:
        atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
    except OSError as exc:  # a read-only run folder: the choice still holds for this process
        log.warning("auto: cannot write %s (%s); the probe will run again next time", path, exc)


def stored_choice(run, cache_dir: Path | None = None) -> dict | None:
    """What "auto" chose for `run` (a run folder or checkpoint) on this machine, or None: for `dogbreeds bench`."""
    from ..machine import profile_key
    from ..rundir import RunDir
    from .backend import run_key

    run = RunDir.locate(run)
    checkpoint = run.checkpoint()
    return read_choice(choice_file(Path(cache_dir or run.export_dir), run_key(run, checkpoint), profile_key()))


def _unprobed(reason: str) -> dict:
    return {"version": RECORD_VERSION, "engine": AUTO_ENGINE, "precision": "fp32", "probed": False, "why": reason}


def _choose(model, info: ModelInfo, cache_dir: Path | None, threads: int | None, photos: list[Path],
            path: Path | None) -> Backend:
    """Probe, write the record at `path` (None: keep it in memory), return the chosen engine's backend."""
    # Said on stderr, not only logged: the first start on a machine takes tens of seconds more.
    print(f"auto: choosing the fastest engine for this machine on {min(len(photos), PROBE_PHOTOS)} validation "
          "photos (once per machine and model; --engine NAME skips this) ...", file=sys.stderr, flush=True)
    record, built = probe(model, info, cache_dir, threads, photos)
    if record["engine"] is None:
        raise DogbreedsError(f"no engine could run {info.name} in the probe: "
                             + "; ".join(f"{e}: {why}" for e, why in record["skipped"].items() if "failed" in why)
                             + "; choose one with --engine torch")
    if path is not None:
        write_choice(path, record)
    backend = built.pop(record["engine"])
    built.clear()
    backend.auto_choice = record
    print(summary(record), file=sys.stderr, flush=True)
    return backend


def _reuse(record: dict | None, build) -> Backend | None:
    """The engine a stored record chose, built with `build(engine)`; None (probe again) when
    there is no record or that engine cannot be built now."""
    if record is None:
        return None
    try:
        backend = build(record["engine"])
    except DogbreedsError as exc:
        log.warning("auto: the engine chosen before, %s, cannot be built now (%s); probing again", record["engine"], exc)
        return None
    if backend.not_quantised:  # recorded before such engines were skipped: the fp32 graph under an int8 label
        log.warning("auto: the engine chosen before, %s: %s; probing again", record["engine"], backend.not_quantised)
        return None
    backend.auto_choice = record
    return backend


def _unprobed_backend(backend: Backend, missing: str) -> Backend:
    """The fp32 default, recorded as not probed for want of `missing`."""
    backend.auto_choice = _unprobed(f"{missing} to probe the engines on: the fp32 default")
    return backend


def auto_for_run(run, checkpoint: Path, cache_dir: Path, threads: int | None, photos: list[Path] | None) -> Backend:
    """open_run(engine="auto"): the cached choice (no torch when its export is cached), else probe."""
    from ..machine import profile_key
    from .backend import info_for_loaded, open_engine, run_key

    key = run_key(run, checkpoint)
    path = choice_file(cache_dir, key, profile_key())
    reused = _reuse(read_choice(path, photos),
                    lambda engine: open_engine(run, checkpoint, engine, cache_dir, threads, key=key, photos=photos,
                                               quiet=True))
    if reused is not None:
        return reused
    probe_photos = list(photos or split_photos(run.path, "val", limit=PROBE_PHOTOS))
    if not probe_photos:
        return _unprobed_backend(open_engine(run, checkpoint, AUTO_ENGINE, cache_dir, threads, key=key), "no validation photos")
    from ..models.factory import load_run

    loaded = load_run(checkpoint)
    info = info_for_loaded(loaded)
    info.key, info.photos = key, list(photos) if photos else None
    return _choose(loaded.model, info, cache_dir, threads, probe_photos, path)


def auto_for_loaded(loaded, cache_dir: Path | None, threads: int | None, key: str | None,
                    photos: list[Path] | None) -> Backend:
    """backend_for_loaded(engine="auto") (what `evaluate` calls): the cached choice, else probe."""
    from ..machine import profile_key
    from ..rundir import RunDir
    from .backend import _key_record, backend_for_loaded, checkpoint_key, info_for_loaded

    run = RunDir.locate(loaded.path)
    cache_dir = Path(cache_dir) if cache_dir is not None else run.export_dir
    key = key or checkpoint_key(loaded.path, _key_record(loaded.metadata, loaded.classes))
    path = choice_file(cache_dir, key, profile_key())
    reused = _reuse(read_choice(path, photos),
                    lambda engine: backend_for_loaded(loaded, engine, cache_dir, threads, key=key, photos=photos,
                                                      quiet=True))
    if reused is not None:
        return reused
    probe_photos = list(photos or split_photos(run.path, "val", limit=PROBE_PHOTOS))
    if not probe_photos:
        return _unprobed_backend(backend_for_loaded(loaded, AUTO_ENGINE, cache_dir, threads, key=key), "no validation photos")
    info = info_for_loaded(loaded)
    info.key, info.photos = key, list(photos) if photos else None
    return _choose(loaded.model, info, cache_dir, threads, probe_photos, path)


def auto_for_model(model, info: ModelInfo, cache_dir: Path | None, threads: int | None) -> Backend:
    """build_backend(engine="auto") for a model in memory: probe on `info.photos` when given
    (the choice cached in `cache_dir`), else onnxruntime."""
    from ..machine import profile_key
    from .backend import build_backend, model_key

    if not info.photos:
        return _unprobed_backend(build_backend(model, AUTO_ENGINE, info, cache_dir, threads), "no photos given")
    info.key = info.key or model_key(model, info)
    path = choice_file(cache_dir, info.key, profile_key()) if cache_dir is not None else None
    reused = _reuse(read_choice(path, info.photos) if path is not None else None,
                    lambda engine: build_backend(model, engine, info, cache_dir, threads, quiet=True))
    if reused is not None:
        return reused
    return _choose(model, info, cache_dir, threads, list(info.photos), path)
