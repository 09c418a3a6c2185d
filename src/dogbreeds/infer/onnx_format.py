"""The one ONNX contract: what a dogbreeds `.onnx` file holds (written by export.write_onnx only).

Graph (opset 17 by default):
    input     "input"     float32 N x 3 x H x W, already resized, cropped and normalised as
                          `dogbreeds.preprocessing` says; batch, height and width are dynamic
    outputs   "logits"    float32 N x classes
              "features"  float32 N x D, the pooled pre-logit features (timm's
                          forward_head(forward_features(x), pre_logits=True)), for k-NN scores

metadata_props (all values strings; JSON where structured):
    dogbreeds.format         "dogbreeds-onnx"
    dogbreeds.version        "2"
    dogbreeds.model          model name, e.g. "convnext_atto"
    dogbreeds.output         name of the logits output ("logits")
    dogbreeds.features       name of the features output ("features")
    dogbreeds.classes        ClassInfo.to_json(): [{"index", "breed_id", "name"}, ...]
    dogbreeds.breed_ids      ["n02085620-Chihuahua", ...] in label order
    dogbreeds.preprocessing  Preprocessing.to_dict()
    dogbreeds.extra          a JSON object: what the run stores for prediction time (the
                             checkpoint sidecar's "extra"; later features add their own keys)

Version 1 (the previous dogbreeds) had one output, "probabilities" (softmax in the graph), and no
features nor extra; such files still predict (log-probabilities serve as logits: the softmax of
log p is p), and asking them for features is an error saying to re-export.

Plain Python (no torch, no onnx, no onnxruntime).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..data.records import ClassInfo
from ..errors import WeightsError
from ..preprocessing import Preprocessing

FORMAT_NAME = "dogbreeds-onnx"
FORMAT_VERSION = 2
INPUT_NAME = "input"
LOGITS_NAME = "logits"
FEATURES_NAME = "features"
LEGACY_OUTPUT = "probabilities"  # version 1's only output
PREFIX = "dogbreeds."
REQUIRED_KEYS = ("dogbreeds.classes", "dogbreeds.preprocessing", "dogbreeds.output")


def metadata_props(name: str, classes: ClassInfo, preprocessing: Preprocessing, extra: dict | None = None) -> dict[str, str]:
    """The metadata_props of a version-2 file."""
    return {
        "dogbreeds.format": FORMAT_NAME,
        "dogbreeds.version": str(FORMAT_VERSION),
        "dogbreeds.model": name,
        "dogbreeds.output": LOGITS_NAME,
        "dogbreeds.features": FEATURES_NAME,
        "dogbreeds.classes": json.dumps(classes.to_json()),
        "dogbreeds.breed_ids": json.dumps(list(classes.breed_ids)),
        "dogbreeds.preprocessing": json.dumps(preprocessing.to_dict()),
        "dogbreeds.extra": json.dumps(extra or {}, sort_keys=True, default=str),
    }


@dataclass(frozen=True)
class OnnxContents:
    """What a file's metadata says (see the module doc)."""

    name: str
    classes: ClassInfo
    preprocessing: Preprocessing
    version: int
    logits_output: str | None          # None in version 1: the output is probabilities
    probabilities_output: str | None   # version 1 only
    features_output: str | None        # None in version 1
    record: dict                       # format, version, model, classes, preprocessing, extra

    @property
    def has_features(self) -> bool:
        return self.features_output is not None


def read_metadata(props: dict[str, str], path: str | Path) -> OnnxContents:
    """Parse and check a file's metadata_props; errors name the file and say to re-export it."""
    missing = [key for key in REQUIRED_KEYS if key not in props]
    if missing:
        raise WeightsError(f"{path}: missing dogbreeds metadata {missing}; only files written by `dogbreeds export` "
                           "carry the classes and preprocessing needed to predict")
    try:
        version = int(props.get("dogbreeds.version", "1"))
        classes = ClassInfo.from_json(json.loads(props["dogbreeds.classes"]))
        preprocessing = Preprocessing.from_dict(json.loads(props["dogbreeds.preprocessing"]))
        extra = json.loads(props.get("dogbreeds.extra", "{}"))
    except (ValueError, TypeError, KeyError, RecursionError) as exc:  # RecursionError: a nesting bomb
        raise WeightsError(f"{path}: unreadable dogbreeds metadata ({exc}); re-export it with "
                           "`dogbreeds export RUN --out FILE.onnx`") from None
    if version > FORMAT_VERSION:
        raise WeightsError(f"{path}: written by a newer dogbreeds (format version {version}; this one reads up to "
                           f"{FORMAT_VERSION}); upgrade dogbreeds, or re-export the run with this version")
    if not isinstance(extra, dict):
        raise WeightsError(f"{path}: dogbreeds.extra is not a JSON object; re-export it with `dogbreeds export`")
    output = props["dogbreeds.output"]
    if output == LEGACY_OUTPUT:
        logits, probabilities, features = None, output, None
    elif version >= 2:
        logits, probabilities, features = output, None, props.get("dogbreeds.features")
    else:
        raise WeightsError(f"{path}: output is {output!r}, expected 'probabilities' (format version 1); "
                           "re-export it with `dogbreeds export RUN --out FILE.onnx`")
    name = props.get("dogbreeds.model", Path(path).stem)
    record = {"format": props.get("dogbreeds.format", FORMAT_NAME), "version": version, "model": name,
              "classes": classes.to_json(), "preprocessing": preprocessing.to_dict(), "extra": extra}
    return OnnxContents(name, classes, preprocessing, version, logits, probabilities, features, record)
