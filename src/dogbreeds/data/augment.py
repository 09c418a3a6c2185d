"""Training augmentation settings: what `TrainTransform` and `build_mixup` are built from.

Plain dataclasses, no torch: the training `Recipe` holds an `AugmentConfig`, and the CLI parses
recipes without loading torch. `data/transforms.py` turns these settings into timm's pipeline.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation. Defaults are the ConvNeXt ImageNet fine-tuning recipe."""

    rrc_scale: tuple[float, float] = (0.08, 1.0)     # RandomResizedCrop area fraction
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # ... and aspect ratio range
    hflip: float = 0.5
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec; None turns it off
    color_jitter: float = 0.0        # timm ignores colour jitter while RandAugment is on
    random_erase: float = 0.25       # probability per image
    random_erase_mode: str = "pixel"  # per-pixel normal noise, as in the recipe
    random_erase_count: int = 1
    mixup: float = 0.8               # Beta(alpha) for mixup; 0 turns it off
    cutmix: float = 1.0              # Beta(alpha) for cutmix; 0 turns it off
    mixup_prob: float = 1.0          # chance a batch is mixed at all
    mixup_switch_prob: float = 0.5   # chance of cutmix instead of mixup when both are on
    mixup_mode: str = "batch"        # "batch" | "pair" | "elem" (timm)
    label_smoothing: float = 0.1
    crop_to_box: str | None = None   # None | "union" (all dogs) | "largest" (biggest dog)
    box_margin: float = 0.1          # extra context around the box, as a fraction of its size
    deterministic: bool = False      # "none" preset: the eval resize + centre crop, no randomness

    def __post_init__(self):
        if self.crop_to_box not in (None, "union", "largest"):
            raise ValueError(f"crop_to_box must be None, 'union' or 'largest', got {self.crop_to_box!r}")
        if self.mixup_mode not in ("batch", "pair", "elem"):
            raise ValueError(f"mixup_mode must be 'batch', 'pair' or 'elem', got {self.mixup_mode!r}")
        for name in ("hflip", "random_erase", "mixup_prob", "mixup_switch_prob", "label_smoothing"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be within [0, 1], got {value!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "AugmentConfig":
        """'convnext' (the default recipe), 'quick' (cheap runs), 'none' (no augmentation)."""
        if name not in PRESETS:
            raise ValueError(f"unknown augmentation preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown augmentation settings {sorted(unknown)}")
        d = dict(d)
        for key in ("rrc_scale", "rrc_ratio"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


PRESETS = {
    "convnext": AugmentConfig(),
    # Crops and flips only: fast, and enough for a few-epoch fine-tune or a smoke test.
    "quick": AugmentConfig(rrc_scale=(0.35, 1.0), rand_augment=None, random_erase=0.0, mixup=0.0, cutmix=0.0),
    "none": AugmentConfig(hflip=0.0, rand_augment=None, random_erase=0.0, mixup=0.0, cutmix=0.0,
                          label_smoothing=0.0, deterministic=True),
}
