"""create_model: the one door to every network (timm names, roadmap models, weight files)."""
from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch

from dogbreeds.data.records import ClassInfo
from dogbreeds.errors import DogbreedsError, WeightsError
from dogbreeds.preprocessing import Preprocessing

from .formats import ConvertedWeights
from .formats.arch import classifier_prefix, match_architecture, meta_model

log = logging.getLogger("dogbreeds")

ROADMAP_MODULE = "dogbreeds.roadmap.models"
# Buffers that only count training steps: a file without them is still complete.
IGNORABLE_SUFFIXES = ("num_batches_tracked",)


def create_model(name: str | None = None, num_classes: int | None = None, weights=None,
                 pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """Build a timm (or roadmap) model, optionally with weights.

    name:        timm model name, optionally with a pretrained tag ('convnext_tiny.fb_in22k_ft_in1k').
                 May be None when `weights` is given: the file says the architecture.
    num_classes: output classes. None keeps the head of the weights (or of the pretrained tag),
                 else 1000; 0 gives a headless feature extractor. A head of another size is
                 re-initialised (and logged).
    weights:     a local file or folder in any supported format (see docs/models.md).
    pretrained:  download timm's default pretrained weights (a tag in `name` implies it).
    kwargs:      passed to timm.create_model (e.g. drop_path_rate) and remembered for rebuilding.
    """
    _register_roadmap()
    if weights is not None and pretrained:
        raise DogbreedsError(f"pass either pretrained=True (download) or weights={str(weights)!r} (local file), not both")
    if weights is not None:
        return _from_weights(name, num_classes, Path(weights).expanduser(), kwargs)
    if not name:
        raise DogbreedsError("create_model needs a model name (e.g. 'convnext_tiny') or weights=<file>")
    arch, tag = _check_name(name)
    if tag or pretrained:
        model = _download(name, num_classes, kwargs)
    else:
        model = timm.create_model(name, pretrained=False, num_classes=1000 if num_classes is None else num_classes, **kwargs)
    cfg = model.pretrained_cfg
    source = "timm:" + ".".join(filter(None, (cfg.get("architecture", arch), cfg.get("tag"))))
    pre = Preprocessing.from_timm_cfg(cfg, source=source)
    return _attach(model, arch, kwargs, pre)


def _from_weights(name: str | None, num_classes: int | None, path: Path, kwargs: dict) -> torch.nn.Module:
    from .formats.detect import convert_weights

    if name:
        _check_name(name)
    if not path.exists() and name and f"{name}.{path}" in timm.list_pretrained(f"{name}.*"):
        raise WeightsError(f"weights={str(path)!r} is not a file; to download timm's pretrained weights put the "
                           f"tag in the model name: create_model('{name}.{path}') or --model {name}.{path}")
    return _model_from_converted(name, num_classes, convert_weights(path, name), path, kwargs)


def _model_from_converted(name: str | None, num_classes: int | None, converted: ConvertedWeights, path: Path,
                          kwargs: dict) -> torch.nn.Module:
    """A timm model built for and loaded with weights already read by a converter.

    What the file says is checked before anything is allocated: its model_kwargs against the
    schema (safety.validate_model_kwargs: no paths, no unknown keys), its architecture name, and
    its tensors' names and shapes against the model built on the meta device (no memory). So a
    small file that declares a huge model is refused, not built."""
    from .safety import validate_model_kwargs

    arch = name or converted.model_name
    _check_name(arch)
    validate_model_kwargs(converted.model_kwargs, path)
    model_kwargs = {**converted.model_kwargs, **kwargs}
    wanted = converted.num_classes if num_classes is None else num_classes  # None: keep the file's head
    try:
        shapes_only = meta_model(arch, num_classes=wanted, **model_kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
        raise WeightsError(f"{path}: timm cannot build {arch} with {model_kwargs} ({type(exc).__name__}: "
                           f"{_first_line(exc)}); the weights' metadata is wrong for this architecture") from None
    _plan_load(shapes_only, converted, path)  # refuses weights that do not fit, before the real model exists
    model = timm.create_model(arch, pretrained=False, num_classes=wanted, **model_kwargs)
    load_converted(model, converted, path)
    pre = converted.preprocessing or Preprocessing.from_timm_cfg(model.pretrained_cfg, source=f"timm:{arch}")
    # The cfg timm attached describes its own default weights for `arch` (their hub id, url, tag,
    # test-time size), not this file: keep the architecture facts, drop the claims about weights.
    model.pretrained_cfg = {k: v for k, v in (model.pretrained_cfg or {}).items() if k not in _FOREIGN_WEIGHT_KEYS}
    model.pretrained_cfg["num_classes"] = int(getattr(model, "num_classes", wanted) or 0)
    return _attach(model, arch.split(".")[0], model_kwargs, pre)


# pretrained_cfg keys that describe timm's own weights; wrong for a model loaded from a local file.
_FOREIGN_WEIGHT_KEYS = ("url", "hf_hub_id", "hf_hub_filename", "tag", "file", "license",
                        "test_input_size", "test_crop_pct", "origin_url", "paper_ids", "paper_name", "notes")


def load_converted(model: torch.nn.Module, converted: ConvertedWeights, path) -> None:
    """Load timm-named weights; re-initialise a head of another size; refuse anything else."""
    sd, reinit_head = _plan_load(model, converted, path)
    model_classes = int(getattr(model, "num_classes", 0) or 0)
    model.load_state_dict(sd, strict=False)  # strictness checked by _plan_load, minus head/step counters
    if reinit_head:
        model.dogbreeds_new_head = bool(model_classes)  # train/ may shrink a fresh head (Recipe.head_init_scale)
        log.info("%s: head has %d classes in the file, model has %d: head %s", path, converted.num_classes,
                 model_classes, "re-initialised" if model_classes else "dropped (feature extractor)")


def _plan_load(model: torch.nn.Module, converted: ConvertedWeights, path) -> tuple[dict, bool]:
    """(the tensors to load, whether the head is re-initialised), or a WeightsError saying what
    does not fit. Reads only names and shapes, so `model` may live on the meta device."""
    target = model.state_dict()
    head = classifier_prefix(model)
    model_classes = int(getattr(model, "num_classes", 0) or 0)
    sd = dict(converted.state_dict)
    if head is None and converted.num_classes:
        # A headless model (num_classes=0, a feature extractor): drop the file's classifier,
        # whose name we learn from the file's own architecture.
        head = classifier_prefix(meta_model(converted.model_name, **converted.model_kwargs))
    reinit_head = head is not None and converted.num_classes != model_classes
    if reinit_head:
        sd = {k: v for k, v in sd.items() if not k.startswith(head + ".")}
    sd = {k: _fit_singleton_dims(v, target[k]) if k in target else v for k, v in sd.items()}

    missing = [k for k in target if k not in sd and not k.endswith(IGNORABLE_SUFFIXES)
               and not (reinit_head and k.startswith(head + "."))]
    unexpected = [k for k in sd if k not in target and not k.endswith(IGNORABLE_SUFFIXES)]
    misshaped = [f"{k} {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
                 for k in sd if k in target and sd[k].shape != target[k].shape]
    if missing or unexpected or misshaped:
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        source = converted.model_name.split(".")[0]
        if converted.format == "timm" and source == arch:  # the name came from the caller: ask the shapes
            found = match_architecture(converted.state_dict)
            source = found[0] if found else None
        looks_like = f" (the file holds {source} weights)" if source and source != arch else ""
        raise WeightsError(
            f"{path}: {converted.format} weights{looks_like} do not fit {arch}: "
            + "; ".join(f"{label} {_short(keys)}" for label, keys in
                        (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys)
            + ". Pass the matching model name, or name=None to use the file's own architecture"
        )
    return {k: v for k, v in sd.items() if k in target}, reinit_head


def _fit_singleton_dims(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(C,1,1) -> (C,), (O,I) -> (O,I,1,1) and back: layouts that differ only by size-1 dims hold
    the same numbers in the same order (layer scale in NCHW code; ConvNeXt MLPs as Linear layers
    or, with timm's conv_mlp=True, as 1x1 convolutions).

    The one place where weight layouts are matched, for every format: converters keep their
    source's shapes (timm, official, HF, torchvision and Keras ConvNeXt give Linear (O,I) MLP
    weights; our own checkpoints whatever layout the run trained with), and the shape the model
    expects decides. So create_model('convnext_tiny', conv_mlp=True, weights=...) loads any of
    them, and a conv_mlp checkpoint loads into a Linear model."""
    if value.shape != like.shape and value.numel() == like.numel():
        if [d for d in value.shape if d != 1] == [d for d in like.shape if d != 1]:
            return value.reshape(like.shape)
    return value


def _download(name: str, num_classes: int | None, kwargs: dict) -> torch.nn.Module:
    kwargs = dict(kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        with _hub_access(name):
            if _same_layout(name, kwargs):
                model = timm.create_model(name, pretrained=True, **kwargs)
            else:
                model = _download_into_layout(name, kwargs)
    except WeightsError:
        raise
    except Exception as exc:
        if not _is_download_error(exc):
            raise
        raise WeightsError(
            f"downloading pretrained weights for {name!r} failed ({type(exc).__name__}: {_first_line(exc)}). "
            f"Without internet access, download the file elsewhere and pass it as a local file: "
            f"{_local_file_hint(name)}"
        ) from exc
    cfg_classes = model.pretrained_cfg.get("num_classes")
    if num_classes is not None and cfg_classes and cfg_classes != num_classes:
        log.info("%s: pretrained head has %d classes, model has %d: head re-initialised", name, cfg_classes, num_classes)
    return model


def _same_layout(name: str, kwargs: dict) -> bool:
    """Do `kwargs` leave the parameter shapes of timm's pretrained file as they are (num_classes
    aside)? timm loads its files strictly, so e.g. conv_mlp=True (1x1-conv MLPs, what training
    uses for speed) on a Linear-MLP ConvNeXt file fails inside timm. Checked on meta models."""
    shaping = {k: v for k, v in kwargs.items() if k != "num_classes"}
    if not shaping:
        return True
    classes = {"num_classes": kwargs["num_classes"]} if "num_classes" in kwargs else {}

    def shapes(**kw) -> dict:
        return {k: tuple(v.shape) for k, v in meta_model(name, **kw).state_dict().items()}

    return shapes(**classes, **shaping) == shapes(**classes)


def _download_into_layout(name: str, kwargs: dict) -> torch.nn.Module:
    """timm's pretrained model in its own layout, its weights moved into the model `kwargs`
    build (load_converted matches layouts that differ only by size-1 dims, refuses the rest)."""
    classes = {"num_classes": kwargs["num_classes"]} if "num_classes" in kwargs else {}
    source = timm.create_model(name, pretrained=True, **classes)
    model = timm.create_model(name, pretrained=False, **kwargs)
    arch = name.split(".")[0]
    converted = ConvertedWeights("timm", arch, source.state_dict(), int(source.num_classes or 0))
    load_converted(model, converted, f"timm:{name}")
    model.pretrained_cfg = model.default_cfg = dict(source.pretrained_cfg)
    return model


# How long the Hugging Face hub may take to answer one HEAD request before we call it unreachable.
# huggingface_hub itself waits 10 s per request and then retries with backoff (about a minute in
# all when nothing answers); one short probe first makes "no network" an error within seconds.
HUB_PROBE_SECONDS = 3.0
# What timm asks the hub for, in order, when the pretrained cfg names no file (timm.models._hub).
TIMM_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


@contextlib.contextmanager
def _hub_access(name: str):
    """Around timm's download: probe the hub once with a short timeout. Reachable: timm downloads
    as usual (and refreshes the cache). Unreachable but cached: timm runs in offline mode and
    loads the cached copy. Unreachable and not cached: a WeightsError at once, saying how to pass
    a local file. HF_HUB_OFFLINE=1 skips the probe (huggingface_hub then reads only the cache)."""
    from huggingface_hub import constants

    repo, revision, files = _hub_location(name)
    if repo is None or constants.HF_HUB_OFFLINE:
        yield
        return
    problem = _probe_hub(repo, revision, files[0])
    if problem is None:
        yield
        return
    if any(isinstance(_cached_file(repo, f, revision), str) for f in files):
        log.warning("%s: the Hugging Face hub at %s is unreachable (%s); using the copy in the local cache",
                    name, constants.ENDPOINT, problem)
        saved = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = saved
        return
    raise WeightsError(
        f"cannot download pretrained weights for {name!r}: the Hugging Face hub at {constants.ENDPOINT} is "
        f"unreachable ({problem}) and {repo} is not in the local cache "
        f"({constants.HF_HUB_CACHE}). Pass a local file instead: {_local_file_hint(name)}; or point HF_HUB_CACHE "
        f"at a cache that holds {repo}, or HF_ENDPOINT at a reachable mirror"
    )


def _local_file_hint(name: str) -> str:
    arch = name.split(".")[0]
    return f"create_model({arch!r}, weights='path/to/file') or --weights path/to/file"


def _hub_location(name: str) -> tuple[str | None, str | None, tuple[str, ...]]:
    """(repo id, revision, files timm will ask for) of a timm pretrained tag served by the hub;
    (None, None, ()) for weights timm fetches from a plain URL, or names timm does not know."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None, None, ()
    repo, _, revision = cfg.hf_hub_id.partition("@")
    return repo, revision or None, (cfg.hf_hub_filename,) if cfg.hf_hub_filename else TIMM_HUB_FILES


def _cached_file(repo: str, filename: str, revision: str | None):
    from huggingface_hub import try_to_load_from_cache

    return try_to_load_from_cache(repo, filename, revision=revision)


def _probe_hub(repo: str, revision: str | None, filename: str) -> str | None:
    """None when the hub answers a HEAD for the file (any 2xx-4xx answer: timm handles a
    missing file or a gated repo itself); else why not, in a few words. The probe runs in a
    thread so that even a name lookup that hangs (no DNS server) cannot hold it past the limit."""
    import threading

    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    outcome: list[str | None] = []

    def probe() -> None:
        try:
            get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision), timeout=HUB_PROBE_SECONDS)
            outcome.append(None)
        except HfHubHTTPError as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None) or 0
            outcome.append(f"HTTP {status}" if status >= 500 else None)
        except Exception as exc:  # connection refused, timeout, DNS, TLS, proxy: no usable hub
            outcome.append(f"{type(exc).__name__}: {_first_line(exc)}" if _first_line(exc) else type(exc).__name__)

    thread = threading.Thread(target=probe, name="dogbreeds-hub-probe", daemon=True)
    thread.start()
    thread.join(HUB_PROBE_SECONDS + 0.5)
    return outcome[0] if outcome else f"no answer within {HUB_PROBE_SECONDS:g} s"


def _is_download_error(exc: BaseException) -> bool:
    # huggingface_hub errors (offline mode, missing cache entry, HTTP), DNS/socket/URL errors.
    module = type(exc).__module__ or ""
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) or module.startswith(
        ("huggingface_hub", "requests", "httpx", "urllib3"))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


def _check_name(name: str) -> tuple[str, str]:
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        known = sorted(set(timm.list_models()) | {f"roadmap_step{i}" for i in range(12)})
        close = difflib.get_close_matches(arch, known, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `dogbreeds models` or timm.list_models()"
        if arch.startswith("roadmap_") and importlib.util.find_spec(ROADMAP_MODULE) is None:
            hint += f" (roadmap models need {ROADMAP_MODULE}, which is not installed)"
        raise DogbreedsError(f"unknown model name {arch!r}{hint}")
    if tag and name not in timm.list_pretrained(f"{arch}.*"):
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
        close = difflib.get_close_matches(tag, tags, n=5, cutoff=0.3)
        raise DogbreedsError(f"unknown pretrained tag {tag!r} for {arch}; available: {', '.join(close or tags) or 'none'}")
    return arch, tag


def _register_roadmap() -> None:
    """Import the roadmap models so timm knows their names (an optional area of the project)."""
    try:
        importlib.import_module(ROADMAP_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != ROADMAP_MODULE:
            raise


def _attach(model: torch.nn.Module, name: str, kwargs: dict, preprocessing: Preprocessing) -> torch.nn.Module:
    set_preprocessing(model, preprocessing)
    model.dogbreeds_name = name
    model.dogbreeds_kwargs = dict(kwargs)
    return model


# The pretrained_cfg keys that describe the eval transform; Preprocessing holds the same five.
_TRANSFORM_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")


def set_preprocessing(model: torch.nn.Module, preprocessing: Preprocessing) -> torch.nn.Module:
    """Give `model` this preprocessing, in both places it is read: `model.preprocessing` (ours)
    and `model.pretrained_cfg` (timm's: `timm.data.resolve_data_config(model=model)` and every
    tool that follows timm's convention read it). Call this, not `model.preprocessing = ...`,
    whenever the preprocessing changes (e.g. a new input size), or the two drift apart.

    A cfg whose transform changes also loses timm's test-time keys (test_input_size,
    test_crop_pct): they described the old weights, not these."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    wanted = {
        "input_size": (3, preprocessing.input_size, preprocessing.input_size),
        "mean": tuple(preprocessing.mean),
        "std": tuple(preprocessing.std),
        "interpolation": preprocessing.interpolation,
        "crop_pct": preprocessing.crop_pct,
    }
    if any(_cfg_value(cfg.get(k)) != _cfg_value(v) for k, v in wanted.items()):
        for key in ("test_input_size", "test_crop_pct"):
            cfg.pop(key, None)
    cfg.update(wanted)
    cfg["crop_mode"] = "center"  # Preprocessing's eval transform is always a centre crop
    model.pretrained_cfg = model.default_cfg = cfg
    model.preprocessing = preprocessing
    return model


def _cfg_value(value):
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else value


def _short(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return f"({len(items)}): {shown}" + (f", ... {len(items) - limit} more" if len(items) > limit else "")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    classes: ClassInfo
    preprocessing: Preprocessing
    name: str
    path: Path
    metadata: dict = field(default_factory=dict)  # the checkpoint's sidecar, as read_checkpoint_meta gives it


def load_run(path) -> LoadedModel:
    """A run directory (checkpoints/best.safetensors, else last), its checkpoints folder, or a
    checkpoint file (or its sidecar), ready to predict.

    A run's own checkpoint is read by its own reader (checkpoint_format), not by the format
    sniffing of `create_model(weights=...)` that foreign files need."""
    from ..rundir import RunDir
    from .checkpoint_format import convert_checkpoint, read_checkpoint_meta

    run = RunDir.locate(path)
    checkpoint = run.checkpoint()
    meta = read_checkpoint_meta(checkpoint)
    _register_roadmap()  # roadmap models are timm names only once registered
    model = _model_from_converted(meta["model"], int(meta["num_classes"]), convert_checkpoint(checkpoint), checkpoint, {})
    model.eval()
    return LoadedModel(model, run.read_classes(), model.preprocessing, meta["model"], checkpoint, meta)
