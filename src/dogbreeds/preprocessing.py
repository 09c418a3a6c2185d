"""The one description of how pixels must be prepared for a model.

It travels with the weights (checkpoint sidecar, ONNX metadata, run directory) so that
training, evaluation, export and serving can never drift apart. Plain Python: the ONNX
prediction path imports this without importing torch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Keras MobileNetV2 scales pixels with x / 127.5 - 1, which is (x/255 - 0.5) / 0.5.
MINUS_ONE_TO_ONE_MEAN = (0.5, 0.5, 0.5)
MINUS_ONE_TO_ONE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB uint8 photo becomes the model's input tensor.

    input = (resize_then_center_crop(photo) / 255 - mean) / std, in NCHW order.
    The eval resize is int(input_size / crop_pct) on the short side, then a centre crop of
    input_size (timm's convention).
    """

    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"  # "bilinear" | "bicubic" | "nearest"
    source: str = field(default="imagenet", compare=False)  # where this config came from, for logs

    @property
    def resize_size(self) -> int:
        """Short side the eval transform resizes to before the centre crop."""
        return int(self.input_size / self.crop_pct)

    def with_input_size(self, input_size: int) -> "Preprocessing":
        return Preprocessing(input_size, self.mean, self.std, self.crop_pct, self.interpolation, self.source)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        known = {k: d[k] for k in ("input_size", "mean", "std", "crop_pct", "interpolation", "source") if k in d}
        for key in ("mean", "std"):
            if key in known:
                known[key] = tuple(float(v) for v in known[key])
                if len(known[key]) != 3:
                    raise ValueError(f"preprocessing {key} must have 3 values (RGB), got {d[key]!r}")
        if "input_size" in known:
            size = known["input_size"]
            # timm stores (3, H, W); we keep square inputs.
            known["input_size"] = int(size[-1]) if isinstance(size, (list, tuple)) else int(size)
        return cls(**known)

    @classmethod
    def from_timm_cfg(cls, cfg: dict, source: str = "timm") -> "Preprocessing":
        return cls(
            input_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
            mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
            std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),
            crop_pct=float(cfg.get("crop_pct", 0.875)),
            interpolation=str(cfg.get("interpolation", "bicubic")),
            source=source,
        )
