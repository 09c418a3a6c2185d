"""Backend for an exported `.onnx` file: onnxruntime + numpy + Pillow, never torch.

Everything the predictor needs travels inside the file (see export.py for the metadata
keys): the classes, the preprocessing, and the fact that the output is probabilities.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..data.records import ClassInfo
from ..errors import WeightsError
from ..preprocessing import Preprocessing
from .preprocess_np import NumpyEvalTransform

REQUIRED_KEYS = ("dogbreeds.classes", "dogbreeds.preprocessing", "dogbreeds.output")


class OnnxBackend:
    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime

        self.path = Path(path)
        if not self.path.is_file():
            raise WeightsError(f"{self.path}: no such ONNX file; create one with `dogbreeds export RUN --out {self.path.name}`")
        options = onnxruntime.SessionOptions()
        # Idle intra-op threads sleep instead of spinning: spinning steals the cores that image
        # decoding (CLI batches, the service's decode threads) needs on a small machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise WeightsError(f"{self.path}: onnxruntime cannot load it ({exc}); re-export it with `dogbreeds export`") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [key for key in REQUIRED_KEYS if key not in meta]
        if missing:
            raise WeightsError(
                f"{self.path}: missing dogbreeds metadata {missing}; only files written by `dogbreeds export` "
                "carry the classes and preprocessing needed to predict"
            )
        if meta["dogbreeds.output"] != "probabilities":
            raise WeightsError(f"{self.path}: output is {meta['dogbreeds.output']!r}, expected 'probabilities'; "
                               "re-export it with `dogbreeds export RUN --out FILE.onnx`")
        self.classes = ClassInfo.from_json(json.loads(meta["dogbreeds.classes"]))
        self.preprocessing = Preprocessing.from_dict(json.loads(meta["dogbreeds.preprocessing"]))
        self.name = meta.get("dogbreeds.model", self.path.stem)
        self.metadata = dict(meta)
        self._input_name = self.session.get_inputs()[0].name
        self._transform = NumpyEvalTransform(self.preprocessing)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        return self._transform(image)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
