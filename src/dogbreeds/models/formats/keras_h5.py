"""Read a Keras HDF5 file into a flat list of layers, with h5py only (Keras is not needed).

Two layouts exist and both are read here:

- legacy full-model / weights HDF5 (`model.save("x.h5")`, Keras 2 and 3):
  ``model_weights/<top layer>/<weight name>`` with a ``weight_names`` attribute on each top
  layer group and, for full models, the architecture as JSON in the ``model_config``
  attribute. Nested models (a backbone inside a wrapper, ConvNeXt's Sequential stem) keep
  their weights under the top layer's group; the weight name ends in ``<layer>/<variable>``.
- Keras 3 ``.weights.h5`` (`model.save_weights("x.weights.h5")`):
  ``layers/<class_based_key>/vars/0..n`` with the real layer name in the ``name``
  attribute of each ``vars`` group, nested models as ``layers/functional/layers/...``.
  Variables are positional there, so their names come from the layer kind.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dogbreeds.errors import WeightsError

from ..safety import check_declared, check_regular, compressed_allowance, expect_dict, expect_list, parse_json

# Variable order of Keras 3 layers in `.weights.h5` (positional, no names in the file).
_POSITIONAL_VAR_NAMES = {
    "conv2d": ("kernel", "bias"),
    "depthwise_conv2d": ("kernel", "bias"),
    "dense": ("kernel", "bias"),
    "batch_normalization": ("gamma", "beta", "moving_mean", "moving_variance"),
    "layer_normalization": ("gamma", "beta"),
    "layer_scale": ("gamma",),
    "normalization": ("mean", "variance", "count"),
}
_NESTED_MODEL_KINDS = {"functional", "sequential", "model"}


@dataclass
class KerasLayer:
    """One layer of the (possibly nested) Keras model, weights as numpy arrays."""

    name: str
    kind: str  # snake_case class name: "conv2d", "batch_normalization", "functional", ...
    container: str  # name of the model that directly holds it ("" for the outermost model)
    index: int  # position inside its container (config order; file order for .weights.h5)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    config: dict | None = None  # layer config from model_config (legacy full-model files only)

    def describe(self) -> str:
        kernel = self.weights.get("kernel")
        return f"{self.name} ({self.kind}{f' kernel {tuple(kernel.shape)}' if kernel is not None else ''})"


@dataclass
class KerasFile:
    path: Path
    layout: str  # "legacy-h5" | "weights-h5"
    model_name: str | None  # outermost model name, e.g. "mobilenetv2_0.35_96"
    layers: list[KerasLayer]
    input_shape: tuple | None = None  # (H, W, C) from the config's InputLayer when known
    keras_version: str | None = None
    # False for legacy weights-only files: no config, so weightless layers of nested models
    # (pooling, dropout) are invisible and layer kinds are inferred from variable names.
    structure_known: bool = True

    def by_name(self) -> dict[str, KerasLayer]:
        return {layer.name: layer for layer in self.layers}

    def describe_layers(self, limit: int = 8) -> str:
        """Short summary for error messages: counts per layer type, then the first few layers."""
        weighted = [layer for layer in self.layers if layer.weights and layer.kind not in _NESTED_MODEL_KINDS]
        if not weighted:
            return "no layers with weights"
        counts: dict[str, int] = {}
        for layer in weighted:
            counts[layer.kind] = counts.get(layer.kind, 0) + 1
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        shown = ", ".join(layer.describe() for layer in weighted[:limit])
        more = ", ..." if len(weighted) > limit else ""
        return f"{len(weighted)} layers with weights ({kinds}): {shown}{more}"


def snake_case(class_name: str) -> str:
    """Keras' own class -> key rule: "DepthwiseConv2D" -> "depthwise_conv2d", "ReLU" -> "re_lu"."""
    name = re.sub(r"\W+", "", class_name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    name = re.sub(r"([a-z])([A-Z])", r"\1_\2", name)
    return name.lower()


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_keras_file(path: str | Path) -> KerasFile:
    """Open `path` and return its layers; WeightsError naming the path when it is not a Keras HDF5."""
    import h5py  # local: only Keras files need it

    path = Path(path)
    size = check_regular(path, "Keras weights file").st_size
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise WeightsError(
            f"{path}: cannot be opened as HDF5 ({exc}); the file is truncated, corrupt or not an "
            f"HDF5 file - download or save it again"
        ) from exc
    try:
        with handle:
            _check_storage(path, handle, size)
            if "model_weights" in handle or "layer_names" in handle.attrs:
                return _read_legacy(path, handle)
            if "layers" in handle and "vars" in handle:
                return _read_keras3_weights(path, handle)
            raise WeightsError(
                f"{path}: an HDF5 file but not a Keras model or weights file (top-level keys "
                f"{sorted(handle.keys())[:10]}, attributes {sorted(handle.attrs.keys())[:10]}); "
                f"expected a legacy Keras .h5 (model_weights group) or a Keras 3 .weights.h5 "
                f"(layers/ and vars/ groups)"
            )
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
        # h5py raises these when a dataset or group lies past the end of a cut file (TypeError:
        # a dataset where the layout needs a group).
        raise WeightsError(
            f"{path}: the HDF5 file could not be read completely ({type(exc).__name__}: {exc}); "
            f"it is probably truncated or corrupt - download or save it again"
        ) from exc


# ---------------------------------------------------------------- sizes before reading


def _check_storage(path: Path, handle, size: int) -> None:
    """Before any array is read: no links or datasets that reach other files, and the bytes the
    datasets declare (shape x item size) fit the bytes they store. HDF5 hands out the fill value
    for storage never written, so an 8 KB file can declare gigabytes: refused here.
    Uncompressed datasets must store what they declare; compressed ones get the ratio of
    safety.MAX_COMPRESSION_RATIO over all of them; all storage together fits the file."""
    import h5py

    # The visit callbacks only collect: an exception raised inside h5py's iteration surfaces as a
    # SystemError, so the checks run after it.
    external: list[str] = []

    def on_link(name, link):
        if isinstance(link, h5py.ExternalLink):
            external.append(name)
            return True  # stops the visit
        return None

    handle.visititems_links(on_link)
    if external:
        raise WeightsError(f"{path}: HDF5 links to other files ({external[0]}); a weights file is read on its own "
                           "and this one will not be loaded")
    datasets: list[tuple[str, object]] = []
    handle.visititems(lambda name, obj: datasets.append((name, obj)) if isinstance(obj, h5py.Dataset) else None)
    stored_total = packed = packed_declared = 0
    for name, obj in datasets:
        if obj.is_virtual or obj.external:
            raise WeightsError(f"{path}: dataset {name} keeps its data in another file; a weights file is read "
                               "on its own and this one will not be loaded")
        declared = math.prod(int(d) for d in (obj.shape or ())) * obj.dtype.itemsize
        stored = obj.id.get_storage_size()
        stored_total += stored
        if obj.id.get_create_plist().get_nfilters():
            packed += stored
            packed_declared += declared
        else:
            check_declared(path, f"dataset {name} {tuple(obj.shape)} {obj.dtype}", declared, stored)
    check_declared(path, f"the storage of its {len(datasets)} datasets", stored_total, size)
    if packed or packed_declared:
        check_declared(path, "its compressed datasets", packed_declared, compressed_allowance(packed))


def _attr(path: Path, obj, name: str, default=None):
    """An attribute, its declared size checked against the file's first."""
    if name not in obj.attrs:
        return default
    aid = obj.attrs.get_id(name)
    declared = math.prod(int(d) for d in (aid.shape or ())) * aid.dtype.itemsize
    check_declared(path, f"attribute {name}", declared, path.stat().st_size)
    return obj.attrs[name]


# ---------------------------------------------------------------- legacy full-model HDF5


def _walk_config(layer_cfg: dict, container: str, index: int, out: dict, source: str = "model_config",
                 where: str = "model_config") -> None:
    """Flatten model_config: name -> (class kind, config, container, index), nested models too.
    Every level is checked for the JSON shape Keras writes (WeightsError naming the field)."""
    expect_dict(layer_cfg, source, where)
    class_name = layer_cfg.get("class_name", "")
    if not isinstance(class_name, str):
        raise WeightsError(f"{source}: {where}['class_name'] must be a string, got {type(class_name).__name__}")
    config = expect_dict(layer_cfg.get("config", {}) or {}, source, f"{where}['config']")
    name = config.get("name") or layer_cfg.get("name") or f"<unnamed {class_name}>"
    if not isinstance(name, str):
        raise WeightsError(f"{source}: {where}: the layer name must be a string, got {type(name).__name__}")
    _check_layer_config(config, source, f"{where}['config']")
    kind = snake_case(class_name)
    out[name] = (kind, config, container, index)
    if config.get("layers") is not None or kind in _NESTED_MODEL_KINDS:
        for i, sub in enumerate(expect_list(config.get("layers") or [], source, f"{where}['config']['layers']")):
            _walk_config(sub, name, i, out, source, f"{where}['config']['layers'][{i}]")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_layer_config(config: dict, source: str, where: str) -> None:
    """The config values the converters read, of the types Keras writes."""
    eps = config.get("epsilon")
    if eps is not None and not _is_number(eps):
        raise WeightsError(f"{source}: {where}['epsilon'] must be a number, got {eps!r:.60}")
    activation = config.get("activation")
    if activation is not None and not isinstance(activation, (str, dict)):
        raise WeightsError(f"{source}: {where}['activation'] must be a name, got {activation!r:.60}")
    for key in ("mean", "variance"):
        value = config.get(key)
        if value is not None and not (_is_number(value) or (isinstance(value, list)
                                                             and all(_is_number(v) for v in value))):
            raise WeightsError(f"{source}: {where}[{key!r}] must be a number or a list of numbers, got {value!r:.60}")


def _shape4(value) -> tuple | None:
    """(H, W, C) of a batch shape [None, H, W, C]; None for anything else."""
    if isinstance(value, list) and len(value) == 4 and all(v is None or (isinstance(v, int) and not isinstance(v, bool))
                                                           for v in value):
        return tuple(value[1:])
    return None


def _input_shape_from_config(config: dict) -> tuple | None:
    # Shapes were checked by _walk_config: dicts and lists where Keras writes them.
    layers = (config.get("config") or {}).get("layers") or []
    for layer_cfg in layers:
        if layer_cfg.get("class_name") == "InputLayer":
            cfg = layer_cfg.get("config") or {}
            shape = _shape4(cfg.get("batch_shape") or cfg.get("batch_input_shape"))
            if shape:
                return shape
    # Sequential models may declare the input on their first layer instead.
    if layers:
        return _shape4((layers[0].get("config") or {}).get("batch_input_shape"))
    return None


def _infer_kind(name: str, weights: dict[str, np.ndarray]) -> str:
    """Kind from variable and layer names, for legacy weights-only files that carry no config."""
    keys = set(weights)
    if not weights:
        return re.sub(r"_\d+$", "", name)  # Keras' automatic names are <class key>_<n>
    if name.endswith("_layer_scale") and len(weights) == 1:
        return "layer_scale"
    if "moving_mean" in keys:
        return "batch_normalization"
    if keys == {"gamma", "beta"}:
        return "layer_normalization"
    if "kernel" in keys:
        ndim = weights["kernel"].ndim
        if ndim == 4:
            return "depthwise_conv2d" if weights["kernel"].shape[3] == 1 else "conv2d"
        return "dense" if ndim == 2 else "unknown"
    return "unknown"


def _read_legacy(path: Path, handle) -> KerasFile:
    config_text = _attr(path, handle, "model_config")
    source = f"{path} (attribute model_config)"
    config = parse_json(_text(config_text), source, "Keras model_config") if config_text is not None else None
    weights_group = handle["model_weights"] if "model_weights" in handle else handle
    keras_version = _attr(path, weights_group, "keras_version") or _attr(path, handle, "keras_version")

    described: dict[str, tuple] = {}
    model_name = None
    if config is not None:
        _walk_config(config, "", 0, described, source)
        model_name = (config.get("config") or {}).get("name")
        model_name = model_name if isinstance(model_name, str) else None
        described.pop(model_name, None)  # the outermost model itself is not a layer

    weights_by_layer: dict[str, dict[str, np.ndarray]] = {}
    nested_in: dict[str, str] = {}  # layer -> top-level (nested model) group, for files without config
    top_names = [_text(n) for n in _attr(path, weights_group, "layer_names", [])]
    for top_name in top_names:
        group = weights_group[top_name]
        for weight_name in (_text(n) for n in _attr(path, group, "weight_names", [])):
            parts = weight_name.split("/")
            layer_name = parts[-2] if len(parts) >= 2 else top_name
            var_name = parts[-1].split(":")[0]
            if var_name == "depthwise_kernel":  # Keras 2 name; Keras 3 calls it kernel
                var_name = "kernel"
            array = np.asarray(group[weight_name][()], dtype=np.float32)
            if layer_name != top_name:
                nested_in[layer_name] = top_name
            layer_weights = weights_by_layer.setdefault(layer_name, {})
            if var_name in layer_weights:
                raise WeightsError(
                    f"{path}: two weights named {layer_name}/{var_name}; layer names must be unique "
                    f"across nested models to be mapped"
                )
            layer_weights[var_name] = array

    layers: list[KerasLayer] = []
    for name, (kind, cfg, container, index) in described.items():
        layers.append(KerasLayer(name, kind, container, index, weights_by_layer.pop(name, {}), cfg))
    if config is None:  # weights-only file: top-level layers (even weightless) are all we know
        for name in top_names:
            if name not in weights_by_layer:
                layers.append(KerasLayer(name, _infer_kind(name, {}), "", len(layers), {}, None))
    for name, weights in weights_by_layer.items():
        layers.append(KerasLayer(name, _infer_kind(name, weights), nested_in.get(name, ""), len(layers), weights, None))
    for layer in layers:
        if layer.kind == "layer_scale" and len(layer.weights) == 1:
            # Keras 3 calls LayerScale's only variable "variable", Keras 2 "Variable"/"gamma".
            layer.weights = {"gamma": next(iter(layer.weights.values()))}
    input_shape = _input_shape_from_config(config) if config is not None else None
    return KerasFile(path, "legacy-h5", model_name, layers, input_shape,
                     _text(keras_version) if keras_version is not None else None,
                     structure_known=config is not None)


# ---------------------------------------------------------------- Keras 3 .weights.h5


def _read_keras3_weights(path: Path, handle) -> KerasFile:
    model_name = _attr(path, handle["vars"], "name")
    layers: list[KerasLayer] = []

    def walk(group, container: str) -> None:
        for index, key in enumerate(group["layers"].keys()):
            child = group["layers"][key]
            kind = re.sub(r"_\d+$", "", key)
            vars_group = child.get("vars")
            name = _attr(path, vars_group, "name") if vars_group is not None else None
            if name is None:
                raise WeightsError(
                    f"{path}: layer group layers/{key} has no layer name (the 'name' attribute that "
                    f"recent Keras 3 writes); without names the weights cannot be matched to layers - "
                    f"save the model again with a current Keras 3, or as a full model with model.save('x.h5')"
                )
            name = _text(name)
            weights: dict[str, np.ndarray] = {}
            if vars_group is not None and len(vars_group):
                var_names = _POSITIONAL_VAR_NAMES.get(kind)
                count = len(vars_group)
                if var_names is None or count > len(var_names) or (
                    kind == "batch_normalization" and count != 4
                ):
                    var_names = tuple(f"var{i}" for i in range(count))
                for i in range(count):
                    weights[var_names[i]] = np.asarray(vars_group[str(i)][()], dtype=np.float32)
            layers.append(KerasLayer(name, kind, container, index, weights, None))
            if "layers" in child:
                walk(child, name)

    walk(handle, "")
    return KerasFile(path, "weights-h5", _text(model_name) if model_name is not None else None, layers)
